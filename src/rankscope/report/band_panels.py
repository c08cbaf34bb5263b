"""What every panel over training shares: a mean line per arm with its 95% t band over seeds,
y-limits fitted to the lines (bands cut rather than flattening them), the late-training zoom of a
loss panel, and the caption and legend words for each. Used by `curves.py` and `rank_scatter.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator, NullFormatter

from ..settings.units import fmt_count
from .format import seeds_text
from .plotstyle import SMALL, TokenFormatter, min_span_limits, token_locator

BAND_WORDS = "shaded bands: 95% t-intervals over seeds"


def band_clause(max_n: int) -> str:
    """What the shading means, for a caption: bands over seeds, or why there are none."""
    if max_n >= 2:
        # Bands are per arm; the arm comparisons are paired. Say so, or overlapping bands get read as "no difference".
        return (
            f"lines are the mean over seeds, {BAND_WORDS} (Student t on the seed values at each eval point); "
            "two arms' bands can overlap although their seed-by-seed difference is clear, because a seed "
            "shifts every arm alike — the paired comparisons in the tables are the test"
        )
    return "one seed per arm, so no band: no interval over seeds is possible"


def empty_panel(ax, text: str) -> None:
    """A panel whose data is not there yet: say so, without meaningless 0..1 ticks."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def band_panel(ax, stats: pd.DataFrame, arms: Sequence[str], colors: dict, *, markers: bool = False) -> None:
    """Mean line per arm and its 95% t band over seeds where two or more seeds have the point.

    Where fewer than two seeds reach a point (one seed diverged) the band stops instead of
    pretending to an interval; a lone point (a single eval point) gets a marker so it is visible.
    """
    for a in arms:
        s = stats[stats["arm"] == a].sort_values("tokens")
        if not len(s):
            continue
        x = s["tokens"].to_numpy(float)
        ax.plot(
            x,
            s["mean"].to_numpy(float),
            color=colors[a],
            lw=1.8,
            label=a,
            marker="o" if markers or len(s) == 1 else None,
            ms=3 if len(s) > 1 else 5,
        )
        if (s["n"] > 1).any() and "lo" in s:
            lo, hi = s["lo"].to_numpy(float), s["hi"].to_numpy(float)
            ok = np.isfinite(lo) & np.isfinite(hi)
            ax.fill_between(x, np.where(ok, lo, np.nan), np.where(ok, hi, np.nan), color=colors[a], alpha=0.2, lw=0)


def dropout_clause(*stats: pd.DataFrame) -> str:
    """Say so when an arm's seed count changes along its curve (a run diverged, stopped or is still
    going): its mean then averages other seeds from that point on, and can jump for that reason alone."""
    for s in stats:
        if len(s) and (s.groupby("arm")["n"].nunique() > 1).any():
            return (
                "; where an arm's seed count drops along the curve (a run diverged or stopped), its mean and "
                "band cover fewer seeds from there on and can jump for that reason alone"
            )
    return ""


# The least y-span of a panel whose measure barely moves, beyond `plotstyle.MIN_REL_SPAN` of its
# level: induction scores lie in [0, 1] and the ICL score near 0 nats, where a relative rule is void.
MIN_SPAN = {"induction_score": 0.1, "induction_max": 0.1, "icl_score": 0.05}
ZERO_FLOOR = {"induction_score", "induction_max"}  # scores that cannot go below 0


def fit_to_lines(
    ax,
    stats: pd.DataFrame,
    excess: float = 0.35,
    *,
    include: Sequence[float] = (),
    min_span: float = 0.0,
    floor: float | None = None,
) -> bool:
    """Scale the y-axis to the mean lines, letting bands reach at most `excess` of the lines' range
    beyond them; return True if some band was cut. With two seeds a 95% t band is ±12.7 standard
    errors wide, and left to autoscaling one such band flattens every line in the panel.

    `include`: levels kept in view (a chance line). A near-constant panel is widened to
    `plotstyle.min_span_limits` (at least 2% of its level, and `min_span`), never below `floor`, so
    its noise is not drawn as a trend."""
    m = stats["mean"].to_numpy(float)
    m = m[np.isfinite(m)]
    if not len(m):
        return False
    lo_m, hi_m = float(m.min()), float(m.max())
    span = hi_m - lo_m if hi_m > lo_m else max(abs(hi_m) * 0.1, 1e-3)
    lo_b = np.nanmin(np.append(stats["lo"].to_numpy(float), lo_m)) if "lo" in stats else lo_m
    hi_b = np.nanmax(np.append(stats["hi"].to_numpy(float), hi_m)) if "hi" in stats else hi_m
    lo, hi = max(lo_b, lo_m - excess * span), min(hi_b, hi_m + excess * span)
    cut = bool(lo_b < lo or hi_b > hi)
    for level in include:
        if np.isfinite(level):
            lo, hi = min(lo, level), max(hi, level)
    lo, hi = min_span_limits(lo, hi, min_span=min_span)
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    if floor is not None and lo < floor <= lo_m:
        lo, hi = floor, hi + (floor - lo)
    ax.set_ylim(lo, hi)
    return cut


CUT_WORDS = "; bands running past an axis are cut at its edge (the scale follows the means)"


def legend_labels(arms: Sequence[str], seeds: dict[str, int]) -> list[str]:
    """Each arm's legend entry: its name and seed count, or that it has no data yet."""
    return [f"{a} ({seeds_text(seeds[a])})" if seeds.get(a) else f"{a} (no data yet)" for a in arms]


INSET = (0.42, 0.4, 0.55, 0.52)  # where a loss panel's late-training inset sits, in axes fractions


def zoom_loss(ax, stats: pd.DataFrame, arms: Sequence[str], colors: dict, log: bool) -> str:
    """Make the late-training loss gap readable; return the caption clause saying how.

    The loss falls from about ln(vocab) to within a few hundredths between arms, so at full scale
    the arms' curves merge. When the late curve sits in the bottom third of the axis, the empty
    upper right gets an inset of late training (the second half of the tokens on a linear axis;
    the last third of the eval points on a log axis, where the second half of the tokens can be
    just two points) with its own loss scale; otherwise the axis is cut to the range after the
    first 10% of training.
    """
    grid = np.sort(stats["tokens"].unique())
    top_t = float(grid.max()) if len(grid) else 0.0
    if top_t <= 0 or len(grid) < 4:
        return ""
    start = float(grid[-max(3, len(grid) // 3)]) if log else 0.5 * top_t
    late = stats[stats["tokens"] >= start]
    if late["tokens"].nunique() < 3:
        return ""
    lo_col = stats["lo"].fillna(stats["mean"])
    hi_col = stats["hi"].fillna(stats["mean"])
    lo, hi = ax.get_ylim()
    tail = stats["tokens"] >= (start if log else 0.35 * top_t)
    if (((hi_col[tail] - lo) / (hi - lo)) <= 0.33).all():
        inset = ax.inset_axes(INSET)
        band_panel(inset, late, arms, colors, markers=log)
        a = float(lo_col[late.index].min())
        b = float(hi_col[late.index].max())
        pad = 0.08 * (b - a) if b > a else 0.01
        inset.set_ylim(*min_span_limits(a - pad, b + pad))
        if log:
            inset.set_xscale("log")
            inset.set_xlim(start / 1.1, top_t * 1.1)
            inset.xaxis.set_minor_formatter(NullFormatter())
        else:
            inset.xaxis.set_major_locator(token_locator(nbins=4))
        inset.xaxis.set_major_formatter(TokenFormatter(log=log))
        inset.yaxis.set_major_locator(MaxNLocator(nbins=5))
        inset.tick_params(labelsize=SMALL)
        inset.grid(alpha=0.25)
        what = f"from {fmt_count(start)} tokens" if log else "second half"
        # on white: a reference line of the panel may run behind it
        inset.set_title(f"{what}, zoomed", fontsize=SMALL, backgroundcolor="white")
        return (
            f"; inset: training from {fmt_count(start)} tokens with its own loss scale"
            if log
            else "; inset: the second half of training with its own loss scale"
        )
    after = stats["tokens"] >= (float(grid[len(grid) // 10]) if log else 0.1 * top_t)
    a, b = float(lo_col[after].min()), float(hi_col[after].max())
    if stats.loc[after, "tokens"].nunique() >= 3 and (hi - lo) > 3 * (b - a):
        pad = 0.06 * (b - a) if b > a else 0.05
        ax.set_ylim(*min_span_limits(a - pad, b + pad))
        return "; loss axis cut to the range after the first 10% of training"
    return ""
