"""Figures over training: validation loss and mean key PR against tokens (the seed's comparison
figure), and the downstream measures against tokens. The panels' shared parts are in
`band_panels.py`, the token axis in `token_axis.py`, the house style in `plotstyle.py`; mean key PR
against each downstream measure is `rank_scatter.py`.

Measures with a chance level (`quantities.chance_level`: induction loss at ln(vocab), induction
scores at uniform attention's, the ICL score at 0) get it as a labelled dashed line, and a panel
whose measure is still at chance at some arm's end says so in a corner note.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from .band_panels import (
    CUT_WORDS,
    INSET,
    MIN_SPAN,
    ZERO_FLOOR,
    band_clause,
    band_panel,
    dropout_clause,
    empty_panel,
    fit_to_lines,
    legend_labels,
    zoom_loss,
)
from .plotstyle import REFERENCE, SMALL, Plot, corner_note, new_figure, reference_line, save, style_axes
from .quantities import AT, STATE_WORDS, WORSE, ChanceLevel, Quantity
from .token_axis import log_axis_clause, tokens_axis

# --- 1. loss and mean key PR over training ------------------------------------------------------


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
        band_panel(ax_l, loss_stats, arms, colors)
        log = tokens_axis(ax_l, tokens)
        cut = fit_to_lines(ax_l, loss_stats)
        zoom = zoom_loss(ax_l, loss_stats, arms, colors, log)
        ax_l.set_title("validation loss")
    else:
        empty_panel(ax_l, "no evaluation yet")
        ax_l.set_xlabel("training tokens")
    ax_l.set_ylabel("val loss (nats / token)")

    if len(pr_stats):
        band_panel(ax_r, pr_stats, arms, colors)
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
        empty_panel(ax_r, "no probe data yet")
        ax_r.set_xlabel("training tokens")
    ax_r.set_ylabel(f"{quantity} (dimensions)")

    for ax in (ax_l, ax_r):
        style_axes(ax)
    handles = [Line2D([], [], color=colors[a], lw=2.5) for a in arms]
    fig.legend(
        handles, legend_labels(arms, seeds or {}), loc="outside lower center", ncols=min(len(arms), 4), frameon=False
    )
    save(fig, path)

    caption = (
        f"Validation loss (left) and {quantity} (right: participation ratio of the {site_text}, "
        f"averaged over heads then layers) against training tokens; {band_clause(max_n)}"
    )
    caption += f"; dashed: the head dimension {head_dim}, the most a head can use" if head_dim and len(pr_stats) else ""
    if len(pr_stats) and np.isfinite(pr_stats["hi"].to_numpy(float)).any():
        cut = cut or bool(np.nanmax(pr_stats["hi"].to_numpy(float)) > ax_r.get_ylim()[1])
    caption += zoom + (CUT_WORDS if cut else "") + dropout_clause(loss_stats, pr_stats)
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
        band_panel(ax, s, arms, colors)
        log = tokens_axis(ax, tokens) or log
        cut = (
            fit_to_lines(
                ax,
                s,
                include=[level.value] if level is not None else [],
                min_span=MIN_SPAN.get(q.key, 0.0),
                floor=0.0 if q.key in ZERO_FLOOR else None,
            )
            or cut
        )
        if q.key.endswith("_loss") and zoom_loss(ax, s, arms, colors, log):
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
        handles, legend_labels(arms, seeds or {}), loc="outside lower center", ncols=min(len(arms), 4), frameon=False
    )
    save(fig, path)
    whats = "; ".join(f"{q.label}: {q.what}" for q, _ in panels)
    chance_words = chance_clause([(q, chance.get(q.key), at_chance.get(q.key, {})) for q, _ in panels], arms)
    caption = (
        f"Downstream measures over training ({whats}); {band_clause(max_n)}"
        + chance_words
        + (f"; insets zoom into late training ({', '.join(zoomed)}) with their own scale" if zoomed else "")
        + (CUT_WORDS if cut else "")
        + dropout_clause(*[s for _, s in panels])
        + log_axis_clause(log, bool((tokens <= 0).any()))
        + "."
    )
    return Plot(path, caption)


__all__ = ["chance_clause", "plot_downstream", "plot_loss_pr"]
