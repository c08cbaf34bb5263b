"""Numbers as the report writes them: signed values with a real minus sign, p-values, intervals,
decimals chosen per quantity, one difference in words, and plain-text tables for a terminal.

Strings only; the numbers come from `stats.py` and the tables that use them. Markdown and HTML
tables are the document model's (`blocks.py`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from .stats import NONE, PAIRED_CONSTANT, SINGLE, WELCH, Difference

MINUS = "\u2212"  # a real minus sign in reports: "−0.020" rather than "-0.020"


def signed(v: float, d: int) -> str:
    """'−0.020' / '0.020' with a real minus sign; '–' for a missing number."""
    if not math.isfinite(v):
        return "–"
    text = f"{v:.{d}f}"
    if text.startswith("-"):
        # -0.000 after rounding is just 0
        return MINUS + text[1:] if any(ch not in "0." for ch in text[1:]) else text[1:]
    return text


def fmt_p(p: float) -> str:
    """'p = 0.06', 'p = 0.012', 'p < 0.001' (two significant digits, as journals ask)."""
    if not math.isfinite(p):
        return "p = –"
    if p < 0.001:
        return "p < 0.001"
    if p >= 0.1:
        return f"p = {p:.2f}"
    return f"p = {p:.2g}" if p >= 0.01 else f"p = {p:.3f}"


def bare_p(p: float) -> str:
    """'0.06' / '< 0.001' for a column already headed p."""
    return fmt_p(p).replace("p = ", "").replace("p < ", "< ")


def fmt_interval(lo: float, hi: float, d: int) -> str:
    return f"[{signed(lo, d)}, {signed(hi, d)}]"


def seeds_text(n: int) -> str:
    return f"{n} seed" + ("" if n == 1 else "s")


def decimals_for(values: Iterable[float], label: str = "", fixed: int | None = None) -> int:
    """Loss to 3 decimals (4.233), dimension counts to 1 (43.5), small numbers to 2 or more."""
    if fixed is not None:
        return fixed
    if "loss" in label:
        return 3
    finite = [abs(v) for v in values if np.isfinite(v)]
    top = max(finite) if finite else 0.0
    return 1 if top >= 10 else 2 if top >= 0.1 else 3


def fmt_mean_ci(mean: float, lo: float, hi: float, n: int, d: int) -> str:
    """'4.233 [4.220, 4.246]' over several seeds; '4.233' for one (no interval is possible)."""
    text = signed(mean, d)
    if n >= 2 and np.isfinite(lo):
        text += f" {fmt_interval(lo, hi, d)}"
    return text


def resolving_decimals(d: int, mean: float, lo: float, hi: float, most: int = 6) -> int:
    """`d`, or more decimals (up to `most`) so that a difference whose interval excludes 0 never
    prints as 0: its mean and both ends show a non-zero digit ("0.000 [−0.001, 0.000]" for an
    effect called beyond noise would contradict its own words)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0 <= hi:
        return d
    while d < most and any(f"{abs(v):.{d}f}".strip("0.") == "" for v in (mean, lo, hi)):
        d += 1
    return d


def fmt_difference(mean: float, lo: float, hi: float, d: int) -> str:
    """'−0.020 [−0.041, 0.001]', or the mean alone without an interval, to `resolving_decimals`."""
    d = resolving_decimals(d, mean, lo, hi)
    return signed(mean, d) + (f" {fmt_interval(lo, hi, d)}" if math.isfinite(lo) else "")


def describe(diff: Difference, d: int) -> str:
    """One sentence for a difference, the form the paradox table and summary use, e.g.

    'qk-norm − no-norm: −0.020 [−0.041, 0.001], p = 0.06 (3 seeds): not distinguishable from seed noise'
    """
    head = f"{diff.a} {MINUS} {diff.b}: "
    if diff.test == NONE:
        return head + "no seeds to compare"
    d = resolving_decimals(d, diff.mean, diff.lo, diff.hi)
    body = signed(diff.mean, d)
    if diff.test == SINGLE:
        return head + f"{body} (1 seed: no interval possible)"
    body += f" {fmt_interval(diff.lo, diff.hi, d)}"
    if diff.test == PAIRED_CONSTANT:
        body += f" ({seeds_text(diff.n)}, the same in each)"
    else:
        body += f", {fmt_p(diff.p)}"
        if math.isfinite(diff.p_wilcoxon):
            body += f" (Wilcoxon {fmt_p(diff.p_wilcoxon)})"
        body += f" ({seeds_text(diff.n)}{', unpaired Welch: fewer than 2 shared seeds' if diff.test == WELCH else ''})"
    return head + body + ": " + diff.verdict()


# The width plain-text tables are fitted to; None: no limit (a file, a pipe, a test).
_TEXT_WIDTH: contextvars.ContextVar[int | None] = contextvars.ContextVar("text_width", default=None)


@contextlib.contextmanager
def text_width(width: int | None) -> Iterator[None]:
    """Fit every `text_table` made inside to `width` columns (None: no limit), e.g. to the terminal
    the command prints to, without passing the width through every function in between."""
    token = _TEXT_WIDTH.set(width)
    try:
        yield
    finally:
        _TEXT_WIDTH.reset(token)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], width: int | None = None) -> list[str]:
    """Columns padded to their widest cell and a dashed rule under the header, for a terminal.

    A table wider than `width` (default: the one `text_width` set; no limit without it) is printed
    in parts, one under the other, each with the first column (the row labels) and as many of the
    other columns as fit, as R and pandas print a wide table; a column wider than `width` on its
    own still gets a part of its own."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    width = width if width is not None else _TEXT_WIDTH.get()
    parts: list[list[int]] = [list(range(1, len(header)))]
    if width is not None and len(header) > 2 and sum(widths) + 2 * (len(widths) - 1) > width:
        parts = []
        for i in range(1, len(header)):
            if parts and widths[0] + sum(widths[j] + 2 for j in [*parts[-1], i]) <= width:
                parts[-1].append(i)
            else:
                parts.append([i])
    out: list[str] = []
    for part in parts:
        cols = [0, *part]
        if out:
            out.append("")
        out.append("  ".join(header[i].ljust(widths[i]) for i in cols).rstrip())
        out.append("  ".join("-" * widths[i] for i in cols))
        out += ["  ".join(r[i].ljust(widths[i]) for i in cols).rstrip() for r in rows]
    return out


__all__ = [
    "MINUS",
    "signed",
    "fmt_p",
    "bare_p",
    "fmt_interval",
    "seeds_text",
    "decimals_for",
    "fmt_mean_ci",
    "describe",
    "text_table",
    "text_width",
]
