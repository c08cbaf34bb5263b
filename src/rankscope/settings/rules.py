"""What a setting accepts, beside its type: a `Range` of numbers, a `Match` pattern for strings, or
`Distinct` items for lists; each checks a value and says in one line what is allowed. Torch-free.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError


def show_bound(v: float) -> str:
    """A range's end as people read it: 1,024, 0.5, 2^63 - 1."""
    if isinstance(v, int):
        if v >= 2**31 and (v + 1) & v == 0:
            return f"2^{v.bit_length()} - 1"
        return f"{v:,}"
    return f"{v:g}"


def show_value(value: Any) -> str:
    """A value for a one-line message: its repr, shortened; never an error of its own (an int of
    more than 4,300 digits has no repr, a deeply nested list overflows the recursion limit)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 100:
        return f"an integer of {int(value.bit_length() * math.log10(2)) + 1} digits"
    try:
        text = repr(value)
    except Exception:  # any repr failure: name the type instead
        text = f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class Range:
    """The numbers a setting accepts: lo..hi, either end open; NaN and infinities never pass.
    `why` is shown with the range when it is not obvious where a limit comes from."""

    lo: float
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""

    def describe(self, typ: type) -> str:
        if typ is int:
            text = f"an integer from {show_bound(self.lo)} to {show_bound(self.hi)}"
        else:
            low = f"{'>' if self.lo_open else '>='} {show_bound(self.lo)}"
            if math.isinf(self.hi):
                text = f"a finite number {low}"
            else:
                text = f"a number {low} and {'<' if self.hi_open else '<='} {show_bound(self.hi)}"
        return f"{text} ({self.why})" if self.why else text

    def check(self, key: str, value: Any, given: Any) -> None:
        ok = not (isinstance(value, float) and not math.isfinite(value))
        ok = ok and (value > self.lo if self.lo_open else value >= self.lo)
        ok = ok and (value < self.hi if self.hi_open else value <= self.hi)
        if not ok:
            raise ConfigError(f"{key} must be {self.describe(type(value))}, got {show_value(given)}")


@dataclass(frozen=True)
class Match:
    """The strings a setting accepts: those `pattern` matches whole, described as `what`."""

    pattern: str
    what: str

    def check(self, key: str, value: str, given: Any) -> None:
        if re.fullmatch(self.pattern, value) is None:
            raise ConfigError(f"{key} must be {self.what}, got {show_value(given)}")


@dataclass(frozen=True)
class Distinct:
    """A list setting that names each item at most once (a site probed twice writes every row twice)."""

    def check(self, key: str, value: tuple, given: Any) -> None:
        twice = next((v for i, v in enumerate(value) if v in value[:i]), None)
        if twice is not None:
            raise ConfigError(f"{key} lists {twice} twice; list each once")
