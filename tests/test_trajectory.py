"""A contrast over training: paired differences at every eval point, against scipy's paired t."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from _studies import make_realistic_study, make_study
from matplotlib.backends.backend_agg import FigureCanvasAgg
from scipy import stats as sps

from rankscope.report import write_report
from rankscope.report.plotstyle import new_figure
from rankscope.report.token_axis import tokens_axis
from rankscope.report.trajectory import contrast_trajectory, describe, sign_changes, steps_axis

SEEDS, TOKENS = (0, 1, 2, 3), (0, 1000, 2000, 4000, 8000)


def gap(t: int) -> float:
    """A treatment lead that opens, then closes and flips: +2 at 1000 tokens, -2 at 8000."""
    return {0: 0.0, 1000: 2.0, 2000: 1.0, 4000: -0.5, 8000: -2.0}[t]


def series() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for s in SEEDS:
        for t in TOKENS:
            base = 40 + s + rng.normal()
            rows.append(("b", s, t, base))
            rows.append(("a", s, t, base + gap(t) + 0.3 * rng.normal()))
    return pd.DataFrame(rows, columns=["arm", "seed", "tokens", "value"])


def test_every_point_is_the_paired_t_over_seeds():
    s = series()
    x = contrast_trajectory(s, "a", "b")
    assert x["tokens"].tolist() == list(TOKENS)
    for _, row in x.iterrows():
        at = s[s["tokens"] == row["tokens"]].pivot(index="seed", columns="arm", values="value")
        d = (at["a"] - at["b"]).to_numpy()
        half = sps.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
        assert row["mean"] == pytest.approx(d.mean())
        assert (row["lo"], row["hi"]) == pytest.approx((d.mean() - half, d.mean() + half))
        assert row["p"] == pytest.approx(sps.ttest_rel(at["a"], at["b"]).pvalue)
        assert row["n"] == len(SEEDS)


def test_sign_changes_and_words():
    x = contrast_trajectory(series(), "a", "b")
    assert sign_changes(x) == [(2000, 4000)]
    text = describe(x, "a", "b", "mean key PR", 1)
    assert text.startswith("Mean key PR, a − b: 2.")  # the first trained point, not token 0
    assert "its sign changes between 2k and 4k tokens" in text
    # a zero mean is no sign: +, 0, − changes once, between the + and the −
    flat = pd.DataFrame({"tokens": [1, 2, 3], "mean": [1.0, 0.0, -1.0]})
    assert sign_changes(flat) == [(1, 3)]


def test_only_points_both_arms_reached_and_seeds_they_share():
    s = series()
    s = s[~((s["arm"] == "a") & (s["tokens"] == 8000))]  # the treatment stopped early
    s = s[~((s["arm"] == "b") & (s["seed"] == 3))]  # and the control lacks a seed
    x = contrast_trajectory(s, "a", "b")
    assert x["tokens"].tolist() == [0, 1000, 2000, 4000]
    assert (x["n"] == 3).all()


def test_report_follows_each_contrast_over_training(tmp_path):
    root = make_study(tmp_path / "s", {"qk": "qk", "none": "none"}, [0, 1])
    write_report(root, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    section = md.split("## The contrasts over training")[1].split("\n## ")[0]
    # _studies.pr: qk − none = 10 − 20 in every seed and at every point
    same = "(same in every seed)"
    assert f"Mean key PR, qk − none: −10.00 {same} at 100 tokens, −10.00 {same} at 400; its sign never" in section
    table = [ln for ln in section.splitlines() if ln.startswith("| ") and "tokens" not in ln and "---" not in ln]
    assert len(table) == 5  # one row per eval point
    assert "](plots/contrasts.png)" in section


def test_an_effect_beyond_noise_never_prints_as_zero():
    from rankscope.report.format import describe as describe_diff
    from rankscope.report.format import fmt_difference, resolving_decimals
    from rankscope.report.stats import paired_difference

    # an effect of −0.0004 with an interval [−0.0006, −0.0002]: at 3 decimals it would read 0.000 [−0.001, 0.000]
    d = paired_difference({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.0004, 1: 2.0005, 2: 3.0003})
    assert d.resolved
    text = describe_diff(d, 3)
    assert text.startswith("a − b: −0.0004 [−0.0006, −0.0002], p = 0.02") and "beyond seed noise" in text
    assert resolving_decimals(3, 0.5, -0.1, 1.1) == 3  # an interval across 0 keeps its decimals
    assert fmt_difference(-0.0004, -0.0006, -0.0002, 3) == "−0.0004 [−0.0006, −0.0002]"
    assert fmt_difference(2.0, float("nan"), float("nan"), 1) == "2.0"


@pytest.mark.slow
def test_the_seeds_comparison_at_another_scale_is_set_against_its_headline(tmp_path):
    root = make_realistic_study(tmp_path / "s", seeds=(0, 1), n_layer=2, n_head=2, n_points=4)
    summary = write_report(root).read_text().split("## Summary")[1].split("\n## ")[0]
    # the synthetic study's key PR ends near 36 (qk-norm) and 48 (no-norm), minus its seed effects
    assert (
        "The seed saw QK-Norm lower mean key PR (43.5 vs 46.8 at 16M tokens, 1,953 steps, on 89M parameters); "
        "here **qk-norm** is lower than **no-norm** by "
    ) in summary
    assert "The two can differ by scale (width, depth), training length" in summary
    plain = make_study(tmp_path / "p", {"a": "qk", "b": "qk"}, [0])  # no arm without QK-Norm: no headline
    assert "The seed saw" not in write_report(plain).read_text()


@pytest.mark.parametrize(
    "tokens",
    [
        (0, 4096, 8192, 40960, 409_600, 8_000_000),  # log schedule from token 0: symlog
        (4096, 8192, 40960, 409_600, 8_000_000),  # log without token 0
        (0, 204_800, 409_600, 1_003_520),  # linear
    ],
    ids=["symlog", "log", "linear"],
)
def test_each_step_tick_sits_over_its_tokens(tokens):
    """The top axis's label for N steps is drawn where the bottom axis has N x tokens_per_step tokens,
    whatever the bottom axis's scale (a secondary axis once placed them linearly under symlog)."""
    per_step = 4096
    t = np.array(tokens, dtype=float)
    fig = new_figure(6, 3)
    ax = fig.subplots()
    ax.plot(t, np.zeros_like(t))
    log = tokens_axis(ax, t)
    steps_axis(ax, per_step, log, float(t[t > 0].min()))
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    top = ([a for a in fig.axes if a is not ax] + list(ax.child_axes))[0]  # a twin, or a secondary axis
    labels = [lab for lab in top.xaxis.get_ticklabels() if lab.get_visible() and lab.get_text()]
    assert len(labels) >= 4
    for lab in labels:
        box = lab.get_window_extent(canvas.get_renderer())
        at = ax.transData.transform((int(lab.get_text().replace(",", "")) * per_step, 0.0))[0]
        assert (box.x0 + box.x1) / 2 == pytest.approx(at, abs=1.0), lab.get_text()
