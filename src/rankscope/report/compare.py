"""Arms against arms and rank against downstream: every pair of arms seed by seed at the end of
training, and correlations between mean key PR and the downstream measures.

Pure pandas on the series of `series.py`; the statistics are in `stats.py`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import numpy as np
import pandas as pd

from .format import decimals_for
from .quantities import INDUCTION, INDUCTION_MAX, SCALAR_QUANTITIES, VAL_LOSS, Quantity, probe_quantity
from .series import choose_points, compare_at, quantity_series
from .stats import NONE, correlate, holm, within_groups

NOT_COMPARABLE = "not comparable"


def pairwise_comparisons(
    quantities: Sequence[tuple[Quantity, pd.DataFrame]],
    arms: Sequence[str],
    finished: Collection[tuple[str, int]] | None = None,
) -> pd.DataFrame:
    """Every pair of arms, seed by seed, at the arms' END, for each quantity.

    One row per (quantity, pair) with the later arm minus the earlier one (so with the study's first
    arm as reference, "qk-norm − no-norm"). Columns: quantity (label), key, tokens, a, b, n, mean,
    lo, hi (95% interval), p (paired t), p_wilcoxon (from 6 seeds), p_holm (Holm-adjusted over the
    pairs of that quantity: with k arms there are k(k-1)/2 comparisons, and one of them crossing
    0.05 by chance should not read as a finding), test, resolved, verdict, decimals.
    Pairs whose END points differ (one arm still running) are listed as not comparable.
    """
    rows = []
    for q, series in quantities:
        _, ends = choose_points(series, arms, finished)
        present = [a for a in arms if a in ends]
        dec = decimals_for(series["value"].to_numpy(dtype=float), q.label, q.decimals)
        start = len(rows)
        for i, b in enumerate(present):
            for a in present[i + 1 :]:
                base = {"quantity": q.label, "key": q.key, "a": a, "b": b, "decimals": dec, "higher": q.higher}
                if ends[a] != ends[b]:
                    rows.append(
                        dict(
                            base,
                            tokens=math.nan,
                            n=0,
                            mean=math.nan,
                            lo=math.nan,
                            hi=math.nan,
                            p=math.nan,
                            p_wilcoxon=math.nan,
                            test=NOT_COMPARABLE,
                            resolved=False,
                            verdict="not comparable: ends at different token counts",
                        )
                    )
                    continue
                d = compare_at(series, a, b, ends[a])
                if d.test == NONE:
                    continue
                rows.append(
                    dict(
                        base,
                        tokens=ends[a],
                        n=d.n,
                        mean=d.mean,
                        lo=d.lo,
                        hi=d.hi,
                        p=d.p,
                        p_wilcoxon=d.p_wilcoxon,
                        test=d.test,
                        resolved=d.resolved,
                        verdict=d.verdict(),
                        diff=d,
                    )
                )
        adjusted = holm([r["p"] for r in rows[start:]])
        for r, ph in zip(rows[start:], adjusted):
            r["p_holm"] = ph
    cols = [
        "quantity",
        "key",
        "tokens",
        "a",
        "b",
        "n",
        "mean",
        "lo",
        "hi",
        "p",
        "p_wilcoxon",
        "p_holm",
        "test",
        "resolved",
        "verdict",
        "decimals",
        "higher",
        "diff",
    ]
    return pd.DataFrame(rows, columns=cols)


# --- rank against downstream -------------------------------------------------------------------------

CORRELATION_TARGETS: tuple[Quantity, ...] = (
    VAL_LOSS,
    SCALAR_QUANTITIES["ood_loss"],
    SCALAR_QUANTITIES["icl_score"],
    SCALAR_QUANTITIES["induction_loss"],
    INDUCTION,
    INDUCTION_MAX,
)


def rank_downstream_frame(
    scalars: pd.DataFrame, probes: pd.DataFrame, site: str = "k", metric: str = "pr_sv"
) -> tuple[pd.DataFrame, list[Quantity]]:
    """Wide frame ``arm, seed, tokens, x, <target keys>`` (x: the mean key PR) per run and eval
    point, and the targets that have any data. Used by the correlation table and its scatter plot."""
    x = quantity_series(scalars, probes, probe_quantity(site, metric)).rename(columns={"value": "x"})
    targets = []
    frame = x
    for q in CORRELATION_TARGETS:
        y = quantity_series(scalars, probes, q)
        if not len(y):
            continue
        targets.append(q)
        frame = frame.merge(y.rename(columns={"value": q.key}), on=["arm", "seed", "tokens"], how="left")
    return frame, targets


def correlation_table(
    scalars: pd.DataFrame,
    probes: pd.DataFrame,
    *,
    site: str = "k",
    metric: str = "pr_sv",
    finished: Collection[tuple[str, int]] | None = None,
) -> pd.DataFrame:
    """Pearson r (95% Fisher-z interval) and Spearman ρ between mean key PR and each downstream
    measure, in two scopes:

    * ``eval points``: every eval point after token 0 of every run and arm, pooled. Points of one
      run are not independent (they share one trajectory), and PR and loss both drift with training
      time, so these p-values are too small and r mixes "later in training" with "this arm";
      reported because it is what a scatter of all checkpoints shows.
    * ``run ends``: one point per run, at its last eval point (finished runs only, when any
      finished): independent runs, the honest test, with fewer points.
    * ``within arms``: the run ends with each arm's mean removed (`stats.within_groups`): whether
      PR and the measure move together among seeds of one arm, or only between arms (two arms
      far apart give r near ±1 across runs however the seeds inside them scatter).

    Token 0 is left out: every arm starts from the same untrained weights there.
    """
    frame, targets = rank_downstream_frame(scalars, probes, site, metric)
    rows = []
    for q in targets:
        sub = frame[(frame["tokens"] > 0) & np.isfinite(frame["x"]) & np.isfinite(frame[q.key])]
        scopes = [("eval points", sub)]
        runs = sub[["arm", "seed"]].drop_duplicates()
        keep = [tuple(r) for r in runs.itertuples(index=False)]
        if finished:
            done = [r for r in keep if r in finished]
            keep = done or keep
        ends = sub.sort_values("tokens").groupby(["arm", "seed"]).tail(1)
        keep = set(keep)
        ends = ends[np.array([(a, s) in keep for a, s in zip(ends["arm"], ends["seed"])], dtype=bool)]
        scopes.append(("run ends", ends))
        scopes.append(("within arms", ends))
        for scope, data in scopes:
            x, y = data["x"].to_numpy(float), data[q.key].to_numpy(float)
            c = within_groups(x, y, data["arm"].tolist()) if scope == "within arms" else correlate(x, y)
            rows.append(
                {
                    "quantity": q.label,
                    "key": q.key,
                    "scope": scope,
                    "n": c.n,
                    "runs": int(data[["arm", "seed"]].drop_duplicates().shape[0]),
                    "arms": int(data["arm"].nunique()),
                    "pearson": c.pearson,
                    "pearson_lo": c.pearson_lo,
                    "pearson_hi": c.pearson_hi,
                    "pearson_p": c.pearson_p,
                    "spearman": c.spearman,
                    "spearman_p": c.spearman_p,
                }
            )
    cols = [
        "quantity",
        "key",
        "scope",
        "n",
        "runs",
        "arms",
        "pearson",
        "pearson_lo",
        "pearson_hi",
        "pearson_p",
        "spearman",
        "spearman_p",
    ]
    return pd.DataFrame(rows, columns=cols)


__all__ = ["pairwise_comparisons", "correlation_table", "rank_downstream_frame", "CORRELATION_TARGETS"]
