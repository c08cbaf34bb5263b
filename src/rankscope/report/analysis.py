"""What a study report computes, once: the numbers behind its tables and sentences
(`compute_numbers`, shared by report.md and the terminal's paradox text) and the data its figures
draw (`figure_data`, for the full report only). The figures themselves are chosen in `figures.py`
and the text is written in `document.py`; nothing here renders.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from .compare import correlation_table, pairwise_comparisons, rank_downstream_frame
from .factorial import Grid, effects_table, find_grid
from .kv_headroom import headroom_frame, headroom_table, run_tolerance
from .layer_contrasts import LayerContrast, layer_contrast, layer_contrasts
from .layer_tables import Diagnosis, diagnoses, functional_rank_data, rank_sweep_curves
from .load import StudyData
from .paradox import paradox_table
from .quantities import KEY_FUNCTIONAL_RANK, VAL_LOSS, Quantity, probe_quantity
from .series import choose_points, downstream_series, layer_means, quantity_series, seed_counts, seed_stats
from .trajectory import contrast_trajectory


@dataclass
class ReportNumbers:
    """The numbers behind one report, computed once and shared by the figures and the text."""

    study: StudyData
    site: str
    metric: str
    table: pd.DataFrame  # the paradox table
    pairwise: pd.DataFrame  # every pair of arms at the end (compare.pairwise_comparisons)
    correlations: pd.DataFrame  # compare.correlation_table
    series: dict[str, pd.DataFrame]  # quantity key -> series
    downstream: list[tuple[Quantity, pd.DataFrame]]  # the downstream measures that have data, in report order
    ends: dict[str, int]  # per arm: END of the probe quantity
    diagnoses: list[Diagnosis]
    n_layers: int
    head_dim: int | None
    grid: Grid | None = None  # two settings the arms cross (factorial.find_grid)
    effects: pd.DataFrame | None = None  # their effects on every quantity (factorial.effects_table)
    kv_frame: pd.DataFrame | None = None  # kv_headroom.headroom_frame: per kv head at each arm's last point
    kv_table: pd.DataFrame | None = None  # kv_headroom.headroom_table: per arm and key site (bytes per token)
    kv_tol: float = 0.01  # the loss tolerance of those ranks (probe.kv_tolerance)
    # each contrast over training (trajectory.contrast_trajectory) of the quantities in TRAJECTORY_KEYS
    trajectories: list[tuple[Quantity, dict[tuple[str, str], pd.DataFrame]]] = field(default_factory=list)
    tokens_per_step: int | None = None  # shared by every run, for a steps axis
    # each contrast layer by layer at its arms' common end, on the probe quantity (layer_contrasts)
    layer_contrasts: list[LayerContrast] = field(default_factory=list)
    # the same in the W_K-update PR, where recorded, at each contrast's point of the probe quantity
    update_layer_contrasts: list[LayerContrast] = field(default_factory=list)


# The quantities whose contrasts the report follows over training: loss, the probe quantity, and
# the update W_K receives (update_geometry), where recorded.
UPDATE_PR = Quantity(
    "dw_k:pr_sv",
    "mean W_K-update PR",
    None,
    "PR of the change one optimizer step makes to each head's key weights, averaged over heads then layers",
    "dimensions",
)


def _head_dim(study: StudyData) -> int | None:
    """The head dimension every run shares (the most a head's PR can reach), or None."""
    dims = set()
    for r in study.runs:
        m = r.config.get("model") or {}
        hd = m.get("head_dim") or (m["d_model"] // m["n_head"] if m.get("d_model") and m.get("n_head") else None)
        if hd:
            dims.add(int(hd))
    return dims.pop() if len(dims) == 1 else None


def compute_numbers(study: StudyData, site: str = "k", metric: str = "pr_sv") -> ReportNumbers:
    """Everything the report's tables and sentences say about `study`, for the probe quantity
    (`site`, `metric`) (default: the seed's key PR)."""
    arms = study.arms
    configs = {}
    for r in study.runs:
        configs.setdefault(r.arm, r.config)
    grid = find_grid(configs, arms)
    # the study's contrasts (QK-Norm on vs off under one optimizer, ...), not every arm against one
    table = paradox_table(
        study.scalars, study.probes, site, metric, arms=arms, finished=study.finished, contrasts=study.contrasts
    )
    pr_q = probe_quantity(site, metric)
    pr = quantity_series(study.scalars, study.probes, pr_q)
    series = {VAL_LOSS.key: quantity_series(study.scalars, study.probes, VAL_LOSS), pr_q.key: pr}
    down = downstream_series(study.scalars, study.probes)
    series.update({q.key: s for q, s in down})
    quantities = [(VAL_LOSS, series[VAL_LOSS.key]), (pr_q, pr)] + down
    pairwise = pairwise_comparisons([(q, s) for q, s in quantities if len(s)], arms, study.finished)
    corr = correlation_table(study.scalars, study.probes, site=site, metric=metric, finished=study.finished)
    _, ends = choose_points(pr, arms, study.finished) if len(pr) else (None, {})
    head_dim = _head_dim(study)
    # the diagnosis is about the seed's key PR, whatever quantity the table was asked for
    key_pr = pr if (site, metric) == ("k", "pr_sv") else quantity_series(study.scalars, study.probes, "k:pr_sv")
    _, key_ends = choose_points(key_pr, arms, study.finished) if len(key_pr) else (None, {})
    diags, n_layers = diagnoses(study.probes, arms, key_ends, head_dim) if key_ends else ([], 0)
    fx = None
    if grid:  # the effects also on the keys' functional rank: is a PR gap "ghost compute"?
        fr = quantity_series(study.scalars, study.probes, KEY_FUNCTIONAL_RANK)
        fx = effects_table(
            grid, [(q, s) for q, s in quantities + [(KEY_FUNCTIONAL_RANK, fr)] if len(s)], study.finished
        )
    numbers = ReportNumbers(
        study, site, metric, table, pairwise, corr, series, down, ends, diags, n_layers, head_dim, grid, fx
    )
    # KV-cache headroom (report.kv_headroom): ranks per kv head at each arm's last point, bytes per token
    numbers.kv_frame = headroom_frame(study.probes, arms)
    if head_dim and len(numbers.kv_frame):
        numbers.kv_table = headroom_table(numbers.kv_frame, head_dim, arms=arms)
    numbers.kv_tol = run_tolerance([r.config for r in study.runs])
    numbers.trajectories = _trajectories(study, [VAL_LOSS, pr_q, UPDATE_PR], series)
    layers = layer_means(study.probes, site, metric)
    if layers["layer"].nunique() >= 2:  # one layer is the network-wide mean the paradox table gives
        numbers.layer_contrasts = layer_contrasts(layers, study.contrasts, ends)
        update = layer_means(study.probes, "dw_k", "pr_sv") if (site, metric) != ("dw_k", "pr_sv") else []
        if len(update):
            numbers.update_layer_contrasts = [
                layer_contrast(update, c.treatment, c.control, c.tokens) for c in numbers.layer_contrasts
            ]
    per_step = {r.config.get("tokens_per_step") for r in study.runs}
    numbers.tokens_per_step = int(per_step.pop()) if len(per_step) == 1 and None not in per_step else None
    return numbers


def _trajectories(
    study: StudyData, quantities: list[Quantity], series: dict[str, pd.DataFrame]
) -> list[tuple[Quantity, dict[tuple[str, str], pd.DataFrame]]]:
    """Each of the study's contrasts over training, per quantity that has data."""
    out = []
    for q in dict.fromkeys(quantities):
        s = series.get(q.key)
        if s is None:
            s = quantity_series(study.scalars, study.probes, q.key)
        if len(s):
            out.append((q, {(a, b): contrast_trajectory(s, a, b) for a, b in study.contrasts}))
    return out


# --- what the figures draw ----------------------------------------------------------------------------


@dataclass
class FigureData:
    """The data of every figure, summarised over seeds (`series.seed_stats` frames unless noted)."""

    loss: pd.DataFrame  # val loss per arm and eval point
    probe: pd.DataFrame  # the probe quantity per arm and eval point
    seeds: dict[str, int]  # seeds per arm behind those two
    downstream: list[tuple[Quantity, pd.DataFrame]]  # each downstream measure per arm and eval point
    downstream_seeds: dict[str, int]
    functional_rank: dict[str, pd.DataFrame]  # layer_tables.functional_rank_data: per arm, per layer
    functional_rank_tokens: dict[str, int]
    functional_rank_seeds: dict[str, int]
    rank_sweep: dict[str, pd.DataFrame]  # layer_tables.rank_sweep_curves, where functional rank was measured
    scatter: pd.DataFrame  # compare.rank_downstream_frame: per run and eval point
    scatter_targets: list[Quantity]
    scatter_stats: dict[str, tuple[float, float, int]]  # per target: Pearson r, its p and n over run ends
    layer_bars: pd.DataFrame  # the probe quantity per arm and layer at the arm's END
    layer_grid: pd.DataFrame  # arm, layer, tokens, value: mean over heads, then seeds
    layer_seeds: dict[str, int]  # seeds per arm behind the layer grid


def figure_data(numbers: ReportNumbers) -> FigureData:
    """The data of every figure the report draws for `numbers` (empty where the study lacks it)."""
    study, site, metric = numbers.study, numbers.site, numbers.metric
    loss, pr = numbers.series[VAL_LOSS.key], numbers.series[probe_quantity(site, metric).key]
    down = numbers.downstream
    fr, fr_tokens, fr_seeds = functional_rank_data(study.probes, study.arms, study.finished)
    sweep = rank_sweep_curves(study.probes, fr_tokens) if fr else {}
    frame, targets = rank_downstream_frame(study.scalars, study.probes, site, metric)
    ends = numbers.correlations[numbers.correlations["scope"] == "run ends"]
    lm = layer_means(study.probes, site, metric)
    if len(lm):
        # per-layer bars at each arm's END, the same point the paradox table reports
        at_end = pd.concat(
            [lm[(lm["arm"] == a) & (lm["tokens"] == t)] for a, t in numbers.ends.items()], ignore_index=True
        )
        bars = seed_stats(at_end, by=("arm", "layer", "tokens"))
        # the heatmaps: mean over seeds per (layer, eval point)
        grid = lm.groupby(["arm", "layer", "tokens"], as_index=False)["value"].mean()
        layer_seeds = {a: lm[lm["arm"] == a]["seed"].nunique() for a in study.arms}
    else:
        bars, grid, layer_seeds = seed_stats(lm), lm, {}
    return FigureData(
        seed_stats(loss),
        seed_stats(pr),
        seed_counts(loss, pr),
        [(q, seed_stats(s)) for q, s in down],
        seed_counts(*[s for _, s in down]),
        fr,
        fr_tokens,
        fr_seeds,
        sweep,
        frame,
        targets,
        {r.key: (r.pearson, r.pearson_p, r.n) for r in ends.itertuples()},
        bars,
        grid,
        layer_seeds,
    )


__all__ = ["ReportNumbers", "compute_numbers", "FigureData", "figure_data"]
