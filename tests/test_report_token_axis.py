"""rankscope.report.token_axis: a token axis on a log scale that still shows token 0."""

from __future__ import annotations

import numpy as np

from rankscope.report.token_axis import tokens_axis, use_log_tokens


def test_log_token_axis_with_token_zero():
    import io

    from matplotlib.figure import Figure

    assert use_log_tokens([0, 16_384, 100_000_000]) and not use_log_tokens([0, 100_000, 1_000_000])
    fig = Figure()
    ax = fig.subplots()
    t = np.array([0, 16_384, 1e6, 1e8])
    ax.plot(t, [10, 8, 5, 3])
    assert tokens_axis(ax, t)
    assert ax.get_xscale() == "symlog"  # token 0 stays on the axis
    fig.savefig(io.BytesIO(), format="png")  # renders without error
    ax2 = Figure().subplots()
    assert tokens_axis(ax2, np.array([16_384, 1e8])) and ax2.get_xscale() == "log"
