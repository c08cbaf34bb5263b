"""Functional rank: how many principal directions of each layer's keys (or queries) rankscope's GPT
needs before its loss stops changing.

The seed's second open question: "Is a PR of 51 better than 30, or is it ghost compute?" A
participation ratio counts the directions that hold variance; `functional_rank` counts the ones
that matter, by projecting each layer's activations onto their top-r principal directions and
measuring the loss. `layer_grams` and `all_layer_grams` read every head's Gram in one unprojected
pass (the KV headroom, `headroom.py`, reads its Grams the same way). Only the projected passes
replace activations, inside their own forward passes; Grams and projections are float32 or float64
regardless of autocast (`precision.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..core.model import Tap
from ..settings.vocab import LAYER_WIDE
from .metrics import eigh_batched
from .precision import exact_dtype, no_autocast

Row = dict[str, Any]


def rank_ladder(head_dim: int) -> list[int]:
    """Powers of two below head_dim, then head_dim itself: 1, 2, 4, ..., 32, 64 for 64."""
    ladder, r = [], 1
    while r < head_dim:
        ladder.append(r)
        r *= 2
    return ladder + [head_dim]


def _gram_hook(store: dict[str, torch.Tensor], site: str):
    def hook(module: nn.Module, inputs: Any, out: torch.Tensor) -> None:
        x = out.to(exact_dtype(out)).flatten(0, 1)  # (N, heads, E)
        with no_autocast(x):
            store[site] = torch.einsum("nhe,nhf->hef", x, x).double()  # every head's XᵀX at once

    return hook


def layer_grams(
    model: nn.Module, h: torch.Tensor, layer: int, sites: Sequence[str]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Run block `layer` unprojected on the residual stream `h`, reading every head's Gram at each
    of `sites` (its taps): ({site: (heads, E, E) float64}, the stream after the block)."""
    taps = {s: getattr(model.blocks[layer].attn, s) for s in sites}
    grams: dict[str, torch.Tensor] = {}
    handles = [tap.register_forward_hook(_gram_hook(grams, s)) for s, tap in taps.items()]
    try:
        h_next = model.forward_blocks(h, layer, layer + 1)
    finally:
        for hd in handles:
            hd.remove()
    return grams, h_next


def all_layer_grams(
    model: nn.Module, x: torch.Tensor, sites: Sequence[str]
) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """Every layer's `layer_grams` from one unprojected pass on token ids x: ([{site: (heads, E, E)}
    per layer], the stream after the last block). Taking them all before any is decomposed lets
    one batched eigh (`metrics.eigh_batched`) serve every layer: on a GPU one copy to the host."""
    h, grams = model.embed_tokens(x), []
    for layer in range(len(model.blocks)):
        g, h = layer_grams(model, h, layer, sites)
        grams.append(g)
    return grams, h


def _projection_hook(p: torch.Tensor):
    """A forward hook that replaces a tap's output (B, T, heads, E) by its projection x P_h per
    head (P symmetric), computed in P's dtype (`precision.exact_dtype`) and cast back, so that projecting onto
    every direction (P = I) reproduces the output to float32 round-off."""

    def hook(module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
        with no_autocast(out):
            return torch.einsum("bthe,hef->bthf", out.to(p.dtype), p).to(out.dtype)

    return hook


@torch.no_grad()
def functional_rank(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sites: Sequence[str] = ("k", "q"),
    ladder: Sequence[int] | None = None,
    tol: float = 0.01,
    *,
    eig_path: str = "auto",
) -> list[Row]:
    """Functional rank of each layer's keys (and queries) in rankscope's GPT.

    For layer l and site s (a tap of `blocks.<l>.attn`: 'k' = keys after QK-Norm and RoPE, 'q',
    or any other of q_pre, k_pre, v, o), each head's activations on the batch (x, y) are projected
    onto their top-r principal directions (eigenvectors of the uncentered Gram XᵀX, float64) and
    the loss on the same batch is measured, for r on `ladder` (default `rank_ladder(head_dim)`).
    Rows per layer and site, head -1:
      dloss_r{r}      (L_r - L_full) / L_full, the relative loss increase at rank r
      functional_rank the smallest r on the ladder from which dloss stays <= tol at every larger r
    The participation ratio says how many directions carry variance; this says how many the model
    needs: keys with PR 51 and functional rank 8 would be the seed's "ghost compute".

    Cost: one unprojected pass reads every layer's Grams, decomposed by one `metrics.eigh_batched`
    call (`eig_path`: on a GPU, one copy to the host and back rather than a cuSOLVER call per
    matrix); a second walks the layers, keeping the residual stream at the current layer's input,
    from which each (layer, site, r) re-runs only blocks l.. and the head, n_layer (n_layer + 1) / 2
    blocks per (site, r) in all. Every head of the layer is projected at once by one batched
    einsum. Memory stays at one residual stream plus the pass itself.
    """
    E = model.cfg.head_dim
    ladder = sorted(set(ladder if ladder is not None else rank_ladder(E)))
    if not ladder or ladder[0] < 1 or ladder[-1] > E:
        raise ValueError(f"ladder ranks must lie in [1, head_dim={E}], got {ladder}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    for s in sites:
        if not isinstance(getattr(model.blocks[0].attn, s, None), Tap):
            raise ValueError(f"unknown site {s!r}: expected a tap of blocks.<i>.attn (q_pre, q, k_pre, k, v, o)")

    grams, h_last = all_layer_grams(model, x, sites)  # the unprojected pass
    keys = [(layer, s) for layer in range(len(model.blocks)) for s in sites]
    eig = dict(zip(keys, eigh_batched([grams[layer][s] for layer, s in keys], path=eig_path)))
    del grams
    losses: dict[tuple[str, int, int], torch.Tensor] = {}
    h = model.embed_tokens(x)  # (B, T, D): the residual stream at the input of layer 0
    for layer, block in enumerate(model.blocks):
        for s in sites:
            vecs = eig[(layer, s)].eigenvectors  # (heads, E, E), eigenvalues ascending
            for r in ladder:
                v = vecs[..., E - r :]  # (heads, E, r): the top r directions
                hd = getattr(block.attn, s).register_forward_hook(_projection_hook((v @ v.mT).to(exact_dtype(v))))
                try:
                    losses[(s, layer, r)] = model.head(model.forward_blocks(h, start=layer), y).float()
                finally:
                    hd.remove()
        h = model.forward_blocks(h, layer, layer + 1)  # the same block the Gram pass ran, unhooked
    full = model.head(h_last, y).float()  # the unprojected loss

    keys = list(losses)
    values = torch.stack([full] + [losses[k] for k in keys]).tolist()  # one host sync
    l_full, by_key = values[0], dict(zip(keys, values[1:]))
    rows = []
    for s in sites:
        for layer in range(len(model.blocks)):
            d = {r: (by_key[(s, layer, r)] - l_full) / l_full for r in ladder}
            # the smallest r from which the loss STAYS within tol: on a noisy, non-monotone curve a
            # single lucky rung below a failing one does not count as enough dimensions
            fr = next((r for i, r in enumerate(ladder) if all(d[q] <= tol for q in ladder[i:])), E)
            rows.append(dict(layer=layer, head=LAYER_WIDE, site=s, metric="functional_rank", value=float(fr)))
            rows += [dict(layer=layer, head=LAYER_WIDE, site=s, metric=f"dloss_r{r}", value=d[r]) for r in ladder]
    return rows
