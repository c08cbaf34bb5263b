"""Figures over training: validation loss and mean key PR against tokens, the downstream measures
against tokens, and mean key PR against each downstream measure over every eval point. The shared
house style is in `plotstyle.py`.

Token axes switch to a log scale when the eval points span more than two decades (log-spaced
schedules, 100M+ token runs); token 0, which a log axis cannot show, keeps a short linear stretch
at the left (matplotlib's symlog with its linear threshold at the first positive eval point). Their
ticks are round counts (0, 50k, 100k; 0, 10k, 1M), see `plotstyle.TokenFormatter`.

Measures with a chance level (`quantities.chance_level`: induction loss at ln(vocab), induction
scores at uniform attention's, the ICL score at 0) get it as a labelled dashed line, and a panel
whose measure is still at chance at some arm's end says so in a corner note.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, MaxNLocator, NullFormatter, NullLocator

from ..settings.units import fmt_count
from .format import fmt_p, seeds_text, signed
from .plotstyle import (
    REFERENCE,
    SMALL,
    Plot,
    TokenFormatter,
    corner_note,
    min_span_limits,
    new_figure,
    reference_line,
    save,
    style_axes,
    token_locator,
)
from .quantities import AT, STATE_WORDS, WORSE, ChanceLevel, Quantity

LOG_DECADES = 2.0  # eval points spanning more than this many decades get a log token axis
BAND_WORDS = "shaded bands: 95% t-intervals over seeds"


def band_clause(max_n: int) -> str:
    """What the shading means, for a caption: bands over seeds, or why there are none."""
    if max_n >= 2:
        # Bands are per arm; the arm comparisons are paired. Say so, or overlapping bands get read as "no difference".
        return (
            f"lines are the mean over seeds, {BAND_WORDS} (Student t on the seed values at each eval point); "
            "two arms' bands can overlap although their seed-by-seed difference is clear, because a seed "
            "shifts every arm alike — the paired comparisons in the tables are the test"
        )
    return "one seed per arm, so no band: no interval over seeds is possible"


# --- token axes ---------------------------------------------------------------------------------------


def use_log_tokens(tokens: Iterable[float]) -> bool:
    """True when the positive eval points span more than `LOG_DECADES` decades."""
    t = np.asarray(list(tokens), dtype=float)
    t = t[np.isfinite(t) & (t > 0)]
    return len(t) >= 2 and np.log10(t.max() / t.min()) > LOG_DECADES


def tokens_axis(ax, tokens: Iterable[float] | None = None, label: str = "training tokens") -> bool:
    """Format a token x-axis; log-scaled (see the module docstring) when `tokens` call for it.
    Returns whether the axis is logarithmic, for the caption."""
    t = np.asarray(list(tokens) if tokens is not None else [], dtype=float)
    t = t[np.isfinite(t)]
    if use_log_tokens(t):
        first, last = float(t[t > 0].min()), float(t.max())
        if (t <= 0).any():
            # linscale 0.35: token 0 sits a third of a decade left of the first positive point
            ax.set_xscale("symlog", linthresh=first, linscale=0.35)
            # ticks at 0 and the decades from the first point on: a decade tick inside the short
            # linear stretch would print on top of the 0
            decades = range(math.ceil(math.log10(first)), math.floor(math.log10(last)) + 1)
            ax.xaxis.set_major_locator(FixedLocator([0.0] + [10.0**k for k in decades]))
            ax.xaxis.set_minor_locator(NullLocator())
            left = -0.04 * first  # a hair left of 0 so the token-0 marker is not cut; never negative ticks
        else:
            ax.set_xscale("log")
            left = first / 1.15
        # autoscaling a symlog axis pads into negative tokens; fix the range to the data
        ax.set_xlim(left, last * 1.15)
        ax.xaxis.set_major_formatter(TokenFormatter(log=True))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"{label} (log scale)")
        return True
    ax.xaxis.set_major_formatter(TokenFormatter())
    ax.xaxis.set_major_locator(token_locator())
    ax.set_xlabel(label)
    return False


def log_axis_clause(log: bool, zero: bool) -> str:
    if not log:
        return ""
    return "; token axis logarithmic (eval points span more than two decades)" + (
        "; token 0 sits on a short linear stretch at the left" if zero else ""
    )


def _empty(ax, text: str) -> None:
    """A panel whose data is not there yet: say so, without meaningless 0..1 ticks."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _band_panel(ax, stats: pd.DataFrame, arms: Sequence[str], colors: dict, *, markers: bool = False) -> None:
    """Mean line per arm and its 95% t band over seeds where two or more seeds have the point.

    Where fewer than two seeds reach a point (one seed diverged) the band stops instead of
    pretending to an interval; a lone point (a single eval point) gets a marker so it is visible.
    """
    for a in arms:
        s = stats[stats["arm"] == a].sort_values("tokens")
        if not len(s):
            continue
        x = s["tokens"].to_numpy(float)
        ax.plot(
            x,
            s["mean"].to_numpy(float),
            color=colors[a],
            lw=1.8,
            label=a,
            marker="o" if markers or len(s) == 1 else None,
            ms=3 if len(s) > 1 else 5,
        )
        if (s["n"] > 1).any() and "lo" in s:
            lo, hi = s["lo"].to_numpy(float), s["hi"].to_numpy(float)
            ok = np.isfinite(lo) & np.isfinite(hi)
            ax.fill_between(x, np.where(ok, lo, np.nan), np.where(ok, hi, np.nan), color=colors[a], alpha=0.2, lw=0)


def _dropout_clause(*stats: pd.DataFrame) -> str:
    """Say so when an arm's seed count changes along its curve (a run diverged, stopped or is still
    going): its mean then averages other seeds from that point on, and can jump for that reason alone."""
    for s in stats:
        if len(s) and (s.groupby("arm")["n"].nunique() > 1).any():
            return (
                "; where an arm's seed count drops along the curve (a run diverged or stopped), its mean and "
                "band cover fewer seeds from there on and can jump for that reason alone"
            )
    return ""


# The least y-span of a panel whose measure barely moves, beyond `plotstyle.MIN_REL_SPAN` of its
# level: induction scores lie in [0, 1] and the ICL score near 0 nats, where a relative rule is void.
MIN_SPAN = {"induction_score": 0.1, "induction_max": 0.1, "icl_score": 0.05}
ZERO_FLOOR = {"induction_score", "induction_max"}  # scores that cannot go below 0


def _fit_to_lines(
    ax,
    stats: pd.DataFrame,
    excess: float = 0.35,
    *,
    include: Sequence[float] = (),
    min_span: float = 0.0,
    floor: float | None = None,
) -> bool:
    """Scale the y-axis to the mean lines, letting bands reach at most `excess` of the lines' range
    beyond them; return True if some band was cut. With two seeds a 95% t band is ±12.7 standard
    errors wide, and left to autoscaling one such band flattens every line in the panel.

    `include`: levels kept in view (a chance line). A near-constant panel is widened to
    `plotstyle.min_span_limits` (at least 2% of its level, and `min_span`), never below `floor`, so
    its noise is not drawn as a trend."""
    m = stats["mean"].to_numpy(float)
    m = m[np.isfinite(m)]
    if not len(m):
        return False
    lo_m, hi_m = float(m.min()), float(m.max())
    span = hi_m - lo_m if hi_m > lo_m else max(abs(hi_m) * 0.1, 1e-3)
    lo_b = np.nanmin(np.append(stats["lo"].to_numpy(float), lo_m)) if "lo" in stats else lo_m
    hi_b = np.nanmax(np.append(stats["hi"].to_numpy(float), hi_m)) if "hi" in stats else hi_m
    lo, hi = max(lo_b, lo_m - excess * span), min(hi_b, hi_m + excess * span)
    cut = bool(lo_b < lo or hi_b > hi)
    for level in include:
        if np.isfinite(level):
            lo, hi = min(lo, level), max(hi, level)
    lo, hi = min_span_limits(lo, hi, min_span=min_span)
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    if floor is not None and lo < floor <= lo_m:
        lo, hi = floor, hi + (floor - lo)
    ax.set_ylim(lo, hi)
    return cut


CUT_WORDS = "; bands running past an axis are cut at its edge (the scale follows the means)"


def _legend_labels(arms: Sequence[str], seeds: dict[str, int]) -> list[str]:
    return [f"{a} ({seeds_text(seeds[a])})" if seeds.get(a) else f"{a} (no data yet)" for a in arms]


# --- 1. loss and mean key PR over training ------------------------------------------------------


INSET = (0.42, 0.4, 0.55, 0.52)  # where a loss panel's late-training inset sits, in axes fractions


def _zoom_loss(ax, stats: pd.DataFrame, arms: Sequence[str], colors: dict, log: bool) -> str:
    """Make the late-training loss gap readable; return the caption clause saying how.

    The loss falls from about ln(vocab) to within a few hundredths between arms, so at full scale
    the arms' curves merge. When the late curve sits in the bottom third of the axis, the empty
    upper right gets an inset of late training (the second half of the tokens on a linear axis;
    the last third of the eval points on a log axis, where the second half of the tokens can be
    just two points) with its own loss scale; otherwise the axis is cut to the range after the
    first 10% of training.
    """
    grid = np.sort(stats["tokens"].unique())
    top_t = float(grid.max()) if len(grid) else 0.0
    if top_t <= 0 or len(grid) < 4:
        return ""
    start = float(grid[-max(3, len(grid) // 3)]) if log else 0.5 * top_t
    late = stats[stats["tokens"] >= start]
    if late["tokens"].nunique() < 3:
        return ""
    lo_col = stats["lo"].fillna(stats["mean"])
    hi_col = stats["hi"].fillna(stats["mean"])
    lo, hi = ax.get_ylim()
    tail = stats["tokens"] >= (start if log else 0.35 * top_t)
    if (((hi_col[tail] - lo) / (hi - lo)) <= 0.33).all():
        inset = ax.inset_axes(INSET)
        _band_panel(inset, late, arms, colors, markers=log)
        a = float(lo_col[late.index].min())
        b = float(hi_col[late.index].max())
        pad = 0.08 * (b - a) if b > a else 0.01
        inset.set_ylim(*min_span_limits(a - pad, b + pad))
        if log:
            inset.set_xscale("log")
            inset.set_xlim(start / 1.1, top_t * 1.1)
            inset.xaxis.set_minor_formatter(NullFormatter())
        else:
            inset.xaxis.set_major_locator(token_locator(nbins=4))
        inset.xaxis.set_major_formatter(TokenFormatter(log=log))
        inset.yaxis.set_major_locator(MaxNLocator(nbins=5))
        inset.tick_params(labelsize=SMALL)
        inset.grid(alpha=0.25)
        what = f"from {fmt_count(start)} tokens" if log else "second half"
        # on white: a reference line of the panel may run behind it
        inset.set_title(f"{what}, zoomed", fontsize=SMALL, backgroundcolor="white")
        return (
            f"; inset: training from {fmt_count(start)} tokens with its own loss scale"
            if log
            else "; inset: the second half of training with its own loss scale"
        )
    after = stats["tokens"] >= (float(grid[len(grid) // 10]) if log else 0.1 * top_t)
    a, b = float(lo_col[after].min()), float(hi_col[after].max())
    if stats.loc[after, "tokens"].nunique() >= 3 and (hi - lo) > 3 * (b - a):
        pad = 0.06 * (b - a) if b > a else 0.05
        ax.set_ylim(*min_span_limits(a - pad, b + pad))
        return "; loss axis cut to the range after the first 10% of training"
    return ""


def plot_loss_pr(
    loss_stats: pd.DataFrame,
    pr_stats: pd.DataFrame,
    arms: list[str],
    colors: dict,
    path: Path,
    *,
    head_dim: int | None = None,
    quantity: str = "mean key PR",
    site_text: str = "keys after QK-Norm and RoPE",
    seeds: dict[str, int] | None = None,
) -> Plot | None:
    """The seed's comparison figure: val loss (left) and mean key PR (right) against tokens.

    `*_stats` are `tables.seed_stats` frames (arm, tokens, mean, sd, min, max, n, lo, hi).
    """
    if not len(loss_stats) and not len(pr_stats):
        return None
    fig = new_figure(12, 4.6)
    ax_l, ax_r = fig.subplots(1, 2)
    max_n = int(max([0] + [int(s["n"].max()) for s in (loss_stats, pr_stats) if len(s)]))
    tokens = np.concatenate([s["tokens"].to_numpy(float) for s in (loss_stats, pr_stats) if len(s)])

    zoom, log, cut = "", False, False
    if len(loss_stats):
        _band_panel(ax_l, loss_stats, arms, colors)
        log = tokens_axis(ax_l, tokens)
        cut = _fit_to_lines(ax_l, loss_stats)
        zoom = _zoom_loss(ax_l, loss_stats, arms, colors, log)
        ax_l.set_title("validation loss")
    else:
        _empty(ax_l, "no evaluation yet")
        ax_l.set_xlabel("training tokens")
    ax_l.set_ylabel("val loss (nats / token)")

    if len(pr_stats):
        _band_panel(ax_r, pr_stats, arms, colors)
        top = float(np.nanmax(pr_stats["mean"].to_numpy(float)))
        hi = pr_stats["hi"].to_numpy(float)
        if np.isfinite(hi).any():  # bands may reach a little above, never set the scale
            top = max(top, min(float(np.nanmax(hi)), top * 1.25))
        if head_dim:
            ax_r.axhline(head_dim, color=REFERENCE, ls="--", lw=1)
            ax_r.annotate(
                f"head dim {head_dim}",
                (0.01, head_dim),
                xycoords=("axes fraction", "data"),
                xytext=(0, -3),
                textcoords="offset points",
                va="top",
                fontsize=SMALL,
                color=REFERENCE,
            )
            top = head_dim if top <= head_dim * 1.1 else top  # a PR cannot exceed the head dim
        ax_r.set_ylim(0, top * 1.06)  # PR counts dimensions: a zero baseline keeps ratios honest
        log = tokens_axis(ax_r, tokens) or log
        ax_r.set_title(quantity)
    else:
        _empty(ax_r, "no probe data yet")
        ax_r.set_xlabel("training tokens")
    ax_r.set_ylabel(f"{quantity} (dimensions)")

    for ax in (ax_l, ax_r):
        style_axes(ax)
    handles = [Line2D([], [], color=colors[a], lw=2.5) for a in arms]
    fig.legend(
        handles, _legend_labels(arms, seeds or {}), loc="outside lower center", ncols=min(len(arms), 4), frameon=False
    )
    save(fig, path)

    caption = (
        f"Validation loss (left) and {quantity} (right: participation ratio of the {site_text}, "
        f"averaged over heads then layers) against training tokens; {band_clause(max_n)}"
    )
    caption += f"; dashed: the head dimension {head_dim}, the most a head can use" if head_dim and len(pr_stats) else ""
    if len(pr_stats) and np.isfinite(pr_stats["hi"].to_numpy(float)).any():
        cut = cut or bool(np.nanmax(pr_stats["hi"].to_numpy(float)) > ax_r.get_ylim()[1])
    caption += zoom + (CUT_WORDS if cut else "") + _dropout_clause(loss_stats, pr_stats)
    caption += log_axis_clause(log, bool((tokens <= 0).any()))
    return Plot(path, caption + ".")


# --- 2. downstream over training ----------------------------------------------------------------------


def _at_chance_note(states: Mapping[str, str], arms: Sequence[str]) -> str:
    """'at chance (every arm)', 'worse than chance: a, b', ... for a corner note: what each arm's
    curve does at its end against the chance level (`states`: arm -> quantities.chance_state)."""
    return "; ".join(_state_groups(states, arms))


def _state_groups(states: Mapping[str, str], arms: Sequence[str]) -> list[str]:
    """Arms grouped by chance state, in words: ['worse than chance (every arm)'] or
    ['at chance: a', 'worse than chance: b']."""
    out = []
    for state in (AT, WORSE):
        who = [a for a in arms if states.get(a) == state]
        if who:
            out.append(STATE_WORDS[state] + (" (every arm)" if len(who) == len(arms) else ": " + ", ".join(who)))
    return out


def chance_clause(panels: Sequence[tuple[Quantity, ChanceLevel | None, Mapping[str, str]]], arms: Sequence[str]) -> str:
    """Caption words for the chance lines drawn and the measures not past chance at the end
    (each panel's states: arm -> quantities.chance_state), with what worse than chance means."""
    drawn = [f"{q.label}: {c.kind} {c.label}" for q, c, _ in panels if c is not None]
    if not drawn:
        return ""
    out = "; dashed grey: chance levels (" + "; ".join(drawn) + ")"
    still = [(q, c, states) for q, c, states in panels if c is not None and states]
    if still:
        out += "; not past chance at the end (" + "; ".join(
            f"{q.label} {', '.join(_state_groups(states, arms))}" for q, _, states in still
        )
        out += (
            ") — at chance: the mean over seeds is within the seeds' sd (or a small tolerance) of the level; "
            "worse than chance: it moved as far the other way"
        )
        worse = [f"{q.label}: {c.worse}" for q, c, states in still if WORSE in states.values() and c.worse]
        if worse:
            out += " (" + "; ".join(worse) + ")"
    return out


def plot_downstream(
    panels: Sequence[tuple[Quantity, pd.DataFrame]],
    arms: list[str],
    colors: dict,
    path: Path,
    *,
    seeds: dict[str, int] | None = None,
    chance: dict[str, ChanceLevel] | None = None,
    at_chance: dict[str, Mapping[str, str]] | None = None,
) -> Plot | None:
    """One panel per downstream measure (OOD loss, ICL score, induction loss, induction scores) over
    training; `panels` holds (Quantity, seed_stats frame). `chance`: quantity key -> its chance level
    (`quantities.chance_level`), drawn as a labelled dashed line; `at_chance`: quantity key -> {arm:
    state} for the arms not past that level at their end (`quantities.chance_state`: at chance or
    worse than chance), noted in the panel."""
    panels = [(q, s) for q, s in panels if len(s)]
    if not panels:
        return None
    chance, at_chance = chance or {}, at_chance or {}
    k = len(panels)
    ncols = 2 if k in (2, 4) else min(k, 3)
    nrows = int(np.ceil(k / ncols))
    fig = new_figure(4.6 * ncols, 3.4 * nrows + 0.6)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    tokens = np.concatenate([s["tokens"].to_numpy(float) for _, s in panels])
    max_n = max(int(s["n"].max()) for _, s in panels)
    log, cut = False, False
    zoomed = []
    for ax, (q, s) in zip(axes, panels):
        level = chance.get(q.key)
        _band_panel(ax, s, arms, colors)
        log = tokens_axis(ax, tokens) or log
        cut = (
            _fit_to_lines(
                ax,
                s,
                include=[level.value] if level is not None else [],
                min_span=MIN_SPAN.get(q.key, 0.0),
                floor=0.0 if q.key in ZERO_FLOOR else None,
            )
            or cut
        )
        if q.key.endswith("_loss") and _zoom_loss(ax, s, arms, colors, log):
            zoomed.append(q.label)  # losses fall from ln(vocab): the late gap needs its own scale
        direction = {False: "lower = better", True: "higher = better", None: ""}[q.higher]
        if q.key == "icl_score":
            direction = "more negative = better"
        ax.set_title(f"{q.label} ({direction})" if direction else q.label, fontsize=10)
        ax.set_ylabel(f"{q.label}" + (f" ({q.unit})" if q.unit else ""))
        if level is not None:
            reference_line(ax, level.value, level.short, where="margin")
            note = _at_chance_note(at_chance.get(q.key, {}), [a for a in arms if (s["arm"] == a).any()])
            if note:
                corner_note(ax, note, loc="best", avoid=[INSET] if ax.child_axes else [])
        elif q.key == "icl_score":
            ax.axhline(0, color=REFERENCE, lw=0.8, ls=":")
        style_axes(ax)
    for ax in axes[k:]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=colors[a], lw=2.5) for a in arms]
    fig.legend(
        handles, _legend_labels(arms, seeds or {}), loc="outside lower center", ncols=min(len(arms), 4), frameon=False
    )
    save(fig, path)
    whats = "; ".join(f"{q.label}: {q.what}" for q, _ in panels)
    chance_words = chance_clause([(q, chance.get(q.key), at_chance.get(q.key, {})) for q, _ in panels], arms)
    caption = (
        f"Downstream measures over training ({whats}); {band_clause(max_n)}"
        + chance_words
        + (f"; insets zoom into late training ({', '.join(zoomed)}) with their own scale" if zoomed else "")
        + (CUT_WORDS if cut else "")
        + _dropout_clause(*[s for _, s in panels])
        + log_axis_clause(log, bool((tokens <= 0).any()))
        + "."
    )
    return Plot(path, caption)


# --- 3. layer x tokens heatmap -------------------------------------------------------------------


# --- 4. rank against downstream ----------------------------------------------------------------------


def _off_panel_words(sides: dict[str, set[str]]) -> str:
    """Where the points that zoomed panels leave out lie, from what was drawn: {panel label:
    {"above", "below"}} -> 'earlier points lie above their top edges', per panel where they differ."""

    def where(side: set[str], many: bool) -> str:
        edge = {"above": "above {} top edge{}", "below": "below {} bottom edge{}"}
        return " or ".join(
            edge[s].format("their" if many else "its", "s" if many else "") for s in ("above", "below") if s in side
        )

    kinds = {frozenset(v) for v in sides.values()}
    if len(kinds) == 1:
        return f"earlier points lie {where(set(next(iter(kinds))), len(sides) > 1)}"
    return "; ".join(f"in {label}, earlier points lie {where(side, False)}" for label, side in sides.items())


def plot_rank_scatter(
    frame: pd.DataFrame,
    targets: Sequence[Quantity],
    arms: list[str],
    colors: dict,
    path: Path,
    *,
    stats: dict[str, tuple[float, float, int]] | None = None,
    x_label: str = "mean key PR",
    chance: dict[str, ChanceLevel] | None = None,
) -> Plot | None:
    """Mean key PR (x) against each downstream measure (one panel each): every eval point after
    token 0 as a small faint dot, each run's last point as a large marker. The eye should see what
    the correlation table summarises, including how much of it is training progress. `chance`:
    quantity key -> chance level, drawn where it falls inside the panel."""
    targets = [q for q in targets if q.key in frame and frame[q.key].notna().any()]
    data = frame[(frame["tokens"] > 0) & np.isfinite(frame["x"])]
    if not targets or not len(data):
        return None
    chance = chance or {}
    k = len(targets)
    ncols = min(k, 3)
    nrows = int(np.ceil(k / ncols))
    fig = new_figure(4.4 * ncols, 3.4 * nrows + 0.6)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    grid = np.sort(data["tokens"].unique())
    late_from = float(grid[-max(3, len(grid) // 3)]) if len(grid) >= 6 else float(grid[0])
    off_panel: dict[str, set[str]] = {}  # zoomed panel -> where its left-out points lie
    drawn_chance = []
    for ax, q in zip(axes, targets):
        ends_all = []
        for a in arms:
            sub = data[(data["arm"] == a) & np.isfinite(data[q.key])]
            if not len(sub):
                continue
            ax.scatter(sub["x"], sub[q.key], s=6, color=colors[a], alpha=0.3, linewidths=0)
            ends = sub.sort_values("tokens").groupby("seed").tail(1)
            ends_all.append(ends[q.key].to_numpy(float))
            ax.scatter(ends["x"], ends[q.key], s=40, color=colors[a], edgecolors="black", linewidths=0.7, zorder=3)
        # losses fall from ln(vocab): at full scale every run end sits on one line at the bottom, so
        # loss panels show late training and let the early points fall off (said in the caption)
        y = data[q.key].to_numpy(float)
        late = data.loc[data["tokens"] >= late_from, q.key].to_numpy(float)
        late = np.concatenate([late] + ends_all)
        late, y = late[np.isfinite(late)], y[np.isfinite(y)]
        if q.key.endswith("_loss") and len(late) and np.ptp(y) > 3 * max(np.ptp(late), 1e-12):
            pad = 0.1 * np.ptp(late) if np.ptp(late) > 0 else 0.01
            lo, hi = min_span_limits(late.min() - pad, late.max() + pad)  # zoomed, but noise is not a trend
            ax.set_ylim(lo, hi)
            side = {"above"} if (y > hi).any() else set()
            side |= {"below"} if (y < lo).any() else set()
            if side:
                off_panel[q.label] = side
        else:  # a measure that barely moved: its noise must not fill the panel (see `_fit_to_lines`)
            lo, hi = ax.get_ylim()
            ax.set_ylim(
                *min_span_limits(lo, hi, min_span=MIN_SPAN.get(q.key, 0.0), floor=0.0 if q.key in ZERO_FLOOR else None)
            )
        level = chance.get(q.key)
        if level is not None:
            lo, hi = sorted(ax.get_ylim())
            if lo <= level.value <= hi:  # the scale follows the runs: a chance line never stretches it
                reference_line(ax, level.value, level.short, where="margin")
                drawn_chance.append(f"{q.label}: {level.kind} {level.label}")
        title = q.label
        if stats and q.key in stats:
            r, p, n = stats[q.key]
            if np.isfinite(r):
                title += f"\nrun ends: r = {signed(r, 2)}, {fmt_p(p)}, n = {n}"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(x_label)
        ax.set_ylabel(q.label + (f" ({q.unit})" if q.unit else ""))
        style_axes(ax)
    for ax in axes[k:]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=colors[a], marker="o", ls="", mec="black", ms=6) for a in arms]
    fig.legend(handles, arms, loc="outside lower center", ncols=min(len(arms), 5), frameon=False)
    save(fig, path)
    caption = (
        f"{x_label[0].upper() + x_label[1:]} (x) against each downstream measure: small faint dots are every "
        "eval point after token 0 (points of one run are not independent, and both axes drift with training "
        "time); large dots are "
        "each run's last eval point (one per run), the points behind the 'run ends' correlations"
        + (
            f"; the loss panels ({', '.join(off_panel)}) show late training, from {fmt_count(late_from)} tokens — "
            + _off_panel_words(off_panel)
            if off_panel
            else ""
        )
        + (f"; dashed grey: chance levels ({'; '.join(drawn_chance)})" if drawn_chance else "")
        + "."
    )
    return Plot(path, caption)


__all__ = [
    "LOG_DECADES",
    "MIN_SPAN",
    "chance_clause",
    "band_clause",
    "use_log_tokens",
    "tokens_axis",
    "plot_loss_pr",
    "plot_downstream",
    "plot_rank_scatter",
]
