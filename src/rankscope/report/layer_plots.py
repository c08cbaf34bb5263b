"""Figures across layers at one point of training, the arms side by side in each: the per-layer
bars, the collapse diagnosis, functional rank next to key PR (with its floor, 1), and the rank
sweep behind it. The shared house style is in `plotstyle.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator

from ..settings.units import fmt_count
from .format import seeds_text
from .layer_tables import DiagPanel
from .plotstyle import (
    CHANCE,
    FLAG,
    MAX_WIDTH_IN,
    REFERENCE,
    SMALL,
    Plot,
    bar_label,
    ci_bars,
    new_figure,
    reference_line,
    save,
    style_axes,
)

# --- 1. per-layer bars at the end of training ---------------------------------------------------


def plot_layer_pr(
    bars: pd.DataFrame,
    arms: Sequence[str],
    colors: dict,
    path: Path,
    *,
    ymax: float,
    head_dim: int | None = None,
    quantity: str = "mean key PR",
) -> Plot | None:
    """Bars of `quantity` per layer at each arm's END, the arms side by side within each layer (one
    colour each) so a layer reads across arms at a glance; whiskers: 95% t interval over seeds.

    `bars`: rows of (arm, layer, mean, lo, hi, n, tokens) at each arm's end.
    """
    if not len(bars):
        return None
    arms = [a for a in arms if (bars["arm"] == a).any() and bars.loc[bars["arm"] == a, "mean"].notna().any()]
    if not arms:  # nothing yet, or every arm diverged
        return None
    layers = np.sort(bars["layer"].unique())
    n_layers, k = len(layers), len(arms)
    fig = new_figure(max(6.5, 0.28 * n_layers * k + 0.5 * n_layers + 2.5), 4.4)
    ax = fig.subplots()
    w = 0.8 / k
    label_values = n_layers * k <= 40  # the seed's post reads layers off by number; past that they would collide
    max_n, ends, handles, labels = 1, {}, [], []
    for j, a in enumerate(arms):
        s = bars[bars["arm"] == a].sort_values("layer")
        x = s["layer"].to_numpy(float) + (j - (k - 1) / 2) * w
        means = s["mean"].to_numpy(float)
        n = int(s["n"].max())
        max_n = max(max_n, n)
        ends[a] = float(s["tokens"].iloc[0])
        tops = ci_bars(ax, x, s, w * 0.92, color=colors[a])
        if label_values:
            for xi, y, top in zip(x, means, tops):
                if np.isfinite(y):
                    bar_label(ax, xi, y, top, ymax, f"{y:.0f}" if ymax >= 20 else f"{y:.1f}")
        handles.append(Patch(facecolor=colors[a]))
        labels.append(f"{a}: mean over layers {np.nanmean(means):.1f}" + (f" ({seeds_text(n)})" if n > 1 else ""))
    ax.set_ylim(0, ymax)
    if head_dim:  # after the limits: the label is placed against them
        reference_line(ax, head_dim, f"head dim {head_dim}", color=REFERENCE)
    ax.set_xlim(layers.min() - 0.6, layers.max() + 0.6)
    if n_layers <= 32:
        ax.set_xticks(layers)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=16))
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{quantity} (dimensions)")
    same_end = len(set(ends.values())) == 1
    when = f"at {fmt_count(next(iter(ends.values())))} tokens" if same_end else "at each arm's end"
    ax.set_title(f"{quantity} per layer {when}" + (" (one seed)" if max_n == 1 else ""), fontsize=11)
    ax.grid(axis="y", alpha=0.25, zorder=0)
    ax.spines[["top", "right"]].set_visible(False)
    fig.legend(handles, labels, loc="outside lower center", ncols=min(k, 2 if k == 4 else 3), frameon=False)
    save(fig, path)
    whens = "" if same_end else " (" + ", ".join(f"{a} at {fmt_count(t)}" for a, t in ends.items()) + ")"
    caption = (
        f"{quantity[0].upper() + quantity[1:]} of each layer (mean over its heads) at each arm's end{whens}, the "
        "arms side by side within each layer"
        + (
            "; bars are means over seeds, whiskers the 95% t-interval over seeds"
            if max_n > 1
            else "; one seed per arm (no interval possible)"
        )
        + "; the legend gives each arm's mean over layers"
        + (f"; dashed: the head dimension {head_dim}" if head_dim else "")
        + "."
    )
    return Plot(path, caption)


# --- 2. why do some layers collapse? per-layer diagnosis --------------------------------------------

DIAG_MAX_ARMS = 4  # arms per diagnosis figure: more are split over several figures


@dataclass(frozen=True)
class DiagColumn:
    """One arm's column of the diagnosis figure (from `layer_tables.Diagnosis`)."""

    arm: str
    panels: list[DiagPanel]
    tokens: float
    n_seeds: int
    flagged: Sequence[int] = ()


def diagnosis_groups(n_arms: int, n_layers: int) -> list[range]:
    """Which arms share a diagnosis figure: as many side by side as fit the page width (at most
    `DIAG_MAX_ARMS`), in study order."""
    per = max(1, min(DIAG_MAX_ARMS, int((MAX_WIDTH_IN - 1.2) // _diag_col_width(n_layers))))
    return [range(i, min(i + per, n_arms)) for i in range(0, n_arms, per)]


def _diag_col_width(n_layers: int) -> float:
    return max(2.9, 0.17 * n_layers + 1.0)


def _row_label(title: str, ylabel: str) -> str:
    """A diagnosis row's y-label: the quantity's short name, then what the axis label adds to it
    ("key PR" and "PR (dims)" -> "key PR\n(dims)"; "max attention logit" and "max logit" -> the name)."""
    name = title.split(" (")[0]
    words, _, unit = ylabel.partition(" (")
    if set(words.lower().split()) <= set(name.lower().split()):
        return name + (f"\n({unit}" if unit else "")
    return f"{name}\n{ylabel}"


def plot_diagnosis(
    columns: Sequence[DiagColumn],
    colors: dict,
    path: Path,
    *,
    n_layers: int,
    flag_rule: str = "",
) -> Plot | None:
    """The arms side by side (one column each), one quantity per row, across the layers of each arm
    at its END; every row's y-range is shared by all arms (`layer_tables.diagnoses`), so a row reads
    across. The collapsed layers of an arm (`flagged`) are shaded in its column, so what they did
    differently lines up.

    Bars are layer means (over heads, then seeds) with 95% t whiskers over seeds; small dots are the
    individual heads (each averaged over seeds), because a layer mean can hide one dead head.
    """
    columns = [c for c in columns if c.panels]
    if not columns:
        return None
    rows, k = len(columns[0].panels), len(columns)
    fig = new_figure(_diag_col_width(n_layers) * k + 1.2, 1.75 * rows + 1.3)
    axes = np.array(fig.subplots(rows, k, sharex="col", sharey="row", squeeze=False))
    xs = np.arange(n_layers)
    step = 1 if n_layers <= 16 else int(np.ceil(n_layers / 8))
    multi = False
    for j, col in enumerate(columns):
        color = colors[col.arm]
        for i, p in enumerate(col.panels):
            ax = axes[i, j]
            for layer in col.flagged:
                ax.axvspan(layer - 0.5, layer + 0.5, color=FLAG, alpha=0.09, lw=0, zorder=0)
            data = p.layers
            if not len(data) or data["mean"].isna().all():
                ax.text(
                    0.5, 0.5, p.missing, ha="center", va="center", transform=ax.transAxes, color="0.45", fontsize=SMALL
                )
            else:
                series = list(dict.fromkeys(data["series"]))
                multi = multi or len(series) > 1
                w = 0.72 / len(series)
                for si, name in enumerate(series):
                    s = data[data["series"] == name].sort_values("layer")
                    off = (si - (len(series) - 1) / 2) * w
                    x = s["layer"].to_numpy(float) + off
                    ci_bars(ax, x, s, w * 0.92, color=color, alpha=0.85 if si == 0 else 0.45)
                if p.heads is not None and len(p.heads):
                    h = p.heads
                    n_heads = max(int(h["head"].max()) + 1, 1)
                    jitter = (h["head"].to_numpy(float) / max(n_heads - 1, 1) - 0.5) * 0.5 if n_heads > 1 else 0.0
                    ax.scatter(
                        h["layer"].to_numpy(float) + jitter,
                        h["value"].to_numpy(float),
                        s=7,
                        color="0.1",
                        zorder=4,
                        linewidths=0,
                        alpha=0.75,
                    )
            ax.set_ylim(*p.ylim)
            if p.hline:
                reference_line(ax, p.hline[0], p.hline[1], color=REFERENCE, lw=0.9)
            if j == 0:
                pair = list(dict.fromkeys(p.layers["series"])) if len(p.layers) else []
                # two series side by side: the row says which is which (dark first, light second)
                names = f"\ndark: {pair[0]}\nlight: {pair[1]}" if len(pair) == 2 else ""
                ax.set_ylabel(_row_label(p.title, p.ylabel) + names, fontsize=SMALL if names else None)
            ax.grid(axis="y", alpha=0.25, zorder=0)
            ax.spines[["top", "right"]].set_visible(False)
        top = axes[0, j]
        seeds = f"mean of {seeds_text(col.n_seeds)}" if col.n_seeds > 1 else "one seed"
        top.set_title(f"{col.arm}\nat {fmt_count(col.tokens)} tokens, {seeds}", fontsize=10)
        last = axes[-1, j]
        last.set_xlim(-0.6, n_layers - 0.4)
        ticks = sorted(set(xs[::step].tolist()) | set(col.flagged))  # a flagged layer always gets its label
        last.set_xticks(ticks, [str(t) for t in ticks])
        for t, lab in zip(ticks, last.get_xticklabels()):
            if t in set(col.flagged):
                lab.set_color(FLAG)
                lab.set_fontweight("bold")
        last.set_xlabel("layer")
    handles: list = [Line2D([], [], color="0.1", marker="o", ls="", ms=3)]
    labels = ["individual heads"]
    if any(c.flagged for c in columns):
        handles.append(Patch(facecolor=FLAG, alpha=0.15))
        labels.append("collapsed layer" + (f" ({flag_rule})" if flag_rule else ""))
    if multi:  # which series is which is said in each such row's label
        handles[:0] = [Patch(facecolor="0.35", alpha=0.85), Patch(facecolor="0.35", alpha=0.45)]
        labels[:0] = ["first series (dark)", "second series (light)"]
    fig.legend(handles, labels, loc="outside lower center", ncols=len(handles), frameon=False, fontsize=SMALL)
    fig.suptitle("Per-layer diagnosis at each arm's end", fontsize=11)
    save(fig, path)
    flagged = [f"{c.arm}: layers {', '.join(map(str, c.flagged))}" for c in columns if c.flagged]
    if flagged:
        flagged_text = f"shaded in red, the collapsed layers ({flag_rule}) — " + "; ".join(flagged)
    else:
        flagged_text = f"no layer is flagged as collapsed ({flag_rule})" if flag_rule else ""
    n_max = max(c.n_seeds for c in columns)
    caption = (
        f"Per-layer diagnosis of {', '.join(c.arm for c in columns)} at each arm's end, one arm per column and "
        f"one quantity per row ({', '.join(p.title.split(' (')[0] for p in columns[0].panels)}). Bars: mean over "
        "heads, then "
        + (
            "over seeds, whiskers the 95% t-interval over seeds (cut at the panel edge where they run past it: "
            "the scale follows the bars)"
            if n_max > 1
            else "one seed (no interval possible)"
        )
        + "; dots: individual heads (mean over seeds); every row's y-axis is shared by all arms"
        + (f"; {flagged_text}" if flagged_text else "")
        + "."
    )
    return Plot(path, caption)


# --- 3. functional rank next to key PR ---------------------------------------------------------------


def plot_functional_rank(
    data: dict[str, pd.DataFrame],
    arms: list[str],
    colors: dict,
    path: Path,
    *,
    head_dim: int | None = None,
    tokens: dict[str, float] | None = None,
    n_seeds: dict[str, int] | None = None,
    at_floor: Sequence[str] = (),
) -> Plot | None:
    """Per arm (one panel each, side by side, shared y), per layer: key PR and functional rank side
    by side, with functional rank's floor (1) as a labelled dashed line; `at_floor`: the arms whose
    every layer is still at the floor (`quantities.still_at_chance`), noted in their panel.

    `data[arm]`: rows (layer, series in {"key PR", "functional rank"}, mean, lo, hi, n).
    """
    arms = [a for a in arms if a in data and len(data[a])]
    if not arms:
        return None
    n_layers = int(max(d["layer"].max() for d in data.values() if len(d))) + 1
    panel_w = max(3.1, 0.3 * n_layers + 1.4)
    # side by side while the figure fits the page; deep models get fewer arms per row
    ncols = max(1, min(len(arms), 4, int((MAX_WIDTH_IN - 0.5) // panel_w)))
    nrows = int(np.ceil(len(arms) / ncols))
    fig = new_figure(panel_w * ncols + 0.5, 3.2 * nrows + 0.8)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharey=True, squeeze=False)).ravel()
    top = max(float(np.nanmax(d["mean"].to_numpy(float))) for a, d in data.items() if a in arms and len(d))
    whisk = max(
        float(np.nanmax(np.append(d["hi"].to_numpy(float), -np.inf))) for a, d in data.items() if a in arms and len(d)
    )
    top = max(top, min(whisk, top * 1.25))  # whiskers never set the scale (see layer_tables.diagnoses)
    top = max(top, head_dim or 0) * 1.08
    max_n = 1
    for i, (ax, a) in enumerate(zip(axes, arms)):
        d = data[a]
        for j, (name, alpha) in enumerate((("key PR", 0.35), ("functional rank", 0.95))):
            s = d[d["series"] == name].sort_values("layer")
            if not len(s):
                continue
            x = s["layer"].to_numpy(float) + (j - 0.5) * 0.38
            ci_bars(ax, x, s, 0.36, color=colors[a], alpha=alpha, edgecolor=colors[a], lw=0.8)
            max_n = max(max_n, int(s["n"].max()))
        ax.set_ylim(0, top)  # dimensions: a zero baseline keeps the ratio of PR to functional rank honest
        if head_dim:
            ax.axhline(head_dim, color=REFERENCE, ls="--", lw=1, zorder=1)
        last_in_row = i % ncols == ncols - 1 or i == len(arms) - 1
        if last_in_row:  # the label once per row, in the margin: no bar sits under it
            reference_line(ax, 1.0, "floor\n1", where="margin")
        else:
            ax.axhline(1.0, color=CHANCE, ls="--", lw=1, zorder=1.5)
        ax.set_xlim(-0.7, n_layers - 0.3)
        if n_layers <= 16:
            ax.set_xticks(range(n_layers))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
        ax.set_xlabel("layer")
        when = f" at {fmt_count(tokens[a])}" if tokens and a in tokens else ""
        seeds = f", {seeds_text(n_seeds[a])}" if n_seeds and a in n_seeds else ""
        # a second title line, where no bar or reference line can run under it
        floor = "\nfunctional rank at its floor (1) in every layer" if a in set(at_floor) else ""
        ax.set_title(f"{a}{when}{seeds}{floor}", fontsize=10)
        ax.grid(axis="y", alpha=0.25, zorder=0)
        ax.spines[["top", "right"]].set_visible(False)
    for ax in axes[len(arms) :]:
        ax.set_visible(False)
    for ax in axes[::ncols]:
        ax.set_ylabel("dimensions")
    handles = [Patch(facecolor="0.5", alpha=0.35, edgecolor="0.5"), Patch(facecolor="0.5", alpha=0.95)]
    labels = ["key PR (spectral spread of the keys)", "functional rank (fewest directions keeping the loss within 1%)"]
    if head_dim:
        handles.append(Line2D([], [], color=REFERENCE, ls="--"))
        labels.append(f"head dim {head_dim}")
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(handles), 2), frameon=False, fontsize=SMALL)
    save(fig, path)
    floor_words = "; dashed dark grey: functional rank's floor, 1 (one direction)"
    at = [a for a in arms if a in set(at_floor)]
    if at:
        floor_words += "; still at the floor (rank 1 in every layer): " + (
            "every arm" if len(at) == len(arms) else ", ".join(at)
        )
    caption = (
        "Functional rank of the keys (the smallest projection rank r of each head's keys that keeps the "
        "loss within 1%: the dimensions the model actually uses; solid) next to the key PR (pale), per "
        "layer at the last point where functional rank was measured, one panel per arm; "
        + (
            "bars are means over seeds, whiskers 95% t-intervals over seeds"
            if max_n > 1
            else "one seed, no interval possible"
        )
        + "; shared y-axis from 0"
        + floor_words
        + "."
    )
    return Plot(path, caption)


def plot_rank_sweep(
    curves: dict[str, pd.DataFrame],
    arms: list[str],
    path: Path,
    *,
    tokens: dict[str, float] | None = None,
    threshold: float = 0.01,
) -> Plot | None:
    """Per arm, the relative loss increase when every head's keys are projected onto their top-r
    directions, against r, one line per layer (mean over seeds). The functional rank is where a
    layer's line crosses the dashed 1% threshold. Layers are whole numbers: their colours come in
    steps, on a colour bar with one step and an integer tick per layer.

    `curves[arm]`: rows (layer, r, value).
    """
    arms = [a for a in arms if a in curves and len(curves[a])]
    if not arms:
        return None
    n_layers = int(max(c["layer"].max() for c in curves.values() if len(c))) + 1
    ncols = min(len(arms), 4)
    nrows = int(np.ceil(len(arms) / ncols))
    panel_w = 3.2 if ncols == 4 else 4.2
    fig = new_figure(panel_w * ncols + 1.0, 3.3 * nrows + 0.4)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharey=True, squeeze=False)).ravel()
    cmap = matplotlib.colormaps["viridis"].resampled(max(n_layers, 2))
    norm = matplotlib.colors.BoundaryNorm(np.arange(-0.5, max(n_layers, 2) + 0.5), cmap.N)
    values = np.concatenate([c["value"].to_numpy(float) for c in curves.values() if len(c)])
    values = values[np.isfinite(values)]
    ymax = max(float(values.max()) if len(values) else 1.0, threshold * 2)  # the threshold line always shows
    for ax, a in zip(axes, arms):
        c = curves[a]
        for layer, g in c.groupby("layer"):
            g = g.sort_values("r")
            ax.plot(g["r"], g["value"], color=cmap(norm(layer)), lw=1.3, marker="o", ms=2.5)
        ax.axhline(threshold, color=FLAG, ls="--", lw=1)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _p: f"{x:g}"))
        # a symlog y: losses rise by orders of magnitude at low rank, and 0 (no loss) must show
        ax.set_yscale("symlog", linthresh=threshold / 10, linscale=0.5)
        ax.set_ylim(min(0.0, float(values.min()) if len(values) else 0.0), ymax * 1.5)
        ax.set_xlabel("projection rank r")
        when = f" at {fmt_count(tokens[a])}" if tokens and a in tokens else ""
        ax.set_title(f"{a}{when}", fontsize=10)
        style_axes(ax)
    for ax in axes[len(arms) :]:
        ax.set_visible(False)
    for ax in axes[::ncols]:
        ax.set_ylabel("relative loss increase")
    sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
    cb = fig.colorbar(sm, ax=list(axes[: len(arms)]), pad=0.01, aspect=30)
    step = 1 if n_layers <= 12 else int(np.ceil(n_layers / 12))
    cb.set_ticks(list(range(0, n_layers, step)))
    cb.minorticks_off()
    cb.set_label("layer")
    save(fig, path)
    caption = (
        "Rank sweep of the keys: the relative loss increase when each head's keys are projected onto their "
        "top-r principal directions, against r (log scale), one line per layer (its colour on the stepped "
        "colour bar), mean over seeds; "
        f"dashed red: the {threshold:.0%} threshold that defines the functional rank; y-axis symlog "
        "(linear near 0)."
    )
    return Plot(path, caption)


# --- 4. one model's layers x heads (`rankscope analyze`) ---------------------------------------------


__all__ = [
    "plot_layer_pr",
    "DIAG_MAX_ARMS",
    "DiagColumn",
    "diagnosis_groups",
    "plot_diagnosis",
    "plot_functional_rank",
    "plot_rank_sweep",
]
