"""The power-law exponent of a spectrum (`metrics.spectral_decay`: decay, decay_r2) on spectra with
known exponents, against a per-matrix least-squares reference, and in a probe's rows."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from rankscope.core.model import GPT, ModelConfig
from rankscope.measure.metrics import (
    DECAY_FLOOR,
    decay_ranks,
    metrics_from_gram,
    spectral_decay,
)
from rankscope.measure.probe import gpt_probe
from rankscope.settings.vocab import SPECTRUM


def with_eigenvalues(lam, seed: int = 0) -> torch.Tensor:
    """Q diag(lam) Qᵀ for eigenvalues lam (..., d), with a random orthogonal Q per matrix."""
    lam = torch.as_tensor(lam, dtype=torch.float64)
    a = torch.randn(*lam.shape, lam.shape[-1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, _ = torch.linalg.qr(a)
    g = q @ torch.diag_embed(lam) @ q.mT
    return (g + g.mT) / 2  # symmetric to the last bit


def power_law(d: int, alpha: float, c: float = 3.7) -> torch.Tensor:
    return c * torch.arange(1, d + 1, dtype=torch.float64) ** -alpha


def reference(ev: np.ndarray) -> tuple[float, float]:
    """(α, R²) of one descending spectrum by numpy's least squares over the ranks and floor the
    module documents, one matrix at a time; (0, 1) for a spectrum flat to round-off."""
    ranks = np.array(decay_ranks(len(ev)))
    lam = ev[ranks - 1]
    keep = (lam > 0) & (lam > DECAY_FLOOR * max(ev[0], 0.0))
    if keep.sum() < 3:
        return math.nan, math.nan
    x, y = np.log(ranks[keep].astype(float)), np.log(lam[keep])
    if np.ptp(y) < 1e-12:  # flat to round-off: the flat line fits it
        return 0.0, 1.0
    slope, icpt = np.polyfit(x, y, 1)
    res = y - (slope * x + icpt)
    return -slope, 1 - (res @ res) / ((y - y.mean()) @ (y - y.mean()))


def fit_sxx(d: int) -> float:
    """Σ (log i - mean)² over the fit's ranks: the slope's spread is (that of log λ) / sqrt(Sxx)."""
    x = np.log(np.array(decay_ranks(d), dtype=float))
    return float(((x - x.mean()) ** 2).sum())


def test_the_metrics_count_no_dimensions_and_read_well_in_the_report():
    from rankscope.report.quantities import counts_dimensions, probe_quantity

    for name in ("decay", "decay_r2"):
        assert not SPECTRUM[name].dimensions and not counts_dimensions(name)
        q = probe_quantity("k", name)
        assert q.higher is None and q.unit == ""  # neither direction is marked better
    assert probe_quantity("k", "decay").label == "mean key decay exponent α"
    assert probe_quantity("k", "decay_r2").label == "mean key decay fit R²"
    assert list(decay_ranks(64)) == list(range(2, 33)) and list(decay_ranks(8)) == [2, 3, 4]


@pytest.mark.parametrize("d", [16, 64])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_exact_power_laws_are_recovered(alpha, d):
    out = metrics_from_gram(with_eigenvalues(power_law(d, alpha), seed=d))
    assert out["decay"].item() == pytest.approx(alpha, abs=1e-9)
    assert out["decay_r2"].item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("d", [16, 64])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_log_normal_noise_moves_alpha_by_no_more_than_the_noise_allows(alpha, d):
    # λ_i = c i^-α exp(σ z_i), then sorted (a Gram's eigenvalues come sorted). Sorting a noisy
    # sequence brings it no farther from a sorted one in ℓ2 (the rearrangement inequality), so the
    # logs over the fit's ranks are off the exact power law by e with |e| <= σ |z|. The least-squares
    # slope moves by Σ w_i e_i with |w| = 1 / sqrt(Sxx): |Δα| <= σ |z| / sqrt(Sxx); the residuals are
    # at most e (the true line is one candidate): R² >= 1 - |e|² / Syy.
    sigma = 0.1
    z = torch.randn(d, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    lam = (power_law(d, alpha) * (sigma * z).exp()).sort(descending=True).values
    out = metrics_from_gram(with_eigenvalues(lam, seed=1))
    got_alpha, got_r2 = out["decay"].item(), out["decay_r2"].item()
    bound = sigma * z.norm().item() / math.sqrt(fit_sxx(d))
    assert abs(got_alpha - alpha) <= bound + 1e-9
    ref_alpha, ref_r2 = reference(lam.numpy())
    assert got_alpha == pytest.approx(ref_alpha, abs=1e-9) and got_r2 == pytest.approx(ref_r2, abs=1e-9)
    y = lam[torch.tensor(decay_ranks(d)) - 1].log()
    assert got_r2 >= 1 - (sigma * z.norm()).square().item() / ((y - y.mean()) ** 2).sum().item() - 1e-9
    assert 0 <= got_r2 <= 1


@pytest.mark.parametrize("d", [16, 64])
def test_a_flat_spectrum_decays_at_zero(d):
    for g in (2.5 * torch.eye(d, dtype=torch.float64), with_eigenvalues(torch.full((d,), 2.5))):
        out = metrics_from_gram(g)
        assert out["decay"].item() == 0.0 and out["decay_r2"].item() == 1.0  # not a slope fitted to round-off
    # flat but for a small real tilt: fitted, not called flat
    out = metrics_from_gram(with_eigenvalues(power_law(d, 1e-3)))
    assert out["decay"].item() == pytest.approx(1e-3, rel=1e-6) and out["decay_r2"].item() == pytest.approx(1.0)


@pytest.mark.parametrize("rank", [4, 9, 20, 40])
def test_zero_eigenvalues_are_left_out_and_the_rest_still_fits(rank):
    d, alpha = 64, 1.5
    lam = power_law(d, alpha)
    lam[rank:] = 0.0
    out = metrics_from_gram(with_eigenvalues(lam, seed=rank))
    assert out["decay"].item() == pytest.approx(alpha, abs=1e-9)  # on ranks 2 .. min(rank, 32)
    assert out["decay_r2"].item() == pytest.approx(1.0, abs=1e-12)


def test_eigenvalues_below_the_floor_are_left_out():
    d, alpha = 64, 1.0
    lam = power_law(d, alpha)
    lam[10:] = 1e-14 * lam[0]  # above `_eig`'s round-off floor (d eps = 1.4e-14) for some, below 1e-12
    got = spectral_decay(lam)  # the eigenvalues as given: no decomposition, no round-off
    assert got["decay"].item() == pytest.approx(alpha, abs=1e-12)  # ranks 2 to 10 only
    assert got["decay_r2"].item() == pytest.approx(1.0, abs=1e-12)
    lam[10:] = 1e-11 * lam[0]  # above the floor: fitted, and they bend the line
    assert spectral_decay(lam)["decay_r2"].item() < 0.9


def test_too_few_eigenvalues_give_nan():
    d = 16
    cases = {
        "dead head": torch.zeros(d, d, dtype=torch.float64),
        "rank 3: ranks 2 and 3 only": with_eigenvalues(torch.cat([power_law(3, 1.0), torch.zeros(d - 3)])),
        "d = 4: rank 2 only": with_eigenvalues(power_law(4, 1.0)),
        "d = 5: ranks 2 and 3 only": with_eigenvalues(power_law(5, 1.0)),
        "non-finite": torch.full((d, d), float("nan")),
    }
    for what, g in cases.items():
        out = metrics_from_gram(g)
        assert math.isnan(out["decay"].item()) and math.isnan(out["decay_r2"].item()), what
    # the least that fits: three ranks (2, 3, 4)
    for g in (
        with_eigenvalues(torch.cat([power_law(4, 1.0), torch.zeros(d - 4)])),
        with_eigenvalues(power_law(8, 1.0)),
    ):
        assert metrics_from_gram(g)["decay"].item() == pytest.approx(1.0, abs=1e-9)


def test_batched_equals_one_matrix_at_a_time_and_the_reference():
    d = 16
    spectra = [power_law(d, a) for a in (0.3, 1.0, 2.5)]
    gen = torch.Generator().manual_seed(3)
    spectra += [power_law(d, 1.0) * (0.3 * torch.randn(d, generator=gen, dtype=torch.float64)).exp() for _ in range(4)]
    spectra += [torch.cat([power_law(6, 2.0), torch.zeros(d - 6)]), torch.full((d,), 1.5), torch.zeros(d)]
    spectra += [torch.cat([power_law(2, 1.0), torch.zeros(d - 2)]), (torch.rand(d, generator=gen) * 5).double()]
    lam = torch.stack([s.sort(descending=True).values for s in spectra]).reshape(3, 4, d)
    g = with_eigenvalues(lam, seed=11)  # (3, 4, d, d)
    s, n = torch.randn(3, 4, d, generator=gen, dtype=torch.float64), torch.full((3, 4), 30.0, dtype=torch.float64)
    batched = metrics_from_gram(g, s, n)  # with the centered metric too, as the probe calls it
    assert batched["decay"].shape == batched["decay_r2"].shape == (3, 4)
    for i in range(3):
        for j in range(4):
            one = metrics_from_gram(g[i, j], s[i, j], n[i, j])
            ref = reference(torch.linalg.eigvalsh(g[i, j]).flip(-1).numpy())
            for name, r in zip(("decay", "decay_r2"), ref):
                torch.testing.assert_close(batched[name][i, j], one[name], rtol=1e-13, atol=1e-13, equal_nan=True)
                if math.isnan(r):
                    assert math.isnan(one[name].item()), (i, j, name)
                else:
                    assert one[name].item() == pytest.approx(r, abs=1e-9), (i, j, name)
    assert torch.isnan(batched["decay"]).sum() == 2  # the dead head and the rank-2 spectrum


def test_a_probe_reports_decay_for_every_head_as_metrics_from_gram_does():
    cfg = ModelConfig(vocab_size=61, n_layer=2, d_model=32, n_head=2, n_kv_head=2, head_dim=16, d_mlp=64)
    model = GPT(replace(cfg, max_seq_len=32, qk_norm="learned")).eval()
    model.reset_parameters(0)
    x = torch.randint(0, 61, (3, 24), generator=torch.Generator().manual_seed(0))
    acts, handles = {}, []
    for i, b in enumerate(model.blocks):
        hook = lambda m, a, o, i=i: acts.__setitem__(i, o.clone())  # noqa: E731
        handles.append(b.attn.k.register_forward_hook(hook))
    rows = gpt_probe(model, ["k"], attention=False).measure([x])
    for h in handles:
        h.remove()
    got = {(r["layer"], r["head"], r["metric"]): r["value"] for r in rows if r["site"] == "k"}
    for layer, a in acts.items():
        # the probe's own arithmetic on the CPU: one batch's Gram in float32, then float64
        per_head = a.float().flatten(0, 1)  # (N, heads, E)
        g = torch.einsum("nhe,nhf->hef", per_head, per_head).double()
        want = metrics_from_gram(g, per_head.sum(0).double(), per_head.shape[0])
        for head in range(per_head.shape[1]):
            for name in ("decay", "decay_r2"):
                value = got[(layer, head, name)]
                assert math.isfinite(value) and value == pytest.approx(want[name][head].item(), rel=1e-12, abs=1e-12)
            assert 0 <= got[(layer, head, "decay_r2")] <= 1
