"""The seed's "paradox table": val loss and mean key PR at the middle and end of training, then the
downstream measures at the end, each arm's mean over seeds with its 95% interval, the best arm and
its seed-by-seed lead; computed from the series (`series.py`) and rendered for report.md and for a
terminal.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..settings.units import fmt_count
from .blocks import Block, Para, Table, md_escape, to_markdown
from .format import bare_p, decimals_for, describe, fmt_interval, fmt_mean_ci, resolving_decimals, signed, text_table
from .quantities import VAL_LOSS, probe_quantity
from .series import CELL_STATS, arm_order, cell_of, choose_points, downstream_series, quantity_series, seed_values
from .stats import LEVEL, NONE, PAIRED_CONSTANT, SINGLE, WELCH, Difference, holm, paired_difference

BETTER = "better"  # level-0 column of the paradox table holding the verdict per row
VERDICT_STATS = ("arm", "resolved", "margin", "lo", "hi", "p", "n", "test")
ALPHA = 1 - LEVEL  # the significance level that matches the 95% intervals


def paradox_table(
    scalars: pd.DataFrame,
    probes: pd.DataFrame,
    site: str = "k",
    metric: str = "pr_sv",
    *,
    arms: list[str] | None = None,
    finished: Collection[tuple[str, int]] | None = None,
    reference: str | None = None,
    contrasts: Sequence[tuple[str, str]] | None = None,
    downstream: bool = True,
) -> pd.DataFrame:
    """The seed's comparison table with intervals: val loss and mean key PR at the middle and end of
    training, then (when recorded) the downstream measures at the end.

    Rows are quantities ("val loss @ 0.5M", "mean key PR @ 0.5M", "val loss @ 1M", ..., "OOD loss @
    1M", "ICL score @ 1M", "induction loss @ 1M", "mean induction score @ 1M", "top induction score @
    1M"). Columns are a MultiIndex ``(arm, stat)`` with stat in ``mean``, ``lo``/``hi`` (95% t
    interval over seeds; NaN with one seed), ``sd``, ``n`` (seeds) and ``tokens`` (eval point used),
    followed by the verdict ``(better, ...)``: ``arm`` (the best mean, or None), ``resolved`` (its
    lead over the runner-up stands out from seed noise), ``margin`` (that lead, seed by seed, >= 0
    in the better direction), ``lo``/``hi`` (its 95% interval), ``p``, ``n`` (seeds paired) and
    ``test`` (paired t, Welch t when the two share fewer than two seeds, single seed, none).

    ``table.attrs["diffs"][row]`` holds, per row, one `stats.Difference` per contrast, treatment
    minus control, seed by seed: the study's `contrasts` (pairs of arm names), or when none are
    given each other arm minus the `reference` arm (default: the first arm); ``attrs["contrasts"]``
    lists the pairs. `format_table` prints them in words.

    Which points (see `choose_points`): END is per arm, the last eval point reached by all of its
    finished runs (all runs if `finished` is None or none finished); MIDDLE is the eval point closest
    to half of the last point all arms reached. When the arms' END points differ (an arm still
    running) the END rows are labelled "@ end", keep each arm's own token count in ``tokens`` and
    compare nothing: values at different token counts are not comparable.
    """
    pr_q = probe_quantity(site, metric)
    loss = quantity_series(scalars, probes, VAL_LOSS)
    pr = quantity_series(scalars, probes, pr_q)
    arms = [str(a) for a in arms] if arms is not None else arm_order(loss, pr)
    if BETTER in arms:
        raise ValueError(f"an arm may not be called {BETTER!r}: that name labels the verdict columns")
    ref = reference if reference in arms else (arms[0] if arms else None)
    if contrasts is None:
        pairs = [(a, ref) for a in arms if a != ref] if ref is not None else []
    else:
        pairs = [(str(a), str(b)) for a, b in contrasts if a in arms and b in arms]

    headline = [(VAL_LOSS, loss), (pr_q, pr)]
    extra = downstream_series(scalars, probes) if downstream else []
    rows: list[tuple[str, dict[str, Any], dict[str, dict[str, float]], dict[str, Any], list[Difference]]] = []
    for point, quantities in (("middle", headline), ("end", headline + extra)):
        for q, series in quantities:
            mid, ends = choose_points(series, arms, finished)
            if not ends:
                continue
            at = {a: (mid if point == "middle" else ends[a]) for a in ends}
            if point == "middle" and all(at[a] == ends[a] for a in ends):
                continue  # training too short for a distinct middle point
            values = {a: seed_values(series, a, at[a]) if a in at else {} for a in arms}
            cells = {a: cell_of(values[a]) for a in arms}
            used = {round(c["tokens"]) for c in cells.values() if c["n"]}
            same = len(used) <= 1
            where = fmt_count(next(iter(used))) if same and used else point
            higher = q.higher if same else None
            verdict = _verdict(values, cells, higher)
            diffs = [
                paired_difference(
                    {s: v for s, (v, _) in values[a].items()},
                    {s: v for s, (v, _) in values[b].items()},
                    names=(a, b),
                )
                for a, b in pairs
                if same and cells[a]["n"] and cells[b]["n"]
            ]
            meta = {
                "quantity": q.key,
                "point": point,
                "higher_is_better": q.higher,
                "comparable": same,
                "name": q.label,
                "decimals": q.decimals,
                "what": q.what,
            }
            rows.append((f"{q.label} @ {where}", meta, cells, verdict, diffs))

    columns = pd.MultiIndex.from_tuples(
        [(a, s) for a in arms for s in CELL_STATS] + [(BETTER, v) for v in VERDICT_STATS]
    )
    data = [
        [cells[a][s] for a in arms for s in CELL_STATS] + [verdict[v] for v in VERDICT_STATS]
        for _, _, cells, verdict, _ in rows
    ]
    table = pd.DataFrame(data, index=pd.Index([r[0] for r in rows], name="quantity"), columns=columns)
    for a in arms:
        table[(a, "n")] = table[(a, "n")].astype("int64")
    if len(table):
        table[(BETTER, "n")] = table[(BETTER, "n")].astype("int64")
        table[(BETTER, "resolved")] = table[(BETTER, "resolved")].astype(bool)
    table.attrs = {
        "site": site,
        "metric": metric,
        "reference": ref if contrasts is None else None,
        "contrasts": pairs,
        "rows": {label: meta for label, meta, *_ in rows},
        "diffs": {label: diffs for label, _, _, _, diffs in rows},
    }
    return table


def _verdict(
    values: dict[str, dict[int, tuple[float, int]]], cells: dict[str, dict[str, float]], higher: bool | None
) -> dict[str, Any]:
    """The best mean, and its lead over the runner-up measured seed by seed."""
    empty = {
        "arm": None,
        "resolved": False,
        "margin": math.nan,
        "lo": math.nan,
        "hi": math.nan,
        "p": math.nan,
        "n": 0,
        "test": "",
    }
    have = [a for a, c in cells.items() if c["n"] and np.isfinite(c["mean"])]
    if higher is None or len(have) < 2:
        return empty
    sign = 1.0 if higher else -1.0
    ranked = sorted(have, key=lambda a: -sign * cells[a]["mean"])
    best, runner = ranked[0], ranked[1]
    if cells[best]["mean"] == cells[runner]["mean"]:
        return dict(empty, margin=0.0)

    def seeds(a: str) -> dict[int, float]:
        return {s: v for s, (v, _) in values[a].items()}

    d = paired_difference(seeds(best), seeds(runner), names=(best, runner))
    lo, hi = sorted((sign * d.lo, sign * d.hi)) if d.has_interval else (math.nan, math.nan)
    margin = sign * d.mean
    resolved = bool(d.resolved and margin > 0)
    if resolved and len(have) > 2:
        # With k arms the all-pairs table tests k(k-1)/2 pairs and adjusts their p (Holm); the lead
        # of the best arm is one of those pairs, so it stands out only if it survives the same
        # adjustment, or the two tables would disagree about one comparison.
        pairs = list(combinations(have, 2))
        ps = [paired_difference(seeds(a), seeds(b)).p for a, b in pairs]
        adjusted = dict(zip(pairs, holm(ps)))
        p_holm = adjusted.get((best, runner), adjusted.get((runner, best), math.nan))
        resolved = bool(p_holm < ALPHA)
    return {
        "arm": best,
        "resolved": resolved,
        "margin": margin,
        "lo": lo,
        "hi": hi,
        "p": d.p,
        "n": d.n,
        "test": d.test,
    }


def table_arms(table: pd.DataFrame) -> list[str]:
    """The arms of a `paradox_table`, in its column order."""
    return [a for a in dict.fromkeys(table.columns.get_level_values(0)) if a != BETTER]


# --- rendering ------------------------------------------------------------------------------------


def _paradox_cells(table: pd.DataFrame, fmt: str) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows, arms) of the paradox table in `fmt` ('markdown' or 'text')."""
    arms = table_arms(table)
    rows_meta = table.attrs.get("rows", {})
    arm_n = {a: int(table[(a, "n")].max()) for a in arms}
    name = (lambda a: md_escape(a)) if fmt == "markdown" else (lambda a: a)  # noqa: E731
    header = ["What we measured" if fmt == "markdown" else "quantity"]
    header += [f"{name(a)} (n={arm_n[a]})" for a in arms]
    # an interval needs two seeds: with one per arm the column holds the lead alone, and says so
    header.append("lead of best [95% CI]" if max(arm_n.values(), default=0) >= 2 else "lead of best (1 seed)")
    body = []
    for label, row in table.iterrows():
        meta = rows_meta.get(label, {})
        d = decimals_for([row[(a, "mean")] for a in arms], str(label), meta.get("decimals"))
        best = row[(BETTER, "arm")]
        best = None if best is None or (isinstance(best, float) and math.isnan(best)) else str(best)
        resolved = bool(row[(BETTER, "resolved")])
        margin = row[(BETTER, "margin")]
        d = resolving_decimals(d, margin, row[(BETTER, "lo")], row[(BETTER, "hi")])
        # a lead that prints as 0 is a tie as far as the table shows: no arm is marked best
        tie = best is not None and np.isfinite(margin) and not resolved and signed(margin, d) == signed(0.0, d)
        line = [str(label)]
        for a in arms:
            n = int(row[(a, "n")])
            if not n:
                line.append("–")
                continue
            text = fmt_mean_ci(row[(a, "mean")], row[(a, "lo")], row[(a, "hi")], n, d)
            notes = []
            if n < arm_n[a]:
                notes.append(f"n={n}")
            if not meta.get("comparable", True):
                notes.append(f"at {fmt_count(row[(a, 'tokens')])}")
            if best == a and not tie:
                if fmt == "markdown":
                    text = f"✅ **{text}**" if resolved else f"**{text}**"
                else:
                    text = f"{text} *" if resolved else f"{text} (*)"
            if notes:
                text += f" ({', '.join(notes)})"
            line.append(text)
        if best is None or not np.isfinite(margin):
            line.append("–" if meta.get("comparable", True) else "not comparable")
        elif tie:
            line.append(f"tie ({signed(margin, d)})")
        else:
            text = signed(margin, d)
            if np.isfinite(row[(BETTER, "lo")]):
                text += f" {fmt_interval(row[(BETTER, 'lo')], row[(BETTER, 'hi')], d)}"
            line.append(text)
        body.append(line)
    return header, body, arms


def _legend(table: pd.DataFrame, fmt: str) -> str:
    arms = table_arms(table)
    most = max((int(table[(a, "n")].max()) for a in arms), default=0)
    star, best = ("✅", "**bold**") if fmt == "markdown" else ("*", "(*)")
    parts = []
    if most >= 2:
        parts.append("Cells: mean over seeds [95% t-interval over seeds]")
    else:
        parts.append("Cells: one seed per arm, so no interval is possible")
    parts.append(
        f"{star} the better arm (lower loss and ICL score, higher PR and induction score), with its "
        "seed-by-seed lead over the runner-up beyond seed noise (95% interval excludes 0"
        + (
            f", and its p stays below {ALPHA:g} after Holm's adjustment over the {len(arms) * (len(arms) - 1) // 2} "
            "pairs of arms, as in the table of every pair)"
            if len(arms) > 2
            else ")"
        )
        + "; "
        f"{best}{' without ✅' if fmt == 'markdown' else ''}: the best mean, not distinguishable "
        "from the runner-up" + (" (one seed: no test is possible)" if most < 2 else "")
    )
    parts.append("lead of best: its paired difference to the runner-up over the seeds both ran")
    parts.append(
        "higher PR counts as better by the seed's convention; whether more dimensions help is one of the open questions"
    )
    return "; ".join(parts) + "."


def comparison_rows(table: pd.DataFrame, fmt: str = "markdown") -> tuple[list[str], list[list[str]]]:
    """The seed-by-seed differences of `table` (its contrasts, treatment minus control) as a table."""
    rows_meta = table.attrs.get("rows", {})
    header = ["quantity", "comparison", "difference [95% CI]", "p (paired t)", "seeds", "reading"]
    out = []
    name = md_escape if fmt == "markdown" else str
    for label, diffs in table.attrs.get("diffs", {}).items():
        meta = rows_meta.get(label, {})
        arms = table_arms(table)
        d = decimals_for([table.loc[label, (a, "mean")] for a in arms], str(label), meta.get("decimals"))
        for diff in diffs:
            if diff.test == NONE:
                continue
            dd = resolving_decimals(d, diff.mean, diff.lo, diff.hi)
            text = signed(diff.mean, dd)
            if diff.has_interval:
                text += f" {fmt_interval(diff.lo, diff.hi, dd)}"
            # a constant difference has sd 0: the t statistic is undefined, not "p < 0.001"
            p = "–" if diff.test == SINGLE else "undefined (sd 0)" if diff.test == PAIRED_CONSTANT else bare_p(diff.p)
            if np.isfinite(diff.p_wilcoxon):
                p += f" (Wilcoxon {bare_p(diff.p_wilcoxon)})"
            seeds = str(diff.n) + (" (Welch: unpaired)" if diff.test == WELCH else "")
            out.append([str(label), f"{name(diff.a)} − {name(diff.b)}", text, p, seeds, name(diff.verdict())])
    return header, out


def contrast_words(table: pd.DataFrame, fmt: str = "markdown") -> str:
    """What the seed-by-seed differences under the table compare, e.g. "qk-norm − no-norm" or
    "each arm minus no-norm (the first arm)"."""
    name = (lambda a: f"**{md_escape(a)}**") if fmt == "markdown" else str
    ref = table.attrs.get("reference")
    if ref is not None:
        arms = table_arms(table)
        which = "the first arm" if arms and ref == arms[0] else "the reference arm"
        return f"each arm minus {name(ref)} ({which})"
    pairs = table.attrs.get("contrasts", [])
    if len(pairs) > 4:
        return f"the study's {len(pairs)} contrasts (treatment − control, named in each row)"
    what = "the study's contrast" + ("s" if len(pairs) != 1 else "")
    return f"{what}, " + "; ".join(f"{name(a)} − {name(b)}" for a, b in pairs)


def paradox_blocks(table: pd.DataFrame, *, legend: bool = True) -> list[Block]:
    """The paradox table and its seed-by-seed comparisons as report blocks."""
    if not len(table):
        return [Para("(no evaluation points yet)")]
    header, body, _ = _paradox_cells(table, "markdown")
    blocks: list[Block] = [Table(header, body, ["l"] + ["r"] * (len(header) - 1))]
    if legend:
        blocks.append(Para(f"*{_legend(table, 'markdown')}*", css="legend"))
    ch, crows = comparison_rows(table, "markdown")
    if crows:
        blocks.append(
            Para(
                f"Seed by seed: {contrast_words(table)}, on the seeds both ran (same seed = same initial "
                "weights and batches), with a 95% paired t "
                'interval and p-value; "not distinguishable from seed noise" when the interval covers 0.'
            )
        )
        blocks.append(Table(ch, crows, ["l", "l", "r", "r", "r", "l"]))
    return blocks


def format_table(table: pd.DataFrame, fmt: str = "markdown", *, legend: bool = True) -> str:
    """Render a `paradox_table` for a report (``markdown``) or a terminal (``text``).

    Cells read ``mean [95% t interval]`` over seeds (the value alone for one seed); the best mean per
    row is marked (✅ and bold in markdown, a trailing * in text when its lead over the runner-up
    stands out from seed noise; bold only, or (*), when it does not). Under the table, each arm
    minus the reference arm, seed by seed, in words.
    """
    if fmt not in ("markdown", "text"):
        raise ValueError(f"fmt must be 'markdown' or 'text', not {fmt!r}")
    arms = table_arms(table)
    if not len(table) or not arms:
        return "(no evaluation points yet)"
    if fmt == "markdown":
        return to_markdown(paradox_blocks(table, legend=legend), Path(".")).rstrip("\n")

    header, body, _ = _paradox_cells(table, "text")
    out = text_table(header, body)
    diffs = [(label, d) for label, ds in table.attrs.get("diffs", {}).items() for d in ds if d.test != NONE]
    if diffs:
        out += ["", f"seed by seed, {contrast_words(table, 'text')}, on the seeds both ran:"]
        rows_meta = table.attrs.get("rows", {})
        width = max(len(label) for label, _ in diffs)
        for label, diff in diffs:
            meta = rows_meta.get(label, {})
            dec = decimals_for([table.loc[label, (a, "mean")] for a in arms], label, meta.get("decimals"))
            out.append(f"  {label.ljust(width)}  {describe(diff, dec)}")
    if legend:
        out += ["", _legend(table, "text")]
    return "\n".join(out)


__all__ = [
    "BETTER",
    "VERDICT_STATS",
    "paradox_table",
    "table_arms",
    "comparison_rows",
    "contrast_words",
    "paradox_blocks",
    "format_table",
]
