"""Pieces the benchmark scripts share."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch


def train_step_fn(model: torch.nn.Module, opt, sampler, grad_clip: float) -> Callable[[], None]:
    """One full optimizer step on the sampler's next batch, as train() takes it (less evaluation)."""
    steps = itertools.count()

    def train_step() -> None:
        x, y = sampler.batch(next(steps))
        model(x, y).backward()
        if grad_clip > 0:  # 0 = off, as in train(), which still measures the norm
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        else:
            torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        opt.step()
        opt.zero_grad()

    return train_step


def cpu_name() -> str:
    """The CPU's model name (Linux), else what platform says."""
    import platform

    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
