"""rankscope.report.series: the mean over heads then layers of a probe table, and the value at N
tokens under each of its three rules."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from rankscope.report import head_layer_mean
from rankscope.report.series import INTERPOLATE, LATEST, NEAREST, runs_at, seed_values


def test_mean_over_heads_then_layers(tmp_path):
    rows = []
    # layer 0: heads 10, 20 -> 15; layer 1: head 0 = 60, head 1 undefined -> 60; mean 37.5 (a grand mean gives 30)
    for head, v in [(0, 10.0), (1, 20.0)]:
        rows.append({"layer": 0, "head": head, "value": v})
    rows += [{"layer": 1, "head": 0, "value": 60.0}, {"layer": 1, "head": 1, "value": float("nan")}]
    probes = pd.DataFrame(
        [{"arm": "a", "seed": 0, "step": 1, "tokens": 100, "site": "k", "metric": "pr_sv", **r} for r in rows]
    )
    # a torn write at tokens=200: only layer 0 made it to disk -> that point is dropped, not half-averaged
    probes = pd.concat(
        [
            probes,
            pd.DataFrame(
                [
                    {
                        "arm": "a",
                        "seed": 0,
                        "step": 2,
                        "tokens": 200,
                        "site": "k",
                        "metric": "pr_sv",
                        "layer": 0,
                        "head": h,
                        "value": 1.0,
                    }
                    for h in (0, 1)
                ]
            ),
        ],
        ignore_index=True,
    )
    out = head_layer_mean(probes)
    assert out["tokens"].tolist() == [100]
    assert out["value"].iloc[0] == pytest.approx(37.5)


def test_value_at_n_tokens_three_rules():
    """One function reads "the value at N tokens"; the rules differ only where a run's grid lacks N."""
    series = pd.DataFrame(
        {
            "arm": "a",
            "seed": [0, 0, 0, 1, 1],
            "tokens": [0, 100, 400, 0, 200],
            "value": [9.0, 5.0, 3.0, 8.0, float("nan")],
        }
    )

    def used(n: int, rule: str) -> dict[int, int]:
        rows = runs_at(series, n, rule)
        return dict(zip(rows["seed"].tolist(), rows["tokens"].tolist()))

    # every rule takes a run's own point at N; seed 1 lacks 100 (a tie between 0 and 200: the earlier)
    assert used(100, NEAREST) == {0: 100, 1: 0} and used(100, LATEST) == {0: 100, 1: 0}
    assert used(100, INTERPOLATE) == {0: 100}  # seed 1's positive points start at 200: 100 is outside them
    # N = 300 lies between seed 0's points 100 and 400, and past seed 1's last point
    assert used(300, NEAREST) == {0: 400}  # the nearer point, never one the run has not reached
    assert used(300, LATEST) == {0: 100, 1: 200}  # the last point by then
    interp = runs_at(series, 300, INTERPOLATE)
    w = math.log(300 / 100) / math.log(400 / 100)
    assert interp["value"].tolist() == [pytest.approx(5.0 + w * (3.0 - 5.0))] and interp["interpolated"].all()
    assert used(50, LATEST) == {0: 0, 1: 0} and used(500, NEAREST) == {}
    # probe rows (several per eval point) come back whole, in their order
    rows = pd.concat([series.assign(layer=0), series.assign(layer=1)], ignore_index=True)
    assert runs_at(rows, 300, LATEST).index.tolist() == [1, 4, 6, 9]
    # the tables' cells: NEAREST, finite values only (seed 1's nearest point, 200, is NaN: it drops out)
    assert seed_values(series, "a", 150) == {0: (5.0, 100)}
    with pytest.raises(ValueError):
        runs_at(series, 100, "closest")
