"""Reading and writing token shards (the modded-nanogpt ``.bin`` layout of :mod:`.format`).

Shards are written atomically (:mod:`rankscope.storage.fsio`: a temporary file in the same folder,
fsync, rename) so a killed writer never leaves a file that looks complete, and they are read as
memory maps so a 100M-token shard costs no RAM until windows are actually gathered from it.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from ..storage.fsio import commit, open_temp
from .errors import DataError
from .format import (
    HEADER_BYTES,
    MAX_SHARD_TOKENS,
    MAX_VOCAB,
    SHARD_MAGIC,
    SHARD_VERSION,
    TOKEN_BYTES,
    TOKEN_DTYPE,
    pack_header,
    unpack_header,
)


def _as_tokens(tokens: Any, where: str) -> np.ndarray:
    """Validate an array of token ids and return it as contiguous little-endian uint16."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise DataError(f"shard {where}: tokens must be a 1-D array, got shape {arr.shape}")
    if arr.dtype == TOKEN_DTYPE or arr.dtype == np.uint16:
        return np.ascontiguousarray(arr, dtype=TOKEN_DTYPE)
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"shard {where}: tokens must be integers, got dtype {arr.dtype}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0:
            raise DataError(f"shard {where}: negative token id {lo}")
        if hi >= MAX_VOCAB:
            raise DataError(
                f"shard {where}: token id {hi} does not fit in uint16 (vocabularies above "
                f"{MAX_VOCAB} entries cannot be stored in this format)"
            )
    return np.ascontiguousarray(arr, dtype=TOKEN_DTYPE)


class ShardWriter:
    """Stream tokens into a shard without holding them all in memory.

    The header's token count is only known at the end, so a placeholder header is written first
    and patched on :meth:`close`; until then the data lives in a hidden temporary file next to
    the target, which replaces the target in one rename. Used as a context manager, an exception
    inside the block discards the temporary file and leaves any existing target untouched.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.n_tokens = 0
        try:
            tmp, f = open_temp(self.path)
        except FileNotFoundError:
            raise DataError(f"shard {self.path}: folder {self.path.parent} does not exist") from None
        self._tmp = tmp
        self._f: Any = f
        self._f.write(pack_header(0))

    def write(self, tokens: Any) -> None:
        if self._f is None:
            raise ValueError(f"shard {self.path}: writer is already closed")
        arr = _as_tokens(tokens, str(self.path))
        if self.n_tokens + arr.size > MAX_SHARD_TOKENS:
            raise DataError(
                f"shard {self.path}: more than {MAX_SHARD_TOKENS} tokens do not fit in one shard "
                "(the header stores the count as int32); split the data into several shards"
            )
        self._f.write(memoryview(arr).cast("B"))
        self.n_tokens += int(arr.size)

    def close(self) -> None:
        if self._f is None:
            return
        f, self._f = self._f, None
        try:
            f.seek(0)
            f.write(pack_header(self.n_tokens))
        except BaseException:
            f.close()
            self._tmp.unlink(missing_ok=True)
            raise
        commit(self._tmp, f, self.path)

    def abort(self) -> None:
        if self._f is None:
            return
        f, self._f = self._f, None
        f.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    """Write ``tokens`` (1-D integer ids, each < 65536) to ``path`` atomically."""
    with ShardWriter(path) as w:
        w.write(tokens)


def read_shard(path: str | Path) -> np.ndarray:
    """Memory-map the tokens of a shard after checking every header field against the file.

    Returns a read-only 1-D uint16 ``np.memmap`` (a plain empty array for a zero-token shard,
    since an empty region cannot be mapped). Raises :class:`DataError` naming the file when it is
    shorter than the header, has the wrong magic or version, or its size disagrees with the
    token count in the header (truncated or trailing bytes).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise DataError(f"shard {path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"shard {path}: is a folder, not a shard file") from None
    except OSError as e:
        raise DataError(f"shard {path}: cannot read ({e.strerror or e})") from None
    if len(raw) < HEADER_BYTES:
        raise DataError(f"shard {path}: file is {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    magic, version, n_tokens = unpack_header(raw)
    if magic != SHARD_MAGIC:
        raise DataError(f"shard {path}: bad magic {magic} (expected {SHARD_MAGIC})")
    if version != SHARD_VERSION:
        raise DataError(f"shard {path}: unsupported version {version} (expected {SHARD_VERSION})")
    if n_tokens < 0:
        raise DataError(f"shard {path}: negative token count {n_tokens} in header")
    expected = HEADER_BYTES + n_tokens * TOKEN_BYTES
    if size != expected:
        problem = "truncated" if size < expected else "has extra bytes"
        raise DataError(
            f"shard {path}: {problem}: header says {n_tokens} tokens ({expected} bytes) but the file is {size} bytes"
        )
    if n_tokens == 0:
        return np.zeros(0, dtype=np.uint16)
    # dtype np.uint16 (native) rather than '<u2' so callers see the plain uint16 they expect;
    # the two are the same on every little-endian machine torch supports.
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def truncate_shard(path: str | Path, n_tokens: int) -> None:
    """Cut a shard down to its first ``n_tokens`` tokens in place (header patched, file shrunk).

    Only for files nobody else can see yet (a shard inside a cache folder still being built):
    unlike :func:`write_shard` it is not atomic.
    """
    path = Path(path)
    with open(path, "r+b") as f:
        f.write(pack_header(n_tokens))
        f.truncate(HEADER_BYTES + n_tokens * TOKEN_BYTES)
        f.flush()
        os.fsync(f.fileno())


def max_token_id(tokens: np.ndarray) -> int:
    """Largest id in a token array, or -1 when it is empty (one pass; fine for 100M-token memmaps)."""
    return int(tokens.max()) if tokens.size else -1


def padded_vocab_size(max_id: int, multiple: int = 64) -> int:
    """Smallest multiple of ``multiple`` that can hold ids up to ``max_id``.

    Multiples of 64 keep the embedding and output matrices friendly to tensor cores.
    """
    return -(-(max_id + 1) // multiple) * multiple
