"""Figures across layers and heads at one point of training: each arm's per-layer bars, the
collapse diagnosis, functional rank next to key PR, and the rank sweep behind it. The shared house
style is in `plotstyle.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator

from ..units import fmt_count
from .format import seeds_text
from .layers import DiagPanel
from .plotstyle import FLAG, REFERENCE, Plot, ci_err, save, style_axes

# --- 1. per-layer bars at the end of training ---------------------------------------------------


def plot_layer_pr(
    layer_stats: pd.DataFrame,
    arm: str,
    color,
    path: Path,
    *,
    ymax: float,
    head_dim: int | None = None,
    quantity: str = "mean key PR",
) -> Plot | None:
    """Bars of `quantity` per layer at the arm's END; whiskers: 95% t interval over seeds; grey line = arm mean.

    `layer_stats`: one arm's rows of (layer, mean, lo, hi, n, tokens) at one eval point.
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
    tops = means
    if n > 1:
        err = ci_err(means, s["lo"].to_numpy(float), s["hi"].to_numpy(float))
        ax.errorbar(layers, means, yerr=err, fmt="none", ecolor="0.2", elinewidth=1, capsize=2, zorder=3)
        tops = means + err[1]
    if len(layers) <= 40:  # print each bar's value: the seed's post reads layers off by number
        for x, y, top in zip(layers, means, tops):
            if np.isfinite(y):
                ax.annotate(
                    f"{y:.0f}" if ymax >= 20 else f"{y:.1f}",
                    (x, top),
                    xytext=(0, 2),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize=7 if len(layers) > 16 else 8,
                )
    arm_mean = float(np.nanmean(means))
    ax.axhline(arm_mean, color=REFERENCE, lw=1.2, zorder=1)
    # reference labels go in the right margin, where no bar or value label can sit under them
    close = bool(head_dim) and abs(head_dim - arm_mean) < 0.12 * ymax  # two-line labels would collide
    ax.annotate(
        f"mean\n{arm_mean:.1f}",
        (1.0, arm_mean),
        xycoords=("axes fraction", "data"),
        xytext=(4, 0),
        textcoords="offset points",
        ha="left",
        va="top" if close else "center",
        fontsize=8,
        color="0.25",
    )
    if head_dim:
        ax.axhline(head_dim, color=REFERENCE, ls="--", lw=1, zorder=1)
        ax.annotate(
            f"head\ndim {head_dim}",
            (1.0, head_dim),
            xycoords=("axes fraction", "data"),
            xytext=(4, 0),
            textcoords="offset points",
            ha="left",
            va="bottom" if close else "center",
            fontsize=8,
            color=REFERENCE,
        )
    ax.set_ylim(0, ymax)
    ax.set_xlim(layers.min() - 0.7, layers.max() + 0.7)
    if len(layers) <= 32:
        ax.set_xticks(layers)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=16))
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{quantity} (dimensions)")
    ax.set_title(
        f"{arm}: {quantity} per layer at {fmt_count(tokens)} tokens"
        + (f" (mean of {seeds_text(n)})" if n > 1 else " (one seed)"),
        fontsize=11,
    )
    ax.grid(axis="y", alpha=0.25, zorder=0)
    ax.spines[["top", "right"]].set_visible(False)
    save(fig, path)
    caption = (
        f"{arm}: {quantity} of each layer (mean over its heads) at {fmt_count(tokens)} tokens"
        + (
            f", mean of {seeds_text(n)} with whiskers spanning the 95% t-interval over seeds"
            if n > 1
            else ", one seed (no interval possible)"
        )
        + f"; grey line: the arm's mean over layers ({arm_mean:.1f}); same y-axis for every arm."
    )
    return Plot(path, caption)


# --- 2. why do some layers collapse? per-layer diagnosis --------------------------------------------


def plot_diagnosis(
    arm: str,
    panels: list[DiagPanel],
    color,
    path: Path,
    *,
    tokens: float,
    n_seeds: int,
    n_layers: int,
    flagged: Sequence[int] = (),
    flag_rule: str = "",
) -> Plot | None:
    """One column of panels, one quantity each, across the layers of `arm` at its END, with the
    collapsed layers (`flagged`) shaded in every panel so what they did differently lines up.

    Bars are layer means (over heads, then seeds) with 95% t whiskers over seeds; small dots are the
    individual heads (each averaged over seeds), because a layer mean can hide one dead head.
    """
    if not panels:
        return None
    rows = len(panels)
    width = max(7.5, 0.42 * n_layers + 3.0)
    fig = Figure(figsize=(width, 1.85 * rows + 1.1), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, 1, sharex=True))
    xs = np.arange(n_layers)
    for ax, p in zip(axes, panels):
        for layer in flagged:
            ax.axvspan(layer - 0.5, layer + 0.5, color=FLAG, alpha=0.09, lw=0, zorder=0)
        data = p.layers
        if not len(data) or data["mean"].isna().all():
            ax.text(0.5, 0.5, p.missing, ha="center", va="center", transform=ax.transAxes, color="0.45", fontsize=9)
        else:
            series = list(dict.fromkeys(data["series"]))
            w = 0.72 / len(series)
            for j, name in enumerate(series):
                s = data[data["series"] == name].sort_values("layer")
                off = (j - (len(series) - 1) / 2) * w
                style = {"color": color, "alpha": 0.85 if j == 0 else 0.45}
                x = s["layer"].to_numpy(float) + off
                m = s["mean"].to_numpy(float)
                ax.bar(x, m, width=w * 0.92, zorder=2, label=name or None, **style)
                if (s["n"] > 1).any():
                    ax.errorbar(
                        x,
                        m,
                        yerr=ci_err(m, s["lo"].to_numpy(float), s["hi"].to_numpy(float)),
                        fmt="none",
                        ecolor="0.15",
                        elinewidth=0.9,
                        capsize=1.5,
                        zorder=3,
                    )
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
            if len(series) > 1:  # above the panel, beside its left-aligned title: no bar or whisker under it
                ax.legend(
                    fontsize=7,
                    loc="lower right",
                    bbox_to_anchor=(1.0, 1.0),
                    frameon=False,
                    ncols=len(series),
                    borderaxespad=0.1,
                )
        if p.hline:
            ax.axhline(p.hline[0], color=REFERENCE, ls="--", lw=0.9, zorder=1)
            ax.annotate(
                p.hline[1],
                (1.0, p.hline[0]),
                xycoords=("axes fraction", "data"),
                xytext=(3, 0),
                textcoords="offset points",
                fontsize=7,
                color=REFERENCE,
                va="center",
            )
        ax.set_ylim(*p.ylim)
        ax.set_title(p.title, fontsize=9.5, loc="left")
        ax.set_ylabel(p.ylabel, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(axis="y", alpha=0.25, zorder=0)
        ax.spines[["top", "right"]].set_visible(False)
    last = axes[-1]
    last.set_xlim(-0.6, n_layers - 0.4)
    step = 1 if n_layers <= 32 else int(np.ceil(n_layers / 16))
    ticks = sorted(set(xs[::step].tolist()) | set(flagged))  # a flagged layer always gets its label
    last.set_xticks(ticks, [str(t) for t in ticks])
    for t, lab in zip(ticks, last.get_xticklabels()):
        if t in set(flagged):
            lab.set_color(FLAG)
            lab.set_fontweight("bold")
    last.set_xlabel("layer")
    seeds = f"mean of {seeds_text(n_seeds)}" if n_seeds > 1 else "one seed"
    fig.suptitle(f"{arm}: per-layer diagnosis at {fmt_count(tokens)} tokens ({seeds})", fontsize=11)
    save(fig, path)
    flagged_text = (
        f"shaded in red: layers {', '.join(map(str, flagged))} ({flag_rule})"
        if flagged
        else f"no layer is flagged as collapsed ({flag_rule})"
        if flag_rule
        else ""
    )
    caption = (
        f"{arm}: per-layer diagnosis at {fmt_count(tokens)} tokens, one quantity per row "
        f"({', '.join(p.title.split(' (')[0] for p in panels)}). Bars: mean over heads, then "
        + (
            f"over {seeds_text(n_seeds)}, whiskers the 95% t-interval over seeds (cut at the panel edge "
            "where they run past it: the scale follows the bars)"
            if n_seeds > 1
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
) -> Plot | None:
    """Per arm (one panel each, shared y), per layer: key PR and functional rank side by side.

    `data[arm]`: rows (layer, series in {"key PR", "functional rank"}, mean, lo, hi, n).
    """
    arms = [a for a in arms if a in data and len(data[a])]
    if not arms:
        return None
    n_layers = int(max(d["layer"].max() for d in data.values() if len(d))) + 1
    panel_w = max(4.8, 0.34 * n_layers + 2.2)
    # side by side while the figure stays readable (about 16 inches); deep models get one arm per row
    ncols = max(1, min(len(arms), 3, int(16 // panel_w)))
    nrows = int(np.ceil(len(arms) / ncols))
    fig = Figure(figsize=(panel_w * ncols, 3.3 * nrows + 0.7), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharey=True, squeeze=False)).ravel()
    top = max(float(np.nanmax(d["mean"].to_numpy(float))) for a, d in data.items() if a in arms and len(d))
    whisk = max(
        float(np.nanmax(np.append(d["hi"].to_numpy(float), -np.inf))) for a, d in data.items() if a in arms and len(d)
    )
    top = max(top, min(whisk, top * 1.25))  # whiskers never set the scale (see layers.diagnoses)
    top = max(top, head_dim or 0) * 1.08
    max_n = 1
    for ax, a in zip(axes, arms):
        d = data[a]
        for j, (name, alpha, hatch) in enumerate((("key PR", 0.35, None), ("functional rank", 0.95, None))):
            s = d[d["series"] == name].sort_values("layer")
            if not len(s):
                continue
            x = s["layer"].to_numpy(float) + (j - 0.5) * 0.38
            m = s["mean"].to_numpy(float)
            ax.bar(x, m, width=0.36, color=colors[a], alpha=alpha, hatch=hatch, zorder=2, edgecolor=colors[a], lw=0.8)
            if (s["n"] > 1).any():
                max_n = max(max_n, int(s["n"].max()))
                ax.errorbar(
                    x,
                    m,
                    yerr=ci_err(m, s["lo"].to_numpy(float), s["hi"].to_numpy(float)),
                    fmt="none",
                    ecolor="0.2",
                    elinewidth=0.9,
                    capsize=1.5,
                    zorder=3,
                )
        if head_dim:
            ax.axhline(head_dim, color=REFERENCE, ls="--", lw=1, zorder=1)
        ax.set_ylim(0, top)
        ax.set_xlim(-0.7, n_layers - 0.3)
        if n_layers <= 32:
            ax.set_xticks(range(n_layers))
        ax.set_xlabel("layer")
        when = f" at {fmt_count(tokens[a])}" if tokens and a in tokens else ""
        seeds = f", {seeds_text(n_seeds[a])}" if n_seeds and a in n_seeds else ""
        ax.set_title(f"{a}{when}{seeds}", fontsize=10)
        ax.grid(axis="y", alpha=0.25, zorder=0)
        ax.spines[["top", "right"]].set_visible(False)
    for ax in axes[len(arms) :]:
        ax.set_visible(False)
    axes[0].set_ylabel("dimensions")
    handles = [Patch(facecolor="0.5", alpha=0.35, edgecolor="0.5"), Patch(facecolor="0.5", alpha=0.95)]
    labels = ["key PR (spectral spread of the keys)", "functional rank (fewest directions keeping the loss within 1%)"]
    if head_dim:
        handles.append(Line2D([], [], color=REFERENCE, ls="--"))
        labels.append(f"head dim {head_dim}")
    fig.legend(handles, labels, loc="outside lower center", ncols=len(handles), frameon=False, fontsize=9)
    save(fig, path)
    caption = (
        "Functional rank of the keys (the smallest projection rank r of each head's keys that keeps the "
        "loss within 1%: the dimensions the model actually uses; solid) next to the key PR (pale), per "
        "layer at the last point where functional rank was measured; "
        + (
            "bars are means over seeds, whiskers 95% t-intervals over seeds"
            if max_n > 1
            else "one seed, no interval possible"
        )
        + "; shared y-axis."
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
    layer's line crosses the dashed 1% threshold.

    `curves[arm]`: rows (layer, r, value).
    """
    arms = [a for a in arms if a in curves and len(curves[a])]
    if not arms:
        return None
    n_layers = int(max(c["layer"].max() for c in curves.values() if len(c))) + 1
    ncols = min(len(arms), 3)
    nrows = int(np.ceil(len(arms) / ncols))
    fig = Figure(figsize=(4.6 * ncols + 0.9, 3.4 * nrows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharey=True, squeeze=False)).ravel()
    cmap = matplotlib.colormaps["viridis"]
    norm = matplotlib.colors.Normalize(vmin=0, vmax=max(n_layers - 1, 1))
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
    axes[0].set_ylabel("relative loss increase")
    sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
    cb = fig.colorbar(sm, ax=list(axes[: len(arms)]), pad=0.01, aspect=30)
    cb.locator = MaxNLocator(integer=True)  # layers are whole numbers
    cb.update_ticks()
    cb.set_label("layer")
    save(fig, path)
    caption = (
        "Rank sweep of the keys: the relative loss increase when each head's keys are projected onto their "
        "top-r principal directions, against r (log scale), one line per layer (colour), mean over seeds; "
        f"dashed red: the {threshold:.0%} threshold that defines the functional rank; y-axis symlog "
        "(linear near 0)."
    )
    return Plot(path, caption)


# --- 4. one model's layers x heads (`rankscope analyze`) ---------------------------------------------


__all__ = ["plot_layer_pr", "plot_diagnosis", "plot_functional_rank", "plot_rank_sweep"]
