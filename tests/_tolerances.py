"""Tolerances for comparisons whose two sides round differently, each derived from what is compared.

u is the unit round-off: 2^-24 for float32, 2^-8 for bfloat16. A float32 sum or dot product of n
terms, in any order, is off by at most about n·u times the sum of the terms' absolute values (for
non-negative terms: of the sum itself), so two computations of it in different orders differ by at
most about 2·n·u of that. Where both sides of a comparison are computed the same way, the tests
compare exactly instead (bitwise equal on the CPU).
"""

from __future__ import annotations

import math

import torch

U32 = 2.0**-24  # float32 unit round-off
U_BF16 = 2.0**-8  # bfloat16 unit round-off (8 significant bits)
# Two implementations of the same bfloat16 Muon iteration whose matmuls run on different CPU kernels
# (oneDNN's AMX bf16 kernels round a batched product differently from a single one; AVX2 and
# AVX-512 agree bit for bit): each of the five steps may round its result differently, by up to u
# relative, and a step passes an earlier difference on about unchanged (the iteration is a
# contraction towards the polar factor), so the updates differ by at most about 5 u of their size
# (1.2e-3 measured on an Intel Xeon with AMX). A wrong grouping misses by tens of percent.
BF16_ITERATION_RTOL = 5 * U_BF16


def gram_rtol(acts) -> float:
    """Relative tolerance of the spectral metrics when two paths sum the same heads' Gram matrices
    XᵀX (N rows of E dims) in another order or precision (the probe: float32, batch by batch).

    Each entry moves by about sqrt(N) U32 of the largest eigenvalue, and so does every eigenvalue
    (Weyl); a singular value s_i = sqrt(λ_i) then by sqrt(N) U32 s_max² / (2 s_i). Summed over E
    directions, relative to Σ s >= s_max: E sqrt(N) U32 κ / 2 with κ = s_max / s_min; (Σ s)² (pr_sv)
    doubles it, and erank's entropy multiplies it by at most 1 + log(E κ) (|log p| of the smallest
    share). stable_rank moves less. pr_eig = (Σ λ)² / Σ λ² of the centered XᵀX - n μμᵀ (whose
    float32 column sums move n μμᵀ by about as much as XᵀX) moves by at most 4 E sqrt(N) U32 times
    λ_max(XᵀX) / λ_max(centered): more than the rest only when the mean dominates the activations.
    acts: iterable of (heads, N, E).
    """
    worst = 0.0
    for a in acts:
        a = a.double()
        s = torch.linalg.svdvals(a)  # (heads, E), descending
        n, e = a.shape[-2], a.shape[-1]
        kappa = (s[:, 0] / s[:, -1]).max().item()
        mean = a.mean(-2)
        centered = a.mT @ a - n * mean.unsqueeze(-1) * mean.unsqueeze(-2)
        spread = torch.linalg.eigvalsh(centered)[:, -1]
        assert (s[:, -1] > 0).all() and (spread > 0).all(), "a rank-deficient or constant head has no tolerance"
        amp = (s[:, 0].square() / spread).max().item()
        worst = max(worst, e * math.sqrt(n) * U32 * max(kappa * (1 + math.log(e * kappa)), 4 * amp))
    return worst


def r90_is_stable(acts) -> bool:
    """True when r90, a count, is the same on both sides of a `gram_rtol` comparison: no cumulative
    share of the eigenvalues of any head lies within its round-off of 90% (each eigenvalue moves by
    about sqrt(N) U32 λ_max, E of them, over Σ λ >= λ_max). acts: iterable of (heads, N, E)."""
    for a in acts:
        a = a.double()
        n, e = a.shape[-2:]
        ev = torch.linalg.eigvalsh(a.mT @ a).flip(-1)
        share = ev.cumsum(-1) / ev.sum(-1, keepdim=True)
        if (share - 0.9).abs().min() <= 2 * e * math.sqrt(n) * U32:
            return False
    return True


def perturbed_pr_rtol(e: int, eps: float) -> float:
    """Relative change of pr_sv = (Σ s)² / Σ s² of a (N, E) activation matrix X when X moves by at
    most eps ||X||_F (Frobenius): every singular value moves by at most that (Weyl), so Σ s by
    E eps ||X||_F <= E eps Σ s, and Σ s² = ||X||_F² by 2 eps of itself: 2 (E + 1) eps in all."""
    return 2 * (e + 1) * eps


def rope_eps(t: int) -> float:
    """How far two float32 implementations of RoPE over positions 0 .. t-1 can put a rotated vector,
    relative to its norm. One of them (Hugging Face's) forms the angles p·θ in float32: θ = base^-x
    (x = 2i/E) is off by about u x log(base) of itself, so p·θ by (x log(base) + 2) u p θ <= 2 u p;
    cos and sin are then off by about 2 t u. Each rotated coordinate, two products and a sum of
    them, moves by at most (2 t + 3) u of its pair's norm, the pair by twice that: (4 t + 6) u."""
    return (4 * t + 6) * U32


def logit_atol(q: torch.Tensor, k: torch.Tensor, scale: float) -> float:
    """Largest difference between two float32 computations of the logits (q · k) · scale when they
    sum the E products in different orders and scale them (by a product, or a division): each is
    within (E + 1) u of scale Σ|q_e k_e|, so 2 (E + 1) u of its largest value over all queries and
    keys. q (..., Tq, E), k (..., T, E), heads already matched."""
    e = q.shape[-1]
    return 2 * (e + 1) * U32 * abs(scale) * (q.double().abs() @ k.double().abs().mT).amax().item()


def entropy_tol(t: int, rows: int, dlogit: float) -> tuple[float, float]:
    """(rtol, atol) for two float32 computations of a mean attention entropy over `rows` query rows
    of at most t keys each, from logits that differ by at most dlogit.

    The entropy H = lse - Σ p l of a softmax moves by Σ_j p_j |l_j - Σ p l| |Δl| <= 2 H dlogit <=
    2 log(t) dlogit. Rounding: each row's softmax sums t exponentials ((t + 2) u relative on p,
    that much absolute on log p), -Σ p log p sums t more terms: within (2 t + 3) u (H + 1) of the
    exact row entropy; the mean over the rows adds `rows` u relative. Both sides round, so twice.
    """
    rtol = 2 * (2 * t + 3 + rows) * U32
    atol = 2 * math.log(t) * dlogit + 2 * (2 * t + 3) * U32
    return rtol, atol
