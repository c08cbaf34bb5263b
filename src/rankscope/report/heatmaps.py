"""Heatmaps: each arm's mean key PR per layer over training (layers x tokens), and the layer x head
key PR of one model that `rankscope analyze` draws. The shared house style is in `plotstyle.py`.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .curves import log_axis_clause, tokens_axis
from .format import seeds_text
from .plotstyle import Plot, save


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


def plot_pr_heatmap(
    grid: pd.DataFrame,
    arm: str,
    path: Path,
    *,
    vmin: float,
    vmax: float,
    quantity: str = "mean key PR",
    n_seeds: int = 1,
) -> Plot | None:
    """Layers (rows, layer 0 on top) x eval points (columns) coloured by `quantity`.

    `grid`: one arm's (layer, tokens, value) with value already averaged over heads and seeds.
    The colour scale is passed in so that all arms share it.
    """
    if not len(grid):
        return None
    m = grid.pivot_table(index="layer", columns="tokens", values="value", aggfunc="mean")
    layers = m.index.to_numpy()
    tokens = m.columns.to_numpy(dtype=float)
    fig = Figure(figsize=(9, max(3.2, 0.2 * len(layers) + 1.6)), layout="constrained")
    ax = fig.subplots()
    log = tokens_axis(ax, tokens)
    xe = _edges_on(ax, tokens)
    if log and (tokens <= 0).any():
        xe[0] = max(xe[0], 0.0)  # nothing happens before token 0
    mesh = ax.pcolormesh(
        xe,
        _edges(layers.astype(float)),
        np.ma.masked_invalid(m.to_numpy(float)),
        cmap="viridis",
        vmin=vmin,
        vmax=vmax,
        shading="flat",
    )
    ax.invert_yaxis()  # layer 0 (the input side) on top, as the network is usually drawn
    ax.set_xlim(xe[0], xe[-1])
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(len(layers), 24)))
    ax.set_ylabel("layer")
    ax.set_title(
        f"{arm}: {quantity} per layer over training" + (f" (mean of {seeds_text(n_seeds)})" if n_seeds > 1 else ""),
        fontsize=11,
    )
    cb = fig.colorbar(mesh, ax=ax, pad=0.01)
    cb.set_label(f"{quantity} (dimensions)")
    save(fig, path)
    caption = (
        f"{arm}: {quantity} of each layer (rows, layer 0 on top; mean over heads"
        + (f" and {seeds_text(n_seeds)}" if n_seeds > 1 else ", one seed")
        + f") at each eval point; colour scale {vmin:.0f}–{vmax:.0f} shared by all arms"
        + log_axis_clause(log, bool((tokens <= 0).any()))
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
    fig = Figure(figsize=(width, height), layout="constrained")
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
    lines = [textwrap.fill(line, chars) for line in f"{title}\n{subtitle}".splitlines()]
    fig.suptitle("\n".join(lines), fontsize=9.5)
    return save(fig, path)
