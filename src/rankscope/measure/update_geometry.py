"""The geometry of the update W_K receives: why the keys narrow under one Muon grouping and not another.

Muon replaces an update block G by (an approximation of) its polar factor U Vᵀ. When K is
orthogonalized alone, every direction of K's own gradient gets the same step. Stacked with other
matrices, the block [G_q; G_k; G_v; G_o] = [A; G_k] has polar factor M (MᵀM)^(-1/2), so K's rows
become G_k (A_ᵀA + G_kᵀG_k)^(-1/2): whitened by its partners' gradient covariance, not its own. A
direction of the residual stream that Q, V or O push hard on is damped for K too; K's update
concentrates on the directions its partners leave alone. Whether that narrows the keys is what
these rows let a study see, step by step, beside the keys' PR.

At an evaluation point the training loop snapshots each layer's attention weights before the
optimizer step that ends there (`UpdateGeometry.before_step`), and `measure` reads the update
ΔW = W_after - W_before, whatever the optimizer (Muon of any partition, AdamW), with weight decay
and QK-Clip included: the change W_K actually received. Rows (site `dw_k`, "W_K update"):

  per kv head h (ΔW_K's rows h·E .. (h+1)·E, an (E, d_model) slice, singular values s):
    pr_sv        (Σ s)² / Σ s², the keys' own measure applied to the update (E = every direction
                 the head can write moves by the same amount, as K's polar factor alone gives)
    stable_rank  Σ s² / s_max²
    rms_ratio    RMS(ΔW_K,h) / RMS(W_K,h): how far one step moves the head's key weights
  per layer (head = LAYER_WIDE):
    k_share      ‖ΔW_K‖² / ‖ΔW_Q, ΔW_K, ΔW_V, ΔW_O‖², K's share of the layer's attention update
                 (for Muon on separate blocks of equal shape this is fixed by the shapes: 1/4 at
                 the tiny preset; stacked, it follows the gradients)
    block_share  ‖ΔW_K‖² / ‖Δ(the matrices of K's Muon part)‖²: 1 when K is its own block; given
                 when the partition is known (a Muon run)

Nothing here changes the model or the optimizer; the snapshot is four weight copies per layer
taken only before evaluation steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..settings.vocab import LAYER_WIDE
from .metrics import singular_value_metrics

Row = dict[str, Any]
SITE = "dw_k"
HEAD_METRICS = ("pr_sv", "stable_rank", "rms_ratio")
LAYER_METRICS = ("k_share", "block_share")
_QKVO = "qkvo"


class UpdateGeometry:
    """Measures the update each layer's W_K receives in one optimizer step.

    `model` declares its attention matrices (`attention_matrices()`: per layer Q, K, V, O weights,
    K's rows grouped by kv head of `head_dim`); `k_part`: the letters of K's Muon part ("qkvo" for
    the seed's stack, "k" alone), or None when the optimizer has no such part (AdamW)."""

    def __init__(self, model: nn.Module, head_dim: int, k_part: str | None = None):
        self.model, self.head_dim, self.k_part = model, head_dim, k_part
        self._before: list[tuple[torch.Tensor, ...]] | None = None

    @torch.no_grad()
    def before_step(self) -> None:
        self._before = [tuple(w.detach().clone() for w in ws) for ws in self.model.attention_matrices()]

    @property
    def armed(self) -> bool:
        """True between `before_step` and `measure`."""
        return self._before is not None

    def discard(self) -> None:
        """Forget the snapshot without measuring (a diverged step has no geometry to measure)."""
        self._before = None

    @torch.no_grad()
    def measure(self) -> list[Row]:
        """The rows of the step since `before_step` (none if no snapshot was taken); clears it."""
        before, self._before = self._before, None
        if before is None:
            return []
        E = self.head_dim
        deltas, olds = [], []
        for ws, old in zip(self.model.attention_matrices(), before, strict=True):
            deltas.append([(w.detach() - o).double().cpu() for w, o in zip(ws, old)])
            olds.append(old[1].double().cpu())
        rows: list[Row] = []
        # every layer's K update cut into heads: (layers x kv heads, E, d_model), one batched SVD
        dk = torch.stack([d[1].view(-1, E, d[1].shape[1]) for d in deltas])  # (L, G, E, D)
        wk = torch.stack([w.view(-1, E, w.shape[1]) for w in olds])
        L, G = dk.shape[:2]
        s = torch.linalg.svdvals(dk.flatten(0, 1))  # (L·G, E), descending
        m = singular_value_metrics(s)
        rms = lambda x: x.square().mean(dim=(-2, -1)).sqrt()  # noqa: E731
        ratio = (rms(dk) / rms(wk)).flatten()
        per_head = torch.stack([m["pr_sv"], m["stable_rank"], ratio], -1).view(L, G, -1).tolist()
        for layer in range(L):
            for head in range(G):
                rows += [
                    dict(layer=layer, head=head, site=SITE, metric=k, value=v)
                    for k, v in zip(HEAD_METRICS, per_head[layer][head])
                ]
            energy = [float(d.square().sum()) for d in deltas[layer]]
            rows.append(dict(layer=layer, head=LAYER_WIDE, site=SITE, metric="k_share", value=_share(energy, _QKVO)))
            if self.k_part is not None:
                value = _share(energy, self.k_part)
                rows.append(dict(layer=layer, head=LAYER_WIDE, site=SITE, metric="block_share", value=value))
        return rows


def _share(energy: Sequence[float], part: str) -> float:
    """K's energy over the energy of `part`'s matrices (NaN when nothing moved)."""
    total = sum(energy[_QKVO.index(x)] for x in part)
    return energy[1] / total if total > 0 else float("nan")


def k_part(optim: Any) -> str | None:
    """The letters of K's Muon part for an `OptimConfig`, or None when Muon does not train K."""
    from ..settings.muon_qkvo import muon_partition

    if optim.name != "muon":
        return None
    parts, _ = muon_partition(optim.muon_qkvo, optim.muon_head_group)
    return next(p for p in parts if "k" in p)
