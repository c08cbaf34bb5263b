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
`model_kv_headroom` serves any model `rankscope.attach.detect` recognises with a `KeyCache` and a
loss (Hugging Face decoders, TransformerLens, rankscope's GPT), one whole forward pass per projected
head, and gives the same rows (a test holds the two to each other on rankscope's GPT).

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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.model import Tap
from ..errors import RankscopeError
from .evals import _exact, _no_autocast, all_layer_grams, rank_ladder
from .metrics import eigh_batched
from .probe import Site, _matching

TAP = Site("tap", "")  # a rankscope tap's output: the keys themselves, (B, T, G, E)

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


def _check_ladder(ladder: Sequence[int] | None, E: int, tol: float) -> list[int]:
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


def _search(
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


def _rows(layer: int, g: int, site: str, found: tuple[int, float], r90: float) -> list[Row]:
    base = dict(layer=layer, head=g, site=site)
    return [
        dict(base, metric="kv_rank", value=float(found[0])),
        dict(base, metric="kv_dloss", value=float(found[1])),
        dict(base, metric="kv_r90", value=float(r90)),
    ]


def _top(eig: Any, g: int, r: int) -> torch.Tensor:
    """The projection onto head g's top r eigenvectors (eigh's ascending order): float32, float64
    on CUDA, where a float32 matmul would run in TF32 (`evals._exact`)."""
    v = eig.eigenvectors[g, :, eig.eigenvectors.shape[-1] - r :]  # (E, r)
    return (v @ v.mT).to(_exact(v))


def _replace_head(site: Any, layer: int, layout: str, g: int, fn: Any):
    """A forward hook replacing kv head g of the keys in a module's output by fn(keys of head g)
    (B, T, E), with autocast off; the other heads pass through untouched. The keys are found in
    the output by `site`'s transform, which must give a view, then `layout` (BTHE or BHTE)."""

    def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
        out = output[0] if isinstance(output, (tuple, list)) else output
        with _no_autocast(out):
            new = out.clone()
            view = _key_view(site, new, layer, layout)
            view[:, :, g] = fn(view[:, :, g])
        if isinstance(output, (tuple, list)):
            return type(output)([new, *output[1:]])
        return new

    return hook


def _project(p: torch.Tensor):
    return lambda keys: (keys.to(p.dtype) @ p).to(keys.dtype)


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
    ladder = _check_ladder(ladder, E, tol)
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
            hd = tap.register_forward_hook(_replace_head(TAP, layer, "BTHE", g, _project(_top(eig[s], g, r))))
            try:
                return model.head(model.forward_blocks(h, start=layer), y)
            finally:
                hd.remove()

        found = _search([(s, g) for s in sites for g in range(G)], ladder, tol, l_full, loss_at)
        for s in sites:
            r90 = r90_from_eigenvalues(eig[s].eigenvalues).tolist()
            rows += [r for g in range(G) for r in _rows(layer, g, s, found[(s, g)], r90[g])]
        h = model.forward_blocks(h, layer, layer + 1)  # the same block the Gram pass ran, unhooked
    return rows


# --- any model the probe attaches to ------------------------------------------------------------------


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


def _key_view(site: Any, out: torch.Tensor, layer: int, layout: str) -> torch.Tensor:
    """(B, T, kv heads, E) keys inside the module output `out`: a view, so writing into it writes `out`."""
    v = site.transform(out, layer) if site.transform is not None else out
    v = v if layout == "BTHE" else v.transpose(1, 2)
    if v.untyped_storage().data_ptr() != out.untyped_storage().data_ptr():
        raise RankscopeError(f"the keys at {site.pattern} are not a view of the module's output; cannot replace them")
    return v


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
            with _no_autocast(a):
                f = a.double().flatten(0, 1)  # (N, G, E)
                g = torch.einsum("nhe,nhf->hef", f, f)
            grams[(name, layer)] = grams[(name, layer)] + g if (name, layer) in grams else g
            first.setdefault((name, layer), a.detach().clone())

        return hook

    readers = [(s, att.sites[s]) for s in dict.fromkeys(["k_pre", *sites])] + [("k_store", att.key_cache.store)]
    handles = []
    try:
        for name, site in readers:
            handles += [m.register_forward_hook(take(name, layer, site)) for layer, m in _matching(model, site.pattern)]
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
    from ..attach import detect

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
    ladder = _check_ladder(ladder, att.head_dim, tol)
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
            modules = {(s, layer): m for s in measured for layer, m in _matching(model, _edit_site(kc, s).pattern)}

            def loss_at(key: tuple[str, int, int], r: int) -> torch.Tensor:
                s, layer, g = key
                p, site = _top(eig[(s, layer)], g, r), _edit_site(kc, s)
                if s == "k" and kc.scored is None:  # through the stored keys and the model's own rotary
                    hook = _replace_head(site, layer, layouts[layer], g, _project_after_rope(kc.rotate, layer, p))
                else:
                    hook = _replace_head(site, layer, layouts[layer] if site is kc.store else "BTHE", g, _project(p))
                hd = modules[(s, layer)].register_forward_hook(hook)
                try:
                    return att.loss(x, y)
                finally:
                    hd.remove()

            keys = [(s, layer, g) for s in measured for layer in range(att.n_layer) for g in range(att.n_kv_head)]
            found = _search(keys, ladder, tol, l_full, loss_at, progress)
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
            rows += [r for g in range(att.n_kv_head) for r in _rows(layer, g, s, found[(src, layer, g)], r90[g])]
    return rows


def _edit_site(kc: Any, site: str) -> Any:
    """Where a projection of `site`'s keys is written: the scored keys' own output, else the store."""
    return kc.scored if site == "k" and kc.scored is not None else kc.store


def max_passes(att: Any, ladder_len: int) -> int:
    """The most projected passes `model_kv_headroom` can take for an attachment: every layer, kv
    head and measured key site, ceil(log2(rungs)) search steps each."""
    sites = len({_measured_site(att, s) for s in kv_sites(att)})
    return att.n_layer * att.n_kv_head * sites * math.ceil(math.log2(ladder_len))


AUTO_BUDGET_S = 300.0  # `rankscope analyze --kv-headroom auto` measures a foreign model when it fits this


def _timed_loss(att: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    """Seconds of one loss pass of the attached model (its device synchronised)."""
    import time

    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        sync()
        t0 = time.perf_counter()
        att.loss(x, y)
        sync()
    return time.perf_counter() - t0


def write_headroom(
    model: nn.Module,
    ids: torch.Tensor,
    out_dir: Path,
    base: Row,
    tol: float = 0.01,
    *,
    progress: bool = False,
    mode: str = "on",
) -> tuple[str, Path | None]:
    """`rankscope analyze`: measure the KV headroom of `model` on the probe batch `ids` (B, T)
    (inputs ids[:, :-1], targets ids[:, 1:]; bf16 autocast on CUDA as the trainer's evaluation):
    `kv_headroom` for rankscope's GPT, `model_kv_headroom` for any other model with a key cache and
    a loss (with a progress bar on stderr when `progress`). Writes out_dir/kv_headroom.csv (the
    probe table's columns, `base` filling arm, seed, step, tokens) and out_dir/kv_headroom.png, and
    returns summary.md's "KV-cache headroom" section and the figure's path; for a model whose keys
    cannot be replaced, a section saying so and None. mode "auto": a model other than rankscope's
    is measured only when one loss pass, timed here, times `max_passes` fits in AUTO_BUDGET_S; else
    the section says how long it would take and how to ask for it."""
    import sys

    import pandas as pd
    from tqdm.auto import tqdm

    from ..attach import detect
    from ..core.model import GPT
    from ..report.kv_headroom import PLOT, analyze_markdown, headroom_frame, headroom_table, plot_kv_headroom
    from ..report.plotstyle import arm_colors
    from ..storage.store import PROBE_COLUMNS, TableWriter

    att = detect(model)
    if not isinstance(model, GPT) and not kv_sites(att):
        why = "it has no language-model head" if att.loss is None else "rankscope cannot replace its cached keys"
        return f"\n## KV-cache headroom\n\nNot measured for this {att.family} model: {why}.\n", None
    ids = ids.to(next(model.parameters()).device)
    x, y, dev = ids[:, :-1], ids[:, 1:], ids.device
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        if mode == "auto" and not isinstance(model, GPT):
            passes = max_passes(att, len(rank_ladder(att.head_dim)))
            estimate = passes * _timed_loss(att, x, y)
            if estimate > AUTO_BUDGET_S:
                from ..run.progress import fmt_duration

                return (
                    f"\n## KV-cache headroom\n\nNot measured: on this device it would take about "
                    f"{fmt_duration(estimate)} (up to {passes} forward "
                    f"passes); `--kv-headroom on` measures it.\n",
                    None,
                )
        if isinstance(model, GPT):
            rows = kv_headroom(model, x, y, tol=tol)
        else:
            with tqdm(desc="KV headroom", unit="pass", file=sys.stderr, disable=not progress, leave=False) as bar:

                def tick(done: int, total: int) -> None:
                    bar.total = total
                    bar.update(done - bar.n)

                rows = model_kv_headroom(model, x, y, tol=tol, attachment=att, progress=tick)
    out_dir = Path(out_dir)
    path = out_dir / HEADROOM_TABLE
    path.unlink(missing_ok=True)  # a rerun replaces the table
    writer = TableWriter(path, PROBE_COLUMNS)
    writer.append({**base, **r} for r in rows)
    writer.close()
    arm = str(base["arm"])
    frame = headroom_frame(pd.DataFrame([{**base, "arm": arm, "seed": 0, "tokens": 0, **r} for r in rows]))
    plot = plot_kv_headroom(frame, [arm], arm_colors([arm]), out_dir / PLOT, head_dim=att.head_dim, tol=tol)
    section = analyze_markdown(headroom_table(frame, att.head_dim), tol)
    if plot is not None:
        section += f"\n{plot.caption} ({PLOT})\n"
    return section, plot.path if plot is not None else None


__all__ = [
    "HEADROOM_TABLE",
    "KV_METRICS",
    "KV_SITES",
    "kv_headroom",
    "kv_sites",
    "model_kv_headroom",
    "r90_from_eigenvalues",
    "write_headroom",
]
