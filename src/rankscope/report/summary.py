"""The report's written summary, generated from the numbers: what the study found and how sure it
is, in sentences a reader can quote. Nothing here is hand-written per study; every claim is tied to
an interval, and anything within seed noise is said to be so.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..settings.units import fmt_count
from .blocks import md_escape
from .format import decimals_for, fmt_interval, fmt_p, resolving_decimals, seeds_text, signed
from .kv_headroom import SHOWN_SITES
from .layer_tables import Diagnosis, collapse_rule, functional_rank_data
from .load import StudyData
from .paradox import table_arms
from .quantities import (
    AT,
    DOWNSTREAM,
    STATE_WORDS,
    WORSE,
    chance_level,
    chance_state,
    downstream_quantity,
    still_at_chance,
)
from .series import choose_points, seed_values
from .stats import NONE, PAIRED_CONSTANT, SINGLE, WELCH, Difference

if TYPE_CHECKING:
    from .analysis import ReportNumbers


def _b(arm: str) -> str:
    return f"**{md_escape(arm)}**"


def _phrase(d: Difference, dec: int, noun: str, *, judge: bool | None = None, single_note: bool = True) -> str:
    """One measure's difference in words, e.g. 'validation loss lower by 0.020 [0.010, 0.030]
    (p = 0.01)', 'OOD loss not distinguishable from seed noise (−0.004 [−0.02, 0.01], p = 0.5)'.
    `judge`: True if higher is better, False if lower is, None to leave it unsaid."""
    size = abs(d.mean)
    word = "higher" if d.mean > 0 else "lower"
    verdict = ""
    if judge is not None:
        verdict = "better" if (d.mean > 0) == judge else "worse"
    if d.test == SINGLE:
        return f"{noun} {word} by {size:.{dec}f}" + (" (one seed: no interval possible)" if single_note else "")
    if d.test == PAIRED_CONSTANT:
        if round(d.mean, dec) == 0:
            return f"{noun} the same in every seed"
        return (
            f"{noun} {word} by {size:.{dec}f} in every seed (no seed-to-seed spread{'; ' + verdict if verdict else ''})"
        )
    unpaired = ", unpaired Welch: fewer than 2 shared seeds" if d.test == WELCH else ""
    if not d.resolved:
        return (
            f"{noun} not distinguishable from seed noise ({signed(d.mean, dec)} "
            f"{fmt_interval(d.lo, d.hi, dec)}, {fmt_p(d.p)}{unpaired})"
        )
    sign = 1.0 if d.mean > 0 else -1.0
    lo, hi = sorted((sign * d.lo, sign * d.hi))
    dec = resolving_decimals(dec, size, lo, hi)
    return (
        f"{noun} {word}{' (' + verdict + ')' if verdict else ''} by {size:.{dec}f} {fmt_interval(lo, hi, dec)} "
        f"({fmt_p(d.p)}{unpaired})"
    )


def _row(table: pd.DataFrame, key: str, point: str = "end") -> str | None:
    for label, meta in table.attrs.get("rows", {}).items():
        if meta.get("quantity") == key and meta.get("point") == point and meta.get("comparable", True):
            return label
    return None


def _diff(table: pd.DataFrame, label: str | None, arm: str, ref: str) -> Difference | None:
    if label is None:
        return None
    return next((d for d in table.attrs.get("diffs", {}).get(label, []) if (d.a, d.b) == (arm, ref)), None)


def _dec(table: pd.DataFrame, label: str) -> int:
    arms = table_arms(table)
    meta = table.attrs["rows"][label]
    return decimals_for([table.loc[label, (a, "mean")] for a in arms], label, meta.get("decimals"))


def _pair_sentence(table: pd.DataFrame, arm: str, ref: str) -> tuple[str | None, int]:
    """('Across 3 seeds at 1M tokens, qk-norm vs no-norm: validation loss lower by 0.020 [0.010,
    0.030] (p = 0.01); mean key PR lower by 3.1 [1.2, 5.0] (p = 0.02). ...', tests made)."""
    loss_label = _row(table, "val_loss")
    # the probe quantity of the table (key PR by default) is the one row keyed "site:metric"
    pr_label = next(
        (
            lbl
            for lbl, m in table.attrs.get("rows", {}).items()
            if m.get("point") == "end" and ":" in m.get("quantity", "") and m.get("comparable", True)
        ),
        None,
    )
    dl, dp = _diff(table, loss_label, arm, ref), _diff(table, pr_label, arm, ref)
    found = [(d, lbl) for d, lbl in ((dl, loss_label), (dp, pr_label)) if d is not None and d.test != NONE]
    if not found:
        return None, 0
    where = found[0][1].split(" @ ")[-1]
    n = max(d.n for d, _ in found)
    parts = []
    single = all(d.test == SINGLE for d, _ in found)
    for d, label in found:
        noun = "validation loss" if label == loss_label else table.attrs["rows"][label]["name"]
        parts.append(_phrase(d, _dec(table, label), noun, single_note=not single))
    lead = (
        f"With one seed (no interval possible), at {where} tokens"
        if single
        else f"Across {seeds_text(n)} at {where} tokens"
    )
    sentence = f"{lead}, {_b(arm)} vs {_b(ref)}: " + "; ".join(parts) + "."
    if dl is not None and dp is not None and dl.resolved and dp.resolved:
        if dl.mean < 0 and dp.mean < 0:
            sentence += (
                " Lower loss with fewer key dimensions: the seed's paradox holds here (whether fewer "
                "dimensions cost anything is what the downstream measures address)."
            )
        elif dl.mean < 0 < dp.mean:
            sentence += " Lower loss and more key dimensions together: no paradox between these two arms."
    elif dl is not None and dp is not None and SINGLE not in (dl.test, dp.test) and NONE not in (dl.test, dp.test):
        sentence += (
            " Whether the seed's paradox holds cannot be decided here: at least one difference is within seed noise."
        )
    tests = sum(d.test not in (SINGLE, NONE) for d, _ in found)
    return sentence, tests


def _downstream_sentence(
    table: pd.DataFrame, arm: str, ref: str, at_chance: Collection[str] = ()
) -> tuple[str | None, int]:
    """The downstream measures of one contrast in words; those in `at_chance` (every arm still at
    chance) are left to the chance sentence, not compared."""
    labels = [
        (lbl, m)
        for lbl, m in table.attrs.get("rows", {}).items()
        if m.get("point") == "end"
        and m.get("quantity") in DOWNSTREAM
        and m.get("comparable")
        and m.get("quantity") not in at_chance
    ]
    clear, unclear, single = [], [], []
    tests = 0
    for lbl, meta in labels:
        d = _diff(table, lbl, arm, ref)
        if d is None or d.test == NONE:
            continue
        if d.test == SINGLE:
            single.append(_phrase(d, _dec(table, lbl), meta["name"], single_note=False))
            continue
        tests += 1
        if d.resolved or d.test == PAIRED_CONSTANT:
            clear.append(_phrase(d, _dec(table, lbl), meta["name"], judge=meta.get("higher_is_better")))
        else:
            unclear.append(meta["name"])
    if not (clear or unclear or single):
        return None, 0
    where = labels[0][0].split(" @ ")[-1]
    bits = []
    if clear or single:
        note = " (one seed: no interval possible)" if single and not clear else ""
        bits.append(f"Downstream at {where} tokens{note}, {_b(arm)} vs {_b(ref)}: " + "; ".join(clear + single))
    if unclear:
        bits.append(
            (
                "Within seed noise: "
                if bits
                else f"Downstream at {where} tokens, {_b(arm)} vs {_b(ref)}, within seed noise: "
            )
            + ", ".join(unclear)
        )
    return ". ".join(bits) + ".", tests


def chance_sentences(numbers: ReportNumbers) -> tuple[list[str], set[str]]:
    """Measures that have not left their chance or floor level by the end (`quantities.
    still_at_chance`), in words (their differences between arms are not findings yet), and the
    keys of those still at chance in every arm."""
    study = numbers.study
    out = []
    still = []
    everywhere: set[str] = set()
    for key, series in numbers.series.items():
        level = chance_level(key, study)
        if level is None or not len(series):
            continue
        _, ends = choose_points(series, study.arms, study.finished)
        states = {
            a: chance_state(key, [v for v, _ in seed_values(series, a, t).values()], study) for a, t in ends.items()
        }
        stuck = [a for a, st in states.items() if st in (AT, WORSE)]
        if not stuck:
            continue
        name = downstream_quantity(key).label if key in DOWNSTREAM else key
        if len(stuck) == len(ends):
            everywhere.add(key)
        parts = []
        for state in (AT, WORSE):
            who = [a for a in stuck if states[a] == state]
            if who:
                arms = "every arm" if len(who) == len(ends) else ", ".join(_b(a) for a in who)
                parts.append(f"{STATE_WORDS[state]} in {arms}")
        meaning = f": {level.worse}" if any(states[a] == WORSE for a in stuck) and level.worse else ""
        still.append(f"{name} {' and '.join(parts)} (chance: {level.label}{meaning})")
    if still:
        out.append(
            "Not yet past chance at the end: "
            + "; ".join(still)
            + ". Differences between arms in these measures are not findings yet; they need longer training "
            "(the figures draw the chance level)."
        )
    fr, _, _ = functional_rank_data(study.probes, study.arms, study.finished)
    floor = [
        a
        for a, d in fr.items()
        if still_at_chance("k:functional_rank", d.loc[d["series"] == "functional rank", "mean"].tolist(), study)
    ]
    if floor:
        who = "every arm" if len(floor) == len(fr) else ", ".join(_b(a) for a in floor)
        out.append(
            f"Functional rank is at its floor, 1, in every layer of {who}: projecting each head's keys onto "
            "their single top direction already keeps the loss within tolerance, so at this budget the keys' "
            "extra dimensions are not used for the loss yet, and functional rank cannot tell the arms apart."
        )
    if numbers.kv_table is not None and len(numbers.kv_table):
        floored = numbers.kv_table[
            (numbers.kv_table["floor"] == numbers.kv_table["rows"]) & (numbers.kv_table["rows"] > 0)
        ]
        if len(floored):
            who = "; ".join(f"{_b(r.arm)} ({SHOWN_SITES[r.site]})" for r in floored.itertuples())
            out.append(
                f"KV-cache headroom is at its floor for {who}: every kv head keeps the loss within tolerance at "
                "rank 1, the smallest rank tried, so the keys are barely used at this point of training and the "
                "saving the table shows is an upper bound of a model that does not need its keys yet."
            )
    return out, everywhere


def _correlation_sentence(corr: pd.DataFrame) -> str | None:
    ends = corr[(corr["scope"] == "run ends")]
    if not len(ends):
        return None
    ok = ends[np.isfinite(ends["pearson"].to_numpy(dtype=float))]
    if not len(ok):
        n = int(ends["n"].max()) if len(ends) else 0
        return (
            f"Correlations of mean key PR with the downstream measures across runs need at least three runs "
            f"with varied values (have {n}); see the pooled eval points below with care."
        )
    sig = ok[ok["pearson_p"] < 0.05]
    n = int(ok["n"].max())
    if not len(sig):
        return (
            f"Across runs at their end (one point per run, n = {n}), mean key PR did not correlate with any "
            "downstream measure at p < 0.05 (Pearson)."
        )
    within = {r.key: r for r in corr[corr["scope"] == "within arms"].itertuples()}

    def inside(r: object) -> str:
        w = within.get(r.key)  # type: ignore[attr-defined]
        if w is None or not np.isfinite(w.pearson):
            return ""
        if w.pearson_p < 0.05:
            return f"; within arms r = {signed(w.pearson, 2)}, {fmt_p(w.pearson_p)}, so it holds among seeds too"
        if np.sign(w.pearson) == np.sign(r.pearson) and abs(w.pearson) >= 0.5 * abs(r.pearson):  # type: ignore[attr-defined]
            return (
                f"; within arms r = {signed(w.pearson, 2)}, {fmt_p(w.pearson_p)}: too few runs to tell whether it "
                "holds among the seeds of one arm"
            )
        return (
            f"; within arms only r = {signed(w.pearson, 2)}, {fmt_p(w.pearson_p)}: this correlation is the "
            "difference between the arms, not runs that vary together"
        )

    parts = [
        f"{r.quantity} r = {signed(r.pearson, 2)}"
        + (f" {fmt_interval(r.pearson_lo, r.pearson_hi, 2)}" if np.isfinite(r.pearson_lo) else "")
        + f" ({fmt_p(r.pearson_p)}"
        + inside(r)
        + ")"
        for r in sig.itertuples()
    ]
    fragile = f" With only {n} points a correlation is fragile: one run can make or break it." if n < 6 else ""
    arms = int(ok["arms"].max())
    clusters = (
        f" Across {arms} arms, arms that differ in both measures make a correlation by themselves; the within-arm "
        "r (each arm's mean removed) is the test of whether the two move together."
        if arms > 1
        else ""
    )
    return (
        f"Across runs at their end (one point per run, n = {n}), mean key PR correlated with "
        + "; ".join(parts)
        + "."
        + clusters
        + " Either way a correlation is not a causal link."
        + fragile
    )


def summary_paragraphs(
    study: StudyData,
    table: pd.DataFrame,
    corr: pd.DataFrame,
    diags: Sequence[Diagnosis],
    reference_lines: Sequence[str] = (),
    crossed_lines: Sequence[str] = (),
    chance_lines: Sequence[str] = (),
    at_chance: Collection[str] = (),
    layer_line: str | None = None,
) -> list[str]:
    """The report's opening paragraphs, in markdown: the study's contrasts first (the pairs of
    arms it exists to compare, `table.attrs["contrasts"]`), then `crossed_lines`: when the arms
    cross two settings, the effects in words (factorial.sentences)."""
    arms = study.arms
    runs = study.runs
    n_done = sum(r.done for r in runs)
    div = [r for r in runs if r.diverged]
    seeds_per_arm = {a: len({r.seed for r in runs if r.arm == a}) for a in arms}
    waiting = [a for a, n in seeds_per_arm.items() if not n]  # declared, no run folder yet
    seeds_per_arm = {a: n for a, n in seeds_per_arm.items() if n} or seeds_per_arm
    most = max(seeds_per_arm.values(), default=0)
    out = []
    presets = sorted({str(s["preset"]) for s in study.studies if s.get("preset")})
    budget = sorted({r.target_tokens for r in runs if r.target_tokens})
    fewest = min(seeds_per_arm.values(), default=0)
    scope = (
        f"{len(arms)} arm{'s' if len(arms) != 1 else ''} × {'' if fewest == most else 'up to '}{seeds_text(most)}"
        f" ({len(runs)} runs: {n_done} finished"
        + (f", {len(div)} diverged" if div else "")
        + (f", {len(runs) - n_done - len(div)} not finished" if len(runs) - n_done - len(div) else "")
        + ")"
        + (f", preset {', '.join(f'`{p}`' for p in presets)}" if presets else "")
        + (f", {' / '.join(fmt_count(b) for b in budget)} tokens per run" if budget else "")
        + (f"; not started yet: {', '.join(_b(a) for a in waiting)}" if waiting else "")
    )
    # seeds that actually entered a comparison at the end (a seed still running or diverged does not)
    end_n = [
        d.n
        for lbl, ds in (table.attrs.get("diffs", {}) if len(table) else {}).items()
        if table.attrs["rows"][lbl].get("point") == "end"
        for d in ds
    ]
    if most >= 2 and (not end_n or max(end_n) >= 2):
        how = (
            "Arms are compared seed by seed (same seed = same initial weights and batches): each difference "
            "comes with a 95% paired t-interval and p-value, and is called within seed noise when the "
            "interval covers 0."
        )
    elif most >= 2:
        how = (
            "Arms are compared seed by seed (same seed = same initial weights and batches), but at the end only "
            "one seed is shared by the arms compared (the others did not finish), so no interval is possible "
            "there: the differences below are single observations and could be seed noise."
        )
    elif study.is_series:
        how = (
            "Each arm is one training run's checkpoint series (`rankscope analyze --series`), so no interval "
            "over seeds is possible: what changes between points is one run's history, and a difference "
            "between arms is a single observation. Series of more seeds of each arm give intervals."
        )
    else:
        how = (
            "With one seed per arm no interval is possible: every difference below is a single observation "
            "and could be seed noise. Run more seeds (e.g. `--seeds 0 1 2`) to get intervals."
        )
    out.append(f"This study ran {scope}. {how}")

    pairs = [tuple(p) for p in table.attrs.get("contrasts", [])] if len(table) else []
    tests = 0
    if pairs:
        for a, ref in pairs:
            for s, k in (_pair_sentence(table, a, ref), _downstream_sentence(table, a, ref, at_chance)):
                tests += k
                if s:
                    out.append(s)
        if tests >= 5:
            # Many tests at 0.05: some "findings" are expected by chance alone; say how many.
            out.append(
                f"Each p-value above is for one comparison; with {tests} comparisons, about "
                f"{tests * 0.05:.1f} would fall below 0.05 by chance even with no real differences"
                + (" (the table of every pair of arms below gives Holm-adjusted p-values)." if len(arms) > 2 else ".")
            )
    elif not len(table):
        out.append("No evaluation point has been written yet.")
    out += list(chance_lines)
    out += list(crossed_lines)
    s = _correlation_sentence(corr) if len(corr) else None
    if s:
        out.append(s)
    collapsed = [(d.arm, d.flagged) for d in diags if d.flagged]
    if diags:
        if collapsed:
            out.append(
                "Collapsed layers ("
                + collapse_rule()
                + "): "
                + "; ".join(f"{_b(a)} layer{'s' if len(f) > 1 else ''} {', '.join(map(str, f))}" for a, f in collapsed)
                + ". The diagnosis figures show what those layers did differently."
            )
        else:
            out.append(f"No layer collapsed by the report's rule ({collapse_rule()}).")
    if layer_line:
        out.append(layer_line)
    if div:
        many = len(div) > 1
        out.append(
            f"{len(div)} run{'s' if many else ''} diverged (loss became NaN or infinite) and "
            f"count{'' if many else 's'} only up to {'their' if many else 'its'} last finite eval point: "
            + ", ".join(
                f"{_b(r.arm)} seed {r.seed}"
                + (f" after {fmt_count(r.last_finite_tokens)} tokens" if r.last_finite_tokens is not None else "")
                for r in div
            )
            + "."
        )
    out += list(reference_lines)
    return out


__all__ = ["summary_paragraphs"]
