"""rankscope's probe inside other people's training loops.

- `ProbeLogger`: two lines in a plain PyTorch loop.
- `TrainerProbeCallback`: a Hugging Face `transformers.Trainer` callback (needs transformers).
- `LightningProbeCallback`: a Lightning callback (needs lightning).

All three write a rankscope results folder (`<out>/<arm>/seed-<k>/`) that `rankscope report`
reads, and a summary to TensorBoard and Weights & Biases where those are installed. The callbacks
are imported on first use, so none of their frameworks is needed for the others.
"""

from __future__ import annotations

from typing import Any

from .logger import ProbeLogger, summarize

_LAZY = {"TrainerProbeCallback": ".hf", "LightningProbeCallback": ".lightning"}

__all__ = ["ProbeLogger", "summarize", "TrainerProbeCallback", "LightningProbeCallback"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
