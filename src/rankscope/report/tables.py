"""Seed aggregation and the seed study's "paradox table", from the store's tidy tables.

Pure pandas: DataFrames in, DataFrames or strings out; no files, no plots, no torch (ArviZ's split
of statistics from plotting).

Conventions used everywhere in the report:

* a *series* is a tidy frame ``arm, seed, tokens, value``: one number per run per eval point;
* "mean key PR" is ``pr_sv`` at site ``k`` averaged over heads, then over layers, per run and eval
  point (the seed's headline number); an eval point whose probe rows were only partly written
  (a run killed mid-write) is dropped rather than averaged over the layers that made it to disk;
* seeds are aggregated last: mean, sample standard deviation (ddof=1), and their count.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from typing import Any

import numpy as np
import pandas as pd

BETTER = "better"  # level-0 column of the paradox table holding the verdict per row

SITE_NAMES = {
    "k": "key", "k_pre": "pre-RoPE key", "q": "query", "q_pre": "pre-RoPE query",
    "v": "value", "o": "head-output", "attn": "attention", "q_gain": "query-gain", "k_gain": "key-gain",
}
SITE_DESCRIPTIONS = {
    "k": "keys after QK-Norm and RoPE", "k_pre": "keys before RoPE",
    "q": "queries after QK-Norm and RoPE", "q_pre": "queries before RoPE",
    "v": "values", "o": "each head's attention output",
}
METRIC_NAMES = {
    "pr_sv": "PR", "pr_eig": "PR (covariance)", "erank": "effective rank",
    "stable_rank": "stable rank", "r90": "r90",
}
# Dimension counts: more is better, the seed's convention ("✅ higher"). Other metrics (entropy,
# logits, gains) have no agreed direction, so no arm is marked better on them.
RANK_METRICS = frozenset(METRIC_NAMES)


# --- small formatting helpers ------------------------------------------------------------------

def fmt_tokens(t: float) -> str:
    """Token counts the way papers write them: 0, 50k, 0.5M, 1M, 16.4M, 25M, 1.5B."""
    t = float(t)
    if not math.isfinite(t):
        return "?"
    if t == 0:
        return "0"
    a = abs(t)
    # from 100k up we say 0.1M rather than 100k, so one run's axis reads in one unit (0.5M, 1M)
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e5, "M"), (1e3, "k")):
        if a >= div:
            unit = {"M": 1e6, "k": 1e3}.get(suffix, div)
            return f"{t / unit:.3g}{suffix}"
    return f"{t:.0f}"


def quantity_name(site: str, metric: str) -> str:
    """'mean key PR' for (k, pr_sv); 'mean value effective rank' for (v, erank), and so on."""
    return f"mean {SITE_NAMES.get(site, site)} {METRIC_NAMES.get(metric, metric)}"


# --- per-run series ----------------------------------------------------------------------------

def loss_series(scalars: pd.DataFrame, column: str = "val_loss") -> pd.DataFrame:
    """``arm, seed, tokens, value`` of one scalar column, rows where it was measured."""
    if column not in scalars.columns or not len(scalars):
        return pd.DataFrame({"arm": pd.Series(dtype=str), "seed": pd.Series(dtype="int64"),
                             "tokens": pd.Series(dtype="int64"), "value": pd.Series(dtype=float)})
    df = scalars[["arm", "seed", "tokens", column]].rename(columns={column: "value"})
    df = df[pd.to_numeric(df["value"], errors="coerce").notna()]
    # a resumed run may repeat an eval point; keep its last write
    return df.drop_duplicates(["arm", "seed", "tokens"], keep="last").sort_values(
        ["arm", "seed", "tokens"], ignore_index=True)


def layer_means(probes: pd.DataFrame, site: str = "k", metric: str = "pr_sv") -> pd.DataFrame:
    """``arm, seed, tokens, layer, value``: one metric averaged over the heads of each layer.

    Per-layer metrics (head == -1, e.g. gain statistics) pass through unchanged. Eval points that
    hold fewer (layer, head) rows than the run's fullest point are dropped: they are a torn write.
    """
    return _layer_means_of(probes[(probes["site"] == site) & (probes["metric"] == metric)])


def _layer_means_of(sub: pd.DataFrame) -> pd.DataFrame:
    """`layer_means` of rows already restricted to one (site, metric)."""
    sub = sub.drop_duplicates(["arm", "seed", "tokens", "layer", "head"], keep="last")
    if not len(sub):
        return pd.DataFrame(columns=["arm", "seed", "tokens", "layer", "value"])
    rows = sub.groupby(["arm", "seed", "tokens"])["head"].transform("size")
    full = rows.groupby([sub["arm"], sub["seed"]]).transform("max")
    sub = sub[rows == full]
    # NaN values (a degenerate head) are skipped by mean(), so they do not poison the layer
    out = sub.groupby(["arm", "seed", "tokens", "layer"], as_index=False)["value"].mean()
    return out.sort_values(["arm", "seed", "tokens", "layer"], ignore_index=True)


def head_layer_mean(probes: pd.DataFrame, site: str = "k", metric: str = "pr_sv") -> pd.DataFrame:
    """``arm, seed, tokens, value``: mean over heads, then over layers (the seed's averaging).

    Averaging heads first gives every layer the same weight even where a layer has fewer heads
    with a defined value, which is what "mean PR over layers" in the seed means.
    """
    lm = layer_means(probes, site, metric)
    if not len(lm):
        return pd.DataFrame(columns=["arm", "seed", "tokens", "value"])
    return lm.groupby(["arm", "seed", "tokens"], as_index=False)["value"].mean()


def seed_stats(series: pd.DataFrame, by: Iterable[str] = ("arm", "tokens")) -> pd.DataFrame:
    """Aggregate a series over seeds: mean, sd (ddof=1; NaN for one seed), min, max, n."""
    by = list(by)
    g = series.groupby(by)["value"]
    out = g.agg(mean="mean", sd="std", min="min", max="max", n="count").reset_index()
    return out


# --- which eval points the table compares ---------------------------------------------------------

def _run_tokens(series: pd.DataFrame) -> dict[tuple[str, int], np.ndarray]:
    return {(str(a), int(s)): np.sort(g["tokens"].to_numpy())
            for (a, s), g in series.groupby(["arm", "seed"])}


def _counting_runs(runs: list[tuple[str, int]], per_run: dict, finished: Collection | None) -> list:
    """The runs whose progress defines an arm's END.

    Finished runs, when the caller knows some: a seed still going (or killed early) then lowers
    the seed count of the END cell instead of pulling END back to wherever it is. Otherwise every
    run that has passed token 0 (a run that only wrote its initial point says nothing about
    training), and failing that, every run.
    """
    if finished is not None:
        done = [r for r in runs if r in finished]
        if done:
            return done
    moved = [r for r in runs if per_run[r][-1] > 0]
    return moved or runs


def choose_points(series: pd.DataFrame, arms: Iterable[str],
                  finished: Collection[tuple[str, int]] | None = None) -> tuple[int | None, dict[str, int]]:
    """(MIDDLE, {arm: END}) in tokens for one quantity.

    END of an arm: the last eval point reached by all of its counting runs (see `_counting_runs`).
    MIDDLE: the eval point, shared by all counting runs, closest to half of the smallest END (the
    last point every arm reached), ties going to the later point; token 0 is used only if nothing
    else is shared.
    """
    per_run = _run_tokens(series)
    ends: dict[str, int] = {}
    counted: list[tuple[str, int]] = []
    for arm in arms:
        runs = [r for r in per_run if r[0] == arm]
        if not runs:
            continue
        counting = _counting_runs(runs, per_run, finished)
        counted += counting
        ends[arm] = int(min(per_run[r][-1] for r in counting))
    if not ends:
        return None, {}
    last_shared = min(ends.values())
    shared = set.intersection(*(set(per_run[r].tolist()) for r in counted))
    candidates = sorted(t for t in shared if 0 < t <= last_shared)
    if not candidates:  # eval grids that do not line up: fall back to any point of any counted run
        candidates = sorted({t for r in counted for t in per_run[r].tolist() if 0 < t <= last_shared})
    if not candidates:
        return 0, ends
    mid = min(candidates, key=lambda t: (abs(t - last_shared / 2), -t))
    return int(mid), ends


def cell(series: pd.DataFrame, arm: str, tokens: int) -> dict[str, float]:
    """Mean, sd, n over the seeds of `arm` at eval point `tokens`, and the tokens actually used.

    A run contributes its value at exactly `tokens` when it has that point. If its eval grid does not
    contain it (grids that do not line up) it contributes its nearest point, but only inside its own
    range and within half its eval spacing: a run never lends a value from a point it has not reached.
    """
    vals, used = [], []
    for _, g in series[series["arm"] == arm].groupby("seed"):
        t = g["tokens"].to_numpy()
        v = g["value"].to_numpy(dtype=float)
        hit = np.flatnonzero(t == tokens)
        if len(hit):
            i = hit[-1]
        else:
            if len(t) < 2 or not (t.min() <= tokens <= t.max()):
                continue
            i = int(np.argmin(np.abs(t - tokens)))
            if abs(t[i] - tokens) > 0.5 * np.median(np.diff(np.sort(t))):
                continue
        if np.isfinite(v[i]):
            vals.append(v[i])
            used.append(t[i])
    n = len(vals)
    return {
        "mean": float(np.mean(vals)) if n else math.nan,
        "sd": float(np.std(vals, ddof=1)) if n >= 2 else math.nan,
        "n": n,
        "tokens": float(np.mean(used)) if n else math.nan,
    }


# --- a confidence interval without scipy ----------------------------------------------------------

# Student t 0.975 quantiles for 1..30 degrees of freedom (any statistics table).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: float) -> float:
    """Two-sided 95% Student t quantile for (possibly fractional, Welch) degrees of freedom.

    Table values, interpolated linearly in 1/df (the quantile is nearly linear in 1/df); past 30,
    the Cornish-Fisher expansion around z = 1.96, good to 1e-4 there.
    """
    if not df > 0:
        return math.nan
    if df >= 30:
        z = 1.959964
        return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
    if df <= 1:
        return _T975[0]
    lo = int(math.floor(df))
    hi = lo + 1
    q_lo, q_hi = _T975[lo - 1], (_T975[hi - 1] if hi <= 30 else t975(30.0))
    w = (1 / lo - 1 / df) / (1 / lo - 1 / hi)
    return q_lo + w * (q_hi - q_lo)


def welch_ci95(sd1: float, n1: int, sd2: float, n2: int) -> float:
    """Half-width of the 95% Welch confidence interval of a difference of two means.

    Welch rather than a paired test: seed k of two arms shares its data order and initialisation
    only if the trainer makes it so, and assuming pairing would be the optimistic choice.
    """
    if n1 < 2 or n2 < 2 or not (np.isfinite(sd1) and np.isfinite(sd2)):
        return math.nan
    v1, v2 = sd1**2 / n1, sd2**2 / n2
    se2 = v1 + v2
    if se2 == 0:
        return 0.0
    dof = se2**2 / (v1**2 / (n1 - 1) + v2**2 / (n2 - 1))
    return t975(dof) * math.sqrt(se2)


# --- the paradox table -----------------------------------------------------------------------------

def _arm_order(*frames: pd.DataFrame) -> list[str]:
    seen: list[str] = []
    for f in frames:
        for a in f["arm"].astype(str).tolist() if len(f) else []:
            if a not in seen:
                seen.append(a)
    return seen


def paradox_table(scalars: pd.DataFrame, probes: pd.DataFrame, site: str = "k", metric: str = "pr_sv",
                  *, arms: list[str] | None = None,
                  finished: Collection[tuple[str, int]] | None = None) -> pd.DataFrame:
    """The seed's comparison table: val loss and mean key PR at the middle and end of training.

    Rows are quantities ("val loss @ 0.5M", "mean key PR @ 0.5M", "val loss @ 1M", ...); columns
    are a MultiIndex ``(arm, stat)`` with stat in ``mean``, ``sd`` (only when some cell has two or
    more seeds), ``n`` (seeds averaged) and ``tokens`` (eval point used), followed by
    ``("better", "arm")`` (the better arm, or None), ``("better", "margin")`` (its lead over the
    runner-up, in the row's units, always >= 0) and, with an sd column, ``("better", "ci95")`` (half-
    width of a Welch 95% interval for that lead).

    Which points (see `choose_points`): END is per arm, the last eval point reached by all of its
    finished runs (all runs if `finished` is None or none finished); MIDDLE is the eval point closest
    to half of the last point all arms reached. When the arms' END points differ (an arm still
    running) the END rows are labelled "@ end", keep each arm's own token count in ``tokens`` and
    name no better arm: values at different token counts are not comparable.

    Better: lower loss; higher PR (the seed's convention); none for metrics without a direction.
    ``table.attrs`` keeps ``site``, ``metric`` and per-row ``rows`` metadata used by `format_table`.
    """
    loss = loss_series(scalars)
    pr = head_layer_mean(probes, site, metric)
    arms = [str(a) for a in arms] if arms is not None else _arm_order(loss, pr)
    if BETTER in arms:
        raise ValueError(f"an arm may not be called {BETTER!r}: that name labels the verdict columns")

    quantities = [("val loss", loss, False, "val_loss"),
                  (quantity_name(site, metric), pr, True if metric in RANK_METRICS else None, "probe")]
    points = {q[0]: choose_points(q[1], arms, finished) for q in quantities}

    # gather each row's cells first: which columns exist depends on all of them
    rows: list[tuple[str, dict[str, Any], dict[str, dict[str, float]]]] = []
    for point in ("middle", "end"):
        for name, series, higher, kind in quantities:
            mid, ends = points[name]
            if not ends:
                continue
            at = {a: (mid if point == "middle" else ends[a]) for a in ends}
            if point == "middle" and all(at[a] == ends[a] for a in ends):
                continue  # training too short for a distinct middle point
            cells = {a: cell(series, a, at[a]) if a in at else cell(series.iloc[:0], a, 0) for a in arms}
            used = {round(c["tokens"]) for c in cells.values() if c["n"]}
            same = len(used) <= 1
            where = fmt_tokens(next(iter(used))) if same and used else point
            meta = {"quantity": kind, "point": point, "higher_is_better": higher, "comparable": same,
                    "name": name}
            rows.append((f"{name} @ {where}", meta, cells))

    with_sd = any(c["n"] >= 2 for _, _, cells in rows for c in cells.values())
    stats = ["mean", "sd", "n", "tokens"] if with_sd else ["mean", "n", "tokens"]
    verdict = ["arm", "margin", "ci95"] if with_sd else ["arm", "margin"]
    columns = pd.MultiIndex.from_tuples([(a, s) for a in arms for s in stats] + [(BETTER, v) for v in verdict])

    data = []
    for _label, meta, cells in rows:
        line: list[Any] = [cells[a][s] for a in arms for s in stats]
        best, margin, ci = _verdict(cells, meta["higher_is_better"] if meta["comparable"] else None)
        line += [best, margin, ci][: len(verdict)]
        data.append(line)
    table = pd.DataFrame(data, index=pd.Index([r[0] for r in rows], name="quantity"), columns=columns)
    for a in arms:
        table[(a, "n")] = table[(a, "n")].astype("int64")
    table.attrs = {"site": site, "metric": metric, "rows": {label: meta for label, meta, _ in rows}}
    return table


def _verdict(cells: dict[str, dict[str, float]], higher: bool | None) -> tuple[str | None, float, float]:
    """(better arm, its lead over the runner-up, 95% CI half-width of that lead)."""
    have = [(a, c) for a, c in cells.items() if c["n"] and np.isfinite(c["mean"])]
    if higher is None or len(have) < 2:
        return None, math.nan, math.nan
    sign = 1.0 if higher else -1.0
    ranked = sorted(have, key=lambda ac: -sign * ac[1]["mean"])
    (a1, c1), (_, c2) = ranked[0], ranked[1]
    margin = sign * (c1["mean"] - c2["mean"])
    if margin == 0:
        return None, 0.0, math.nan
    return a1, margin, welch_ci95(c1["sd"], c1["n"], c2["sd"], c2["n"])


# --- metrics summary (every site and metric at the end of training) --------------------------------

def metric_summary(probes: pd.DataFrame, *, arms: list[str] | None = None,
                   finished: Collection[tuple[str, int]] | None = None) -> pd.DataFrame:
    """Every recorded (site, metric) at each arm's END: mean over heads then layers, then seeds.

    Index ``(site, metric)``; columns ``(arm, stat)`` with stat in mean, sd, n, tokens.
    """
    arms = [str(a) for a in arms] if arms is not None else _arm_order(probes)
    site_order = {s: i for i, s in enumerate(["k", "k_pre", "q", "q_pre", "v", "o", "attn", "q_gain", "k_gain"])}
    # one partition pass over the (possibly millions of) probe rows, not one filter per metric
    groups = {(str(s), str(m)): g for (s, m), g in probes.groupby(["site", "metric"], sort=False)}
    pairs = sorted(groups, key=lambda p: (site_order.get(p[0], 99), p[0], p[1]))
    out = []
    for site, metric in pairs:
        lm = _layer_means_of(groups[(site, metric)])
        series = lm.groupby(["arm", "seed", "tokens"], as_index=False)["value"].mean()
        _, ends = choose_points(series, arms, finished)
        row = {}
        for a in arms:
            c = cell(series, a, ends[a]) if a in ends else {"mean": math.nan, "sd": math.nan, "n": 0,
                                                              "tokens": math.nan}
            row.update({(a, s): c[s] for s in ("mean", "sd", "n", "tokens")})
        out.append(row)
    index = pd.MultiIndex.from_tuples(pairs, names=["site", "metric"]) if pairs else \
        pd.MultiIndex.from_arrays([[], []], names=["site", "metric"])
    cols = pd.MultiIndex.from_tuples([(a, s) for a in arms for s in ("mean", "sd", "n", "tokens")])
    return pd.DataFrame(out, index=index, columns=cols)


# --- formatting ---------------------------------------------------------------------------------

def _decimals(label: str, meta: dict[str, Any] | None, values: Iterable[float]) -> int:
    """Loss to 3 decimals (4.233), dimension counts to 1 (43.5), small numbers to 2 or more."""
    if (meta and meta.get("quantity") == "val_loss") or "loss" in label:
        return 3
    finite = [abs(v) for v in values if np.isfinite(v)]
    top = max(finite) if finite else 0.0
    return 1 if top >= 10 else 2 if top >= 0.1 else 3


def _num(v: float, d: int) -> str:
    return f"{v:.{d}f}" if np.isfinite(v) else "–"


def md_escape(text: str) -> str:
    """Arm names inside markdown tables: a '|' would split the cell, a '*' start emphasis."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*")


def format_table(table: pd.DataFrame, fmt: str = "markdown", *, legend: bool = True) -> str:
    """Render a `paradox_table` for a report (``markdown``) or a terminal (``text``).

    The better value per row is marked (✅ and bold in markdown, a trailing * in text); cells read
    ``mean ± sd`` when averaged over several seeds, and say so when a cell averages fewer seeds than
    its arm has, or sits at another token count than its row label. With `legend`, a line under the
    table says what the marks and intervals mean.
    """
    if fmt not in ("markdown", "text"):
        raise ValueError(f"fmt must be 'markdown' or 'text', not {fmt!r}")
    arms = [a for a in dict.fromkeys(table.columns.get_level_values(0)) if a != BETTER]
    if not len(table) or not arms:
        return "(no evaluation points yet)"
    has_sd = any(s == "sd" for _, s in table.columns)
    has_ci = (BETTER, "ci95") in table.columns
    rows_meta = table.attrs.get("rows", {})
    arm_n = {a: int(table[(a, "n")].max()) for a in arms}

    header = ["What we measured" if fmt == "markdown" else "quantity"]
    header += [f"{md_escape(a) if fmt == 'markdown' else a} (n={arm_n[a]})" for a in arms]
    header.append("margin (95% CI)" if has_ci else "margin")
    body = []
    for label, row in table.iterrows():
        meta = rows_meta.get(label, {})
        d = _decimals(str(label), meta, [row[(a, "mean")] for a in arms])
        best = row[(BETTER, "arm")]
        best = None if pd.isna(best) else str(best)  # pandas 3 stores a missing str as NaN
        line = [str(label)]
        for a in arms:
            mean, n = row[(a, "mean")], int(row[(a, "n")])
            if not n:
                line.append("–")
                continue
            text = _num(mean, d)
            if has_sd and n >= 2:
                text += f" ± {_num(row[(a, 'sd')], d)}"
            notes = []
            if n < arm_n[a]:
                notes.append(f"n={n}")
            if not meta.get("comparable", True):
                notes.append(f"at {fmt_tokens(row[(a, 'tokens')])}")
            is_best = best is not None and best == a
            if fmt == "markdown":
                text = f"✅ **{text}**" if is_best else text
            else:
                text = f"{text} *" if is_best else text
            if notes:
                text += f" ({', '.join(notes)})"
            line.append(text)
        margin = row[(BETTER, "margin")]
        if best is None or not np.isfinite(margin):
            line.append("–" if meta.get("comparable", True) else "not comparable")
        else:
            text = _num(margin, d)
            if has_ci and np.isfinite(row[(BETTER, "ci95")]):
                ci = row[(BETTER, "ci95")]
                text += f" ± {_num(ci, d)}"
                if ci >= margin:
                    text += " (within noise)"
            line.append(text)
        body.append(line)

    if fmt == "markdown":
        out = ["| " + " | ".join(header) + " |", "| :--- " + "| :--- " * (len(header) - 1) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in body]
    else:
        widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
        out = ["  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip()]
        out.append("  ".join("-" * w for w in widths))
        out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in body]
    if legend:
        mark = "✅" if fmt == "markdown" else "*"
        parts = [f"{mark} better (lower loss, higher PR)"]
        if has_sd:
            parts.append("± after a value: one standard deviation over seeds")
        parts.append("margin: the better arm's lead over the runner-up"
                     + (", ± a Welch 95% confidence interval" if has_ci else ""))
        text = "; ".join(parts) + "."
        out += ["", f"_{text}_" if fmt == "markdown" else text]
    return "\n".join(out)
