"""Metric functions against closed forms on matrices with chosen spectra."""

import math

import pytest
import torch

from rankscope.measure import metrics
from rankscope.measure.metrics import effective_rank, participation_ratio, r90, stable_rank
from rankscope.settings.vocab import SPECTRUM


def with_singular_values(s: list[float], n: int = 200, seed: int = 0) -> torch.Tensor:
    """An (n, d) matrix U diag(s) Vᵀ with orthonormal U (n x d) and V (d x d)."""
    g = torch.Generator().manual_seed(seed)
    d = len(s)
    u, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T


def test_closed_forms_for_chosen_singular_values():
    s = [4.0, 2.0, 1.0, 1.0, 0.5, 0.0]
    x = with_singular_values(s)
    total, squares = sum(s), sum(v * v for v in s)
    assert participation_ratio(x).item() == pytest.approx(total**2 / squares, rel=1e-9)
    p = [v / total for v in s if v > 0]
    assert effective_rank(x).item() == pytest.approx(math.exp(-sum(q * math.log(q) for q in p)), rel=1e-9)
    assert stable_rank(x).item() == pytest.approx(squares / 16.0, rel=1e-9)
    # cumulative shares of Σs² = 22.25: 16 -> .719, 20 -> .899 (just short of 90%), 21 -> .944
    assert r90(x).item() == 3


def test_pr_eig_matches_covariance_eigenvalues():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 8, generator=g, dtype=torch.float64) * torch.tensor([3, 2, 2, 1, 1, 1, 0.5, 0.1]) + 7.0
    lam = torch.linalg.eigvalsh(torch.cov(x.T))
    assert participation_ratio(x, kind="eig").item() == pytest.approx(
        (lam.sum() ** 2 / (lam**2).sum()).item(), rel=1e-9
    )


def test_rank_one_gives_one_and_isotropic_gives_d():
    d = 16
    one = torch.outer(torch.randn(100, dtype=torch.float64), torch.randn(d, dtype=torch.float64))
    for f in (participation_ratio, effective_rank, stable_rank):
        assert f(one).item() == pytest.approx(1.0, abs=1e-6)
    assert participation_ratio(one, kind="eig").item() == pytest.approx(1.0, abs=1e-6)
    iso = with_singular_values([1.0] * d, n=64)
    for f in (participation_ratio, effective_rank, stable_rank):
        assert f(iso).item() == pytest.approx(d, rel=1e-9)
    assert r90(iso).item() == math.ceil(0.9 * d)


def test_batched_shapes_and_bounds():
    x = torch.randn(3, 5, 40, 8)  # (..., n, d)
    for f in (participation_ratio, effective_rank, stable_rank, r90):
        out = f(x)
        assert out.shape == (3, 5)
        assert bool(((out >= 1 - 1e-9) & (out <= 8 + 1e-9)).all())
    # batched equals one at a time
    assert torch.allclose(participation_ratio(x)[1, 2], participation_ratio(x[1, 2]))


def test_scale_invariance_and_zero_input():
    x = torch.randn(50, 8, dtype=torch.float64)
    assert participation_ratio(7.5 * x).item() == pytest.approx(participation_ratio(x).item(), rel=1e-9)
    zero = torch.zeros(10, 4)
    for name, v in metrics.metrics_from_gram(metrics.gram(zero), zero.sum(0), 10).items():
        if SPECTRUM[name].dimensions:
            assert v.item() == 0.0, name  # a dead head reports 0 dimensions, not NaN
        else:  # but no power law: nothing to fit (tests/test_spectral_decay.py)
            assert math.isnan(v.item()), name


def test_unknown_kind_rejected():
    with pytest.raises(ValueError):
        participation_ratio(torch.randn(4, 4), kind="nope")


def test_non_finite_input_gives_nan_not_an_error():
    # d = 8: enough ranks (2 to 4) for the power-law fit to have a value
    g = torch.stack([metrics.gram(torch.randn(20, 8)), torch.full((8, 8), float("nan"))])
    out = metrics.metrics_from_gram(g, torch.zeros(2, 8), 20)
    for name, v in out.items():
        assert torch.isfinite(v[0]) and torch.isnan(v[1]), name


def test_singular_value_metrics_agree_with_the_gram_path():
    # The weight spectra (from svdvals) and the probe (from a Gram's eigenvalues) share one formula.
    from rankscope.measure.metrics import gram, metrics_from_gram, singular_value_metrics

    torch.manual_seed(3)
    x = torch.randn(5, 40, 12, dtype=torch.float64) * torch.linspace(0.1, 2.0, 12)
    from_s = singular_value_metrics(torch.linalg.svdvals(x))
    from_g = metrics_from_gram(gram(x))
    for name in ("pr_sv", "erank", "stable_rank", "r90"):
        torch.testing.assert_close(from_s[name], from_g[name], rtol=1e-10, atol=1e-10)


def test_metric_vocabulary_matches_what_metrics_from_gram_returns():
    # The report names metrics from SPECTRUM; the probe writes what metrics_from_gram returns.
    from rankscope.measure.metrics import metrics_from_gram
    from rankscope.settings.vocab import METRICS

    out = metrics_from_gram(torch.eye(4, dtype=torch.float64)[None], torch.zeros(1, 4), 10)
    assert set(out) == set(SPECTRUM) and METRICS == tuple(SPECTRUM)


def test_vocabulary_modules_import_without_torch():
    import subprocess
    import sys

    code = (
        "import sys, rankscope.settings.config, rankscope.measure.metrics, rankscope.settings.vocab,"
        " rankscope.settings.units, rankscope.storage.fsio;"
        " assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
