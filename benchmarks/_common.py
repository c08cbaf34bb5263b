"""Pieces the benchmark scripts share."""

from __future__ import annotations

import itertools
from typing import Callable

import torch


def train_step_fn(model: torch.nn.Module, opt, sampler, grad_clip: float) -> Callable[[], None]:
    """One full optimizer step on the sampler's next batch, as train() takes it (less evaluation)."""
    steps = itertools.count()

    def train_step() -> None:
        x, y = sampler.batch(next(steps))
        model(x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        opt.zero_grad()

    return train_step
