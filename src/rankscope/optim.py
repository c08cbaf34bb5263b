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


class Optimizers:
    """The run's optimizers as one: step, zero_grad, learning-rate scale, state for checkpoints.

    With several processes, Muon's orthogonalization is divided across ranks instead of repeated
    on each: every rank owns a share of the hidden matrices (balanced by size), keeps Muon state
    only for those, updates them, then broadcasts them to the others (modded-nanogpt's scheme).
    AdamW is cheap and runs everywhere on the already all-reduced gradients.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer], counts: dict[str, int],
                 shards: list[list[torch.Tensor]] | None = None, rank: int = 0):
        self.optimizers, self.counts, self.shards, self.rank = optimizers, counts, shards or [], rank
        for opt in optimizers:
            for group in opt.param_groups:
                group.setdefault("initial_lr", group["lr"])

    @property
    def world_size(self) -> int:
        return max(1, len(self.shards))

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()
        if self.world_size > 1:
            self._exchange()

    @torch.no_grad()
    def _exchange(self) -> None:
        import torch.distributed as dist

        for owner, params in enumerate(self.shards):
            if not params:
                continue
            if owner == self.rank:
                flat = torch.cat([p.reshape(-1) for p in params])
            else:
                flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
            dist.broadcast(flat, src=owner)
            if owner != self.rank:
                for p, chunk in zip(params, flat.split([p.numel() for p in params])):
                    p.copy_(chunk.view_as(p))

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        for params in self.shards:  # matrices other ranks own still get gradients here
            for p in params:
                p.grad = None

    def set_lr(self, scale: float) -> None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * scale

    def state_dict(self) -> dict:
        return {"world_size": self.world_size, "optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        if state["world_size"] != self.world_size:
            raise ValueError(f"checkpoint written by {state['world_size']} processes; this run has {self.world_size}")
        for opt, s in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(s)


def _balanced_owners(sizes: list[int], world_size: int) -> list[int]:
    """Owner rank of each matrix: largest first onto the least-loaded rank (deterministic)."""
    load = [0] * world_size
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += sizes[i]
    return owners


def build_optimizers(model: nn.Module, cfg: OptimConfig, fused: bool = False,
                     rank: int = 0, world_size: int = 1) -> Optimizers:
    """Optimizers for `model` by parameter role; `.counts` holds the parameters in each role.

    Asserts that every trainable parameter lands in exactly one group (torchtitan's coverage check).
    """
    roles = model.param_roles()
    adamw_kw: dict = dict(betas=(cfg.adamw_beta1, cfg.adamw_beta2), eps=cfg.adamw_eps)
    if fused:
        adamw_kw["fused"] = True
    matrices = [p for _, p in roles["matrix"]]
    # weight decay on matrices and embeddings; never on gains (decaying a gain pulls it to zero)
    adam_groups = [
        dict(params=[p for _, p in roles["embedding"]], lr=cfg.adamw_lr, weight_decay=cfg.adamw_weight_decay,
             role="embedding"),
        dict(params=[p for _, p in roles["gain"]], lr=cfg.adamw_lr, weight_decay=0.0, role="gain"),
    ]
    optimizers: list[torch.optim.Optimizer] = []
    shards: list[list[torch.Tensor]] = []
    muon_params: list[torch.Tensor] = []
    if cfg.name == "muon":
        muon_params = matrices
        if world_size > 1:
            owners = _balanced_owners([p.numel() for p in matrices], world_size)
            shards = [[p for p, o in zip(matrices, owners) if o == r] for r in range(world_size)]
        mine = shards[rank] if shards else matrices
        if mine:
            optimizers.append(torch.optim.Muon(
                [dict(params=mine, role="matrix")], lr=cfg.muon_lr, momentum=cfg.muon_momentum,
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

    # coverage: each trainable parameter in exactly one group (Muon's counted before sharding)
    grouped = [p for opt in optimizers if not isinstance(opt, torch.optim.Muon)
               for g in opt.param_groups for p in g["params"]] + muon_params
    ids = [id(p) for p in grouped]
    assert len(ids) == len(set(ids)), "a parameter is in two optimizer groups"
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(ids) == trainable, f"{len(trainable - set(ids))} trainable parameters have no optimizer"

    counts = {role: sum(p.numel() for _, p in params) for role, params in roles.items()}
    return Optimizers(optimizers, counts, shards, rank)


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
