"""report.md and report.html for one or more study folders: a written summary, setup, arms, run
status, the paradox table with seed-by-seed intervals, comparisons, correlations and figures.

Works on whatever is on disk: runs still going, killed or diverged (their complete rows are used
and the run is listed as such), arms with no runs yet, probes or downstream measures not written
(figures and tables that need them are skipped), any number of arms, seeds and eval points.

The report is built once as a list of blocks (`doc.py`) and rendered to markdown (figures as
relative links) and to one self-contained HTML file (figures embedded), so the two always agree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..vocab import site_description
from .compare import correlation_table, pairwise_comparisons, rank_downstream_frame
from .doc import Block, Box, Bullets, Details, Figure, Heading, Para, Table, code, md_escape, to_html, to_markdown
from .layers import (
    DIAGNOSIS,
    Diagnosis,
    collapse_rule,
    collapsed_rows,
    diagnoses,
    functional_rank_data,
    rank_sweep_curves,
)
from .load import Run, StudyData, StudyDirs, load_study
from .plots import (
    Plot,
    arm_colors,
    plot_diagnosis,
    plot_downstream,
    plot_functional_rank,
    plot_layer_pr,
    plot_loss_pr,
    plot_pr_heatmap,
    plot_rank_scatter,
    plot_rank_sweep,
    safe_names,
)
from .stats import fmt_interval, signed
from .summary import seed_reference, summary_paragraphs
from .factorial import KEY_FUNCTIONAL_RANK, Grid, effect_rows, effects_table, find_grid
from .factorial import sentences as factorial_sentences
from ..flat import flatten
from ..seedref import SEED_DATA, differences, reference_for, show_value
from .tables import (
    VAL_LOSS,
    choose_points,
    decimals_for,
    downstream_series,
    _bare_p,
    fmt_mean_ci,
    fmt_tokens,
    format_table,
    layer_means,
    metric_summary,
    paradox_blocks,
    paradox_table,
    probe_quantity,
    quantity_name,
    quantity_series,
    seed_stats,
)

RANK_LIKE = ("pr_sv", "pr_eig", "erank", "stable_rank", "r90")


# --- everything computed once ------------------------------------------------------------------------

@dataclass
class Analysis:
    """The numbers behind one report, computed once and shared by the figures and the text."""

    study: StudyData
    site: str
    metric: str
    table: pd.DataFrame                    # the paradox table
    pairwise: pd.DataFrame                 # every pair of arms at the end (compare.pairwise_comparisons)
    correlations: pd.DataFrame             # compare.correlation_table
    series: dict[str, pd.DataFrame]        # quantity key -> series
    ends: dict[str, int]                   # per arm: END of the probe quantity
    diagnoses: list[Diagnosis]
    n_layers: int
    head_dim: int | None
    grid: Grid | None = None               # two settings the arms cross (factorial.find_grid)
    effects: pd.DataFrame | None = None    # their effects on every quantity (factorial.effects_table)


def _head_dim(study: StudyData) -> int | None:
    """The head dimension every run shares (the most a head's PR can reach), or None."""
    dims = set()
    for r in study.runs:
        m = r.config.get("model") or {}
        hd = m.get("head_dim") or (m["d_model"] // m["n_head"] if m.get("d_model") and m.get("n_head") else None)
        if hd:
            dims.add(int(hd))
    return dims.pop() if len(dims) == 1 else None


def analyse(study: StudyData, site: str = "k", metric: str = "pr_sv") -> Analysis:
    arms = study.arms
    configs = {}
    for r in study.runs:
        configs.setdefault(r.arm, r.config)
    grid = find_grid(configs, arms)
    # crossed arms: compare each with the arm that has both reference levels (for the seed's grid,
    # its own no-QK-Norm arm), not with whichever sorts first
    reference = grid.cells[(grid.a.levels[0], grid.b.levels[0])] if grid else None
    table = paradox_table(study.scalars, study.probes, site, metric, arms=arms, finished=study.finished,
                          reference=reference)
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
        fx = effects_table(grid, [(q, s) for q, s in quantities + [(KEY_FUNCTIONAL_RANK, fr)] if len(s)],
                           study.finished)
    return Analysis(study, site, metric, table, pairwise, corr, series, ends, diags, n_layers, head_dim, grid, fx)


# --- figures --------------------------------------------------------------------------------------

def _seed_counts(*frames: pd.DataFrame) -> dict[str, int]:
    """Seeds drawn per arm (runs that have written nothing yet are not counted)."""
    parts = [f[["arm", "seed"]] for f in frames if len(f)]
    if not parts:
        return {}
    return pd.concat(parts).drop_duplicates().groupby("arm")["seed"].nunique().to_dict()


def draw_plots(study: StudyData, plots_dir: Path, site: str = "k", metric: str = "pr_sv", *,
               analysis: Analysis | None = None) -> list[Plot]:
    """Every figure the data allows, in report order."""
    an = analysis or analyse(study, site, metric)
    grid = an.grid and {arm: (an.grid.a.levels.index(la), an.grid.b.levels.index(lb))
                        for (la, lb), arm in an.grid.cells.items()}
    shape = (len(an.grid.a.levels), len(an.grid.b.levels)) if an.grid else (0, 0)
    arms, colors, stems = study.arms, arm_colors(study.arms, grid, shape), safe_names(study.arms)
    head_dim = an.head_dim if metric in RANK_LIKE else None
    quantity = quantity_name(site, metric)
    pr_key = probe_quantity(site, metric).key
    plots: list[Plot] = []

    loss, pr = an.series[VAL_LOSS.key], an.series[pr_key]
    p = plot_loss_pr(seed_stats(loss), seed_stats(pr), arms, colors, plots_dir / "loss_pr.png",
                     head_dim=head_dim, quantity=quantity, site_text=site_description(site),
                     seeds=_seed_counts(loss, pr))
    if p:
        plots.append(p)

    down = downstream_series(study.scalars, study.probes)
    if down:
        p = plot_downstream([(q, seed_stats(s)) for q, s in down], arms, colors, plots_dir / "downstream.png",
                            seeds=_seed_counts(*[s for _, s in down]))
        if p:
            plots.append(p)

    # why do some layers collapse: one figure per arm, each quantity's y-range shared by all arms
    for d in an.diagnoses:
        p = plot_diagnosis(d.arm, d.panels, colors[d.arm], plots_dir / f"diagnosis_{stems[d.arm]}.png",
                           tokens=d.tokens, n_seeds=d.n_seeds, n_layers=an.n_layers, flagged=d.flagged,
                           flag_rule=collapse_rule())
        if p:
            plots.append(p)

    fr, fr_tokens, fr_seeds = functional_rank_data(study.probes, arms, study.finished)
    if fr:
        p = plot_functional_rank(fr, arms, colors, plots_dir / "functional_rank.png", head_dim=an.head_dim,
                                 tokens=fr_tokens, n_seeds=fr_seeds)
        if p:
            plots.append(p)
        curves = rank_sweep_curves(study.probes, fr_tokens)
        p = plot_rank_sweep(curves, arms, plots_dir / "rank_sweep.png", tokens=fr_tokens)
        if p:
            plots.append(p)

    frame, targets = rank_downstream_frame(study.scalars, study.probes, site, metric)
    if targets and len(frame):
        ends = an.correlations[an.correlations["scope"] == "run ends"]
        stats = {r.key: (r.pearson, r.pearson_p, r.n) for r in ends.itertuples()}
        p = plot_rank_scatter(frame, targets, arms, colors, plots_dir / "pr_vs_downstream.png", stats=stats,
                              x_label=quantity)
        if p:
            plots.append(p)

    lm = layer_means(study.probes, site, metric)
    if not len(lm):
        return plots
    # per-layer bars at each arm's END, the same point the paradox table reports
    at_end = pd.concat([lm[(lm["arm"] == a) & (lm["tokens"] == t)] for a, t in an.ends.items()], ignore_index=True)
    bars = seed_stats(at_end, by=("arm", "layer", "tokens"))
    means = bars["mean"].to_numpy(float) if len(bars) else np.array([1.0])
    ymax = float(np.nanmax(means)) if np.isfinite(means).any() else 1.0
    hi = bars["hi"].to_numpy(float) if len(bars) else np.array([])
    if np.isfinite(hi).any():  # whiskers may reach a little above the bars, never set the scale
        ymax = max(ymax, min(float(np.nanmax(hi)), ymax * 1.25))
    ymax = max(ymax, head_dim or 0) * 1.1  # headroom for the value printed over each bar
    for a in arms:
        p = plot_layer_pr(bars[bars["arm"] == a], a, colors[a], plots_dir / f"layer_pr_{stems[a]}.png",
                          ymax=ymax, head_dim=head_dim, quantity=quantity)
        if p:
            plots.append(p)

    # heatmaps: mean over seeds per (layer, eval point), one colour scale for all arms
    grid = lm.groupby(["arm", "layer", "tokens"], as_index=False)["value"].mean()
    vmin, vmax = float(np.nanmin(grid["value"])), float(np.nanmax(grid["value"]))
    if not vmax > vmin:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    for a in arms:
        p = plot_pr_heatmap(grid[grid["arm"] == a], a, plots_dir / f"pr_heatmap_{stems[a]}.png",
                            vmin=vmin, vmax=vmax, quantity=quantity, n_seeds=lm[lm["arm"] == a]["seed"].nunique())
        if p:
            plots.append(p)
    return plots


# --- report pieces ------------------------------------------------------------------------------------

def _value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v)) if v else "(none)"
    if isinstance(v, str):
        return v if v else '""'
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 100_000:
        return f"{v:,}"
    return str(v)


def _config_split(runs: list[Run]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(settings shared by every run, {arm: settings that set it apart})."""
    flats = [(r.arm, flatten(r.config)) for r in runs if r.config]
    if not flats:
        return {}, {}
    keys = sorted({k for _, f in flats for k in f} - {"arm", "seed"})
    shared, varying = {}, []
    for k in keys:
        vals = {repr(f.get(k)) for _, f in flats}
        if len(vals) == 1:
            shared[k] = flats[0][1].get(k)
        else:
            varying.append(k)
    per_arm: dict[str, dict[str, Any]] = {}
    for arm, f in flats:
        per_arm.setdefault(arm, {}).update({k: f.get(k) for k in varying})
    return shared, per_arm


def _model_line(cfg: dict[str, Any]) -> str | None:
    m = cfg.get("model") or {}
    if not m:
        return None
    bits = []
    if "n_layer" in m:
        bits.append(f"{m['n_layer']} layers")
    if "d_model" in m:
        bits.append(f"d_model {m['d_model']}")
    if "n_head" in m:
        heads = f"{m['n_head']} query heads"
        if m.get("n_kv_head") and m["n_kv_head"] != m["n_head"]:
            heads += f" / {m['n_kv_head']} KV heads"
        bits.append(heads)
    if "head_dim" in m:
        bits.append(f"head dim {m['head_dim']}")
    if "d_mlp" in m:
        bits.append(f"MLP {m['d_mlp']}")
    if "vocab_size" in m:
        bits.append(f"vocab {m['vocab_size']}")
    if "max_seq_len" in m:
        bits.append(f"context {m['max_seq_len']}")
    return ", ".join(bits) if bits else None


def _setup_items(study: StudyData) -> list[str]:
    meta = [s for s in study.studies if s]
    cfg = next((r.config for r in study.runs if r.config and r.done), None) or \
        next((r.config for r in study.runs if r.config), {})
    lines = []
    presets = sorted({str(s["preset"]) for s in meta if s.get("preset")})
    if presets:
        lines.append(f"**preset:** {', '.join(code(p) for p in presets)}")
    budgets = sorted({int(s["tokens"]) for s in meta if s.get("tokens")} |
                     {r.target_tokens for r in study.runs if r.target_tokens})
    if budgets:
        lines.append(f"**tokens per run:** {' / '.join(fmt_tokens(b) for b in budgets)}")
    seeds = study.seeds() or sorted({int(x) for s in meta for x in (s.get("seeds") or [])})
    if seeds:
        lines.append(f"**seeds:** {', '.join(map(str, seeds))}")
    model = _model_line(cfg)
    if model:
        lines.append(f"**model:** {model}")
    train = cfg.get("train") or {}
    if train.get("batch_size") and train.get("seq_len"):
        if train.get("eval_schedule") == "log":
            when = f"; eval and probe at {train.get('eval_points', '?')} log-spaced points (and token 0)"
        elif train.get("eval_every"):
            when = f"; eval and probe every {fmt_tokens(train['eval_every'])} tokens"
        else:
            when = ""
        lines.append(f"**batch:** {train['batch_size']} x {train['seq_len']} tokens{when}")
    points = sorted(set(study.scalars["tokens"].tolist())) if len(study.scalars) else []
    if points:
        lines.append(f"**eval points found:** {len(points)}, from {fmt_tokens(points[0])} to {fmt_tokens(points[-1])} tokens")
    data = cfg.get("data") or {}
    if data:
        path = data.get("path", "")
        lines.append(f"**data:** {code(path) if path else 'the embedded corpus'}")
    lines += _seed_difference_items(study)
    probe = cfg.get("probe") or {}
    if probe.get("sites"):
        lines.append(f"**probe sites:** {', '.join(code(s) for s in probe['sites'])}"
                     + (f" on a fixed batch of {probe['batch_size']} sequences" if probe.get("batch_size") else ""))
    return lines


def _seed_difference_items(study: StudyData) -> list[str]:
    """How the runs differ from the seed run their preset restages (seedref): what every run
    shares, then what only some arms change."""
    presets = [str(s["preset"]) for s in study.studies if s.get("preset")]
    seed_run, reference = reference_for(presets[0] if presets else None)
    per_arm: dict[str, set] = {}
    for r in study.runs:
        if r.config:
            diffs = {(k, show_value(v), show_value(s)) for k, v, s in differences(r.config, reference)}
            per_arm[r.arm] = per_arm[r.arm] & diffs if r.arm in per_arm else diffs
    if not per_arm:
        return []
    common = set.intersection(*per_arm.values())
    order = {k: i for i, k in enumerate(reference)}

    def words(items: set) -> str:
        ordered = sorted(items, key=lambda d: order[d[0]])
        known = [f"{code(k)} {v} (seed {s})" for k, v, s in ordered if v != "unset"]
        unset = [code(k) for k, v, _ in ordered if v == "unset"]
        return ", ".join(known + ([f"not recorded by the rankscope that ran them: {', '.join(unset)}"] if unset else []))

    lines = [f"**differs from {seed_run}** (read from its code; arms' QK-Norm and optimizer aside): "
             + (words(common) if common else "in nothing else") + f"; the seed trained on {SEED_DATA}"]
    extra = {arm: d - common for arm, d in per_arm.items() if d - common}
    if extra:
        lines.append("**arms that differ from it further:** "
                     + "; ".join(f"{md_escape(arm)}: {words(d)}" for arm, d in extra.items()))
    return lines


def _arms_table(study: StudyData) -> Table:
    overrides: dict[str, dict[str, Any]] = {}
    for s in study.studies:
        for a, o in (s.get("arms") or {}).items():
            overrides.setdefault(str(a), dict(o or {}))
    _, varying = _config_split(study.runs)
    planned = sorted({int(x) for s in study.studies for x in (s.get("seeds") or [])})
    rows = []
    for a in study.arms:
        o = overrides.get(a) or varying.get(a) or {}
        text = ", ".join(code(f"{k}={_value(v)}") for k, v in sorted(o.items())) or "(base settings)"
        runs = [r for r in study.runs if r.arm == a]
        total = max(len(planned), len(runs))
        done = sum(r.done for r in runs)
        div = sum(r.diverged for r in runs)
        reached = sorted({r.last_tokens for r in runs if r.last_tokens is not None})
        where = ("–" if not reached else fmt_tokens(reached[0]) if len(reached) == 1
                 else f"{fmt_tokens(reached[0])} – {fmt_tokens(reached[-1])}")
        status = f"{done} of {total}" + (f" ({div} diverged)" if div else "")
        rows.append([f"**{md_escape(a)}**", text, status, where])
    return Table(["arm", "settings", "runs finished", "tokens reached"], rows)


def _status_items(study: StudyData) -> list[str]:
    """Diverged runs first (they need attention), then runs still going or stopped, then planned
    runs that never started."""
    items = []
    for r in study.runs:
        if not r.diverged:
            continue
        of = f" of {fmt_tokens(r.target_tokens)}" if r.target_tokens else ""
        where = (f"last finite eval at {fmt_tokens(r.last_finite_tokens)}{of} tokens"
                 if r.last_finite_tokens is not None else "no finite eval point")
        why = f"; {md_escape(r.message)}" if r.message else ""
        items.append(f"{code(r.arm)} seed {r.seed}: **diverged** ({where}{why}) — {code(r.path)}")
    for r in study.runs:
        if r.done or r.diverged:
            continue
        of = f" of {fmt_tokens(r.target_tokens)}" if r.target_tokens else ""
        where = (f"last eval at {fmt_tokens(r.last_tokens)}{of} tokens" if r.last_tokens is not None
                 else "no eval point written yet")
        items.append(f"{code(r.arm)} seed {r.seed}: **unfinished** ({where}; still running, or stopped) — {code(r.path)}")
    planned = sorted({int(x) for s in study.studies for x in (s.get("seeds") or [])})
    have = {(r.arm, r.seed) for r in study.runs}
    for s in study.studies:
        for a in (s.get("arms") or {}):
            for k in planned:
                if (str(a), k) not in have:
                    items.append(f"{code(a)} seed {k}: **not started**")
                    have.add((str(a), k))
    return items


def _summary_table(summary: pd.DataFrame, arms: list[str]) -> Table | None:
    if not len(summary):
        return None
    rows = []
    for (site, metric), row in summary.iterrows():
        d = decimals_for([row[(a, "mean")] for a in arms])
        cells = []
        for a in arms:
            m, n = row[(a, "mean")], int(row[(a, "n")])
            cells.append("–" if not n or not np.isfinite(m) else fmt_mean_ci(m, row[(a, "lo")], row[(a, "hi")], n, d))
        rows.append([code(site), code(metric)] + cells)
    return Table(["site", "metric"] + [md_escape(a) for a in arms], rows, ["l", "l"] + ["r"] * len(arms))


def _pairwise_blocks(pairwise: pd.DataFrame) -> list[Block]:
    if not len(pairwise):
        return []
    rows = []
    for r in pairwise.itertuples():
        if r.test == "not comparable":
            rows.append([r.quantity, f"{md_escape(r.a)} − {md_escape(r.b)}", "–", "–", "–", "–", "–", r.verdict])
            continue
        d = int(r.decimals)
        diff = signed(r.mean, d) + (f" {fmt_interval(r.lo, r.hi, d)}" if np.isfinite(r.lo) else "")
        p = "undefined (sd 0)" if r.test == "paired (constant)" else _bare_p(r.p) if np.isfinite(r.p) else "–"
        pw = _bare_p(r.p_wilcoxon) if np.isfinite(r.p_wilcoxon) else "–"
        ph = _bare_p(r.p_holm) if np.isfinite(r.p_holm) else "–"
        reading = r.verdict
        if r.resolved and r.test != "paired (constant)" and np.isfinite(r.p_holm) and r.p_holm >= 0.05:
            reading += " (not after Holm adjustment)"
        rows.append([f"{r.quantity} @ {fmt_tokens(r.tokens)}", f"{md_escape(r.a)} − {md_escape(r.b)}", diff, p, pw,
                     ph, str(r.n) + (" (Welch)" if r.test == "Welch t" else ""), md_escape(reading)])
    return [
        Para("Every pair of arms at the end of training, seed by seed (later arm minus earlier arm, on the seeds "
             "both ran). p: paired t-test; Wilcoxon: signed-rank test, from 6 seeds up, a check that no single "
             "seed carries the result; Holm: the paired p adjusted for the number of pairs compared on that "
             "quantity (with many pairs, one p below 0.05 is expected by chance)."),
        Table(["quantity", "comparison", "difference [95% CI]", "p", "Wilcoxon p", "Holm p", "seeds", "reading"],
              rows, ["l", "l", "r", "r", "r", "r", "r", "l"]),
    ]


def _correlation_blocks(corr: pd.DataFrame, quantity: str) -> list[Block]:
    if not len(corr):
        return []
    rows = []
    for r in corr.itertuples():
        if np.isfinite(r.pearson):
            pearson = f"{signed(r.pearson, 2)}" + (f" {fmt_interval(r.pearson_lo, r.pearson_hi, 2)}"
                                                     if np.isfinite(r.pearson_lo) else "")
            rows.append([r.quantity, r.scope, str(r.n), str(r.runs), pearson, _bare_p(r.pearson_p),
                         signed(r.spearman, 2), _bare_p(r.spearman_p)])
        else:
            rows.append([r.quantity, r.scope, str(r.n), str(r.runs), "–", "–", "–", "–"])
    return [
        Para(f"Correlation of {quantity} with each downstream measure. **eval points**: every eval point after "
             "token 0 of every run, pooled across arms and checkpoints — points within one run are not "
             "independent (they share one trajectory) and both quantities drift with training time, so these "
             "p-values overstate the evidence. **run ends**: one point per run at its last eval point (finished "
             "runs), independent runs and the fairer test. Pearson r with its 95% interval (Fisher z), "
             "Spearman ρ for monotone but non-linear relations."),
        Table(["measure", "scope", "n points", "runs", "Pearson r [95% CI]", "p", "Spearman ρ", "p"], rows,
              ["l", "l", "r", "r", "r", "r", "r", "r"]),
    ]


def _collapsed_blocks(an: Analysis) -> list[Block]:
    titles = {spec.key: spec.title.split(" (")[0] for spec in DIAGNOSIS}
    blocks: list[Block] = []
    for d in an.diagnoses:
        rows = collapsed_rows(d, titles)
        if not rows:
            continue
        cols = ["layer"] + [titles[k] for k in d.layer_values]
        blocks.append(Para(f"**{md_escape(d.arm)}** at {fmt_tokens(d.tokens)} tokens: each collapsed layer next to "
                           "the median of the arm's other layers."))
        blocks.append(Table(cols, [[r.get(c, "–") for c in cols] for r in rows], ["l"] + ["r"] * (len(cols) - 1)))
    return blocks


def _crossed_sentences(an: Analysis) -> list[str]:
    """When the arms cross two settings: their effects on the probe quantity and on the loss, in words."""
    if an.grid is None or an.effects is None or not len(an.effects):
        return []
    return (factorial_sentences(an.effects, an.grid, f"{an.site}:{an.metric}", quantity_name(an.site, an.metric))
            + factorial_sentences(an.effects, an.grid, VAL_LOSS.key, "validation loss"))


def _title(study: StudyData) -> str:
    names = list(dict.fromkeys(str(s["name"]) for s in study.studies if s.get("name")))
    return " + ".join(names) if names else study.dirs[0].resolve().name


def _figures(plots: list[Plot], pick) -> list[Block]:
    return [Figure(p.path, p.caption, p.path.stem.replace("_", " ")) for p in plots if pick(p.path.name)]


def build_blocks(an: Analysis, plots: list[Plot], out_dir: Path) -> list[Block]:
    """The whole report as blocks, in reading order."""
    study, table, site, metric = an.study, an.table, an.site, an.metric
    arms = study.arms
    quantity = quantity_name(site, metric)
    cap = quantity[0].upper() + quantity[1:]
    n_done = sum(r.done for r in study.runs)
    n_div = sum(r.diverged for r in study.runs)
    b: list[Block] = [Heading(1, md_escape(_title(study)))]
    for desc in dict.fromkeys(str(s["description"]).strip() for s in study.studies if s.get("description")):
        b.append(Para(md_escape(desc)))
    sources = ", ".join(code(d) for d in study.dirs)
    b.append(Para(f"*rankscope report over {len(study.runs)} runs ({n_done} finished"
                  + (f", {n_div} diverged" if n_div else "") + f") from {sources}.*", css="meta"))

    ref_header, ref_rows, ref_sentences = seed_reference(study, an.series)
    crossed = _crossed_sentences(an)
    b.append(Heading(2, "Summary"))
    b.append(Box("summary", [Para(p) for p in summary_paragraphs(study, table, an.correlations, an.diagnoses,
                                                                 ref_sentences, crossed)]))

    b += [Heading(2, "Setup"), Bullets(_setup_items(study)) if _setup_items(study) else Para("(no settings found)")]
    b += [Heading(2, "Arms"), _arms_table(study)]
    status = _status_items(study)
    if status:
        b += [Heading(2, "Runs that did not finish"),
              Para("Their complete rows are used up to the last point they reached (a diverged run: its last "
                   "finite point); they drop out of the points they did not reach, and a diverged run never "
                   "counts as finished."),
              Bullets(status)]
    if study.notes:
        b += [Heading(2, "Notes"), Bullets([md_escape(n) for n in study.notes])]

    b.append(Heading(2, "The paradox table"))
    if len(table):
        b.append(Para(f"Validation loss and {quantity} ({code(metric)} at site {code(site)}: "
                      f"{site_description(site)}, averaged over heads, then layers) at the middle and "
                      "at the end of training, then the downstream measures at the end; mean over seeds with a 95% "
                      "t-interval. The middle is the eval point closest to half of the last point every arm "
                      "reached; an arm's end is the last point all its finished runs reached. Arms at different "
                      "token counts are not compared."))
        b += paradox_blocks(table)
    else:
        b.append(Para("No evaluation point written yet."))

    def section(title: str, blocks: list[Block]) -> None:
        if blocks:
            b.append(Heading(2, title))
            b.extend(blocks)

    if crossed:
        header, rows = effect_rows(an.effects, an.grid)
        section("Two settings crossed", [
            Para(f"The arms cross {code(an.grid.a.key)} ({', '.join(an.grid.a.levels)}) with {code(an.grid.b.key)} "
                 f"({', '.join(an.grid.b.levels)}). Each effect is a difference computed seed by seed at the arms' "
                 "common end point, then a 95% t-interval over seeds: a setting's effect at each level of the "
                 "other (simple), averaged over the other (main), and how much the first setting's effect changes "
                 "between levels of the second (interaction; a difference of differences). The first level named "
                 "is the reference."),
            Table(header, rows, ["l"] + ["r"] * (len(header) - 1))])
    section("Over training", _figures(plots, lambda n: n in ("loss_pr.png", "downstream.png")))
    if len(arms) > 2:
        section("Every pair of arms, seed by seed", _pairwise_blocks(an.pairwise))
    diag = _figures(plots, lambda n: n.startswith("diagnosis_"))
    if diag:
        intro = Para("For each arm at the end of training, each layer's key PR next to "
                     "what shapes its keys: how unevenly its QK-Norm gains grew (gain CV), how sharp its attention "
                     "became (entropy, max logit) and whether its key weights lost rank (W_K stable rank). Layers "
                     f"flagged as collapsed ({collapse_rule()}) are shaded. These are associations at one point in "
                     "training, not causes.")
        section("Why do some layers collapse?", [intro] + diag + _collapsed_blocks(an))
    section("Functional rank", _figures(plots, lambda n: n in ("functional_rank.png", "rank_sweep.png")))
    corr = _correlation_blocks(an.correlations, quantity)
    section(f"{cap} and downstream measures", corr + _figures(plots, lambda n: n == "pr_vs_downstream.png"))
    section(f"{cap} per layer at the end of training", _figures(plots, lambda n: n.startswith("layer_pr_")))
    section(f"{cap} per layer over training", _figures(plots, lambda n: n.startswith("pr_heatmap_")))
    if not plots:
        b += [Heading(2, "Figures"), Para("No data to plot yet.")]

    if ref_rows:
        section("Compared with the seed study", [
            Para("The seed's published single-seed numbers (DESIGN.md; ≈: read off its figures) next to this "
                 "study's means over seeds at the same token counts, for the arms trained as the seed trained "
                 "(its Muon: Q, K, V, O stacked, Polar Express); \"interpolated\": linearly in log tokens "
                 "between a run's two neighbouring eval points."),
            Table(ref_header, ref_rows, ["l"] + ["r"] * (len(ref_header) - 1))] + [Para(s) for s in ref_sentences])

    summary = metric_summary(study.probes, arms=arms, finished=study.finished)
    st = _summary_table(summary, arms)
    if st is not None:
        sweep = any(p.path.name == "rank_sweep.png" for p in plots)
        section("Every probe metric at the end of training", [
            Para("Mean over heads, then layers (per-layer metrics: over layers), then seeds, with a 95% t-interval "
                 "over seeds, at each arm's end point."
                 + (" The rank sweep `dloss_r*` is drawn above instead." if sweep else "")), st])

    shared, _ = _config_split(study.runs)
    if shared:
        b.append(Details("Settings shared by every run",
                         [Table(["setting", "value"], [[code(k), code(_value(v))] for k, v in shared.items()])]))
    return b


def render_markdown(study: StudyData, table: pd.DataFrame, plots: list[Plot], out_dir: Path,
                    site: str = "k", metric: str = "pr_sv") -> str:
    """report.md's text (kept for callers of earlier versions; `write_report` uses `build_blocks`)."""
    an = analyse(study, site, metric)
    an.table = table
    return to_markdown(build_blocks(an, plots, out_dir), out_dir)


# --- public entry points ------------------------------------------------------------------------------

def _write_text(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: a reader never sees half a report."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(study_dirs: StudyDirs, out_dir: str | Path | None = None, *,
                 site: str = "k", metric: str = "pr_sv") -> Path:
    """Write ``out_dir/report.md``, ``out_dir/report.html`` (self-contained: figures embedded) and the
    figures under ``out_dir/plots/``; return the path of report.md.

    `study_dirs`: one study folder or several to merge. `out_dir` defaults to the first of them.
    `site`/`metric` choose the probe quantity of the table and figures (default: the seed's key PR).
    """
    study = load_study(study_dirs)
    out = Path(out_dir) if out_dir is not None else study.dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    an = analyse(study, site, metric)
    plots = draw_plots(study, out / "plots", site, metric, analysis=an)
    blocks = build_blocks(an, plots, out)
    path = out / "report.md"
    _write_text(path, to_markdown(blocks, out))
    _write_text(out / "report.html", to_html(blocks, f"{_title(study)} — rankscope report"))
    return path


def paradox_text(study_dirs: StudyDirs, *, site: str = "k", metric: str = "pr_sv") -> str:
    """The paradox table as aligned plain text, for the terminal at the end of `rankscope run`:
    means with 95% intervals over seeds, then each arm minus the first, seed by seed, in words."""
    study = load_study(study_dirs)
    an = analyse(study, site, metric)
    table = an.table
    n_done = sum(r.done for r in study.runs)
    n_div = sum(r.diverged for r in study.runs)
    seeds = max((len({r.seed for r in study.runs if r.arm == a}) for a in study.arms), default=0)
    head = (f"{_title(study)}: {len(study.runs)} runs, {n_done} finished" + (f", {n_div} diverged" if n_div else "")
            + (f"; up to {seeds} seeds per arm" if seeds > 1 else "; one seed per arm: no interval is possible"
               if seeds == 1 else ""))
    lines = [head, "", format_table(table, "text")]
    crossed = _crossed_sentences(an)
    if crossed:
        lines += ["", "two settings crossed (report.md has every effect):"] + [f"  {w}" for w in crossed]
    div = [f"{r.arm}/seed-{r.seed}" + (f" after {fmt_tokens(r.last_finite_tokens)}" if r.last_finite_tokens is not None
                                        else "") for r in study.runs if r.diverged]
    if div:
        lines += ["", "diverged: " + ", ".join(div)]
    open_runs = [f"{r.arm}/seed-{r.seed}" + (f" at {fmt_tokens(r.last_tokens)}" if r.last_tokens is not None else "")
                 for r in study.runs if not r.done and not r.diverged]
    if open_runs:
        lines += ["", "unfinished: " + ", ".join(open_runs)]
    return "\n".join(lines)


__all__ = ["write_report", "paradox_text", "draw_plots", "render_markdown", "build_blocks", "analyse", "Analysis"]
