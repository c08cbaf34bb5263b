"""A contrast over training: treatment − control, seed by seed, at every eval point both arms
reached, with its 95% interval, and where its mean changes sign.

The seed's question is a trajectory, not a point: QK-Norm's key-PR gap was −3.3 at 16M tokens and
about −21 at 25M in the seed, and +4.3 at 1M tokens here. One curve of differences with a band
shows when a gap opens, narrows or flips, which two curves of arm means with overlapping bands
hide (their seeds are paired: same initial weights, same batches).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import FixedFormatter, FixedLocator, MaxNLocator, NullLocator

from ..settings.units import fmt_count
from .blocks import Block, Para, Table, md_escape
from .format import MINUS, decimals_for, fmt_mean_ci, resolving_decimals, signed
from .plotstyle import Plot, new_figure, reference_line, save, style_axes
from .quantities import Quantity
from .series import compare_at
from .stats import PAIRED_CONSTANT
from .token_axis import tokens_axis

COLUMNS = ["tokens", "mean", "lo", "hi", "p", "n", "test"]


def contrast_trajectory(series: pd.DataFrame, treatment: str, control: str) -> pd.DataFrame:
    """`treatment − control` of one quantity's series (``arm, seed, tokens, value``) at each eval
    point where both arms have a value: tokens, mean, lo, hi (95% paired t; NaN with one seed),
    p, n (seeds paired), test (`stats.Difference.test`)."""
    have = [set(series.loc[series["arm"] == arm, "tokens"].tolist()) for arm in (treatment, control)]
    rows = []
    for t in sorted(have[0] & have[1]):
        d = compare_at(series, treatment, control, int(t))
        rows.append([int(t), d.mean, d.lo, d.hi, d.p, d.n, d.test])
    return pd.DataFrame(rows, columns=COLUMNS)


def sign_changes(trajectory: pd.DataFrame) -> list[tuple[int, int]]:
    """The (before, after) eval points between which the mean difference changes sign (a zero
    counts as no sign, so +, 0, − is one change between the + and the −)."""
    points = [(int(t), m) for t, m in zip(trajectory["tokens"], trajectory["mean"]) if math.isfinite(m) and m != 0]
    return [(a, b) for (a, ma), (b, mb) in zip(points, points[1:]) if (ma > 0) != (mb > 0)]


def describe(trajectory: pd.DataFrame, treatment: str, control: str, what: str, decimals: int) -> str:
    """One sentence: the difference at the first and last points and where its sign changes."""
    if not len(trajectory):
        return f"{treatment} and {control} share no eval point of {what}."
    trained = trajectory[trajectory["tokens"] > 0]  # at token 0 the arms share their weights
    first, last = (trained if len(trained) else trajectory).iloc[0], trajectory.iloc[-1]
    changes = sign_changes(trajectory)
    where = (
        "its sign never changes"
        if not changes
        else "its sign changes between " + "; ".join(f"{fmt_count(a)} and {fmt_count(b)} tokens" for a, b in changes)
    )
    name = f"{what[0].upper()}{what[1:]}, {treatment} {MINUS} {control}"
    return (
        f"{name}: {difference_cell(first, decimals)} at {fmt_count(int(first['tokens']))} tokens, "
        f"{difference_cell(last, decimals)} at {fmt_count(int(last['tokens']))}; {where}."
    )


def difference_cell(row: pd.Series, d: int) -> str:
    """A row's difference (mean, lo, hi, n, test) as text: the interval where there is one, and
    the words for a difference that is the same in every seed."""
    if row["test"] == PAIRED_CONSTANT:  # a zero-width interval: say why
        return f"{signed(float(row['mean']), d)} (same in every seed)"
    m, lo, hi = float(row["mean"]), float(row["lo"]), float(row["hi"])
    return fmt_mean_ci(m, lo, hi, int(row["n"]), resolving_decimals(d, m, lo, hi))


def trajectory_blocks(
    trajectories: Sequence[tuple[Quantity, dict[tuple[str, str], pd.DataFrame]]], tokens_per_step: int | None
) -> list[Block]:
    """Per contrast: a sentence per quantity and a table of every eval point (tokens, steps, each
    quantity's difference with its 95% interval)."""
    if not trajectories:
        return []
    pairs = list(dict.fromkeys(pair for _, t in trajectories for pair in t))
    blocks: list[Block] = [
        Para(
            "Each contrast as treatment − control, seed by seed, at every eval point both arms reached, with a "
            "95% paired t-interval over seeds (one seed: the difference alone). A difference whose interval "
            "excludes 0 stands out from seed noise at that point; reading many points, expect about one in "
            "twenty to do so by chance."
        )
    ]
    for a, b in pairs:
        cols = [(q, t[(a, b)]) for q, t in trajectories if (a, b) in t and len(t[(a, b)])]
        if not cols:
            continue
        digits = {q.key: max(decimals_for(x["mean"], q.label), 2 if "loss" not in q.label else 3) for q, x in cols}
        blocks.append(Para(" ".join(describe(x, a, b, q.label, digits[q.key]) for q, x in cols)))
        points = sorted({int(t) for _, x in cols for t in x["tokens"]})
        header = ["tokens"] + (["steps"] if tokens_per_step else []) + [f"Δ {q.label}" for q, _ in cols]
        rows = []
        for t in points:
            row = [fmt_count(t)] + ([f"{t // tokens_per_step:,}"] if tokens_per_step else [])
            for q, x in cols:
                hit = x[x["tokens"] == t]
                row.append(difference_cell(hit.iloc[0], digits[q.key]) if len(hit) else "–")
            rows.append(row)
        blocks.append(Para(f"**{md_escape(a)} {MINUS} {md_escape(b)}** at every eval point:"))
        blocks.append(Table(header, rows, ["r"] * len(header)))
    return blocks


def plot_contrast_trajectories(
    panels: Sequence[tuple[Quantity, dict[tuple[str, str], pd.DataFrame]]],
    path: Path,
    *,
    colors: Sequence | None = None,
    tokens_per_step: int | None = None,
) -> Plot | None:
    """One panel per quantity: each contrast's mean difference (line) and its 95% band over the
    paired seeds against training tokens, a line at 0. `panels`: (quantity, {(treatment, control):
    trajectory}). With `tokens_per_step`, the top axis counts optimizer steps."""
    panels = [(q, t) for q, t in panels if any(len(x) for x in t.values())]
    if not panels:
        return None
    fig = new_figure(5.2 * len(panels), 3.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    all_tokens = np.concatenate([x["tokens"].to_numpy(float) for _, t in panels for x in t.values()])
    for ax, (q, trajectories) in zip(axes, panels):
        for i, ((a, b), x) in enumerate(trajectories.items()):
            if not len(x):
                continue
            c = colors[i % len(colors)] if colors else f"C{i}"
            tk = x["tokens"].to_numpy(float)
            ax.plot(tk, x["mean"], color=c, marker="o", ms=3, lw=1.5, label=f"{a} − {b}")
            lo, hi = x["lo"].to_numpy(float), x["hi"].to_numpy(float)
            ok = np.isfinite(lo) & np.isfinite(hi)
            if ok.any():
                ax.fill_between(tk[ok], lo[ok], hi[ok], color=c, alpha=0.18, lw=0)
        log = tokens_axis(ax, all_tokens)
        if not log and np.ptp(all_tokens) > 0:  # the same token range in every panel
            ax.set_xlim(all_tokens.min() - 0.03 * np.ptp(all_tokens), all_tokens.max() * 1.03)
        if tokens_per_step:
            positive = all_tokens[all_tokens > 0]
            steps_axis(ax, tokens_per_step, log, float(positive.min()) if len(positive) else 0.0)
        ax.set_ylabel(f"difference in {q.label}" + (f" ({q.unit})" if q.unit else ""))
        ax.set_title(q.label, fontsize=10)
        style_axes(ax)
        if ax is axes[0]:  # the same contrasts in every panel
            ax.legend(fontsize=8, frameon=False)
        reference_line(ax, 0.0, "0")  # after the y-limits are set
    n = max(int(x["n"].max()) for _, t in panels for x in t.values() if len(x))
    band = (
        f"bands: 95% paired t intervals over {n} seeds"
        if n >= 2
        else "one seed per arm: no interval is possible, lines only"
    )
    caption = (
        "Each contrast over training: treatment − control seed by seed (same initial weights and "
        f"batches) at every eval point both arms reached; {band}. Above 0: the treatment is higher."
    )
    return Plot(save(fig, path), caption)


def steps_axis(ax, tokens_per_step: int, log: bool, first: float) -> None:
    """Optimizer steps on the top axis (the seed's figures are at 1,953 and 6,104 steps): ticks at
    round step counts placed at their token positions, so they follow the bottom axis's scale (on a
    log axis from `first`, the first positive eval point, where the decades start)."""
    lo, hi = ax.get_xlim()
    lo = max(lo, first) if log else lo
    last = max(hi, 1.0) / tokens_per_step
    if log:
        candidates = [m * 10**k for k in range(0, int(math.log10(max(last, 1))) + 2) for m in (1, 2, 5)]
    else:
        candidates = list(MaxNLocator(nbins=6, integer=True).tick_values(0, last))
    steps = [int(c) for c in candidates if lo <= c * tokens_per_step <= hi]
    # a twin with the bottom axis's own scale: a secondary axis follows a log scale but places its
    # ticks linearly under symlog (the token axis whenever token 0 is drawn)
    top = ax.twiny()
    if ax.get_xscale() == "symlog":
        tr = ax.xaxis.get_transform()
        top.set_xscale("symlog", base=tr.base, linthresh=tr.linthresh, linscale=tr.linscale)
    else:
        top.set_xscale(ax.get_xscale())
    top.set_xlim(ax.get_xlim())
    top.spines[["left", "right", "bottom"]].set_visible(False)
    top.xaxis.set_major_locator(FixedLocator([c * tokens_per_step for c in steps]))
    top.xaxis.set_minor_locator(NullLocator())
    top.xaxis.set_major_formatter(FixedFormatter([f"{c:,}" for c in steps]))
    top.set_xlabel(f"optimizer steps ({tokens_per_step:,} tokens each)", fontsize=8)
    top.tick_params(labelsize=7)


__all__ = ["contrast_trajectory", "sign_changes", "describe", "trajectory_blocks", "plot_contrast_trajectories"]
