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

The search is a binary search on the ladder, so it assumes that once a rank is within `tol` every
larger one is too; on a non-monotone curve the rank found is one that is within `tol` while the rung
below it was measured not to be, which need not be the smallest such rung. Per (layer, head, site)
it costs at most ceil(log2(len(ladder))) projected passes (3 for head_dim 64) of blocks l.. and the
head, instead of one per rung. All heads and sites of a layer advance one search step together,
with one host sync per step. The model is not changed: hooks live only inside the call.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .evals import _no_autocast, layer_grams, rank_ladder
from .model import Tap

Row = dict[str, Any]
KV_SITES = ("k_pre", "k", "v")  # the taps whose heads are the cached kv heads
KV_METRICS = ("kv_rank", "kv_dloss", "kv_r90")
HEADROOM_TABLE = "kv_headroom.csv"  # written by `rankscope analyze` beside probes.csv


def r90_from_eigenvalues(ev: torch.Tensor) -> torch.Tensor:
    """Fewest directions holding 90% of Σ λ, per row of ev (..., E) (any order); 0 for all-zero
    rows. The same rule as `metrics.singular_value_metrics`'s r90 (λ = s²)."""
    ev = ev.clamp_min(0).sort(dim=-1, descending=True).values
    total = ev.sum(-1, keepdim=True)
    share = ev.cumsum(-1) / total.clamp_min(torch.finfo(ev.dtype).tiny)
    return torch.where(total[..., 0] > 0, (share < 0.9 - 1e-12).sum(-1) + 1.0, torch.zeros_like(total[..., 0]))


def _one_head_hook(g: int, p: torch.Tensor):
    """Replace head g of a tap's output (B, T, G, E) by its projection x P (P symmetric, float32,
    computed with autocast off and cast back); every other head passes through untouched."""

    def hook(module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
        with _no_autocast(out):
            new = out.clone()
            new[:, :, g] = (out[:, :, g].float() @ p).to(out.dtype)
            return new

    return hook


@torch.no_grad()
def kv_headroom(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sites: Sequence[str] = ("k_pre", "k"),
    tol: float = 0.01,
    ladder: Sequence[int] | None = None,
) -> list[Row]:
    """Per (layer, kv head, site) rank at tolerance of rankscope's GPT on the batch (x, y): rows
    kv_rank, kv_dloss and kv_r90 (module docstring). `sites` among 'k_pre', 'k', 'v'."""
    E = model.cfg.head_dim
    ladder = sorted(set(ladder if ladder is not None else rank_ladder(E)))
    if not ladder or ladder[0] < 1 or ladder[-1] > E:
        raise ValueError(f"ladder ranks must lie in [1, head_dim={E}], got {ladder}")
    if ladder[-1] != E:
        ladder.append(E)  # the identity: the search's upper end, within any tolerance
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    for s in sites:
        if s not in KV_SITES or not isinstance(getattr(model.blocks[0].attn, s, None), Tap):
            raise ValueError(f"unknown site {s!r}: expected one of {', '.join(KV_SITES)}")

    h = model.embed_tokens(x)  # (B, T, D): the residual stream at the input of layer 0
    l_full = model.head(model.forward_blocks(h), y).float().item()
    rows: list[Row] = []
    for layer, block in enumerate(model.blocks):
        taps = {s: getattr(block.attn, s) for s in sites}
        grams, h_next = layer_grams(model, h, layer, sites)  # the unprojected pass, reading the Grams
        eig = {s: torch.linalg.eigh(grams[s]) for s in sites}  # (G, E), (G, E, E); ascending
        G = grams[sites[0]].shape[0] if sites else 0
        # per (site, head): [lo, hi] indices into the ladder; hi is known within tol (the top: exactly)
        search = {(s, g): [0, len(ladder) - 1] for s in sites for g in range(G)}
        dloss = {key: 0.0 for key in search}
        while active := [key for key, (lo, hi) in search.items() if lo < hi]:
            losses = []
            for s, g in active:
                lo, hi = search[(s, g)]
                r = ladder[(lo + hi) // 2]
                v = eig[s].eigenvectors[g, :, E - r :]  # (E, r): the top r directions of head g
                hd = taps[s].register_forward_hook(_one_head_hook(g, (v @ v.mT).float()))
                try:
                    losses.append(model.head(model.forward_blocks(h, start=layer), y).float())
                finally:
                    hd.remove()
            for key, loss in zip(active, torch.stack(losses).tolist()):  # one host sync per step
                lo, hi = search[key]
                mid, d = (lo + hi) // 2, (loss - l_full) / l_full
                if d <= tol:
                    search[key], dloss[key] = [lo, mid], d
                else:
                    search[key] = [mid + 1, hi]
        for s in sites:
            r90 = r90_from_eigenvalues(eig[s].eigenvalues).tolist()
            for g in range(G):
                hi = search[(s, g)][1]
                d = dloss[(s, g)] if ladder[hi] < E else 0.0
                base = dict(layer=layer, head=g, site=s)
                rows += [
                    dict(base, metric="kv_rank", value=float(ladder[hi])),
                    dict(base, metric="kv_dloss", value=float(d)),
                    dict(base, metric="kv_r90", value=float(r90[g])),
                ]
        h = h_next
    return rows


def write_headroom(model: nn.Module, ids: torch.Tensor, out_dir: Path, base: Row, tol: float = 0.01) -> str:
    """`rankscope analyze` of a rankscope model: measure `kv_headroom` on the probe batch `ids` (B, T)
    (inputs ids[:, :-1], targets ids[:, 1:]; bf16 autocast on CUDA as the trainer's evaluation),
    write out_dir/kv_headroom.csv (the probe table's columns, `base` filling arm, seed, step,
    tokens) and return summary.md's "KV-cache headroom" section."""
    import pandas as pd

    from .report.kv_headroom import analyze_markdown, headroom_frame, headroom_table
    from .store import PROBE_COLUMNS, TableWriter

    ids = ids.to(next(model.parameters()).device)
    dev = ids.device
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        rows = kv_headroom(model, ids[:, :-1], ids[:, 1:], tol=tol)
    path = Path(out_dir) / HEADROOM_TABLE
    path.unlink(missing_ok=True)  # a rerun replaces the table
    writer = TableWriter(path, PROBE_COLUMNS)
    writer.append({**base, **r} for r in rows)
    writer.close()
    frame = headroom_frame(pd.DataFrame([{**base, "seed": 0, "tokens": 0, **r} for r in rows]))
    return analyze_markdown(headroom_table(frame, model.cfg.head_dim), tol)


__all__ = ["HEADROOM_TABLE", "KV_METRICS", "KV_SITES", "kv_headroom", "r90_from_eigenvalues", "write_headroom"]
