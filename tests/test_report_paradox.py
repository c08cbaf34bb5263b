"""rankscope.report.paradox: the paradox table's eval points, means over seeds, intervals, best arm
and its seed-by-seed lead, on hand-built studies whose answers are known in closed form
(`_studies.make_study`), and the table as text for a terminal and as markdown."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from _studies import LOSS_OFFSET, add_run, assert_png, frames, make_study
from scipy import stats as sps

from rankscope.report import format_table, paradox_table, paradox_text, write_report
from rankscope.report.paradox import BETTER
from rankscope.report.stats import PAIRED_CONSTANT


def test_paradox_table_points_means_and_verdict(tmp_path):
    scalars, probes, _ = frames(make_study(tmp_path / "s", {"qk": "qk", "none": "none"}, [0, 1]))
    table = paradox_table(scalars, probes, arms=["none", "qk"])

    # END = 400 (last point), MIDDLE = the point closest to 400 / 2 = 200
    assert list(table.index) == ["val loss @ 200", "mean key PR @ 200", "val loss @ 400", "mean key PR @ 400"]
    seed_mean = 0.5  # mean of seeds 0 and 1
    for t in (200, 400):
        assert table.loc[f"val loss @ {t}", ("qk", "mean")] == pytest.approx(5 - t / 1000 + 0.02 * seed_mean)
        assert table.loc[f"val loss @ {t}", ("none", "mean")] == pytest.approx(5 - t / 1000 + 0.05 + 0.02 * seed_mean)
        # heads 0,1 -> +0.5; layers 0,1 -> +1.0 (2 * mean layer); seeds -> +0.5
        assert table.loc[f"mean key PR @ {t}", ("qk", "mean")] == pytest.approx(10 + 1 + 0.5 + seed_mean - t / 100)
        assert table.loc[f"mean key PR @ {t}", ("none", "mean")] == pytest.approx(20 + 1 + 0.5 + seed_mean - t / 100)
        assert table.loc[f"val loss @ {t}", ("qk", "tokens")] == t

    # lower loss wins, higher PR wins; every seed shifts by the same amount, so the lead is exact
    assert table.loc["val loss @ 400", (BETTER, "arm")] == "qk"
    assert table.loc["mean key PR @ 400", (BETTER, "arm")] == "none"
    assert table.loc["val loss @ 400", (BETTER, "margin")] == pytest.approx(0.05)
    assert table.loc["mean key PR @ 400", (BETTER, "margin")] == pytest.approx(10.0)
    assert table.loc["val loss @ 400", (BETTER, "test")] == PAIRED_CONSTANT
    assert table.loc["val loss @ 400", (BETTER, "resolved")]
    # the per-arm cells: t interval over two seeds of 0.02 * seed -> mean ± t(0.975, 1) * sd / sqrt(2)
    sd = np.std([0.0, 0.02], ddof=1)
    half = sps.t.ppf(0.975, 1) * sd / math.sqrt(2)
    assert table.loc["val loss @ 400", ("qk", "sd")] == pytest.approx(sd)
    row = table.loc["val loss @ 400"]
    assert row[("qk", "hi")] - row[("qk", "mean")] == pytest.approx(half)
    assert (table.xs("n", axis=1, level=1).drop(columns=BETTER) == 2).all().all()
    # each arm minus the first, seed by seed
    (diff,) = table.attrs["diffs"]["val loss @ 400"]
    assert (diff.a, diff.b, diff.n) == ("qk", "none", 2) and diff.mean == pytest.approx(-0.05)
    text = format_table(table, "text")
    assert "qk − none: −0.050 [−0.050, −0.050] (2 seeds, the same in each): qk lower by the same amount" in text


def test_paradox_words_when_noise_covers_zero(tmp_path):
    """Seeds whose arm difference flips sign: the table must say it cannot tell them apart."""
    root = tmp_path / "s"
    make_study(root, {"a": "qk", "b": "qk"}, [], name="noisy")
    noise = {("a", 0): 0.01, ("a", 1): -0.02, ("a", 2): 0.015, ("b", 0): -0.01, ("b", 1): 0.01, ("b", 2): -0.004}
    for (arm, seed), eps in noise.items():
        rd = add_run(root, arm, "qk", seed)
        df = pd.read_csv(rd / "scalars.csv")
        df["val_loss"] += eps
        df.to_csv(rd / "scalars.csv", index=False)
    text = paradox_text(root)
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("val loss @ 400") and "−" in ln and ":" in ln)
    assert "b − a:" in line and "(3 seeds): not distinguishable from seed noise" in line
    table_line = next(ln for ln in text.splitlines() if ln.startswith("val loss @ 400"))
    assert "(*)" in table_line and not table_line.rstrip().endswith(" *")  # best mean, but not a win
    assert "up to 3 seeds per arm" in text.splitlines()[0]


def test_single_seed_says_no_interval(tmp_path):
    root = make_study(tmp_path / "s", {"qk": "qk", "none": "none"}, [0])
    scalars, probes, study = frames(root)
    table = paradox_table(scalars, probes, arms=study.arms)
    assert table[("qk", "lo")].isna().all()
    text = paradox_text(root)
    assert "one seed per arm: no interval is possible" in text
    assert "(1 seed: no interval possible)" in text
    assert "[" not in text.splitlines()[4]  # the cells are bare values, no interval brackets


def test_one_seed_lead_has_no_interval_header_and_a_printed_tie_marks_no_arm(tmp_path, monkeypatch):
    root = make_study(tmp_path / "s", {"qk": "qk", "none": "none"}, [0])
    header = paradox_text(root).splitlines()[2]
    assert "lead of best (1 seed)" in header and "[95% CI]" not in header
    # the two arms' losses 0.0004 apart: 4.2334 vs 4.2338 both print as 4.233 at three decimals
    monkeypatch.setitem(LOSS_OFFSET, "none", 0.0004)
    tied = make_study(tmp_path / "t", {"qk": "qk", "none": "none"}, [0])
    line = next(ln for ln in paradox_text(tied).splitlines() if ln.startswith("val loss @ 400"))
    assert "tie (0.000)" in line and "(*)" not in line and "*" not in line.replace("(*)", "")


def test_middle_point_is_closest_to_half_of_the_shared_end(tmp_path):
    # eval points 0, 150, 300, 450, 600; one arm stops at 450, so MIDDLE is the point closest to
    # 450 / 2 = 225: a tie between 150 and 300, which goes to the later point
    toks = [0, 150, 300, 450, 600]
    root = make_study(tmp_path / "s", {"qk": "qk"}, [0], tokens=toks)
    add_run(root, "none", "none", 0, tokens=toks[:4], done=False)
    scalars, probes, study = frames(root)
    table = paradox_table(scalars, probes, finished=study.finished)
    assert table.loc["val loss @ 300", ("qk", "tokens")] == 300
    # END differs between arms (600 vs 450): labelled "@ end", no verdict, no comparison
    assert table.loc["val loss @ end", ("qk", "tokens")] == 600
    assert table.loc["val loss @ end", ("none", "tokens")] == 450
    assert pd.isna(table.loc["val loss @ end", (BETTER, "arm")])
    assert table.attrs["diffs"]["val loss @ end"] == []
    assert "not comparable" in format_table(table, "text")


def test_three_arms_two_seeds(tmp_path):
    arms = {"qk": "qk", "frozen": "frozen", "none": "none"}
    root = make_study(tmp_path / "s", arms, [0, 1])
    scalars, probes, study = frames(root)
    table = paradox_table(scalars, probes, arms=study.arms)
    # study.json is written with sorted keys, so the study's arm order is alphabetical
    assert study.arms == ["frozen", "none", "qk"]
    assert [a for a in dict.fromkeys(table.columns.get_level_values(0)) if a != BETTER] == study.arms
    assert table.loc["val loss @ 400", (BETTER, "arm")] == "qk"
    assert table.loc["val loss @ 400", (BETTER, "margin")] == pytest.approx(0.03)  # qk vs frozen
    assert table.loc["mean key PR @ 400", (BETTER, "arm")] == "none"
    assert table.loc["mean key PR @ 400", (BETTER, "margin")] == pytest.approx(5.0)  # none vs frozen
    assert [(d.a, d.b) for d in table.attrs["diffs"]["val loss @ 400"]] == [("none", "frozen"), ("qk", "frozen")]

    text = paradox_text(root)
    row = next(line for line in text.splitlines() if line.startswith("val loss @ 400"))
    marked = [c.strip() for c in row.split("  ") if c.strip().endswith(" *")]
    assert len(marked) == 1 and marked[0].startswith(f"{5 - 0.4 + 0.01:.3f} [")  # qk's cell, the last arm
    md = format_table(table, "markdown")
    assert md.split("\n\n")[0].count("✅") == 4  # one per row: every lead is an exact shift
    path = write_report(root)
    assert_png(root / "plots" / "layer_pr_arms.png")
    assert_png(root / "plots" / "pr_heatmap_arms.png")
    md = path.read_text()
    assert "## Every pair of arms, seed by seed" in md and "Holm" in md  # three arms: every pair
