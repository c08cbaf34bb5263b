"""`rankscope analyze --series`: a rankscope run's checkpoints and a folder of Hugging Face checkpoint
folders probed on one batch into a study folder `rankscope report` reads; resuming; a series whose
checkpoints disagree on the vocabulary; the hub revisions' names and selection (offline)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from _hf import tokenizer
from _runs import config, shards

from rankscope import analyze as analyze_cmd
from rankscope.analyze import analyze, checkpoints, series
from rankscope.errors import RankscopeError
from rankscope.report import load_study, write_report
from rankscope.run.train import train
from rankscope.storage import store


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RANKSCOPE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    analyze_cmd.add_arguments(parser)
    return analyze_cmd.run(parser.parse_args(argv))


def rows(df, step: int):
    """One step's probe rows of the analyze sites, in a fixed order, without the bookkeeping columns."""
    part = df[(df["step"] == step) & ~df["metric"].isin(["induction_score", "prev_token_score"])]
    return part.sort_values(["layer", "head", "site", "metric"])[["layer", "head", "site", "metric", "value"]]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished tiny rankscope run on token shards, every checkpoint kept (steps 5, 10, 15, 16)."""
    root = tmp_path_factory.mktemp("study")
    data = shards(root)
    path = root / "qk" / "seed-0"
    train(config(data, **{"train.keep_checkpoints": 10}), path, progress=False, arm="qk")
    return path


def test_a_runs_checkpoints_match_single_analyze_and_report(run, tmp_path, capsys):
    out = tmp_path / "series"
    assert cli([str(run), "--series", "--out", str(out), "--no-progress"]) == 0
    assert "measured 4 checkpoints" in capsys.readouterr().out
    rd = out / "qk" / "seed-0"
    probes = store.read_table(rd / "probes.csv")
    assert sorted(set(probes["step"])) == [5, 10, 15, 16]
    logged = store.read_table(run / "probes.csv")
    for step in (5, 10, 15, 16):
        single = analyze(run / "checkpoints" / f"step-{step:09d}.pt", out=tmp_path / f"one-{step}").table
        single = single.assign(step=step)
        got = rows(probes, step).reset_index(drop=True)
        want = rows(single, step).reset_index(drop=True)
        # the same batch, weights and probe: the same numbers, bitwise on the CPU
        assert len(got) == len(want) > 0
        np.testing.assert_array_equal(got["value"].to_numpy(), want["value"].to_numpy())
        assert (
            got[["layer", "head", "site", "metric"]].to_numpy() == want[["layer", "head", "site", "metric"]].to_numpy()
        ).all()
        # induction scores as the training run logged them at that step
        ind = lambda df, s=step: df[(df.step == s) & (df.metric == "induction_score")].sort_values(["layer", "head"])  # noqa: E731
        if step % 2 == 0 or step == 16:  # the run evaluates every 2 steps and at the end
            np.testing.assert_array_equal(ind(probes)["value"].to_numpy(), ind(logged)["value"].to_numpy())
        assert len(ind(probes)) == 2 * 2  # layers x heads
    scalars = store.read_table(rd / "scalars.csv")
    assert list(scalars["step"]) == [5, 10, 15, 16] and list(scalars["tokens"]) == [s * 128 for s in (5, 10, 15, 16)]
    assert scalars["val_loss"].notna().all() and scalars["induction_loss"].notna().all()
    assert json.loads((out / "study.json").read_text())["arm_order"] == ["qk"]

    study = load_study(out)
    assert [r.status for r in study.runs] == ["finished"] and sorted(set(study.probes["step"])) == [5, 10, 15, 16]
    md = write_report(out).read_text()
    assert "qk" in md and (out / "report.html").exists()
    assert "key" in md.lower()

    # a rerun measures nothing; one step's rows lost (a killed run) are measured again, alone
    assert series.analyze_series(run, out=out, progress=False).measured == []
    text = (rd / "scalars.csv").read_text().splitlines(keepends=True)
    (rd / "scalars.csv").write_text("".join(line for line in text if ",10," not in line))
    again = series.analyze_series(run, out=out, progress=False)
    assert again.measured == [10] and again.skipped == [5, 15, 16]
    probes2 = store.read_table(rd / "probes.csv")
    assert len(probes2) == len(probes) and sorted(store.read_table(rd / "scalars.csv")["step"]) == [5, 10, 15, 16]


def save_gpt2(path: Path, seed: int, tok, state: dict | None = None) -> None:
    """A tiny GPT-2 with random weights (seeded) and its tokenizer, as a checkpoint folder."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=len(tok))
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    if state is not None:
        (path / "trainer_state.json").write_text(json.dumps(state))


def test_hugging_face_checkpoint_folders_resume(tmp_path, capsys):
    tok = tokenizer(300)
    ckpts = tmp_path / "ckpts"
    save_gpt2(ckpts / "step100", 1, tok)
    save_gpt2(ckpts / "step200", 2, tok)
    save_gpt2(ckpts / "checkpoint-300", 3, tok, {"global_step": 300, "num_input_tokens_seen": 300 * 4096})
    (ckpts / "notes").mkdir()  # not a model: left alone
    # a folder of checkpoint folders is a series without --series
    assert cli([str(ckpts), "--batch-size", "2", "--seq-len", "32", "--tokens-per-step", "1000", "--no-progress"]) == 0
    out = tmp_path / "ckpts-series"
    rd = out / "ckpts" / "seed-0"
    probes = store.read_table(rd / "probes.csv")
    assert sorted(set(probes["step"])) == [100, 200, 300]
    assert dict(zip(*store.read_table(rd / "scalars.csv")[["step", "tokens"]].to_numpy().T)) == {
        100: 100_000,
        200: 200_000,
        300: 300 * 4096,
    }
    k = probes[(probes.site == "k") & (probes.metric == "pr_sv")]
    assert k.groupby("step").size().tolist() == [2 * 4] * 3  # layers x heads at each step
    assert len({tuple(g.sort_values(["layer", "head"])["value"]) for _, g in k.groupby("step")}) == 3  # other weights
    cfg = json.loads((rd / "config.json").read_text())
    assert cfg["model"]["n_layer"] == 2 and cfg["model"]["head_dim"] == 8 and cfg["arm"] == "ckpts"
    # the same fixed batch as a single analyze of the step200 folder
    single = analyze(ckpts / "step200", out=tmp_path / "one", batch_size=2, seq_len=32).table
    got = k[k.step == 200].sort_values(["layer", "head"])["value"].to_numpy()
    np.testing.assert_array_equal(
        got, single.query("site == 'k' and metric == 'pr_sv'").sort_values(["layer", "head"])["value"].to_numpy()
    )
    capsys.readouterr()

    before = (rd / "probes.csv").read_bytes()
    assert cli([str(ckpts), "--batch-size", "2", "--seq-len", "32", "--no-progress"]) == 0
    assert "measured 0 checkpoints (3 measured before)" in capsys.readouterr().out
    assert (rd / "probes.csv").read_bytes() == before
    save_gpt2(ckpts / "step400", 4, tok)
    result = series.analyze_series(ckpts, batch_size=2, seq_len=32, progress=False)
    assert result.measured == [400] and result.skipped == [100, 200, 300]
    assert (rd / "probes.csv").read_bytes().startswith(before)
    save_gpt2(ckpts / "step500", 5, tok)
    with pytest.raises(RankscopeError, match="another batch"):  # the rows already there were measured on 32
        series.analyze_series(ckpts, batch_size=2, seq_len=16, progress=False)
    assert (rd / "probes.csv").read_bytes().startswith(before)
    assert len(load_study(out).runs) == 1 and write_report(out).exists()
    capsys.readouterr()  # choosing steps asks for a series too
    assert cli([str(ckpts), "--steps", "200,300", "--batch-size", "2", "--seq-len", "32", "--no-progress"]) == 0
    assert "measured 0 checkpoints (2 measured before)" in capsys.readouterr().out


def test_checkpoints_of_another_vocabulary_are_refused(tmp_path, capsys):
    ckpts = tmp_path / "mixed"
    save_gpt2(ckpts / "step1", 1, tokenizer(300))
    assert cli([str(ckpts), "--batch-size", "2", "--seq-len", "16", "--no-progress"]) == 0
    rd = tmp_path / "mixed-series" / "mixed" / "seed-0"
    before = {f.name: f.read_bytes() for f in rd.iterdir()}
    save_gpt2(ckpts / "step2", 2, tokenizer(280))
    with pytest.raises(RankscopeError) as e:
        cli([str(ckpts), "--batch-size", "2", "--seq-len", "16", "--no-progress"])
    message = str(e.value)
    assert "\n" not in message and "do not share one tokenizer" in message and "step2" in message
    assert {f.name: f.read_bytes() for f in rd.iterdir()} == before
    # the command line's way: one line on stderr, exit status 1
    from rankscope import cli as main_cli

    assert main_cli.main(["analyze", str(ckpts), "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert "do not share one tokenizer" in err and "Traceback" not in err


def test_revision_names_and_selection():
    names = ["main", "step0", "step1000", "step143000", "step2000", "step512", "step3000-tokens12B", "v1.0"]
    found = checkpoints.hub_checkpoints("EleutherAI/pythia-14m", names)
    assert [c.label for c in checkpoints.select(found)] == [
        "step0",
        "step512",
        "step1000",
        "step2000",
        "step3000-tokens12B",
        "step143000",
    ]
    assert [c.tokens for c in checkpoints.select(found, steps=[3000])] == [12 * 10**9]
    assert [c.step for c in checkpoints.select(found, limit=3)] == [0, 1000, 143000]
    with pytest.raises(RankscopeError, match="no checkpoint at step 7"):
        checkpoints.select(found, steps=[7])
    with pytest.raises(RankscopeError, match="both step 5"):
        checkpoints.select(checkpoints.hub_checkpoints("r", ["stage1-step5-tokens1B", "stage2-step5-tokens2B"]))
    with pytest.raises(RankscopeError, match="no branch names a step"):
        checkpoints.hub_checkpoints("r", ["main", "dev"])
    assert checkpoints.step_of("global_step500") == 500 and checkpoints.step_of("checkpoint-500") == 500
    assert checkpoints.step_of("1200") == 1200 and checkpoints.step_of("final") is None
    assert checkpoints.tokens_of("step1000-tokens4B") == 4 * 10**9 and checkpoints.tokens_of("step1") is None


def test_hub_listing_is_mocked(monkeypatch):
    import types

    hub = types.ModuleType("huggingface_hub")
    refs = types.SimpleNamespace(branches=[types.SimpleNamespace(name=n) for n in ("main", "step10", "step20")])
    hub.list_repo_refs = lambda repo: refs  # type: ignore[attr-defined]
    monkeypatch.setitem(__import__("sys").modules, "huggingface_hub", hub)
    found, name, seed, out = checkpoints.find_series("org/model-x", hub=True)
    assert [c.step for c in found] == [10, 20] and name == "model-x" and seed == 0
    assert out == Path("rankscope-series") / "model-x"


def test_a_single_model_is_not_a_series(tmp_path):
    save_gpt2(tmp_path / "one", 0, tokenizer(300))
    with pytest.raises(RankscopeError, match="one Hugging Face model"):
        cli([str(tmp_path / "one"), "--series"])
    shutil.rmtree(tmp_path / "one")
    with pytest.raises(RankscopeError, match="no such folder"):
        cli([str(tmp_path / "one"), "--series"])
