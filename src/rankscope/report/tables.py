"""Seed aggregation and the seed study's "paradox table", from the store's tidy tables.

Pure pandas: DataFrames in, DataFrames or strings out; no files, no plots, no torch (ArviZ's split
of statistics from plotting). The statistics themselves live in `stats.py`.

Conventions used everywhere in the report:

* a *series* is a tidy frame ``arm, seed, tokens, value``: one number per run per eval point;
* "mean key PR" is ``pr_sv`` at site ``k`` averaged over heads, then over layers, per run and eval
  point (the seed's headline number); an eval point whose probe rows were only partly written
  (a run killed mid-write) is dropped rather than averaged over the layers that made it to disk;
* seeds are aggregated last: mean with a 95% Student t interval over the seed values, the sample
  standard deviation (ddof=1) and their count;
* arms are compared seed by seed: a run's seed fixes its initial weights and batch order in every
  arm, so the difference between two arms is taken within each seed they share (`stats.py`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..metrics import SPECTRUM, metric_label
from ..units import fmt_count as fmt_tokens
from ..vocab import SITE_ORDER, site_description, site_label
from .doc import Block, Para, Table, md_escape, to_markdown
from .stats import (
    NONE,
    PAIRED_CONSTANT,
    SINGLE,
    Difference,
    describe,
    fmt_interval,
    fmt_p,
    paired_difference,
    signed,
    t_interval,
    t_interval_arrays,
    t_quantile,
)

BETTER = "better"  # level-0 column of the paradox table holding the verdict per row

# --- small formatting helpers ------------------------------------------------------------------

def quantity_name(site: str, metric: str) -> str:
    """'mean key PR' for (k, pr_sv); 'mean value effective rank' for (v, erank), and so on."""
    return f"mean {site_label(site)} {metric_label(metric)}"


def is_rank_sweep(metric: str) -> bool:
    """The `dloss_r<r>` metrics: one per projection rank, shown as curves rather than table rows."""
    return metric.startswith("dloss_r") and metric[7:].isdigit()


# --- quantities the report compares ------------------------------------------------------------

@dataclass(frozen=True)
class Quantity:
    """A number per run and eval point that the report compares across arms.

    higher: True if more is better, False if less is, None if neither (no arm is marked better).
    what: one line for captions and legends, with its direction in words.
    """

    key: str
    label: str
    higher: bool | None
    what: str
    unit: str = ""
    decimals: int | None = None  # None: chosen from the values' magnitude


VAL_LOSS = Quantity("val_loss", "val loss", False, "validation loss; lower = better", "nats / token", 3)
SCALAR_QUANTITIES: dict[str, Quantity] = {
    "val_loss": VAL_LOSS,
    "ood_loss": Quantity("ood_loss", "OOD loss", False,
                         "loss on held-out out-of-distribution text; lower = better", "nats / token", 3),
    "icl_score": Quantity("icl_score", "ICL score", False,
                          "in-context learning score: mean loss over the last 10% of positions minus the mean "
                          "loss at positions [T/16, T/8); more negative = better use of context", "nats / token", 3),
    "induction_loss": Quantity("induction_loss", "induction loss", False,
                               "loss on the second copy of repeated random token sequences; lower = better",
                               "nats / token", 3),
}
INDUCTION = Quantity("induction_score", "mean induction score", True,
                     "attention induction score (0 to 1; higher = stronger induction), mean over heads then layers",
                     "", 3)
INDUCTION_MAX = Quantity("induction_max", "top induction score", True,
                         "the strongest induction head's score (max over layers and heads); higher = stronger", "", 3)
# The downstream measures the seed asks about ("is QK-Norm cheating?"), in report order.
DOWNSTREAM = ("ood_loss", "icl_score", "induction_loss", "induction_score", "induction_max")


def probe_quantity(site: str = "k", metric: str = "pr_sv") -> Quantity:
    what = f"{metric_label(metric)} of the {site_description(site)}"
    higher = True if metric in SPECTRUM and SPECTRUM[metric].dimensions else None
    if higher:
        what += ", averaged over heads then layers; higher = more dimensions used"
    return Quantity(f"{site}:{metric}", quantity_name(site, metric), higher, what,
                    "dimensions" if higher else "")


def quantity_series(scalars: pd.DataFrame, probes: pd.DataFrame, q: Quantity | str) -> pd.DataFrame:
    """The ``arm, seed, tokens, value`` series of a quantity (a Quantity or its key), finite values only."""
    key = q.key if isinstance(q, Quantity) else q
    if key in SCALAR_QUANTITIES or (key in scalars.columns and ":" not in key):
        out = loss_series(scalars, key)
    elif key == INDUCTION.key:
        out = head_layer_mean(probes, "attn", "induction_score")
    elif key == INDUCTION_MAX.key:
        out = _head_max(probes, "attn", "induction_score")
    elif ":" in key:
        site, metric = key.split(":", 1)
        out = head_layer_mean(probes, site, metric)
    else:
        out = loss_series(scalars.iloc[:0], "val_loss")
    if len(out):
        out = out[np.isfinite(out["value"].to_numpy(dtype=float))].reset_index(drop=True)
    return out


def downstream_series(scalars: pd.DataFrame, probes: pd.DataFrame,
                      keys: Iterable[str] = DOWNSTREAM) -> list[tuple[Quantity, pd.DataFrame]]:
    """(Quantity, series) for each downstream measure that has data (an older study has none)."""
    out = []
    for key in keys:
        q = SCALAR_QUANTITIES.get(key) or {INDUCTION.key: INDUCTION, INDUCTION_MAX.key: INDUCTION_MAX}[key]
        series = quantity_series(scalars, probes, q)
        if len(series):
            out.append((q, series))
    return out


# --- per-run series ----------------------------------------------------------------------------

def empty_series(with_layer: bool = False) -> pd.DataFrame:
    """A series with no rows but the usual dtypes, so callers can filter and compare without
    special cases (an object-typed empty column breaks numpy's isfinite)."""
    cols = {"arm": pd.Series(dtype=str), "seed": pd.Series(dtype="int64"), "tokens": pd.Series(dtype="int64")}
    if with_layer:
        cols["layer"] = pd.Series(dtype="int64")
    cols["value"] = pd.Series(dtype=float)
    return pd.DataFrame(cols)


def loss_series(scalars: pd.DataFrame, column: str = "val_loss") -> pd.DataFrame:
    """``arm, seed, tokens, value`` of one scalar column, rows where it was measured."""
    if column not in scalars.columns or not len(scalars):
        return empty_series()
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


def _complete(sub: pd.DataFrame) -> pd.DataFrame:
    """Rows of one (site, metric) without repeats (a resumed run rewrites a point: keep the last)
    and without torn eval points (fewer (layer, head) rows than the run's fullest point)."""
    sub = sub.drop_duplicates(["arm", "seed", "tokens", "layer", "head"], keep="last")
    if not len(sub):
        return sub
    rows = sub.groupby(["arm", "seed", "tokens"])["head"].transform("size")
    full = rows.groupby([sub["arm"], sub["seed"]]).transform("max")
    return sub[rows == full]


def _layer_means_of(sub: pd.DataFrame) -> pd.DataFrame:
    """`layer_means` of rows already restricted to one (site, metric)."""
    sub = _complete(sub)
    if not len(sub):
        return empty_series(with_layer=True)
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
        return empty_series()
    return lm.groupby(["arm", "seed", "tokens"], as_index=False)["value"].mean()


def _head_max(probes: pd.DataFrame, site: str, metric: str) -> pd.DataFrame:
    """``arm, seed, tokens, value``: the largest value over all layers and heads (e.g. the strongest
    induction head, which a mean over dozens of heads would dilute)."""
    sub = _complete(probes[(probes["site"] == site) & (probes["metric"] == metric)])
    if not len(sub):
        return empty_series()
    return sub.groupby(["arm", "seed", "tokens"], as_index=False)["value"].max()


def seed_stats(series: pd.DataFrame, by: Iterable[str] = ("arm", "tokens")) -> pd.DataFrame:
    """Aggregate a series over seeds: mean, sd (ddof=1; NaN for one seed), min, max, n, and the 95%
    Student t interval of the mean, ``lo`` and ``hi`` (NaN for one seed: no interval is possible)."""
    by = list(by)
    if not len(series):
        cols = by + ["mean", "sd", "min", "max", "n", "lo", "hi"]
        return pd.DataFrame({c: pd.Series(dtype=float) for c in cols})
    g = series.groupby(by)["value"]
    out = g.agg(mean="mean", sd="std", min="min", max="max", n="count").reset_index()
    # all seeds equal: the sd is a rounding residue, and the interval has zero width
    spread = (out["max"] - out["min"]).abs()
    scale = np.maximum(out["max"].abs(), out["min"].abs())
    out.loc[(out["n"] >= 2) & (spread <= 1e-12 * scale), "sd"] = 0.0
    out["lo"], out["hi"] = t_interval_arrays(out["mean"].to_numpy(), out["sd"].to_numpy(), out["n"].to_numpy())
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
    if len(series):  # a NaN (a diverged run's last point) is not a point the run reached
        series = series[np.isfinite(series["value"].to_numpy(dtype=float))]
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


def seed_values(series: pd.DataFrame, arm: str, tokens: int) -> dict[int, tuple[float, int]]:
    """``{seed: (value, tokens used)}`` of `arm` at eval point `tokens`, finite values only.

    A run contributes its value at exactly `tokens` when it has that point. If its eval grid does
    not contain it (grids that do not line up) it contributes the nearer of its two points around
    `tokens` — never a point outside its own range, so a run never lends a value from a point it has
    not reached. With log-spaced grids "near" scales with the local spacing, which a fixed token
    tolerance would not. The tokens actually used are returned so tables can say so.
    """
    out: dict[int, tuple[float, int]] = {}
    sub = series[series["arm"] == arm]
    for seed, g in sub.groupby("seed"):
        t = g["tokens"].to_numpy()
        v = g["value"].to_numpy(dtype=float)
        hit = np.flatnonzero(t == tokens)
        if len(hit):
            i = int(hit[-1])
        else:
            if len(t) < 2 or not (t.min() <= tokens <= t.max()):
                continue
            i = int(np.argmin(np.abs(t - tokens)))
        if np.isfinite(v[i]):
            out[int(seed)] = (float(v[i]), int(t[i]))
    return out


def _cell_of(values: Mapping[int, tuple[float, int]]) -> dict[str, float]:
    iv = t_interval([v for v, _ in values.values()])
    used = [t for _, t in values.values()]
    return {"mean": iv.mean, "lo": iv.lo, "hi": iv.hi, "sd": iv.sd, "n": iv.n,
            "tokens": float(np.mean(used)) if used else math.nan}


def cell(series: pd.DataFrame, arm: str, tokens: int) -> dict[str, float]:
    """Mean, 95% t interval (lo, hi), sd, n over the seeds of `arm` at eval point `tokens`, and the
    tokens actually used (see `seed_values` for runs whose grid lacks that point)."""
    return _cell_of(seed_values(series, arm, tokens))


def compare_at(series: pd.DataFrame, a: str, b: str, tokens_a: int, tokens_b: int | None = None) -> Difference:
    """`a − b` seed by seed at an eval point (see `stats.paired_difference`)."""
    va = {s: v for s, (v, _) in seed_values(series, a, tokens_a).items()}
    vb = {s: v for s, (v, _) in seed_values(series, b, tokens_a if tokens_b is None else tokens_b).items()}
    return paired_difference(va, vb, names=(a, b))


# --- intervals kept for callers of earlier versions ------------------------------------------------

def t975(df: float) -> float:
    """Two-sided 95% Student t quantile for (possibly fractional, Welch) degrees of freedom."""
    return t_quantile(df)


def welch_ci95(sd1: float, n1: int, sd2: float, n2: int) -> float:
    """Half-width of the 95% Welch interval of a difference of two means from summary statistics.

    Only for arms that share no seeds; the report pairs seeds wherever it can (`compare_at`).
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

CELL_STATS = ("mean", "lo", "hi", "sd", "n", "tokens")
VERDICT_STATS = ("arm", "resolved", "margin", "lo", "hi", "p", "n", "test")


def _arm_order(*frames: pd.DataFrame) -> list[str]:
    seen: list[str] = []
    for f in frames:
        for a in f["arm"].astype(str).tolist() if len(f) else []:
            if a not in seen:
                seen.append(a)
    return seen


def paradox_table(scalars: pd.DataFrame, probes: pd.DataFrame, site: str = "k", metric: str = "pr_sv",
                  *, arms: list[str] | None = None, finished: Collection[tuple[str, int]] | None = None,
                  reference: str | None = None, downstream: bool = True) -> pd.DataFrame:
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

    ``table.attrs["diffs"][row]`` holds, per row, each other arm minus the `reference` arm (default:
    the first arm) as `stats.Difference` objects; `format_table` prints them in words.

    Which points (see `choose_points`): END is per arm, the last eval point reached by all of its
    finished runs (all runs if `finished` is None or none finished); MIDDLE is the eval point closest
    to half of the last point all arms reached. When the arms' END points differ (an arm still
    running) the END rows are labelled "@ end", keep each arm's own token count in ``tokens`` and
    compare nothing: values at different token counts are not comparable.
    """
    pr_q = probe_quantity(site, metric)
    loss = quantity_series(scalars, probes, VAL_LOSS)
    pr = quantity_series(scalars, probes, pr_q)
    arms = [str(a) for a in arms] if arms is not None else _arm_order(loss, pr)
    if BETTER in arms:
        raise ValueError(f"an arm may not be called {BETTER!r}: that name labels the verdict columns")
    ref = reference if reference in arms else (arms[0] if arms else None)

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
            cells = {a: _cell_of(values[a]) for a in arms}
            used = {round(c["tokens"]) for c in cells.values() if c["n"]}
            same = len(used) <= 1
            where = fmt_tokens(next(iter(used))) if same and used else point
            higher = q.higher if same else None
            verdict = _verdict(values, cells, higher)
            diffs = []
            if same and ref is not None and cells[ref]["n"]:
                for a in arms:
                    if a != ref and cells[a]["n"]:
                        diffs.append(paired_difference({s: v for s, (v, _) in values[a].items()},
                                                       {s: v for s, (v, _) in values[ref].items()}, names=(a, ref)))
            meta = {"quantity": q.key, "point": point, "higher_is_better": q.higher, "comparable": same,
                    "name": q.label, "decimals": q.decimals, "what": q.what}
            rows.append((f"{q.label} @ {where}", meta, cells, verdict, diffs))

    columns = pd.MultiIndex.from_tuples([(a, s) for a in arms for s in CELL_STATS]
                                        + [(BETTER, v) for v in VERDICT_STATS])
    data = [[cells[a][s] for a in arms for s in CELL_STATS] + [verdict[v] for v in VERDICT_STATS]
            for _, _, cells, verdict, _ in rows]
    table = pd.DataFrame(data, index=pd.Index([r[0] for r in rows], name="quantity"), columns=columns)
    for a in arms:
        table[(a, "n")] = table[(a, "n")].astype("int64")
    if len(table):
        table[(BETTER, "n")] = table[(BETTER, "n")].astype("int64")
        table[(BETTER, "resolved")] = table[(BETTER, "resolved")].astype(bool)
    table.attrs = {"site": site, "metric": metric, "reference": ref,
                   "rows": {label: meta for label, meta, *_ in rows},
                   "diffs": {label: diffs for label, _, _, _, diffs in rows}}
    return table


def _verdict(values: dict[str, dict[int, tuple[float, int]]], cells: dict[str, dict[str, float]],
             higher: bool | None) -> dict[str, Any]:
    """The best mean, and its lead over the runner-up measured seed by seed."""
    empty = {"arm": None, "resolved": False, "margin": math.nan, "lo": math.nan, "hi": math.nan,
             "p": math.nan, "n": 0, "test": ""}
    have = [a for a, c in cells.items() if c["n"] and np.isfinite(c["mean"])]
    if higher is None or len(have) < 2:
        return empty
    sign = 1.0 if higher else -1.0
    ranked = sorted(have, key=lambda a: -sign * cells[a]["mean"])
    best, runner = ranked[0], ranked[1]
    if cells[best]["mean"] == cells[runner]["mean"]:
        return dict(empty, margin=0.0)
    d = paired_difference({s: v for s, (v, _) in values[best].items()},
                          {s: v for s, (v, _) in values[runner].items()}, names=(best, runner))
    lo, hi = sorted((sign * d.lo, sign * d.hi)) if d.has_interval else (math.nan, math.nan)
    margin = sign * d.mean
    return {"arm": best, "resolved": bool(d.resolved and margin > 0), "margin": margin, "lo": lo, "hi": hi,
            "p": d.p, "n": d.n, "test": d.test}


# --- metrics summary (every site and metric at the end of training) --------------------------------

def metric_summary(probes: pd.DataFrame, *, arms: list[str] | None = None,
                   finished: Collection[tuple[str, int]] | None = None) -> pd.DataFrame:
    """Every recorded (site, metric) at each arm's END: mean over heads then layers, then seeds.

    Index ``(site, metric)``; columns ``(arm, stat)`` with stat in mean, lo, hi (95% t interval
    over seeds), sd, n, tokens. The `dloss_r<r>` rank sweep is left out (one row per rank would
    swamp the table; the report draws it as curves).
    """
    arms = [str(a) for a in arms] if arms is not None else _arm_order(probes)
    site_order = {s: i for i, s in enumerate(SITE_ORDER)}
    # one partition pass over the (possibly millions of) probe rows, not one filter per metric
    groups = {(str(s), str(m)): g for (s, m), g in probes.groupby(["site", "metric"], sort=False)
              if not is_rank_sweep(str(m))}
    pairs = sorted(groups, key=lambda p: (site_order.get(p[0], 99), p[0], p[1]))
    out = []
    for site, metric in pairs:
        lm = _layer_means_of(groups[(site, metric)])
        series = lm.groupby(["arm", "seed", "tokens"], as_index=False)["value"].mean()
        _, ends = choose_points(series, arms, finished)
        row = {}
        for a in arms:
            c = cell(series, a, ends[a]) if a in ends else _cell_of({})
            row.update({(a, s): c[s] for s in CELL_STATS})
        out.append(row)
    index = pd.MultiIndex.from_tuples(pairs, names=["site", "metric"]) if pairs else \
        pd.MultiIndex.from_arrays([[], []], names=["site", "metric"])
    cols = pd.MultiIndex.from_tuples([(a, s) for a in arms for s in CELL_STATS])
    return pd.DataFrame(out, index=index, columns=cols)


# --- formatting ---------------------------------------------------------------------------------

def decimals_for(values: Iterable[float], label: str = "", fixed: int | None = None) -> int:
    """Loss to 3 decimals (4.233), dimension counts to 1 (43.5), small numbers to 2 or more."""
    if fixed is not None:
        return fixed
    if "loss" in label:
        return 3
    finite = [abs(v) for v in values if np.isfinite(v)]
    top = max(finite) if finite else 0.0
    return 1 if top >= 10 else 2 if top >= 0.1 else 3


def _num(v: float, d: int) -> str:
    return signed(v, d)


def fmt_mean_ci(mean: float, lo: float, hi: float, n: int, d: int) -> str:
    """'4.233 [4.220, 4.246]' over several seeds; '4.233' for one (no interval is possible)."""
    text = _num(mean, d)
    if n >= 2 and np.isfinite(lo):
        text += f" {fmt_interval(lo, hi, d)}"
    return text


def _paradox_cells(table: pd.DataFrame, fmt: str) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows, arms) of the paradox table in `fmt` ('markdown' or 'text')."""
    arms = [a for a in dict.fromkeys(table.columns.get_level_values(0)) if a != BETTER]
    rows_meta = table.attrs.get("rows", {})
    arm_n = {a: int(table[(a, "n")].max()) for a in arms}
    name = (lambda a: md_escape(a)) if fmt == "markdown" else (lambda a: a)  # noqa: E731
    header = ["What we measured" if fmt == "markdown" else "quantity"]
    header += [f"{name(a)} (n={arm_n[a]})" for a in arms]
    header.append("lead of best [95% CI]")
    body = []
    for label, row in table.iterrows():
        meta = rows_meta.get(label, {})
        d = decimals_for([row[(a, "mean")] for a in arms], str(label), meta.get("decimals"))
        best = row[(BETTER, "arm")]
        best = None if best is None or (isinstance(best, float) and math.isnan(best)) else str(best)
        resolved = bool(row[(BETTER, "resolved")])
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
                notes.append(f"at {fmt_tokens(row[(a, 'tokens')])}")
            if best == a:
                if fmt == "markdown":
                    text = f"✅ **{text}**" if resolved else f"**{text}**"
                else:
                    text = f"{text} *" if resolved else f"{text} (*)"
            if notes:
                text += f" ({', '.join(notes)})"
            line.append(text)
        margin = row[(BETTER, "margin")]
        if best is None or not np.isfinite(margin):
            line.append("–" if meta.get("comparable", True) else "not comparable")
        else:
            text = _num(margin, d)
            if np.isfinite(row[(BETTER, "lo")]):
                text += f" {fmt_interval(row[(BETTER, 'lo')], row[(BETTER, 'hi')], d)}"
            line.append(text)
        body.append(line)
    return header, body, arms


def _legend(table: pd.DataFrame, fmt: str) -> str:
    arms = [a for a in dict.fromkeys(table.columns.get_level_values(0)) if a != BETTER]
    most = max((int(table[(a, "n")].max()) for a in arms), default=0)
    star, best = ("✅", "**bold**") if fmt == "markdown" else ("*", "(*)")
    parts = []
    if most >= 2:
        parts.append("Cells: mean over seeds [95% t-interval over seeds]")
    else:
        parts.append("Cells: one seed per arm, so no interval is possible")
    parts.append(f"{star} the better arm (lower loss and ICL score, higher PR and induction score), with its "
                 "seed-by-seed lead over the runner-up beyond seed noise (95% interval excludes 0); "
                 f"{best}{' without ✅' if fmt == 'markdown' else ''}: the best mean, not distinguishable "
                 "from the runner-up" + (" (one seed: no test is possible)" if most < 2 else ""))
    parts.append("lead of best: its paired difference to the runner-up over the seeds both ran")
    parts.append("higher PR counts as better by the seed's convention; whether more dimensions help is "
                 "one of the open questions")
    return "; ".join(parts) + "."


def _bare_p(p: float) -> str:
    """'0.06' / '< 0.001' for a column already headed p."""
    return fmt_p(p).replace("p = ", "").replace("p < ", "< ")


def comparison_rows(table: pd.DataFrame, fmt: str = "markdown") -> tuple[list[str], list[list[str]]]:
    """The seed-by-seed differences of `table` (each arm minus the reference) as a table."""
    rows_meta = table.attrs.get("rows", {})
    header = ["quantity", "comparison", "difference [95% CI]", "p (paired t)", "seeds", "reading"]
    out = []
    name = md_escape if fmt == "markdown" else str
    for label, diffs in table.attrs.get("diffs", {}).items():
        meta = rows_meta.get(label, {})
        arms = [a for a in dict.fromkeys(table.columns.get_level_values(0)) if a != BETTER]
        d = decimals_for([table.loc[label, (a, "mean")] for a in arms], str(label), meta.get("decimals"))
        for diff in diffs:
            if diff.test == NONE:
                continue
            text = signed(diff.mean, d)
            if diff.has_interval:
                text += f" {fmt_interval(diff.lo, diff.hi, d)}"
            # a constant difference has sd 0: the t statistic is undefined, not "p < 0.001"
            p = "–" if diff.test == SINGLE else "undefined (sd 0)" if diff.test == PAIRED_CONSTANT else _bare_p(diff.p)
            if np.isfinite(diff.p_wilcoxon):
                p += f" (Wilcoxon {_bare_p(diff.p_wilcoxon)})"
            seeds = str(diff.n) + (" (Welch: unpaired)" if diff.test == "Welch t" else "")
            out.append([str(label), f"{name(diff.a)} − {name(diff.b)}", text, p, seeds, name(diff.verdict())])
    return header, out


def _ref_words(table: pd.DataFrame) -> str:
    arms = [a for a in dict.fromkeys(table.columns.get_level_values(0)) if a != BETTER]
    return "the first arm" if arms and table.attrs.get("reference") == arms[0] else "the reference arm"


def paradox_blocks(table: pd.DataFrame, *, legend: bool = True) -> list[Block]:
    """The paradox table and its seed-by-seed comparisons as report blocks."""
    if not len(table):
        return [Para("(no evaluation points yet)")]
    header, body, _ = _paradox_cells(table, "markdown")
    blocks: list[Block] = [Table(header, body, ["l"] + ["r"] * (len(header) - 1))]
    if legend:
        blocks.append(Para(f"*{_legend(table, 'markdown')}*", css="legend"))
    ch, crows = comparison_rows(table, "markdown")
    ref = table.attrs.get("reference")
    if crows:
        blocks.append(Para(f"Seed by seed: each arm minus **{md_escape(ref)}** ({_ref_words(table)}), on the seeds both "
                           "ran (same seed = same initial weights and batches), with a 95% paired t interval and "
                           "p-value; \"not distinguishable from seed noise\" when the interval covers 0."))
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
    arms = [a for a in dict.fromkeys(table.columns.get_level_values(0)) if a != BETTER]
    if not len(table) or not arms:
        return "(no evaluation points yet)"
    if fmt == "markdown":
        return to_markdown(paradox_blocks(table, legend=legend), Path(".")).rstrip("\n")

    header, body, _ = _paradox_cells(table, "text")
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in body]
    diffs = [(label, d) for label, ds in table.attrs.get("diffs", {}).items() for d in ds if d.test != NONE]
    if diffs:
        ref = table.attrs.get("reference")
        out += ["", f"seed by seed, each arm minus {ref} ({_ref_words(table)}), on the seeds both ran:"]
        rows_meta = table.attrs.get("rows", {})
        width = max(len(label) for label, _ in diffs)
        for label, diff in diffs:
            meta = rows_meta.get(label, {})
            dec = decimals_for([table.loc[label, (a, "mean")] for a in arms], label, meta.get("decimals"))
            out.append(f"  {label.ljust(width)}  {describe(diff, dec)}")
    if legend:
        out += ["", _legend(table, "text")]
    return "\n".join(out)
