"""A contrast layer by layer: treatment − control of the probe quantity in each layer, seed by seed,
at the last eval point both arms reached, with its 95% interval and Holm's adjustment over layers.

The seed's narrow keys sat in two layers of 22 (layers 1 and 3 below PR 10), not across the network.
A network-wide mean can hide that: a gap of −8 in one layer of four reads as −2. The per-layer bars
(`layer_plots.plot_layer_pr`) show each arm's layers, but two bars with overlapping whiskers hide a
difference that is the same in every seed; the arms share their seeds' initial weights and batches,
so the difference is taken within each seed, as the other contrasts are (`stats.paired_difference`).
With many layers some interval will exclude 0 by chance; Holm's adjustment over the layers of one
contrast says which differences survive that.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from ..settings.units import fmt_count
from .blocks import Block, Para, Table, md_escape
from .format import MINUS, bare_p, decimals_for, seeds_text, signed
from .plotstyle import Plot, ci_err, new_figure, reference_line, save, style_axes
from .stats import SINGLE, holm, paired_difference
from .trajectory import difference_cell

COLUMNS = ["layer", "treatment", "control", "mean", "lo", "hi", "p", "p_holm", "n", "test"]
PLOT = "layer_contrasts.png"
ALPHA = 0.05  # the level at which a layer's adjusted difference is named in words


@dataclass(frozen=True)
class LayerContrast:
    """One contrast's per-layer differences at `tokens` (rows as `COLUMNS`)."""

    treatment: str
    control: str
    tokens: int
    rows: pd.DataFrame

    @property
    def n(self) -> int:
        return int(self.rows["n"].max()) if len(self.rows) else 0

    def beyond_noise(self, alpha: float = ALPHA) -> list[int]:
        """Layers whose difference stands out from seed noise after Holm's adjustment over layers."""
        ok = self.rows[np.isfinite(self.rows["p_holm"].to_numpy(float)) & (self.rows["p_holm"] < alpha)]
        return [int(x) for x in ok["layer"]]


def common_end(layers: pd.DataFrame, treatment: str, control: str, ends: Mapping[str, int]) -> int | None:
    """The last eval point at or before both arms' ENDs (`series.choose_points`) where both have rows."""
    if treatment not in ends or control not in ends:
        return None
    limit = min(ends[treatment], ends[control])
    have = [set(layers.loc[layers["arm"] == a, "tokens"].tolist()) for a in (treatment, control)]
    shared = [int(t) for t in have[0] & have[1] if t <= limit]
    return max(shared) if shared else None


def layer_contrast(layers: pd.DataFrame, treatment: str, control: str, tokens: int) -> LayerContrast:
    """`treatment − control` in each layer at `tokens`, from per-layer values ``arm, seed, tokens,
    layer, value`` (`series.layer_means`: each run's mean over the layer's heads).

    Per layer: the arms' means over the seeds the difference pairs (over all their seeds where fewer
    than two are shared), the difference with its 95% interval and p (`stats.paired_difference`),
    p adjusted by Holm over the layers, the seeds counted and the test used.
    """
    at = layers[(layers["tokens"] == tokens) & layers["arm"].isin((treatment, control))]
    rows = []
    for layer, sub in at.groupby("layer", sort=True):
        values = {
            a: {int(s): float(v) for s, v in zip(g["seed"], g["value"])} for a, g in sub.groupby("arm", sort=False)
        }
        ta, ca = values.get(treatment, {}), values.get(control, {})
        d = paired_difference(ta, ca, names=(treatment, control))
        use = d.seeds or None  # the seeds the difference is taken over; all of each arm's for Welch
        means = [float(np.mean([v[s] for s in (use or v)])) if v else math.nan for v in (ta, ca)]
        rows.append([int(layer), *means, d.mean, d.lo, d.hi, d.p, math.nan, d.n, d.test])
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["p_holm"] = holm(frame["p"].tolist()) if len(frame) else []
    return LayerContrast(treatment, control, int(tokens), frame)


def layer_contrasts(
    layers: pd.DataFrame, contrasts: Sequence[tuple[str, str]], ends: Mapping[str, int]
) -> list[LayerContrast]:
    """Each contrast layer by layer at its arms' common end; contrasts without one are left out."""
    out = []
    for a, b in contrasts:
        t = common_end(layers, a, b, ends)
        if t is not None:
            c = layer_contrast(layers, a, b, t)
            if len(c.rows):
                out.append(c)
    return out


# --- words and tables -----------------------------------------------------------------------------


def describe(c: LayerContrast, what: str, d: int) -> str:
    """Where in depth the difference is largest, and which layers stand out from seed noise."""
    r = c.rows[np.isfinite(c.rows["mean"].to_numpy(float))]
    if not len(r):
        return f"{c.treatment} {MINUS} {c.control}: no layer has both arms at {fmt_count(c.tokens)} tokens."
    lo, hi = r.loc[r["mean"].idxmin()], r.loc[r["mean"].idxmax()]
    low, high = difference_cell(lo, d), difference_cell(hi, d)
    text = (
        f"{what[0].upper()}{what[1:]}, {c.treatment} {MINUS} {c.control} at {fmt_count(c.tokens)} tokens "
        f"({seeds_text(c.n)}): from {low} in layer {int(lo['layer'])} to {high} in layer {int(hi['layer'])}"
    )
    if c.n < 2 or (r["test"] == SINGLE).all():
        return text + "; one seed: no layer can be told from seed noise."
    named = c.beyond_noise()
    if not named:
        return text + f"; no layer stands out from seed noise after Holm's adjustment over {len(r)} layers."
    return text + f"; beyond seed noise after Holm's adjustment over {len(r)} layers: {layer_list(named)}."


def layer_list(layers: Sequence[int | str]) -> str:
    """'layer 3', 'layers 1 and 3', 'layers 0, 2 and 3'."""
    names = [str(x) for x in layers]
    if len(names) == 1:
        return f"layer {names[0]}"
    return f"layers {', '.join(names[:-1])} and {names[-1]}"


def summary_sentence(contrasts: Sequence[LayerContrast], what: str) -> str | None:
    """One sentence for the report's summary: in which layers each contrast stands out from seed
    noise after Holm's adjustment over its layers (None without a contrast of two or more seeds)."""
    judged = [c for c in contrasts if c.n >= 2 and not (c.rows["test"] == SINGLE).all()]
    if not judged:
        return None
    parts = []
    for c in judged:
        named = c.beyond_noise()
        mean = c.rows.set_index("layer")["mean"]
        d = decimals_for(pd.concat([c.rows["treatment"], c.rows["control"]]).tolist(), what)
        where = layer_list([f"{x} ({signed(mean[x], d)})" for x in named]) if named else f"no layer of {len(c.rows)}"
        parts.append(f"**{md_escape(c.treatment)}** {MINUS} **{md_escape(c.control)}** in {where}")
    return (
        f"Layer by layer ({what}, seed by seed at each contrast's end, Holm's adjustment over layers), where "
        "each contrast stands out from seed noise: " + "; ".join(parts) + "."
    )


def layer_contrast_blocks(
    contrasts: Sequence[LayerContrast], what: str, beside: Sequence[LayerContrast] = (), beside_what: str = ""
) -> list[Block]:
    """An introduction, then per contrast a sentence and a table of every layer; `beside`: the same
    contrasts in another per-layer quantity (`beside_what`), a column of its difference in each row
    (the report puts the W_K-update PR there: where the keys narrow, did their update narrow?)."""
    if not contrasts:
        return []
    intro = (
        f"Each contrast in each layer: {what} (mean over the layer's heads) as treatment − control, seed by "
        "seed, at the last eval point both arms reached, with a 95% paired t-interval over seeds. With many "
        "layers some interval excludes 0 by chance; the p (Holm) column adjusts each layer's p by Holm's method "
        "over the contrast's layers, and only layers below 0.05 there are named as beyond seed noise."
    )
    others = {(o.treatment, o.control, o.tokens): o for o in beside}
    if others:
        intro += f" The last column is the same difference in {beside_what}, at the same point."
    blocks: list[Block] = [Para(intro)]
    for c in contrasts:
        d = decimals_for(pd.concat([c.rows["treatment"], c.rows["control"]]).tolist(), what)
        blocks.append(Para(describe(c, what, d)))
        t, k = md_escape(c.treatment), md_escape(c.control)
        header = ["layer", t, k, f"{t} {MINUS} {k} [95% CI]", "p", "p (Holm)"]
        other = others.get((c.treatment, c.control, c.tokens))
        if other is not None:
            header.append(f"Δ {beside_what} [95% CI]")
            by_layer = other.rows.set_index("layer")
            od = decimals_for(pd.concat([other.rows["treatment"], other.rows["control"]]).tolist(), beside_what)
        rows = []
        for _, r in c.rows.iterrows():
            row = [
                str(int(r["layer"])),
                signed(float(r["treatment"]), d),
                signed(float(r["control"]), d),
                difference_cell(r, d),
                bare_p(float(r["p"])),
                bare_p(float(r["p_holm"])),
            ]
            if other is not None:
                hit = r["layer"] in by_layer.index
                row.append(difference_cell(by_layer.loc[r["layer"]], od) if hit else "–")
            rows.append(row)
        blocks.append(Table(header, rows, ["r"] * len(header)))
    return blocks


# --- the figure -----------------------------------------------------------------------------------

PANELS_PER_ROW = 3


def plot_layer_contrasts(
    contrasts: Sequence[LayerContrast], path: Path, *, what: str = "mean key PR", unit: str = "dimensions"
) -> Plot | None:
    """One panel per contrast: the difference in each layer with its 95% whiskers, a line at 0;
    layers beyond seed noise after Holm's adjustment are filled, the others hollow."""
    contrasts = [c for c in contrasts if np.isfinite(c.rows["mean"].to_numpy(float)).any()]
    if not contrasts:
        return None
    cols = min(PANELS_PER_ROW, len(contrasts))
    nrows = math.ceil(len(contrasts) / cols)
    n_layers = max(len(c.rows) for c in contrasts)
    fig = new_figure(max(4.2, 0.22 * n_layers + 2.2) * cols, 3.3 * nrows)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, c in zip(axes, contrasts):
        r = c.rows
        x, m = r["layer"].to_numpy(float), r["mean"].to_numpy(float)
        lo, hi = r["lo"].to_numpy(float), r["hi"].to_numpy(float)
        ok = np.isfinite(lo) & np.isfinite(hi)
        if ok.any():
            ax.errorbar(x[ok], m[ok], yerr=ci_err(m[ok], lo[ok], hi[ok]), fmt="none", ecolor="0.35", elinewidth=1)
        named = r["layer"].isin(c.beyond_noise()).to_numpy()
        if named.any():
            ax.scatter(x[named], m[named], s=30, color="C3", zorder=3, label="beyond seed noise (Holm)")
        if (~named).any():
            rest = "within noise" if c.n >= 2 else "one seed: no interval"
            ax.scatter(x[~named], m[~named], s=30, facecolors="white", edgecolors="C0", zorder=3, label=rest)
        ax.set_xlim(x.min() - 0.5, x.max() + 0.5)
        ax.set_xlabel("layer")
        ax.set_ylabel(f"difference in {what} ({unit})")
        ax.set_title(f"{c.treatment} − {c.control} at {fmt_count(c.tokens)} tokens ({seeds_text(c.n)})", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(16, max(2, n_layers))))
        style_axes(ax)
        reference_line(ax, 0.0, "0")
    for ax in axes[len(contrasts) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7, frameon=False)
    n = max(c.n for c in contrasts)
    whiskers = (
        f"whiskers: 95% paired t intervals over {seeds_text(n)}" if n >= 2 else "one seed: no interval is possible"
    )
    caption = (
        f"Each contrast layer by layer: treatment − control in {what}, seed by seed, at the last eval point both "
        f"arms reached; {whiskers}; filled: the layers whose difference stands out from seed noise after Holm's "
        "adjustment over the contrast's layers. Above 0: the treatment is higher in that layer."
    )
    return Plot(save(fig, path), caption)


__all__ = [
    "PLOT",
    "LayerContrast",
    "common_end",
    "layer_contrast",
    "layer_contrasts",
    "layer_contrast_blocks",
    "summary_sentence",
    "plot_layer_contrasts",
]
