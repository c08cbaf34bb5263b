"""Which figures a study report draws, in report order, and what they share across arms: scales,
chance and floor levels, and which arms are still at them.

The data comes summarised from `analysis.figure_data`; the drawing is in `curves.py` (over
training), `rank_scatter.py` (rank against downstream), `heatmaps.py` (layers over training) and
`layer_plots.py` (across layers). A figure whose
data is absent is left out. Arms are drawn together (overlaid, or side by side on shared scales) so
they are compared without scrolling: the figures that used to come one per arm are now one
`<kind>_arms.png` each (the diagnosis continues in `diagnosis_arms_2.png` and on when more arms
than fit the page width).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..settings.vocab import site_description
from .analysis import ReportNumbers, figure_data
from .curves import plot_downstream, plot_loss_pr
from .heatmaps import plot_pr_heatmaps
from .kv_headroom import PLOT as KV_PLOT
from .kv_headroom import plot_kv_headroom
from .layer_contrasts import PLOT as LAYER_CONTRASTS_PLOT
from .layer_contrasts import plot_layer_contrasts
from .layer_plots import (
    DiagColumn,
    diagnosis_groups,
    plot_diagnosis,
    plot_functional_rank,
    plot_layer_pr,
    plot_rank_sweep,
)
from .layer_tables import collapse_rule
from .plotstyle import Plot, arm_colors
from .quantities import (
    AT,
    KEY_FUNCTIONAL_RANK,
    WORSE,
    ChanceLevel,
    chance_level,
    chance_state,
    counts_dimensions,
    quantity_name,
    still_at_chance,
)
from .rank_scatter import plot_rank_scatter
from .series import choose_points, seed_values
from .trajectory import plot_contrast_trajectories


def _bars_top(bars: pd.DataFrame, head_dim: int | None) -> float:
    """One y-range for every arm's per-layer bars: set by the bars, with room for the value printed
    over each; whiskers may reach a little above the bars, never set the scale."""
    means = bars["mean"].to_numpy(float) if len(bars) else np.array([1.0])
    ymax = float(np.nanmax(means)) if np.isfinite(means).any() else 1.0
    hi = bars["hi"].to_numpy(float) if len(bars) else np.array([])
    if np.isfinite(hi).any():
        ymax = max(ymax, min(float(np.nanmax(hi)), ymax * 1.25))
    return max(ymax, head_dim or 0) * 1.1


def arms_at_chance(numbers: ReportNumbers, key: str) -> dict[str, str]:
    """The arms whose quantity `key` has not moved past its chance or floor level at their end,
    each with its `quantities.chance_state` (AT or WORSE) on the seed values at its last point."""
    series = numbers.series.get(key)
    if series is None or not len(series):
        return {}
    _, ends = choose_points(series, numbers.study.arms, numbers.study.finished)
    out = {}
    for arm, end in ends.items():
        state = chance_state(key, [v for v, _ in seed_values(series, arm, end).values()], numbers.study)
        if state in (AT, WORSE):
            out[arm] = state
    return out


def _part(name: str, i: int) -> str:
    return f"{name}_arms.png" if i == 0 else f"{name}_arms_{i + 1}.png"


def draw_figures(numbers: ReportNumbers, plots_dir: Path) -> list[Plot]:
    """Every figure the data allows, in report order."""
    study, site, metric = numbers.study, numbers.site, numbers.metric
    data = figure_data(numbers)
    grid = numbers.grid and {
        arm: (numbers.grid.a.levels.index(la), numbers.grid.b.levels.index(lb))
        for (la, lb), arm in numbers.grid.cells.items()
    }
    shape = (len(numbers.grid.a.levels), len(numbers.grid.b.levels)) if numbers.grid else (0, 0)
    arms, colors = study.arms, arm_colors(study.arms, grid, shape)
    head_dim = numbers.head_dim if counts_dimensions(metric) else None
    quantity = quantity_name(site, metric)
    drawn: list[Plot | None] = []
    chance: dict[str, ChanceLevel] = {}
    for q, _ in data.downstream:
        level = chance_level(q.key, study)
        if level is not None:
            chance[q.key] = level

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
            plot_downstream(
                data.downstream,
                arms,
                colors,
                plots_dir / "downstream.png",
                seeds=data.downstream_seeds,
                chance=chance,
                at_chance={key: arms_at_chance(numbers, key) for key in chance},
            )
        )
    if numbers.trajectories:
        drawn.append(
            plot_contrast_trajectories(
                numbers.trajectories, plots_dir / "contrasts.png", tokens_per_step=numbers.tokens_per_step
            )
        )
    if numbers.layer_contrasts:
        drawn.append(
            plot_layer_contrasts(
                numbers.layer_contrasts,
                plots_dir / LAYER_CONTRASTS_PLOT,
                what=quantity.removeprefix("mean "),
                unit="dimensions" if counts_dimensions(metric) else "value",
            )
        )
    # why do some layers collapse: the arms side by side, each quantity's y-range shared by all arms
    columns = [DiagColumn(d.arm, d.panels, d.tokens, d.n_seeds, d.flagged) for d in numbers.diagnoses]
    for i, group in enumerate(diagnosis_groups(len(columns), numbers.n_layers)):
        drawn.append(
            plot_diagnosis(
                [columns[j] for j in group],
                colors,
                plots_dir / _part("diagnosis", i),
                n_layers=numbers.n_layers,
                flag_rule=collapse_rule(),
            )
        )
    if data.functional_rank:
        # every layer's mean at 1 means every seed's every layer is: a rank is never below 1
        at_floor = [
            a
            for a, d in data.functional_rank.items()
            if still_at_chance(KEY_FUNCTIONAL_RANK.key, d.loc[d["series"] == "functional rank", "mean"], study)
        ]
        drawn.append(
            plot_functional_rank(
                data.functional_rank,
                arms,
                colors,
                plots_dir / "functional_rank.png",
                head_dim=numbers.head_dim,
                tokens=data.functional_rank_tokens,
                n_seeds=data.functional_rank_seeds,
                at_floor=at_floor,
            )
        )
        drawn.append(
            plot_rank_sweep(data.rank_sweep, arms, plots_dir / "rank_sweep.png", tokens=data.functional_rank_tokens)
        )
    if numbers.kv_table is not None and len(numbers.kv_table):
        drawn.append(
            plot_kv_headroom(
                numbers.kv_frame, arms, colors, plots_dir / KV_PLOT, head_dim=numbers.head_dim, tol=numbers.kv_tol
            )
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
                chance={q.key: lv for q in data.scatter_targets if (lv := chance_level(q.key, study)) is not None},
            )
        )
    if len(data.layer_grid):
        drawn.append(
            plot_layer_pr(
                data.layer_bars,
                arms,
                colors,
                plots_dir / _part("layer_pr", 0),
                ymax=_bars_top(data.layer_bars, head_dim),
                head_dim=head_dim,
                quantity=quantity,
            )
        )
        drawn.append(
            plot_pr_heatmaps(
                data.layer_grid,
                arms,
                plots_dir / _part("pr_heatmap", 0),
                quantity=quantity,
                n_seeds=data.layer_seeds,
                unit="dimensions" if counts_dimensions(metric) else "",
            )
        )
    return [p for p in drawn if p]


__all__ = ["draw_figures", "arms_at_chance"]
