"""The study report as one document: its sections in reading order as blocks (`blocks.py`), written to
report.md (figures as relative links) and to one self-contained report.html (figures embedded), so
the two always agree; and the paradox table as plain text for the terminal.

Works on whatever is on disk: runs still going, killed or diverged (their complete rows are used
and the run is listed as such), arms with no runs yet, probes or downstream measures not written
(figures and tables that need them are skipped), any number of arms, seeds and eval points. The
numbers come from `analysis.py`, the figures from `figures.py`, the study's own description from
`study_setup.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..settings.units import fmt_count
from ..settings.vocab import site_description
from ..storage.fsio import write_text
from .analysis import UPDATE_PR, ReportNumbers, compute_numbers
from .blocks import Block, Box, Bullets, Details, Figure, Heading, Para, Table, code, md_escape, to_html, to_markdown
from .compare import NOT_COMPARABLE
from .factorial import effect_rows
from .factorial import sentences as factorial_sentences
from .figures import draw_figures
from .format import bare_p, decimals_for, fmt_interval, fmt_mean_ci, resolving_decimals, signed
from .kv_headroom import PLOT as KV_PLOT
from .kv_headroom import headroom_blocks
from .layer_contrasts import PLOT as LAYER_CONTRASTS_PLOT
from .layer_contrasts import layer_contrast_blocks, summary_sentence
from .layer_tables import DIAGNOSIS, collapse_rule, collapsed_rows
from .load import StudyData, StudyDirs, load_study
from .paradox import format_table, paradox_blocks
from .plotstyle import Plot
from .quantities import VAL_LOSS, quantity_name
from .seedcompare import seed_reference
from .series import metric_summary
from .stats import PAIRED_CONSTANT, WELCH
from .study_setup import arms_table, setup_items, shared_settings_table, status_items
from .summary import chance_sentences, summary_paragraphs
from .trajectory import trajectory_blocks

# --- result tables as blocks ------------------------------------------------------------------------------


def _metric_table(summary: pd.DataFrame, arms: list[str]) -> Table | None:
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
        if r.test == NOT_COMPARABLE:
            rows.append([r.quantity, f"{md_escape(r.a)} − {md_escape(r.b)}", "–", "–", "–", "–", "–", r.verdict])
            continue
        d = resolving_decimals(int(r.decimals), r.mean, r.lo, r.hi)
        diff = signed(r.mean, d) + (f" {fmt_interval(r.lo, r.hi, d)}" if np.isfinite(r.lo) else "")
        p = "undefined (sd 0)" if r.test == PAIRED_CONSTANT else bare_p(r.p) if np.isfinite(r.p) else "–"
        pw = bare_p(r.p_wilcoxon) if np.isfinite(r.p_wilcoxon) else "–"
        ph = bare_p(r.p_holm) if np.isfinite(r.p_holm) else "–"
        reading = r.verdict
        if r.resolved and r.test != PAIRED_CONSTANT and np.isfinite(r.p_holm) and r.p_holm >= 0.05:
            reading += " (not after Holm adjustment)"
        rows.append(
            [
                f"{r.quantity} @ {fmt_count(r.tokens)}",
                f"{md_escape(r.a)} − {md_escape(r.b)}",
                diff,
                p,
                pw,
                ph,
                str(r.n) + (" (Welch)" if r.test == WELCH else ""),
                md_escape(reading),
            ]
        )
    return [
        Para(
            "Every pair of arms at the end of training, seed by seed (later arm minus earlier arm, on the seeds "
            "both ran). p: paired t-test; Wilcoxon: signed-rank test, from 6 seeds up, a check that no single "
            "seed carries the result; Holm: the paired p adjusted for the number of pairs compared on that "
            "quantity (with many pairs, one p below 0.05 is expected by chance)."
        ),
        Table(
            ["quantity", "comparison", "difference [95% CI]", "p", "Wilcoxon p", "Holm p", "seeds", "reading"],
            rows,
            ["l", "l", "r", "r", "r", "r", "r", "l"],
        ),
    ]


def _correlation_blocks(corr: pd.DataFrame, quantity: str) -> list[Block]:
    if not len(corr):
        return []
    rows = []
    for r in corr.itertuples():
        if np.isfinite(r.pearson):
            pearson = f"{signed(r.pearson, 2)}" + (
                f" {fmt_interval(r.pearson_lo, r.pearson_hi, 2)}" if np.isfinite(r.pearson_lo) else ""
            )
            rows.append(
                [
                    r.quantity,
                    r.scope,
                    str(r.n),
                    str(r.runs),
                    pearson,
                    bare_p(r.pearson_p),
                    signed(r.spearman, 2),
                    bare_p(r.spearman_p),
                ]
            )
        else:
            rows.append([r.quantity, r.scope, str(r.n), str(r.runs), "–", "–", "–", "–"])
    return [
        Para(
            f"Correlation of {quantity} with each downstream measure. **eval points**: every eval point after "
            "token 0 of every run, pooled across arms and checkpoints — points within one run are not "
            "independent (they share one trajectory) and both quantities drift with training time, so these "
            "p-values overstate the evidence. **run ends**: one point per run at its last eval point (finished "
            "runs), independent runs and the fairer test. **within arms**: the run ends with each arm's mean "
            "removed from both, so only seed-to-seed variation inside an arm is left (a correlation across runs "
            "can be nothing but two arms far apart). Pearson r with its 95% interval (Fisher z), "
            "Spearman ρ for monotone but non-linear relations."
        ),
        Table(
            ["measure", "scope", "n points", "runs", "Pearson r [95% CI]", "p", "Spearman ρ", "p"],
            rows,
            ["l", "l", "r", "r", "r", "r", "r", "r"],
        ),
    ]


def _collapsed_blocks(numbers: ReportNumbers) -> list[Block]:
    titles = {spec.key: spec.title.split(" (")[0] for spec in DIAGNOSIS}
    blocks: list[Block] = []
    for d in numbers.diagnoses:
        rows = collapsed_rows(d, titles)
        if not rows:
            continue
        cols = ["layer"] + [titles[k] for k in d.layer_values]
        blocks.append(
            Para(
                f"**{md_escape(d.arm)}** at {fmt_count(d.tokens)} tokens: each collapsed layer next to "
                "the median of the arm's other layers."
            )
        )
        blocks.append(Table(cols, [[r.get(c, "–") for c in cols] for r in rows], ["l"] + ["r"] * (len(cols) - 1)))
    return blocks


def _crossed_sentences(numbers: ReportNumbers) -> list[str]:
    """When the arms cross two settings: their effects on the probe quantity and on the loss, in words."""
    if numbers.grid is None or numbers.effects is None or not len(numbers.effects):
        return []
    name = quantity_name(numbers.site, numbers.metric)
    return factorial_sentences(
        numbers.effects, numbers.grid, f"{numbers.site}:{numbers.metric}", name
    ) + factorial_sentences(numbers.effects, numbers.grid, VAL_LOSS.key, "validation loss")


def _title(study: StudyData) -> str:
    names = list(dict.fromkeys(str(s["name"]) for s in study.studies if s.get("name")))
    return " + ".join(names) if names else study.dirs[0].resolve().name


def _figures(plots: list[Plot], pick) -> list[Block]:
    return [Figure(p.path, p.caption, p.path.stem.replace("_", " ")) for p in plots if pick(p.path.name)]


def build_blocks(numbers: ReportNumbers, plots: list[Plot]) -> list[Block]:
    """The whole report as blocks, in reading order."""
    study, table, site, metric = numbers.study, numbers.table, numbers.site, numbers.metric
    arms = study.arms
    quantity = quantity_name(site, metric)
    cap = quantity[0].upper() + quantity[1:]
    n_done = sum(r.done for r in study.runs)
    n_div = sum(r.diverged for r in study.runs)
    n_running = sum(r.running is not None for r in study.runs)
    b: list[Block] = [Heading(1, md_escape(_title(study)))]
    for desc in dict.fromkeys(str(s["description"]).strip() for s in study.studies if s.get("description")):
        b.append(Para(md_escape(desc)))
    sources = ", ".join(code(d) for d in study.dirs)
    b.append(
        Para(
            f"*rankscope report over {len(study.runs)} runs ({n_done} finished"
            + (f", {n_div} diverged" if n_div else "")
            + (f", {n_running} still running: their points so far" if n_running else "")
            + f") from {sources}.*",
            css="meta",
        )
    )

    ref_header, ref_rows, ref_sentences = seed_reference(study, numbers.series)
    crossed = _crossed_sentences(numbers)
    chance_lines, at_chance = chance_sentences(numbers)
    b.append(Heading(2, "Summary"))
    b.append(
        Box(
            "summary",
            [
                Para(p)
                for p in summary_paragraphs(
                    study,
                    table,
                    numbers.correlations,
                    numbers.diagnoses,
                    ref_sentences,
                    crossed,
                    chance_lines,
                    at_chance,
                    summary_sentence(numbers.layer_contrasts, quantity.removeprefix("mean ")),
                )
            ],
        )
    )

    setup = setup_items(study)
    b += [Heading(2, "Setup"), Bullets(setup) if setup else Para("(no settings found)")]
    b += [Heading(2, "Arms"), arms_table(study)]
    status = status_items(study)
    if status:
        b += [
            Heading(2, "Runs that did not finish"),
            Para(
                "Their complete rows are used up to the last point they reached (a diverged run: its last "
                "finite point); they drop out of the points they did not reach, and a diverged run never "
                "counts as finished."
            ),
            Bullets(status),
        ]
    if study.notes:
        b += [Heading(2, "Notes"), Bullets([md_escape(n) for n in study.notes])]

    b.append(Heading(2, "The paradox table"))
    if len(table):
        b.append(
            Para(
                f"Validation loss and {quantity} ({code(metric)} at site {code(site)}: "
                f"{site_description(site)}, averaged over heads, then layers) at the middle and "
                "at the end of training, then the downstream measures at the end; mean over seeds with a 95% "
                "t-interval. The middle is the eval point closest to half of the last point every arm "
                "reached; an arm's end is the last point all its finished runs reached. Arms at different "
                "token counts are not compared."
            )
        )
        b += paradox_blocks(table)
    else:
        b.append(Para("No evaluation point written yet."))

    def section(title: str, blocks: list[Block]) -> None:
        if blocks:
            b.append(Heading(2, title))
            b.extend(blocks)

    if crossed:
        first, second = numbers.grid.a, numbers.grid.b
        header, rows = effect_rows(numbers.effects, numbers.grid)
        section(
            "Two settings crossed",
            [
                Para(
                    f"The arms cross {code(first.key)} ({', '.join(first.levels)}) with {code(second.key)} "
                    f"({', '.join(second.levels)}). Each effect is a difference computed seed by seed at the arms' "
                    "common end point, then a 95% t-interval over seeds: a setting's effect at each level of the "
                    "other (simple), averaged over the other (main), and how much the first setting's effect changes "
                    "between levels of the second (interaction; a difference of differences). The first level named "
                    "is the reference."
                ),
                Table(header, rows, ["l"] + ["r"] * (len(header) - 1)),
            ],
        )
    section("Over training", _figures(plots, lambda n: n in ("loss_pr.png", "downstream.png")))
    contrasts = trajectory_blocks(numbers.trajectories, numbers.tokens_per_step)
    section("The contrasts over training", contrasts + _figures(plots, "contrasts.png".__eq__))
    section(
        "The contrasts layer by layer",
        layer_contrast_blocks(
            numbers.layer_contrasts,
            quantity.removeprefix("mean "),
            numbers.update_layer_contrasts,
            UPDATE_PR.label.removeprefix("mean "),
        )
        + _figures(plots, LAYER_CONTRASTS_PLOT.__eq__),
    )
    if len(arms) > 2:
        section("Every pair of arms, seed by seed", _pairwise_blocks(numbers.pairwise))
    diag = _figures(plots, lambda n: n.startswith("diagnosis_"))
    if diag:
        intro = Para(
            "For each arm at the end of training, each layer's key PR next to "
            "what shapes its keys: how unevenly its QK-Norm gains grew (gain CV), how sharp its attention "
            "became (entropy, max logit) and whether its key weights lost rank (W_K stable rank). Layers "
            f"flagged as collapsed ({collapse_rule()}) are shaded. These are associations at one point in "
            "training, not causes."
        )
        section("Why do some layers collapse?", [intro] + diag + _collapsed_blocks(numbers))
    section("Functional rank", _figures(plots, lambda n: n in ("functional_rank.png", "rank_sweep.png")))
    if numbers.kv_table is not None:
        section(
            "KV-cache headroom", headroom_blocks(numbers.kv_table, numbers.kv_tol) + _figures(plots, KV_PLOT.__eq__)
        )
    corr = _correlation_blocks(numbers.correlations, quantity)
    section(f"{cap} and downstream measures", corr + _figures(plots, lambda n: n == "pr_vs_downstream.png"))
    section(f"{cap} per layer at the end of training", _figures(plots, lambda n: n.startswith("layer_pr_")))
    section(f"{cap} per layer over training", _figures(plots, lambda n: n.startswith("pr_heatmap_")))
    if not plots:
        b += [Heading(2, "Figures"), Para("No data to plot yet.")]

    if ref_rows:
        section(
            "Compared with the seed study",
            [
                Para(
                    "The seed's published single-seed numbers (DESIGN.md; ≈: read off its figures) next to this "
                    "study's means over seeds at the same token counts, for the arms trained as the seed trained "
                    '(its Muon: Q, K, V, O stacked, Polar Express); "interpolated": linearly in log tokens '
                    "between a run's two neighbouring eval points."
                ),
                Table(ref_header, ref_rows, ["l"] + ["r"] * (len(ref_header) - 1)),
            ]
            + [Para(s) for s in ref_sentences],
        )

    summary = metric_summary(study.probes, arms=arms, finished=study.finished)
    st = _metric_table(summary, arms)
    if st is not None:
        sweep = any(p.path.name == "rank_sweep.png" for p in plots)
        section(
            "Every probe metric at the end of training",
            [
                Para(
                    "Mean over heads, then layers (per-layer metrics: over layers), then seeds, with a 95% t-interval "
                    "over seeds, at each arm's end point."
                    + (" The rank sweep `dloss_r*` is drawn above instead." if sweep else "")
                ),
                st,
            ],
        )

    shared = shared_settings_table(study)
    if shared is not None:
        b.append(Details("Settings shared by every run", [shared]))
    return b


# --- the writers ----------------------------------------------------------------------------------------


def write_report(
    study_dirs: StudyDirs, out_dir: str | Path | None = None, *, site: str = "k", metric: str = "pr_sv"
) -> Path:
    """Write ``out_dir/report.md``, ``out_dir/report.html`` (self-contained: figures embedded) and the
    figures under ``out_dir/plots/``; return the path of report.md.

    `study_dirs`: one study folder or several to merge. `out_dir` defaults to the first of them.
    `site`/`metric` choose the probe quantity of the table and figures (default: the seed's key PR).
    """
    study = load_study(study_dirs)
    out = Path(out_dir) if out_dir is not None else study.dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    numbers = compute_numbers(study, site, metric)
    plots = draw_figures(numbers, out / "plots")
    blocks = build_blocks(numbers, plots)
    path = out / "report.md"
    write_text(path, to_markdown(blocks, out))
    write_text(out / "report.html", to_html(blocks, f"{_title(study)} — rankscope report"))
    return path


def paradox_text(study_dirs: StudyDirs, *, site: str = "k", metric: str = "pr_sv") -> str:
    """The paradox table as aligned plain text, for the terminal at the end of `rankscope run`:
    means with 95% intervals over seeds, then each arm minus the first, seed by seed, in words."""
    study = load_study(study_dirs)
    numbers = compute_numbers(study, site, metric)
    table = numbers.table
    n_done = sum(r.done for r in study.runs)
    n_div = sum(r.diverged for r in study.runs)
    n_running = sum(r.running is not None for r in study.runs)
    seeds = max((len({r.seed for r in study.runs if r.arm == a}) for a in study.arms), default=0)
    head = (
        f"{_title(study)}: {len(study.runs)} runs, {n_done} finished"
        + (f", {n_div} diverged" if n_div else "")
        + (f", {n_running} still running" if n_running else "")
        + (
            f"; up to {seeds} seeds per arm"
            if seeds > 1
            else "; one seed per arm: no interval is possible"
            if seeds == 1
            else ""
        )
    )
    lines = [head, "", format_table(table, "text")]
    crossed = _crossed_sentences(numbers)
    if crossed:
        lines += ["", "two settings crossed (report.md has every effect):"] + [f"  {w}" for w in crossed]
    div = [
        f"{r.arm}/seed-{r.seed}"
        + (f" after {fmt_count(r.last_finite_tokens)}" if r.last_finite_tokens is not None else "")
        for r in study.runs
        if r.diverged
    ]
    if div:
        lines += ["", "diverged: " + ", ".join(div)]
    open_runs = [
        f"{r.arm}/seed-{r.seed}" + (f" at {fmt_count(r.last_tokens)}" if r.last_tokens is not None else "")
        for r in study.runs
        if not r.done and not r.diverged
    ]
    if open_runs:
        lines += ["", "unfinished: " + ", ".join(open_runs)]
    return "\n".join(lines)


__all__ = ["build_blocks", "write_report", "paradox_text"]
