"""Mean key PR against each downstream measure, one panel each: every eval point after token 0 as a
faint dot and each run's last point as a large marker, so the eye sees what the correlation table
summarises (and how much of it is training progress). The house style is in `plotstyle.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from ..settings.units import fmt_count
from .band_panels import MIN_SPAN, ZERO_FLOOR
from .format import fmt_p, signed
from .plotstyle import Plot, min_span_limits, new_figure, reference_line, save, style_axes
from .quantities import ChanceLevel, Quantity


def _off_panel_words(sides: dict[str, set[str]]) -> str:
    """Where the points that zoomed panels leave out lie, from what was drawn: {panel label:
    {"above", "below"}} -> 'earlier points lie above their top edges', per panel where they differ."""

    def where(side: set[str], many: bool) -> str:
        edge = {"above": "above {} top edge{}", "below": "below {} bottom edge{}"}
        return " or ".join(
            edge[s].format("their" if many else "its", "s" if many else "") for s in ("above", "below") if s in side
        )

    kinds = {frozenset(v) for v in sides.values()}
    if len(kinds) == 1:
        return f"earlier points lie {where(set(next(iter(kinds))), len(sides) > 1)}"
    return "; ".join(f"in {label}, earlier points lie {where(side, False)}" for label, side in sides.items())


def plot_rank_scatter(
    frame: pd.DataFrame,
    targets: Sequence[Quantity],
    arms: list[str],
    colors: dict,
    path: Path,
    *,
    stats: dict[str, tuple[float, float, int]] | None = None,
    x_label: str = "mean key PR",
    chance: dict[str, ChanceLevel] | None = None,
) -> Plot | None:
    """Mean key PR (x) against each downstream measure (one panel each): every eval point after
    token 0 as a small faint dot, each run's last point as a large marker. The eye should see what
    the correlation table summarises, including how much of it is training progress. `chance`:
    quantity key -> chance level, drawn where it falls inside the panel."""
    targets = [q for q in targets if q.key in frame and frame[q.key].notna().any()]
    data = frame[(frame["tokens"] > 0) & np.isfinite(frame["x"])]
    if not targets or not len(data):
        return None
    chance = chance or {}
    k = len(targets)
    ncols = min(k, 3)
    nrows = int(np.ceil(k / ncols))
    fig = new_figure(4.4 * ncols, 3.4 * nrows + 0.6)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    grid = np.sort(data["tokens"].unique())
    late_from = float(grid[-max(3, len(grid) // 3)]) if len(grid) >= 6 else float(grid[0])
    off_panel: dict[str, set[str]] = {}  # zoomed panel -> where its left-out points lie
    drawn_chance = []
    for ax, q in zip(axes, targets):
        ends_all = []
        for a in arms:
            sub = data[(data["arm"] == a) & np.isfinite(data[q.key])]
            if not len(sub):
                continue
            ax.scatter(sub["x"], sub[q.key], s=6, color=colors[a], alpha=0.3, linewidths=0)
            ends = sub.sort_values("tokens").groupby("seed").tail(1)
            ends_all.append(ends[q.key].to_numpy(float))
            ax.scatter(ends["x"], ends[q.key], s=40, color=colors[a], edgecolors="black", linewidths=0.7, zorder=3)
        # losses fall from ln(vocab): at full scale every run end sits on one line at the bottom, so
        # loss panels show late training and let the early points fall off (said in the caption)
        y = data[q.key].to_numpy(float)
        late = data.loc[data["tokens"] >= late_from, q.key].to_numpy(float)
        late = np.concatenate([late] + ends_all)
        late, y = late[np.isfinite(late)], y[np.isfinite(y)]
        if q.key.endswith("_loss") and len(late) and np.ptp(y) > 3 * max(np.ptp(late), 1e-12):
            pad = 0.1 * np.ptp(late) if np.ptp(late) > 0 else 0.01
            lo, hi = min_span_limits(late.min() - pad, late.max() + pad)  # zoomed, but noise is not a trend
            ax.set_ylim(lo, hi)
            side = {"above"} if (y > hi).any() else set()
            side |= {"below"} if (y < lo).any() else set()
            if side:
                off_panel[q.label] = side
        else:  # a measure that barely moved: its noise must not fill the panel (see `band_panels.fit_to_lines`)
            lo, hi = ax.get_ylim()
            ax.set_ylim(
                *min_span_limits(lo, hi, min_span=MIN_SPAN.get(q.key, 0.0), floor=0.0 if q.key in ZERO_FLOOR else None)
            )
        level = chance.get(q.key)
        if level is not None:
            lo, hi = sorted(ax.get_ylim())
            if lo <= level.value <= hi:  # the scale follows the runs: a chance line never stretches it
                reference_line(ax, level.value, level.short, where="margin")
                drawn_chance.append(f"{q.label}: {level.kind} {level.label}")
        title = q.label
        if stats and q.key in stats:
            r, p, n = stats[q.key]
            if np.isfinite(r):
                title += f"\nrun ends: r = {signed(r, 2)}, {fmt_p(p)}, n = {n}"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(x_label)
        ax.set_ylabel(q.label + (f" ({q.unit})" if q.unit else ""))
        style_axes(ax)
    for ax in axes[k:]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=colors[a], marker="o", ls="", mec="black", ms=6) for a in arms]
    fig.legend(handles, arms, loc="outside lower center", ncols=min(len(arms), 5), frameon=False)
    save(fig, path)
    caption = (
        f"{x_label[0].upper() + x_label[1:]} (x) against each downstream measure: small faint dots are every "
        "eval point after token 0 (points of one run are not independent, and both axes drift with training "
        "time); large dots are "
        "each run's last eval point (one per run), the points behind the 'run ends' correlations"
        + (
            f"; the loss panels ({', '.join(off_panel)}) show late training, from {fmt_count(late_from)} tokens — "
            + _off_panel_words(off_panel)
            if off_panel
            else ""
        )
        + (f"; dashed grey: chance levels ({'; '.join(drawn_chance)})" if drawn_chance else "")
        + "."
    )
    return Plot(path, caption)
