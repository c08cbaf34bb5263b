"""rankscope.report against hand-built study folders whose answers are known in closed form, and
its statistics against textbook examples.

The simple synthetic values (`make_study`):
    val loss(arm, seed, t) = 5 - t/1000 + LOSS_OFFSET[arm] + 0.02 * seed
    PR(arm, seed, layer, head, t) = PR_BASE[arm] + 2 * layer + head + seed - t/100
so with 2 layers x 2 heads the mean over heads then layers is PR_BASE + 1 + 0.5 + seed - t/100, and
every difference between two arms is the same in every seed (a constant shift: zero-width paired
intervals). `make_realistic_study` writes a study with every metric the trainer records, log-spaced
eval points from 0 and seed noise; it also builds the demo study looked at by hand.
"""

from __future__ import annotations

import dataclasses
import html.parser
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from rankscope.report import (
    correlate,
    correlation_table,
    format_table,
    head_layer_mean,
    load_study,
    paired_difference,
    paradox_table,
    paradox_text,
    t_interval,
    write_report,
)
from rankscope.report.curves import tokens_axis, use_log_tokens
from rankscope.report.doc import inline_html
from rankscope.report.format import describe
from rankscope.report.paradox import BETTER
from rankscope.report.plotstyle import safe_names
from rankscope.report.seedcompare import arm_kind, seed_reference
from rankscope.report.series import INTERPOLATE, LATEST, NEAREST, runs_at, seed_values
from rankscope.report.stats import PAIRED_CONSTANT, SINGLE, WELCH, holm, t_quantile
from rankscope.storage.store import PROBE_COLUMNS, SCALAR_COLUMNS, RunStore, TableWriter, run_dir, write_record

LOSS_OFFSET = {"qk": 0.0, "none": 0.05, "frozen": 0.03}
PR_BASE = {"qk": 10.0, "none": 20.0, "frozen": 15.0}
TOKENS = [0, 100, 200, 300, 400]
N_LAYER, N_HEAD, HEAD_DIM = 2, 2, 8
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def loss(arm: str, seed: int, t: int) -> float:
    return 5 - t / 1000 + LOSS_OFFSET[arm] + 0.02 * seed


def pr(arm: str, seed: int, layer: int, head: int, t: int) -> float:
    return PR_BASE[arm] + 2 * layer + head + seed - t / 100


def make_study(
    root: Path,
    arms: dict[str, str],
    seeds: list[int],
    *,
    tokens=TOKENS,
    done=True,
    probes=True,
    name="demo",
    planned_seeds: list[int] | None = None,
) -> Path:
    """A study folder; `arms` maps the arm name written on disk to its value family in LOSS/PR."""
    root.mkdir(parents=True, exist_ok=True)
    write_record(
        root / "study.json",
        {
            "name": name,
            "preset": "tiny",
            "tokens": 400,
            "seeds": planned_seeds or seeds,
            "arms": {a: {"model.qk_norm": fam} for a, fam in arms.items()},
            "description": "hand-built test study",
        },
    )
    for arm, fam in arms.items():
        for seed in seeds:
            add_run(root, arm, fam, seed, tokens=tokens, done=done, probes=probes)
    return root


def add_run(
    root: Path, arm: str, fam: str, seed: int, *, tokens=TOKENS, done=True, probes=True, diverge_at: int | None = None
) -> Path:
    rd = run_dir(root, arm, seed)
    store = RunStore(rd)
    write_record(
        rd / "config.json",
        {
            "arm": arm,
            "seed": seed,
            "model": {
                "n_layer": N_LAYER,
                "n_head": N_HEAD,
                "n_kv_head": N_HEAD,
                "head_dim": HEAD_DIM,
                "d_model": 16,
                "qk_norm": fam,
                "vocab_size": 64,
            },
            "optim": {"name": "muon"},
            "train": {"tokens": 400, "batch_size": 2, "seq_len": 8},
            "probe": {"sites": ["k"]},
        },
    )
    for i, t in enumerate(tokens):
        bad = diverge_at is not None and t >= diverge_at
        v = float("nan") if bad else loss(fam, seed, t)
        store.scalars.append(
            [
                {
                    "arm": arm,
                    "seed": seed,
                    "step": i,
                    "tokens": t,
                    "train_loss": v,
                    "val_loss": v,
                    "ood_loss": "",
                    "lr_scale": 1.0,
                    "grad_norm": 1.0,
                    "elapsed_s": float(i),
                    "probe_s": 0.0,
                }
            ]
        )
        if probes:
            store.probes.append(
                [
                    {
                        "arm": arm,
                        "seed": seed,
                        "step": i,
                        "tokens": t,
                        "layer": layer,
                        "head": head,
                        "site": "k",
                        "metric": "pr_sv",
                        "value": float("nan") if bad else pr(fam, seed, layer, head, t),
                    }
                    for layer in range(N_LAYER)
                    for head in range(N_HEAD)
                ]
            )
        if bad:
            break
    if diverge_at is not None:
        store.close()
        message = f"run {arm} seed {seed} diverged at {diverge_at:,} tokens: val_loss is nan"
        write_record(rd / "done.json", {"status": "diverged", "arm": arm, "seed": seed, "message": message})
    elif done:
        store.finish({"tokens": tokens[-1]})
    else:
        store.close()
    return rd


def frames(study: Path):
    s = load_study(study)
    return s.scalars, s.probes, s


# --- statistics against textbook examples ---------------------------------------------------------

# Student's sleep data (Cushny & Peebles 1905, analysed by "Student" 1908; R's `sleep` data set):
# extra hours of sleep for 10 patients under two drugs. R's `t.test(extra ~ group, data = sleep,
# paired = TRUE)` prints t = -4.0621, df = 9, p-value = 0.002833, 95% CI -2.4598858 -0.7001142,
# mean difference -1.58 (group 1 minus group 2; we take drug 2 minus drug 1, so the signs flip).
SLEEP_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
SLEEP_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def test_paired_difference_matches_students_sleep_data():
    d = paired_difference(dict(enumerate(SLEEP_2)), dict(enumerate(SLEEP_1)), names=("drug 2", "drug 1"))
    assert d.test == "paired t" and d.n == 10
    assert d.mean == pytest.approx(1.58)
    assert d.lo == pytest.approx(0.7001142, abs=1e-6) and d.hi == pytest.approx(2.4598858, abs=1e-6)
    assert d.p == pytest.approx(0.002833, abs=1e-6)
    # n >= 6: the Wilcoxon signed-rank check too. One difference is 0 (dropped), the other 9 are all
    # positive, so the exact two-sided p is 2 / 2^9.
    assert d.p_wilcoxon == pytest.approx(2 / 2**9)
    assert d.resolved and "drug 2 higher, beyond seed noise" in describe(d, 2)
    # the one-sample interval of the differences is the same interval
    iv = t_interval(np.subtract(SLEEP_2, SLEEP_1))
    assert (iv.lo, iv.hi, iv.n) == (pytest.approx(d.lo), pytest.approx(d.hi), 10)
    assert iv.sd == pytest.approx(1.2299955, abs=1e-6)  # R: sd(sleep differences)


def test_t_interval_by_hand():
    # values 1, 2, 3, 4: mean 2.5, sd sqrt(5/3), t(0.975, 3) = 3.182446 (any t table: 3.182)
    iv = t_interval([1.0, 2.0, 3.0, 4.0, float("nan")])  # NaN (a diverged run) is dropped
    half = 3.182446 * math.sqrt(5 / 3) / 2
    assert iv.n == 4 and iv.mean == 2.5
    assert iv.lo == pytest.approx(2.5 - half, abs=1e-5) and iv.hi == pytest.approx(2.5 + half, abs=1e-5)
    one = t_interval([3.0])
    assert one.n == 1 and one.mean == 3.0 and math.isnan(one.lo) and math.isnan(one.sd)
    same = t_interval([0.1, 0.1, 0.1])
    assert same.lo == same.hi == pytest.approx(0.1) and same.sd == 0.0
    assert t_quantile(2) == pytest.approx(4.302653, abs=1e-6) and t_quantile(10) == pytest.approx(2.228139, abs=1e-6)
    assert t_quantile(1e6) == pytest.approx(1.96, abs=1e-3)


def test_constant_and_zero_differences_are_handled_explicitly():
    # the same shift in every seed: sd = 0, so t = mean / 0; the interval has zero width and says so
    a = {0: 1.1, 1: 1.2, 2: 1.3}
    b = {0: 1.0, 1: 1.1, 2: 1.2}  # a - b = 0.1 in each seed, up to floating point
    d = paired_difference(a, b, names=("qk", "none"))
    assert d.test == PAIRED_CONSTANT and d.n == 3
    assert d.lo == d.hi == d.mean == pytest.approx(0.1)
    assert d.p == 0.0 and d.resolved
    assert "same amount in all 3 seeds" in d.verdict()
    z = paired_difference(a, dict(a), names=("x", "y"))
    assert z.test == PAIRED_CONSTANT and z.mean == 0 and z.p == 1.0 and not z.resolved
    assert z.verdict() == "identical in every seed"


def test_noise_covering_zero_reads_not_distinguishable():
    a = {0: 4.10, 1: 4.20, 2: 4.15}
    b = {0: 4.14, 1: 4.17, 2: 4.20}  # differences -0.04, 0.03, -0.05
    d = paired_difference(a, b, names=("qk-norm", "no-norm"))
    assert d.lo < 0 < d.hi and not d.resolved
    text = describe(d, 3)
    assert text.startswith("qk-norm − no-norm: −0.020 [")
    assert "(3 seeds): not distinguishable from seed noise" in text
    assert re.search(r"p = 0\.\d+", text)


def test_one_seed_and_unpaired_fallbacks():
    d = paired_difference({0: 1.0}, {0: 0.5}, names=("a", "b"))
    assert d.test == SINGLE and d.mean == 0.5 and math.isnan(d.lo)
    assert describe(d, 2) == "a − b: 0.50 (1 seed: no interval possible)"
    # no shared seeds, two or more on each side: Welch, checked against scipy
    w = paired_difference({0: 1.0, 1: 1.4, 2: 1.1}, {5: 0.2, 6: 0.5}, names=("a", "b"))
    assert w.test == WELCH
    ref = sps.ttest_ind([1.0, 1.4, 1.1], [0.2, 0.5], equal_var=False)
    assert w.p == pytest.approx(ref.pvalue)
    # Welch by hand: se^2 = s1^2/n1 + s2^2/n2, Welch-Satterthwaite degrees of freedom
    a, b = np.array([1.0, 1.4, 1.1]), np.array([0.2, 0.5])
    v1, v2 = a.var(ddof=1) / 3, b.var(ddof=1) / 2
    dof = (v1 + v2) ** 2 / (v1**2 / 2 + v2**2 / 1)
    half = sps.t.ppf(0.975, dof) * math.sqrt(v1 + v2)
    assert (w.lo, w.hi) == (pytest.approx(a.mean() - b.mean() - half), pytest.approx(a.mean() - b.mean() + half))


def test_holm_by_hand():
    # sorted p: 0.01 (x3 = 0.03), 0.02 (x2 = 0.04), 0.04 (x1 = 0.04); NaN is not counted
    assert holm([0.04, 0.01, float("nan"), 0.02]) == pytest.approx([0.04, 0.03, float("nan"), 0.04], nan_ok=True)
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])


def test_correlations_against_numpy_and_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = 0.6 * x + rng.normal(scale=0.8, size=40)
    y[3] = np.nan  # dropped pairwise
    c = correlate(x, y)
    ok = np.isfinite(y)
    r = np.corrcoef(x[ok], y[ok])[0, 1]
    assert c.n == 39 and c.pearson == pytest.approx(r)
    # Fisher z interval by hand: tanh(atanh(r) ± z(0.975) / sqrt(n - 3))
    half = sps.norm.ppf(0.975) / math.sqrt(39 - 3)
    assert c.pearson_lo == pytest.approx(math.tanh(math.atanh(r) - half))
    assert c.pearson_hi == pytest.approx(math.tanh(math.atanh(r) + half))
    assert c.pearson_p == pytest.approx(sps.pearsonr(x[ok], y[ok]).pvalue)
    sr = sps.spearmanr(x[ok], y[ok])
    assert c.spearman == pytest.approx(sr.statistic) and c.spearman_p == pytest.approx(sr.pvalue)
    assert math.isnan(correlate([1, 2], [3, 4]).pearson)  # n < 3
    assert math.isnan(correlate([1, 2, 3], [5, 5, 5]).pearson)  # constant: undefined, no warning


# --- the paradox table -------------------------------------------------------------------------


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


# --- partial results ---------------------------------------------------------------------------


def test_unfinished_run_lowers_n_at_end_but_counts_earlier(tmp_path):
    root = make_study(tmp_path / "s", {"qk": "qk", "none": "none"}, [0, 1], planned_seeds=[0, 1, 2])
    add_run(root, "none", "none", 2, tokens=TOKENS[:3], done=False)  # killed at 200
    scalars, probes, study = frames(root)
    table = paradox_table(scalars, probes, finished=study.finished)
    assert table.loc["val loss @ 400", ("none", "n")] == 2  # the finished seeds
    assert table.loc["val loss @ 200", ("none", "n")] == 3  # the killed seed reached 200
    assert table.loc["val loss @ 200", ("none", "mean")] == pytest.approx(5 - 0.2 + 0.05 + 0.02 * 1.0)
    assert table.loc["val loss @ 400", (BETTER, "arm")] == "qk"
    # without knowing which runs finished, END is the last point every run of the arm reached
    literal = paradox_table(scalars, probes)
    assert literal.loc["val loss @ end", ("none", "tokens")] == 200

    path = write_report(root)
    md = path.read_text()
    assert "`none` seed 2: **stopped** (last eval at 200 of 400 tokens; rerun its command to resume)" in md
    assert "`qk` seed 2: **not started**" in md
    assert "(n=2)" in md  # the END cell averages fewer seeds than its arm has, and says so

    # a run whose writer is alive (its lock file names this very process) is reported as running
    import os
    import socket

    from rankscope.storage.store import run_lock_path

    lock = run_lock_path(run_dir(root, "none", 2))
    lock.write_text(
        json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now", "what": "rankscope run"})
    )
    md = write_report(root).read_text()
    assert f"`none` seed 2: **running** (last eval at 200 of 400 tokens; pid {os.getpid()} on" in md
    # a holder that is gone leaves the file behind: the run is stopped, not running
    lock.write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))
    assert "**stopped**" in write_report(root).read_text()


def test_diverged_run_is_listed_as_diverged_not_finished(tmp_path):
    root = make_study(tmp_path / "s", {"qk": "qk", "none": "none"}, [0, 1])
    add_run(root, "qk", "qk", 2, diverge_at=300)  # NaN loss at 300: done.json says diverged
    study = load_study(root)
    run = next(r for r in study.runs if (r.arm, r.seed) == ("qk", 2))
    assert run.status == "diverged" and not run.done and run.last_finite_tokens == 200
    assert ("qk", 2) not in study.finished and ("qk", 2) in study.diverged
    table = paradox_table(study.scalars, study.probes, arms=study.arms, finished=study.finished)
    assert table.loc["val loss @ 400", ("qk", "n")] == 2  # the diverged seed adds nothing at the end
    md = write_report(root).read_text()
    assert "`qk` seed 2: **diverged** (last finite eval at 200 of 400 tokens" in md
    assert "diverged at 300 tokens: val\\_loss is nan" in md
    assert "1 diverged" in md and "**qk** seed 2 after 200 tokens" in md
    html_text = (root / "report.html").read_text()
    assert "<strong>diverged</strong>" in html_text
    text = paradox_text(root)
    assert "5 runs, 4 finished, 1 diverged" in text and "diverged: qk/seed-2 after 200" in text
    assert "unfinished" not in text


def test_runs_without_probes_or_rows(tmp_path):
    root = make_study(tmp_path / "s", {"qk": "qk", "none": "none"}, [0], probes=False, done=False)
    RunStore(run_dir(root, "qk", 1)).close()  # a run that has written only its headers
    path = write_report(root)
    plots = sorted(p.name for p in (root / "plots").iterdir())
    # no probes: no per-layer bars, heatmaps, diagnosis; the contrast's val loss over training remains
    assert plots == ["contrasts.png", "loss_pr.png"]
    md = path.read_text()
    assert "| mean key PR" not in md
    assert "no eval point written yet" in md
    assert "val loss @ 400" in paradox_text(root)

    empty = make_study(tmp_path / "empty", {"qk": "qk"}, [])
    assert "No evaluation point written yet." in write_report(empty).read_text()
    assert "(no evaluation points yet)" in paradox_text(empty)
    assert (tmp_path / "empty" / "report.html").exists()


def test_single_eval_point(tmp_path):
    root = make_study(tmp_path / "s", {"qk": "qk", "none": "none"}, [0, 1], tokens=[100])
    md = write_report(root).read_text()
    assert "val loss @ 100" in md
    _assert_png(root / "plots" / "loss_pr.png")
    assert "val loss @ 100" in paradox_text(root)


# --- the report and its figures ----------------------------------------------------------------


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5_000, f"{path} is suspiciously small"


class _StrictParser(html.parser.HTMLParser):
    """Fails on unbalanced tags: html.parser itself accepts anything."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.srcs += [v for k, v in attrs if k in ("src", "href")]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()


def test_write_report_files_links_and_html(tmp_path):
    arms = {"qk/learned muon": "qk", "none": "none"}  # '/' and ' ' are not file-name safe
    root = make_study(tmp_path / "s", arms, [0, 1])
    out = tmp_path / "out"
    path = write_report(root, out)
    assert path == out / "report.md"
    stems = safe_names(arms)
    assert stems["qk/learned muon"] == "qk_learned_muon"
    # an older study: no downstream, gains, functional rank -> none of those figures; key PR
    # against val loss is still drawn
    # the arms side by side in one figure of each kind
    expected = ["loss_pr.png", "contrasts.png", "pr_vs_downstream.png", "diagnosis_arms.png", "layer_pr_arms.png"]
    expected.append("pr_heatmap_arms.png")
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(expected)
    md = path.read_text()
    for name in expected:
        _assert_png(out / "plots" / name)
        assert f"](plots/{name})" in md  # embedded with a relative link
    assert md.startswith("# demo")
    assert "hand-built test study" in md
    assert "`model.qk_norm=qk`" in md and "**preset:** `tiny`" in md and "**seeds:** 0, 1" in md
    assert "## Summary" in md
    assert (
        "Across 2 seeds at 400 tokens, **qk/learned muon** vs **none**: validation loss lower by 0.050 in every seed"
    ) in md
    assert "95% t-intervals over seeds" in md
    assert "unfinished" not in md and "diverged" not in md

    page = (out / "report.html").read_text()
    parser = _StrictParser()
    parser.feed(page)
    parser.close()
    assert not parser.stack, f"unclosed tags {parser.stack}"
    assert page.count('src="data:image/png;base64,') == len(expected)
    assert all(s.startswith("data:image/png;base64,") for s in parser.srcs)  # nothing external
    assert 'src="http' not in page and "<script" not in page and "<link" not in page
    # the same sections as the markdown
    md_heads = [ln.lstrip("#").strip() for ln in md.splitlines() if ln.startswith("## ")]
    html_heads = re.findall(r"<h2>(.*?)</h2>", page)
    assert html_heads == md_heads
    assert "<strong>qk/learned muon</strong>" in page


def test_multiple_study_folders_merge(tmp_path):
    a = make_study(tmp_path / "a", {"qk": "qk", "none": "none"}, [0])
    b = make_study(tmp_path / "b", {"qk": "qk", "none": "none"}, [1])
    study = load_study([a, b])
    assert study.seeds() == [0, 1]
    table = paradox_table(study.scalars, study.probes, finished=study.finished)
    assert table.loc["val loss @ 400", ("qk", "n")] == 2
    assert table.loc["val loss @ 400", ("qk", "mean")] == pytest.approx(5 - 0.4 + 0.01)
    # the same run in two folders: the finished copy wins, and the choice is noted
    add_run(tmp_path / "b", "qk", "qk", 0, tokens=TOKENS[:2], done=False)
    study = load_study([a, b])
    assert len(study.runs) == 4 and any("found twice" in n for n in study.notes)
    assert next(r for r in study.runs if (r.arm, r.seed) == ("qk", 0)).done


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
    _assert_png(root / "plots" / "layer_pr_arms.png")
    _assert_png(root / "plots" / "pr_heatmap_arms.png")
    md = path.read_text()
    assert "## Every pair of arms, seed by seed" in md and "Holm" in md  # three arms: every pair


# --- a realistic study: every metric, log-spaced eval points, seed noise ---------------------------

REAL_ARMS = {"no-norm": ("none", "muon"), "qk-norm": ("learned", "muon"), "qk-clip": ("none", "muon")}


def make_realistic_study(
    root: Path,
    *,
    seeds=(0, 1, 2),
    n_layer=8,
    n_head=4,
    head_dim=64,
    n_points=24,
    top=100_000_000,
    spectral_sites=("k", "k_pre", "q", "q_pre", "v", "o"),
    rank_grid=(1, 2, 4, 8, 16, 32, 64),
    rng_seed=0,
    preset="tiny",
) -> Path:
    """Three arms (no QK-Norm, learned QK-Norm with collapsing layers 1 and 3, QK-Clip) with seed
    effects shared across arms (same seed = same init and batches), every metric the trainer writes,
    and log-spaced eval points from 0 to `top` tokens."""
    rng = np.random.default_rng(rng_seed)
    tokens = [0] + np.unique(np.geomspace(16_384, top, n_points).astype(np.int64)).tolist()
    root.mkdir(parents=True, exist_ok=True)
    write_record(
        root / "study.json",
        {
            "name": "report4-demo",
            "preset": preset,
            "tokens": top,
            "seeds": list(seeds),
            "description": "Synthetic study: QK-Norm x QK-Clip under Muon, log-spaced eval points.",
            "arms": {
                a: {"model.qk_norm": qk, **({"model.qk_clip": 100.0} if a == "qk-clip" else {})}
                for a, (qk, _) in REAL_ARMS.items()
            },
        },
    )
    collapsed = {1, 3}
    seed_fx = {s: rng.normal(size=8) for s in seeds}  # shared by every arm of a seed
    for arm, (qk, opt) in REAL_ARMS.items():
        for s in seeds:
            fx = seed_fx[s]
            own = np.random.default_rng(hash((arm, s)) % 2**32)
            rd = run_dir(root, arm, s)
            rd.mkdir(parents=True, exist_ok=True)
            write_record(
                rd / "config.json",
                {
                    "arm": arm,
                    "seed": s,
                    "model": {
                        "n_layer": n_layer,
                        "n_head": n_head,
                        "n_kv_head": n_head,
                        "head_dim": head_dim,
                        "d_model": n_head * head_dim,
                        "qk_norm": qk,
                        "vocab_size": 49152,
                    },
                    "optim": {
                        "name": opt,
                        "muon_qkvo": "stacked",
                        "muon_ns": "polar_express",
                        **({"qk_clip_tau": 100.0} if arm == "qk-clip" else {}),
                    },
                    "train": {
                        "tokens": top,
                        "batch_size": 4,
                        "seq_len": 2048,
                        "eval_schedule": "log",
                        "eval_points": n_points,
                    },
                    "probe": {"sites": list(spectral_sites)},
                },
            )
            cols = SCALAR_COLUMNS + tuple(c for c in ("icl_score", "induction_loss") if c not in SCALAR_COLUMNS)
            sw, pw = TableWriter(rd / "scalars.csv", cols), TableWriter(rd / "probes.csv", PROBE_COLUMNS)
            off = {"no-norm": 0.03, "qk-norm": 0.0, "qk-clip": 0.02}[arm]
            pr_end = {"no-norm": 48.0, "qk-norm": 36.0, "qk-clip": 44.0}[arm]
            for step, t in enumerate(tokens):
                u = math.log10(1 + t / 16_384) / math.log10(1 + top / 16_384)  # 0 -> 1, log progress
                val = 3.3 + off * u + 7.5 * math.exp(-6 * u) + 0.02 * fx[0] + 0.004 * own.normal()
                row = {
                    "arm": arm,
                    "seed": s,
                    "step": step,
                    "tokens": t,
                    "train_loss": val + 0.01,
                    "val_loss": val,
                    "ood_loss": val + 0.8 + (0.03 if arm == "qk-norm" else 0) * u + 0.02 * fx[1] + 0.01 * own.normal(),
                    "icl_score": -0.05
                    - 0.6 * u**2
                    - (0.05 if arm == "no-norm" else 0) * u
                    + 0.02 * fx[2]
                    + 0.01 * own.normal(),
                    "induction_loss": 1.0
                    + 6.0 * math.exp(-4 * u)
                    + (0.15 if arm == "qk-norm" else 0) * u
                    + 0.05 * fx[3]
                    + 0.03 * own.normal(),
                    "lr_scale": 1.0,
                    "grad_norm": 1.0,
                    "elapsed_s": float(step),
                    "probe_s": 0.0,
                    "eval_s": 0.0,
                }
                rows = []
                key = {"arm": arm, "seed": s, "step": step, "tokens": t}

                def add(layer, head, site, metric, v, key=key, rows=rows):
                    rows.append(
                        {**key, "layer": layer, "head": head, "site": site, "metric": metric, "value": float(v)}
                    )

                for layer in range(n_layer):
                    dead = arm == "qk-norm" and layer in collapsed
                    target = 9.0 if dead else pr_end + 2 * math.sin(layer)
                    for head in range(n_head):
                        base = 55 + (target - 55) * u**1.3 + 1.5 * fx[4] * u + own.normal() * 1.2
                        base = float(np.clip(base, 1.5, head_dim))
                        for site in spectral_sites:
                            f = 1.0 if site == "k" else 0.9 if site.endswith("_pre") else 1.1
                            p = min(head_dim, base * f)
                            add(layer, head, site, "pr_sv", p)
                            add(layer, head, site, "pr_eig", 0.8 * p)
                            add(layer, head, site, "erank", min(head_dim, 1.2 * p))
                            add(layer, head, site, "stable_rank", max(1.0, p / 8))
                            add(layer, head, site, "r90", round(min(head_dim, 1.1 * p)))
                        add(
                            layer,
                            head,
                            "attn",
                            "entropy",
                            4.0 - 2.0 * u - (1.5 * u if dead else 0) + 0.1 * own.normal(),
                        )
                        add(layer, head, "attn", "max_logit", 4 + 10 * u + (18 * u if dead else 0) + own.normal())
                        ind = 0.05 + (0.7 * u if (layer, head) in ((2, 1), (5, 3)) else 0.03 * u)
                        add(
                            layer,
                            head,
                            "attn",
                            "induction_score",
                            min(1.0, ind * (0.8 if arm == "qk-norm" else 1) + 0.02 * abs(own.normal())),
                        )
                        for w in ("w_q", "w_k"):
                            sr = 12 - 4 * u - (6 * u if dead else 0) + 0.4 * own.normal()
                            add(layer, head, w, "stable_rank", max(1.0, sr))
                            add(layer, head, w, "pr_sv", max(1.0, 3 * sr))
                            add(layer, head, w, "spectral_norm", 1 + u + 0.1 * own.normal())
                    if qk == "learned":
                        for g in ("q_gain", "k_gain"):
                            add(layer, -1, g, "gain_mean", 1 + 0.5 * u)
                            add(layer, -1, g, "gain_cv", 0.1 + (0.9 if dead else 0.2) * u + 0.02 * own.normal())
                            add(layer, -1, g, "gain_near_zero", (0.3 if dead else 0.01) * u)
                    if t in (tokens[len(tokens) // 2], tokens[-1]):  # functional rank: mid-run and at the end
                        fr = max(1, round((0.35 if dead else 0.45) * (55 + (target - 55) * u**1.3) + own.normal()))
                        for site in ("k", "q"):
                            add(layer, -1, site, "functional_rank", fr)
                            for r in rank_grid:
                                add(layer, -1, site, f"dloss_r{r}", 0.0 if r >= head_dim else 0.01 * (fr / r) ** 2)
                sw.append([row])
                pw.append(rows)
            sw.close()
            pw.close()
            write_record(rd / "done.json", {"tokens": top})
    return root


def test_realistic_study_report(tmp_path):
    # the seed's preset: the report also sets its numbers next to the seed study's (DESIGN.md)
    root = make_realistic_study(
        tmp_path / "real",
        n_layer=4,
        n_head=2,
        head_dim=64,
        n_points=8,
        spectral_sites=("k",),
        rank_grid=(1, 4, 16, 64),
        preset="seed-88m",
    )
    # the demo's collapsed layers are 1 and 3 of 4: with 4 layers the median is still healthy
    path = write_report(root)
    names = sorted(p.name for p in (root / "plots").iterdir())
    figures = ("diagnosis_arms", "downstream", "functional_rank", "rank_sweep", "pr_vs_downstream", "loss_pr")
    for name in figures:
        assert f"{name}.png" in names
    for name in names:
        _assert_png(root / "plots" / name)
    md = path.read_text()
    for label in ("OOD loss @ 100M", "ICL score @ 100M", "induction loss @ 100M", "mean induction score @ 100M"):
        assert label in md
    assert "**qk-norm** layers 1, 3" in md  # collapsed layers named in the summary
    # the collapsed-layer table: layer 1's key PR next to the other layers' median
    assert re.search(r"\| 1 \| \d+\.\d \(others \d+\.\d\) \|", md)
    assert "points within one run are not independent" in md
    assert "run ends" in md and "eval points" in md
    assert "log scale" in md or "logarithmic" in md
    assert "QK-Norm gain spread" in md
    # correlations computed by the report equal scipy's on the same points
    study = load_study(root)
    corr = correlation_table(study.scalars, study.probes, finished=study.finished)
    row = corr[(corr["key"] == "val_loss") & (corr["scope"] == "run ends")].iloc[0]
    assert row["n"] == 9 and row["runs"] == 9
    pr_end = head_layer_mean(study.probes)
    pr_end = pr_end[pr_end["tokens"] == pr_end["tokens"].max()].sort_values(["arm", "seed"])
    vl = study.scalars[study.scalars["tokens"] == study.scalars["tokens"].max()].sort_values(["arm", "seed"])
    assert row["pearson"] == pytest.approx(sps.pearsonr(pr_end["value"], vl["val_loss"]).statistic)
    html_page = (root / "report.html").read_text()
    assert html_page.count("data:image/png;base64,") == len(names)
    # the seed comparison: Muon + learned QK-Norm (qk-norm) vs Muon without (no-norm; qk-clip is excluded)
    assert "## Compared with the seed study" in md
    assert "| mean key PR @ 16M | 43.5 |" in md and "| ≈30 |" in md
    assert "At 16M and 25M tokens the key PR order of **qk-norm** and **no-norm** matches the seed's figure" in md
    assert "25M: a separate 25M-token run with Muon lr 0.024" in md  # the 25M figure's own settings
    # a QK-Clip arm (optim.qk_clip_tau > 0, no QK-Norm) is not the seed's plain arm, even when it is met first
    clip_first = dataclasses.replace(study, runs=sorted(study.runs, key=lambda r: r.arm != "qk-clip"))
    header, _, _ = seed_reference(clip_first, {})
    assert header == ["quantity", "seed: QK-Norm", "qk-norm", "seed: no QK-Norm", "no-norm"]
    # the setup says how the runs differ from the seed's 88M study, setting by setting
    assert "**differs from the seed's 88M study**" in md and "`model.n_layer` 4 (seed 22)" in md
    # a Muon arm not trained as the seed trained (Q, K, V, O separate) is not set next to its figures
    for rd in (root / "qk-norm").iterdir():
        cfg = json.loads((rd / "config.json").read_text())
        cfg["optim"]["muon_qkvo"] = "separate"
        (rd / "config.json").write_text(json.dumps(cfg))
    assert "## Compared with the seed study" not in write_report(root).read_text()


def test_seed_1_5b_reference_reads_keys_before_rope(tmp_path):
    """The 1.5B follow-up's figures are set next to a seed-1.5b study on site k_pre, its own."""
    root = make_realistic_study(
        tmp_path / "big",
        n_layer=2,
        n_head=2,
        head_dim=64,
        n_points=6,
        spectral_sites=("k", "k_pre"),
        rank_grid=(1, 64),
        preset="seed-1.5b",
    )
    md = write_report(root).read_text()
    assert "| mean key PR before RoPE @ 50M | 65.7 |" in md and "| 63.3 |" in md
    assert "50M: the 1.5B follow-up: keys read before RoPE (site k_pre)" in md
    assert "mean key PR @ 16M" not in md  # the 88M figures belong to the 88M preset
    assert "**differs from the seed's 1.5B follow-up**" in md


def test_seeds_plain_arm_is_muon_without_qk_norm_or_qk_clip():
    seeds_muon = {"name": "muon", "muon_qkvo": "stacked", "muon_ns": "polar_express"}
    assert arm_kind({"model": {"qk_norm": "none"}, "optim": seeds_muon}) == "none"
    assert arm_kind({"model": {"qk_norm": "learned"}, "optim": seeds_muon}) == "qk"
    assert arm_kind({"model": {"qk_norm": "frozen"}, "optim": seeds_muon}) == "frozen"
    # QK-Clip lives in the optimizer settings (optim.qk_clip_tau); an arm with it is not the seed's plain arm
    assert arm_kind({"model": {"qk_norm": "none"}, "optim": {**seeds_muon, "qk_clip_tau": 100.0}}) is None
    assert arm_kind({"model": {"qk_norm": "none"}, "optim": {**seeds_muon, "qk_clip_tau": 0.0}}) == "none"
    assert arm_kind({"model": {"qk_norm": "none"}, "optim": {**seeds_muon, "muon_qkvo": "separate"}}) is None
    assert arm_kind({"model": {"qk_norm": "none"}, "optim": {"name": "adamw"}}) is None


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


# --- helpers ---------------------------------------------------------------------------------


def test_inline_html():
    assert (
        inline_html("a **b** *c* `d*e` \\*f\\* <g> & h")
        == "a <strong>b</strong> <em>c</em> <code>d*e</code> *f* &lt;g&gt; &amp; h"
    )
    assert inline_html("2 * 3 = 6") == "2 * 3 = 6"  # an unmatched star is a star
    assert inline_html("**qk\\_norm\\|x**") == "<strong>qk_norm|x</strong>"


def test_report_never_imports_torch():
    # every module of the package, including those `rankscope analyze` borrows (its summary and heatmap)
    code = (
        "import importlib, pkgutil, sys, rankscope.report as r\n"
        "names = [m.name for m in pkgutil.iter_modules(r.__path__, 'rankscope.report.')]\n"
        "assert len(names) > 10, names\n"
        "for n in names: importlib.import_module(n)\n"
        "assert 'torch' not in sys.modules, 'report imported torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- damaged tables: one line naming the file and line, exit code 2 -----------------------------


def _report_error(root: Path, capsys) -> tuple[int, str]:
    from rankscope.cli import main

    capsys.readouterr()
    code = main(["report", str(root)])
    return code, capsys.readouterr().err


DAMAGED = "the run's table is damaged: remove the line or rerun the run"


@pytest.mark.parametrize(
    "table, line, raw, replace, what",
    [
        ("probes.csv", 7, b"garbage,1,2", False, "expected 9 fields, got 3"),
        ("probes.csv", 7, b"", False, "an empty line"),
        ("probes.csv", 7, b"\x00\x00\x00\x00", False, "a control character '\\x00'"),  # a zeroed disk block
        ("probes.csv", 5, b"qk,0,1,100,0,1,k,pr_sv,9.5,extra", True, "expected 9 fields, got 10"),
        ("scalars.csv", 3, b"qk,0,1,100,4.9,4.9,,1.0,1.0,1.0", True, "expected 14 fields, got 10"),
        ("probes.csv", 7, b"\x8f\xff\xfe random \xc3(", False, "bytes that are not UTF-8"),
        ("scalars.csv", 4, b"\xe9t\xe9,0,2,200,4.8,4.8,,1.0,1.0,,,2.0,0.0,", True, "bytes that are not UTF-8"),
        ("scalars.csv", 3, b"qk,0,1,lots,4.9,4.9,,1.0,1.0,,,1.0,0.0,", True, "tokens 'lots' is not an integer"),
        ("scalars.csv", 3, b"qk,0,1,,4.9,4.9,,1.0,1.0,,,1.0,0.0,", True, "tokens '' is not an integer"),
        ("probes.csv", 5, b"qk,0,1,100,0,1,k,pr_sv,9.5x", True, "value '9.5x' is not a number"),
        ("probes.csv", 5, b"qk,0,1.5,100,0,1,k,pr_sv,9.5", True, "step '1.5' is not an integer"),
        ("probes.csv", 5, b"qk,0,1,100,0,inf,k,pr_sv,9.5", True, "head 'inf' is not an integer"),
        ("scalars.csv", 3, b"qk,0,1,100,4.9,fast,,1.0,1.0,,,1.0,0.0,", True, "val_loss 'fast' is not a number"),
        ("probes.csv", 5, b"qk,0,1,100,0,1,k\x01,pr_sv,9.5", True, "a control character '\\x01'"),
        (
            "probes.csv",
            1,
            b"arm,seed,step,tokens,layer,head,site,metric,value",
            False,
            "the header again, amid the rows",
        ),
        (
            "probes.csv",
            3,
            b"arm,seed,step,tokens,layer,head,site,metric,value",
            True,
            "the header again, amid the rows",
        ),
        ("probes.csv", 5, b"qk,0,step,100,0,1,k,pr_sv,9.5", True, "step 'step' is not an integer"),
        (
            "probes.csv",
            5,
            b"none,0,1,100,0,1,k,pr_sv,9.5",
            True,
            "arm is 'none' but the table is in the folder of arm 'qk', seed 0",
        ),
        (
            "scalars.csv",
            3,
            b"qk,7,1,100,4.9,4.9,,1.0,1.0,,,1.0,0.0,",
            True,
            "seed is '7' but the table is in the folder of arm 'qk', seed 0",
        ),
        ("scalars.csv", 1, b"a,b,c", True, "the header 'a,b,c' lacks the column(s) step, tokens"),
    ],
)
def test_report_names_the_file_and_line_of_a_damaged_row(tmp_path, capsys, table, line, raw, replace, what):
    root = make_study(tmp_path / "s", {"qk": "qk", "none": "none"}, [0, 1])
    path = run_dir(root, "qk", 0) / table
    # line 1 of a table is its header; inserted at line 1 the damage lands on line 2 after it
    at = line + 1 if (line == 1 and not replace) else line
    lines = path.read_bytes().splitlines(keepends=True)
    lines[at - 1 : at - 1 + replace] = [raw + b"\n"]
    path.write_bytes(b"".join(lines))
    code, err = _report_error(root, capsys)
    assert code == 2
    assert err == f"rankscope: error: {path} line {at}: {what}; {DAMAGED}\n"


def test_report_still_drops_a_torn_last_line(tmp_path, capsys):
    root = make_study(tmp_path / "s", {"qk": "qk", "none": "none"}, [0, 1])
    for table, torn in (("scalars.csv", b"qk,0,5,50"), ("probes.csv", b"qk,0,5,500,0,1,k,pr_\xc3")):
        with open(run_dir(root, "qk", 0) / table, "ab") as f:
            f.write(torn)  # a kill in the middle of a write, even in the middle of a UTF-8 character
    code, err = _report_error(root, capsys)
    assert code == 0 and err == ""
    s = load_study(root)
    assert s.scalars["tokens"].max() == 400 and len(s.probes) == 2 * 2 * len(TOKENS) * N_LAYER * N_HEAD


def test_an_arm_named_like_a_number_stays_text(tmp_path):
    """Text columns are read as text: an arm "001" is not the integer 1, so its rows are its own."""
    root = make_study(tmp_path / "s", {"001": "qk"}, [0])
    (run_dir(root, "001", 0) / "config.json").unlink()  # the arm then comes from the folder and the rows
    s = load_study(root)
    assert [r.arm for r in s.runs] == ["001"] and set(s.probes["arm"]) == {"001"}


def test_quoted_fields_are_read_and_checked_too(tmp_path, capsys):
    """An arm name with a comma is quoted in the tables: rows are then found by the csv module."""
    root = make_study(tmp_path / "s", {"a,b": "qk"}, [0])
    s = load_study(root)
    assert set(s.scalars["arm"]) == {"a,b"} and len(s.probes) == len(TOKENS) * N_LAYER * N_HEAD
    path = run_dir(root, "a,b", 0) / "probes.csv"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[3] = b'"a,b",0,1,100,0,1,k,pr_sv\n'
    path.write_bytes(b"".join(lines))
    code, err = _report_error(root, capsys)
    assert (code, err) == (2, f"rankscope: error: {path} line 4: expected 9 fields, got 8; {DAMAGED}\n")
    lines[3] = b'"a,c",0,1,100,0,1,k,pr_sv,9.5\n'
    path.write_bytes(b"".join(lines))
    code, err = _report_error(root, capsys)
    msg = f"line 4: arm is 'a,c' but the table is in the folder of arm 'a,b', seed 0; {DAMAGED}\n"
    assert (code, err) == (2, f"rankscope: error: {path} {msg}")
