"""rankscope.report.stats against textbook examples: Student's sleep data, t tables, Welch and
Holm by hand, correlations against numpy and scipy; and `format.describe`, which puts one difference
in words."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from scipy import stats as sps

from rankscope.report import correlate, paired_difference, t_interval
from rankscope.report.format import describe
from rankscope.report.stats import PAIRED_CONSTANT, SINGLE, WELCH, holm, t_quantile

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
