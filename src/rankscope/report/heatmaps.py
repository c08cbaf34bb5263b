"""Heatmaps: every arm's mean key PR per layer over training (layers x tokens, the arms side by
side on one colour scale), and the layer x head key PR of one model that `rankscope analyze`
draws. The shared house style is in `plotstyle.py`.

The colour scale of the per-layer heatmaps is set by the eval points after token 0: the untrained
model's column is far from everything after it (its keys are random), and letting it set the scale
would leave the trained columns, which the figure is about, a sliver of the colour map. That column
is still drawn, clipped to the end of the scale (the colour bar's arrow), and the captions say so.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .format import seeds_text
from .plotstyle import MAX_WIDTH_IN, Plot, new_figure, save
from .token_axis import log_axis_clause, tokens_axis


def wrap_phrases(text: str, width: int) -> str:
    """`text` in lines of at most `width` characters, broken between phrases (after ", ", "; " or
    ": ", and before " (") rather than inside one; a phrase longer than a line is wrapped by words."""
    phrases = [p for p in re.split(r"(?<=[,;:]) |(?= \()", text) if p]
    lines: list[str] = []
    for phrase in phrases:
        if lines and len(lines[-1]) + len(phrase) + 1 <= width:
            lines[-1] = f"{lines[-1]} {phrase.strip()}"
        else:
            lines += textwrap.wrap(phrase.strip(), width) or [""]
    return "\n".join(lines)


def _edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges halfway between eval points, so uneven eval spacing is drawn to scale."""
    if len(centres) == 1:
        half = max(abs(centres[0]) * 0.05, 0.5)
        return np.array([centres[0] - half, centres[0] + half])
    mids = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[centres[0] - (mids[0] - centres[0])], mids, [centres[-1] + (centres[-1] - mids[-1])]])


def _edges_on(ax, centres: np.ndarray) -> np.ndarray:
    """`_edges` computed in the axis' own (possibly log) coordinates, so on a log axis each eval
    point's cell is centred on it as drawn, not stretched to the right."""
    tr = ax.xaxis.get_transform()
    return tr.inverted().transform(_edges(tr.transform(centres.astype(float))))


def colour_limits(grid: pd.DataFrame) -> tuple[float, float, bool]:
    """(vmin, vmax, step0_excluded): one colour scale for every arm's heatmap of `grid` (arm, layer,
    tokens, value), set by the eval points after token 0 when there are any (see the module
    docstring); step0_excluded says whether token 0 was left out. A constant grid gets a unit span."""
    values = grid["value"].to_numpy(float)
    trained = grid["tokens"].to_numpy(float) > 0
    excluded = bool(trained.any() and (~trained).any())
    v = values[trained] if trained.any() else values
    v = v[np.isfinite(v)]
    if not len(v):
        return 0.0, 1.0, excluded
    vmin, vmax = float(v.min()), float(v.max())
    if not vmax > vmin:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    return vmin, vmax, excluded


def _extend(values: np.ndarray, vmin: float, vmax: float) -> str:
    """The colour bar's arrows: which ends some drawn value runs past."""
    v = values[np.isfinite(values)]
    low, high = bool((v < vmin).any()), bool((v > vmax).any())
    return "both" if low and high else "min" if low else "max" if high else "neither"


def _fmt_level(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 10 else f"{x:.3g}"


def plot_pr_heatmaps(
    grid: pd.DataFrame,
    arms: Sequence[str],
    path: Path,
    *,
    quantity: str = "mean key PR",
    n_seeds: dict[str, int] | None = None,
    unit: str = "dimensions",
) -> Plot | None:
    """Every arm's layers (rows, layer 0 on top) x eval points (columns) coloured by `quantity`, the
    arms side by side (two columns for four arms, else up to three) on shared axes and one colour
    scale (`colour_limits`: set without token 0, whose column is drawn clipped).

    `grid`: (arm, layer, tokens, value) with value already averaged over heads and seeds.
    """
    arms = [a for a in arms if (grid["arm"] == a).any()] if len(grid) else []
    if not arms:
        return None
    n_seeds = n_seeds or {}
    vmin, vmax, excluded = colour_limits(grid[grid["arm"].isin(arms)])
    layers_all = np.sort(grid["layer"].unique())
    ncols = 2 if len(arms) == 4 else min(len(arms), 3)
    nrows = int(np.ceil(len(arms) / ncols))
    panel_h = max(1.9, 0.17 * len(layers_all) + 1.0)
    fig = new_figure(min(MAX_WIDTH_IN, 4.6 * ncols + 1.2), panel_h * nrows + 0.7)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)).ravel()
    all_tokens = np.sort(grid["tokens"].unique().astype(float))
    log = False
    mesh = None
    for ax, a in zip(axes, arms):
        m = grid[grid["arm"] == a].pivot_table(index="layer", columns="tokens", values="value", aggfunc="mean")
        m = m.reindex(index=layers_all, columns=all_tokens)  # every panel on the same cells
        tokens = m.columns.to_numpy(dtype=float)
        log = tokens_axis(ax, all_tokens)
        xe = _edges_on(ax, tokens)
        if log and (tokens <= 0).any():
            xe[0] = max(xe[0], 0.0)  # nothing happens before token 0
        mesh = ax.pcolormesh(
            xe,
            _edges(layers_all.astype(float)),
            np.ma.masked_invalid(m.to_numpy(float)),
            cmap="viridis",
            vmin=vmin,
            vmax=vmax,
            shading="flat",
        )
        ax.set_xlim(xe[0], xe[-1])
        n = n_seeds.get(a, 1)
        ax.set_title(f"{a}" + (f" ({seeds_text(n)})" if n > 1 else " (one seed)"), fontsize=10)
    axes[0].invert_yaxis()  # layer 0 (the input side) on top, as the network is usually drawn (axes share y)
    axes[0].yaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(len(layers_all), 12)))
    for i, ax in enumerate(axes[: len(arms)]):
        if i % ncols == 0:
            ax.set_ylabel("layer")
        if i < len(arms) - ncols:  # a panel with another below it: the x labels are read off the lowest
            ax.set_xlabel("")
            ax.tick_params(labelbottom=False)
    for ax in axes[len(arms) :]:
        ax.set_visible(False)
    values = grid.loc[grid["arm"].isin(arms), "value"].to_numpy(float)
    cb = fig.colorbar(mesh, ax=list(axes[: len(arms)]), pad=0.01, aspect=30, extend=_extend(values, vmin, vmax))
    cb.set_label(quantity + (f" ({unit})" if unit else "") + ("\nscale set without token 0" if excluded else ""))
    fig.suptitle(f"{quantity} per layer over training (mean over heads, then seeds)", fontsize=11)
    save(fig, path)
    clipped = excluded and _extend(grid.loc[grid["tokens"] <= 0, "value"].to_numpy(float), vmin, vmax) != "neither"
    seeds = {n_seeds.get(a, 1) for a in arms}
    if max(seeds) == 1:
        over = ", one seed"
    else:
        over = f" and {seeds_text(max(seeds))}" if len(seeds) == 1 else " and each arm's seeds"
    scale = f"colour scale {_fmt_level(vmin)}–{_fmt_level(vmax)} shared by all arms"
    if excluded:
        scale += ", set by the eval points after token 0"
        if clipped:
            scale += ": the untrained model's column (token 0) lies outside it and is drawn in the scale's end colour"
    caption = (
        f"{quantity[0].upper() + quantity[1:]} of each layer (rows, layer 0 on top; mean over heads{over}) at each "
        f"eval point (columns), one panel per arm on shared axes; {scale}"
        + log_axis_clause(log, bool((all_tokens <= 0).any()))
        + "."
    )
    return Plot(path, caption)


def plot_head_heatmap(
    grid: pd.DataFrame, path: Path, *, title: str, subtitle: str, head_dim: int, grouped: bool = False
) -> Path:
    """Heatmap of key PR per layer (rows, layer 0 on top) and key head (columns), on the absolute
    scale 1..head_dim so that collapse reads the same in every model; beside it each layer's mean."""
    L, H = grid.shape
    values = grid.to_numpy(float)
    cell_w, cell_h = (0.55 if H <= 16 else 0.3), (0.32 if L <= 24 else 0.2)
    width = max(6.0, 2.2 + H * cell_w + 2.0)
    height = max(3.4, 1.5 + L * cell_h)
    fig = Figure(figsize=(width, height), layout="constrained")  # analyze's own figure, not the report's
    ax, bar_ax = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [max(H, 2.5), max(1.6, H * 0.35)]})
    cmap = "viridis"
    mesh = ax.imshow(
        np.ma.masked_invalid(values), cmap=cmap, vmin=1.0, vmax=float(head_dim), aspect="auto", interpolation="nearest"
    )
    ax.set_xticks(range(H), [str(h) for h in grid.columns])
    ax.set_yticks(range(L), [str(i) for i in grid.index])
    if L > 32:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=24))
    ax.set_xlabel("key/value head" if grouped else "head")
    ax.set_ylabel("layer")
    if L * H <= 400:  # values in the cells while they stay legible
        size = 8 if H <= 12 else 6.5
        norm = mesh.norm
        for i in range(L):
            for j in range(H):
                v = values[i, j]
                if np.isfinite(v):
                    light = mesh.cmap(norm(v))[:3]
                    dark_text = 0.299 * light[0] + 0.587 * light[1] + 0.114 * light[2] > 0.5
                    ax.text(
                        j,
                        i,
                        f"{v:.1f}",
                        ha="center",
                        va="center",
                        fontsize=size,
                        color="black" if dark_text else "white",
                    )

    means = np.nanmean(values, axis=1)
    colors = mesh.cmap(mesh.norm(means))
    bar_ax.barh(range(L), means, color=colors, edgecolor="0.3", linewidth=0.5)
    bar_ax.axvline(float(np.nanmean(values)), color="0.35", linestyle="--", linewidth=1)
    bar_ax.set_xlim(0, head_dim)
    bar_ax.set_xlabel("layer mean\n(dashed: all heads)")
    bar_ax.tick_params(axis="y", left=False)
    for i, m in enumerate(means):
        if np.isfinite(m):
            bar_ax.text(
                min(m, head_dim) + head_dim * 0.02,
                i,
                f"{m:.1f}",
                va="center",
                fontsize=8,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.6, "alpha": 0.85},
            )
    bar_ax.set_xlim(0, head_dim * 1.22)
    cb = fig.colorbar(mesh, ax=[ax, bar_ax], location="right", pad=0.02, fraction=0.04, aspect=30)
    cb.set_label(f"key PR (1 = one direction, {head_dim} = all)")
    # wrap to the figure's width (about 12 characters per inch at 9.5 pt) so nothing is cut off
    chars = max(40, int(width * 12))
    lines = [wrap_phrases(line, chars) for line in f"{title}\n{subtitle}".splitlines()]
    fig.suptitle("\n".join(lines), fontsize=9.5)
    return save(fig, path)
