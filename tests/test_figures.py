"""The report's figures: chance and floor levels against their closed forms, the heatmaps' colour
limits, token tick labels, minimum y-spans, the rank scatter's words about what it leaves out, and
the HTML's display size of each figure."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.special import digamma

import rankscope.report.layer_plots as lp
from rankscope.report.band_panels import fit_to_lines
from rankscope.report.blocks import DISPLAY_DPI, Para, png_display_size, to_html
from rankscope.report.blocks import Figure as FigureBlock
from rankscope.report.curves import plot_downstream
from rankscope.report.heatmaps import colour_limits, plot_pr_heatmaps
from rankscope.report.layer_plots import DIAG_MAX_ARMS, diagnosis_groups
from rankscope.report.plotstyle import DPI, MAX_WIDTH_IN, min_span_limits, new_figure, save
from rankscope.report.quantities import (
    AT,
    PAST,
    SCALAR_QUANTITIES,
    WORSE,
    ChanceLevel,
    chance_level,
    chance_state,
    still_at_chance,
    uniform_induction_score,
)
from rankscope.report.rank_scatter import plot_rank_scatter
from rankscope.report.token_axis import tokens_axis
from rankscope.settings.units import fmt_count_ticks

CONFIGS = [{"model": {"vocab_size": 4096}, "train": {"seq_len": 128}}] * 2


# --- chance and floor levels ------------------------------------------------------------------------


def _harmonic(n: int) -> float:
    return float(digamma(n + 1) + np.euler_gamma)


@pytest.mark.parametrize("seq_len", [4, 5, 128, 2048])
def test_uniform_induction_score_is_the_harmonic_closed_form(seq_len):
    L = seq_len // 2
    # a query at position i (L <= i < 2L) gives its i + 1 keys 1/(i + 1) each: (H_2L - H_L) / L
    assert uniform_induction_score(seq_len) == pytest.approx((_harmonic(2 * L) - _harmonic(L)) / L, rel=1e-12)
    if L > 100:
        assert uniform_induction_score(seq_len) == pytest.approx(math.log(2) / L, rel=1 / L)


def test_chance_levels_of_the_downstream_measures():
    loss = chance_level("induction_loss", CONFIGS)
    assert loss.value == pytest.approx(math.log(4096)) and loss.kind == "chance" and not loss.rises
    assert "4096" in loss.label and loss.short == "chance\n8.32"
    for key in ("induction_score", "induction_max"):
        score = chance_level(key, CONFIGS)
        assert score.value == pytest.approx(uniform_induction_score(128)) and score.rises
    assert chance_level("icl_score", CONFIGS).value == 0.0
    floor = chance_level("k:functional_rank", CONFIGS)
    assert floor.value == 1.0 and floor.kind == "floor"
    assert chance_level("val_loss", CONFIGS) is None and chance_level("k:pr_sv", CONFIGS) is None


def test_chance_level_reads_a_study_and_needs_runs_that_agree():
    class Run:
        def __init__(self, config):
            self.config = config

    class Study:
        runs = [Run(c) for c in CONFIGS]

    assert chance_level("induction_loss", Study()).value == pytest.approx(math.log(4096))
    mixed = CONFIGS + [{"model": {"vocab_size": 49152}, "train": {"seq_len": 2048}}]
    assert chance_level("induction_loss", mixed) is None  # merged studies with two vocabularies
    assert chance_level("induction_score", mixed) is None
    assert chance_level("induction_loss", [{"model": {}}]) is None


def test_chance_state_says_what_the_curve_does():
    ln_v = math.log(4096)
    assert chance_state("induction_loss", [ln_v + 0.01, ln_v - 0.02], CONFIGS) == AT  # noise around it
    assert chance_state("induction_loss", [ln_v + 3.5, ln_v + 3.4], CONFIGS) == WORSE  # a loss above chance
    assert chance_state("induction_loss", [ln_v - 1.0, ln_v - 1.1], CONFIGS) == PAST
    chance = uniform_induction_score(128)
    assert chance_state("induction_score", [chance - 0.5 * chance], CONFIGS) == AT  # within its tolerance
    assert chance_state("icl_score", [0.15, 0.12, 0.18], CONFIGS) == WORSE  # context hurts: positive
    assert chance_state("icl_score", [-0.3], CONFIGS) == PAST
    assert chance_state("k:functional_rank", [1.0, 1.0], CONFIGS) == AT
    assert chance_state("val_loss", [8.3], CONFIGS) is None


def test_still_at_chance():
    ln_v = math.log(4096)
    assert still_at_chance("induction_loss", [ln_v + 0.01, ln_v - 0.02], CONFIGS)  # noise around chance
    assert still_at_chance("induction_loss", [ln_v + 0.5], CONFIGS)  # above chance: copying nothing
    assert not still_at_chance("induction_loss", [ln_v - 1.0, ln_v - 1.1], CONFIGS)  # learned to copy
    # within the seeds' spread: a mean 0.5 below chance with seeds 0.3 and 0.7 below... sd 0.28 < 0.5
    assert not still_at_chance("induction_loss", [ln_v - 0.3, ln_v - 0.7], CONFIGS)
    # ... but seeds at -1.5 and +0.5 (sd 1.41) have not left it
    assert still_at_chance("induction_loss", [ln_v - 1.5, ln_v + 0.5], CONFIGS)
    chance = uniform_induction_score(128)
    assert still_at_chance("induction_score", [chance * 1.5], CONFIGS)
    assert not still_at_chance("induction_score", [0.2, 0.25], CONFIGS)
    assert still_at_chance("icl_score", [0.009], CONFIGS) and not still_at_chance("icl_score", [-0.3], CONFIGS)
    assert still_at_chance("k:functional_rank", [1.0, 1.0, 1.0], CONFIGS)
    assert not still_at_chance("k:functional_rank", [1.0, 2.0], CONFIGS)  # one layer above the floor
    assert not still_at_chance("val_loss", [8.3], CONFIGS)  # no chance level: never "at chance"
    assert not still_at_chance("induction_loss", [float("nan")], CONFIGS)  # no value: no verdict
    assert isinstance(chance_level("induction_loss", CONFIGS), ChanceLevel)


# --- scales -----------------------------------------------------------------------------------------


def test_heatmap_colour_limits_leave_out_token_0():
    grid = pd.DataFrame(
        {
            "arm": ["a"] * 6 + ["b"] * 3,
            "layer": [0, 1, 0, 1, 0, 1, 0, 1, 0],
            "tokens": [0, 0, 100, 100, 200, 200, 0, 100, 200],
            "value": [60.0, 59.0, 30.0, 12.0, 25.0, 10.0, 61.0, 20.0, 18.0],
        }
    )
    assert colour_limits(grid) == (10.0, 30.0, True)
    only_start = grid[grid["tokens"] == 0]
    assert colour_limits(only_start) == (59.0, 61.0, False)  # nothing else to go by
    flat = grid.assign(value=5.0)
    assert colour_limits(flat) == (4.5, 5.5, True)


def test_heatmaps_side_by_side_say_token_0_is_clipped(tmp_path):
    rows = [
        {"arm": arm, "layer": layer, "tokens": t, "value": (60.0 if t == 0 else 20.0 + layer + t / 100)}
        for arm in ("a", "b", "c", "d")
        for layer in range(3)
        for t in (0, 100, 200, 300)
    ]
    plot = plot_pr_heatmaps(pd.DataFrame(rows), ["a", "b", "c", "d"], tmp_path / "h.png", n_seeds={"a": 1})
    assert plot is not None and plot.path.exists()
    assert "set by the eval points after token 0" in plot.caption
    assert "token 0) lies outside it" in plot.caption and "21–25" in plot.caption
    assert "one panel per arm" in plot.caption


def test_min_span_widens_a_near_constant_panel():
    lo, hi = min_span_limits(8.30, 8.32)
    assert hi - lo == pytest.approx(0.02 * 8.31) and (lo + hi) / 2 == pytest.approx(8.31)
    assert min_span_limits(1.0, 5.0) == (1.0, 5.0)  # a real change is left alone
    lo, hi = min_span_limits(0.010, 0.012, min_span=0.1, floor=0.0)
    assert lo == 0.0 and hi == pytest.approx(0.1)
    ax = Figure().subplots()
    stats = pd.DataFrame(
        {"arm": "a", "tokens": [0, 1, 2], "mean": [8.31, 8.312, 8.309], "lo": np.nan, "hi": np.nan, "n": 1}
    )
    fit_to_lines(ax, stats)
    lo, hi = ax.get_ylim()
    assert hi - lo >= 0.02 * 8.31  # 0.003 nats of noise does not fill the panel


# --- token ticks ------------------------------------------------------------------------------------


def test_token_ticks_have_no_spurious_digits():
    assert fmt_count_ticks([0, 50_000, 100_000, 150_000, 200_000]) == ["0", "50k", "100k", "150k", "200k"]
    assert fmt_count_ticks([0, 250_000, 500_000, 750_000, 1_000_000]) == ["0", "0.25M", "0.5M", "0.75M", "1M"]
    assert fmt_count_ticks([0, 500_000, 1_000_000, 1_500_000]) == ["0", "0.5M", "1M", "1.5M"]
    assert fmt_count_ticks([0, 10_000, 100_000, 1e6, 1e7], log=True) == ["0", "10k", "100k", "1M", "10M"]
    assert fmt_count_ticks([0, 2_000, 4_000]) == ["0", "2k", "4k"]


def _tick_labels(ax) -> list[str]:
    ax.figure.canvas.draw()
    lo, hi = ax.get_xlim()
    return [t.get_text() for t, x in zip(ax.get_xticklabels(), ax.get_xticks()) if lo <= x <= hi]


def test_a_token_axis_reads_in_round_counts():
    ax = Figure().subplots()
    t = np.linspace(0, 503_808, 24)  # a run that ended at 0.504M tokens
    ax.plot(t, np.ones_like(t))
    assert not tokens_axis(ax, t)
    labels = _tick_labels(ax)
    assert labels[0] == "0" and all(re.fullmatch(r"0|\d+k", s) for s in labels), labels
    assert "504k" not in labels and not any("M" in s for s in labels)
    ax = Figure().subplots()
    t = np.array([0, 16_384, 1e6, 1e8])
    ax.plot(t, [10, 8, 5, 3])
    assert tokens_axis(ax, t)
    assert _tick_labels(ax) == ["0", "100k", "1M", "10M", "100M"]  # no decade tick on top of the 0


# --- what the rank scatter says it leaves out ----------------------------------------------------------


def _scatter_frame(rising: bool) -> pd.DataFrame:
    rows = []
    for seed in (0, 1):
        for i, t in enumerate(range(100, 1300, 100)):
            u = i / 11
            loss = 8.3 + (1.2 * u**0.2 if rising else -6 * u**0.2) + 0.01 * seed
            rows.append({"arm": "a", "seed": seed, "tokens": t, "x": 40 - 10 * u + seed, "induction_loss": loss})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("rising,side,edge", [(False, "above", "top"), (True, "below", "bottom")])
def test_rank_scatter_caption_says_where_the_left_out_points_lie(tmp_path, rising, side, edge):
    q = SCALAR_QUANTITIES["induction_loss"]
    plot = plot_rank_scatter(_scatter_frame(rising), [q], ["a"], {"a": "C0"}, tmp_path / "s.png")
    assert f"earlier points lie {side} its {edge} edge" in plot.caption
    other = "below" if side == "above" else "above"
    assert f"lie {other}" not in plot.caption


# --- figure sizes in the HTML -----------------------------------------------------------------------


def test_html_shows_each_figure_at_its_natural_size(tmp_path):
    wide, small = new_figure(20, 3), new_figure(5, 2)
    for fig in (wide, small):
        fig.subplots().plot([0, 1], [0, 1])
    assert tuple(wide.get_size_inches()) == (MAX_WIDTH_IN, 3)  # never wider than the text column
    save(wide, tmp_path / "wide.png")
    save(small, tmp_path / "small.png")
    assert png_display_size(tmp_path / "small.png") == (5 * DISPLAY_DPI, 2 * DISPLAY_DPI)
    assert DPI == 2 * DISPLAY_DPI
    page = to_html(
        [FigureBlock(tmp_path / "wide.png", "wide"), FigureBlock(tmp_path / "small.png", "small"), Para("x")], "t"
    )
    sizes = re.findall(r'<img src="data:image/png;base64,[^"]+" width="(\d+)" height="(\d+)"', page)
    assert sizes == [(str(round(MAX_WIDTH_IN * DISPLAY_DPI)), str(3 * DISPLAY_DPI)), ("400", "160")]
    assert "max-height" not in page  # no figure is shrunk to the window's height
    (tmp_path / "not.png").write_bytes(b"not a png")
    assert png_display_size(tmp_path / "not.png") is None


def test_diagnosis_arms_are_grouped_to_fit_the_page():
    assert [list(g) for g in diagnosis_groups(3, 8)] == [[0, 1, 2]]
    groups = diagnosis_groups(6, 8)
    assert [i for g in groups for i in g] == list(range(6)) and all(len(g) <= DIAG_MAX_ARMS for g in groups)
    assert max(len(g) for g in diagnosis_groups(4, 40)) < 4  # deep models: fewer arms per figure


def test_downstream_draws_chance_and_names_the_arms_still_at_it(tmp_path):
    q = SCALAR_QUANTITIES["induction_loss"]
    ln_v = math.log(4096)
    tokens = [0, 100, 200, 300]
    stats = pd.DataFrame(
        [
            {"arm": arm, "tokens": t, "mean": m, "lo": np.nan, "hi": np.nan, "n": 1}
            for arm, means in (("flat", [ln_v, ln_v + 0.3, ln_v + 0.5, ln_v + 0.6]), ("copies", [ln_v, 6.0, 4.0, 2.0]))
            for t, m in zip(tokens, means)
        ]
    )
    level = chance_level("induction_loss", CONFIGS)
    arms = ["flat", "copies"]
    states = {a: chance_state(q.key, [stats[stats["arm"] == a]["mean"].iloc[-1]], CONFIGS) for a in arms}
    assert states == {"flat": WORSE, "copies": PAST}  # the flat arm's loss climbed above chance
    plot = plot_downstream(
        [(q, stats)],
        arms,
        {"flat": "C0", "copies": "C1"},
        tmp_path / "d.png",
        chance={q.key: level},
        at_chance={q.key: {"flat": WORSE}},
    )
    assert "induction loss: chance ln 4096 = 8.32" in plot.caption
    assert "not past chance at the end (induction loss worse than chance: flat)" in plot.caption
    assert "predicts its own corpus's tokens on the repeated random tokens" in plot.caption  # what worse means
    plain = plot_downstream([(q, stats)], arms, {"flat": "C0", "copies": "C1"}, tmp_path / "e.png")
    assert "chance" not in plain.caption  # no level given: none drawn, none claimed


def test_titles_break_between_phrases():
    from rankscope.report.heatmaps import wrap_phrases

    text = "Key participation ratio per head (pr_sv of keys after QK-Norm and RoPE; 1 = one direction, 64 = all 64)"
    lines = wrap_phrases(text, 60).splitlines()
    assert all(len(ln) <= 60 for ln in lines) and " ".join(lines) == text
    # a break never falls inside "keys after QK-Norm" or "one direction": only after , ; : or before (
    assert lines == [
        "Key participation ratio per head",
        "(pr_sv of keys after QK-Norm and RoPE; 1 = one direction,",
        "64 = all 64)",
    ]


def test_layer_bar_labels_stay_inside_their_panel(tmp_path, monkeypatch):
    """Two seeds give whiskers of t = 12.7 standard errors, far past the panel's top: each bar's value
    label must still sit inside the panel (above its whisker where there is room, else on the bar),
    never up in the title."""

    drawn = {}
    monkeypatch.setattr(lp, "save", lambda fig, path: drawn.setdefault("fig", fig))
    rows = []
    for arm, wide in (("a", True), ("b", False)):
        for layer in range(16):
            m = 36.0 + (layer % 3)
            half = (40.0 if layer % 2 else 6.0) if wide else 0.0
            rows.append((arm, layer, m, m - half, m + half, 2 if wide else 1, 2_000_000))
    bars = pd.DataFrame(rows, columns=["arm", "layer", "mean", "lo", "hi", "n", "tokens"])
    lp.plot_layer_pr(bars, ["a", "b"], {"a": "C0", "b": "C1"}, tmp_path / "x.png", ymax=70.0, head_dim=64)
    fig = drawn["fig"]
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    ax = fig.axes[0]
    top = ax.get_window_extent().y1
    labels = [t for t in ax.texts if re.fullmatch(r"\d+", t.get_text())]
    assert len(labels) == 32
    for t in labels:
        assert t.get_window_extent(canvas.get_renderer()).y1 <= top + 1, t.get_text()
