"""Optimizers by parameter role, and learning-rate schedules as pure functions of progress.

`muon`:  Muon on the 2D hidden matrices, AdamW on embeddings and gains.
`adamw`: AdamW on everything.

Muon orthogonalizes each update matrix. Which matrix that is, for attention, is a setting
(`optim.muon_qkvo`, `optim.muon_head_group`), because it is a confound of the seed study:

  stacked   (qkvo) each layer's Q, K, V, O stacked by rows into one matrix, as the seed stores
            them, so K's update depends on Q's, V's and O's gradients; the learning-rate scale is
            the stack's;
  separate  (q+k+v+o) each of Q, K, V, O on its own (torch.optim.Muon as it is);
  qk+vo, k+qvo, ...  any partition of the four: the matrices of a part are stacked by rows;
  per_head  each head's slice of Q, K and V (its rows) and of O (its columns) on its own; in
            general `muon_head_group` = g cuts every part into groups of g heads, and a part's
            blocks stack the same head group of each of its matrices (O's columns transposed into
            rows, as Q's rows map the residual stream to the head). Stacking head groups is the
            idea of grouped Muon variants (modded-nanogpt orthogonalizes head pairs).

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

from ..settings.config import OptimConfig
from ..settings.muon_qkvo import muon_partition

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
              (0: rows, a head group of Q, K or V; 1: columns, a head group's share of O). With one
              parameter each slice is its own matrix; with several, block j stacks the j-th slice
              of every parameter by rows, a column slice transposed.

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
        Each piece (parameter, index, transposed) is a region of a parameter; a block's pieces take
        its rows in order (a transposed piece its region's columns)."""
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
            return [(torch.cat(updates, dim=0), [(p, everything, False) for p in group["params"]])]
        if group["layout"] == "heads":
            E, alone = group["head_dim"], len(group["params"]) == 1
            slices = []  # per parameter: its head groups as (rows of the block, piece)
            for p, u, dim in zip(group["params"], updates, group["split"]):
                cut = []
                for j, chunk in enumerate(u.split(E, dim=dim)):
                    cols = slice(j * E, (j + 1) * E)
                    if dim == 0:
                        cut.append((chunk, (p, (cols, slice(None)), False)))
                    elif alone:  # a head's share of O on its own keeps its shape (and lr scale)
                        cut.append((chunk, (p, (slice(None), cols), False)))
                    else:  # stacked beside row slices: transposed, (E, d_model) like them
                        cut.append((chunk.mT, (p, (slice(None), cols), True)))
                slices.append(cut)
            return [
                (torch.cat([m for m, _ in group_j], dim=0), [piece for _, piece in group_j])
                for group_j in zip(*slices, strict=True)
            ]
        return [(u, [(p, everything, False)]) for p, u in zip(group["params"], updates)]

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
                for p, (rows, cols), transposed in pieces:
                    target = p[rows, cols].mT if transposed else p[rows, cols]
                    update, scale = o[row : row + target.shape[0]].to(p.dtype), -lr * ratio
                    if abs(scale) <= torch.finfo(p.dtype).max:
                        target.add_(update, alpha=scale)
                    else:  # past float range (lr 1e308): inf weights, which the run's divergence check
                        target.add_(update.mul(scale))  # stops, rather than add_'s alpha failing to convert
                    row += target.shape[0]
        return loss


class Optimizers:
    """The run's optimizers as one: step, zero_grad, learning-rate scale, state for checkpoints.

    With several processes, Muon's orthogonalization is divided across ranks instead of repeated
    on each: every rank owns a share of the hidden matrices (balanced by size), keeps Muon state
    only for those, updates them, then all ranks gather every rank's updated matrices in one
    collective (modded-nanogpt's division of work, ZeRO-1's all-gather).
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
        if len({p.dtype for params in self.shards for p in params}) > 1:  # one flat buffer carries them all
            raise ValueError("sharded Muon needs its matrices in one dtype")
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
        """Every rank's updated matrices to every rank in one collective a step: each rank packs the
        matrices it owns into its slot of one flat buffer (slots padded to the largest share), the
        slots are all-gathered in place, and each rank copies the others' slots into its
        parameters (ZeRO-1's all-gather; one broadcast per owner would be world_size collectives).
        Bits are only moved, so the parameters equal one process's step exactly."""
        import torch.distributed as dist

        sizes = [[p.numel() for p in params] for params in self.shards]
        slot = max(sum(s) for s in sizes)
        ref = next(p for params in self.shards for p in params)
        flat = torch.empty(self.world_size * slot, dtype=ref.dtype, device=ref.device)
        mine = flat[self.rank * slot : (self.rank + 1) * slot]
        n = sum(sizes[self.rank])
        if n:
            torch.cat([p.reshape(-1) for p in self.shards[self.rank]], out=mine[:n])
        mine[n:].zero_()  # the padding travels too: send zeros, not stale memory
        # all_gather_single is all_gather_into_tensor's name from torch 2.13 on
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(flat, mine)
        for owner, params in enumerate(self.shards):
            if owner == self.rank or not params:
                continue
            chunks = flat[owner * slot : owner * slot + sum(sizes[owner])].split(sizes[owner])
            torch._foreach_copy_(params, [c.view_as(p) for p, c in zip(params, chunks)])

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


def muon_units(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Muon's param groups for the partition `cfg.muon_qkvo` at `cfg.muon_head_group` heads a
    block (`muon_qkvo.muon_partition`): one per part of each layer, and one 'each' group per remaining
    matrix (so every unit can be owned by one rank). A part comes where its first matrix comes in
    the model's order."""
    parts, heads = muon_partition(cfg.muon_qkvo, cfg.muon_head_group)
    layers = model.attention_matrices()
    where = {id(p): (layer, "qkvo"[i]) for layer, ws in enumerate(layers) for i, p in enumerate(ws)}
    units = []
    for _, p in model.param_roles()["matrix"]:
        if id(p) not in where:
            units.append(dict(params=[p], layout="each"))
            continue
        layer, letter = where[id(p)]
        part = next(x for x in parts if letter in x)
        if letter != part[0]:
            continue  # the part's unit came with its first matrix
        params = [layers[layer]["qkvo".index(x)] for x in part]
        if heads:  # Q, K, V cut by rows (head groups), O by columns
            E = heads * model.cfg.head_dim
            units.append(dict(params=params, layout="heads", split=[1 if x == "o" else 0 for x in part], head_dim=E))
        else:
            units.append(dict(params=params, layout="stack" if len(part) > 1 else "each"))
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
        units = muon_units(model, cfg)
        if world_size > 1:  # a unit (one stacked layer, one matrix) is owned whole by one rank
            owners = _balanced_owners([sum(p.numel() for p in u["params"]) for u in units], world_size)
            shards = [[p for u, o in zip(units, owners) if o == r for p in u["params"]] for r in range(world_size)]
            units = [u for u, o in zip(units, owners) if o == rank]
        if units and all(u["layout"] == "each" for u in units) and cfg.muon_ns == "newton_schulz":
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
