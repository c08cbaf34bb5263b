"""Statistics over seeds: t intervals, seed-by-seed (paired) differences, correlations. Pure
numpy/scipy on plain numbers; no frames, files, plots or formatting (`format.py` writes them out).

Why these choices:

* A run's seed fixes its initial weights and its batch order for every arm (see `rankscope.run.train`),
  so two arms' runs with the same seed are a matched pair. Differencing within a seed removes the
  seed-to-seed variation the arms share, which is why a paired t interval on the per-seed
  differences is the primary comparison (Student 1908; any textbook's "paired t-test"). A Welch
  interval is only the fallback when two arms share fewer than two seeds.
* With a handful of seeds the t distribution's heavy tails matter (t(0.975, 2) = 4.30, not 1.96):
  intervals are Student t on the seed values, never a normal approximation.
* A Wilcoxon signed-rank p-value is added from six pairs up (with fewer, its exact p-value cannot
  go below 2/2^n = 0.0625 for n = 5, so it could never disagree informatively); it checks that a
  paired t verdict is not carried by one outlying seed.
* "Distinguishable from seed noise" means the 95% interval excludes zero, i.e. two-sided p < 0.05.
  It is a statement about these seeds at this scale, not about the arms in general; the report
  words it that way.
* Pooled correlations over eval points treat points of one run as independent although they are
  not (they share a trajectory), so their p-values are too small; the report says so and also
  gives the correlation over runs at their ends, one point per run.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

LEVEL = 0.95
# Paired differences whose spread is below this share of their size count as constant: floating
# point makes "the same shift in every seed" differ in the last bits, and scipy's t-test then
# divides by ~1e-17 and warns about catastrophic cancellation instead of saying what happened.
_CONSTANT_RTOL = 1e-12
# Wilcoxon from this many pairs up (see the module docstring)
WILCOXON_MIN_N = 6


def t_quantile(df: float, level: float = LEVEL) -> float:
    """Two-sided Student t quantile, e.g. 4.303 for df = 2 at 95%; NaN for df <= 0."""
    if not df > 0:
        return math.nan
    return float(sps.t.ppf(0.5 + level / 2, df))


def _finite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=float).ravel()
    return v[np.isfinite(v)]


def _is_constant(v: np.ndarray) -> bool:
    if len(v) < 2:
        return True
    scale = max(float(np.max(np.abs(v))), np.finfo(float).tiny)
    return float(np.ptp(v)) <= _CONSTANT_RTOL * scale


# --- one quantity over seeds ------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """Mean of the seed values with its Student t interval. lo/hi are NaN for fewer than 2 seeds."""

    mean: float
    lo: float
    hi: float
    sd: float
    n: int
    level: float = LEVEL


def t_interval(values: Sequence[float] | np.ndarray, level: float = LEVEL) -> Interval:
    """Student t interval of the mean of `values` (NaN and inf are dropped: a diverged run).

    mean ± t(1 - α/2, n - 1) · sd / √n with the sample sd (ddof = 1). With all values equal the
    interval has zero width, which is what the data say; with one value there is no interval.
    """
    v = _finite(values)
    n = len(v)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, math.nan, 0, level)
    mean = float(np.mean(v))
    if n == 1:
        return Interval(mean, math.nan, math.nan, math.nan, 1, level)
    if _is_constant(v):
        return Interval(mean, mean, mean, 0.0, n, level)
    sd = float(np.std(v, ddof=1))
    half = t_quantile(n - 1, level) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, sd, n, level)


def t_interval_arrays(
    mean: np.ndarray, sd: np.ndarray, n: np.ndarray, level: float = LEVEL
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised `t_interval` bounds from per-group mean, sd and count (NaN where n < 2).

    Used for the bands of every trajectory plot: one interval per (arm, eval point).
    """
    mean, sd, n = (np.asarray(x, dtype=float) for x in (mean, sd, n))
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.where(n >= 2, sps.t.ppf(0.5 + level / 2, np.maximum(n - 1, 1)), np.nan)
        half = q * np.where(np.isfinite(sd), sd, np.nan) / np.sqrt(n)
    return mean - half, mean + half


# --- two arms, seed by seed -------------------------------------------------------------------------

PAIRED, PAIRED_CONSTANT, WELCH, SINGLE, NONE = "paired t", "paired (constant)", "Welch t", "single seed", "none"


@dataclass(frozen=True)
class Difference:
    """`a − b` over seeds, with its 95% interval and two-sided p-values.

    test: ``paired t`` (n shared seeds), ``paired (constant)`` (every seed gave the same difference:
    zero-width interval, p = 0 if that difference is not 0, else 1), ``Welch t`` (fewer than two
    shared seeds, but two or more on each side; n is then the smaller group), ``single seed``
    (one pair or one run per side: a number without an interval) or ``none``.
    """

    a: str
    b: str
    mean: float
    lo: float
    hi: float
    p: float
    n: int
    test: str
    seeds: tuple[int, ...] = ()
    sd: float = math.nan
    p_wilcoxon: float = math.nan
    level: float = LEVEL

    @property
    def has_interval(self) -> bool:
        return self.test in (PAIRED, PAIRED_CONSTANT, WELCH) and math.isfinite(self.lo)

    @property
    def resolved(self) -> bool:
        """True when the interval excludes zero: the difference stands out from seed noise."""
        return self.has_interval and (self.lo > 0 or self.hi < 0)

    def verdict(self, *, lower: str = "lower", higher: str = "higher") -> str:
        """The words after the numbers, e.g. 'not distinguishable from seed noise'."""
        if self.test == NONE:
            return "no seeds to compare"
        if self.test == SINGLE:
            return "1 seed: no interval possible"
        if self.test == PAIRED_CONSTANT:
            if self.mean == 0:
                return "identical in every seed"
            return (
                f"{self.a} {higher if self.mean > 0 else lower} by the same amount in all "
                f"{self.n} seeds (no seed-to-seed spread)"
            )
        if not self.resolved:
            return "not distinguishable from seed noise"
        return f"{self.a} {higher if self.mean > 0 else lower}, beyond seed noise"


def paired_difference(
    a: Mapping[int, float], b: Mapping[int, float], *, names: tuple[str, str] = ("a", "b"), level: float = LEVEL
) -> Difference:
    """`a − b` from per-seed values ``{seed: value}``, paired on the seeds both have (finite).

    Falls back to Welch's unequal-variance interval when fewer than two seeds are shared but each
    side has two or more: arms then cannot be matched, and the interval is wider for it.
    """
    shared = sorted(s for s in set(a) & set(b) if math.isfinite(a[s]) and math.isfinite(b[s]))
    na, nb = names
    if len(shared) >= 2:
        d = np.array([a[s] - b[s] for s in shared], dtype=float)
        n = len(d)
        mean = float(np.mean(d))
        if _is_constant(d):
            # sd = 0: t = mean / 0. The interval has zero width; p is the limit (0, or 1 for no shift).
            return Difference(
                na,
                nb,
                mean,
                mean,
                mean,
                0.0 if mean != 0 else 1.0,
                n,
                PAIRED_CONSTANT,
                tuple(shared),
                0.0,
                math.nan,
                level,
            )
        sd = float(np.std(d, ddof=1))
        half = t_quantile(n - 1, level) * sd / math.sqrt(n)
        with warnings.catch_warnings():
            # near-constant differences make scipy warn about precision; the interval above already
            # says how tight they are. Zeros or ties make wilcoxon fall back to its normal
            # approximation, with a warning, which is the documented behaviour we want.
            warnings.simplefilter("ignore", RuntimeWarning)
            warnings.simplefilter("ignore", UserWarning)
            p = float(sps.ttest_1samp(d, 0.0).pvalue)
            pw = math.nan
            if n >= WILCOXON_MIN_N and np.count_nonzero(d):
                pw = float(sps.wilcoxon(d).pvalue)
        return Difference(na, nb, mean, mean - half, mean + half, p, n, PAIRED, tuple(shared), sd, pw, level)

    va = _finite([a[s] for s in a])
    vb = _finite([b[s] for s in b])
    if len(va) >= 2 and len(vb) >= 2:
        return welch_difference(va, vb, names=names, level=level)
    if len(va) and len(vb):
        # one run per side (or one shared seed): a number, not an estimate of a spread
        if len(shared) == 1:
            s = shared[0]
            mean, seeds = a[s] - b[s], (s,)
        else:
            mean, seeds = float(np.mean(va) - np.mean(vb)), ()
        return Difference(na, nb, float(mean), math.nan, math.nan, math.nan, 1, SINGLE, seeds, level=level)
    return Difference(na, nb, math.nan, math.nan, math.nan, math.nan, 0, NONE, level=level)


def welch_difference(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    names: tuple[str, str] = ("a", "b"),
    level: float = LEVEL,
) -> Difference:
    """`mean(a) − mean(b)` with Welch's interval (Welch 1947), for unmatched samples."""
    va, vb = _finite(a), _finite(b)
    mean = float(np.mean(va) - np.mean(vb))
    v1, v2 = np.var(va, ddof=1) / len(va), np.var(vb, ddof=1) / len(vb)
    se2 = float(v1 + v2)
    n = min(len(va), len(vb))
    if se2 == 0:
        return Difference(*names, mean, mean, mean, 0.0 if mean != 0 else 1.0, n, WELCH, level=level)
    dof = se2**2 / (v1**2 / (len(va) - 1) + v2**2 / (len(vb) - 1))
    half = t_quantile(dof, level) * math.sqrt(se2)
    p = float(sps.ttest_ind(va, vb, equal_var=False).pvalue)
    return Difference(*names, mean, mean - half, mean + half, p, n, WELCH, sd=math.sqrt(se2), level=level)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (Holm 1979); NaN entries stay NaN and are not counted.

    Used where the report makes many comparisons at once (every pair of arms on one quantity), so
    that one of them crossing 0.05 by chance is not read as a finding.
    """
    p = np.asarray(pvalues, dtype=float)
    ok = np.flatnonzero(np.isfinite(p))
    out = np.full(len(p), np.nan)
    m = len(ok)
    if not m:
        return out.tolist()
    order = ok[np.argsort(p[ok], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))  # monotone: never below an earlier one
        out[i] = running
    return out.tolist()


# --- correlations -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Correlation:
    """Pearson r (with its Fisher-z 95% interval) and Spearman ρ of finite (x, y) pairs."""

    n: int
    pearson: float
    pearson_lo: float
    pearson_hi: float
    pearson_p: float
    spearman: float
    spearman_p: float


def correlate(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, level: float = LEVEL) -> Correlation:
    """Correlations of the pairs where both x and y are finite; NaN where undefined.

    Undefined: fewer than three pairs, or x or y constant (no variation to correlate with).
    Spearman's ρ is given beside Pearson's r because rank and loss relations need not be linear.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = int(len(x))
    nan = math.nan
    if n < 3 or _is_constant(x) or _is_constant(y):
        return Correlation(n, nan, nan, nan, nan, nan, nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # n = 3: scipy notes the interval is [-1, 1]; that is the answer
        pr = sps.pearsonr(x, y)
        ci = pr.confidence_interval(level) if n > 3 else None
        sr = sps.spearmanr(x, y)
    return Correlation(
        n,
        float(pr.statistic),
        float(ci.low) if ci else nan,
        float(ci.high) if ci else nan,
        float(pr.pvalue),
        float(sr.statistic),
        float(sr.pvalue),
    )


def within_groups(
    x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, groups: Sequence[Any], level: float = LEVEL
) -> Correlation:
    """Pearson r of x and y after each group's mean is removed from both (the pooled within-group
    correlation): what remains when runs differ only by seed, not by arm. With k groups the test
    has n − k − 1 degrees of freedom (each mean removed costs one), as a partial correlation on
    the group indicators; Spearman's ρ of the centred values comes with no p-value (NaN).

    A correlation across runs of different arms can be nothing but the arms' difference (two
    clusters make r near ±1); this says whether x and y also move together inside the arms.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    g = np.asarray([str(v) for v in groups], dtype=object)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y, g = x[ok], y[ok], g[ok]
    nan = math.nan
    labels = sorted(set(g))
    # a group of one point carries no within-group variation: drop it (and its degree of freedom)
    keep = np.isin(g, [lab for lab in labels if (g == lab).sum() >= 2])
    x, y, g = x[keep], y[keep], g[keep]
    k = len(set(g))
    n = int(len(x))
    df = n - k - 1
    if df < 1:
        return Correlation(n, nan, nan, nan, nan, nan, nan)
    xc, yc = x.copy(), y.copy()
    for lab in set(g):
        m = g == lab
        xc[m] -= x[m].mean()
        yc[m] -= y[m].mean()
    if _is_constant(xc) or _is_constant(yc):
        return Correlation(n, nan, nan, nan, nan, nan, nan)
    r = float(np.clip(np.sum(xc * yc) / math.sqrt(np.sum(xc * xc) * np.sum(yc * yc)), -1.0, 1.0))
    t = r * math.sqrt(df / max(1e-300, 1 - r * r))
    p = float(2 * sps.t.sf(abs(t), df))
    lo = hi = nan
    if df > 1:  # Fisher z with the effective sample size df + 2
        z, half = math.atanh(min(max(r, -0.999999), 0.999999)), float(sps.norm.ppf(0.5 + level / 2)) / math.sqrt(df - 1)
        lo, hi = math.tanh(z - half), math.tanh(z + half)
    rho = float(sps.spearmanr(xc, yc).statistic)
    return Correlation(n, r, lo, hi, p, rho, nan)


__all__ = [
    "LEVEL",
    "Interval",
    "t_interval",
    "t_interval_arrays",
    "t_quantile",
    "Difference",
    "paired_difference",
    "welch_difference",
    "holm",
    "Correlation",
    "correlate",
    "within_groups",
    "PAIRED",
    "PAIRED_CONSTANT",
    "WELCH",
    "SINGLE",
    "NONE",
]
