"""Two settings crossed: when a study's arms form a full grid over two settings (QK-Norm x Muon
grouping, QK-Norm x optimizer), read it as effects, seed by seed.

For settings A (levels a0, a1, ...) and B (b0, b1, ...), with v(a, b, s) the value of arm (a, b) in
seed s at the arms' common end point:

  simple effect of A at b:   v(a1, b, s) − v(a0, b, s)                         paired over seeds
  main effect of A:          mean over b of the simple effects at b              paired over seeds
  interaction (a1, b1):      [v(a1, b1) − v(a0, b1)] − [v(a1, b0) − v(a0, b0)]  paired over seeds

each with its 95% t-interval over seeds (`stats.paired_difference`). The interaction says how much
A's effect changes when B changes: for the seed's question, how much of QK-Norm's key-PR gap
belongs to orthogonalizing Q, K, V and O together. A factor's reference level (a0) is the one that
means "off" (none, off, false, 0) when there is one, else the seed's own setting (seedref) when it
is a level, else the level of the study's first arm.
Torch-free, like the rest of `report/`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ..settings.contrasts import OFF, SECTIONS
from ..settings.contrasts import text as setting_text
from ..settings.flat import flatten
from ..settings.seedref import SEED_88M
from .format import decimals_for, fmt_difference, fmt_interval, fmt_p, resolving_decimals, seeds_text, signed
from .quantities import Quantity
from .series import choose_points, seed_values
from .stats import SINGLE, Difference, paired_difference


@dataclass(frozen=True)
class Factor:
    key: str  # the setting, e.g. model.qk_norm
    levels: tuple[str, ...]  # levels[0] is the reference


@dataclass(frozen=True)
class Grid:
    a: Factor
    b: Factor
    cells: dict[tuple[str, str], str]  # (level of a, level of b) -> arm


@dataclass(frozen=True)
class Effect:
    kind: str  # "main" | "simple" | "interaction"
    factor: str  # the setting whose change is measured
    level: str  # the level compared with the reference
    reference: str
    at: str  # "" (main), the other setting's level (simple), or its level vs its reference
    diff: Difference


def find_grid(arm_configs: Mapping[str, Mapping[str, Any]], arm_order: Sequence[str]) -> Grid | None:
    """The two settings the arms cross, if the arms are exactly one full grid over them."""
    flat = {
        arm: {k: setting_text(v) for k, v in flatten(cfg).items() if k.startswith(SECTIONS)}
        for arm, cfg in arm_configs.items()
    }
    arms = [a for a in arm_order if a in flat]
    if len(arms) < 4:
        return None
    keys = sorted({k for a in arms for k in flat[a]})
    varying = [k for k in keys if len({flat[a].get(k) for a in arms}) > 1]
    if len(varying) != 2:
        return None
    factors = []
    for k in varying:
        levels = list(dict.fromkeys(flat[a].get(k) for a in arms))
        seeds_own = setting_text(SEED_88M[k]) if k in SEED_88M else None
        ref = next((lv for lv in levels if lv in OFF), seeds_own if seeds_own in levels else None)
        if ref is not None:
            levels.remove(ref)
            levels.insert(0, ref)
        factors.append(Factor(k, tuple(levels)))
    a, b = factors
    cells = {(flat[arm][a.key], flat[arm][b.key]): arm for arm in arms}
    if len(cells) != len(arms) or len(cells) != len(a.levels) * len(b.levels):
        return None
    return Grid(a, b, cells)


def _mean_dicts(dicts: Sequence[Mapping[int, float]]) -> dict[int, float]:
    """Seed-wise mean over dicts, on the seeds all of them have."""
    shared = set.intersection(*(set(d) for d in dicts)) if dicts else set()
    return {s: sum(d[s] for d in dicts) / len(dicts) for s in shared}


def _minus(x: Mapping[int, float], y: Mapping[int, float]) -> dict[int, float]:
    return {s: x[s] - y[s] for s in set(x) & set(y)}


def effects(grid: Grid, series: pd.DataFrame, finished: Collection[tuple[str, int]] | None = None) -> list[Effect]:
    """Main effects, simple effects and interactions of both settings on one quantity's series,
    at the end point every cell's arm reached (none if their ends differ)."""
    arms = list(grid.cells.values())
    _, ends = choose_points(series, arms, finished)
    if set(ends) != set(arms) or len(set(ends.values())) != 1:
        return []
    end = next(iter(ends.values()))
    v = {
        cell: {s: val for s, (val, _) in seed_values(series, arm, end).items() if math.isfinite(val)}
        for cell, arm in grid.cells.items()
    }
    out: list[Effect] = []
    for f, g, at in ((grid.a, grid.b, lambda x, y: (x, y)), (grid.b, grid.a, lambda x, y: (y, x))):
        ref = f.levels[0]
        for level in f.levels[1:]:
            simple = {o: (v[at(level, o)], v[at(ref, o)]) for o in g.levels}
            out.append(
                Effect(
                    "main",
                    f.key,
                    level,
                    ref,
                    "",
                    paired_difference(
                        _mean_dicts([x for x, _ in simple.values()]),
                        _mean_dicts([y for _, y in simple.values()]),
                        names=(level, ref),
                    ),
                )
            )
            for o, (x, y) in simple.items():
                out.append(Effect("simple", f.key, level, ref, o, paired_difference(x, y, names=(level, ref))))
    # the interaction, once: how A's effect changes from B's reference to each other level of B
    a, b = grid.a, grid.b
    for la in a.levels[1:]:
        base = _minus(v[(la, b.levels[0])], v[(a.levels[0], b.levels[0])])
        for lb in b.levels[1:]:
            other = _minus(v[(la, lb)], v[(a.levels[0], lb)])
            out.append(
                Effect(
                    "interaction",
                    a.key,
                    la,
                    a.levels[0],
                    f"{lb} vs {b.levels[0]}",
                    paired_difference(other, base, names=(lb, b.levels[0])),
                )
            )
    return out


def effects_table(
    grid: Grid, quantities: Sequence[tuple[Quantity, pd.DataFrame]], finished: Collection[tuple[str, int]] | None = None
) -> pd.DataFrame:
    """One row per (effect, quantity): kind, factor, level, reference, at, quantity, key, mean, lo,
    hi, p, n, test, resolved, decimals (taken from the quantity)."""
    rows = []
    for q, series in quantities:
        if not len(series):
            continue
        dec = decimals_for(series["value"].to_numpy(dtype=float), q.label, q.decimals)
        for e in effects(grid, series, finished):
            d = e.diff
            rows.append(
                {
                    "kind": e.kind,
                    "factor": e.factor,
                    "level": e.level,
                    "reference": e.reference,
                    "at": e.at,
                    "quantity": q.label,
                    "key": q.key,
                    "higher": q.higher,
                    "mean": d.mean,
                    "lo": d.lo,
                    "hi": d.hi,
                    "p": d.p,
                    "n": d.n,
                    "test": d.test,
                    "resolved": d.resolved,
                    "decimals": dec,
                }
            )
    return pd.DataFrame(rows)


def _cell(row: Mapping[str, Any]) -> str:
    dec = resolving_decimals(int(row["decimals"]), row["mean"], row["lo"], row["hi"])
    if not math.isfinite(row["mean"]):
        return "–"
    text = signed(row["mean"], dec)
    if row["test"] != SINGLE and math.isfinite(row["lo"]):
        text += " " + fmt_interval(row["lo"], row["hi"], dec)
    return f"**{text}**" if row["resolved"] else text


def effect_label(row: Mapping[str, Any], grid: Grid) -> str:
    other = grid.b.key if row["factor"] == grid.a.key else grid.a.key
    change = f"{row['factor']}: {row['level']} − {row['reference']}"
    if row["kind"] == "main":
        return f"{change}, averaged over {other}"
    if row["kind"] == "simple":
        return f"{change}, at {other} = {row['at']}"
    at, ref = row["at"].split(" vs ")
    return f"interaction: ({change}) at {other} = {at} minus at {ref}"


def effect_rows(table: pd.DataFrame, grid: Grid) -> tuple[list[str], list[list[str]]]:
    """(header, rows) for the report: one row per effect, one column per quantity."""
    if not len(table):
        return [], []
    quantities = list(dict.fromkeys(table["quantity"]))
    header = ["effect (seed-by-seed difference, 95% interval; bold: beyond seed noise)"] + quantities
    order = {"main": 0, "simple": 1, "interaction": 2}
    rows = []
    for (kind, *_), g in table.groupby(["kind", "factor", "level", "at"], sort=False):
        by_q = {r["quantity"]: _cell(r) for _, r in g.iterrows()}
        rows.append((order[kind], [effect_label(g.iloc[0], grid)] + [by_q.get(q, "–") for q in quantities]))
    return header, [r for _, r in sorted(rows, key=lambda x: x[0])]  # stable: study order within a kind


def sentences(table: pd.DataFrame, grid: Grid, key: str, name: str) -> list[str]:
    """Plain words for quantity `key` (e.g. 'k:pr_sv', named 'mean key PR'): the first setting's
    effect at each level of the second, and whether it changes (the interaction)."""
    t = table[table["key"] == key]
    if not len(t):
        return []
    a, b = grid.a, grid.b
    out = []
    for la in a.levels[1:]:
        simple = t[(t["kind"] == "simple") & (t["factor"] == a.key) & (t["level"] == la)]
        if not len(simple):
            continue
        ns = set(simple["n"].astype(int))
        dec = int(simple["decimals"].iloc[0])
        parts = [
            fmt_difference(r.mean, r.lo, r.hi, dec)
            + f" at {b.key} = {r.at}"
            + ("" if len(ns) == 1 else f" ({seeds_text(int(r.n))})")
            for r in simple.itertuples()
        ]
        over = f" over {seeds_text(ns.pop())}" if len(ns) == 1 else ""
        out.append(f"{name[0].upper() + name[1:]}, {a.key} {la} − {a.levels[0]}{over}: " + "; ".join(parts) + ".")
        inter = t[(t["kind"] == "interaction") & (t["level"] == la)]
        for r in inter.itertuples():
            at, ref = r.at.split(" vs ")
            if not math.isfinite(r.lo):
                out.append(
                    f"That effect changes by {signed(r.mean, dec)} from {b.key} = {ref} to {at} "
                    "(one seed: no interval)."
                )
                continue
            verdict = "beyond seed noise" if r.resolved else "not distinguishable from seed noise"
            d = resolving_decimals(dec, r.mean, r.lo, r.hi)
            out.append(
                f"From {b.key} = {ref} to {at} that effect changes by {signed(r.mean, d)} "
                f"{fmt_interval(r.lo, r.hi, d)} ({fmt_p(r.p)}): {verdict}."
            )
    return out
