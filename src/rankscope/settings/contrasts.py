"""Which arms a study compares: its contrasts, each a (treatment, control) pair of arms.

A study exists to answer a few comparisons (QK-Norm on vs off under the same optimizer, say), not
every pair of its arms. A study file may declare them (``contrasts = [["qk-norm", "no-norm"]]``);
when it does not, they are derived from the arms' settings: every pair of arms that differ in
exactly one setting, the arm whose value means "off" (none, off, false, 0), or else the arm
declared first, being the control; pairs that switch something off come first. Arms that differ
pairwise in more than one setting fall back to each arm against the first. The summary, the
terminal and the report lead with these pairs; the table of every pair stays below them.

Torch-free: the study reader and the report both use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

from ..errors import ConfigError
from .flat import flatten
from .rules import show_value

Contrast = tuple[str, str]  # (treatment, control): differences read treatment − control

# values that mean a feature is absent, as settings print them
OFF = ("none", "off", "false", "0", "0.0", "")
# the settings that describe an arm (a run's config.json holds other bookkeeping beside them)
SECTIONS = ("model.", "optim.", "train.", "probe.", "data.")


def text(value: Any) -> str:
    """A setting's value as it compares across arms (TOML booleans and JSON booleans alike)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def derive(settings: Mapping[str, Mapping[str, Any]]) -> list[Contrast]:
    """The contrasts of arms whose settings (a study's overrides, or whole run configs: only the
    SECTIONS keys count) are given in declared order."""
    arms = list(settings)
    flat = {a: {k: text(v) for k, v in flatten(dict(settings[a])).items() if k.startswith(SECTIONS)} for a in arms}
    out: list[Contrast] = []
    off_control: list[bool] = []
    for a, b in combinations(arms, 2):  # a declared before b
        keys = set(flat[a]) | set(flat[b])
        differ = [k for k in keys if flat[a].get(k) != flat[b].get(k)]
        if len(differ) != 1:
            continue
        va, vb = flat[a].get(differ[0]), flat[b].get(differ[0])
        b_off, a_off = vb is None or vb in OFF, va is None or va in OFF
        out.append((a, b) if b_off and not a_off else (b, a))  # control: the "off" arm, else the earlier
        off_control.append(a_off != b_off)
    # a feature on vs off first (QK-Norm on vs off under one optimizer), then changes of level
    out = [c for _, c in sorted(zip(off_control, out), key=lambda p: not p[0])]
    if not out and len(arms) > 1:
        out = [(a, arms[0]) for a in arms[1:]]
    return out


def check(raw: Any, arms: Sequence[str], where: str) -> list[Contrast]:
    """A study file's ``contrasts`` value: a list of [treatment, control] pairs of its arm names."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: contrasts must be a list of [treatment, control] arm pairs, got {show_value(raw)}")
    out: list[Contrast] = []
    for pair in raw:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise ConfigError(
                f"{where}: each contrast must be [treatment, control], two arm names; got {show_value(pair)}"
            )
        for name in pair:
            if name not in arms:
                raise ConfigError(
                    f"{where}: contrast {show_value(pair)} names arm {show_value(name)}, which the study does not have "
                    f"(arms: {', '.join(arms)})"
                )
        if pair[0] == pair[1]:
            raise ConfigError(f"{where}: contrast {show_value(pair)} compares an arm with itself")
        if tuple(pair) in out or (pair[1], pair[0]) in out:
            raise ConfigError(f"{where}: contrast {show_value(pair)} is listed twice")
        out.append((pair[0], pair[1]))
    return out


__all__ = ["Contrast", "OFF", "SECTIONS", "check", "derive", "text"]
