"""Encoding: units grouped into batches, each batch tokenized, in process or on a worker pool.

Results come back strictly in submission order, so the number of workers changes only the
speed, never the tokens. The sizes below decide how work is cut up, never which tokens come out.
"""

from __future__ import annotations

import os
import re
import signal
from collections import deque
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from ..tokenizer import split_text
from .decode import payload_texts
from .reader import Pos, Unit

BATCH_BYTES = 4 << 20  # text handed to one encode_batch call (bounds the Encoding objects' memory)
# A pool task is smaller: many tasks per worker keep them all busy to the end, and one task's
# cost (about a second of one core) dwarfs the inter-process transfer.
TASK_BYTES = 1 << 20
PIECE_CHARS = 64 << 10  # long documents are encoded in pieces so encode_batch spreads them over cores

_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Batch:
    """Units grouped for one encode call (one pool task)."""

    pos: Pos  # where its first unit starts: a valid point to resume reading from
    progress_before: int  # source bytes before ``pos``
    progress: int
    payloads: list[tuple]


def _batches(units: Iterable[Unit], progress_before: int, limit: int) -> Iterator[Batch]:
    """Group units into batches of about ``limit`` bytes of text.

    Batches only decide how work is shared out: any batch start is a valid resume point, and
    the tokens from a position on do not depend on how they were grouped.
    """
    batch: Batch | None = None
    size = 0
    for u in units:
        if batch is None:
            batch, size = Batch(u.pos, progress_before, 0, []), 0
        batch.payloads.append(u.payload)
        batch.progress += u.progress
        size += u.size
        if size >= limit:
            progress_before += batch.progress
            yield batch
            batch = None
    if batch is not None:
        yield batch


@dataclass(frozen=True)
class EncoderSpec:
    """What a worker process needs to build its :class:`Encoder` (sent to it pickled)."""

    tokenizer_json: str
    eot_id: int
    splittable: bool
    text_field: str


class Encoder:
    """Turns a batch's payloads into (uint16 tokens, offsets of the document starts in them)."""

    def __init__(self, spec: EncoderSpec):
        tok = Tokenizer.from_str(spec.tokenizer_json)
        # A hub tokenizer.json may carry truncation (e.g. 512 tokens) or padding settings meant
        # for a model's inputs; applied here they would silently cut documents.
        tok.no_truncation()
        tok.no_padding()
        # A literal "<|endoftext|>" inside a document is ordinary text, so the EOT id in a shard
        # always marks a real document boundary (tiktoken's encode_ordinary, as FineWeb used).
        tok.encode_special_tokens = True
        self._tok = tok
        self._encode = getattr(tok, "encode_batch_fast", None) or tok.encode_batch
        self._eot = np.array([spec.eot_id], dtype=np.uint16)
        self._spec = spec

    def __call__(self, payloads: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
        pieces: list[str] = []
        starts: list[bool] = []
        for payload in payloads:
            for doc_start, text in payload_texts(payload, self._spec.text_field):
                parts = split_text(text, PIECE_CHARS) if self._spec.splittable else [text]
                pieces.extend(parts)
                starts.extend([doc_start] + [False] * (len(parts) - 1))
        if not pieces:
            return np.zeros(0, dtype=np.uint16), np.zeros(0, dtype=np.int64)
        try:
            encodings = self._encode(pieces, add_special_tokens=False)
        except (TypeError, UnicodeEncodeError):
            # JSON can spell lone surrogates ("\ud800"), which are not text and which the
            # tokenizer cannot take; they become U+FFFD, as a UTF-8 decoder would make them.
            pieces = [_SURROGATE.sub("\ufffd", p) for p in pieces]
            encodings = self._encode(pieces, add_special_tokens=False)
        arrays: list[np.ndarray] = []
        doc_starts: list[int] = []
        n = 0
        for doc_start, enc in zip(starts, encodings):
            if doc_start:
                doc_starts.append(n)
                arrays.append(self._eot)
                n += 1
            ids = np.array(enc.ids, dtype=np.uint16)
            arrays.append(ids)
            n += ids.shape[0]
        return np.concatenate(arrays), np.array(doc_starts, dtype=np.int64)


_WORKER_ENCODER: Encoder | None = None


def _init_worker(spec: EncoderSpec, threads: int) -> None:
    # Ctrl-C reaches the whole process group; the parent alone handles it (and stops the pool),
    # instead of every worker dying with its own traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Each process gets its share of the cores for encode_batch's Rust threads; this must be
    # set before tokenizers first starts its thread pool.
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    global _WORKER_ENCODER
    _WORKER_ENCODER = Encoder(spec)


def _worker_encode(payloads: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
    assert _WORKER_ENCODER is not None
    return _WORKER_ENCODER(payloads)


def encoded(
    units: Iterable[Unit], progress_before: int, spec: EncoderSpec, workers: int
) -> Generator[tuple[Batch, np.ndarray, np.ndarray], None, None]:
    """(batch, tokens, document starts) for ``units`` batched, in order; ``progress_before`` is
    the source bytes before the first unit. Close the generator to stop a pool at once."""
    batches = _batches(units, progress_before, BATCH_BYTES if workers == 1 else TASK_BYTES)
    if workers == 1:
        encoder = Encoder(spec)
        for batch in batches:
            yield (batch, *encoder(batch.payloads))
        return
    import multiprocessing
    from concurrent.futures import Future, ProcessPoolExecutor

    threads = max(1, (os.cpu_count() or 1) // workers)
    # spawn, not fork: a forked child inherits tokenizers' thread pool in a broken state (and
    # torch's), while a fresh interpreter starts clean on every platform.
    executor = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(spec, threads),
    )
    pending: deque[tuple[Batch, Future]] = deque()
    try:
        for batch in batches:
            pending.append((batch, executor.submit(_worker_encode, batch.payloads)))
            # A bounded window keeps memory flat: the reader never runs far ahead of the writer.
            if len(pending) >= 2 * workers:
                b, fut = pending.popleft()
                yield (b, *fut.result())
        while pending:
            b, fut = pending.popleft()
            yield (b, *fut.result())
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
