"""Per-token losses and the in-context learning score, from the validation forward the trainer runs anyway.

The first of the seed's open questions (QK-Norm + Muon: lower loss, yet keys that use fewer
dimensions): "Does QK-Norm find low-rank shortcuts that sacrifice in-context learning?"
`loss_and_icl` gives the mean validation loss and the in-context learning score of Olsson et al.
(2022) from one forward pass per batch; `token_losses` is the float32 cross-entropy every
evaluation here shares. The other measurements: `induction.py` (copying a repeated random
sequence), `functional_rank.py` (how many key directions the loss needs), `weight_spectra.py` (the
singular values of each head's W_Q and W_K).

All functions are pure: they take a model (or a `logits_fn`) and fixed batches and return floats;
weights are never touched. Call them under the same autocast context as the trainer's evaluation:
the cross-entropy is done in float32 regardless.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from ..core.model import GPT

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # token ids (B, T) -> logits (B, T, V)

# Cross-entropy runs in float32 on chunks of at most this many logits (64 MiB), so bf16 logits of a
# large vocabulary (seed-88m: 49152) are never copied to float32 all at once.
_CE_CHUNK_ELEMS = 1 << 24


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every token in float32: logits (..., V), targets (...) -> (...)."""
    V = logits.shape[-1]
    flat, tgt = logits.reshape(-1, V), targets.reshape(-1)
    if flat.shape[0] != tgt.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
    out = torch.empty(tgt.shape[0], dtype=torch.float32, device=logits.device)
    rows = max(1, _CE_CHUNK_ELEMS // V)
    for i in range(0, tgt.shape[0], rows):
        out[i : i + rows] = F.cross_entropy(flat[i : i + rows].float(), tgt[i : i + rows], reduction="none")
    return out.view(targets.shape)


def _position_loss_sums(
    logits_fn: LogitsFn, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, int]:
    """Per-position sums of cross-entropy over all rows of all batches (T,), and the row count.
    One forward per batch; nothing is read back to the host here. rankscope's GPT runs its trunk
    and chunked per-token losses, so no (B, T, V) logits exist (1.6 GB in float32 at seed-88m's
    4 x 2048 x 49152); any other `logits_fn` returns its logits."""
    sums, n, T = None, 0, None
    for x, y in batches:
        loss = _losses(logits_fn, x, y)  # (B, T)
        if T is not None and loss.shape[1] != T:
            raise ValueError(f"every batch must have the same length, got {loss.shape[1]} after {T}")
        T = loss.shape[1]
        sums = loss.sum(0) if sums is None else sums + loss.sum(0)
        n += loss.shape[0]
    if sums is None:
        raise ValueError("no batches given")
    return sums, n


def _losses(logits_fn: LogitsFn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token float32 cross-entropy of the model on (x, y): (B, T)."""
    if isinstance(logits_fn, GPT):
        return logits_fn.token_losses(logits_fn.trunk(x), y)
    return token_losses(logits_fn(x), y)


@torch.no_grad()
def per_position_loss(logits_fn: LogitsFn, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean cross-entropy at each position (T,) over fixed (x, y) batches of equal length, where
    `logits_fn(x)` returns logits (B, T, V) (rankscope's GPT itself is such a function)."""
    sums, n = _position_loss_sums(logits_fn, batches)
    return sums / n


def icl_windows(T: int) -> tuple[slice, slice]:
    """The (early, late) position windows of `icl_score` for sequences of T positions.

    late:  the last 10% of positions, [T - ceil(T/10), T).
    early: [T//16, T//8) (positions 8..15 of 128, 128..255 of 2048). Olsson et al. (2022) compare
           the 500th token with the 50th of 512, i.e. about T/10: early enough that the model has
           seen little of the document, late enough that it is not predicting from the token alone.
    For T < 16 that window would be empty or hold position 0 (no context at all), so early is
    position 1, the first prediction made with any context. T must be at least 3.
    """
    if T < 3:
        raise ValueError(f"the in-context learning score needs at least 3 positions, got {T}")
    late = slice(T - math.ceil(T / 10), T)
    early = slice(T // 16, T // 8) if T >= 16 else slice(1, 2)
    return early, late


def icl_score(per_pos: torch.Tensor | Sequence[float]) -> float:
    """In-context learning score (Olsson et al. 2022, "In-context learning and induction heads"):
    mean loss over the late window minus mean loss over the early window (see `icl_windows`).
    Negative: later tokens are predicted better, so the model uses its context; more negative is
    more in-context learning."""
    per_pos = torch.as_tensor(per_pos, dtype=torch.float32)
    early, late = icl_windows(per_pos.shape[-1])
    return (per_pos[late].mean() - per_pos[early].mean()).item()


@torch.no_grad()
def loss_and_icl(logits_fn: LogitsFn, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """(mean validation loss, in-context learning score) from ONE forward per batch.

    Meant to replace the trainer's validation loss: the per-token losses it needs for the mean are
    the same ones the score needs per position, so the score costs nothing extra. The mean is over
    all tokens (equal to the mean of per-batch means when batches have equal size)."""
    sums, n = _position_loss_sums(logits_fn, batches)
    per_pos = sums / n
    early, late = icl_windows(per_pos.shape[0])
    mean, icl = torch.stack([per_pos.mean(), per_pos[late].mean() - per_pos[early].mean()]).tolist()  # one sync
    return mean, icl
