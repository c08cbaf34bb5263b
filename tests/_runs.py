"""Real tiny training runs for the tests that train, kill, resume or signal one (test_resume,
test_signals, test_faults, test_checkpoint_fit and others): token shards whose loss moves, a run
config small enough for the CPU, an uninterrupted run to compare with, the bitwise comparison, and
a stand-in for SIGKILL after a given row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from rankscope.data import write_shard
from rankscope.run import checkpoint
from rankscope.run.train import train
from rankscope.settings.config import RunConfig, apply_overrides
from rankscope.storage import store

SETTINGS = {
    "model.n_layer": 2,
    "model.d_model": 64,
    "model.n_head": 2,
    "model.n_kv_head": 1,
    "model.head_dim": 32,
    "model.d_mlp": 128,
    "model.vocab_size": 256,
    "model.max_seq_len": 32,
    "train.batch_size": 4,
    "train.seq_len": 32,
    "train.eval_batches": 1,
    "probe.batch_size": 2,
    "probe.sites": "k,q,v,o",
    "train.tokens": 16 * 128,
    "train.eval_every": 2 * 128,
    "train.checkpoint_every": 5 * 128,
    "train.keep_checkpoints": 2,
    "train.checkpoint_series": 0,  # the rolling window alone; test_checkpoint_series.py keeps a series
    "train.threads": 1,
}
TIMING = ("elapsed_s", "probe_s", "eval_s", "tokens_per_s", "peak_memory_bytes")
METRIC_COLUMNS = ["arm", "seed", "step", "tokens", "train_loss", "val_loss", "ood_loss", "lr_scale", "grad_norm"]


def shards(tmp: Path) -> Path:
    """A folder of token shards: structured enough that the loss moves."""
    rng = np.random.default_rng(0)
    base = np.tile(np.arange(40, dtype=np.uint16), 400) + rng.integers(0, 3, 16000).astype(np.uint16)
    folder = tmp / "shards"
    folder.mkdir(exist_ok=True)
    write_shard(folder / "train_000.bin", base[:14000])
    write_shard(folder / "val_000.bin", base[14000:])
    return folder


def config(data: Path, **extra) -> RunConfig:
    return apply_overrides(RunConfig(), {**SETTINGS, "data.path": str(data), **extra})


def metric_rows(run: Path) -> tuple[str, str]:
    scal = store.read_table(run / "scalars.csv")[METRIC_COLUMNS].to_csv(index=False)
    probes = (run / "probes.csv").read_text()
    return scal, probes


def same(a, b) -> bool:
    """Bitwise equality of nested checkpoint contents (tensors, dicts, lists, numbers)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def final_values(run: Path) -> str:
    """done.json without its timing fields (as text, so that a NaN compares equal)."""
    done = store.read_json(run / store.DONE)
    return json.dumps({k: v for k, v in done.items() if k not in TIMING}, sort_keys=True)


def assert_same_run(run: Path, whole: Path) -> None:
    """`run` finished with the rows, checkpoints, final weights and optimizer state, and final
    values of the uninterrupted `whole`, bit for bit."""
    assert store.is_done(run)
    assert metric_rows(run) == metric_rows(whole)
    assert checkpoint.steps(run) == checkpoint.steps(whole)
    last = checkpoint.steps(whole)[-1]
    a = torch.load(whole / store.CHECKPOINTS / f"step-{last:09d}.pt", weights_only=True)
    b = torch.load(run / store.CHECKPOINTS / f"step-{last:09d}.pt", weights_only=True)
    for key in ("model", "optim", "rng_cpu", "loss_sum", "norm_sum", "last_eval"):
        assert same(a[key], b[key]), key
    assert final_values(run) == final_values(whole)
    assert store.read_json(run / store.DONE)["final_val_loss"] is not None


def uninterrupted(tmp_path_factory) -> Path:
    """An uninterrupted run of `config` (arm "a"), to compare interrupted ones with."""
    tmp = tmp_path_factory.mktemp("whole")
    train(config(shards(tmp)), tmp / "run", progress=False, arm="a")
    return tmp / "run"


class Killed(BaseException):
    """Stands in for SIGKILL in-process: nothing in the library catches it."""


def after_row(step: int, action, table: str = "scalars.csv"):
    """A replacement for TableWriter.append that calls `action()` once the rows of `step` are in
    `table`: where a test kills, signals or fills the disk."""
    append = store.TableWriter.append

    def append_then(self, rows):
        rows = list(rows)
        append(self, rows)
        if self.path.name == table and rows and rows[0]["step"] == step:
            action()

    return append_then


def kill_after_row(monkeypatch, step: int) -> None:
    def kill():
        raise Killed

    monkeypatch.setattr(store.TableWriter, "append", after_row(step, kill))
