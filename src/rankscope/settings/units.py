"""Token counts in and out: '25M' -> 25_000_000 for study files and flags, 25_000_000 -> '25M'
for tables, axes and messages. Torch-free."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

_COUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgG]?)\s*$")
_SCALE = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


def parse_count(text: str) -> int:
    """'25M' -> 25_000_000, '1.5e6' -> 1_500_000, '4096' -> 4096, '1_000' -> 1000; a ValueError
    with the reason otherwise."""
    m = _COUNT.match(str(text).replace("_", ""))
    if not m:
        raise ValueError(f"expected a count like 4096, 100M or 1.5k, got {text!r}")
    value = float(m.group(1)) * _SCALE[m.group(2).lower()]
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is too large")
    if value != int(value):
        raise ValueError(f"expected a whole number, got {text!r}")
    return int(value)


def fmt_count(t: float | None) -> str:
    """Counts the way papers write them: 0, 50k, 0.5M, 1M, 16.4M, 25M, 1.5B (three significant
    digits); '?' for None or a non-finite value.

    From 100k up the unit is M (0.1M rather than 100k), so one run's axis reads in one unit.
    """
    if t is None:
        return "?"
    t = float(t)
    if not math.isfinite(t):
        return "?"
    if t == 0:
        return "0"
    a = abs(t)
    for at, unit, suffix in ((1e12, 1e12, "T"), (1e9, 1e9, "B"), (1e5, 1e6, "M"), (1e3, 1e3, "k")):
        if a >= at:
            return f"{t / unit:.3g}{suffix}"
    return f"{t:.0f}"


def fmt_count_ticks(ticks: Sequence[float], *, log: bool = False) -> list[str]:
    """Labels for the ticks of a token axis, without spurious digits: 0, 50k, 100k, 150k on a
    linear axis (one unit for the whole axis, chosen by its largest tick, and the fewest decimals
    that tell the ticks apart), 0, 10k, 100k, 1M, 10M on a log axis (each tick its own unit).

    Unlike `fmt_count`, values from 100k to 1M read in k (100k, not 0.1M): an axis label is read
    next to its neighbours, not alone in a table. Trailing zeros are dropped (0.5M, 1M, 1.5M).
    """
    t = [float(x) for x in ticks]
    if log:
        return [_fmt_unit(x, *_unit(abs(x)), None) for x in t]
    finite = [abs(x) for x in t if math.isfinite(x)]
    scale, suffix = _unit(max(finite) if finite else 0.0)
    scaled = [x / scale for x in t if math.isfinite(x)]
    decimals = 0
    while decimals < 3 and any(abs(round(v, decimals) - v) > 1e-9 * max(1.0, abs(v)) for v in scaled):
        decimals += 1
    return [_fmt_unit(x, scale, suffix, decimals) for x in t]


def _unit(a: float) -> tuple[float, str]:
    for at, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if a >= at:
            return at, suffix
    return 1.0, ""


def _fmt_unit(x: float, scale: float, suffix: str, decimals: int | None) -> str:
    if not math.isfinite(x):
        return "?"
    if x == 0:
        return "0"
    v = x / scale
    text = f"{v:.3g}" if decimals is None else f"{v:.{decimals}f}"
    if "." in text:  # 0.5M next to 0.25M, not 0.50M: the digits a tick needs, no more
        text = text.rstrip("0").rstrip(".")
    return text + suffix
