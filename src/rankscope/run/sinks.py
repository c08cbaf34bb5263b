"""Where a summary of each evaluation streams while a run trains: TensorBoard and Weights & Biases.

`summarize` turns one evaluation's probe rows into the few numbers worth a dashboard; a sink logs
them against training tokens. `ProbeLogger` (someone else's loop) and `rankscope run`
(`train.log`, `--log`) share these, so a long run can be watched as it trains.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import RankscopeError
from ..settings.vocab import PROBE_SITES

TAG = "rankscope"  # prefix of every TensorBoard / W&B key


def summarize(table: pd.DataFrame) -> dict[str, float]:
    """The few numbers worth a dashboard from one probe table: for each site the mean PR (pr_sv)
    over all heads, for keys also per layer, and mean attention entropy and the largest logit.

    Keys: `rankscope/k_pr/mean`, `rankscope/k_pr/layer_00`, ..., `rankscope/q_pr/mean`, ...,
    `rankscope/attn_entropy/mean`, `rankscope/max_logit/max`.
    """
    out: dict[str, float] = {}
    pr = table[table["metric"] == "pr_sv"]
    for site in [s for s in PROBE_SITES if s in set(pr["site"])] + sorted(set(pr["site"]) - set(PROBE_SITES)):
        rows = pr[pr["site"] == site]
        out[f"{TAG}/{site}_pr/mean"] = float(rows["value"].mean())
        if site == "k":
            for layer, v in rows.groupby("layer")["value"].mean().items():
                out[f"{TAG}/k_pr/layer_{int(layer):02d}"] = float(v)
    attn = table[table["site"] == "attn"]
    if len(attn):
        out[f"{TAG}/attn_entropy/mean"] = float(attn[attn["metric"] == "entropy"]["value"].mean())
        out[f"{TAG}/max_logit/max"] = float(attn[attn["metric"] == "max_logit"]["value"].max())
    return out


class TensorBoardSink:
    """Scalars against training tokens, rankscope's x axis, in `<run>/tensorboard` by default."""

    def __init__(self, logdir: Path):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.logdir = logdir
        self.writer = SummaryWriter(str(logdir))

    def log(self, summary: Mapping[str, float], step: int, tokens: int) -> None:
        for key, value in summary.items():
            self.writer.add_scalar(key, value, global_step=tokens)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Logs into the active W&B run (the one a Trainer or the user started), or starts one.

    The probe's keys get their own x axis, `rankscope/tokens` (`define_metric`), so they never
    fight the step counter of whoever else logs to the run; a run started here is finished on
    close, someone else's is left open.
    """

    def __init__(self, init: Mapping[str, Any], run_path: Path):
        import wandb

        self.wandb = wandb
        self.own = wandb.run is None
        if self.own:
            kwargs = {"dir": str(run_path), "project": "rankscope", "name": f"{run_path.parent.name}/{run_path.name}"}
            self.run: Any = wandb.init(**{**kwargs, **dict(init)})
        else:
            self.run = wandb.run
        self.run.define_metric(f"{TAG}/tokens")
        self.run.define_metric(f"{TAG}/*", step_metric=f"{TAG}/tokens")

    def log(self, summary: Mapping[str, float], step: int, tokens: int) -> None:
        self.run.log({**summary, f"{TAG}/tokens": tokens, f"{TAG}/step": step})

    def close(self) -> None:
        if self.own:
            self.run.finish()


def installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def open_sinks(names: Sequence[str], run_path: Path) -> list[TensorBoardSink | WandbSink]:
    """The sinks `train.log` names for a run folder: `tensorboard` writes `<run>/tensorboard`;
    `wandb` starts a run in `<run>/wandb`, offline unless WANDB_MODE says otherwise (nothing leaves
    the machine by default). A missing package is one clear line."""
    sinks: list[TensorBoardSink | WandbSink] = []
    for name in names:
        if name == "tensorboard":
            if not installed("tensorboard"):
                raise RankscopeError("train.log=tensorboard needs the tensorboard package: pip install tensorboard")
            sinks.append(TensorBoardSink(run_path / "tensorboard"))
        elif name == "wandb":
            if not installed("wandb"):
                raise RankscopeError("train.log=wandb needs the wandb package: pip install wandb")
            sinks.append(WandbSink({"mode": os.environ.get("WANDB_MODE", "offline")}, run_path))
        else:
            raise RankscopeError(f"train.log: unknown sink {name!r} (tensorboard, wandb)")
    return sinks


def evaluation_summary(row: Mapping[str, Any], probe_rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """One evaluation of `rankscope run` for the sinks: its losses and scores (`row`, a scalars row)
    and `summarize` of its probe rows."""
    out = {
        f"{TAG}/{k}": float(row[k])
        for k in ("train_loss", "val_loss", "ood_loss", "icl_score", "induction_loss", "grad_norm")
        if isinstance(row.get(k), (int, float))
    }
    if probe_rows:
        out.update(summarize(pd.DataFrame(list(probe_rows))))
    return out
