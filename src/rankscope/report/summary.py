"""The report's written summary, generated from the numbers: what the study found and how sure it
is, in sentences a reader can quote. Nothing here is hand-written per study; every claim is tied to
an interval, and anything within seed noise is said to be so.

Also the comparison with the seed study's own figures (DESIGN.md's reference table), for studies
run with the seed's preset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .doc import md_escape
from .layers import Diagnosis, collapse_rule
from .load import StudyData
from .stats import NONE, PAIRED_CONSTANT, SINGLE, WELCH, Difference, fmt_interval, fmt_p, seeds_text, signed
from .tables import BETTER, decimals_for, fmt_tokens, quantity_series

# The seed's published single-seed figures (DESIGN.md), by the preset that restages each run:
# (label, quantity key, tokens, {arm kind: value}, read off a figure (approximate), source in seedref)
SEED_REFERENCE: dict[str, tuple[tuple[str, str, int, dict[str, float], bool, str], ...]] = {
    "seed-88m": (
        ("val loss", "val_loss", 16_000_000, {"qk": 4.233, "none": 4.253}, False, "16M"),
        ("mean key PR", "k:pr_sv", 16_000_000, {"qk": 43.5, "none": 46.8}, False, "16M"),
        ("mean key PR", "k:pr_sv", 25_000_000, {"qk": 30.0, "none": 51.0}, True, "25M"),
    ),
    "seed-1.5b": (
        ("mean key PR before RoPE", "k_pre:pr_sv", 50_000_000, {"qk": 65.7, "frozen": 59.6, "none": 63.3},
         False, "1.5B"),
    ),
}
SEED_PRESETS = tuple(SEED_REFERENCE)
_KIND_NAMES = {"qk": "QK-Norm", "frozen": "QK-Norm, gain frozen", "none": "no QK-Norm"}


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
        return f"{noun} {word} by {size:.{dec}f} in every seed (no seed-to-seed spread{'; ' + verdict if verdict else ''})"
    unpaired = ", unpaired Welch: fewer than 2 shared seeds" if d.test == WELCH else ""
    if not d.resolved:
        return (f"{noun} not distinguishable from seed noise ({signed(d.mean, dec)} "
                f"{fmt_interval(d.lo, d.hi, dec)}, {fmt_p(d.p)}{unpaired})")
    sign = 1.0 if d.mean > 0 else -1.0
    lo, hi = sorted((sign * d.lo, sign * d.hi))
    return (f"{noun} {word}{' (' + verdict + ')' if verdict else ''} by {size:.{dec}f} {fmt_interval(lo, hi, dec)} "
            f"({fmt_p(d.p)}{unpaired})")


def _row(table: pd.DataFrame, key: str, point: str = "end") -> str | None:
    for label, meta in table.attrs.get("rows", {}).items():
        if meta.get("quantity") == key and meta.get("point") == point and meta.get("comparable", True):
            return label
    return None


def _diff(table: pd.DataFrame, label: str | None, arm: str) -> Difference | None:
    if label is None:
        return None
    return next((d for d in table.attrs.get("diffs", {}).get(label, []) if d.a == arm), None)


def _dec(table: pd.DataFrame, label: str) -> int:
    arms = [a for a in dict.fromkeys(table.columns.get_level_values(0)) if a != BETTER]
    meta = table.attrs["rows"][label]
    return decimals_for([table.loc[label, (a, "mean")] for a in arms], label, meta.get("decimals"))


def _pair_sentence(table: pd.DataFrame, arm: str, ref: str) -> tuple[str | None, int]:
    """('Across 3 seeds at 1M tokens, qk-norm vs no-norm: validation loss lower by 0.020 [0.010,
    0.030] (p = 0.01); mean key PR lower by 3.1 [1.2, 5.0] (p = 0.02). ...', tests made)."""
    loss_label = _row(table, "val_loss")
    # the probe quantity of the table (key PR by default) is the one row keyed "site:metric"
    pr_label = next((lbl for lbl, m in table.attrs.get("rows", {}).items()
                     if m.get("point") == "end" and ":" in m.get("quantity", "") and m.get("comparable", True)), None)
    dl, dp = _diff(table, loss_label, arm), _diff(table, pr_label, arm)
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
    lead = (f"With one seed (no interval possible), at {where} tokens" if single
            else f"Across {seeds_text(n)} at {where} tokens")
    sentence = f"{lead}, {_b(arm)} vs {_b(ref)}: " + "; ".join(parts) + "."
    if dl is not None and dp is not None and dl.resolved and dp.resolved:
        if dl.mean < 0 and dp.mean < 0:
            sentence += (" Lower loss with fewer key dimensions: the seed's paradox holds here (whether fewer "
                         "dimensions cost anything is what the downstream measures address).")
        elif dl.mean < 0 < dp.mean:
            sentence += " Lower loss and more key dimensions together: no paradox between these two arms."
    elif dl is not None and dp is not None and SINGLE not in (dl.test, dp.test) and NONE not in (dl.test, dp.test):
        sentence += (" Whether the seed's paradox holds cannot be decided here: at least one difference is within "
                     "seed noise.")
    tests = sum(d.test not in (SINGLE, NONE) for d, _ in found)
    return sentence, tests


def _downstream_sentence(table: pd.DataFrame, arm: str, ref: str) -> tuple[str | None, int]:
    labels = [(lbl, m) for lbl, m in table.attrs.get("rows", {}).items()
              if m.get("point") == "end" and m.get("quantity") in
              ("ood_loss", "icl_score", "induction_loss", "induction_score", "induction_max") and m.get("comparable")]
    clear, unclear, single = [], [], []
    tests = 0
    for lbl, meta in labels:
        d = _diff(table, lbl, arm)
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
        bits.append(("Within seed noise: " if bits else
                     f"Downstream at {where} tokens, {_b(arm)} vs {_b(ref)}, within seed noise: ") + ", ".join(unclear))
    return ". ".join(bits) + ".", tests


def _correlation_sentence(corr: pd.DataFrame) -> str | None:
    ends = corr[(corr["scope"] == "run ends")]
    if not len(ends):
        return None
    ok = ends[np.isfinite(ends["pearson"].to_numpy(dtype=float))]
    if not len(ok):
        n = int(ends["n"].max()) if len(ends) else 0
        return (f"Correlations of mean key PR with the downstream measures across runs need at least three runs "
                f"with varied values (have {n}); see the pooled eval points below with care.")
    sig = ok[ok["pearson_p"] < 0.05]
    n = int(ok["n"].max())
    if not len(sig):
        return (f"Across runs at their end (one point per run, n = {n}), mean key PR did not correlate with any "
                "downstream measure at p < 0.05 (Pearson).")
    parts = [f"{r.quantity} r = {signed(r.pearson, 2)}"
             + (f" {fmt_interval(r.pearson_lo, r.pearson_hi, 2)}" if np.isfinite(r.pearson_lo) else "")
             + f" ({fmt_p(r.pearson_p)})" for r in sig.itertuples()]
    fragile = f" With only {n} points a correlation is fragile: one run can make or break it." if n < 6 else ""
    return (f"Across runs at their end (one point per run, n = {n}), mean key PR correlated with "
            + "; ".join(parts) + ". Correlation across runs mixes arm and seed effects; it is not a causal link."
            + fragile)


def summary_paragraphs(study: StudyData, table: pd.DataFrame, corr: pd.DataFrame, diags: Sequence[Diagnosis],
                       reference_lines: Sequence[str] = (), crossed_lines: Sequence[str] = ()) -> list[str]:
    """The report's opening paragraphs, in markdown. `crossed_lines`: when the arms cross two
    settings, the effects in words (factorial.sentences); they replace the arm-by-arm sentences
    against the first arm, which a grid makes arbitrary."""
    arms = study.arms
    runs = study.runs
    n_done = sum(r.done for r in runs)
    div = [r for r in runs if r.diverged]
    seeds_per_arm = {a: len({r.seed for r in runs if r.arm == a}) for a in arms}
    most = max(seeds_per_arm.values(), default=0)
    out = []
    presets = sorted({str(s["preset"]) for s in study.studies if s.get("preset")})
    budget = sorted({r.target_tokens for r in runs if r.target_tokens})
    fewest = min(seeds_per_arm.values(), default=0)
    scope = (f"{len(arms)} arm{'s' if len(arms) != 1 else ''} × {'' if fewest == most else 'up to '}{seeds_text(most)}"
             f" ({len(runs)} runs: {n_done} finished"
             + (f", {len(div)} diverged" if div else "")
             + (f", {len(runs) - n_done - len(div)} not finished" if len(runs) - n_done - len(div) else "") + ")"
             + (f", preset {', '.join(f'`{p}`' for p in presets)}" if presets else "")
             + (f", {' / '.join(fmt_tokens(b) for b in budget)} tokens per run" if budget else ""))
    # seeds that actually entered a comparison at the end (a seed still running or diverged does not)
    end_n = [d.n for lbl, ds in (table.attrs.get("diffs", {}) if len(table) else {}).items()
             if table.attrs["rows"][lbl].get("point") == "end" for d in ds]
    if most >= 2 and (not end_n or max(end_n) >= 2):
        how = ("Arms are compared seed by seed (same seed = same initial weights and batches): each difference "
               "comes with a 95% paired t-interval and p-value, and is called within seed noise when the "
               "interval covers 0.")
    elif most >= 2:
        how = ("Arms are compared seed by seed (same seed = same initial weights and batches), but at the end only "
               "one seed is shared by the arms compared (the others did not finish), so no interval is possible "
               "there: the differences below are single observations and could be seed noise.")
    else:
        how = ("With one seed per arm no interval is possible: every difference below is a single observation "
               "and could be seed noise. Run more seeds (e.g. `--seeds 0 1 2`) to get intervals.")
    out.append(f"This study ran {scope}. {how}")

    out += list(crossed_lines)
    ref = table.attrs.get("reference") if len(table) and not crossed_lines else None
    tests = 0
    if ref is not None:
        for a in arms:
            if a == ref:
                continue
            for make in (_pair_sentence, _downstream_sentence):
                s, k = make(table, a, ref)
                tests += k
                if s:
                    out.append(s)
        if tests >= 5:
            # Many tests at 0.05: some "findings" are expected by chance alone; say how many.
            out.append(f"Each p-value above is for one comparison; with {tests} comparisons, about "
                       f"{tests * 0.05:.1f} would fall below 0.05 by chance even with no real differences"
                       + (" (the table of every pair of arms below gives Holm-adjusted p-values)." if len(arms) > 2
                          else "."))
    elif not len(table):
        out.append("No evaluation point has been written yet.")
    s = _correlation_sentence(corr) if len(corr) else None
    if s:
        out.append(s)
    collapsed = [(d.arm, d.flagged) for d in diags if d.flagged]
    if diags:
        if collapsed:
            out.append("Collapsed layers (" + collapse_rule() + "): "
                       + "; ".join(f"{_b(a)} layer{'s' if len(f) > 1 else ''} {', '.join(map(str, f))}"
                                   for a, f in collapsed)
                       + ". The diagnosis figures show what those layers did differently.")
        else:
            out.append(f"No layer collapsed by the report's rule ({collapse_rule()}).")
    if div:
        many = len(div) > 1
        out.append(f"{len(div)} run{'s' if many else ''} diverged (loss became NaN or infinite) and "
                   f"count{'' if many else 's'} only up to {'their' if many else 'its'} last finite eval point: "
                   + ", ".join(f"{_b(r.arm)} seed {r.seed}" + (f" after {fmt_tokens(r.last_finite_tokens)} tokens"
                                                                  if r.last_finite_tokens is not None else "")
                               for r in div) + ".")
    out += list(reference_lines)
    return out


# --- the seed's reference figures ----------------------------------------------------------------

def _arm_kind(config: dict[str, Any]) -> str | None:
    """'qk' for the seed's QK-Norm arm (Muon, learned gain), 'frozen' for its gain-frozen arm, 'none'
    for its plain arm (Muon, no QK-Norm, no QK-Clip); None for anything else, including Muon that is
    not the seed's (Q, K, V, O not stacked, or not Polar Express; a run from before these settings
    existed trained them separately with Newton-Schulz)."""
    m, o = config.get("model") or {}, config.get("optim") or {}
    if str(o.get("name", "")).lower() != "muon" or float(o.get("qk_clip_tau") or 0) > 0:
        return None
    if o.get("muon_qkvo") != "stacked" or o.get("muon_ns") != "polar_express":
        return None
    return {"learned": "qk", "frozen": "frozen", "none": "none"}.get(str(m.get("qk_norm", "")).lower())


def _value_at(series: pd.DataFrame, arm: str, tokens: int) -> tuple[list[float], bool]:
    """Each run's value at `tokens`: exact when it has that eval point, else linearly interpolated
    in log tokens between its two neighbouring points (log-spaced grids rarely hit 16M exactly);
    runs that did not reach `tokens` are left out. Returns (values, any interpolated)."""
    vals, interp = [], False
    for _, g in series[series["arm"] == arm].groupby("seed"):
        g = g[g["tokens"] > 0].sort_values("tokens")
        t, v = g["tokens"].to_numpy(float), g["value"].to_numpy(float)
        if not len(t) or not (t[0] <= tokens <= t[-1]):
            continue
        hit = np.flatnonzero(t == tokens)
        if len(hit):
            vals.append(float(v[hit[-1]]))
        else:
            vals.append(float(np.interp(np.log(tokens), np.log(t), v)))
            interp = True
    return vals, interp


def seed_reference(study: StudyData, series: dict[str, pd.DataFrame]) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows, sentences) comparing this study with the seed's published numbers, for studies
    with a seed preset and the seed's arms (its Muon, with and without QK-Norm; at 1.5B also the
    frozen gain). `series`: quantity key -> series; missing keys are read from the study. Empty
    when not applicable."""
    from ..seedref import SEED_FIGURES_NOTE

    presets = [p for p in dict.fromkeys(str(s.get("preset")) for s in study.studies if s.get("preset"))
               if p in SEED_REFERENCE]
    if not presets:
        return [], [], []
    reference = SEED_REFERENCE[presets[0]]
    kinds: dict[str, str] = {}
    for r in study.runs:
        k = _arm_kind(r.config)
        if k and k not in kinds:
            kinds[k] = r.arm
    wanted = [k for k in ("qk", "frozen", "none") if any(k in row[3] for row in reference)]
    if not {"qk", "none"} <= set(kinds):
        return [], [], []
    shown = [k for k in wanted if k in kinds]
    header = ["quantity"] + [h for k in shown for h in (f"seed: {_KIND_NAMES[k]}", md_escape(kinds[k]))]
    rows, sentences, checks, sources = [], [], [], []
    for label, key, tokens, values, approx, source in reference:
        s = series.get(key)
        if s is None:
            s = quantity_series(study.scalars, study.probes, key)
        if s is None or not len(s):
            continue
        dec = 3 if "loss" in label else 1
        cells, means = [], {}
        for kind in shown:
            arm = kinds[kind]
            vals, interp = _value_at(s, arm, tokens)
            ref = values.get(kind)
            cells.append("–" if ref is None else (f"≈{ref:.0f}" if approx else f"{ref:.{dec}f}"))
            if not vals:
                cells.append("not reached")
                continue
            means[kind] = float(np.mean(vals))
            notes = ([seeds_text(len(vals))] if len(vals) > 1 else []) + (["interpolated"] if interp else [])
            cells.append(f"{means[kind]:.{dec}f}" + (f" ({', '.join(notes)})" if notes else ""))
        rows.append([f"{label} @ {fmt_tokens(tokens)}"] + cells)
        sources.append(f"{fmt_tokens(tokens)}: {SEED_FIGURES_NOTE[source]}")
        if "pr_sv" in key and {"qk", "none"} <= set(means):
            checks.append((fmt_tokens(tokens), (means["qk"] < means["none"]) == (values["qk"] < values["none"])))
    for same in (True, False):
        where = [w for w, ok in checks if ok == same]
        if where:
            sentences.append(f"At {' and '.join(where)} tokens the key PR order of {_b(kinds['qk'])} and "
                             f"{_b(kinds['none'])} " + ("matches" if same else "is the reverse of")
                             + " the seed's figure at the same point.")
    if sources:
        sentences.append("The seed's figures come from different runs: " + "; ".join(dict.fromkeys(sources)) + ".")
    return header, rows, sentences


__all__ = ["summary_paragraphs", "seed_reference", "SEED_REFERENCE", "SEED_PRESETS"]
