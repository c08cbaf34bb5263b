"""KV-cache headroom in the study report and in `rankscope analyze`: how many key dimensions each
kv head needs at a loss tolerance (`headroom.kv_headroom`: rows kv_rank, kv_dloss, kv_r90 per
layer, kv head and site), and what that would save in cache bytes per token, next to the r90
heuristic (Loki's 90%-of-variance rank) on the same heads.

Bytes: a key cache holds, per token, head_dim values per kv head per layer; keys stored at rank r
hold r. Saved per token = Σ over layers and kv heads of (head_dim - r) x bytes per value, in the
model's cache dtype: bf16 (2 bytes) by default, as rankscope's mixed precision computes the keys.
The values' half of the cache is not counted, nor the per-head projection matrices (head_dim x r,
stored once, not per token).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..settings.units import fmt_count
from .blocks import Block, Para, Table, code, md_escape
from .plotstyle import Plot, new_figure, save, style_axes

KV_METRICS = ("kv_rank", "kv_dloss", "kv_r90")  # headroom.KV_METRICS (this module stays torch-free)
SHOWN_SITES = {"k_pre": "keys before RoPE", "k": "keys after RoPE"}
CACHE_BYTES = 2  # bf16
DEFAULT_TOL = 0.01
PLOT = "kv_headroom.png"


def bytes_saved_per_token(ranks: Sequence[float], head_dim: int, bytes_per_value: int = CACHE_BYTES) -> float:
    """Key-cache bytes per token saved by storing each kv head's keys at its rank r (one entry of
    `ranks` per layer and kv head) instead of head_dim values: Σ (head_dim - r) x bytes_per_value."""
    return float(sum(head_dim - float(r) for r in ranks)) * bytes_per_value


def headroom_frame(probes: pd.DataFrame, arms: Sequence[str] | None = None) -> pd.DataFrame:
    """The kv rows at each arm's last point that has them, one row per (arm, seed, tokens, site,
    layer, head) with columns kv_rank, kv_dloss, kv_r90 (empty frame if none)."""
    cols = ["arm", "seed", "tokens", "site", "layer", "head", *KV_METRICS]
    if probes is None or not len(probes) or "metric" not in probes:
        return pd.DataFrame(columns=cols)
    kv = probes[probes["metric"].isin(KV_METRICS) & probes["site"].isin(list(SHOWN_SITES))]
    if not len(kv):
        return pd.DataFrame(columns=cols)
    parts = []
    for arm in arms if arms is not None else sorted(kv["arm"].unique()):
        a = kv[kv["arm"] == arm]
        if len(a):
            parts.append(a[a["tokens"] == a["tokens"].max()])
    if not parts:
        return pd.DataFrame(columns=cols)
    wide = pd.concat(parts).pivot_table(
        index=["arm", "seed", "tokens", "site", "layer", "head"], columns="metric", values="value", aggfunc="mean"
    )
    wide = wide.reset_index()
    for m in KV_METRICS:
        if m not in wide:
            wide[m] = np.nan
    return wide[cols]


def headroom_table(
    frame: pd.DataFrame, head_dim: int, bytes_per_value: int = CACHE_BYTES, arms: Sequence[str] | None = None
) -> pd.DataFrame:
    """Per (arm, site): seeds, kv heads (layers x kv heads), the mean measured rank and r90 over
    heads and seeds, the full key cache per token, the bytes per token saved at the measured ranks
    and at r90 (mean over seeds), and how many heads r90 cuts below the measured rank."""
    out = []
    order = list(arms) if arms is not None else sorted(frame["arm"].unique())
    for arm in order:
        for site in SHOWN_SITES:
            f = frame[(frame["arm"] == arm) & (frame["site"] == site)]
            if not len(f):
                continue
            per_seed = [g for _, g in f.groupby("seed")]
            n_heads = int(np.mean([len(g) for g in per_seed]))
            out.append(
                dict(
                    arm=arm,
                    site=site,
                    tokens=int(f["tokens"].iloc[0]),
                    seeds=len(per_seed),
                    heads=n_heads,
                    rank=float(f["kv_rank"].mean()),
                    r90=float(f["kv_r90"].mean()),
                    full_bytes=float(n_heads * head_dim * bytes_per_value),
                    saved_bytes=float(
                        np.mean([bytes_saved_per_token(g["kv_rank"], head_dim, bytes_per_value) for g in per_seed])
                    ),
                    saved_r90_bytes=float(
                        np.mean([bytes_saved_per_token(g["kv_r90"], head_dim, bytes_per_value) for g in per_seed])
                    ),
                    r90_below=int((f["kv_r90"] < f["kv_rank"]).sum()),
                    rows=len(f),
                    # heads at the ladder's bottom rung, and the most that rung costs any of them
                    floor=int((f["kv_rank"] <= 1).sum()),
                    floor_dloss=float(f.loc[f["kv_rank"] <= 1, "kv_dloss"].max()) if (f["kv_rank"] <= 1).any() else 0.0,
                )
            )
    return pd.DataFrame(out)


def _pct(part: float, whole: float) -> str:
    return f"{part / whole:.0%}" if whole > 0 else "–"


def floor_notes(table: pd.DataFrame) -> list[str]:
    """A sentence for each (arm, keys) whose heads sit at rank 1, the bottom of the ladder: there
    the loss does not need the keys yet, so the 'saving' is an upper bound of a model that barely
    uses its keys, not headroom of a trained one."""
    out = []
    for r in table.itertuples() if table is not None else ():
        if not r.floor:
            continue
        which = "every kv head" if r.floor == r.rows else f"{r.floor} of {r.rows} kv heads"
        out.append(
            f"{md_escape(r.arm)}, {SHOWN_SITES[r.site]}: {which} at rank 1, the smallest rank tried (projecting "
            f"to one direction costs at most {r.floor_dloss:.1%} loss): at this point of training "
            + (
                "the keys are barely used, and the saving is an upper bound for a model that does not need "
                "its keys yet."
                if r.floor == r.rows
                else "those heads' keys are barely used yet."
            )
        )
    return out


def _at_floor(r) -> bool:
    return bool(r.rows) and r.floor == r.rows


def headroom_blocks(table: pd.DataFrame, tol: float = DEFAULT_TOL, bytes_per_value: int = CACHE_BYTES) -> list[Block]:
    """The report's KV-cache headroom paragraph and table (nothing if `table` is empty)."""
    if table is None or not len(table):
        return []
    rows = []
    for r in table.itertuples():
        rows.append(
            [
                md_escape(r.arm),
                code(r.site),
                fmt_count(r.tokens),
                str(r.seeds),
                str(r.heads),
                f"{r.rank:.1f}" + (" (floor)" if _at_floor(r) else ""),
                f"{r.r90:.1f}",
                f"{r.full_bytes:.0f}",
                f"{r.saved_bytes:.0f} ({_pct(r.saved_bytes, r.full_bytes)})" + (" ≤ bound" if _at_floor(r) else ""),
                f"{r.saved_r90_bytes:.0f} ({_pct(r.saved_r90_bytes, r.full_bytes)})",
                f"{r.r90_below} / {r.rows}",
            ]
        )
    header = [
        "arm",
        "keys",
        "at",
        "seeds",
        "kv heads",
        f"rank at {tol:.0%}",
        "r90",
        "key cache B/token",
        "saved at rank",
        "saved at r90",
        "r90 < rank",
    ]
    intro = Para(
        f"How many key dimensions each kv head needs: that head's keys alone are projected onto their top-r "
        f"principal directions (the others untouched), and its rank is the smallest r on the ladder 1, 2, 4, "
        f"…, head_dim whose relative loss increase on the probe batch stays within {tol:.0%} (a binary search on "
        f"the ladder). `k_pre`: keys before RoPE, where a low-rank key cache is stored (Palu, Loki); `k`: after "
        f"RoPE. Next to it r90, the fewest directions holding 90% of the keys' energy (Loki's heuristic). "
        f"Bytes per token of the key cache in bf16 ({bytes_per_value} bytes per value), all layers and kv heads: "
        f"the full cache, and what storing each head at its measured rank (or at its r90) would save; values and "
        f"the per-head projection matrices are not counted. Mean over kv heads (ranks) and seeds (bytes) at each "
        f"arm's last measured point; the last column counts the (seed, layer, kv head) entries where r90 keeps "
        f"fewer dimensions than the loss needs. (floor): every head at rank 1, the bottom of the ladder; its "
        f"saving is then an upper bound (≤ bound), not a measured headroom."
    )
    notes = floor_notes(table)
    return [intro, Table(header, rows, ["l", "l"] + ["r"] * (len(header) - 2))] + (
        [Para(" ".join(notes))] if notes else []
    )


def plot_kv_headroom(
    frame: pd.DataFrame,
    arms: Sequence[str],
    colors: dict[str, tuple[float, ...]],
    path: Path,
    *,
    head_dim: int | None = None,
    tol: float = DEFAULT_TOL,
) -> Plot | None:
    """One panel per key site (before, after RoPE): each kv head's measured rank at `tol` against
    its r90 (mean over seeds), one colour per arm, on log2 axes; the diagonal is where the heuristic
    and the measurement agree (above it, r90 would cut dimensions the loss needs)."""
    if frame is None or not len(frame):
        return None
    sites = [s for s in SHOWN_SITES if (frame["site"] == s).any()]
    heads = frame.groupby(["arm", "site", "layer", "head"], as_index=False)[["kv_rank", "kv_r90"]].mean()
    top = head_dim or float(np.nanmax(heads[["kv_rank", "kv_r90"]].to_numpy(float)))
    fig = new_figure(4.2 * len(sites) + 0.6, 3.8)
    axes = np.atleast_1d(fig.subplots(1, len(sites), sharey=True, squeeze=False)).ravel()
    rng = np.random.default_rng(0)  # a fixed jitter: many heads share one ladder rung
    for ax, site in zip(axes, sites):
        ax.plot([0.8, top * 1.25], [0.8, top * 1.25], color="0.6", ls="--", lw=1, zorder=0)
        for arm in arms:
            h = heads[(heads["arm"] == arm) & (heads["site"] == site)]
            if not len(h):
                continue
            j = 2 ** rng.uniform(-0.08, 0.08, size=(2, len(h)))
            ax.scatter(
                h["kv_r90"] * j[0], h["kv_rank"] * j[1], s=18, color=colors.get(arm), alpha=0.75, label=arm, lw=0
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlim(0.8, top * 1.25)
        ax.set_ylim(0.8, top * 1.25)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(_plain_formatter())
        ax.set_xlabel("r90 (90% of the key energy)")
        ax.set_title(SHOWN_SITES[site], fontsize=10)
        style_axes(ax)
    axes[0].set_ylabel(f"measured rank at {tol:.0%} loss")
    axes[0].legend(fontsize=8, frameon=False, loc="upper left")
    save(fig, path)
    caption = (
        f"KV-cache headroom: each kv head's measured key rank (the fewest ladder dimensions that keep the loss "
        f"within {tol:.0%}) against its r90, before and after RoPE, one point per (layer, kv head) and arm"
        + (", mean over seeds" if frame["seed"].nunique() > 1 else "")
        + ", slightly jittered; dashed: r90 = measured rank. Points above the line are heads where the r90 "
        "heuristic would cut dimensions the loss needs; below it, headroom the heuristic leaves unused."
    )
    floored = sorted({(a, s) for (a, s), g in frame.groupby(["arm", "site"]) if (g["kv_rank"] <= 1).all()})
    if floored:
        caption += (
            " At rank 1, the bottom of the ladder: "
            + "; ".join(f"{a} ({SHOWN_SITES[s]})" for a, s in floored)
            + " — every head there; those keys are barely used yet, and their saving is an upper bound."
        )
    return Plot(path, caption)


def _plain_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda x, _p: f"{x:g}")


def run_tolerance(configs: Sequence[dict]) -> float:
    """The kv tolerance the runs used (`probe.kv_tolerance`; the default where a config lacks it)."""
    tols = {float((c.get("probe") or {}).get("kv_tolerance", DEFAULT_TOL)) for c in configs}
    return tols.pop() if len(tols) == 1 else DEFAULT_TOL


def analyze_markdown(table: pd.DataFrame, tol: float, bytes_per_value: int = CACHE_BYTES) -> str:
    """The KV-cache headroom section of `rankscope analyze`'s summary.md."""
    if table is None or not len(table):
        return ""
    lines = [
        "",
        "## KV-cache headroom",
        "",
        f"Per kv head, the fewest key dimensions (ladder 1, 2, 4, …) that keep the loss within {tol:.0%} when only "
        f"that head's keys are projected; bytes per token of the key cache in bf16 ({bytes_per_value} bytes per "
        "value), all layers and kv heads (kv_headroom.csv has every head).",
        "",
        "| keys | mean rank | mean r90 | key cache B/token | saved at rank | saved at r90 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in table.itertuples():
        lines.append(
            f"| {SHOWN_SITES[r.site]} | {r.rank:.1f}{' (floor)' if _at_floor(r) else ''} | {r.r90:.1f} | "
            f"{r.full_bytes:.0f} | {r.saved_bytes:.0f} ({_pct(r.saved_bytes, r.full_bytes)})"
            f"{' ≤ bound' if _at_floor(r) else ''} | "
            f"{r.saved_r90_bytes:.0f} ({_pct(r.saved_r90_bytes, r.full_bytes)}) |"
        )
    notes = floor_notes(table)
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


__all__ = [
    "CACHE_BYTES",
    "KV_METRICS",
    "PLOT",
    "analyze_markdown",
    "bytes_saved_per_token",
    "floor_notes",
    "headroom_blocks",
    "headroom_frame",
    "headroom_table",
    "plot_kv_headroom",
    "run_tolerance",
]
