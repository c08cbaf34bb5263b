"""Per-layer views at the end of training: the diagnosis of collapsed layers, functional rank next
to key PR, and the rank sweep behind functional rank. Pure pandas; the figures are in `layer_plots.py`.

The seed asks "why do some layers collapse?" (layers 1 and 3 of its QK-Norm run fell below PR 10
while the others stayed near 40). A layer's key PR alone cannot answer that; putting the things
that shape a layer's keys next to it, layer by layer, can at least show what a collapsed layer did
differently: how unevenly its QK-Norm gains grew (gain CV), how sharp its attention became
(entropy, max logit), and whether its key weights themselves lost rank (W_K stable rank).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .quantities import RANK_SWEEP, is_rank_sweep
from .series import LATEST, choose_points, complete_rows, head_layer_mean, layer_means_of, runs_at, seed_stats

# A layer is flagged as collapsed when its key PR is below this share of the median layer of its
# own network: the seed's collapsed layers sat at about a quarter of their neighbours. Relative to
# the arm's own layers, so a uniformly low arm (AdamW) is not all "collapsed"; the comparison
# across arms is what the trajectory plots and the paradox table are for.
COLLAPSE_SHARE = 0.5


@dataclass
class DiagPanel:
    """One quantity across layers for one arm, at the arm's END.

    layers: rows (layer, series, mean, lo, hi, n) — `series` names a sub-series (e.g. "keys" and
    "queries" for gain CV; "" for one series); heads: (layer, head, value) per-head means over seeds
    (None for per-layer quantities); ylim: shared by every arm; missing: text shown when this arm has
    no data for the quantity (e.g. no QK-Norm, so no gains).
    """

    title: str
    ylabel: str
    layers: pd.DataFrame
    heads: pd.DataFrame | None = None
    ylim: tuple[float, float] = (0.0, 1.0)
    hline: tuple[float, str] | None = None
    missing: str = "not recorded"


@dataclass(frozen=True)
class DiagSpec:
    key: str
    title: str
    ylabel: str
    series: tuple[tuple[str, str, str], ...]  # (series name, site, metric)
    per_head: bool


DIAGNOSIS: tuple[DiagSpec, ...] = (
    DiagSpec("key_pr", "key PR (participation ratio of the keys)", "PR (dims)", (("", "k", "pr_sv"),), True),
    DiagSpec(
        "gain_cv",
        "QK-Norm gain spread (coefficient of variation of the gains)",
        "gain CV",
        (("keys", "k_gain", "gain_cv"), ("queries", "q_gain", "gain_cv")),
        False,
    ),
    DiagSpec("entropy", "attention entropy (mean over queries)", "entropy (nats)", (("", "attn", "entropy"),), True),
    DiagSpec("max_logit", "max attention logit", "max logit", (("", "attn", "max_logit"),), True),
    DiagSpec(
        "wk_stable_rank",
        "W_K stable rank (each head's key weights)",
        "stable rank",
        (("", "w_k", "stable_rank"),),
        True,
    ),
    DiagSpec(
        "dwk_pr",
        "W_K-update PR (participation ratio of the last step's change to each head's key weights)",
        "PR (dims)",
        (("", "dw_k", "pr_sv"),),
        True,
    ),
    DiagSpec(
        "dwk_share",
        "K's share of the update energy (‖ΔW_K‖² over the layer's Q, K, V, O, and over K's Muon block)",
        "share",
        (("of Q, K, V, O", "dw_k", "k_share"), ("of K's block", "dw_k", "block_share")),
        False,
    ),
)


def _partition(probes: pd.DataFrame, pairs: Collection[tuple[str, str]]) -> dict[tuple[str, str], pd.DataFrame]:
    want = set(pairs)
    sub = probes[probes["site"].isin({s for s, _ in want}) & probes["metric"].isin({m for _, m in want})]
    return {(str(s), str(m)): g for (s, m), g in sub.groupby(["site", "metric"], sort=False) if (s, m) in want}


def layer_stats_at(
    rows: pd.DataFrame, arm: str, tokens: int, seeds: Collection[int] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(layer stats, per-head means) of one arm's rows of one (site, metric) at `tokens`.

    `seeds`: the runs that reached `tokens` (by default, those with a row at exactly `tokens`). Only
    they count: a run stopped early must not lend its last, early value to the end of training.
    layer stats: (layer, mean, lo, hi, sd, min, max, n) over seeds of the per-run layer means;
    per-head: (layer, head, value), each head's mean over seeds (empty for per-layer metrics).
    """
    rows = rows[rows["arm"] == arm]
    if seeds is None:
        seeds = set(rows.loc[rows["tokens"] == tokens, "seed"].tolist())
    # a quantity probed on another cadence (or only at some points) still shows its value by then
    rows = runs_at(rows[rows["seed"].isin(set(seeds))], tokens, LATEST)
    if not len(rows):
        empty = pd.DataFrame(columns=["layer", "mean", "lo", "hi", "sd", "min", "max", "n"])
        return empty, pd.DataFrame(columns=["layer", "head", "value"])
    lm = layer_means_of(rows)
    stats = seed_stats(lm, by=("layer",))
    heads = complete_rows(rows)
    heads = heads[heads["head"] >= 0]
    heads = heads.groupby(["layer", "head"], as_index=False)["value"].mean()
    return stats, heads


def collapsed_layers(stats: pd.DataFrame, share: float = COLLAPSE_SHARE) -> list[int]:
    """Layers whose mean key PR is below `share` of the median layer (needs three or more layers)."""
    s = stats[np.isfinite(stats["mean"].to_numpy(dtype=float))]
    if len(s) < 3:
        return []
    median = float(np.median(s["mean"]))
    return sorted(int(x) for x in s.loc[s["mean"] < share * median, "layer"])


def collapse_rule(share: float = COLLAPSE_SHARE) -> str:
    return f"key PR below {share:.0%} of the arm's median layer"


@dataclass
class Diagnosis:
    arm: str
    tokens: int
    n_seeds: int
    panels: list[DiagPanel]
    flagged: list[int]
    layer_values: dict[str, pd.DataFrame]  # spec key -> (layer, mean) of the first series


def diagnoses(
    probes: pd.DataFrame, arms: Sequence[str], ends: dict[str, int], head_dim: int | None = None
) -> tuple[list[Diagnosis], int]:
    """One `Diagnosis` per arm with key PR at its END (`ends`, from the key PR series), and the
    number of layers. Each quantity's y-range is shared by all arms; quantities no arm recorded
    are left out, and an arm lacking one (no QK-Norm, so no gains) says so in its panel."""
    pairs = {(site, metric) for spec in DIAGNOSIS for _, site, metric in spec.series}
    parts = _partition(probes, pairs)
    specs = [spec for spec in DIAGNOSIS if any((site, metric) in parts for _, site, metric in spec.series)]
    per_arm: dict[str, dict[str, tuple[pd.DataFrame, pd.DataFrame]]] = {}
    n_layers = 0
    # the runs that reached each arm's END (they have key PR there); only they describe the end
    key_rows = parts.get(("k", "pr_sv"), probes.iloc[:0])
    reached = {
        a: set(key_rows.loc[(key_rows["arm"] == a) & (key_rows["tokens"] == t), "seed"].tolist())
        for a, t in ends.items()
    }
    for a in arms:
        if a not in ends:
            continue
        per_arm[a] = {}
        for spec in specs:
            frames, heads = [], []
            for name, site, metric in spec.series:
                if (site, metric) not in parts:
                    continue
                st, hd = layer_stats_at(parts[(site, metric)], a, ends[a], reached[a])
                if len(st):
                    frames.append(st.assign(series=name))
                    n_layers = max(n_layers, int(st["layer"].max()) + 1)
                if spec.per_head and len(hd):
                    heads.append(hd)
            layer_df = (
                pd.concat(frames, ignore_index=True)
                if frames
                else pd.DataFrame(columns=["layer", "series", "mean", "lo", "hi", "n"])
            )
            head_df = pd.concat(heads, ignore_index=True) if heads else None
            per_arm[a][spec.key] = (layer_df, head_df)

    # Shared y-range per quantity across arms, set by the data (bars and head dots). Whiskers may
    # reach a little further but never set the scale: with two seeds a 95% t interval is
    # ±12.7 standard errors, and one such whisker would flatten every bar of every arm.
    ylims: dict[str, tuple[float, float]] = {}
    for spec in specs:
        vals, whisk = [], []
        for a in per_arm:
            ld, hd = per_arm[a][spec.key]
            if "mean" in ld:
                vals.append(ld["mean"].to_numpy(dtype=float))
                whisk.append(ld["hi"].to_numpy(dtype=float))
            if hd is not None:
                vals.append(hd["value"].to_numpy(dtype=float))
        v = np.concatenate(vals) if vals else np.array([])
        v = v[np.isfinite(v)]
        w = np.concatenate(whisk) if whisk else np.array([])
        w = w[np.isfinite(w)]
        if not len(v):
            ylims[spec.key] = (0.0, 1.0)
            continue
        lo, hi = min(0.0, float(v.min())), max(0.0, float(v.max()))
        if len(w):
            hi = max(hi, min(float(w.max()), hi * 1.25))
        if spec.key == "key_pr" and head_dim:
            hi = max(hi, head_dim) if hi <= head_dim * 1.1 else head_dim * 1.1
        pad = 0.08 * (hi - lo) if hi > lo else 1.0
        ylims[spec.key] = (lo - (pad if lo < 0 else 0.0), hi + pad)

    out = []
    for a, data in per_arm.items():
        panels = []
        for spec in specs:
            ld, hd = data[spec.key]
            missing = "no QK-Norm gains in this arm" if spec.key == "gain_cv" else "not recorded for this arm"
            hline = (float(head_dim), f"head dim {head_dim}") if spec.key == "key_pr" and head_dim else None
            panels.append(DiagPanel(spec.title, spec.ylabel, ld, hd, ylims[spec.key], hline, missing))
        key_pr = data.get("key_pr", (pd.DataFrame(), None))[0]
        flagged = collapsed_layers(key_pr) if len(key_pr) else []
        n = int(key_pr["n"].max()) if len(key_pr) else 0
        values = {
            spec.key: data[spec.key][0][data[spec.key][0]["series"] == spec.series[0][0]][["layer", "mean"]]
            for spec in specs
            if len(data[spec.key][0])
        }
        out.append(Diagnosis(a, int(ends[a]), n, panels, flagged, values))
    return out, n_layers


def collapsed_rows(diag: Diagnosis, titles: dict[str, str]) -> list[dict[str, str]]:
    """For each flagged layer of one arm: each quantity's value next to the median of the arm's
    other layers, e.g. {"layer": "1", "key PR": "8.1 (others 38.0)", ...}."""
    rows = []
    for layer in diag.flagged:
        row = {"layer": str(layer)}
        for key, df in diag.layer_values.items():
            v = df.loc[df["layer"] == layer, "mean"]
            others = df.loc[~df["layer"].isin(diag.flagged), "mean"].to_numpy(dtype=float)
            others = others[np.isfinite(others)]
            if not len(v) or not np.isfinite(v.iloc[0]):
                row[titles[key]] = "–"
                continue
            val = float(v.iloc[0])
            med = float(np.median(others)) if len(others) else math.nan
            d = 1 if max(abs(val), abs(med) if math.isfinite(med) else 0) >= 10 else 2
            row[titles[key]] = f"{val:.{d}f} (others {med:.{d}f})" if math.isfinite(med) else f"{val:.{d}f}"
        rows.append(row)
    return rows


# --- functional rank and the rank sweep ------------------------------------------------------------


def functional_rank_data(
    probes: pd.DataFrame, arms: Sequence[str], finished: Collection[tuple[str, int]] | None = None, site: str = "k"
) -> tuple[dict[str, pd.DataFrame], dict[str, int], dict[str, int]]:
    """Per arm: (layer, series, mean, lo, hi, n) for "functional rank" and "key PR" at the last
    point where functional rank was measured (usually only the end), that point, and the seeds.
    Empty dicts when no run recorded functional rank (an older study)."""
    fr_rows = probes[(probes["site"] == site) & (probes["metric"] == "functional_rank")]
    if not len(fr_rows):
        return {}, {}, {}
    fr = head_layer_mean(fr_rows, site, "functional_rank")
    _, ends = choose_points(fr, arms, finished)
    pr_rows = probes[(probes["site"] == site) & (probes["metric"] == "pr_sv")]
    data, tokens, seeds = {}, {}, {}
    for a, t in ends.items():
        ran = set(fr_rows.loc[(fr_rows["arm"] == a) & (fr_rows["tokens"] == t), "seed"].tolist())
        f_st, _ = layer_stats_at(fr_rows, a, t, ran)
        p_st, _ = layer_stats_at(pr_rows, a, t, ran) if len(pr_rows) else (pd.DataFrame(), None)
        frames = [f_st.assign(series="functional rank")]
        if len(p_st):
            frames.append(p_st.assign(series="key PR"))
        data[a] = pd.concat(frames, ignore_index=True)
        tokens[a] = int(t)
        seeds[a] = int(f_st["n"].max()) if len(f_st) else 0
    return data, tokens, seeds


def rank_sweep_curves(probes: pd.DataFrame, ends: dict[str, int], site: str = "k") -> dict[str, pd.DataFrame]:
    """Per arm: (layer, r, value) of the `dloss_r<r>` sweep at the arm's point in `ends`, each
    layer's value averaged over seeds."""
    rows = probes[probes["site"] == site]
    rows = rows[rows["metric"].str.startswith(RANK_SWEEP)]  # vectorised first: probe tables run to millions of rows
    rows = rows[rows["metric"].map(is_rank_sweep)]
    if not len(rows):
        return {}
    rows = rows.assign(r=rows["metric"].str.slice(len(RANK_SWEEP)).astype(int))
    out = {}
    for a, t in ends.items():
        sub = rows[rows["arm"] == a]
        sub = sub[sub["seed"].isin(set(sub.loc[sub["tokens"] == t, "seed"].tolist()))]
        sub = runs_at(sub, t, LATEST)
        if not len(sub):
            continue
        per_run = sub.groupby(["seed", "layer", "r"], as_index=False)["value"].mean()
        out[a] = per_run.groupby(["layer", "r"], as_index=False)["value"].mean()
    return out


__all__ = [
    "DIAGNOSIS",
    "COLLAPSE_SHARE",
    "Diagnosis",
    "diagnoses",
    "collapsed_layers",
    "collapse_rule",
    "collapsed_rows",
    "functional_rank_data",
    "rank_sweep_curves",
    "layer_stats_at",
]
