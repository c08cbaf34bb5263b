"""Optimizers by parameter role, and learning-rate schedules as pure functions of progress.

`muon`:  torch.optim.Muon on the 2D hidden matrices (Q, K, V, O and MLP, each orthogonalized on its
         own), AdamW on embeddings and gains.
`adamw`: AdamW on everything.
The model declares roles (`GPT.param_roles`); nothing here matches parameter names.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig


def build_optimizers(model: nn.Module, cfg: OptimConfig, fused: bool = False) -> tuple[list[torch.optim.Optimizer], dict[str, int]]:
    """Optimizers for `model` and the number of parameters each role group holds.

    Asserts that every trainable parameter lands in exactly one group (torchtitan's coverage check).
    """
    roles = model.param_roles()
    adamw_kw = dict(betas=(cfg.adamw_beta1, cfg.adamw_beta2), eps=cfg.adamw_eps)
    if fused:
        adamw_kw["fused"] = True
    matrices = [p for _, p in roles["matrix"]]
    embeddings = [p for _, p in roles["embedding"]]
    gains = [p for _, p in roles["gain"]]
    # weight decay on matrices and embeddings; never on gains (decaying a gain pulls it to zero)
    adam_groups = [
        dict(params=embeddings, lr=cfg.adamw_lr, weight_decay=cfg.adamw_weight_decay, role="embedding"),
        dict(params=gains, lr=cfg.adamw_lr, weight_decay=0.0, role="gain"),
    ]
    optimizers: list[torch.optim.Optimizer] = []
    if cfg.name == "muon":
        optimizers.append(torch.optim.Muon(
            [dict(params=matrices, role="matrix")], lr=cfg.muon_lr, momentum=cfg.muon_momentum,
            nesterov=cfg.muon_nesterov, ns_steps=cfg.muon_ns_steps, weight_decay=cfg.muon_weight_decay,
        ))
    elif cfg.name == "adamw":
        adam_groups.insert(0, dict(params=matrices, lr=cfg.adamw_matrix_lr,
                                   weight_decay=cfg.adamw_weight_decay, role="matrix"))
    else:
        raise ValueError(f"unknown optimizer {cfg.name!r}")
    adam_groups = [g for g in adam_groups if g["params"]]
    if adam_groups:
        optimizers.append(torch.optim.AdamW(adam_groups, **adamw_kw))

    # coverage: each trainable parameter in exactly one group
    seen: dict[int, int] = {}
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                seen[id(p)] = seen.get(id(p), 0) + 1
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert all(c == 1 for c in seen.values()), "a parameter is in two optimizer groups"
    assert set(seen) == trainable, f"{len(trainable - set(seen))} trainable parameters have no optimizer"

    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    counts = {role: sum(p.numel() for _, p in params) for role, params in roles.items()}
    return optimizers, counts


def lr_scale(tokens: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier on every group's base learning rate after `tokens` of `total` training tokens:
    linear warmup over cfg.warmup_tokens, then constant (the seed's), cosine or linear decay to
    cfg.min_lr_ratio."""
    if cfg.warmup_tokens > 0 and tokens < cfg.warmup_tokens:
        return (tokens + 1) / cfg.warmup_tokens
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (tokens - cfg.warmup_tokens) / max(1, total - cfg.warmup_tokens))
    if cfg.schedule == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * progress))
    elif cfg.schedule == "linear":
        decay = 1 - progress
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}")
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def set_lr(optimizers: list[torch.optim.Optimizer], scale: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * scale
