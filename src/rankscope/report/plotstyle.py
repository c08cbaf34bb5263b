"""What every figure of the report shares: the `Plot` it returns, one colour per arm, file-name
stems, saving, and the axes' house style.

Figures are built on `matplotlib.figure.Figure` directly, never through pyplot: no global backend
is switched (a notebook importing rankscope keeps its inline backend), no figure is left open in
pyplot's registry, and saving renders with Agg whatever the session's backend is. Each figure
function returns a `Plot` (path and a caption that says what the figure shows, bands included) or
None when its data is absent, so the report never embeds an empty axis.

Uncertainty is drawn the same way everywhere: a line or bar is the mean over seeds and its band or
whisker the 95% Student t interval of that mean over seeds (not min-max, not ± sd: an interval for
the quantity the reader compares), and captions say so — or say that one seed allows none.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from .. import fsio

DPI = 150
REFERENCE = "0.45"  # grey for reference lines (head dim, arm mean)
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


def style_axes(ax) -> None:
    ax.grid(alpha=0.25)
    ax.spines[["top", "right"]].set_visible(False)


def ci_err(means: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Whisker lengths (below, above) of 95% intervals for `errorbar`; none where there is no interval."""
    lo = np.where(np.isfinite(lo), lo, means)
    hi = np.where(np.isfinite(hi), hi, means)
    return np.vstack([means - lo, hi - means])


__all__ = ["DPI", "REFERENCE", "FLAG", "Plot", "arm_colors", "safe_names", "save", "style_axes", "ci_err"]
