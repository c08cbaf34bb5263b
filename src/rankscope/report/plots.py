"""The report's figures, drawn from the series and tables in `tables.py`.

Figures are built on `matplotlib.figure.Figure` directly, never through pyplot: no global backend
is switched (a notebook importing rankscope keeps its inline backend), no figure is left open in
pyplot's registry, and saving renders with Agg whatever the session's backend is. Each function
returns a `Plot` (path and a one-line caption that says what the figure shows, bands included) or
None when its data is absent, so the report never embeds an empty axis.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator

from .tables import fmt_tokens

DPI = 150
TOKENS_AXIS = FuncFormatter(lambda x, _pos: fmt_tokens(x))
REFERENCE = "0.45"  # grey for reference lines (head dim, arm mean)


@dataclass(frozen=True)
class Plot:
    path: Path
    caption: str
    arm: str | None = None


def arm_colors(arms: Iterable[str]) -> dict[str, tuple[float, ...]]:
    """One colour per arm, fixed by the arm's position in the study so every figure agrees."""
    arms = list(arms)
    palette = matplotlib.colormaps["tab10" if len(arms) <= 10 else "tab20"].colors
    return {a: palette[i % len(palette)] for i, a in enumerate(arms)}


def safe_names(arms: Iterable[str]) -> dict[str, str]:
    """File-name stems for arm names that may hold '/', spaces, '=' and the like; kept unique."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for a in arms:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(a)).strip("._") or "arm"
        candidate, k = stem, 2
        while candidate.lower() in used:  # case-insensitive file systems would merge 'A' and 'a'
            candidate, k = f"{stem}_{k}", k + 1
        used.add(candidate.lower())
        out[a] = candidate
    return out


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _tokens_axis(ax, label: str = "training tokens") -> None:
    ax.xaxis.set_major_formatter(TOKENS_AXIS)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    ax.set_xlabel(label)


def _seed_word(n: int) -> str:
    return f"{n} seed" + ("" if n == 1 else "s")


# --- 1. loss and mean key PR over training ------------------------------------------------------

def _empty(ax, text: str) -> None:
    """A panel whose data is not there yet: say so, without meaningless 0..1 ticks."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _band_panel(ax, stats: pd.DataFrame, arms: list[str], colors: dict) -> None:
    for a in arms:
        s = stats[stats["arm"] == a].sort_values("tokens")
        if not len(s):
            continue
        ax.plot(s["tokens"], s["mean"], color=colors[a], lw=1.8, label=a)
        if (s["n"] > 1).any():
            ax.fill_between(s["tokens"], s["min"], s["max"], color=colors[a], alpha=0.2, lw=0)


def _zoom_loss(ax, stats: pd.DataFrame, arms: list[str], colors: dict) -> str:
    """Make the late-training loss gap readable; return the caption clause saying how.

    The loss falls from about ln(vocab) to within a few hundredths between arms, so at full scale
    the arms' curves merge. When the curve has flattened (an L shape: everything after 35% of
    training in the bottom third of the axis) the empty upper right gets an inset of the second
    half of training; otherwise the axis itself is cut to the range after the first 10%.
    """
    top_t = float(stats["tokens"].max())
    late = stats[stats["tokens"] >= 0.5 * top_t]
    if top_t <= 0 or late["tokens"].nunique() < 3:
        return ""
    lo, hi = ax.get_ylim()
    tail = stats[stats["tokens"] >= 0.35 * top_t]
    if ((tail["max"] - lo) / (hi - lo) <= 0.33).all():
        inset = ax.inset_axes([0.42, 0.4, 0.55, 0.52])
        _band_panel(inset, late, arms, colors)
        a, b = float(late["min"].min()), float(late["max"].max())
        pad = 0.08 * (b - a) if b > a else 0.01
        inset.set_ylim(a - pad, b + pad)
        inset.xaxis.set_major_formatter(TOKENS_AXIS)
        inset.xaxis.set_major_locator(MaxNLocator(nbins=4, steps=[1, 2, 2.5, 5, 10]))
        inset.tick_params(labelsize=7)
        inset.grid(alpha=0.25)
        inset.set_title("second half, zoomed", fontsize=8)
        return "; inset: the second half of training with its own loss scale"
    after = stats[stats["tokens"] >= 0.1 * top_t]
    a, b = float(after["min"].min()), float(after["max"].max())
    # cut only when the first 10% really dominates the axis; a steady decline is shown whole
    if after["tokens"].nunique() >= 3 and (hi - lo) > 3 * (b - a):
        pad = 0.06 * (b - a) if b > a else 0.05
        ax.set_ylim(a - pad, b + pad)
        return "; loss axis cut to the range after the first 10% of training"
    return ""


def plot_loss_pr(loss_stats: pd.DataFrame, pr_stats: pd.DataFrame, arms: list[str], colors: dict,
                 path: Path, *, head_dim: int | None = None, quantity: str = "mean key PR",
                 site_text: str = "keys after QK-Norm and RoPE", seeds: dict[str, int] | None = None
                 ) -> Plot | None:
    """The seed's comparison figure: val loss (left) and mean key PR (right) against tokens.

    `*_stats` are `tables.seed_stats` frames (arm, tokens, mean, sd, min, max, n).
    """
    if not len(loss_stats) and not len(pr_stats):
        return None
    fig = Figure(figsize=(12, 4.6), layout="constrained")
    ax_l, ax_r = fig.subplots(1, 2)
    multi = bool(len(loss_stats) and (loss_stats["n"] > 1).any()) or bool(len(pr_stats) and (pr_stats["n"] > 1).any())

    zoom = ""
    if len(loss_stats):
        _band_panel(ax_l, loss_stats, arms, colors)
        zoom = _zoom_loss(ax_l, loss_stats, arms, colors)
        _tokens_axis(ax_l)
        ax_l.set_title("validation loss")
    else:
        _empty(ax_l, "no evaluation yet")
    ax_l.set_ylabel("val loss (nats / token)")
    ax_l.set_xlabel("training tokens")

    if len(pr_stats):
        _band_panel(ax_r, pr_stats, arms, colors)
        top = float(np.nanmax(pr_stats["max"].to_numpy(dtype=float)))
        if head_dim:
            ax_r.axhline(head_dim, color=REFERENCE, ls="--", lw=1)
            ax_r.annotate(f"head dim {head_dim}", (0.01, head_dim), xycoords=("axes fraction", "data"),
                          xytext=(0, -3), textcoords="offset points", va="top", fontsize=8, color=REFERENCE)
            top = max(top, head_dim)
        ax_r.set_ylim(0, top * 1.06)  # PR counts dimensions: a zero baseline keeps ratios honest
        _tokens_axis(ax_r)
        ax_r.set_title(quantity)
    else:
        _empty(ax_r, "no probe data yet")
    ax_r.set_ylabel(f"{quantity} (dimensions)")
    ax_r.set_xlabel("training tokens")

    for ax in (ax_l, ax_r):
        ax.grid(alpha=0.25)
        ax.spines[["top", "right"]].set_visible(False)
    seeds = seeds or {}
    handles = [Line2D([], [], color=colors[a], lw=2.5) for a in arms]
    labels = [f"{a} ({_seed_word(seeds[a])})" if seeds.get(a) else f"{a} (no data yet)" for a in arms]
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(arms), 4), frameon=False)
    _save(fig, path)

    caption = (f"Validation loss (left) and {quantity} (right: participation ratio of the {site_text}, "
               f"averaged over heads then layers) against training tokens")
    caption += "; lines are the mean over seeds, shaded bands span the lowest to highest seed" if multi else ""
    caption += f"; dashed: the head dimension {head_dim}, the most a head can use" if head_dim and len(pr_stats) else ""
    caption += zoom
    return Plot(path, caption + ".")


# --- 2. per-layer bars at the end of training ---------------------------------------------------

def plot_layer_pr(layer_stats: pd.DataFrame, arm: str, color, path: Path, *, ymax: float,
                  head_dim: int | None = None, quantity: str = "mean key PR") -> Plot | None:
    """Bars of `quantity` per layer at the arm's END; whiskers span the seeds; grey line = arm mean.

    `layer_stats`: one arm's rows of (layer, mean, min, max, n, tokens) at one eval point.
    """
    if not len(layer_stats) or layer_stats["mean"].isna().all():  # nothing yet, or a diverged arm
        return None
    s = layer_stats.sort_values("layer")
    layers = s["layer"].to_numpy()
    means = s["mean"].to_numpy(dtype=float)
    n = int(s["n"].max())
    tokens = float(s["tokens"].iloc[0])

    fig = Figure(figsize=(max(6.5, 0.36 * len(layers) + 2.5), 4.4), layout="constrained")
    ax = fig.subplots()
    ax.bar(layers, means, color=color, width=0.75, zorder=2)
    if n > 1:
        err = np.vstack([means - s["min"].to_numpy(float), s["max"].to_numpy(float) - means])
        ax.errorbar(layers, means, yerr=err, fmt="none", ecolor="0.2", elinewidth=1, capsize=2, zorder=3)
    if len(layers) <= 40:  # print each bar's value: the seed's post reads layers off by number
        tops = s["max"].to_numpy(float) if n > 1 else means
        for x, y, top in zip(layers, means, tops):
            ax.annotate(f"{y:.0f}" if ymax >= 20 else f"{y:.1f}", (x, top), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom",
                        fontsize=7 if len(layers) > 16 else 8)
    arm_mean = float(np.nanmean(means))
    ax.axhline(arm_mean, color=REFERENCE, lw=1.2, zorder=1)
    # reference labels go in the right margin, where no bar or value label can sit under them
    close = bool(head_dim) and abs(head_dim - arm_mean) < 0.12 * ymax  # two-line labels would collide
    ax.annotate(f"mean\n{arm_mean:.1f}", (1.0, arm_mean), xycoords=("axes fraction", "data"),
                xytext=(4, 0), textcoords="offset points", ha="left", va="top" if close else "center",
                fontsize=8, color="0.25")
    if head_dim:
        ax.axhline(head_dim, color=REFERENCE, ls="--", lw=1, zorder=1)
        ax.annotate(f"head\ndim {head_dim}", (1.0, head_dim), xycoords=("axes fraction", "data"),
                    xytext=(4, 0), textcoords="offset points", ha="left", va="bottom" if close else "center",
                    fontsize=8, color=REFERENCE)
    ax.set_ylim(0, ymax)
    ax.set_xlim(layers.min() - 0.7, layers.max() + 0.7)
    if len(layers) <= 32:
        ax.set_xticks(layers)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=16))
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{quantity} (dimensions)")
    ax.set_title(f"{arm}: {quantity} per layer at {fmt_tokens(tokens)} tokens"
                 + (f" (mean of {_seed_word(n)})" if n > 1 else ""), fontsize=11)
    ax.grid(axis="y", alpha=0.25, zorder=0)
    ax.spines[["top", "right"]].set_visible(False)
    _save(fig, path)
    caption = (f"{arm}: {quantity} of each layer (mean over its heads) at {fmt_tokens(tokens)} tokens"
               + (f", mean of {_seed_word(n)} with whiskers from the lowest to the highest seed" if n > 1 else "")
               + f"; grey line: the arm's mean over layers ({arm_mean:.1f}); same y-axis for every arm.")
    return Plot(path, caption, arm)


# --- 3. layer x tokens heatmap -------------------------------------------------------------------

def _edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges halfway between eval points, so uneven eval spacing is drawn to scale."""
    if len(centres) == 1:
        half = max(abs(centres[0]) * 0.05, 0.5)
        return np.array([centres[0] - half, centres[0] + half])
    mids = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[centres[0] - (mids[0] - centres[0])], mids, [centres[-1] + (centres[-1] - mids[-1])]])


def plot_pr_heatmap(grid: pd.DataFrame, arm: str, path: Path, *, vmin: float, vmax: float,
                    quantity: str = "mean key PR", n_seeds: int = 1) -> Plot | None:
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
    mesh = ax.pcolormesh(_edges(tokens), _edges(layers.astype(float)), np.ma.masked_invalid(m.to_numpy(float)),
                         cmap="viridis", vmin=vmin, vmax=vmax, shading="flat")
    ax.invert_yaxis()  # layer 0 (the input side) on top, as the network is usually drawn
    _tokens_axis(ax)
    ax.set_xlim(_edges(tokens)[0], _edges(tokens)[-1])
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(len(layers), 24)))
    ax.set_ylabel("layer")
    ax.set_title(f"{arm}: {quantity} per layer over training"
                 + (f" (mean of {_seed_word(n_seeds)})" if n_seeds > 1 else ""), fontsize=11)
    cb = fig.colorbar(mesh, ax=ax, pad=0.01)
    cb.set_label(f"{quantity} (dimensions)")
    _save(fig, path)
    caption = (f"{arm}: {quantity} of each layer (rows, layer 0 on top; mean over heads"
               + (f" and {_seed_word(n_seeds)}" if n_seeds > 1 else "")
               + f") at each eval point; colour scale {vmin:.0f}–{vmax:.0f} shared by all arms.")
    return Plot(path, caption, arm)
