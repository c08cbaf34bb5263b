"""Pieces the benchmark scripts share."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from rankscope.core.optim import optimizer_step
from rankscope.storage.provenance import cpu_info


def train_step_fn(model: torch.nn.Module, opt, sampler, grad_clip: float) -> Callable[[], None]:
    """One full optimizer step on the sampler's next batch, as train() takes it (less evaluation)."""
    steps = itertools.count()

    def train_step() -> None:
        x, y = sampler.batch(next(steps))
        model(x, y).backward()
        optimizer_step(model, opt, grad_clip)

    return train_step


def cpu_name() -> str:
    """The CPU's model name (Linux), else what platform says."""
    return cpu_info()["name"]
