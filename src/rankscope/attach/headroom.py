"""KV-cache headroom of any model rankscope attaches to: `model_kv_headroom`, the rows of
`rankscope.measure.headroom.kv_headroom` (per layer, kv head and key site: the rank at tolerance,
its dloss and r90) for any model `rankscope.attach.detect` recognises with a `KeyCache` and a loss
(Hugging Face decoders, TransformerLens, rankscope's GPT), one whole forward pass per projected head.

The search, the rows and the hooks that replace one head's keys are `measure.headroom`'s; this
module finds where the cached and the scored keys of an attached model can be replaced (`kv_sites`),
checks that the stored keys are the keys the probe reads, and projects post-RoPE keys through the
model's own rotary function. The model is not changed: hooks live only inside the call, and its
modes and the random number generators are restored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import RankscopeError
from ..measure.headroom import (
    KV_SITES,
    check_ladder,
    headroom_rows,
    projector,
    r90_from_eigenvalues,
    rank_search,
    replace_head,
    top_projection,
)
from ..measure.metrics import eigh_batched
from ..measure.precision import no_autocast
from ..measure.sites import matching_modules

Row = dict[str, Any]


def kv_sites(att: Any) -> tuple[str, ...]:
    """The key sites whose headroom `model_kv_headroom` can measure for an `Attachment`: 'k_pre'
    wherever the cached keys can be replaced, and 'k' where the scored keys can be too (their own
    module output, or the stored keys through the model's own rotary function) or equal 'k_pre'
    (no RoPE); () without a key cache or a loss."""
    kc = att.key_cache
    if kc is None or att.loss is None:
        return ()
    return ("k_pre", "k") if (kc.scored is not None or kc.rotate is not None or att.rotary == "none") else ("k_pre",)


def _measured_site(att: Any, site: str) -> str:
    """The site whose keys are projected for `site`: without RoPE the scored keys are the stored
    ones, so 'k' is measured once, as 'k_pre'."""
    return "k_pre" if site == "k" and att.rotary == "none" else site


def _project_after_rope(rotate: Any, layer: int, p: torch.Tensor):
    """Replace stored keys k (before RoPE) by R^T P R k, R the layer's rotary at each position, so
    that once the layer applies R the scored keys are P R k: the post-RoPE keys, projected. R is
    linear and orthogonal, so R^T u is the gradient of <R k, u> in k, taken with autograd through the
    model's own rotary function: no rotary re-implementation, and partial rotaries come for free."""

    def fn(keys: torch.Tensor) -> torch.Tensor:  # (B, T, E)
        with torch.enable_grad():
            k0 = keys.detach().float().unsqueeze(2).requires_grad_(True)
            turned = rotate(k0, layer).float()  # (B, T, 1, E)
            (back,) = torch.autograd.grad(turned, k0, grad_outputs=(turned.detach().to(p.dtype) @ p).to(turned.dtype))
        return back.squeeze(2).to(keys.dtype)

    return fn


def _unprojected_pass(model: nn.Module, att: Any, sites: Sequence[str], x: torch.Tensor, y: torch.Tensor):
    """The model's loss on (x, y), with hooks reading each layer's Grams (G, E, E) in float64 at the
    sites and, on the first forward call, the k_pre keys and the stored keys, from which each
    layer's stored-key layout is found (and checked: the stored keys must be the k_pre keys)."""
    grams: dict[tuple[str, int], torch.Tensor] = {}
    first: dict[tuple[str, int], torch.Tensor] = {}

    def take(name: str, layer: int, site: Any):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if name == "k_store":
                if (name, layer) not in first:
                    raw = site.raw(args, {}, output)
                    first[(name, layer)] = (site.transform(raw, layer) if site.transform else raw).detach().clone()
                return
            a = site.capture(layer, args, {}, output)
            with no_autocast(a):
                f = a.double().flatten(0, 1)  # (N, G, E)
                g = torch.einsum("nhe,nhf->hef", f, f)
            grams[(name, layer)] = grams[(name, layer)] + g if (name, layer) in grams else g
            first.setdefault((name, layer), a.detach().clone())

        return hook

    readers = [(s, att.sites[s]) for s in dict.fromkeys(["k_pre", *sites])] + [("k_store", att.key_cache.store)]
    handles = []
    try:
        for name, site in readers:
            handles += [
                m.register_forward_hook(take(name, layer, site)) for layer, m in matching_modules(model, site.pattern)
            ]
        loss = float(att.loss(x, y).float().item())
    finally:
        for h in handles:
            h.remove()
    layouts = {}
    for layer in range(att.n_layer):
        ref, got = first[("k_pre", layer)], first[("k_store", layer)]
        candidates = [("BTHE", got)] + ([("BHTE", got.transpose(1, 2))] if got.ndim == 4 else [])
        match = [lay for lay, v in candidates if v.shape == ref.shape and torch.allclose(v, ref, rtol=1e-4, atol=1e-5)]
        if not match:
            raise RankscopeError(
                f"layer {layer}: the keys at {att.key_cache.store.pattern} are not the keys the probe reads "
                f"before RoPE; KV headroom cannot be measured for {att.family}"
            )
        layouts[layer] = match[0]
    return loss, grams, layouts


@torch.no_grad()
def model_kv_headroom(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sites: Sequence[str] | None = None,
    tol: float = 0.01,
    ladder: Sequence[int] | None = None,
    *,
    attachment: Any = None,
    progress: Any = None,
) -> list[Row]:
    """`kv_headroom`'s rows for any model with a key cache and a loss (`rankscope.attach.detect`):
    per (layer, kv head, site) the rank at tolerance, its dloss and r90, from whole forward passes.
    sites: among `kv_sites(attachment)` (default: all of them); without RoPE 'k' is 'k_pre',
    measured once. progress(done, total): after each projected pass. The model's modes and the
    random number generators are restored; its weights are never touched."""
    from . import detect

    att = attachment if attachment is not None else detect(model)
    possible = kv_sites(att)
    if not possible:
        raise RankscopeError(
            f"KV headroom needs a language-model head and keys rankscope can replace; {att.family} has not both"
        )
    sites = tuple(possible if sites is None else sites)
    for s in sites:
        if s not in possible:
            raise RankscopeError(f"KV headroom at {s!r} is not available for {att.family} (only {', '.join(possible)})")
    ladder = check_ladder(ladder, att.head_dim, tol)
    kc = att.key_cache
    measured = sorted({_measured_site(att, s) for s in sites}, key=KV_SITES.index)
    modes = {m: m.training for m in model.modules()}
    devices = [d for d in {p.device for p in model.parameters()} if d.type == "cuda"]
    handles = [h for c in att.contexts for h in c.attach()]
    try:
        with torch.random.fork_rng(devices=devices):
            model.eval()
            l_full, grams, layouts = _unprojected_pass(model, att, measured, x, y)
            eig = dict(zip(grams, eigh_batched(list(grams.values()))))  # on a GPU: one copy to the host
            modules = {
                (s, layer): m for s in measured for layer, m in matching_modules(model, _edit_site(kc, s).pattern)
            }

            def loss_at(key: tuple[str, int, int], r: int) -> torch.Tensor:
                s, layer, g = key
                p, site = top_projection(eig[(s, layer)], g, r), _edit_site(kc, s)
                if s == "k" and kc.scored is None:  # through the stored keys and the model's own rotary
                    hook = replace_head(site, layer, layouts[layer], g, _project_after_rope(kc.rotate, layer, p))
                else:
                    hook = replace_head(site, layer, layouts[layer] if site is kc.store else "BTHE", g, projector(p))
                hd = modules[(s, layer)].register_forward_hook(hook)
                try:
                    return att.loss(x, y)
                finally:
                    hd.remove()

            keys = [(s, layer, g) for s in measured for layer in range(att.n_layer) for g in range(att.n_kv_head)]
            found = rank_search(keys, ladder, tol, l_full, loss_at, progress)
    finally:
        for h in handles:
            h.remove()
        for m, was in modes.items():
            m.training = was
    rows: list[Row] = []
    for s in sites:
        src = _measured_site(att, s)
        for layer in range(att.n_layer):
            r90 = r90_from_eigenvalues(eig[(src, layer)].eigenvalues).tolist()
            rows += [
                r for g in range(att.n_kv_head) for r in headroom_rows(layer, g, s, found[(src, layer, g)], r90[g])
            ]
    return rows


def _edit_site(kc: Any, site: str) -> Any:
    """Where a projection of `site`'s keys is written: the scored keys' own output, else the store."""
    return kc.scored if site == "k" and kc.scored is not None else kc.store


def max_passes(att: Any, ladder_len: int) -> int:
    """The most projected passes `model_kv_headroom` can take for an attachment: every layer, kv
    head and measured key site, ceil(log2(rungs)) search steps each."""
    sites = len({_measured_site(att, s) for s in kv_sites(att)})
    return att.n_layer * att.n_kv_head * sites * math.ceil(math.log2(ladder_len))


__all__ = ["kv_sites", "max_passes", "model_kv_headroom"]
