"""rankscope inside other people's code: their training loops and their evaluation harness.

- `ProbeLogger` (`logger.py`): two lines in a plain PyTorch loop.
- `TrainerProbeCallback` (`hf_trainer.py`): a Hugging Face `transformers.Trainer` callback.
- `LightningProbeCallback` (`lightning.py`): a Lightning callback.
- `ProbeOptions` (`options.py`): the settings all three share (cadence, probe batch, sites, arm,
  seed, TensorBoard, W&B), as keyword arguments or as one object.
- `lm_eval.py`: rankscope models in EleutherAI's lm-evaluation-harness.

The three loop integrations write a rankscope results folder (`<out>/<arm>/seed-<k>/`) that
`rankscope report` reads, and a summary to TensorBoard and Weights & Biases where those are
installed. Everything here is imported on first use, so no framework is needed for the others.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "ProbeLogger": ".logger",
    "summarize": "..run.sinks",
    "ProbeOptions": ".options",
    "TrainerProbeCallback": ".hf_trainer",
    "LightningProbeCallback": ".lightning",
}

__all__ = ["ProbeLogger", "ProbeOptions", "summarize", "TrainerProbeCallback", "LightningProbeCallback"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
