"""Optimizers by parameter role, and learning-rate schedules as pure functions of progress.

`muon`:  Muon on the 2D hidden matrices, AdamW on embeddings and gains.
`adamw`: AdamW on everything.

Muon orthogonalizes each update matrix. Which matrix that is, for attention, is a setting
(`optim.muon_qkvo`), because it is a confound of the seed study:

  separate  each of Q, K, V, O on its own (torch.optim.Muon as it is);
  stacked   each layer's Q, K, V, O stacked by rows into one matrix, as the seed stores them, so K's
            update depends on Q's, V's and O's gradients; the learning-rate scale is the stack's;
  per_head  each head's slice of Q, K and V (its rows) and of O (its columns) on its own.

The iteration is a setting too (`optim.muon_ns`): torch's fixed quintic Newton-Schulz, or the
Polar Express schedule the seed uses. torch.optim.Muon runs `separate` + `newton_schulz`; every
other choice runs `BlockMuon` below, which differs only in what it orthogonalizes and how.
The model declares roles (`GPT.param_roles`) and its attention matrices
(`GPT.attention_matrices`); nothing here matches parameter names.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .config import OptimConfig

# Torch's fixed quintic (Jordan et al. 2024, "Muon"): the coefficients of torch.optim.Muon.
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)
# Polar Express (Amsel, Persson, Musco and Gower 2025): one odd quintic per step, chosen so that
# five steps map every singular value in (0, 1] close to 1. These are the five triples the seed
# study uses (as modded-nanogpt), with its input scaling G / (1.01 ||G||_F + 1e-7).
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
MUON_NS = ("newton_schulz", "polar_express")


def orthogonalize(g: torch.Tensor, method: str = "polar_express", steps: int = 5) -> torch.Tensor:
    """An approximation of U Vᵀ for g = U S Vᵀ, for one matrix (m, n) or a batch (b, m, n), in
    bfloat16 as both torch and the seed compute it. A wide layout (m <= n) keeps X Xᵀ small.
    Each step maps X to a X + (b A + c A²) X with A = X Xᵀ."""
    x = g.bfloat16()
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    norm = x.norm(dim=(-2, -1), keepdim=True)
    if method == "polar_express":  # the seed's arithmetic, op for op
        x = x / (norm * 1.01 + 1e-7)  # the 1.01 keeps the top singular value safely inside (0, 1]
        for a, b, c in POLAR_EXPRESS[:steps]:
            A = x @ x.mT
            B = b * A + c * (A @ A)
            x = a * x + B @ x
    elif method == "newton_schulz":  # torch.optim.Muon's arithmetic: fused multiply-adds
        single = x.ndim == 2
        x = x / norm.clamp_min(1e-7)
        x = x[None] if single else x  # baddbmm wants a batch
        a, b, c = NEWTON_SCHULZ
        for _ in range(steps):
            A = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(A, A, A, beta=b, alpha=c), x, beta=a)
        x = x[0] if single else x
    else:
        raise ValueError(f"unknown orthogonalization {method!r}")
    return x.mT if tall else x


def lr_ratio(rows: int, cols: int) -> float:
    """Muon's learning-rate scale for an update of shape (rows, cols): sqrt(max(1, rows / cols)),
    as torch ("original") and the seed."""
    return math.sqrt(max(1.0, rows / cols))


class BlockMuon(torch.optim.Optimizer):
    """Muon whose orthogonalization runs on blocks built from its parameters' updates.

    Momentum is per parameter and elementwise, exactly as torch.optim.Muon (buffer lerp, Nesterov
    blend); only the matrices handed to the orthogonalization differ. Each param group declares
    its `layout`:

      each    every parameter is its own matrix (torch.optim.Muon's view);
      stack   the group's parameters, stacked by rows, are one matrix (the seed's QKVO);
      heads   each parameter is cut into slices of `head_dim` along its `split` dimension
              (0: rows, a head of Q, K or V; 1: columns, a head's share of O), each its own matrix.

    A block's learning-rate scale follows its own shape. Blocks of equal shape are orthogonalized
    together as one batch. State (the momentum buffers) has torch.optim.Muon's layout.
    """

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns: str = "polar_express",
        ns_steps: int = 5,
        weight_decay: float = 0.0,
    ):
        if ns not in MUON_NS:
            raise ValueError(f"unknown orthogonalization {ns!r}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            ns=ns,
            ns_steps=ns_steps,
            weight_decay=weight_decay,
            layout="each",
            split=None,
            head_dim=0,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["layout"] not in ("each", "stack", "heads"):
                raise ValueError(f"unknown layout {group['layout']!r}")
            if any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon takes 2D parameters only")

    @torch.no_grad()
    def _blocks(self, group: dict) -> list[tuple[torch.Tensor, list[tuple[torch.Tensor, tuple]]]]:
        """Advance the momentum of the group's parameters and return its blocks: (matrix, pieces).
        Each piece (parameter, index) is a region of a parameter; a block's pieces take its rows
        in order."""
        updates = []
        for p in group["params"]:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            buf = self.state[p].get("momentum_buffer")
            if buf is None:
                buf = self.state[p]["momentum_buffer"] = torch.zeros_like(g)
            buf.lerp_(g, 1 - group["momentum"])
            updates.append(g.lerp(buf, group["momentum"]) if group["nesterov"] else buf)
        everything = (slice(None), slice(None))
        if group["layout"] == "stack":  # (sum of rows, cols); step() hands each its rows back
            return [(torch.cat(updates, dim=0), [(p, everything) for p in group["params"]])]
        if group["layout"] == "heads":
            E, blocks = group["head_dim"], []
            for p, u, dim in zip(group["params"], updates, group["split"]):
                for j, chunk in enumerate(u.split(E, dim=dim)):
                    index = (
                        (slice(j * E, (j + 1) * E), slice(None))
                        if dim == 0
                        else (slice(None), slice(j * E, (j + 1) * E))
                    )
                    blocks.append((chunk, [(p, index)]))
            return blocks
        return [(u, [(p, everything)]) for p, u in zip(group["params"], updates)]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # every group's blocks, bucketed by (shape, iteration) so equal blocks go through as a batch
        buckets: dict[tuple, list] = {}
        for group in self.param_groups:
            if not any(p.grad is not None for p in group["params"]):
                continue
            for p in group["params"]:  # decoupled weight decay, once per parameter (as torch)
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
            for matrix, pieces in self._blocks(group):
                key = (tuple(matrix.shape), group["ns"], group["ns_steps"])
                buckets.setdefault(key, []).append((matrix, pieces, group["lr"]))
        for (shape, ns, steps), items in buckets.items():
            ortho = orthogonalize(torch.stack([m for m, _, _ in items]), ns, steps)  # (b, rows, cols)
            ratio = lr_ratio(*shape)
            for o, (_, pieces, lr) in zip(ortho, items):
                row = 0
                for p, (rows, cols) in pieces:
                    target = p[rows, cols]
                    target.add_(o[row : row + target.shape[0]].to(p.dtype), alpha=-lr * ratio)
                    row += target.shape[0]
        return loss


class Optimizers:
    """The run's optimizers as one: step, zero_grad, learning-rate scale, state for checkpoints.

    With several processes, Muon's orthogonalization is divided across ranks instead of repeated
    on each: every rank owns a share of the hidden matrices (balanced by size), keeps Muon state
    only for those, updates them, then broadcasts them to the others (modded-nanogpt's scheme).
    AdamW is cheap and runs everywhere on the already all-reduced gradients.
    """

    def __init__(
        self,
        optimizers: list[torch.optim.Optimizer],
        counts: dict[str, int],
        shards: list[list[torch.Tensor]] | None = None,
        rank: int = 0,
    ):
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


def muon_units(model: nn.Module, grouping: str) -> list[dict]:
    """Muon's param groups for `grouping`: one per stacked layer or per split matrix, and one
    'each' group per remaining matrix (so every unit can be owned by one rank). Order: the model's."""
    matrices = [p for _, p in model.param_roles()["matrix"]]
    attention = {id(p): (layer, i) for layer, ws in enumerate(model.attention_matrices()) for i, p in enumerate(ws)}
    units, done = [], set()
    for p in matrices:
        if id(p) not in attention or grouping == "separate":
            units.append(dict(params=[p], layout="each"))
        elif grouping == "stacked":
            layer, _ = attention[id(p)]
            if layer not in done:
                done.add(layer)
                units.append(dict(params=list(model.attention_matrices()[layer]), layout="stack"))
        elif grouping == "per_head":
            _, i = attention[id(p)]  # Q, K, V split by rows (one head each), O by columns
            units.append(dict(params=[p], layout="heads", split=[1 if i == 3 else 0], head_dim=model.cfg.head_dim))
        else:
            raise ValueError(f"unknown Muon grouping {grouping!r}")
    return units


def build_optimizers(
    model: nn.Module, cfg: OptimConfig, fused: bool = False, rank: int = 0, world_size: int = 1
) -> Optimizers:
    """Optimizers for `model` by parameter role; `.counts` holds the parameters in each role.

    Asserts that every trainable parameter lands in exactly one group (torchtitan's coverage check).
    """
    roles = model.param_roles()
    adamw_kw: dict = dict(betas=(cfg.adamw_beta1, cfg.adamw_beta2), eps=cfg.adamw_eps)
    if fused:
        adamw_kw["fused"] = True
    matrices = [p for _, p in roles["matrix"]]
    # weight decay on matrices and embeddings; on gains only if asked (the seed decays them; decay
    # pulls a gain towards zero, so rankscope's own studies may set it to 0)
    adam_groups = [
        dict(
            params=[p for _, p in roles["embedding"]],
            lr=cfg.adamw_lr,
            weight_decay=cfg.adamw_weight_decay,
            role="embedding",
        ),
        dict(
            params=[p for _, p in roles["gain"]], lr=cfg.adamw_lr, weight_decay=cfg.adamw_gain_weight_decay, role="gain"
        ),
    ]
    optimizers: list[torch.optim.Optimizer] = []
    shards: list[list[torch.Tensor]] = []
    muon_params: list[torch.Tensor] = []
    if cfg.name == "muon":
        muon_params = matrices
        units = muon_units(model, cfg.muon_qkvo)
        if world_size > 1:  # a unit (one stacked layer, one matrix) is owned whole by one rank
            owners = _balanced_owners([sum(p.numel() for p in u["params"]) for u in units], world_size)
            shards = [[p for u, o in zip(units, owners) if o == r for p in u["params"]] for r in range(world_size)]
            units = [u for u, o in zip(units, owners) if o == rank]
        if units and cfg.muon_qkvo == "separate" and cfg.muon_ns == "newton_schulz":
            optimizers.append(
                torch.optim.Muon(
                    [dict(params=[p for u in units for p in u["params"]], role="matrix")],
                    lr=cfg.muon_lr,
                    momentum=cfg.muon_momentum,
                    nesterov=cfg.muon_nesterov,
                    ns_steps=cfg.muon_ns_steps,
                    weight_decay=cfg.muon_weight_decay,
                )
            )
        elif units:
            optimizers.append(
                BlockMuon(
                    [dict(u, role="matrix") for u in units],
                    lr=cfg.muon_lr,
                    momentum=cfg.muon_momentum,
                    nesterov=cfg.muon_nesterov,
                    ns=cfg.muon_ns,
                    ns_steps=cfg.muon_ns_steps,
                    weight_decay=cfg.muon_weight_decay,
                )
            )
    elif cfg.name == "adamw":
        adam_groups.insert(
            0, dict(params=matrices, lr=cfg.adamw_matrix_lr, weight_decay=cfg.adamw_weight_decay, role="matrix")
        )
    else:
        raise ValueError(f"unknown optimizer {cfg.name!r}")
    adam_groups = [g for g in adam_groups if g["params"]]
    if adam_groups:
        optimizers.append(torch.optim.AdamW(adam_groups, **adamw_kw))

    # coverage: each trainable parameter in exactly one group (Muon's counted before sharding)
    grouped = [
        p
        for opt in optimizers
        if not isinstance(opt, (torch.optim.Muon, BlockMuon))
        for g in opt.param_groups
        for p in g["params"]
    ] + muon_params
    ids = [id(p) for p in grouped]
    assert len(ids) == len(set(ids)), "a parameter is in two optimizer groups"
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(ids) == trainable, f"{len(trainable - set(ids))} trainable parameters have no optimizer"

    counts = {role: sum(p.numel() for _, p in params) for role, params in roles.items()}
    return Optimizers(optimizers, counts, shards, rank)


def optimizer_step(model: nn.Module, opt: Any, grad_clip: float) -> torch.Tensor:
    """What follows backward in a training step: the global gradient norm (the gradients clipped to
    `grad_clip` when it is above 0; 0 = off, the norm measured all the same), the optimizer step and
    zero_grad. Returns the norm before clipping, a tensor (no host sync)."""
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    opt.step()
    opt.zero_grad()
    return norm


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
