"""Small models and gradients for the Muon tests (test_muon, test_update_geometry), and the seed's
Polar Express iteration for one matrix, op for op (test_muon's docstring writes out the seed's update)."""

from __future__ import annotations

import torch

from rankscope.core.model import GPT, ModelConfig
from rankscope.core.optim import POLAR_EXPRESS

# GQA (4 query heads, 2 kv heads), heads x head_dim = d_model, a tall MLP up and a wide down
SMALL = ModelConfig(vocab_size=64, n_layer=2, d_model=32, n_head=4, n_kv_head=2, head_dim=8, d_mlp=64, max_seq_len=16)
# as many kv heads as query heads, so every part may mix them when cut into heads
MHA = ModelConfig(vocab_size=64, n_layer=2, d_model=32, n_head=4, n_kv_head=4, head_dim=8, d_mlp=64, max_seq_len=16)
LR, MU = 0.02, 0.95


def seed_polar_express(g: torch.Tensor) -> torch.Tensor:
    """The seed's iteration for one matrix, op for op."""
    x = g.bfloat16()
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / (x.norm() * 1.01 + 1e-7)
    for a, b, c in POLAR_EXPRESS:
        A = x @ x.T
        B = b * A + c * (A @ A)
        x = a * x + B @ x
    return x.T if tall else x


def muon_names(model: GPT) -> list[str]:
    ids = {id(p) for _, p in model.param_roles()["matrix"]}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def random_grads(model: GPT, steps: int = 3) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    names = muon_names(model)
    shapes = dict(model.named_parameters())
    return [{n: torch.randn(shapes[n].shape, generator=gen) for n in names} for _ in range(steps)]
