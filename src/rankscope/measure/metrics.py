"""Spectrum metrics of activation matrices: pure tensor math, no hooks, files or plots.

For one head at one site, X is the (n tokens x d) activation matrix and s its singular values.
Everything follows from the d x d Gram matrix XᵀX (eigenvalues s²) and, for the centered
covariance, the column sum Σx: so a probe can accumulate Grams batch by batch and never keep X.

- pr_sv:       (Σ s)² / Σ s²            the seed's participation ratio, uncentered; 1 ≤ pr_sv ≤ d
- pr_eig:      (Σ λ)² / Σ λ²            λ = eigenvalues of the centered covariance (Gao et al. 2017)
- erank:       exp(H(p)), p = s / Σ s   effective rank (Roy & Vetterli 2007)
- stable_rank: Σ s² / max s²
- r90:         fewest directions holding 90% of Σ s²
- decay:       α of a power law s_i² ∝ i^(-α) fitted to the eigenvalues by rank (`spectral_decay`)
- decay_r2:    R² of that fit: how well a power law describes the spectrum at all

The power-law exponent is the number α-ReQ (Agrawal et al. 2022) reads off representations: the
slope of log λ_i against log i, fitted by least squares; larger α = faster decay = variance in fewer
directions. It is fitted to the uncentered s², as pr_sv, erank, stable_rank and r90 are, so it is
there whenever they are. WeightWatcher (Martin & Mahoney 2021) fits weight spectra with a power
law too, but of the eigenvalue density, ρ(λ) ∝ λ^(-a), by maximum likelihood over its tail; for a
rank-ordered power law with exponent α the density's exponent is a = 1 + 1/α. This module reports
the rank-ordered α.

The fit, where the other metrics take every eigenvalue, takes the ranks `DECAY_FIRST` (2) to
⌊`DECAY_LAST` · d⌋ (d/2), and of those the eigenvalues above `DECAY_FLOOR` (1e-12) · λ_1:

- rank 1 is left out: in an uncentered Gram (these metrics' convention, the seed's) λ_1 holds the
  mean direction n|μ|² on top of the spread, an outlier off any power law through the rest.
- the last half is left out: a finite spectrum bends down at its end (the finite-size edge; and a
  Gram summed in float32, as the probe's on the CPU, carries about sqrt(N) u32 λ_1 of round-off in
  every eigenvalue), and ranks d/2..d span only ln 2 of the log-rank axis's ln d yet would be half
  the points, so with equal weights they would set the slope.
- fixed ranks, not those holding some share of Σ s² (another common choice): a share depends on
  λ_1, the outlier, and on α itself (at α = 3, 99% of Σ s² lies in the top 6 ranks), while fixed
  ranks give every head of a model the same ranks, comparable across heads, layers, arms and
  training.
- eigenvalues at or below 1e-12 λ_1 are left out (zeros of a rank-deficient head, and those whose
  logarithm is round-off: a float64 decomposition moves each by about d eps λ_1, the floor below
  which `_eig` zeroes them, i.e. 1.4% of an eigenvalue at 1e-12 λ_1 when d = 64).

Both are NaN with fewer than 3 eigenvalues left (a dead head; any d < 8, the least with ranks 2 to 4),
and for a spectrum flat to round-off over the ranks (log λ spread no more than its round-off), α = 0
and R² = 1, the power law that fits it exactly, instead of a slope and an R² fitted to round-off.
decay counts no dimensions (`settings.vocab.Metric.dimensions`): the report marks neither direction better.

The eigenvalues come from `eigvalsh_batched`, which decomposes a batch where it is fastest: where
the matrices live, or on the host when they sit on a GPU and are larger than its batched solver takes.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import torch

# torch is imported inside the math below, not here. The metrics' names and labels (SPECTRUM,
# METRICS) are `rankscope.settings.vocab`'s, which the report reads without torch.


def gram(x: torch.Tensor) -> torch.Tensor:
    """XᵀX in float64 for x of shape (..., n, d) -> (..., d, d)."""
    x = x.double()
    return x.mT @ x


# --- where the eigenvalues are computed --------------------------------------------------------

# On CUDA, torch.linalg.eigvalsh hands a batch to cuSOLVER's batched Jacobi solver (syevjBatched)
# only for matrices up to 32 x 32; above that it decomposes one matrix at a time, a launch and a
# wait each (pytorch issues 174674 and 175585: 914 ms in torch against 8 ms in a batched solver for
# 500 matrices of 100 x 100). The probe's Grams are 64 x 64 or 128 x 128, a few hundred per
# measurement, and LAPACK on the host decomposes them faster than that loop, copy included.
DEVICE_BATCHED_MAX = 32
EIG_PATHS = ("auto", "device", "host")


def eig_path(g: torch.Tensor, path: str = "auto") -> str:
    """Where `eigvalsh_batched` decomposes g (..., d, d): 'device' (where g lives) or 'host' (the
    CPU). 'auto' picks the device on the CPU and for CUDA matrices up to 32 x 32 (the batched
    solver's size), the host otherwise."""
    if path not in EIG_PATHS:
        raise ValueError(f"eigenvalue path must be one of {', '.join(EIG_PATHS)}, got {path!r}")
    if path != "auto":
        return path
    if g.device.type == "cpu" or (g.device.type == "cuda" and g.shape[-1] <= DEVICE_BATCHED_MAX):
        return "device"
    return "host"


def host_eigvalsh(g: torch.Tensor, workers: int | None = None) -> torch.Tensor:
    """torch.linalg.eigvalsh of CPU matrices g (..., d, d), each decomposed by one thread, `workers`
    at a time (default: torch's intra-op thread count).

    LAPACK's own threads split one small matrix's work between them, which costs more than it saves
    at these sizes (with 2 threads instead of 1: 1.3-1.6x slower at 64 x 64 and 5-17x at 128 x 128
    on the busy 2-core machine this was written on; benchmarks/bench_probe_eig.py). So torch runs
    single-threaded for the call (a process-wide setting, restored after it), and threads of our
    own take contiguous shares of the batch. Each matrix is decomposed alone by the same
    single-threaded routine, so the result does not depend on `workers`; it may differ in the last
    bits from a multi-threaded call."""
    import torch

    if g.device.type != "cpu":
        raise ValueError(f"host_eigvalsh takes CPU matrices, got a tensor on {g.device}")
    flat = g.reshape(-1, *g.shape[-2:])
    return torch.cat(_single_threaded(torch.linalg.eigvalsh, flat, workers)).reshape(g.shape[:-1])


def _single_threaded(fn: Callable, flat: torch.Tensor, workers: int | None) -> list:
    """fn on contiguous shares of the CPU batch `flat`, `workers` threads at a time (default torch's
    intra-op thread count), torch single-threaded meanwhile (`host_eigvalsh` says why); fn's results
    in batch order."""
    import torch

    workers = max(1, min(workers or torch.get_num_threads(), flat.shape[0]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # also what the workers' threads start with: torch reads it when they begin
    try:
        if workers == 1:
            return [fn(flat)]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:  # torch releases the GIL inside LAPACK
            return list(pool.map(fn, flat.tensor_split(workers)))
    finally:
        torch.set_num_threads(threads)


class Eigh(NamedTuple):
    """What torch.linalg.eigh returns: eigenvalues (..., d) ascending, eigenvectors (..., d, d)."""

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor


def eigh_batched(mats: Sequence[torch.Tensor], *, path: str = "auto", workers: int | None = None) -> list[Eigh]:
    """torch.linalg.eigh of each batch of symmetric matrices in `mats` (each (..., d, d), one d).

    On the path `eig_path(mats[0], path)` names: 'device' is torch.linalg.eigh of each batch where
    it lives (on the CPU the very call evaluations always made, so their numbers are unchanged);
    'host' copies every batch to the CPU in ONE device-to-host copy, decomposes them all there as
    `host_eigvalsh` does, and sends the eigenvectors back in one copy: a measurement's small eigh's
    cost one transfer instead of one cuSOLVER call and wait per matrix. On the host path the
    eigenvalues stay on the CPU (their readers turn them into rows), as float64."""
    import torch

    if not mats:
        return []
    if len({m.shape[-1] for m in mats}) > 1:
        raise ValueError(f"eigh_batched takes matrices of one size, got {sorted({m.shape[-1] for m in mats})}")
    if eig_path(mats[0], path) == "device":
        return [Eigh(*torch.linalg.eigh(m)) for m in mats]
    host = to_host(*mats)  # one device-to-host copy, float64
    flat = torch.cat([m.reshape(-1, *m.shape[-2:]) for m in host])  # (n, d, d)
    parts = _single_threaded(torch.linalg.eigh, flat, workers)
    values = torch.cat([p.eigenvalues for p in parts])
    vectors = torch.cat([p.eigenvectors for p in parts]).to(mats[0].device)  # one copy back
    out, i = [], 0
    for m in mats:
        n = m[..., 0, 0].numel()
        out.append(Eigh(values[i : i + n].view(m.shape[:-1]), vectors[i : i + n].view(m.shape)))
        i += n
    return out


def eigvalsh_batched(g: torch.Tensor, *, path: str = "auto", workers: int | None = None) -> torch.Tensor:
    """Eigenvalues of symmetric matrices g (..., d, d), ascending, on g's device: what
    torch.linalg.eigvalsh returns, computed on the path `eig_path(g, path)` names. 'host' copies g
    to the CPU, runs `host_eigvalsh` there and copies the eigenvalues back; for CPU matrices both
    paths are the same call, torch.linalg.eigvalsh itself."""
    import torch

    if g.device.type == "cpu" or eig_path(g, path) == "device":
        return torch.linalg.eigvalsh(g)
    return host_eigvalsh(g.cpu(), workers).to(g.device)


def to_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """float64 copies of tensors on the CPU, made by one device-to-host copy (one host sync)."""
    import torch

    parts = [t.double() for t in tensors]
    flat = torch.cat([t.reshape(-1) for t in parts]).cpu()
    return [chunk.view(t.shape) for chunk, t in zip(flat.split([t.numel() for t in parts]), parts)]


_to_host = to_host  # the name the CUDA-path tests know it by


# --- the metrics ---------------------------------------------------------------------------------


def _eig(g: torch.Tensor, eigvalsh: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Eigenvalues of symmetric PSD matrices, descending, float64, by `eigvalsh` (default
    torch.linalg.eigvalsh). Values below the round-off floor λ_max · d · eps (numpy's matrix_rank
    tolerance) are set to zero: otherwise a truly null direction gets a singular value of about
    sqrt(eps) · s_max, which the sqrt in pr_sv would count."""
    import torch

    ev = (eigvalsh or torch.linalg.eigvalsh)(g.double()).flip(-1)
    floor = ev[..., :1].clamp_min(0) * g.shape[-1] * torch.finfo(torch.float64).eps
    return torch.where(ev > floor, ev, torch.zeros_like(ev))


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den with 0/0 -> 0, for all-zero activations (a dead head)."""
    import torch

    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))


def singular_value_metrics(s: torch.Tensor, ev: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """pr_sv, erank, stable_rank and r90 from singular values s (..., k), descending, and their
    squares ev (computed from s when not given): the metrics that need no centering."""
    import torch

    ev = s.square() if ev is None else ev
    s_sum, ev_sum = s.sum(-1), ev.sum(-1)
    p = _ratio(s, s_sum.unsqueeze(-1))
    entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
    share = _ratio(ev.cumsum(-1), ev_sum.unsqueeze(-1))
    return {
        "pr_sv": _ratio(s_sum.square(), ev_sum),
        "erank": torch.where(s_sum > 0, entropy.exp(), torch.zeros_like(entropy)),
        "stable_rank": _ratio(ev_sum, ev[..., 0]),
        # count directions strictly below 90% and add the one that crosses it
        "r90": torch.where(ev_sum > 0, (share < 0.9 - 1e-12).sum(-1) + 1.0, torch.zeros_like(ev_sum)),
    }


# The power-law fit's ranks and floor (module docstring): ranks DECAY_FIRST .. ⌊DECAY_LAST · d⌋,
# 1-based, of the eigenvalues above DECAY_FLOOR · λ_1; NaN with fewer than DECAY_MIN_POINTS left.
DECAY_FIRST = 2  # rank 1, the mean direction's outlier in an uncentered Gram, is left out
DECAY_LAST = 0.5  # the bent, crowded tail is left out: the fit ends at rank d/2
DECAY_FLOOR = 1e-12
DECAY_MIN_POINTS = 3


def decay_ranks(d: int) -> range:
    """The 1-based ranks the power-law fit of a d x d Gram's eigenvalues takes (before the floor)."""
    return range(DECAY_FIRST, int(DECAY_LAST * d) + 1)


def spectral_decay(ev: torch.Tensor) -> dict[str, torch.Tensor]:
    """decay (α) and decay_r2 (R²) of the least-squares line log λ_i = c - α log i, from eigenvalues
    ev (..., d), descending, non-negative (`_eig`'s): over the ranks `decay_ranks(d)`, of those
    above DECAY_FLOOR · λ_1. Every head at once: the excluded eigenvalues are masked out of the sums.
    NaN where fewer than DECAY_MIN_POINTS remain; α = 0 and R² = 1 where log λ over them is flat to
    its round-off."""
    import torch

    tiny = torch.finfo(torch.float64).tiny
    ev = ev.double()
    d = ev.shape[-1]
    ranks = decay_ranks(d)
    lam = ev[..., ranks.start - 1 : ranks.stop - 1]  # (..., m)
    top = ev[..., :1].clamp_min(0)
    use = (lam > 0) & (lam > DECAY_FLOOR * top)
    w = use.double()
    k = w.sum(-1)
    x = torch.arange(ranks.start, ranks.stop, dtype=torch.float64, device=ev.device).log().expand_as(lam)
    y = torch.where(use, lam.clamp_min(tiny).log(), torch.zeros_like(lam))
    n = k.clamp_min(1).unsqueeze(-1)
    dx = w * (x - (w * x).sum(-1, keepdim=True) / n)  # deviations from the means of the used points,
    dy = w * (y - (w * y).sum(-1, keepdim=True) / n)  # 0 at the others
    sxx, sxy, syy = (dx * dx).sum(-1), (dx * dy).sum(-1), (dy * dy).sum(-1)
    alpha = -sxy / sxx.clamp_min(tiny)
    r2 = (sxy.square() / (sxx * syy).clamp_min(tiny)).clamp(0, 1)
    # each λ_i is off by about d eps λ_1 (`_eig`), its log by d eps λ_1 / λ_i: a spread of log λ
    # within that is round-off, and the line that fits the spectrum is flat (α = 0, R² = 1)
    rel = torch.where(use, d * torch.finfo(torch.float64).eps * top / lam.clamp_min(tiny), torch.zeros_like(lam))
    flat = syy <= rel.square().sum(-1)
    alpha = torch.where(flat, torch.zeros_like(alpha), alpha)
    r2 = torch.where(flat, torch.ones_like(r2), r2)
    few = k < DECAY_MIN_POINTS
    nan = torch.full_like(alpha, float("nan"))
    return {"decay": torch.where(few, nan, alpha), "decay_r2": torch.where(few, nan, r2)}


def metrics_from_gram(
    g: torch.Tensor,
    col_sum: torch.Tensor | None = None,
    n: int | torch.Tensor | None = None,
    *,
    path: str = "auto",
    workers: int | None = None,
) -> dict[str, torch.Tensor]:
    """All metrics from Gram matrices g (..., d, d); col_sum (..., d) and row count n (scalar or
    (...)) enable pr_eig.

    One batched eigen-decomposition per kind (uncentered, centered) for every head and layer.
    A Gram matrix holding NaN or inf (a diverged model) gives NaN metrics instead of failing.

    path and workers: where the eigenvalues are computed, as `eigvalsh_batched`. When that is the
    host and g is not already there, g, col_sum and n go to the CPU in one copy, every metric is
    computed there and comes back as a CPU tensor: that copy is the one host sync, and a caller's
    `.cpu()` afterwards costs nothing. On the CPU both paths are the same computation.
    """
    import torch

    eigvalsh = None  # torch.linalg.eigvalsh where g lives
    if g.device.type != "cpu" and eig_path(g, path) == "host":
        if col_sum is not None and n is not None:
            n = torch.as_tensor(n, dtype=torch.float64, device=g.device).expand(g.shape[:-2])
            g, col_sum, n = to_host(g, col_sum, n)
        else:
            (g,) = to_host(g)
        eigvalsh = functools.partial(host_eigvalsh, workers=workers)
    finite = torch.isfinite(g).all(-1).all(-1)  # (...)
    g = torch.where(finite[..., None, None], g.double(), torch.zeros((), dtype=torch.float64, device=g.device))
    ev = _eig(g, eigvalsh)  # s², descending
    out = singular_value_metrics(ev.sqrt(), ev)
    out.update(spectral_decay(ev))
    if col_sum is not None and n is not None:
        col_sum = torch.where(
            torch.isfinite(col_sum), col_sum.double(), torch.zeros((), dtype=torch.float64, device=g.device)
        )
        n = torch.as_tensor(n, dtype=torch.float64, device=g.device)  # scalar or (...)
        mean = col_sum.double() / n[..., None]  # (..., d)
        centered = g.double() - n[..., None, None] * mean.unsqueeze(-1) * mean.unsqueeze(-2)  # XᵀX - n μμᵀ
        lam = _eig(centered, eigvalsh)
        out["pr_eig"] = _ratio(lam.sum(-1).square(), lam.square().sum(-1))
    return {k: torch.where(finite, v, torch.full_like(v, float("nan"))) for k, v in out.items()}


def participation_ratio(x: torch.Tensor, kind: str = "sv") -> torch.Tensor:
    """Participation ratio of activations x (..., n, d) -> (...).

    kind="sv": the seed's (Σ s)² / Σ s² over singular values of the uncentered x.
    kind="eig": the standard (Σ λ)² / Σ λ² over eigenvalues of the centered covariance.
    """
    if kind == "sv":
        return metrics_from_gram(gram(x))["pr_sv"]
    if kind == "eig":
        return metrics_from_gram(gram(x), x.double().sum(-2), x.shape[-2])["pr_eig"]
    raise ValueError(f"kind must be 'sv' or 'eig', got {kind!r}")


def effective_rank(x: torch.Tensor) -> torch.Tensor:
    """exp of the entropy of the normalised singular values of x (..., n, d) -> (...)."""
    return metrics_from_gram(gram(x))["erank"]


def stable_rank(x: torch.Tensor) -> torch.Tensor:
    """Σ s² / max s² of x (..., n, d) -> (...)."""
    return metrics_from_gram(gram(x))["stable_rank"]


def r90(x: torch.Tensor) -> torch.Tensor:
    """Fewest singular directions of x (..., n, d) holding 90% of Σ s² -> (...)."""
    return metrics_from_gram(gram(x))["r90"]
