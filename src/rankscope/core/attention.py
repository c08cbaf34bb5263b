"""The one chunked attention-logit loop, shared by every measurement that needs attention weights.

The model's max-logit tracking (for QK-Clip), the probe's attention entropy and max logit, and
the induction scores all recompute q·kᵀ from the post-RoPE queries and keys a hook saw. This
module does it once: in float32, one block of queries at a time so that at most
(B, H, chunk, T) logits are held, with grouped-query heads expanded (query head h reads key/value
head h // (H/G)) and the causal and sliding-window masks applied as -inf.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def logit_chunks(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    chunk: int,
    *,
    first: int = 0,
    causal: bool = True,
    window: int | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (i, logits) for each block of queries: q (B, Tq, H, E) holds the queries at positions
    first .. first + Tq - 1, k (B, T, G, E) the keys at 0 .. T - 1; logits (B, H, c, T) are
    (q · k) · scale in float32 for queries i .. i + c - 1 of q.

    causal: a query at position p sees keys j <= p. window: it sees only j > p - window (Mistral's
    and Hugging Face's sliding-window convention). Masked logits are -inf.
    """
    qh = q.transpose(1, 2).float()  # (B, H, Tq, E)
    kh = k.transpose(1, 2).float()  # (B, G, T, E)
    kh = kh.repeat_interleave(qh.shape[1] // kh.shape[1], dim=1)  # (B, H, T, E)
    cols = torch.arange(kh.shape[2], device=q.device)[None, :]  # key positions
    for i in range(0, qh.shape[2], chunk):
        logits = (qh[:, :, i : i + chunk] @ kh.mT) * scale  # (B, H, c, T)
        rows = torch.arange(first + i, first + i + logits.shape[2], device=q.device)[:, None]  # query positions
        if causal:
            logits = logits.masked_fill(cols > rows, float("-inf"))
        if window is not None:
            logits = logits.masked_fill(cols <= rows - window, float("-inf"))
        yield i, logits
