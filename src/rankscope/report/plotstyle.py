"""What every figure of the report shares: the `Plot` it returns, one colour per arm, file-name
stems, saving, the axes' house style, its sizes, and the helpers that keep scales honest
(token ticks, minimum y-spans, labelled reference lines).

Figures are built on `matplotlib.figure.Figure` directly, never through pyplot: no global backend
is switched (a notebook importing rankscope keeps its inline backend), no figure is left open in
pyplot's registry, and saving renders with Agg whatever the session's backend is. Each figure
function returns a `Plot` (path and a caption that says what the figure shows, bands included) or
None when its data is absent, so the report never embeds an empty axis.

Sizes: report.html shows every figure at its natural size, one figure inch as `DISPLAY_DPI` CSS
pixels (`blocks.py` reads the size from the PNG), so a figure is designed at the size it is read:
at most `MAX_WIDTH_IN` wide (the HTML's text column) and text no smaller than `SMALL` points
(10 px at 80 px per inch; tick labels at matplotlib's 10 pt are 11 px). PNGs are written at
`DPI` = twice that, sharp on high-density screens.

Uncertainty is drawn the same way everywhere: a line or bar is the mean over seeds and its band or
whisker the 95% Student t interval of that mean over seeds (not min-max, not ± sd: an interval for
the quantity the reader compares), and captions say so — or say that one seed allows none.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import Formatter, MaxNLocator

from ..storage import fsio

if TYPE_CHECKING:
    from matplotlib.axes import Axes
from ..settings.units import fmt_count_ticks
from .blocks import DISPLAY_DPI

DPI = 2 * DISPLAY_DPI  # pixels per figure inch in the PNG: two per displayed CSS pixel
MAX_WIDTH_IN = 14.0  # the HTML's text column (about 1130 px) at DISPLAY_DPI
SMALL = 9.0  # points: the smallest text of any figure (annotations, legends, inset ticks)
REFERENCE = "0.45"  # grey for reference lines (head dim, arm mean)
CHANCE = "0.3"  # chance and floor levels: dark grey, dashed, labelled
FLAG = "#d62728"  # collapsed layers


@dataclass(frozen=True)
class Plot:
    path: Path
    caption: str


def arm_colors(
    arms: Iterable[str], grid: dict[str, tuple[int, int]] | None = None, shape: tuple[int, int] = (0, 0)
) -> dict[str, tuple[float, ...]]:
    """One colour per arm, fixed by the arm's position in the study so every figure agrees. For
    arms that cross two settings (`grid`: arm -> (level of the first, level of the second), with
    `shape` levels of each), a hue per level of the first and a shade per level of the second, so
    the eye groups them as the study does."""
    arms = list(arms)
    families = ("Blues", "Oranges", "Greens", "Purples", "Reds", "Greys")
    if grid and set(arms) <= set(grid) and shape[0] <= len(families):
        nb = max(shape[1], 1)
        return {a: matplotlib.colormaps[families[grid[a][0]]](0.95 - 0.4 * grid[a][1] / max(nb - 1, 1)) for a in arms}
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


def save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # through a temporary file: a report written while another shard writes one never tears a figure
    with fsio.atomic_open(path) as f:
        fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=DPI)
    return path


def new_figure(width: float, height: float) -> Figure:
    """A constrained-layout figure no wider than the HTML's text column (`MAX_WIDTH_IN`): one that
    would be wider is narrowed, never shown shrunk."""
    return Figure(figsize=(min(float(width), MAX_WIDTH_IN), float(height)), layout="constrained")


def style_axes(ax) -> None:
    ax.grid(alpha=0.25)
    ax.spines[["top", "right"]].set_visible(False)


class TokenFormatter(Formatter):
    """Tick labels of a token axis (`units.fmt_count_ticks`): on a linear axis one unit for every
    tick in view and the fewest decimals that tell them apart (0, 50k, 100k, 150k); on a log axis
    each tick its own unit (0, 10k, 100k, 1M)."""

    def __init__(self, log: bool = False):
        self.log = log

    def __call__(self, x, pos=None) -> str:
        return fmt_count_ticks([x], log=True)[0]

    def format_ticks(self, values) -> list[str]:
        values = [float(v) for v in values]
        self.set_locs(values)
        if self.log or self.axis is None:
            return fmt_count_ticks(values, log=self.log)
        lo, hi = sorted(self.axis.get_view_interval())
        eps = 1e-9 * max(abs(lo), abs(hi), 1.0)
        shown = [i for i, v in enumerate(values) if lo - eps <= v <= hi + eps]  # ticks past the view are not drawn
        labels = [""] * len(values)
        for i, text in zip(shown, fmt_count_ticks([values[i] for i in shown])):
            labels[i] = text
        return labels


def token_locator(nbins: int = 6) -> MaxNLocator:
    """Round token ticks on a linear axis: multiples of 1, 2, 2.5 or 5 times a power of ten."""
    return MaxNLocator(nbins=nbins, steps=[1, 2, 2.5, 5, 10])


MIN_REL_SPAN = 0.02  # a panel's y-range is at least this share of its data's level


def min_span_limits(
    lo: float, hi: float, *, min_span: float = 0.0, rel: float = MIN_REL_SPAN, floor: float | None = None
) -> tuple[float, float]:
    """Y-limits (lo, hi) widened, around their middle, to at least `rel` x |middle| and `min_span`,
    so a near-constant series reads as flat instead of its noise filling the panel. `floor`: a
    value no limit goes below (0 or 1 for a count of dimensions); the span is kept by moving up."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return lo, hi
    lo, hi = min(lo, hi), max(lo, hi)
    need = max(rel * abs((lo + hi) / 2), min_span)
    if hi - lo < need:
        mid = (lo + hi) / 2
        lo, hi = mid - need / 2, mid + need / 2
    if floor is not None and lo < floor:
        hi, lo = hi + (floor - lo), floor
    return lo, hi


def reference_line(
    ax, level: float, label: str, *, color: str = CHANCE, where: str = "right", lw: float = 1.0, ls: str = "--"
) -> None:
    """A dashed horizontal line at `level` labelled `label`: just above it inside the panel at its
    "right" or "left" end, or in the right "margin" beside it (where no data, inset or legend can
    sit under it; keep such labels short: "chance\n8.32"). Nothing is written when the level is off
    the panel. Call it after the y-limits are set."""
    ax.axhline(level, color=color, ls=ls, lw=lw, zorder=1.5)
    lo, hi = sorted(ax.get_ylim())
    if not lo <= level <= hi:
        return
    if where == "margin":
        ax.annotate(
            label,
            (1.0, level),
            xycoords=("axes fraction", "data"),
            xytext=(3, 0),
            textcoords="offset points",
            ha="left",
            va="center",
            fontsize=SMALL,
            color=color,
            annotation_clip=False,
        )
        return
    near_top = (hi - level) < 0.08 * (hi - lo)
    ax.annotate(
        label,
        (0.995 if where == "right" else 0.005, level),
        xycoords=("axes fraction", "data"),
        xytext=(0, -2 if near_top else 2),
        textcoords="offset points",
        ha="right" if where == "right" else "left",
        va="top" if near_top else "bottom",
        fontsize=SMALL,
        color=color,
        zorder=5,
        bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5, "alpha": 0.75},
    )


CORNERS = ("upper left", "upper right", "lower left", "lower right")


def quiet_corner(
    ax, width: float = 0.4, height: float = 0.2, avoid: Iterable[tuple[float, float, float, float]] = ()
) -> str:
    """The corner of `ax` (one of `CORNERS`) whose `width` x `height` box (axes fractions) holds the
    fewest drawn data points (lines and scatter points); a corner overlapping a box of `avoid`
    (x0, y0, width, height in axes fractions: an inset) comes last. Call it after the axis limits
    are set."""
    avoid = list(avoid)
    to_axes = ax.transAxes.inverted()
    pts = []
    for line in ax.get_lines():
        if line.get_transform() == ax.transData and len(line.get_xydata()):
            xy = np.asarray(line.get_xydata(), float)
            if len(xy) > 1:  # the segments between eval points too, not just the points
                t = np.linspace(0, 1, 8)[:-1]
                seg = xy[:-1, None, :] * (1 - t)[None, :, None] + xy[1:, None, :] * t[None, :, None]
                xy = np.vstack([seg.reshape(-1, 2), xy[-1:]])
            pts.append(to_axes.transform(ax.transData.transform(xy)))
    for coll in ax.collections:
        offsets = np.asarray(coll.get_offsets(), float)
        if coll.get_offset_transform() == ax.transData and offsets.ndim == 2 and len(offsets):
            pts.append(to_axes.transform(ax.transData.transform(offsets)))
    xy = np.vstack(pts) if pts else np.zeros((0, 2))
    xy = xy[np.isfinite(xy).all(axis=1)]

    def box(loc: str) -> tuple[float, float, float, float]:
        x0 = 0.0 if "left" in loc else 1.0 - width
        y0 = 1.0 - height if "upper" in loc else 0.0
        return x0, y0, x0 + width, y0 + height

    def crowd(loc: str) -> float:
        x0, y0, x1, y1 = box(loc)
        n = float(((xy[:, 0] >= x0) & (xy[:, 0] <= x1) & (xy[:, 1] >= y0) & (xy[:, 1] <= y1)).sum())
        for bx0, by0, bw, bh in avoid:
            if bx0 < x1 and bx0 + bw > x0 and by0 < y1 and by0 + bh > y0:
                n += 1e6
        return n

    return min(CORNERS, key=crowd)


def corner_note(ax, text: str, *, loc: str = "upper left", avoid: Iterable = ()) -> None:
    """A short boxed note in a corner of the panel, e.g. "at chance" for a measure that never left
    it; `loc` "best": the corner with the least data in it and clear of `avoid` (`quiet_corner`)."""
    if loc == "best":
        loc = quiet_corner(ax, avoid=avoid)
    x = 0.02 if "left" in loc else 0.98
    y = 0.97 if "upper" in loc else 0.03
    ax.text(
        x,
        y,
        text,
        transform=ax.transAxes,
        ha="left" if "left" in loc else "right",
        va="top" if "upper" in loc else "bottom",
        fontsize=SMALL,
        color="0.15",
        zorder=6,
        bbox={"facecolor": "#fff4d6", "edgecolor": "0.6", "boxstyle": "round,pad=0.3", "lw": 0.6},
    )


def ci_err(means: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Whisker lengths (below, above) of 95% intervals for `errorbar`; none where there is no interval."""
    lo = np.where(np.isfinite(lo), lo, means)
    hi = np.where(np.isfinite(hi), hi, means)
    return np.vstack([means - lo, hi - means])


def bar_label(ax: Axes, x: float, y: float, top: float, ymax: float, text: str) -> None:
    """A bar's value printed above its whisker (`top`), or on the bar, boxed over the whisker, when
    the whisker nears the panel's top (two seeds: t = 12.7), where the label would meet the title."""
    clipped = top > 0.92 * ymax  # the label's height is about 8% of a panel
    box = dict(facecolor="white", edgecolor="none", pad=0.3, alpha=0.85) if clipped else None
    kw = dict(textcoords="offset points", ha="center", va="bottom", fontsize=SMALL, bbox=box, zorder=4)
    ax.annotate(text, (x, y if clipped else top), xytext=(0, 2), **kw)


def ci_bars(ax: Axes, x: np.ndarray, stats: Any, width: float, **bar_kw: Any) -> np.ndarray:
    """Bars of `stats`' "mean" at x, with whiskers of its 95% interval ("lo", "hi") when any bar
    stands on more than one seed ("n"); returns the top of each bar or whisker (for labels)."""
    means = stats["mean"].to_numpy(float)
    ax.bar(x, means, width=width, zorder=2, **bar_kw)
    if not (stats["n"] > 1).any():
        return means
    err = ci_err(means, stats["lo"].to_numpy(float), stats["hi"].to_numpy(float))
    ax.errorbar(x, means, yerr=err, fmt="none", ecolor="0.2", elinewidth=0.9, capsize=1.5, zorder=3)
    return means + err[1]


__all__ = [
    "bar_label",
    "ci_bars",
    "DPI",
    "MAX_WIDTH_IN",
    "SMALL",
    "REFERENCE",
    "CHANCE",
    "FLAG",
    "Plot",
    "arm_colors",
    "safe_names",
    "save",
    "new_figure",
    "style_axes",
    "TokenFormatter",
    "token_locator",
    "MIN_REL_SPAN",
    "min_span_limits",
    "reference_line",
    "CORNERS",
    "quiet_corner",
    "corner_note",
    "ci_err",
]
