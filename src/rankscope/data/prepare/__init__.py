"""``rankscope data prepare``: turn text into modded-nanogpt token shards that ``--data`` trains on.

Sources (a file, or a folder searched recursively in sorted order): plain text files (one file is
one document), JSON Lines (one document per line, from a text field), Parquet (the text column,
read one record batch at a time), a folder written by ``datasets.save_to_disk`` (its ``.arrow``
files, read with pyarrow's IPC reader, so ``datasets`` is not needed), and, with the optional
``hub`` extra, a dataset streamed from the Hugging Face hub (``hf://datasets/NAME[/CONFIG][:SPLIT]``).

The documents form one token stream, each preceded by the end-of-text token (as modded-nanogpt's
FineWeb shards are). Its first ``val_tokens`` tokens become ``val_000000.bin`` (and further val
shards if needed) and the rest ``train_000000.bin``, ``train_000001.bin``, ... of exactly
``shard_tokens`` tokens each (the last one shorter). Shards cut through documents, as FineWeb's do.

Output is a pure function of the input and the options that shape it: documents are read by one
reader in a fixed order and tokenized in batches whose results are consumed in submission order,
so ``workers`` only changes the speed. That same determinism makes preparation resumable: after
each shard is fsynced, ``prepare_state.json`` records where in the sources the next token comes
from, and a re-run continues from the last shard that is intact on disk.

The package, one job per module, in the order the data flows:

- :mod:`.sources`: find the sources under SRC and check each one can be read;
- :mod:`.tokenizer_spec`: what ``--tokenizer`` names, how to get it, its separator id;
- :mod:`.reader`: every source, from a resume position on, cut into units;
- :mod:`.decode`: unit payloads back into document texts;
- :mod:`.encode`: units batched and tokenized, in process or on a worker pool, in order;
- :mod:`.sink`: the token stream cut into val and train shards, a resume point after each;
- :mod:`.outdir`: the output folder's state file, lock, and checks on what it holds;
- :mod:`.pipeline`: :func:`prepare`, the steps from arguments to a finished folder;
- :mod:`.cli`: the command-line arguments and the one-line summary.
"""

from ..format import META_FILE, PREPARE_FORMAT, STATE_FILE, TOKENIZER_FILE
from .cli import add_arguments, run
from .pipeline import DEFAULT_SHARD_TOKENS, DEFAULT_VAL_TOKENS, prepare

__all__ = [
    "DEFAULT_SHARD_TOKENS",
    "DEFAULT_VAL_TOKENS",
    "META_FILE",
    "PREPARE_FORMAT",
    "STATE_FILE",
    "TOKENIZER_FILE",
    "add_arguments",
    "prepare",
    "run",
]
