"""This study next to the seed study's published single-seed figures (DESIGN.md's reference
table), for studies run with a seed preset and the seed's arms: its Muon with and without QK-Norm
(at 1.5B also the frozen gain), at the token counts the seed reported.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd

from ..settings.muon_qkvo import MUON_PARTITION, muon_partition
from ..settings.seedref import SEED_FIGURES_NOTE
from ..settings.units import fmt_count
from .blocks import md_escape
from .format import seeds_text
from .load import StudyData
from .series import INTERPOLATE, quantity_series, runs_at

# The seed's published single-seed figures (DESIGN.md), by the preset that restages each run:
# (label, quantity key, tokens, {arm kind: value}, read off a figure (approximate), source in seedref)
SEED_REFERENCE: dict[str, tuple[tuple[str, str, int, dict[str, float], bool, str], ...]] = {
    "seed-88m": (
        ("val loss", "val_loss", 16_000_000, {"qk": 4.233, "none": 4.253}, False, "16M"),
        ("mean key PR", "k:pr_sv", 16_000_000, {"qk": 43.5, "none": 46.8}, False, "16M"),
        ("mean key PR", "k:pr_sv", 25_000_000, {"qk": 30.0, "none": 51.0}, True, "25M"),
    ),
    "seed-1.5b": (
        (
            "mean key PR before RoPE",
            "k_pre:pr_sv",
            50_000_000,
            {"qk": 65.7, "frozen": 59.6, "none": 63.3},
            False,
            "1.5B",
        ),
    ),
}
_KIND_NAMES = {"qk": "QK-Norm", "frozen": "QK-Norm, gain frozen", "none": "no QK-Norm"}


def arm_kind(config: dict[str, Any]) -> str | None:
    """'qk' for the seed's QK-Norm arm (Muon, learned gain), 'frozen' for its gain-frozen arm, 'none'
    for its plain arm (Muon, no QK-Norm, no QK-Clip); None for anything else, including Muon that is
    not the seed's (Q, K, V, O not stacked, or not Polar Express; a run from before these settings
    existed trained them separately with Newton-Schulz)."""
    m, o = config.get("model") or {}, config.get("optim") or {}
    if str(o.get("name", "")).lower() != "muon" or float(o.get("qk_clip_tau") or 0) > 0:
        return None
    qkvo = o.get("muon_qkvo")
    if not isinstance(qkvo, str) or re.fullmatch(MUON_PARTITION, qkvo) is None:
        return None  # older runs (Q, K, V, O trained separately) or a value this version cannot read
    stacked = muon_partition(qkvo, int(o.get("muon_head_group") or 0)) == (("qkvo",), 0)
    if not stacked or o.get("muon_ns") != "polar_express":
        return None
    return {"learned": "qk", "frozen": "frozen", "none": "none"}.get(str(m.get("qk_norm", "")).lower())


def seed_reference(study: StudyData, series: dict[str, pd.DataFrame]) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows, sentences) comparing this study with the seed's published numbers, for studies
    with a seed preset and the seed's arms (its Muon, with and without QK-Norm; at 1.5B also the
    frozen gain). `series`: quantity key -> series; missing keys are read from the study. Empty
    when not applicable."""
    presets = [
        p for p in dict.fromkeys(str(s.get("preset")) for s in study.studies if s.get("preset")) if p in SEED_REFERENCE
    ]
    if not presets:
        headline = seed_headline(study, series)
        return [], [], [headline] if headline else []
    reference = SEED_REFERENCE[presets[0]]
    kinds: dict[str, str] = {}
    for r in study.runs:
        k = arm_kind(r.config)
        if k and k not in kinds:
            kinds[k] = r.arm
    wanted = [k for k in ("qk", "frozen", "none") if any(k in row[3] for row in reference)]
    if not {"qk", "none"} <= set(kinds):
        return [], [], []
    shown = [k for k in wanted if k in kinds]
    header = ["quantity"] + [h for k in shown for h in (f"seed: {_KIND_NAMES[k]}", md_escape(kinds[k]))]
    rows, sentences, checks, sources = [], [], [], []
    for label, key, tokens, values, approx, source in reference:
        s = series.get(key)
        if s is None:
            s = quantity_series(study.scalars, study.probes, key)
        if s is None or not len(s):
            continue
        dec = 3 if "loss" in label else 1
        cells, means = [], {}
        for kind in shown:
            arm = kinds[kind]
            # log-spaced grids rarely hit 16M exactly: interpolate between a run's two neighbouring points
            at = runs_at(s[s["arm"] == arm], tokens, INTERPOLATE)
            vals, interp = at["value"].tolist(), bool(at["interpolated"].any())
            ref = values.get(kind)
            cells.append("–" if ref is None else (f"≈{ref:.0f}" if approx else f"{ref:.{dec}f}"))
            if not vals:
                cells.append("not reached")
                continue
            means[kind] = float(np.mean(vals))
            notes = ([seeds_text(len(vals))] if len(vals) > 1 else []) + (["interpolated"] if interp else [])
            cells.append(f"{means[kind]:.{dec}f}" + (f" ({', '.join(notes)})" if notes else ""))
        rows.append([f"{label} @ {fmt_count(tokens)}"] + cells)
        sources.append(f"{fmt_count(tokens)}: {SEED_FIGURES_NOTE[source]}")
        if "pr_sv" in key and {"qk", "none"} <= set(means):
            checks.append((fmt_count(tokens), (means["qk"] < means["none"]) == (values["qk"] < values["none"])))
    for same in (True, False):
        where = [w for w, ok in checks if ok == same]
        if where:
            sentences.append(
                f"At {' and '.join(where)} tokens the key PR order of **{md_escape(kinds['qk'])}** and "
                f"**{md_escape(kinds['none'])}** "
                + ("matches" if same else "is the reverse of")
                + " the seed's figure at the same point."
            )
    if sources:
        sentences.append("The seed's figures come from different runs: " + "; ".join(dict.fromkeys(sources)) + ".")
    return header, rows, sentences


# The seed's headline (DESIGN.md): mean key PR with QK-Norm and without, at 16M tokens on its 88M
# model, after 1,953 Muon steps of 8,192 tokens.
SEED_HEADLINE = {"qk": 43.5, "none": 46.8, "tokens": 16_000_000, "steps": 1953, "params": 88_630_528}


def seed_headline(study: StudyData, series: dict[str, pd.DataFrame]) -> str | None:
    """One sentence setting a study that makes the seed's comparison (its Muon with QK-Norm and
    without) at another scale against the seed's headline, with why the two can differ; None for
    any other study."""
    kinds: dict[str, str] = {}
    config: dict[str, Any] = {}
    for r in study.runs:
        k = arm_kind(r.config)
        if k in ("qk", "none") and k not in kinds:
            kinds[k], config = r.arm, config or r.config
    s = series.get("k:pr_sv")
    if s is None:
        s = quantity_series(study.scalars, study.probes, "k:pr_sv")
    if set(kinds) != {"qk", "none"} or s is None or not len(s):
        return None
    ends = [int(s.loc[s["arm"] == kinds[k], "tokens"].max()) for k in ("qk", "none")]
    t = min(ends)
    if t <= 0:
        return None
    means = {k: float(s.loc[(s["arm"] == kinds[k]) & (s["tokens"] == t), "value"].mean()) for k in ("qk", "none")}
    gap = means["qk"] - means["none"]
    per_step = int(config.get("tokens_per_step") or 0)
    steps = f", {t // per_step:,} steps" if per_step else ""
    params = config.get("n_params")
    size = f" on {float(params) / 1e6:.2g}M parameters" if params else ""
    h = SEED_HEADLINE
    return (
        f"The seed saw QK-Norm lower mean key PR ({h['qk']} vs {h['none']} at {fmt_count(h['tokens'])} tokens, "
        f"{h['steps']:,} steps, on {h['params'] / 1e6:.0f}M parameters); here **{md_escape(kinds['qk'])}** is "
        f"{'higher' if gap > 0 else 'lower'} than **{md_escape(kinds['none'])}** by {abs(gap):.1f} at "
        f"{fmt_count(t)} tokens{steps}{size}. The two can differ by scale (width, depth), training length "
        "(Muon moves each matrix a fixed spectral amount per step, so steps matter as much as tokens) and data."
    )


__all__ = ["SEED_REFERENCE", "SEED_HEADLINE", "arm_kind", "seed_headline", "seed_reference"]
