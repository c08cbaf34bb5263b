"""Probing inside other people's loops: a plain PyTorch loop, the Hugging Face Trainer, Lightning;
rows that `rankscope report` reads, TensorBoard event files, an offline W&B run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from rankscope.attach import Probe
from rankscope.cli import main
from rankscope.core.model import GPT, ModelConfig
from rankscope.errors import RankscopeError
from rankscope.integrations import ProbeLogger, summarize
from rankscope.storage import store

V = 64
CFG = ModelConfig(vocab_size=V, n_layer=2, d_model=32, n_head=2, n_kv_head=1, head_dim=16, d_mlp=64, max_seq_len=32)
HELD_OUT = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(7))


def batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (4, 17), generator=g) for _ in range(n)]


def plain_loop(model: GPT, logger: ProbeLogger | None, steps: int = 6) -> None:
    """The two-line pattern in a plain loop: ProbeLogger before, logger.step() after each update."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = 0
    if logger is not None:
        logger.step(0)  # the initial model
    for x in batches(steps):
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        tokens += x[:, :-1].numel()
        if logger is not None:
            logger.step(tokens, loss=loss)


def test_plain_loop_writes_a_run_folder_that_report_reads(tmp_path, capsys):
    model = GPT(CFG)
    logger = ProbeLogger(
        model,
        tmp_path / "study",
        every_tokens=128,
        batch=HELD_OUT,
        arm="adamw",
        seed=3,
        sites=["k", "q"],
        config={"train": {"tokens": 384}},
        tensorboard=True,
    )
    plain_loop(model, logger)  # 64 tokens a step: probes at 0, 128, 256, 384
    logger.close()
    run = tmp_path / "study" / "adamw" / "seed-3"
    assert {p.name for p in run.iterdir()} >= {
        "config.json",
        "provenance.json",
        "scalars.csv",
        "probes.csv",
        "done.json",
        "tensorboard",
    }
    probes = store.read_table(run / "probes.csv")
    assert sorted(probes["tokens"].unique()) == [0, 128, 256, 384]
    assert sorted(probes["step"].unique()) == [0, 2, 4, 6]
    assert set(probes["site"]) == {"k", "q", "attn", "q_gain", "k_gain"}
    scalars = store.read_table(run / "scalars.csv")
    assert list(scalars["tokens"]) == [0, 128, 256, 384]
    assert np.isnan(scalars["train_loss"].iloc[0]) and scalars["train_loss"].iloc[1:].notna().all()
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["head_dim"] == 16 and config["train"]["tokens"] == 384 and config["arm"] == "adamw"
    assert json.loads((run / "done.json").read_text())["probes"] == 4
    provenance = json.loads((run / "provenance.json").read_text())
    assert provenance["arm"] == "adamw" and provenance["seed"] == 3 and provenance["started"]
    assert {"rankscope", "torch", "git_commit", "device", "device_name"} <= set(provenance)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    loaded = store.load_probes(tmp_path / "study", finished_only=True)
    assert len(loaded) == len(probes) and set(loaded["arm"]) == {"adamw"}
    assert main(["report", str(tmp_path / "study")]) == 0
    assert (tmp_path / "study" / "report.md").exists()
    assert "mean key PR" in capsys.readouterr().out


def test_rows_equal_a_direct_probe_of_the_model_at_that_point(tmp_path):
    model = GPT(CFG)
    logger = ProbeLogger(model, tmp_path, every_steps=100, batch=HELD_OUT, tensorboard=False)
    plain_loop(model, logger, steps=3)
    final = logger.step(192 + 64)  # a later call within the cadence: no probe
    assert final is None
    logger.close()  # ...but closing probes the final model
    rows = store.read_table(tmp_path / "run" / "seed-0" / "probes.csv")
    last = rows[rows["tokens"] == rows["tokens"].max()]
    direct = Probe(model).measure(HELD_OUT)
    merged = last.merge(direct, on=["layer", "head", "site", "metric"], suffixes=("", "_direct"))
    assert len(merged) == len(direct)
    np.testing.assert_allclose(merged["value"], merged["value_direct"], rtol=1e-9)


def test_probing_does_not_change_training(tmp_path):
    """A loop that probes trains bitwise the same model as one that does not."""
    torch.manual_seed(0)
    a, b = GPT(CFG), GPT(CFG)
    b.load_state_dict(a.state_dict())
    plain_loop(a, None)
    plain_loop(b, ProbeLogger(b, tmp_path, every_steps=1, batch=HELD_OUT, tensorboard=False))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_summary_is_per_layer_not_per_head():
    model = GPT(CFG)
    table = Probe(model, ["k", "v"]).measure(HELD_OUT)
    s = summarize(table)
    k = table[(table.site == "k") & (table.metric == "pr_sv")]
    assert s["rankscope/k_pr/mean"] == pytest.approx(k["value"].mean())
    assert s["rankscope/k_pr/layer_01"] == pytest.approx(k[k.layer == 1]["value"].mean())
    assert set(s) == {
        "rankscope/k_pr/mean",
        "rankscope/k_pr/layer_00",
        "rankscope/k_pr/layer_01",
        "rankscope/v_pr/mean",
        "rankscope/attn_entropy/mean",
        "rankscope/max_logit/max",
    }


def test_finished_runs_are_kept_and_failures_leave_them_unfinished(tmp_path):
    model = GPT(CFG)
    with ProbeLogger(model, tmp_path, every_steps=1, batch=HELD_OUT, tensorboard=False) as logger:
        logger.step(0)
    with pytest.raises(RankscopeError, match="finished run"):
        ProbeLogger(model, tmp_path, every_steps=1, batch=HELD_OUT, tensorboard=False)
    with pytest.raises(ZeroDivisionError):
        with ProbeLogger(model, tmp_path, every_steps=1, batch=HELD_OUT, tensorboard=False, overwrite=True) as logger:
            logger.step(0)
            raise ZeroDivisionError("the training loop failed")
    run = tmp_path / "run" / "seed-0"
    assert not store.is_done(run) and len(store.read_table(run / "probes.csv"))
    with pytest.raises(RankscopeError, match="exactly one of every_tokens and every_steps"):
        ProbeLogger(model, tmp_path, batch=HELD_OUT)
    with pytest.raises(RankscopeError, match="probe batch"):
        ProbeLogger(model, tmp_path, every_steps=1)


def test_one_options_object_serves_every_integration(tmp_path):
    """ProbeOptions holds the settings the three integrations share; keywords beside it replace
    its fields, and every integration checks them when it is made, not when training starts."""
    from rankscope.integrations import LightningProbeCallback, ProbeOptions, TrainerProbeCallback

    opts = ProbeOptions(every_steps=1, batch=HELD_OUT, arm="shared", tensorboard=False)
    with ProbeLogger(GPT(CFG), tmp_path, opts, seed=2) as logger:
        logger.step(0)
    assert store.is_done(tmp_path / "shared" / "seed-2")
    assert TrainerProbeCallback(tmp_path, opts).options is opts
    assert LightningProbeCallback(tmp_path, opts, arm="other").options.arm == "other"
    with pytest.raises(RankscopeError, match="exactly one of every_tokens and every_steps"):
        TrainerProbeCallback(tmp_path, batch=HELD_OUT)
    with pytest.raises(RankscopeError, match="plain folder name"):
        LightningProbeCallback(tmp_path, opts, arm="a/b")
    with pytest.raises(TypeError, match="every_step"):
        ProbeLogger(GPT(CFG), tmp_path, every_step=1, batch=HELD_OUT)  # a misspelt setting


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, T: int = 16):
        self.x = torch.randint(0, 100, (n, T), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def tiny_llama() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=100,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg)


def trainer(tmp_path: Path, callback, **args) -> transformers.Trainer:
    targs = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=6,
        per_device_train_batch_size=4,
        logging_steps=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=5,
        **args,
    )
    return transformers.Trainer(model=tiny_llama(), args=targs, train_dataset=TokenDataset(), callbacks=[callback])


def test_hf_trainer_callback_writes_rows_during_training(tmp_path, capsys):
    from rankscope.integrations import TrainerProbeCallback

    cb = TrainerProbeCallback(
        tmp_path / "study", every_steps=2, batch=torch.randint(0, 100, (2, 16)), arm="llama", tensorboard=False
    )
    trainer(tmp_path, cb, include_num_input_tokens_seen=True).train()
    run = tmp_path / "study" / "llama" / "seed-5"  # the Trainer's seed
    assert store.is_done(run)
    probes = store.read_table(run / "probes.csv")
    assert sorted(probes["step"].unique()) == [0, 2, 4, 6]
    assert sorted(probes["tokens"].unique()) == [0, 128, 256, 384]  # the Trainer's own token count
    assert len(probes[(probes.site == "k") & (probes.metric == "pr_sv")]) == 4 * 2 * 2  # points x layers x kv heads
    scalars = store.read_table(run / "scalars.csv")
    logged = scalars[scalars["train_loss"].notna()]
    assert list(logged["step"]) == [2, 4, 6] and logged["grad_norm"].notna().all()
    assert json.loads((run / "config.json").read_text())["model"]["family"] == "hf-llama"
    assert main(["report", str(tmp_path / "study")]) == 0


def test_hf_trainer_callback_counts_tokens_per_step_and_says_when_it_cannot(tmp_path):
    from rankscope.integrations import TrainerProbeCallback

    cb = TrainerProbeCallback(
        tmp_path / "a", every_tokens=200, tokens_per_step=64, batch=torch.randint(0, 100, (2, 8)), tensorboard=False
    )
    trainer(tmp_path, cb).train()
    probes = store.read_table(tmp_path / "a" / "run" / "seed-5" / "probes.csv")
    assert sorted(probes["tokens"].unique()) == [0, 256, 384]  # due at 200 -> step 4; then the end
    cb = TrainerProbeCallback(tmp_path / "b", every_steps=2, batch=torch.randint(0, 100, (2, 8)), tensorboard=False)
    with pytest.raises(RankscopeError, match="include_num_input_tokens_seen"):
        trainer(tmp_path, cb).train()


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated")  # inside Lightning, with newer torch
def test_lightning_callback(tmp_path):
    import lightning

    from rankscope.integrations import LightningProbeCallback

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.gpt = GPT(CFG)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.gpt(x, y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    data = torch.randint(0, V, (24, 17), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data[:, :-1], data[:, 1:]), batch_size=4)
    cb = LightningProbeCallback(tmp_path / "study", every_tokens=128, batch=HELD_OUT, arm="gpt", tensorboard=False)
    lightning.Trainer(
        max_steps=5,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    ).fit(Module(), loader)
    run = tmp_path / "study" / "gpt" / "seed-0"
    assert store.is_done(run)
    scalars = store.read_table(run / "scalars.csv")
    assert list(scalars["tokens"]) == [0, 128, 256, 320]  # counted from the batches; the end probed too
    assert list(scalars["step"]) == [0, 2, 4, 5]
    assert scalars["train_loss"].iloc[1:].notna().all()


def test_wandb_offline_run_and_an_already_active_run(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    model = GPT(CFG)
    logger = ProbeLogger(
        model, tmp_path / "study", every_steps=1, batch=HELD_OUT, tensorboard=False, wandb={"dir": str(tmp_path)}
    )
    plain_loop(model, logger, steps=2)
    logger.close()
    assert wandb.run is None  # a run it started, it finished
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))

    run = wandb.init(dir=str(tmp_path / "mine"), project="mine")
    try:
        logger = ProbeLogger(model, tmp_path / "study2", every_steps=1, batch=HELD_OUT, tensorboard=False)
        logger.step(0)
        logger.close()
        assert wandb.run is run  # someone else's run stays open
        assert run.summary.get("rankscope/k_pr/mean") is not None  # logged into that run
    finally:
        run.finish()


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated")
@pytest.mark.parametrize(
    "script,argv,made",
    [
        ("probe_hf_model.py", [], None),
        ("transformer_lens_probe.py", [], None),
        ("analyze_hf_folder.py", ["tiny"], "tiny-analyze/key_pr_heatmap.png"),
        ("plain_loop.py", ["out", "3"], "out/llama-adamw/seed-0/done.json"),
        ("hf_trainer.py", ["out", "3"], "out/gpt2/seed-42/done.json"),  # the Trainer's seed
        ("lightning_callback.py", ["out", "3"], "out/gpt-adamw/seed-0/done.json"),
    ],
)
def test_examples_run(script, argv, made, tmp_path, monkeypatch, capsys):
    """Every example runs offline as written (with fewer training steps)."""
    import runpy
    import sys

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setattr(sys, "argv", [script, *argv])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    assert capsys.readouterr().out
    if made:
        assert (tmp_path / made).exists()
