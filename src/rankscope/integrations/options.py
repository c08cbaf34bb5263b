"""`ProbeOptions`: what to probe, how often, and where the rows go: the settings that
`ProbeLogger`, `TrainerProbeCallback` and `LightningProbeCallback` share, checked once.

Each of the three takes them as keyword arguments (`ProbeLogger(model, out, every_tokens=...)`)
or as one `ProbeOptions` (`ProbeLogger(model, out, options)`), so one set of settings can be
reused across loops; keywords given beside `options` replace its fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import RankscopeError
from ..measure.sites import Site


@dataclass(frozen=True, eq=False)  # eq=False: fields hold tensors, which do not compare to one bool
class ProbeOptions:
    """Settings shared by rankscope's training-loop integrations.

    every_tokens / every_steps: the cadence (exactly one). A probe happens at the first step and
        then whenever the count reaches the next multiple.
    batch: the held-out token ids (B, T) to measure on, or a list of such batches; or `text` and
        `tokenizer` (cut into one batch of `batch_size` x `seq_len` tokens; the Trainer callback
        falls back to the Trainer's `processing_class` when `tokenizer` is not given).
    sites, attention: what to measure (see `rankscope.attach.Probe`); keys after QK-Norm and RoPE
        by default.
    arm, seed: how `rankscope report` groups this run among others; rows go to
        `<out>/<arm>/seed-<seed>/`. seed None: the framework's seed where it has one (the Trainer's
        `args.seed`), else 0.
    config: anything worth keeping with the run (written into config.json; a `train.tokens` entry
        tells the report the run's budget).
    tensorboard: None = when the tensorboard package is installed, True = required, False = off,
        or a log folder (default `<run>/tensorboard`).
    wandb: None = only into an already active W&B run, True = start one when none is active
        (offline with WANDB_MODE=offline), False = off, or a dict of `wandb.init` arguments.
    overwrite: a finished run folder of the same arm and seed is refused unless True (then it is
        replaced). An unfinished one is continued: its rows are kept and new rows appended.
    distributed: in a multi-process run (DDP, FSDP2), "auto" (default) or True sums the probe over
        every rank's share of the batch, a ProcessGroup over that group, False probes each rank's
        tokens alone (see `rankscope.attach.Probe`). Only global rank 0 writes files.
    """

    every_tokens: int | None = None
    every_steps: int | None = None
    batch: torch.Tensor | Sequence[torch.Tensor] | None = None
    text: str | Iterable[str] | None = None
    tokenizer: Any = None
    seq_len: int = 256
    batch_size: int = 8
    sites: Iterable[str | Site] = ("k",)
    attention: bool = True
    arm: str = "run"
    seed: int | None = None
    config: Mapping[str, Any] | None = None
    tensorboard: bool | str | Path | None = None
    wandb: bool | Mapping[str, Any] | None = None
    overwrite: bool = False
    distributed: bool | str | Any = "auto"

    def __post_init__(self) -> None:
        from ..attach import check_distributed

        check_distributed(self.distributed)
        if (self.every_tokens is None) == (self.every_steps is None):
            raise RankscopeError("give exactly one of every_tokens and every_steps")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise RankscopeError(f"every_tokens / every_steps must be a positive integer, got {self.every!r}")
        if (self.batch is None) == (self.text is None):
            raise RankscopeError("give the held-out probe batch: batch= (token ids) or text= with tokenizer=")
        if not str(self.arm) or "/" in str(self.arm):
            raise RankscopeError(f"arm must be a plain folder name, got {self.arm!r}")

    @property
    def every(self) -> int:
        """The cadence, in tokens or steps (`by_tokens` says which)."""
        return self.every_tokens if self.every_tokens is not None else self.every_steps  # type: ignore[return-value]

    @property
    def by_tokens(self) -> bool:
        return self.every_tokens is not None

    @classmethod
    def of(cls, options: ProbeOptions | None, changes: Mapping[str, Any]) -> ProbeOptions:
        """`options` with `changes` (keyword arguments) applied, or the options `changes` alone make."""
        if options is None:
            return cls(**changes)
        if not isinstance(options, ProbeOptions):
            raise RankscopeError(f"options must be a ProbeOptions, got {type(options).__name__}")
        return dataclasses.replace(options, **changes) if changes else options


__all__ = ["ProbeOptions"]
