"""The one chunked attention-logit loop against a dense reference built in the test."""

from __future__ import annotations

import math

import pytest
import torch
from _tolerances import U32

from rankscope.core.attention import logit_chunks
from rankscope.core.model import causal_max_logit


def dense_logits(q, k, scale, first=0, causal=True, window=None):
    """(B, H, Tq, T) logits with every mask written out position by position."""
    B, Tq, H, E = q.shape
    T, G = k.shape[1], k.shape[2]
    out = torch.empty(B, H, Tq, T)
    for h in range(H):
        g = h // (H // G)  # query head h reads key head h // (H/G)
        for i in range(Tq):
            p = first + i
            for j in range(T):
                visible = (not causal or j <= p) and (window is None or j > p - window)
                out[:, h, i, j] = (q[:, i, h] * k[:, j, g]).sum(-1) * scale if visible else float("-inf")
    return out


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("first,causal,window", [(0, True, None), (0, True, 3), (5, True, None), (0, False, None)])
def test_chunks_reassemble_the_dense_masked_logits(chunk, first, causal, window):
    torch.manual_seed(0)
    q = torch.randn(2, 7, 4, 8)  # 4 query heads
    k = torch.randn(2, first + 7, 2, 8)  # 2 key/value heads: grouped-query attention
    parts = list(logit_chunks(q, k, 0.3, chunk, first=first, causal=causal, window=window))
    assert [i for i, _ in parts] == list(range(0, 7, chunk))
    got = torch.cat([lg for _, lg in parts], dim=2)
    want = dense_logits(q, k, 0.3, first, causal, window)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    # each logit is a float32 dot product of E = 8 terms, summed by a matmul there and by .sum here:
    # each side within E u of 0.3 Σ|q_e k_e| (E products, E - 1 sums), plus one rounding of the scale,
    # so 2 (E + 1) u of it apart at most (masked entries are -inf on both sides: no difference)
    bound = 2 * (8 + 1) * U32 * dense_logits(q.abs(), k.abs(), 0.3, first, causal, window).nan_to_num(neginf=0.0)
    assert (torch.where(torch.isinf(want), 0.0, got - want).abs() <= bound).all()


def test_logits_are_float32_from_bfloat16_inputs():
    q = torch.randn(1, 4, 2, 8).bfloat16()
    k = torch.randn(1, 4, 2, 8).bfloat16()
    ((_, logits),) = logit_chunks(q, k, 1.0, 16)
    assert logits.dtype == torch.float32


def test_causal_max_logit_is_the_max_of_the_visible_logits():
    torch.manual_seed(1)
    q, k = torch.randn(3, 9, 4, 8), torch.randn(3, 9, 2, 8)
    want = dense_logits(q, k, 1 / math.sqrt(8)).amax(dim=(0, 2, 3))
    # a max of logits each within 2 (E + 1) u of scale Σ|q_e k_e| of the reference's (see above) is
    # within the largest of those bounds
    bound = 2 * (8 + 1) * U32 * dense_logits(q.abs(), k.abs(), 1 / math.sqrt(8)).nan_to_num(neginf=0.0).amax()
    torch.testing.assert_close(causal_max_logit(q, k, chunk=4), want, rtol=0, atol=bound.item())
