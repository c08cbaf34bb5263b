"""The precision of the measurements' own math: autocast off inside hooks, and the dtype that keeps
Gram matrices and projections exact on every device."""

from __future__ import annotations

import torch


def no_autocast(t: torch.Tensor) -> torch.autocast:
    """Autocast off for math inside hooks: under autocast even float32 einsums and matmuls run in
    bf16 and return bf16, which would round Gram matrices, projections and attention logits."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def exact_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype of Grams and projections: float32 on the CPU, whose matmuls are IEEE; float64 on
    CUDA, where float32 matmuls run in TF32 (10 significant bits) once the trainer allows it, as
    the probe's Grams do (`GramProbe._accumulate_gram`); these matmuls are tiny at float64's rate."""
    return torch.float64 if t.device.type == "cuda" else torch.float32
