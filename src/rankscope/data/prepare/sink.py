"""The shard sink: the token stream cut into val then train shards, with a resume point after each.

Token ``t`` of the stream goes to val shard ``t // S`` while ``t < V``, else to train shard
``(t - V) // S``. Each closed shard is fsynced into place, then appended to the state with the
reader position of the batch holding the next token and how many of that batch's tokens are
already written, and the state is saved: the point a re-run resumes from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..format import shard_name
from ..shards import ShardWriter
from . import outdir
from .encode import Batch

# Validation never takes more than 1/VAL_SHARE of the tokens, so a small input still leaves
# most of itself for training. Deciding this needs the total, so the head of the stream (at
# most VAL_SHARE * val_tokens tokens, 200 MB at the defaults) is held in memory until it is known.
VAL_SHARE = 10


class ShardSink:
    """Writes the token stream, batch by batch, into shards of ``shard_tokens`` tokens.

    ``val_tokens`` is the validation size asked for. Until the size is decided (on a fresh
    start; a resumed run finds it in the state) the sink holds what it is given, and decides
    once it holds ``VAL_SHARE * val_tokens`` tokens or the stream ends.
    """

    def __init__(self, out: Path, state: dict[str, Any], state_path: Path, shard_tokens: int, val_tokens: int):
        self.out, self.state, self.state_path = out, state, state_path
        self.shard_tokens, self.val_asked = shard_tokens, val_tokens
        self.val_tokens: int | None = state["val_tokens"]  # V, once decided
        shards = state["shards"]
        last = shards[-1]["resume"] if shards else None
        self.written = last["tokens"] if last else 0
        self.docs = last["documents"] if last else 0
        self.writer: ShardWriter | None = None
        self.end = 0
        self.split = ""
        self.shard_docs = 0
        self.last_resume: dict[str, Any] | None = last
        self._head: list[tuple[Batch, int, np.ndarray, np.ndarray]] = []  # held until V is known
        self._head_tokens = 0

    def write(self, batch: Batch, t0: int, tokens: np.ndarray, doc_starts: np.ndarray) -> None:
        """Take ``tokens``, the next of the stream; ``t0`` is the stream offset where ``batch`` began."""
        if self.val_tokens is None:
            self._head.append((batch, t0, tokens, doc_starts))
            self._head_tokens += tokens.shape[0]
            if self._head_tokens >= VAL_SHARE * self.val_asked:
                self._decide_val(self.val_asked)
            return
        self._append(batch, t0, tokens, doc_starts)

    def finish(self) -> None:
        """The stream has ended: write what is held and close the last shard."""
        if self.val_tokens is None:
            # The whole stream is shorter than VAL_SHARE * val_tokens: a tenth of it is validation.
            self._decide_val(min(self.val_asked, self._head_tokens // VAL_SHARE))
        if self.writer is not None:
            assert self.last_resume is not None
            self._close(self.last_resume)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None

    def _decide_val(self, val_tokens: int) -> None:
        self.val_tokens = self.state["val_tokens"] = val_tokens
        for item in self._head:
            self._append(*item)
        self._head.clear()

    def _append(self, batch: Batch, t0: int, tokens: np.ndarray, doc_starts: np.ndarray) -> None:
        """Append ``tokens``, stream offsets ``self.written`` on, closing each shard as it fills."""
        i = 0
        while i < tokens.shape[0]:
            if self.writer is None:
                self._open()
            n = min(tokens.shape[0] - i, self.end - self.written)
            self.writer.write(tokens[i : i + n])  # type: ignore[union-attr]
            docs = int(np.count_nonzero((doc_starts >= i) & (doc_starts < i + n)))
            self.shard_docs += docs
            self.docs += docs
            self.written += n
            i += n
            self.last_resume = {
                "pos": list(batch.pos),
                "skip": self.written - t0,
                "tokens": self.written,
                "documents": self.docs,
                "progress": batch.progress_before,
            }
            if self.written == self.end:
                self._close(self.last_resume)

    def _open(self) -> None:
        V = self.val_tokens
        assert V is not None
        if self.written < V:
            self.split, index = "val", self.written // self.shard_tokens
            self.end = min(V, (index + 1) * self.shard_tokens)
        else:
            self.split, index = "train", (self.written - V) // self.shard_tokens
            self.end = V + (index + 1) * self.shard_tokens
        self.writer = ShardWriter(self.out / shard_name(self.split, index))
        self.shard_docs = 0

    def _close(self, resume: dict[str, Any]) -> None:
        assert self.writer is not None
        writer, self.writer = self.writer, None
        writer.close()  # fsynced and renamed into place before the state mentions it
        self.state["shards"].append(
            {
                "name": writer.path.name,
                "split": self.split,
                "tokens": writer.n_tokens,
                "documents": self.shard_docs,
                "resume": resume,
            }
        )
        outdir.save_state(self.state_path, self.state)
