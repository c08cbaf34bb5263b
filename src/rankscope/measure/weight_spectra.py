"""Weight spectra: the singular values of each head's slice of W_Q and W_K.

Where the keys' geometry comes from: Muon orthogonalizes each update of these matrices (pushing
toward flat spectra) while QK-Norm makes the logits invariant to their scale; the weight spectra
show which pressure wins. Rows are tidy `{layer, head, site, metric, value}` in the store's format;
the weights are only read.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .metrics import metrics_from_gram, singular_value_metrics, to_host
from .precision import no_autocast
from .sites import matching_modules

Row = dict[str, Any]

WEIGHT_METRICS = ("pr_sv", "stable_rank", "spectral_norm")


@torch.no_grad()
def weight_spectra(
    model: nn.Module,
    q: str = "blocks.*.attn.q_proj",
    k: str = "blocks.*.attn.k_proj",
    head_dim: int | None = None,
    *,
    path: str = "auto",
) -> list[Row]:
    """Singular-value statistics of each head's slice of W_Q and W_K.

    Head h's slice is rows h*E:(h+1)*E of the projection's weight (E, d_model): the map from the
    residual stream to that head's queries (keys; one per KV head). Its singular values s
    (batched `torch.linalg.svdvals`, float64, all heads of a layer at once) give, through
    `metrics.singular_value_metrics`,
      pr_sv         (Σ s)² / Σ s²   the seed's participation ratio, applied to the weights
      stable_rank   Σ s² / s_max²
      spectral_norm s_max
    Rows {layer, head, site: 'w_q' | 'w_k', metric, value}. Muon orthogonalizes each update of
    these matrices (pushing toward flat spectra) while QK-Norm makes the logits invariant to
    their scale: the weight spectra show which pressure wins. Patterns are module paths (fnmatch)
    of linear layers, so other models with the same layout work too; head_dim defaults to
    `model.cfg.head_dim`.

    path: 'device' takes `svdvals` of the slices where they live, the default on the CPU (and the
    only way the numbers were computed before). 'host', the default elsewhere: on CUDA `svdvals`
    of a 64 x 512 matrix is one cuSOLVER call and wait per matrix (264 at seed-88m), so each
    slice's Gram W Wᵀ (E x E, float64) is formed on the device, all go to the host in one copy,
    and s = sqrt(eigenvalues) there (`metrics.metrics_from_gram`, floored at the round-off level as
    the probe's are): equal to `svdvals` to about E eps of s_max.
    """
    E = head_dim if head_dim is not None else model.cfg.head_dim
    per_layer: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for site, pattern in (("w_q", q), ("w_k", k)):
        for layer, mod in matching_modules(model, pattern):
            w = mod.weight.detach()
            if w.shape[0] % E:
                raise ValueError(f"{pattern}: {w.shape[0]} output rows is not a multiple of head_dim {E}")
            per_layer.setdefault(layer, []).append((site, w.view(-1, E, w.shape[1])))  # (heads, E, D)
    index, stats = [], []
    weights = [w for layer in sorted(per_layer) for _, w in per_layer[layer]]
    if not weights:
        return []
    where = path if path != "auto" else ("device" if weights[0].device.type == "cpu" else "host")
    if where not in ("device", "host"):
        raise ValueError(f"path must be auto, device or host, got {path!r}")
    for layer in sorted(per_layer):
        mats = per_layer[layer]
        index += [(layer, site, head) for site, w in mats for head in range(w.shape[0])]
        if where == "device":
            s = torch.linalg.svdvals(torch.cat([w for _, w in mats]).double())  # (heads, min(E, D)), descending
            m = singular_value_metrics(s)
            stats.append(torch.stack([m["pr_sv"], m["stable_rank"], s[:, 0]], -1))
    if where == "host":
        w = torch.cat(weights).to(torch.float64)  # (all heads, E, D)
        with no_autocast(w):
            (g,) = to_host(w @ w.mT)  # every slice's Gram, in one copy to the host
        m = metrics_from_gram(g)
        # s_max² = λ_max = Σ s² / stable_rank, and Σ s² = trace(W Wᵀ)
        sr = m["stable_rank"]
        spectral = torch.where(sr > 0, g.diagonal(dim1=-2, dim2=-1).sum(-1) / sr.clamp_min(1e-300), 0.0).sqrt()
        stats.append(torch.stack([m["pr_sv"], sr, spectral], -1))
    table = torch.cat(stats).cpu().tolist()  # one host sync
    return [
        dict(layer=layer, head=head, site=site, metric=m, value=v)
        for (layer, site, head), vals in zip(index, table)
        for m, v in zip(WEIGHT_METRICS, vals)
    ]
