"""Training and evaluation windows over token shards.

Every window is ``seq_len + 1`` consecutive tokens from one array; ``x`` is its first ``seq_len``
tokens and ``y`` the last ``seq_len`` (the next-token targets). Windows never straddle two
arrays, so the positions to draw from are the concatenation of each array's valid start offsets.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .errors import DataError

if TYPE_CHECKING:
    import torch

# torch is imported where the windows become tensors, not here: `rankscope data prepare --help`
# imports this package and should not pay for torch.


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _window_sources(shards: Sequence[np.ndarray], seq_len: int, what: str) -> list[np.ndarray]:
    """The arrays windows are drawn from.

    Arrays long enough for a window are used as they are; the ones too short on their own (tiny
    validation files) are joined into one extra array so their tokens still count. Raises
    DataError when all of them together hold fewer than ``seq_len + 1`` tokens.
    """
    need = seq_len + 1
    # np.asarray drops the memmap subclass (same memory, no copy): plain ndarrays index faster.
    arrays = [np.asarray(s) for s in shards]
    for a in arrays:
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"token arrays must be 1-D integer arrays, got {a.dtype} of shape {a.shape}")
    total = sum(int(a.shape[0]) for a in arrays)
    if total < need:
        raise DataError(
            f"{what} data has {total} tokens in {len(arrays)} shard(s), fewer than seq_len + 1 = {need}; "
            "use a shorter sequence length or more data"
        )
    sources = [a for a in arrays if a.shape[0] >= need]
    short = [a for a in arrays if 0 < a.shape[0] < need]
    if short:
        joined = np.concatenate(short)
        if joined.shape[0] >= need:
            sources.append(joined)
    return sources


class _Windows:
    """Maps global window indices (0 .. n_windows-1) to token rows."""

    def __init__(self, sources: list[np.ndarray], seq_len: int):
        self.sources = sources
        counts = np.array([s.shape[0] - seq_len for s in sources], dtype=np.int64)
        self.ends = np.cumsum(counts)
        self.firsts = self.ends - counts
        self.n_windows = int(self.ends[-1])
        self.offsets = np.arange(seq_len + 1, dtype=np.int64)
        self.dtype = np.result_type(*(s.dtype for s in sources))

    def rows(self, g: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.sources) == 1:
            rows = self.sources[0][g[:, None] + self.offsets]
        else:
            which = np.searchsorted(self.ends, g, side="right")
            local = g - self.firsts[which]
            rows = np.empty((g.shape[0], self.offsets.shape[0]), dtype=self.dtype)
            for k in np.unique(which):
                m = which == k
                rows[m] = self.sources[k][local[m, None] + self.offsets]
        # Separate contiguous copies: targets are usually flattened with .view(-1), which a
        # strided slice of one shared buffer would not allow.
        import torch

        x = torch.from_numpy(rows[:, :-1].astype(np.int64, order="C"))
        y = torch.from_numpy(rows[:, 1:].astype(np.int64, order="C"))
        return x, y


class BatchSampler:
    """Random training windows, a pure function of (seed, step): the same seed gives the same
    batches in the same order, whatever the model.

    Each batch draws ``batch_size`` window starts uniformly over every valid start in every shard
    (so shards are weighted by length) from a generator seeded with ``[seed, step]``. Nothing is
    carried between calls, so resuming at step ``k`` needs no sampler state, and two arms of a
    study that share a seed see identical data.
    """

    def __init__(self, shards: list[np.ndarray], batch_size: int, seq_len: int, seed: int):
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seq_len = _check_int("seq_len", seq_len, 1)
        self.seed = _check_int("seed", seed, 0)  # SeedSequence rejects negative entropy
        self._windows = _Windows(_window_sources(shards, self.seq_len, "training"), self.seq_len)

    @property
    def n_windows(self) -> int:
        """Number of distinct windows batches are drawn from."""
        return self._windows.n_windows

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``, both int64 of shape ``(batch_size, seq_len)``, with ``y[:, :-1] == x[:, 1:]``."""
        step = _check_int("step", step, 0)
        rng = np.random.default_rng([self.seed, step])
        g = rng.integers(0, self._windows.n_windows, size=self.batch_size, dtype=np.int64)
        return self._windows.rows(g)

    def __repr__(self) -> str:
        return (
            f"BatchSampler(batch_size={self.batch_size}, seq_len={self.seq_len}, seed={self.seed}, "
            f"windows={self.n_windows})"
        )


def fixed_batches(
    shards: list[np.ndarray], n_batches: int, batch_size: int, seq_len: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic evaluation batches: ``n_batches * batch_size`` windows evenly spaced over all
    valid starts in all shards, no randomness involved.

    Windows are dealt round-robin (batch ``k`` holds windows ``k, k + n_batches, ...``) so every
    batch spans the whole data set and evaluating only the first few batches still samples all of
    it. When the data holds fewer than that many non-overlapping windows they overlap (or repeat)
    instead of failing; fewer than ``seq_len + 1`` tokens in total raises :class:`DataError`.
    """
    n_batches = _check_int("n_batches", n_batches, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    seq_len = _check_int("seq_len", seq_len, 1)
    windows = _Windows(_window_sources(shards, seq_len, "evaluation"), seq_len)
    n = n_batches * batch_size
    # Exact integer spacing; the product stays far below 2**63 for any realistic data size.
    g = (np.arange(n, dtype=np.int64) * windows.n_windows) // n
    return [windows.rows(g[k::n_batches]) for k in range(n_batches)]
