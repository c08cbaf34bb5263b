"""KV-cache headroom: how many key dimensions each key/value head needs, measured.

The KV-cache compression literature guesses how many key dimensions a head can drop: Loki keeps
the directions holding 90% of the keys' variance, Palu stores a low-rank projection of the keys,
ThinK prunes key channels. `kv_headroom` measures it instead: for each layer and each kv head, the
keys of that head alone (the other heads untouched) are projected onto their top-r principal
directions, and the loss on the probe batch is compared with the unprojected loss. The smallest r
on the rank ladder (1, 2, 4, ..., head_dim) whose relative loss increase stays within `tol` is that
head's rank at tolerance. Measured at site

- 'k_pre': keys after QK-Norm, before RoPE, where a low-rank key cache is stored (Palu, Loki and
  ThinK project pre-RoPE keys and re-apply RoPE after reconstruction), and
- 'k': keys after RoPE, which rotates each pair of coordinates with the position, so a subspace of
  the pre-RoPE keys is smeared over more dimensions: the rank a post-RoPE cache would need.

Next to it the r90 heuristic of the same head on the same batch (fewest directions holding 90% of
the keys' energy, the uncentered Σ s², as the probe's `r90`), so a report can say where the
heuristic keeps too many or too few dimensions. Rows `{layer, head, site, metric, value}`, one per
layer, kv head and site:

  kv_rank   the smallest ladder rank r with dloss(r) <= tol (head_dim when none below it is)
  kv_dloss  (L_r - L_full) / L_full at that rank (0 at head_dim: the projection is the identity)
  kv_r90    the r90 of the head's keys on the batch

`kv_headroom` serves rankscope's GPT, restarting each projected pass at the layer it projects;
`rankscope.attach.headroom.model_kv_headroom` serves any model `rankscope.attach.detect` recognises
with a `KeyCache` and a loss (Hugging Face decoders, TransformerLens, rankscope's GPT), one whole
forward pass per projected head, with the search, rows and hooks defined here, and gives the same
rows (a test holds the two to each other on rankscope's GPT). `rankscope analyze` writes them to a
table and a figure (`rankscope.analyze.headroom`).

The search is a binary search on the ladder, so it assumes that once a rank is within `tol` every
larger one is too; on a non-monotone curve the rank found is one that is within `tol` while the rung
below it was measured not to be, which need not be the smallest such rung. Per (layer, head, site)
it costs at most ceil(log2(len(ladder))) projected passes (3 for head_dim 64) of blocks l.. and the
head, instead of one per rung. All heads and sites of a layer advance one search step together,
with one host sync per step. The model is not changed: hooks live only inside the call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..core.model import Tap
from ..errors import RankscopeError
from .functional_rank import all_layer_grams, rank_ladder
from .metrics import eigh_batched
from .precision import exact_dtype, no_autocast
from .sites import Site

TAP = Site("tap", "")  # a rankscope tap's output: the keys themselves, (B, T, G, E)

Row = dict[str, Any]
KV_SITES = ("k_pre", "k", "v")  # the taps whose heads are the cached kv heads
KV_METRICS = ("kv_rank", "kv_dloss", "kv_r90")


def r90_from_eigenvalues(ev: torch.Tensor) -> torch.Tensor:
    """Fewest directions holding 90% of Σ λ, per row of ev (..., E) (any order); 0 for all-zero
    rows. The same rule as `metrics.singular_value_metrics`'s r90 (λ = s²)."""
    ev = ev.clamp_min(0).sort(dim=-1, descending=True).values
    total = ev.sum(-1, keepdim=True)
    share = ev.cumsum(-1) / total.clamp_min(torch.finfo(ev.dtype).tiny)
    return torch.where(total[..., 0] > 0, (share < 0.9 - 1e-12).sum(-1) + 1.0, torch.zeros_like(total[..., 0]))


def check_ladder(ladder: Sequence[int] | None, E: int, tol: float) -> list[int]:
    """The sorted ladder (default `rank_ladder(E)`), with head_dim E on top: the search's upper end,
    the identity, within any tolerance. ValueError for ranks outside [1, E] or a negative tol."""
    ladder = sorted(set(ladder if ladder is not None else rank_ladder(E)))
    if not ladder or ladder[0] < 1 or ladder[-1] > E:
        raise ValueError(f"ladder ranks must lie in [1, head_dim={E}], got {ladder}")
    if ladder[-1] != E:
        ladder.append(E)
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    return ladder


def rank_search(
    keys: Sequence[Any],
    ladder: Sequence[int],
    tol: float,
    l_full: float,
    loss_at: Any,
    progress: Any = None,
) -> dict[Any, tuple[int, float]]:
    """The binary search on the ladder for every key at once: loss_at(key, r) is the loss (a 0-dim
    tensor) with that key's keys projected to rank r; all keys advance one step together, with one
    host sync per step. Returns key -> (rank, dloss at that rank; 0 at the top rung, the identity).
    progress(done, total) after each projected pass (total: the most the search can take)."""
    search = {key: [0, len(ladder) - 1] for key in keys}  # [lo, hi]: hi is known within tol
    dloss = {key: 0.0 for key in search}
    total, done = len(search) * math.ceil(math.log2(len(ladder))), 0
    while active := [key for key, (lo, hi) in search.items() if lo < hi]:
        losses = []
        for key in active:
            lo, hi = search[key]
            losses.append(loss_at(key, ladder[(lo + hi) // 2]).float())
            done += 1
            if progress is not None:
                progress(done, total)
        for key, loss in zip(active, torch.stack(losses).tolist()):
            lo, hi = search[key]
            mid, d = (lo + hi) // 2, (loss - l_full) / l_full
            if d <= tol:
                search[key], dloss[key] = [lo, mid], d
            else:
                search[key] = [mid + 1, hi]
    return {key: (ladder[hi], dloss[key] if hi < len(ladder) - 1 else 0.0) for key, (_, hi) in search.items()}


def headroom_rows(layer: int, g: int, site: str, found: tuple[int, float], r90: float) -> list[Row]:
    """The kv_rank, kv_dloss and kv_r90 rows of kv head g of `layer` at `site`, from the search's
    (rank, dloss) and the head's r90."""
    base = dict(layer=layer, head=g, site=site)
    return [
        dict(base, metric="kv_rank", value=float(found[0])),
        dict(base, metric="kv_dloss", value=float(found[1])),
        dict(base, metric="kv_r90", value=float(r90)),
    ]


def top_projection(eig: Any, g: int, r: int) -> torch.Tensor:
    """The projection onto head g's top r eigenvectors (eigh's ascending order): float32, float64
    on CUDA, where a float32 matmul would run in TF32 (`precision.exact_dtype`)."""
    v = eig.eigenvectors[g, :, eig.eigenvectors.shape[-1] - r :]  # (E, r)
    return (v @ v.mT).to(exact_dtype(v))


def replace_head(site: Any, layer: int, layout: str, g: int, fn: Any):
    """A forward hook replacing kv head g of the keys in a module's output by fn(keys of head g)
    (B, T, E), with autocast off; the other heads pass through untouched. The keys are found in
    the output by `site`'s transform, which must give a view, then `layout` (BTHE or BHTE)."""

    def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
        out = output[0] if isinstance(output, (tuple, list)) else output
        with no_autocast(out):
            new = out.clone()
            view = _key_view(site, new, layer, layout)
            view[:, :, g] = fn(view[:, :, g])
        if isinstance(output, (tuple, list)):
            return type(output)([new, *output[1:]])
        return new

    return hook


def projector(p: torch.Tensor):
    """keys (..., E) -> keys @ p, computed in p's dtype and cast back: the projection `top_projection` gives."""
    return lambda keys: (keys.to(p.dtype) @ p).to(keys.dtype)


def _key_view(site: Any, out: torch.Tensor, layer: int, layout: str) -> torch.Tensor:
    """(B, T, kv heads, E) keys inside the module output `out`: a view, so writing into it writes `out`."""
    v = site.transform(out, layer) if site.transform is not None else out
    v = v if layout == "BTHE" else v.transpose(1, 2)
    if v.untyped_storage().data_ptr() != out.untyped_storage().data_ptr():
        raise RankscopeError(f"the keys at {site.pattern} are not a view of the module's output; cannot replace them")
    return v


@torch.no_grad()
def kv_headroom(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sites: Sequence[str] = ("k_pre", "k"),
    tol: float = 0.01,
    ladder: Sequence[int] | None = None,
    *,
    eig_path: str = "auto",
) -> list[Row]:
    """Per (layer, kv head, site) rank at tolerance of rankscope's GPT on the batch (x, y): rows
    kv_rank, kv_dloss and kv_r90 (module docstring). `sites` among 'k_pre', 'k', 'v'. Every
    layer's Grams come from one unprojected pass and one batched eigh (`metrics.eigh_batched`,
    `eig_path`: on a GPU one copy to the host and back, not a cuSOLVER call per matrix)."""
    E = model.cfg.head_dim
    ladder = check_ladder(ladder, E, tol)
    for s in sites:
        if s not in KV_SITES or not isinstance(getattr(model.blocks[0].attn, s, None), Tap):
            raise ValueError(f"unknown site {s!r}: expected one of {', '.join(KV_SITES)}")

    grams, h_last = all_layer_grams(model, x, sites)  # the unprojected pass, reading the Grams
    l_full = model.head(h_last, y).float().item()
    keys = [(layer, s) for layer in range(len(model.blocks)) for s in sites]
    eigs = dict(zip(keys, eigh_batched([grams[layer][s] for layer, s in keys], path=eig_path)))
    G = grams[0][sites[0]].shape[0] if sites else 0
    del grams
    h = model.embed_tokens(x)  # (B, T, D): the residual stream at the input of layer 0
    rows: list[Row] = []
    for layer in range(len(model.blocks)):
        eig = {s: eigs[(layer, s)] for s in sites}  # (G, E), (G, E, E); ascending

        def loss_at(key: tuple[str, int], r: int, layer: int = layer, eig: Any = eig, h: Any = h) -> torch.Tensor:
            s, g = key
            tap = getattr(model.blocks[layer].attn, s)
            hd = tap.register_forward_hook(replace_head(TAP, layer, "BTHE", g, projector(top_projection(eig[s], g, r))))
            try:
                return model.head(model.forward_blocks(h, start=layer), y)
            finally:
                hd.remove()

        found = rank_search([(s, g) for s in sites for g in range(G)], ladder, tol, l_full, loss_at)
        for s in sites:
            r90 = r90_from_eigenvalues(eig[s].eigenvalues).tolist()
            rows += [r for g in range(G) for r in headroom_rows(layer, g, s, found[(s, g)], r90[g])]
        h = model.forward_blocks(h, layer, layer + 1)  # the same block the Gram pass ran, unhooked
    return rows


__all__ = [
    "KV_METRICS",
    "KV_SITES",
    "check_ladder",
    "headroom_rows",
    "kv_headroom",
    "projector",
    "r90_from_eigenvalues",
    "rank_search",
    "replace_head",
    "top_projection",
]
