"""The on-disk formats the data layer writes and reads back: token shards and prepared folders.

A token shard is a modded-nanogpt ``.bin`` file: a header of 256 little-endian int32 —
``header[0]`` the magic 20240520, ``header[1]`` the version 1, ``header[2]`` the number of
tokens — followed by exactly that many little-endian uint16 tokens. Using this format unchanged
means shards written by modded-nanogpt (or its FineWeb download scripts) can be trained on
directly, and ours can be read by their code.

A folder written by ``rankscope data prepare`` holds ``val_000000.bin``, ... and
``train_000000.bin``, ... (the loader takes every ``*.bin`` whose name contains ``val`` as
validation), the ``tokenizer.json`` they were made with, and ``meta.json``, whose ``format`` is
:data:`PREPARE_FORMAT` and which is written last, with ``"complete": true`` as its last key.
While a prepare is unfinished the folder holds ``prepare_state.json`` instead of a complete
``meta.json``, and the loader refuses it.
"""

from __future__ import annotations

import numpy as np

# Token shards.
SHARD_SUFFIX = ".bin"
SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
TOKEN_BYTES = TOKEN_DTYPE.itemsize
# uint16 holds ids 0..65535, so a vocabulary may have at most 65536 entries.
MAX_VOCAB = int(np.iinfo(np.uint16).max) + 1
# header[2] is an int32, which caps a single shard at 2**31 - 1 tokens.
MAX_SHARD_TOKENS = int(np.iinfo(np.int32).max)
# The shard layout in one line, as recorded in a prepared folder's meta.json.
SHARD_FORMAT = (
    f"modded-nanogpt {SHARD_SUFFIX} ({HEADER_INTS} x int32 header: {SHARD_MAGIC}, {SHARD_VERSION}, n; "
    "then uint16 tokens)"
)


def pack_header(n_tokens: int) -> bytes:
    """The header of a shard holding ``n_tokens`` tokens."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, n_tokens
    return header.tobytes()


def unpack_header(raw: bytes) -> tuple[int, int, int]:
    """(magic, version, token count) from the first :data:`HEADER_BYTES` bytes of a shard."""
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    return int(header[0]), int(header[1]), int(header[2])


def shard_name(split: str, index: int) -> str:
    """``train_000003.bin``: the name of a prepared folder's ``index``-th shard of ``split``."""
    return f"{split}_{index:06d}{SHARD_SUFFIX}"


# Prepared folders (``rankscope data prepare``). PREPARE_FORMAT is recorded with the arguments, so
# an output of another format is never resumed or reused, and the loader reads meta.json only
# when it names this format.
PREPARE_FORMAT = "rankscope-prepare-v1"
META_FILE = "meta.json"
STATE_FILE = "prepare_state.json"
TOKENIZER_FILE = "tokenizer.json"
