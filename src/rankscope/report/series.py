"""Per-run series from the store's tidy tables, the eval points the report compares, and the cells
over seeds at those points. Pure pandas: DataFrames in, DataFrames or dicts out.

Conventions used everywhere in the report:

* a *series* is a tidy frame ``arm, seed, tokens, value``: one number per run per eval point;
* "mean key PR" is ``pr_sv`` at site ``k`` averaged over heads, then over layers, per run and eval
  point (the seed's headline number); an eval point whose probe rows were only partly written
  (a run killed mid-write) is dropped rather than averaged over the layers that made it to disk;
* "the value at N tokens" is read by `runs_at`, with one of three rules named where it is used;
* seeds are aggregated last: mean with a 95% Student t interval over the seed values, the sample
  standard deviation (ddof=1) and their count;
* arms are compared seed by seed: a run's seed fixes its initial weights and batch order in every
  arm, so the difference between two arms is taken within each seed they share (`stats.py`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping

import numpy as np
import pandas as pd

from ..settings.vocab import SITE_ORDER
from .quantities import (
    DOWNSTREAM,
    INDUCTION,
    INDUCTION_MAX,
    SCALAR_QUANTITIES,
    Quantity,
    downstream_quantity,
    is_rank_sweep,
)
from .stats import Difference, paired_difference, t_interval, t_interval_arrays

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
        ["arm", "seed", "tokens"], ignore_index=True
    )


def layer_means(probes: pd.DataFrame, site: str = "k", metric: str = "pr_sv") -> pd.DataFrame:
    """``arm, seed, tokens, layer, value``: one metric averaged over the heads of each layer.

    Per-layer metrics (head == -1, e.g. gain statistics) pass through unchanged. Eval points that
    hold fewer (layer, head) rows than the run's fullest point are dropped: they are a torn write.
    """
    return layer_means_of(probes[(probes["site"] == site) & (probes["metric"] == metric)])


def complete_rows(sub: pd.DataFrame) -> pd.DataFrame:
    """Rows of one (site, metric) without repeats (a resumed run rewrites a point: keep the last)
    and without torn eval points (fewer (layer, head) rows than the run's fullest point)."""
    sub = sub.drop_duplicates(["arm", "seed", "tokens", "layer", "head"], keep="last")
    if not len(sub):
        return sub
    rows = sub.groupby(["arm", "seed", "tokens"])["head"].transform("size")
    full = rows.groupby([sub["arm"], sub["seed"]]).transform("max")
    return sub[rows == full]


def layer_means_of(sub: pd.DataFrame) -> pd.DataFrame:
    """`layer_means` of rows already restricted to one (site, metric)."""
    sub = complete_rows(sub)
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


def head_max(probes: pd.DataFrame, site: str, metric: str) -> pd.DataFrame:
    """``arm, seed, tokens, value``: the largest value over all layers and heads (e.g. the strongest
    induction head, which a mean over dozens of heads would dilute)."""
    sub = complete_rows(probes[(probes["site"] == site) & (probes["metric"] == metric)])
    if not len(sub):
        return empty_series()
    return sub.groupby(["arm", "seed", "tokens"], as_index=False)["value"].max()


def quantity_series(scalars: pd.DataFrame, probes: pd.DataFrame, q: Quantity | str) -> pd.DataFrame:
    """The ``arm, seed, tokens, value`` series of a quantity (a Quantity or its key), finite values only."""
    key = q.key if isinstance(q, Quantity) else q
    if key in SCALAR_QUANTITIES or (key in scalars.columns and ":" not in key):
        out = loss_series(scalars, key)
    elif key == INDUCTION.key:
        out = head_layer_mean(probes, "attn", "induction_score")
    elif key == INDUCTION_MAX.key:
        out = head_max(probes, "attn", "induction_score")
    elif ":" in key:
        site, metric = key.split(":", 1)
        out = head_layer_mean(probes, site, metric)
    else:
        out = loss_series(scalars.iloc[:0], "val_loss")
    if len(out):
        out = out[np.isfinite(out["value"].to_numpy(dtype=float))].reset_index(drop=True)
    return out


def downstream_series(
    scalars: pd.DataFrame, probes: pd.DataFrame, keys: Iterable[str] = DOWNSTREAM
) -> list[tuple[Quantity, pd.DataFrame]]:
    """(Quantity, series) for each downstream measure that has data (an older study has none)."""
    out = []
    for key in keys:
        q = downstream_quantity(key)
        series = quantity_series(scalars, probes, q)
        if len(series):
            out.append((q, series))
    return out


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


def seed_counts(*frames: pd.DataFrame) -> dict[str, int]:
    """Seeds drawn per arm (runs that have written nothing yet are not counted)."""
    parts = [f[["arm", "seed"]] for f in frames if len(f)]
    if not parts:
        return {}
    return pd.concat(parts).drop_duplicates().groupby("arm")["seed"].nunique().to_dict()


def arm_order(*frames: pd.DataFrame) -> list[str]:
    """Arms in the order they first appear in the frames."""
    seen: list[str] = []
    for f in frames:
        for a in f["arm"].astype(str).tolist() if len(f) else []:
            if a not in seen:
                seen.append(a)
    return seen


# --- the value at N tokens -------------------------------------------------------------------------

# Every rule takes a run's own eval point at N when it has one. When its eval grid lacks N, they
# differ on purpose, because they answer different questions:
NEAREST = "nearest"  # the nearer of the run's two points around N (a tie: the earlier), never one outside
# its own range (so a run never lends a value from a point it has not reached): the tables
# compare measured values and say which point was used. With log-spaced grids
# "near" scales with the local spacing, which a fixed token tolerance would not.
INTERPOLATE = "interpolate"  # linear in log tokens between its two points around N (token 0 left out): the
# seed's published figures sit at round counts (16M) that log grids rarely hit.
LATEST = "latest"  # its last point at or before N: a quantity probed on another cadence (or only at
# some points) still shows the value it had by then, e.g. at the end of training.
RULES = (NEAREST, INTERPOLATE, LATEST)


def _point(t: np.ndarray, tokens: int, rule: str) -> int | None:
    """The eval point of one run (`t`: its points, sorted, unique) that stands for `tokens`."""
    if (t == tokens).any():
        return tokens
    if rule == LATEST:
        before = t[t <= tokens]
        return int(before[-1]) if len(before) else None
    if not (t[0] <= tokens <= t[-1]):
        return None
    return int(t[np.argmin(np.abs(t - tokens))])


def runs_at(frame: pd.DataFrame, tokens: int, rule: str = NEAREST) -> pd.DataFrame:
    """Each run's rows standing for `tokens` under `rule` (see `RULES`); a run for which the rule
    finds no point is left out.

    `frame` holds ``seed`` and ``tokens`` (and ``arm``: a run is an (arm, seed)) with any number of
    rows per eval point: one in a series, one per layer and head in probe rows. NEAREST and LATEST
    return the frame's rows at the point chosen, in the frame's order (``tokens`` says which point).
    INTERPOLATE needs a series and returns one row per run, ``<run keys>, tokens, value,
    interpolated``, with ``tokens`` = `tokens` and ``interpolated`` False where the run had that point.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, not {rule!r}")
    keys = ["arm", "seed"] if "arm" in frame.columns else ["seed"]
    if rule == INTERPOLATE:
        return _interpolated(frame, tokens, keys)
    chosen = []
    for run, t in frame.groupby(keys)["tokens"]:
        p = _point(np.unique(t.to_numpy()), tokens, rule)
        if p is not None:
            chosen.append((*run, p))
    if not chosen:
        return frame.iloc[:0]
    return frame[pd.MultiIndex.from_frame(frame[keys + ["tokens"]]).isin(chosen)]


def _interpolated(series: pd.DataFrame, tokens: int, keys: list[str]) -> pd.DataFrame:
    rows = []
    for run, g in series[series["tokens"] > 0].groupby(keys):
        g = g.sort_values("tokens")
        t, v = g["tokens"].to_numpy(float), g["value"].to_numpy(float)
        if not (t[0] <= tokens <= t[-1]):
            continue
        hit = np.flatnonzero(t == tokens)
        if len(hit):
            rows.append((*run, tokens, float(v[hit[-1]]), False))
        else:
            rows.append((*run, tokens, float(np.interp(np.log(tokens), np.log(t), v)), True))
    return pd.DataFrame(rows, columns=keys + ["tokens", "value", "interpolated"])


# --- which eval points the tables compare ---------------------------------------------------------


def _run_tokens(series: pd.DataFrame) -> dict[tuple[str, int], np.ndarray]:
    return {(str(a), int(s)): np.sort(g["tokens"].to_numpy()) for (a, s), g in series.groupby(["arm", "seed"])}


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


def choose_points(
    series: pd.DataFrame, arms: Iterable[str], finished: Collection[tuple[str, int]] | None = None
) -> tuple[int | None, dict[str, int]]:
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


# --- cells over seeds -------------------------------------------------------------------------------

CELL_STATS = ("mean", "lo", "hi", "sd", "n", "tokens")


def seed_values(series: pd.DataFrame, arm: str, tokens: int) -> dict[int, tuple[float, int]]:
    """``{seed: (value, tokens used)}`` of `arm` at eval point `tokens` (rule NEAREST: a run whose
    grid lacks the point contributes its nearer neighbour, and the tokens used are returned so the
    tables can say so), finite values only."""
    rows = runs_at(series[series["arm"] == arm], tokens, NEAREST)
    out: dict[int, tuple[float, int]] = {}
    for seed, t, v in zip(rows["seed"].tolist(), rows["tokens"].tolist(), rows["value"].to_numpy(dtype=float)):
        out[int(seed)] = (float(v), int(t))  # a point written twice: its last row, as everywhere
    return {s: out[s] for s in sorted(out) if np.isfinite(out[s][0])}


def cell_of(values: Mapping[int, tuple[float, int]]) -> dict[str, float]:
    """Mean, 95% t interval (lo, hi), sd and n over seed values from `seed_values`, and the mean
    tokens used."""
    iv = t_interval([v for v, _ in values.values()])
    used = [t for _, t in values.values()]
    return {
        "mean": iv.mean,
        "lo": iv.lo,
        "hi": iv.hi,
        "sd": iv.sd,
        "n": iv.n,
        "tokens": float(np.mean(used)) if used else math.nan,
    }


def cell(series: pd.DataFrame, arm: str, tokens: int) -> dict[str, float]:
    """Mean, 95% t interval (lo, hi), sd, n over the seeds of `arm` at eval point `tokens`, and the
    tokens actually used (see `seed_values` for runs whose grid lacks that point)."""
    return cell_of(seed_values(series, arm, tokens))


def compare_at(series: pd.DataFrame, a: str, b: str, tokens: int) -> Difference:
    """`a − b` seed by seed at an eval point (see `stats.paired_difference`)."""
    va = {s: v for s, (v, _) in seed_values(series, a, tokens).items()}
    vb = {s: v for s, (v, _) in seed_values(series, b, tokens).items()}
    return paired_difference(va, vb, names=(a, b))


def metric_summary(
    probes: pd.DataFrame, *, arms: list[str] | None = None, finished: Collection[tuple[str, int]] | None = None
) -> pd.DataFrame:
    """Every recorded (site, metric) at each arm's END: mean over heads then layers, then seeds.

    Index ``(site, metric)``; columns ``(arm, stat)`` with stat in mean, lo, hi (95% t interval
    over seeds), sd, n, tokens. The `dloss_r<r>` rank sweep is left out (one row per rank would
    swamp the table; the report draws it as curves).
    """
    arms = [str(a) for a in arms] if arms is not None else arm_order(probes)
    site_order = {s: i for i, s in enumerate(SITE_ORDER)}
    # one partition pass over the (possibly millions of) probe rows, not one filter per metric
    groups = {
        (str(s), str(m)): g for (s, m), g in probes.groupby(["site", "metric"], sort=False) if not is_rank_sweep(str(m))
    }
    pairs = sorted(groups, key=lambda p: (site_order.get(p[0], 99), p[0], p[1]))
    out = []
    for site, metric in pairs:
        lm = layer_means_of(groups[(site, metric)])
        series = lm.groupby(["arm", "seed", "tokens"], as_index=False)["value"].mean()
        _, ends = choose_points(series, arms, finished)
        row = {}
        for a in arms:
            c = cell(series, a, ends[a]) if a in ends else cell_of({})
            row.update({(a, s): c[s] for s in CELL_STATS})
        out.append(row)
    index = (
        pd.MultiIndex.from_tuples(pairs, names=["site", "metric"])
        if pairs
        else pd.MultiIndex.from_arrays([[], []], names=["site", "metric"])
    )
    cols = pd.MultiIndex.from_tuples([(a, s) for a in arms for s in CELL_STATS])
    return pd.DataFrame(out, index=index, columns=cols)


__all__ = [
    "empty_series",
    "loss_series",
    "layer_means",
    "layer_means_of",
    "complete_rows",
    "head_layer_mean",
    "head_max",
    "quantity_series",
    "downstream_series",
    "seed_stats",
    "seed_counts",
    "arm_order",
    "NEAREST",
    "INTERPOLATE",
    "LATEST",
    "RULES",
    "runs_at",
    "choose_points",
    "CELL_STATS",
    "seed_values",
    "cell_of",
    "cell",
    "compare_at",
    "metric_summary",
]
