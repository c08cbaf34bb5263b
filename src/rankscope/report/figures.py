"""Which figures a study report draws, in report order, and the scales they share across arms.

The data comes summarised from `analysis.figure_data`; the drawing is in `curves.py` (over
training) and `layer_plots.py` (across layers). A figure whose data is absent is left out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..vocab import site_description
from .analysis import ReportNumbers, figure_data
from .curves import plot_downstream, plot_loss_pr, plot_rank_scatter
from .heatmaps import plot_pr_heatmap
from .layer_plots import plot_diagnosis, plot_functional_rank, plot_layer_pr, plot_rank_sweep
from .layers import collapse_rule
from .plotstyle import Plot, arm_colors, safe_names
from .quantities import counts_dimensions, quantity_name


def _bars_top(bars: pd.DataFrame, head_dim: int | None) -> float:
    """One y-range for every arm's per-layer bars: set by the bars, with room for the value printed
    over each; whiskers may reach a little above the bars, never set the scale."""
    means = bars["mean"].to_numpy(float) if len(bars) else np.array([1.0])
    ymax = float(np.nanmax(means)) if np.isfinite(means).any() else 1.0
    hi = bars["hi"].to_numpy(float) if len(bars) else np.array([])
    if np.isfinite(hi).any():
        ymax = max(ymax, min(float(np.nanmax(hi)), ymax * 1.25))
    return max(ymax, head_dim or 0) * 1.1


def _colour_range(grid: pd.DataFrame) -> tuple[float, float]:
    """One colour scale for every arm's heatmap."""
    vmin, vmax = float(np.nanmin(grid["value"])), float(np.nanmax(grid["value"]))
    if not vmax > vmin:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    return vmin, vmax


def draw_figures(numbers: ReportNumbers, plots_dir: Path) -> list[Plot]:
    """Every figure the data allows, in report order."""
    study, site, metric = numbers.study, numbers.site, numbers.metric
    data = figure_data(numbers)
    grid = numbers.grid and {
        arm: (numbers.grid.a.levels.index(la), numbers.grid.b.levels.index(lb))
        for (la, lb), arm in numbers.grid.cells.items()
    }
    shape = (len(numbers.grid.a.levels), len(numbers.grid.b.levels)) if numbers.grid else (0, 0)
    arms, colors, stems = study.arms, arm_colors(study.arms, grid, shape), safe_names(study.arms)
    head_dim = numbers.head_dim if counts_dimensions(metric) else None
    quantity = quantity_name(site, metric)
    drawn: list[Plot | None] = []

    drawn.append(
        plot_loss_pr(
            data.loss,
            data.probe,
            arms,
            colors,
            plots_dir / "loss_pr.png",
            head_dim=head_dim,
            quantity=quantity,
            site_text=site_description(site),
            seeds=data.seeds,
        )
    )
    if data.downstream:
        drawn.append(
            plot_downstream(data.downstream, arms, colors, plots_dir / "downstream.png", seeds=data.downstream_seeds)
        )
    # why do some layers collapse: one figure per arm, each quantity's y-range shared by all arms
    for d in numbers.diagnoses:
        drawn.append(
            plot_diagnosis(
                d.arm,
                d.panels,
                colors[d.arm],
                plots_dir / f"diagnosis_{stems[d.arm]}.png",
                tokens=d.tokens,
                n_seeds=d.n_seeds,
                n_layers=numbers.n_layers,
                flagged=d.flagged,
                flag_rule=collapse_rule(),
            )
        )
    if data.functional_rank:
        drawn.append(
            plot_functional_rank(
                data.functional_rank,
                arms,
                colors,
                plots_dir / "functional_rank.png",
                head_dim=numbers.head_dim,
                tokens=data.functional_rank_tokens,
                n_seeds=data.functional_rank_seeds,
            )
        )
        drawn.append(
            plot_rank_sweep(data.rank_sweep, arms, plots_dir / "rank_sweep.png", tokens=data.functional_rank_tokens)
        )
    if data.scatter_targets and len(data.scatter):
        drawn.append(
            plot_rank_scatter(
                data.scatter,
                data.scatter_targets,
                arms,
                colors,
                plots_dir / "pr_vs_downstream.png",
                stats=data.scatter_stats,
                x_label=quantity,
            )
        )
    if len(data.layer_grid):
        ymax = _bars_top(data.layer_bars, head_dim)
        for a in arms:
            drawn.append(
                plot_layer_pr(
                    data.layer_bars[data.layer_bars["arm"] == a],
                    a,
                    colors[a],
                    plots_dir / f"layer_pr_{stems[a]}.png",
                    ymax=ymax,
                    head_dim=head_dim,
                    quantity=quantity,
                )
            )
        vmin, vmax = _colour_range(data.layer_grid)
        for a in arms:
            drawn.append(
                plot_pr_heatmap(
                    data.layer_grid[data.layer_grid["arm"] == a],
                    a,
                    plots_dir / f"pr_heatmap_{stems[a]}.png",
                    vmin=vmin,
                    vmax=vmax,
                    quantity=quantity,
                    n_seeds=data.layer_seeds[a],
                )
            )
    return [p for p in drawn if p]


__all__ = ["draw_figures"]
