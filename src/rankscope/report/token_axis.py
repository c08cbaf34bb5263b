"""Token axes of the figures over training: linear, or a log scale when the eval points span more
than two decades (log-spaced schedules, 100M+ token runs); token 0, which a log axis cannot show,
keeps a short linear stretch at the left (matplotlib's symlog with its linear threshold at the
first positive eval point). Their ticks are round counts (0, 50k, 100k; 0, 10k, 1M), see
`plotstyle.TokenFormatter`; `log_axis_clause` says so in a caption.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

from .plotstyle import TokenFormatter, token_locator

LOG_DECADES = 2.0  # eval points spanning more than this many decades get a log token axis


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
    """Caption words for a logarithmic token axis (and the linear stretch that holds token 0)."""
    if not log:
        return ""
    return "; token axis logarithmic (eval points span more than two decades)" + (
        "; token 0 sits on a short linear stretch at the left" if zero else ""
    )
