"""The report's figures, drawn from the series and tables in `tables.py`.

Figures are built on `matplotlib.figure.Figure` directly, never through pyplot: no global backend
is switched (a notebook importing rankscope keeps its inline backend), no figure is left open in
pyplot's registry, and saving renders with Agg whatever the session's backend is. Each function
returns a `Plot` (path and a caption that says what the figure shows, bands included) or None when
its data is absent, so the report never embeds an empty axis.

Uncertainty is drawn the same way everywhere: a line or bar is the mean over seeds and its band or
whisker the 95% Student t interval of that mean over seeds (not min-max, not ± sd: an interval for
the quantity the reader compares), and captions say so — or say that one seed allows none.
Token axes switch to a log scale when the eval points span more than two decades (log-spaced
schedules, 100M+ token runs); token 0, which a log axis cannot show, keeps a short linear stretch
at the left (matplotlib's symlog with its linear threshold at the first positive eval point).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

from .layers import DiagPanel
from .stats import fmt_p, signed
from .tables import Quantity, fmt_tokens

DPI = 150
TOKENS_AXIS = FuncFormatter(lambda x, _pos: fmt_tokens(x))
REFERENCE = "0.45"  # grey for reference lines (head dim, arm mean)
FLAG = "#d62728"    # collapsed layers
LOG_DECADES = 2.0   # eval points spanning more than this many decades get a log token axis
BAND_WORDS = "shaded bands: 95% t-intervals over seeds"


@dataclass(frozen=True)
class Plot:
    path: Path
    caption: str
    arm: str | None = None


def arm_colors(arms: Iterable[str], grid: dict[str, tuple[int, int]] | None = None,
               shape: tuple[int, int] = (0, 0)) -> dict[str, tuple[float, ...]]:
    """One colour per arm, fixed by the arm's position in the study so every figure agrees. For
    arms that cross two settings (`grid`: arm -> (level of the first, level of the second), with
    `shape` levels of each), a hue per level of the first and a shade per level of the second, so
    the eye groups them as the study does."""
    arms = list(arms)
    families = ("Blues", "Oranges", "Greens", "Purples", "Reds", "Greys")
    if grid and set(arms) <= set(grid) and shape[0] <= len(families):
        nb = max(shape[1], 1)
        return {a: matplotlib.colormaps[families[grid[a][0]]](0.95 - 0.4 * grid[a][1] / max(nb - 1, 1))
                for a in arms}
    palette = matplotlib.colormaps["tab10" if len(arms) <= 10 else "tab20"].colors
    return {a: palette[i % len(palette)] for i, a in enumerate(arms)}


def safe_names(arms: Iterable[str]) -> dict[str, str]:
    """File-name stems for arm names that may hold '/', spaces, '=' and the like; kept unique."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for a in arms:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(a)).strip("._") or "arm"
        candidate, k = stem, 2
        while candidate.lower() in used:  # case-insensitive file systems would merge 'A' and 'a'
            candidate, k = f"{stem}_{k}", k + 1
        used.add(candidate.lower())
        out[a] = candidate
    return out


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _seed_word(n: int) -> str:
    return f"{n} seed" + ("" if n == 1 else "s")


def band_clause(max_n: int) -> str:
    """What the shading means, for a caption: bands over seeds, or why there are none."""
    if max_n >= 2:
        # Bands are per arm; the arm comparisons are paired. Say so, or overlapping bands get read as "no difference".
        return (f"lines are the mean over seeds, {BAND_WORDS} (Student t on the seed values at each eval point); "
                "two arms' bands can overlap although their seed-by-seed difference is clear, because a seed "
                "shifts every arm alike — the paired comparisons in the tables are the test")
    return "one seed per arm, so no band: no interval over seeds is possible"


# --- token axes ---------------------------------------------------------------------------------------

def use_log_tokens(tokens: Iterable[float]) -> bool:
    """True when the positive eval points span more than `LOG_DECADES` decades."""
    t = np.asarray(list(tokens), dtype=float)
    t = t[np.isfinite(t) & (t > 0)]
    return len(t) >= 2 and np.log10(t.max() / t.min()) > LOG_DECADES


def _tokens_axis(ax, tokens: Iterable[float] | None = None, label: str = "training tokens") -> bool:
    """Format a token x-axis; log-scaled (see the module docstring) when `tokens` call for it.
    Returns whether the axis is logarithmic, for the caption."""
    t = np.asarray(list(tokens) if tokens is not None else [], dtype=float)
    t = t[np.isfinite(t)]
    if use_log_tokens(t):
        first, last = float(t[t > 0].min()), float(t.max())
        if (t <= 0).any():
            # linscale 0.35: token 0 sits a third of a decade left of the first positive point
            ax.set_xscale("symlog", linthresh=first, linscale=0.35)
            left = -0.04 * first  # a hair left of 0 so the token-0 marker is not cut; never negative ticks
        else:
            ax.set_xscale("log")
            left = first / 1.15
        # autoscaling a symlog axis pads into negative tokens; fix the range to the data
        ax.set_xlim(left, last * 1.15)
        ax.xaxis.set_major_formatter(TOKENS_AXIS)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"{label} (log scale)")
        return True
    ax.xaxis.set_major_formatter(TOKENS_AXIS)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    ax.set_xlabel(label)
    return False


def _log_clause(log: bool, zero: bool) -> str:
    if not log:
        return ""
    return ("; token axis logarithmic (eval points span more than two decades)"
            + ("; token 0 sits on a short linear stretch at the left" if zero else ""))


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
        ax.plot(x, s["mean"].to_numpy(float), color=colors[a], lw=1.8, label=a,
                marker="o" if markers or len(s) == 1 else None, ms=3 if len(s) > 1 else 5)
        if (s["n"] > 1).any() and "lo" in s:
            lo, hi = s["lo"].to_numpy(float), s["hi"].to_numpy(float)
            ok = np.isfinite(lo) & np.isfinite(hi)
            ax.fill_between(x, np.where(ok, lo, np.nan), np.where(ok, hi, np.nan), color=colors[a],
                            alpha=0.2, lw=0)


def _dropout_clause(*stats: pd.DataFrame) -> str:
    """Say so when an arm's seed count changes along its curve (a run diverged, stopped or is still
    going): its mean then averages other seeds from that point on, and can jump for that reason alone."""
    for s in stats:
        if len(s) and (s.groupby("arm")["n"].nunique() > 1).any():
            return ("; where an arm's seed count drops along the curve (a run diverged or stopped), its mean and "
                    "band cover fewer seeds from there on and can jump for that reason alone")
    return ""


def _fit_to_lines(ax, stats: pd.DataFrame, excess: float = 0.35) -> bool:
    """Scale the y-axis to the mean lines, letting bands reach at most `excess` of the lines' range
    beyond them; return True if some band was cut. With two seeds a 95% t band is ±12.7 standard
    errors wide, and left to autoscaling one such band flattens every line in the panel."""
    m = stats["mean"].to_numpy(float)
    m = m[np.isfinite(m)]
    if not len(m):
        return False
    lo_m, hi_m = float(m.min()), float(m.max())
    span = hi_m - lo_m if hi_m > lo_m else max(abs(hi_m) * 0.1, 1e-3)
    lo_b = np.nanmin(np.append(stats["lo"].to_numpy(float), lo_m)) if "lo" in stats else lo_m
    hi_b = np.nanmax(np.append(stats["hi"].to_numpy(float), hi_m)) if "hi" in stats else hi_m
    lo, hi = max(lo_b, lo_m - excess * span), min(hi_b, hi_m + excess * span)
    pad = 0.05 * (hi - lo)
    ax.set_ylim(lo - pad, hi + pad)
    return bool(lo_b < lo or hi_b > hi)


CUT_WORDS = "; bands running past an axis are cut at its edge (the scale follows the means)"


def _style(ax) -> None:
    ax.grid(alpha=0.25)
    ax.spines[["top", "right"]].set_visible(False)


def _legend_labels(arms: Sequence[str], seeds: dict[str, int]) -> list[str]:
    return [f"{a} ({_seed_word(seeds[a])})" if seeds.get(a) else f"{a} (no data yet)" for a in arms]


# --- 1. loss and mean key PR over training ------------------------------------------------------

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
        inset = ax.inset_axes([0.42, 0.4, 0.55, 0.52])
        _band_panel(inset, late, arms, colors, markers=log)
        a = float(lo_col[late.index].min())
        b = float(hi_col[late.index].max())
        pad = 0.08 * (b - a) if b > a else 0.01
        inset.set_ylim(a - pad, b + pad)
        if log:
            inset.set_xscale("log")
            inset.set_xlim(start / 1.1, top_t * 1.1)
            inset.xaxis.set_minor_formatter(NullFormatter())
        else:
            inset.xaxis.set_major_locator(MaxNLocator(nbins=4, steps=[1, 2, 2.5, 5, 10]))
        inset.xaxis.set_major_formatter(TOKENS_AXIS)
        inset.tick_params(labelsize=7)
        inset.grid(alpha=0.25)
        what = f"from {fmt_tokens(start)} tokens" if log else "second half"
        inset.set_title(f"{what}, zoomed", fontsize=8)
        return (f"; inset: training from {fmt_tokens(start)} tokens with its own loss scale" if log
                else "; inset: the second half of training with its own loss scale")
    after = stats["tokens"] >= (float(grid[len(grid) // 10]) if log else 0.1 * top_t)
    a, b = float(lo_col[after].min()), float(hi_col[after].max())
    if stats.loc[after, "tokens"].nunique() >= 3 and (hi - lo) > 3 * (b - a):
        pad = 0.06 * (b - a) if b > a else 0.05
        ax.set_ylim(a - pad, b + pad)
        return "; loss axis cut to the range after the first 10% of training"
    return ""


def plot_loss_pr(loss_stats: pd.DataFrame, pr_stats: pd.DataFrame, arms: list[str], colors: dict,
                 path: Path, *, head_dim: int | None = None, quantity: str = "mean key PR",
                 site_text: str = "keys after QK-Norm and RoPE", seeds: dict[str, int] | None = None
                 ) -> Plot | None:
    """The seed's comparison figure: val loss (left) and mean key PR (right) against tokens.

    `*_stats` are `tables.seed_stats` frames (arm, tokens, mean, sd, min, max, n, lo, hi).
    """
    if not len(loss_stats) and not len(pr_stats):
        return None
    fig = Figure(figsize=(12, 4.6), layout="constrained")
    ax_l, ax_r = fig.subplots(1, 2)
    max_n = int(max([0] + [int(s["n"].max()) for s in (loss_stats, pr_stats) if len(s)]))
    tokens = np.concatenate([s["tokens"].to_numpy(float) for s in (loss_stats, pr_stats) if len(s)])

    zoom, log, cut = "", False, False
    if len(loss_stats):
        _band_panel(ax_l, loss_stats, arms, colors)
        log = _tokens_axis(ax_l, tokens)
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
            ax_r.annotate(f"head dim {head_dim}", (0.01, head_dim), xycoords=("axes fraction", "data"),
                          xytext=(0, -3), textcoords="offset points", va="top", fontsize=8, color=REFERENCE)
            top = head_dim if top <= head_dim * 1.1 else top  # a PR cannot exceed the head dim
        ax_r.set_ylim(0, top * 1.06)  # PR counts dimensions: a zero baseline keeps ratios honest
        log = _tokens_axis(ax_r, tokens) or log
        ax_r.set_title(quantity)
    else:
        _empty(ax_r, "no probe data yet")
        ax_r.set_xlabel("training tokens")
    ax_r.set_ylabel(f"{quantity} (dimensions)")

    for ax in (ax_l, ax_r):
        _style(ax)
    handles = [Line2D([], [], color=colors[a], lw=2.5) for a in arms]
    fig.legend(handles, _legend_labels(arms, seeds or {}), loc="outside lower center",
               ncols=min(len(arms), 4), frameon=False)
    _save(fig, path)

    caption = (f"Validation loss (left) and {quantity} (right: participation ratio of the {site_text}, "
               f"averaged over heads then layers) against training tokens; {band_clause(max_n)}")
    caption += f"; dashed: the head dimension {head_dim}, the most a head can use" if head_dim and len(pr_stats) else ""
    if len(pr_stats) and np.isfinite(pr_stats["hi"].to_numpy(float)).any():
        cut = cut or bool(np.nanmax(pr_stats["hi"].to_numpy(float)) > ax_r.get_ylim()[1])
    caption += zoom + (CUT_WORDS if cut else "") + _dropout_clause(loss_stats, pr_stats)
    caption += _log_clause(log, bool((tokens <= 0).any()))
    return Plot(path, caption + ".")


# --- 2. per-layer bars at the end of training ---------------------------------------------------

def _ci_err(means: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    lo = np.where(np.isfinite(lo), lo, means)
    hi = np.where(np.isfinite(hi), hi, means)
    return np.vstack([means - lo, hi - means])


def plot_layer_pr(layer_stats: pd.DataFrame, arm: str, color, path: Path, *, ymax: float,
                  head_dim: int | None = None, quantity: str = "mean key PR") -> Plot | None:
    """Bars of `quantity` per layer at the arm's END; whiskers: 95% t interval over seeds; grey line = arm mean.

    `layer_stats`: one arm's rows of (layer, mean, lo, hi, n, tokens) at one eval point.
    """
    if not len(layer_stats) or layer_stats["mean"].isna().all():  # nothing yet, or a diverged arm
        return None
    s = layer_stats.sort_values("layer")
    layers = s["layer"].to_numpy()
    means = s["mean"].to_numpy(dtype=float)
    n = int(s["n"].max())
    tokens = float(s["tokens"].iloc[0])

    fig = Figure(figsize=(max(6.5, 0.36 * len(layers) + 2.5), 4.4), layout="constrained")
    ax = fig.subplots()
    ax.bar(layers, means, color=color, width=0.75, zorder=2)
    tops = means
    if n > 1:
        err = _ci_err(means, s["lo"].to_numpy(float), s["hi"].to_numpy(float))
        ax.errorbar(layers, means, yerr=err, fmt="none", ecolor="0.2", elinewidth=1, capsize=2, zorder=3)
        tops = means + err[1]
    if len(layers) <= 40:  # print each bar's value: the seed's post reads layers off by number
        for x, y, top in zip(layers, means, tops):
            if np.isfinite(y):
                ax.annotate(f"{y:.0f}" if ymax >= 20 else f"{y:.1f}", (x, top), xytext=(0, 2),
                            textcoords="offset points", ha="center", va="bottom",
                            fontsize=7 if len(layers) > 16 else 8)
    arm_mean = float(np.nanmean(means))
    ax.axhline(arm_mean, color=REFERENCE, lw=1.2, zorder=1)
    # reference labels go in the right margin, where no bar or value label can sit under them
    close = bool(head_dim) and abs(head_dim - arm_mean) < 0.12 * ymax  # two-line labels would collide
    ax.annotate(f"mean\n{arm_mean:.1f}", (1.0, arm_mean), xycoords=("axes fraction", "data"),
                xytext=(4, 0), textcoords="offset points", ha="left", va="top" if close else "center",
                fontsize=8, color="0.25")
    if head_dim:
        ax.axhline(head_dim, color=REFERENCE, ls="--", lw=1, zorder=1)
        ax.annotate(f"head\ndim {head_dim}", (1.0, head_dim), xycoords=("axes fraction", "data"),
                    xytext=(4, 0), textcoords="offset points", ha="left", va="bottom" if close else "center",
                    fontsize=8, color=REFERENCE)
    ax.set_ylim(0, ymax)
    ax.set_xlim(layers.min() - 0.7, layers.max() + 0.7)
    if len(layers) <= 32:
        ax.set_xticks(layers)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=16))
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{quantity} (dimensions)")
    ax.set_title(f"{arm}: {quantity} per layer at {fmt_tokens(tokens)} tokens"
                 + (f" (mean of {_seed_word(n)})" if n > 1 else " (one seed)"), fontsize=11)
    ax.grid(axis="y", alpha=0.25, zorder=0)
    ax.spines[["top", "right"]].set_visible(False)
    _save(fig, path)
    caption = (f"{arm}: {quantity} of each layer (mean over its heads) at {fmt_tokens(tokens)} tokens"
               + (f", mean of {_seed_word(n)} with whiskers spanning the 95% t-interval over seeds" if n > 1
                  else ", one seed (no interval possible)")
               + f"; grey line: the arm's mean over layers ({arm_mean:.1f}); same y-axis for every arm.")
    return Plot(path, caption, arm)


# --- 3. layer x tokens heatmap -------------------------------------------------------------------

def _edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges halfway between eval points, so uneven eval spacing is drawn to scale."""
    if len(centres) == 1:
        half = max(abs(centres[0]) * 0.05, 0.5)
        return np.array([centres[0] - half, centres[0] + half])
    mids = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[centres[0] - (mids[0] - centres[0])], mids, [centres[-1] + (centres[-1] - mids[-1])]])


def _edges_on(ax, centres: np.ndarray) -> np.ndarray:
    """`_edges` computed in the axis' own (possibly log) coordinates, so on a log axis each eval
    point's cell is centred on it as drawn, not stretched to the right."""
    tr = ax.xaxis.get_transform()
    return tr.inverted().transform(_edges(tr.transform(centres.astype(float))))


def plot_pr_heatmap(grid: pd.DataFrame, arm: str, path: Path, *, vmin: float, vmax: float,
                    quantity: str = "mean key PR", n_seeds: int = 1) -> Plot | None:
    """Layers (rows, layer 0 on top) x eval points (columns) coloured by `quantity`.

    `grid`: one arm's (layer, tokens, value) with value already averaged over heads and seeds.
    The colour scale is passed in so that all arms share it.
    """
    if not len(grid):
        return None
    m = grid.pivot_table(index="layer", columns="tokens", values="value", aggfunc="mean")
    layers = m.index.to_numpy()
    tokens = m.columns.to_numpy(dtype=float)
    fig = Figure(figsize=(9, max(3.2, 0.2 * len(layers) + 1.6)), layout="constrained")
    ax = fig.subplots()
    log = _tokens_axis(ax, tokens)
    xe = _edges_on(ax, tokens)
    if log and (tokens <= 0).any():
        xe[0] = max(xe[0], 0.0)  # nothing happens before token 0
    mesh = ax.pcolormesh(xe, _edges(layers.astype(float)), np.ma.masked_invalid(m.to_numpy(float)),
                         cmap="viridis", vmin=vmin, vmax=vmax, shading="flat")
    ax.invert_yaxis()  # layer 0 (the input side) on top, as the network is usually drawn
    ax.set_xlim(xe[0], xe[-1])
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(len(layers), 24)))
    ax.set_ylabel("layer")
    ax.set_title(f"{arm}: {quantity} per layer over training"
                 + (f" (mean of {_seed_word(n_seeds)})" if n_seeds > 1 else ""), fontsize=11)
    cb = fig.colorbar(mesh, ax=ax, pad=0.01)
    cb.set_label(f"{quantity} (dimensions)")
    _save(fig, path)
    caption = (f"{arm}: {quantity} of each layer (rows, layer 0 on top; mean over heads"
               + (f" and {_seed_word(n_seeds)}" if n_seeds > 1 else ", one seed")
               + f") at each eval point; colour scale {vmin:.0f}–{vmax:.0f} shared by all arms"
               + _log_clause(log, bool((tokens <= 0).any())) + ".")
    return Plot(path, caption, arm)


# --- 4. why do some layers collapse? per-layer diagnosis --------------------------------------------

def plot_diagnosis(arm: str, panels: list[DiagPanel], color, path: Path, *, tokens: float, n_seeds: int,
                   n_layers: int, flagged: Sequence[int] = (), flag_rule: str = "") -> Plot | None:
    """One column of panels, one quantity each, across the layers of `arm` at its END, with the
    collapsed layers (`flagged`) shaded in every panel so what they did differently lines up.

    Bars are layer means (over heads, then seeds) with 95% t whiskers over seeds; small dots are the
    individual heads (each averaged over seeds), because a layer mean can hide one dead head.
    """
    if not panels:
        return None
    rows = len(panels)
    width = max(7.5, 0.42 * n_layers + 3.0)
    fig = Figure(figsize=(width, 1.85 * rows + 1.1), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, 1, sharex=True))
    xs = np.arange(n_layers)
    for ax, p in zip(axes, panels):
        for layer in flagged:
            ax.axvspan(layer - 0.5, layer + 0.5, color=FLAG, alpha=0.09, lw=0, zorder=0)
        data = p.layers
        if not len(data) or data["mean"].isna().all():
            ax.text(0.5, 0.5, p.missing, ha="center", va="center", transform=ax.transAxes, color="0.45", fontsize=9)
        else:
            series = list(dict.fromkeys(data["series"]))
            w = 0.72 / len(series)
            for j, name in enumerate(series):
                s = data[data["series"] == name].sort_values("layer")
                off = (j - (len(series) - 1) / 2) * w
                style = {"color": color, "alpha": 0.85 if j == 0 else 0.45, **p.series_styles.get(name, {})}
                x = s["layer"].to_numpy(float) + off
                m = s["mean"].to_numpy(float)
                ax.bar(x, m, width=w * 0.92, zorder=2, label=name or None, **style)
                if (s["n"] > 1).any():
                    ax.errorbar(x, m, yerr=_ci_err(m, s["lo"].to_numpy(float), s["hi"].to_numpy(float)),
                                fmt="none", ecolor="0.15", elinewidth=0.9, capsize=1.5, zorder=3)
            if p.heads is not None and len(p.heads):
                h = p.heads
                n_heads = max(int(h["head"].max()) + 1, 1)
                jitter = (h["head"].to_numpy(float) / max(n_heads - 1, 1) - 0.5) * 0.5 if n_heads > 1 else 0.0
                ax.scatter(h["layer"].to_numpy(float) + jitter, h["value"].to_numpy(float), s=7, color="0.1",
                           zorder=4, linewidths=0, alpha=0.75)
            if len(series) > 1:  # above the panel, beside its left-aligned title: no bar or whisker under it
                ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False,
                          ncols=len(series), borderaxespad=0.1)
        if p.hline:
            ax.axhline(p.hline[0], color=REFERENCE, ls="--", lw=0.9, zorder=1)
            ax.annotate(p.hline[1], (1.0, p.hline[0]), xycoords=("axes fraction", "data"), xytext=(3, 0),
                        textcoords="offset points", fontsize=7, color=REFERENCE, va="center")
        ax.set_ylim(*p.ylim)
        ax.set_title(p.title, fontsize=9.5, loc="left")
        ax.set_ylabel(p.ylabel, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(axis="y", alpha=0.25, zorder=0)
        ax.spines[["top", "right"]].set_visible(False)
    last = axes[-1]
    last.set_xlim(-0.6, n_layers - 0.4)
    step = 1 if n_layers <= 32 else int(np.ceil(n_layers / 16))
    ticks = sorted(set(xs[::step].tolist()) | set(flagged))  # a flagged layer always gets its label
    last.set_xticks(ticks, [str(t) for t in ticks])
    for t, lab in zip(ticks, last.get_xticklabels()):
        if t in set(flagged):
            lab.set_color(FLAG)
            lab.set_fontweight("bold")
    last.set_xlabel("layer")
    seeds = f"mean of {_seed_word(n_seeds)}" if n_seeds > 1 else "one seed"
    fig.suptitle(f"{arm}: per-layer diagnosis at {fmt_tokens(tokens)} tokens ({seeds})", fontsize=11)
    _save(fig, path)
    flagged_text = (f"shaded in red: layers {', '.join(map(str, flagged))} ({flag_rule})" if flagged
                    else f"no layer is flagged as collapsed ({flag_rule})" if flag_rule else "")
    caption = (f"{arm}: per-layer diagnosis at {fmt_tokens(tokens)} tokens, one quantity per row "
               f"({', '.join(p.title.split(' (')[0] for p in panels)}). Bars: mean over heads, then "
               + (f"over {_seed_word(n_seeds)}, whiskers the 95% t-interval over seeds (cut at the panel edge "
                  "where they run past it: the scale follows the bars)" if n_seeds > 1
                  else "one seed (no interval possible)")
               + "; dots: individual heads (mean over seeds); every row's y-axis is shared by all arms"
               + (f"; {flagged_text}" if flagged_text else "") + ".")
    return Plot(path, caption, arm)


# --- 5. downstream over training ----------------------------------------------------------------------

def plot_downstream(panels: Sequence[tuple[Quantity, pd.DataFrame]], arms: list[str], colors: dict, path: Path,
                    *, seeds: dict[str, int] | None = None) -> Plot | None:
    """One panel per downstream measure (OOD loss, ICL score, induction loss, induction scores) over
    training; `panels` holds (Quantity, seed_stats frame)."""
    panels = [(q, s) for q, s in panels if len(s)]
    if not panels:
        return None
    k = len(panels)
    ncols = 2 if k in (2, 4) else min(k, 3)
    nrows = int(np.ceil(k / ncols))
    fig = Figure(figsize=(5.4 * ncols, 3.6 * nrows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    tokens = np.concatenate([s["tokens"].to_numpy(float) for _, s in panels])
    max_n = max(int(s["n"].max()) for _, s in panels)
    log, cut = False, False
    zoomed = []
    for ax, (q, s) in zip(axes, panels):
        _band_panel(ax, s, arms, colors)
        log = _tokens_axis(ax, tokens) or log
        cut = _fit_to_lines(ax, s) or cut
        if q.key.endswith("_loss") and _zoom_loss(ax, s, arms, colors, log):
            zoomed.append(q.label)  # losses fall from ln(vocab): the late gap needs its own scale
        direction = {False: "lower = better", True: "higher = better", None: ""}[q.higher]
        if q.key == "icl_score":
            direction = "more negative = better"
        ax.set_title(f"{q.label} ({direction})" if direction else q.label, fontsize=10)
        ax.set_ylabel(f"{q.label}" + (f" ({q.unit})" if q.unit else ""))
        if q.key == "icl_score":
            ax.axhline(0, color=REFERENCE, lw=0.8, ls=":")
        _style(ax)
    for ax in axes[k:]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=colors[a], lw=2.5) for a in arms]
    fig.legend(handles, _legend_labels(arms, seeds or {}), loc="outside lower center",
               ncols=min(len(arms), 4), frameon=False)
    _save(fig, path)
    whats = "; ".join(f"{q.label}: {q.what}" for q, _ in panels)
    caption = (f"Downstream measures over training ({whats}); {band_clause(max_n)}"
               + (f"; insets zoom into late training ({', '.join(zoomed)}) with their own scale" if zoomed else "")
               + (CUT_WORDS if cut else "") + _dropout_clause(*[s for _, s in panels]) + _log_clause(log, bool((tokens <= 0).any())) + ".")
    return Plot(path, caption)


# --- 6. functional rank next to key PR ---------------------------------------------------------------

def plot_functional_rank(data: dict[str, pd.DataFrame], arms: list[str], colors: dict, path: Path, *,
                         head_dim: int | None = None, tokens: dict[str, float] | None = None,
                         n_seeds: dict[str, int] | None = None) -> Plot | None:
    """Per arm (one panel each, shared y), per layer: key PR and functional rank side by side.

    `data[arm]`: rows (layer, series in {"key PR", "functional rank"}, mean, lo, hi, n).
    """
    arms = [a for a in arms if a in data and len(data[a])]
    if not arms:
        return None
    n_layers = int(max(d["layer"].max() for d in data.values() if len(d))) + 1
    panel_w = max(4.8, 0.34 * n_layers + 2.2)
    # side by side while the figure stays readable (about 16 inches); deep models get one arm per row
    ncols = max(1, min(len(arms), 3, int(16 // panel_w)))
    nrows = int(np.ceil(len(arms) / ncols))
    fig = Figure(figsize=(panel_w * ncols, 3.3 * nrows + 0.7), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharey=True, squeeze=False)).ravel()
    top = max(float(np.nanmax(d["mean"].to_numpy(float))) for a, d in data.items() if a in arms and len(d))
    whisk = max(float(np.nanmax(np.append(d["hi"].to_numpy(float), -np.inf))) for a, d in data.items()
                if a in arms and len(d))
    top = max(top, min(whisk, top * 1.25))  # whiskers never set the scale (see layers.diagnoses)
    top = max(top, head_dim or 0) * 1.08
    max_n = 1
    for ax, a in zip(axes, arms):
        d = data[a]
        for j, (name, alpha, hatch) in enumerate((("key PR", 0.35, None), ("functional rank", 0.95, None))):
            s = d[d["series"] == name].sort_values("layer")
            if not len(s):
                continue
            x = s["layer"].to_numpy(float) + (j - 0.5) * 0.38
            m = s["mean"].to_numpy(float)
            ax.bar(x, m, width=0.36, color=colors[a], alpha=alpha, hatch=hatch, zorder=2,
                   edgecolor=colors[a], lw=0.8)
            if (s["n"] > 1).any():
                max_n = max(max_n, int(s["n"].max()))
                ax.errorbar(x, m, yerr=_ci_err(m, s["lo"].to_numpy(float), s["hi"].to_numpy(float)), fmt="none",
                            ecolor="0.2", elinewidth=0.9, capsize=1.5, zorder=3)
        if head_dim:
            ax.axhline(head_dim, color=REFERENCE, ls="--", lw=1, zorder=1)
        ax.set_ylim(0, top)
        ax.set_xlim(-0.7, n_layers - 0.3)
        if n_layers <= 32:
            ax.set_xticks(range(n_layers))
        ax.set_xlabel("layer")
        when = f" at {fmt_tokens(tokens[a])}" if tokens and a in tokens else ""
        seeds = f", {_seed_word(n_seeds[a])}" if n_seeds and a in n_seeds else ""
        ax.set_title(f"{a}{when}{seeds}", fontsize=10)
        ax.grid(axis="y", alpha=0.25, zorder=0)
        ax.spines[["top", "right"]].set_visible(False)
    for ax in axes[len(arms):]:
        ax.set_visible(False)
    axes[0].set_ylabel("dimensions")
    handles = [Patch(facecolor="0.5", alpha=0.35, edgecolor="0.5"), Patch(facecolor="0.5", alpha=0.95)]
    labels = ["key PR (spectral spread of the keys)", "functional rank (fewest directions keeping the loss within 1%)"]
    if head_dim:
        handles.append(Line2D([], [], color=REFERENCE, ls="--"))
        labels.append(f"head dim {head_dim}")
    fig.legend(handles, labels, loc="outside lower center", ncols=len(handles), frameon=False, fontsize=9)
    _save(fig, path)
    caption = ("Functional rank of the keys (the smallest projection rank r of each head's keys that keeps the "
               "loss within 1%: the dimensions the model actually uses; solid) next to the key PR (pale), per "
               "layer at the last point where functional rank was measured; "
               + ("bars are means over seeds, whiskers 95% t-intervals over seeds" if max_n > 1
                  else "one seed, no interval possible")
               + "; shared y-axis.")
    return Plot(path, caption)


def plot_rank_sweep(curves: dict[str, pd.DataFrame], arms: list[str], path: Path, *,
                    tokens: dict[str, float] | None = None, threshold: float = 0.01) -> Plot | None:
    """Per arm, the relative loss increase when every head's keys are projected onto their top-r
    directions, against r, one line per layer (mean over seeds). The functional rank is where a
    layer's line crosses the dashed 1% threshold.

    `curves[arm]`: rows (layer, r, value).
    """
    arms = [a for a in arms if a in curves and len(curves[a])]
    if not arms:
        return None
    n_layers = int(max(c["layer"].max() for c in curves.values() if len(c))) + 1
    ncols = min(len(arms), 3)
    nrows = int(np.ceil(len(arms) / ncols))
    fig = Figure(figsize=(4.6 * ncols + 0.9, 3.4 * nrows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharey=True, squeeze=False)).ravel()
    cmap = matplotlib.colormaps["viridis"]
    norm = matplotlib.colors.Normalize(vmin=0, vmax=max(n_layers - 1, 1))
    values = np.concatenate([c["value"].to_numpy(float) for c in curves.values() if len(c)])
    values = values[np.isfinite(values)]
    ymax = max(float(values.max()) if len(values) else 1.0, threshold * 2)  # the threshold line always shows
    for ax, a in zip(axes, arms):
        c = curves[a]
        for layer, g in c.groupby("layer"):
            g = g.sort_values("r")
            ax.plot(g["r"], g["value"], color=cmap(norm(layer)), lw=1.3, marker="o", ms=2.5)
        ax.axhline(threshold, color=FLAG, ls="--", lw=1)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _p: f"{x:g}"))
        # a symlog y: losses rise by orders of magnitude at low rank, and 0 (no loss) must show
        ax.set_yscale("symlog", linthresh=threshold / 10, linscale=0.5)
        ax.set_ylim(min(0.0, float(values.min()) if len(values) else 0.0), ymax * 1.5)
        ax.set_xlabel("projection rank r")
        when = f" at {fmt_tokens(tokens[a])}" if tokens and a in tokens else ""
        ax.set_title(f"{a}{when}", fontsize=10)
        _style(ax)
    for ax in axes[len(arms):]:
        ax.set_visible(False)
    axes[0].set_ylabel("relative loss increase")
    sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
    cb = fig.colorbar(sm, ax=list(axes[:len(arms)]), pad=0.01, aspect=30)
    cb.locator = MaxNLocator(integer=True)  # layers are whole numbers
    cb.update_ticks()
    cb.set_label("layer")
    _save(fig, path)
    caption = ("Rank sweep of the keys: the relative loss increase when each head's keys are projected onto their "
               "top-r principal directions, against r (log scale), one line per layer (colour), mean over seeds; "
               f"dashed red: the {threshold:.0%} threshold that defines the functional rank; y-axis symlog "
               "(linear near 0).")
    return Plot(path, caption)


# --- 7. rank against downstream ----------------------------------------------------------------------

def plot_rank_scatter(frame: pd.DataFrame, targets: Sequence[Quantity], arms: list[str], colors: dict, path: Path,
                      *, stats: dict[str, tuple[float, float, int]] | None = None,
                      x_label: str = "mean key PR") -> Plot | None:
    """Mean key PR (x) against each downstream measure (one panel each): every eval point after
    token 0 as a small faint dot, each run's last point as a large marker. The eye should see what
    the correlation table summarises, including how much of it is training progress."""
    targets = [q for q in targets if q.key in frame and frame[q.key].notna().any()]
    data = frame[(frame["tokens"] > 0) & np.isfinite(frame["x"])]
    if not targets or not len(data):
        return None
    k = len(targets)
    ncols = min(k, 3)
    nrows = int(np.ceil(k / ncols))
    fig = Figure(figsize=(4.4 * ncols, 3.5 * nrows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    grid = np.sort(data["tokens"].unique())
    late_from = float(grid[-max(3, len(grid) // 3)]) if len(grid) >= 6 else float(grid[0])
    zoomed = []
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
        # loss panels show late training and let the early points fall off the top (said in the caption)
        y = data[q.key].to_numpy(float)
        late = data.loc[data["tokens"] >= late_from, q.key].to_numpy(float)
        late = np.concatenate([late] + ends_all)
        late, y = late[np.isfinite(late)], y[np.isfinite(y)]
        if q.key.endswith("_loss") and len(late) and np.ptp(y) > 3 * max(np.ptp(late), 1e-12):
            pad = 0.1 * np.ptp(late) if np.ptp(late) > 0 else 0.01
            ax.set_ylim(late.min() - pad, late.max() + pad)
            zoomed.append(q.label)
        title = q.label
        if stats and q.key in stats:
            r, p, n = stats[q.key]
            if np.isfinite(r):
                title += f"\nrun ends: r = {signed(r, 2)}, {fmt_p(p)}, n = {n}"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(x_label, fontsize=8)
        ax.set_ylabel(q.label + (f" ({q.unit})" if q.unit else ""), fontsize=8)
        ax.tick_params(labelsize=8)
        _style(ax)
    for ax in axes[k:]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=colors[a], marker="o", ls="", mec="black", ms=6) for a in arms]
    fig.legend(handles, arms, loc="outside lower center", ncols=min(len(arms), 5), frameon=False)
    _save(fig, path)
    caption = (f"{x_label[0].upper() + x_label[1:]} (x) against each downstream measure: small faint dots are every eval point after token 0 "
               "(points of one run are not independent, and both axes drift with training time); large dots are "
               "each run's last eval point (one per run), the points behind the 'run ends' correlations"
               + (f"; the loss panels ({', '.join(zoomed)}) show late training, from {fmt_tokens(late_from)} tokens — "
                  "earlier points lie above their top edge" if zoomed else "") + ".")
    return Plot(path, caption)


__all__ = ["Plot", "DiagPanel", "arm_colors", "safe_names", "use_log_tokens", "band_clause", "plot_loss_pr",
           "plot_layer_pr", "plot_pr_heatmap", "plot_diagnosis", "plot_downstream", "plot_functional_rank",
           "plot_rank_sweep", "plot_rank_scatter"]
