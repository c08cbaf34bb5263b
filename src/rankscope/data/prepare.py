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
"""

from __future__ import annotations

import argparse
import codecs
import gzip
import hashlib
import json
import os
import re
import secrets
import signal
import sys
import time
import zlib
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from .cache import human_count
from .corpus import _USER_SKIPPED_DIRS, TEXT_SUFFIXES
from .errors import DataError
from .shards import MAX_SHARD_TOKENS, MAX_VOCAB, ShardWriter, _fsync_dir, padded_vocab_size, read_shard
from .tokenizer import EOT_TOKEN, split_text, train_tokenizer

PREPARE_FORMAT = "rankscope-prepare-v1"
META_FILE = "meta.json"
STATE_FILE = "prepare_state.json"
TOKENIZER_FILE = "tokenizer.json"

DEFAULT_SHARD_TOKENS = 100_000_000  # FineWeb's shard size in modded-nanogpt
DEFAULT_VAL_TOKENS = 10_000_000
# Validation never takes more than 1/VAL_SHARE of the tokens, so a small input still leaves
# most of itself for training. Deciding this needs the total, so the head of the stream (at
# most VAL_SHARE * val_tokens tokens, 200 MB at the defaults) is held in memory until it is known.
VAL_SHARE = 10

HUB_PREFIX = "hf://datasets/"
TRAIN_PREFIX = "train:"
# `train:VOCAB` learns the BPE on at most this many characters of the source: merges stop
# changing long before that, and the trainer's word counts grow with the text.
TRAIN_MAX_CHARS = 2 << 30

# Reading and batching sizes. They decide how work is cut up, never which tokens come out.
TEXT_BLOCK_BYTES = 4 << 20  # text files larger than this are read in blocks (when exact)
JSONL_CHUNK_BYTES = 1 << 20
UNIT_ROWS = 1024  # rows per unit from Parquet, Arrow and hub sources
UNIT_BYTES = 1 << 20
BATCH_BYTES = 4 << 20  # text handed to one encode_batch call (bounds the Encoding objects' memory)
# A pool task is smaller: many tasks per worker keep them all busy to the end, and one task's
# cost (about a second of one core) dwarfs the inter-process transfer.
TASK_BYTES = 1 << 20
PIECE_CHARS = 64 << 10  # long documents are encoded in pieces so encode_batch spreads them over cores

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
# The loader's text extensions, less .jsonl which is read as JSON Lines here.
PREPARE_TEXT_SUFFIXES = frozenset(TEXT_SUFFIXES - {".jsonl"})
HF_DATASET_MARKERS = ("state.json", "dataset_info.json")
# End-of-sequence spellings recognised among a tokenizer's special tokens, in order of preference.
EOS_CANDIDATES = ("<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|endofdocument|>")

_SURROGATE = re.compile("[\ud800-\udfff]")
_TMP_NAME = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

Pos = tuple[int, int]  # (source index, byte offset or row offset inside that source)


def _log(progress: bool, msg: str) -> None:
    # stderr only: stdout carries the one-line summary.
    if progress:
        print(f"rankscope: {msg}", file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


# --------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class _Source:
    """One readable input: a text/JSONL/Parquet/Arrow file, or a hub stream."""

    kind: str  # "text" | "jsonl" | "parquet" | "arrow" | "hub"
    label: str  # shown in messages: the path, or the hf:// address
    path: Path | None = None
    relpath: str = ""  # key for the fingerprint: the path relative to SRC
    size: int = 0  # bytes on disk (progress and fingerprint)
    mtime_ns: int = 0
    rows: int = 0  # Parquet/Arrow row count, to spread the file size over rows for progress
    hub: tuple[str, str | None, str] | None = None  # (name, config, split)

    @property
    def progress_size(self) -> int:
        if self.kind == "jsonl" and self.label.lower().endswith(".gz"):
            return _gzip_size(self.path, self.size)  # units report uncompressed bytes
        return self.size


def _gzip_size(path: Path | None, fallback: int) -> int:
    # The gzip trailer's ISIZE is the uncompressed size mod 2**32: exact below 4 GiB, and only
    # ever used to size the progress bar.
    try:
        with open(path, "rb") as f:  # type: ignore[arg-type]
            f.seek(-4, os.SEEK_END)
            isize = int.from_bytes(f.read(4), "little")
    except OSError:
        return fallback
    while isize < fallback:
        isize += 1 << 32
    return isize


def _parse_hub(src: str) -> tuple[str, str | None, str]:
    rest = src[len(HUB_PREFIX) :]
    rest, _, split = rest.partition(":")
    parts = [p for p in rest.split("/") if p]
    if not parts or len(parts) > 3 or not split and ":" in src[len(HUB_PREFIX) :]:
        raise DataError(
            f"source {src}: expected hf://datasets/NAME[/CONFIG][:SPLIT], "
            "e.g. hf://datasets/HuggingFaceFW/fineweb-edu/sample-10BT:train"
        )
    # NAME is "org/name" (the hub's usual form) or a bare legacy name.
    if len(parts) == 3:
        name, config = "/".join(parts[:2]), parts[2]
    else:
        name, config = "/".join(parts), None
    return name, config, split or "train"


def _import_pyarrow() -> Any:
    try:
        import pyarrow
    except ImportError:
        raise DataError("reading Parquet and Arrow files needs pyarrow: pip install pyarrow") from None
    return pyarrow


def _is_text_type(t: Any) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    is_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16
    return pa.types.is_string(t) or pa.types.is_large_string(t) or is_view(t)


def _check_text_column(label: str, names: list[str], types: list[Any], field: str, what: str) -> None:
    if field not in names:
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise DataError(f"{label}: no {what} {field!r} (it has: {shown}); choose one with --text-field")
    t = types[names.index(field)]
    if not _is_text_type(t):
        raise DataError(
            f"{label}: {what} {field!r} holds {t}, not text; choose a string {what} with --text-field"
        )


def _ipc_reader(source: Any) -> tuple[Any, Iterator[Any]]:
    """(schema, record batches) of an Arrow IPC stream (what save_to_disk writes) or IPC file."""
    import pyarrow as pa

    try:
        reader = pa.ipc.open_stream(source)
        return reader.schema, iter(reader)
    except pa.ArrowInvalid:
        source.seek(0)
        fr = pa.ipc.open_file(source)
        return fr.schema, (fr.get_batch(i) for i in range(fr.num_record_batches))


def _checked_arrow(src: _Source, field: str) -> _Source:
    pa = _import_pyarrow()
    path = src.path
    try:
        with pa.memory_map(str(path)) as mm:
            schema, batches = _ipc_reader(mm)
            _check_text_column(str(path), schema.names, schema.types, field, "column")
            # Counting rows walks the batch headers of a memory map: no data is read.
            rows = sum(b.num_rows for b in batches)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Arrow file ({_one_line(e)})") from None
    return replace(src, rows=rows)


def _checked_parquet(src: _Source, field: str) -> _Source:
    pa = _import_pyarrow()
    import pyarrow.parquet as pq

    path = src.path
    try:
        pf = pq.ParquetFile(str(path))
        schema = pf.schema_arrow
        rows = pf.metadata.num_rows
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({_one_line(e)})") from None
    _check_text_column(str(path), schema.names, schema.types, field, "column")
    return replace(src, rows=rows)


def _checked_jsonl(src: _Source, field: str) -> _Source:
    path = src.path
    assert path is not None
    # Check the field on the first record now, so a wrong --text-field fails in a second rather
    # than after a tokenizer has been trained; later records are checked as they are read.
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    for _ in _jsonl_texts(str(path), n, line, field):
                        pass
                    break
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({_one_line(e)})") from None
    return src


def _text_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used as a text document (None when it can).

    The loader's rule, checked over the whole file in blocks: UTF-8 without NUL bytes (which
    never occur in text). Checking while listing, rather than while tokenizing, means an
    unusable file is skipped before any of it is written, the same way on every run.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(TEXT_BLOCK_BYTES)
            nul = block.find(b"\x00")
            if nul != -1:
                return f"not a text file (NUL byte at offset {offset + nul})"
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                return f"not UTF-8 text (bad byte near offset {offset + max(e.start, 0)})"
            if not block:
                return None
            offset += len(block)


def _checked_text(src: _Source, explicit: bool, skipped: list[str]) -> _Source | None:
    assert src.path is not None
    problem = "empty" if src.size == 0 else _text_problem(src.path)
    if problem is not None:
        if explicit:
            raise DataError(f"{src.path} is {problem}; convert it to UTF-8 text or pass another source")
        if src.size:
            skipped.append(src.relpath)  # empty files are no loss; the rest are reported
        return None
    return src


def _named_file(path: Path, relpath: str) -> _Source:
    """The source for a file named explicitly (SRC itself, or a dataset's listed .arrow file)."""
    source = _discovered_file(path, relpath, explicit=True)
    assert source is not None  # explicit files are always taken, as text if nothing else
    return source


def _discovered_file(path: Path, relpath: str, explicit: bool) -> _Source | None:
    """A source for ``path`` judged by its name and stat alone, or None for other files."""
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        kind = "jsonl"
    elif name.endswith(".parquet"):
        kind = "parquet"
    elif name.endswith(".arrow"):
        kind = "arrow"
    elif explicit or os.path.splitext(name)[1] in PREPARE_TEXT_SUFFIXES | {""}:
        kind = "text"
    else:
        return None
    st = path.stat()
    return _Source(kind, str(path), path, relpath, st.st_size, st.st_mtime_ns)


def _hf_dataset_arrow_files(folder: Path) -> list[Path] | None:
    """The ``.arrow`` files of a ``save_to_disk`` folder in dataset order, or None if it is not one."""
    if not any((folder / m).is_file() for m in HF_DATASET_MARKERS):
        return None
    arrows = sorted(p for p in folder.glob("*.arrow") if p.is_file())
    if not arrows:
        return None
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        listed = [folder / d["filename"] for d in state["_data_files"]]
        if listed and all(p.is_file() for p in listed):
            return listed  # the order the rows were written in
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return arrows


def _check_dataset_dict(folder: Path) -> None:
    marker = folder / "dataset_dict.json"
    if not marker.is_file():
        return
    try:
        splits = json.loads(marker.read_text(encoding="utf-8")).get("splits") or []
    except (OSError, ValueError, AttributeError):
        splits = []
    names = ", ".join(map(str, splits)) or "several splits"
    example = f" {folder / str(splits[0])}" if splits else ""
    raise DataError(
        f"{folder} holds a DatasetDict ({names}); pass one split's folder as SRC, "
        f"e.g.{example or ' its train folder'}"
    )


def _discover(src: str, exclude: Path | None) -> list[_Source]:
    """Every candidate source under ``src`` in sorted order of relative path.

    Names and stat only, so it is cheap enough to run just to see whether a finished output is
    still up to date; :func:`_check_sources` then looks inside.
    """
    if src.startswith(HUB_PREFIX):
        return [_Source("hub", src, hub=_parse_hub(src))]
    root = Path(src).expanduser()
    if not root.exists():
        raise DataError(f"source {src} does not exist")
    try:
        if root.is_file():
            return [_named_file(root, root.name)]
        found: list[tuple[str, list[_Source]]] = []
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            if exclude is not None and here.resolve() == exclude:
                dirnames[:] = []
                continue  # our own output inside SRC must not become input on a re-run
            _check_dataset_dict(here)
            rel_dir = here.relative_to(root).as_posix()
            arrows = _hf_dataset_arrow_files(here)
            if arrows is not None:
                dirnames[:] = []  # a dataset folder is one source; its JSON files are metadata
                key = "" if rel_dir == "." else rel_dir
                found.append((key, [_named_file(p, p.relative_to(root).as_posix()) for p in arrows]))
                continue
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in _USER_SKIPPED_DIRS]
            for name in filenames:
                if name.startswith("."):
                    continue
                p = here / name
                if not p.is_file():
                    continue
                rel = p.relative_to(root).as_posix()
                source = _discovered_file(p, rel, explicit=False)
                if source is not None:
                    found.append((rel, [source]))
    except PermissionError as e:
        raise DataError(f"source {src}: permission denied reading {e.filename or src}") from None
    found.sort(key=lambda kv: kv[0])
    return [s for _, group in found for s in group]


def _check_sources(src: str, candidates: list[_Source], field: str) -> tuple[list[_Source], list[str]]:
    """Open every candidate: the text field or column must exist and text files must be UTF-8.

    Returns the usable sources and the relative paths of text files skipped as not text (only
    in a folder: a file named on its own raises). Raises DataError when nothing usable is left.
    """
    explicit = len(candidates) == 1 and not src.startswith(HUB_PREFIX) and Path(src).expanduser().is_file()
    sources: list[_Source] = []
    skipped: list[str] = []
    for c in candidates:
        if c.kind == "hub":
            _import_datasets()  # fail before anything is written when the extra is missing
            checked: _Source | None = c
        elif c.kind == "text":
            checked = _checked_text(c, explicit, skipped)
        elif c.kind == "jsonl":
            checked = _checked_jsonl(c, field)
        elif c.kind == "parquet":
            checked = _checked_parquet(c, field)
        else:
            checked = _checked_arrow(c, field)
        if checked is not None:
            sources.append(checked)
    if not sources:
        exts = " ".join(sorted(PREPARE_TEXT_SUFFIXES | set(JSONL_SUFFIXES) | {".parquet", ".arrow"}))
        note = f"; {len(skipped)} file(s) skipped as not UTF-8 text, e.g. {skipped[0]}" if skipped else ""
        raise DataError(
            f"source {src} has no usable files (looked for {exts}, files with no extension, "
            f"and save_to_disk dataset folders{note})"
        )
    return sources, skipped


def _fingerprint(sources: list[_Source]) -> list[list[Any]]:
    # Size and modification time stand in for content: hashing terabytes to detect a changed
    # source on resume would cost as much as preparing it again.
    return [[s.kind, s.relpath or s.label, s.size, s.mtime_ns] for s in sources]


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# Reading: sources -> units (pos, size, progress bytes, payload) -> batches


@dataclass
class _Unit:
    pos: Pos
    size: int  # bytes of text it carries (batching)
    progress: int  # source bytes it stands for (progress bar)
    payload: tuple


def _safe_byte_cut(data: bytes | bytearray, lo: int) -> int | None:
    """The last index ``i`` in ``(lo, len(data))`` where the UTF-8 ``data`` may be cut, or None.

    The byte version of :func:`rankscope.data.tokenizer.split_text`'s rule: a piece may start at
    a newline or space that follows a non-whitespace character, which splitting-safe tokenizers
    never merge across. The character before the cut is decoded to apply ``str.isspace``.
    """
    for sep in (b"\n", b" "):
        i = data.rfind(sep, lo + 1)
        while i > max(lo, 0):
            j = i - 1
            while j > 0 and i - j < 4 and data[j] & 0xC0 == 0x80:
                j -= 1  # back to the first byte of the preceding character
            try:
                ch = data[j:i].decode("utf-8")
            except UnicodeDecodeError:
                ch = " "  # undecodable: never cut here
            if ch and not ch[-1].isspace():
                return i
            i = data.rfind(sep, lo + 1, i)
    return None


def _text_units(index: int, src: _Source, start: int, splittable: bool) -> Iterator[_Unit]:
    assert src.path is not None
    with open(src.path, "rb") as f:
        if not splittable or src.size <= TEXT_BLOCK_BYTES:
            # One document read whole: a tokenizer that is not known to be exact on pieces
            # must see each document as one string.
            if start:
                raise DataError(
                    f"{src.label}: cannot resume inside this file; delete the output and start over"
                )
            data = f.read()
            yield _Unit((index, 0), len(data), len(data), ("text", src.label, 0, data))
            return
        off = start
        f.seek(off)
        buf = bytearray()
        scanned = 0  # bytes of buf already known to hold no cut point
        while True:
            chunk = f.read(TEXT_BLOCK_BYTES)
            buf += chunk
            if not buf:
                return
            if not chunk or off + len(buf) >= src.size:
                cut: int | None = len(buf)
            elif scanned:
                # Only the new bytes can hold a cut; rescanning the rest would make one huge
                # line without spaces quadratic.
                cut = _safe_byte_cut(buf, scanned - 1)
            else:
                # Prefer a cut in the second half, so blocks stay near TEXT_BLOCK_BYTES.
                cut = _safe_byte_cut(buf, len(buf) // 2) or _safe_byte_cut(buf, 0)
            if cut is None:
                scanned = len(buf)
                continue  # no place to cut yet: read on
            yield _Unit((index, off), cut, cut, ("text", src.label, off, bytes(buf[:cut])))
            off += cut
            del buf[:cut]
            scanned = 0


def _jsonl_units(index: int, src: _Source, start: int) -> Iterator[_Unit]:
    assert src.path is not None
    opener = gzip.open if src.label.lower().endswith(".gz") else open
    try:
        yield from _jsonl_chunks(index, src, start, opener)
    except (OSError, EOFError, zlib.error) as e:
        # Typically a truncated .gz (an interrupted download).
        raise DataError(f"{src.label}: cannot read ({_one_line(e)}); is the file truncated?") from None


def _jsonl_chunks(index: int, src: _Source, start: int, opener: Callable[..., Any]) -> Iterator[_Unit]:
    with opener(src.path, "rb") as f:
        # Skip to `start` by reading (gzip cannot seek), counting lines for error messages.
        line_no, skipped = 1, 0
        while skipped < start:
            block = f.read(min(JSONL_CHUNK_BYTES * 16, start - skipped))
            if not block:
                break
            line_no += block.count(b"\n")
            skipped += len(block)
        off = start
        while True:
            data = f.read(JSONL_CHUNK_BYTES)
            if not data:
                return
            if not data.endswith(b"\n"):
                data += f.readline()  # units end at line ends
            yield _Unit((index, off), len(data), len(data), ("jsonl", src.label, line_no, data))
            line_no += data.count(b"\n")
            off += len(data)


def _column_units(index: int, src: _Source, row: int, col: Any) -> Iterator[_Unit]:
    """Cut a string column into units of at most UNIT_BYTES (a longer single row is its own unit)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = col.cast(pa.large_string())
    lengths = pc.binary_length(col).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    ends = np.cumsum(lengths)
    first, base = 0, 0
    while first < len(col):
        last = max(int(np.searchsorted(ends, base + UNIT_BYTES, side="right")), first + 1)
        last = min(last, first + UNIT_ROWS, len(col))
        size = int(ends[last - 1]) - base
        progress = src.size * (last - first) // max(src.rows, 1)
        yield _Unit(
            (index, row + first),
            size,
            progress,
            ("docs", src.label, col.slice(first, last - first).to_pylist()),
        )
        base, first = int(ends[last - 1]), last


def _parquet_units(index: int, src: _Source, start: int, field: str) -> Iterator[_Unit]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(str(src.path))
    md = pf.metadata
    group, row = 0, 0
    while group < md.num_row_groups and row + md.row_group(group).num_rows <= start:
        row += md.row_group(group).num_rows
        group += 1
    if group == md.num_row_groups:
        return
    skip = start - row
    # One record batch of one column at a time: the file is never held in memory.
    batches = pf.iter_batches(
        batch_size=UNIT_ROWS, row_groups=range(group, md.num_row_groups), columns=[field]
    )
    for batch in batches:
        col = batch.column(0)
        if skip >= len(col):
            skip -= len(col)
            row += len(col)
            continue
        if skip:
            col, row, skip = col.slice(skip), row + skip, 0
        yield from _column_units(index, src, row, col)
        row += len(col)


def _arrow_units(index: int, src: _Source, start: int, field: str) -> Iterator[_Unit]:
    import pyarrow as pa

    with pa.memory_map(str(src.path)) as mm:
        schema, batches = _ipc_reader(mm)
        column = schema.get_field_index(field)
        row = 0
        for batch in batches:
            n = batch.num_rows
            if row + n <= start:
                row += n  # skipped without touching the data pages
                continue
            col = batch.column(column)
            if start > row:
                col, row = col.slice(start - row), start
            yield from _column_units(index, src, row, col)
            row += len(col)


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(
            "streaming from the hub needs the optional 'hub' extra: pip install 'rankscope[hub]'"
        ) from None
    return datasets


def _hub_units(index: int, src: _Source, start: int, field: str) -> Iterator[_Unit]:
    datasets = _import_datasets()
    assert src.hub is not None
    name, config, split = src.hub
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        if start:
            ds = ds.skip(start)
    except Exception as e:  # datasets raises many kinds (connection, missing config, ...)
        raise DataError(f"could not stream {src.label} from the hub (offline?): {_one_line(e)}") from None
    row, size = start, 0
    texts: list[Any] = []
    it = iter(ds)
    while True:
        try:
            example = next(it)
        except StopIteration:
            break
        except Exception as e:
            raise DataError(
                f"streaming {src.label} failed after row {row + len(texts)} ({_one_line(e)}); "
                "re-run the same command to resume"
            ) from None
        if field not in example:
            raise DataError(
                f"{src.label}: rows have no field {field!r} (they have: {', '.join(example)}); "
                "choose one with --text-field"
            )
        text = example[field]
        texts.append(text)
        size += len(text) if isinstance(text, str) else 0
        if len(texts) >= UNIT_ROWS or size >= UNIT_BYTES:
            yield _Unit((index, row), size, size, ("docs", src.label, texts))
            row, texts, size = row + len(texts), [], 0
    if texts:
        yield _Unit((index, row), size, size, ("docs", src.label, texts))


def _units(sources: list[_Source], start: Pos, field: str, splittable: bool) -> Iterator[_Unit]:
    """Every unit from position ``start`` on, in stream order; each unit starts where it says."""
    for index in range(start[0], len(sources)):
        src, offset = sources[index], start[1] if index == start[0] else 0
        if src.kind == "text":
            yield from _text_units(index, src, offset, splittable)
        elif src.kind == "jsonl":
            yield from _jsonl_units(index, src, offset)
        elif src.kind == "parquet":
            yield from _parquet_units(index, src, offset, field)
        elif src.kind == "arrow":
            yield from _arrow_units(index, src, offset, field)
        else:
            yield from _hub_units(index, src, offset, field)


@dataclass
class _Batch:
    pos: Pos  # where its first unit starts: a valid point to resume reading from
    progress_before: int  # source bytes before ``pos``
    progress: int
    payloads: list[tuple]


def _batches(units: Iterable[_Unit], progress_before: int, limit: int) -> Iterator[_Batch]:
    """Group units into batches of about ``limit`` bytes of text.

    Batches only decide how work is shared out: any batch start is a valid resume point, and
    the tokens from a position on do not depend on how they were grouped.
    """
    batch: _Batch | None = None
    size = 0
    for u in units:
        if batch is None:
            batch, size = _Batch(u.pos, progress_before, 0, []), 0
        batch.payloads.append(u.payload)
        batch.progress += u.progress
        size += u.size
        if size >= limit:
            progress_before += batch.progress
            yield batch
            batch = None
    if batch is not None:
        yield batch


# --------------------------------------------------------------------------------------------
# Payload -> documents -> tokens


def _decode_text(label: str, offset: int, data: bytes) -> str:
    nul = data.find(b"\x00")
    if nul != -1:
        raise DataError(
            f"{label}: NUL byte at byte {offset + nul}, so this is not a text file; remove it from the source"
        )
    try:
        # Only the start of a file can carry a byte-order mark.
        return data.decode("utf-8-sig" if offset == 0 else "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{label}: not UTF-8 text (bad byte near offset {offset + e.start}); "
            "convert it to UTF-8 or remove it"
        ) from None


def _jsonl_texts(label: str, first_line: int, data: bytes, field: str) -> Iterator[str | None]:
    for k, line in enumerate(data.split(b"\n")):
        if not line.strip():
            continue
        if first_line + k == 1 and line.startswith(codecs.BOM_UTF8):
            line = line[len(codecs.BOM_UTF8) :]  # json.loads refuses a byte-order mark
        where = f"{label} line {first_line + k}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"{where}: not valid JSON ({_one_line(e)})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: a JSON {type(row).__name__}, not an object with a {field!r} field")
        if field not in row:
            keys = ", ".join(list(row)[:12]) or "none"
            raise DataError(f"{where}: no field {field!r} (it has: {keys}); choose one with --text-field")
        value = row[field]
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}: field {field!r} is a JSON {type(value).__name__}, not a string")
        yield value


def _payload_texts(payload: tuple, field: str) -> Iterator[tuple[bool, str]]:
    """(starts a new document, text) for every non-empty piece of text in a unit's payload."""
    kind, label = payload[0], payload[1]
    if kind == "text":
        _, _, offset, data = payload
        text = _decode_text(label, offset, data)
        if text:
            yield offset == 0, text
        return
    if kind == "jsonl":
        texts: Iterable[Any] = _jsonl_texts(label, payload[2], payload[3], field)
    else:
        texts = payload[2]
    for text in texts:
        if text is None or text == "":
            continue  # a null or empty row is not a document: no lone separator for it
        if not isinstance(text, str):
            raise DataError(f"{label}: field {field!r} holds {type(text).__name__} values, not text")
        yield True, text


@dataclass(frozen=True)
class _EncoderSpec:
    tokenizer_json: str
    eot_id: int
    splittable: bool
    text_field: str


class _Encoder:
    """Turns a batch's payloads into (uint16 tokens, offsets of the document starts in them)."""

    def __init__(self, spec: _EncoderSpec):
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
            for doc_start, text in _payload_texts(payload, self._spec.text_field):
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


_WORKER_ENCODER: _Encoder | None = None


def _init_worker(spec: _EncoderSpec, threads: int) -> None:
    # Ctrl-C reaches the whole process group; the parent alone handles it (and stops the pool),
    # instead of every worker dying with its own traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Each process gets its share of the cores for encode_batch's Rust threads; this must be
    # set before tokenizers first starts its thread pool.
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    global _WORKER_ENCODER
    _WORKER_ENCODER = _Encoder(spec)


def _worker_encode(payloads: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
    assert _WORKER_ENCODER is not None
    return _WORKER_ENCODER(payloads)


def _encoded(
    batches: Iterator[_Batch], spec: _EncoderSpec, workers: int
) -> Generator[tuple[_Batch, np.ndarray, np.ndarray], None, None]:
    """Encode batches, in process or on a pool, yielding results strictly in submission order."""
    if workers == 1:
        encoder = _Encoder(spec)
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
    pending: deque[tuple[_Batch, Future]] = deque()
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


# --------------------------------------------------------------------------------------------
# Tokenizer


@dataclass
class _TokenizerInfo:
    tokenizer: Tokenizer
    json: str
    sha256: str
    vocab_size: int
    eot_id: int
    eot_token: str | None
    splittable: bool
    config_eos: str | None = None  # eos named by a tokenizer_config.json beside the file


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _tokenizer_file(spec: str) -> Path | None:
    """The tokenizer.json a spec names, None for a hub name; DataError for a missing file."""
    p = Path(spec).expanduser()
    if p.is_dir():
        f = p / TOKENIZER_FILE
        if not f.is_file():
            raise DataError(f"tokenizer folder {spec} has no {TOKENIZER_FILE}")
        return f
    if p.is_file():
        return p
    if _HUB_ID.match(spec) and not spec.endswith(".json"):
        return None
    raise DataError(
        f"tokenizer {spec}: no such file or folder (pass a tokenizer.json, a folder holding one, "
        "train:VOCAB, or a hub name)"
    )


def _parse_train_spec(spec: str) -> int:
    value = spec[len(TRAIN_PREFIX) :]
    try:
        return _parse_count(value)
    except ValueError:
        raise DataError(f"--tokenizer {spec}: expected train:VOCAB, e.g. train:8192") from None


def _tokenizer_from_json(text: str, where: str) -> Tokenizer:
    try:
        return Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a plain Exception for parse errors
        raise DataError(f"tokenizer {where} is not a valid tokenizer.json ({_one_line(e)})") from None


def _fetch_hub_tokenizer(name: str) -> Tokenizer:
    try:
        return Tokenizer.from_pretrained(name)
    except Exception as e:
        raise DataError(
            f"could not fetch tokenizer {name} from the hub (offline?); pass a local tokenizer.json "
            f"({type(e).__name__})"
        ) from None


def _config_eos(tokenizer_file: Path | None) -> str | None:
    """The eos token named by a tokenizer_config.json next to the tokenizer.json, if any."""
    if tokenizer_file is None:
        return None
    try:
        config = json.loads((tokenizer_file.parent / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    eos = config.get("eos_token") if isinstance(config, dict) else None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


def _splittable(j: dict[str, Any]) -> bool:
    """Whether encoding a document in pieces cut by :func:`split_text` gives exactly its tokens.

    True for GPT-2 style byte-level BPE (no normalizer; ByteLevel pre-tokenization with the
    GPT-2 regex and no prefix space, optionally after Digits): its pre-tokens never join a
    non-space character to the whitespace after it, and the model never merges across
    pre-tokens. Anything else (SentencePiece's prefix "▁", Llama 3's regex that glues newlines
    to punctuation, normalizers) gets each document encoded whole.
    """
    if j.get("normalizer") is not None:
        return False
    pre = j.get("pre_tokenizer")
    members = (
        pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    )
    byte_level = False
    for m in members:
        if not isinstance(m, dict):
            return False
        if m.get("type") == "ByteLevel":
            if m.get("add_prefix_space") or not m.get("use_regex", True):
                return False
            byte_level = True
        elif m.get("type") != "Digits":
            return False
    # Non-special added tokens are matched in the raw text before pre-tokenization; one that
    # contains a non-space character followed by whitespace could straddle a cut.
    for added in j.get("added_tokens") or []:
        content = added.get("content", "")
        if not added.get("special") and re.search(r"\S\s", content):
            return False
    return byte_level


def _eot(
    tok: Tokenizer, j: dict[str, Any], eot_id: int | None, vocab_size: int, config_eos: str | None, where: str
) -> tuple[int, str | None]:
    if eot_id is not None:
        # An explicit --eot-id wins: the user knows which id their model treats as a boundary.
        if not 0 <= eot_id < vocab_size:
            raise DataError(f"--eot-id {eot_id} is outside tokenizer {where}'s ids 0..{vocab_size - 1}")
        return eot_id, tok.id_to_token(eot_id)
    found = tok.token_to_id(EOT_TOKEN)
    if found is not None:
        return found, EOT_TOKEN
    specials = {a.get("content") for a in j.get("added_tokens") or [] if a.get("special")}
    for name in ([config_eos] if config_eos else []) + list(EOS_CANDIDATES):
        found = tok.token_to_id(name) if name in specials or name == config_eos else None
        if found is not None:
            return found, name
    raise DataError(
        f"tokenizer {where} has no {EOT_TOKEN} and no recognisable end-of-sequence token; "
        "pass --eot-id with the id that separates documents"
    )


def _describe_tokenizer(
    tok: Tokenizer, text: str, eot_id: int | None, config_eos: str | None, where: str
) -> _TokenizerInfo:
    vocab = tok.get_vocab(with_added_tokens=True)
    vocab_size = max(vocab.values()) + 1 if vocab else 0
    if vocab_size > MAX_VOCAB:
        raise DataError(
            f"tokenizer {where} has ids up to {vocab_size - 1}, but token shards store uint16 ids "
            f"(at most {MAX_VOCAB} entries); use a tokenizer with a smaller vocabulary"
        )
    j = json.loads(text)
    eot, eot_token = _eot(tok, j, eot_id, vocab_size, config_eos, where)
    return _TokenizerInfo(tok, text, _sha256_text(text), vocab_size, eot, eot_token, _splittable(j))


# --------------------------------------------------------------------------------------------
# Output folder: state, lock, atomic JSON


def _write_json(path: Path, value: Any) -> None:
    """Atomically replace ``path`` with ``value`` as JSON (temp file, fsync, rename, dir fsync)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(value, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _save_state(path: Path, state: dict[str, Any]) -> None:
    # A named step (rather than inline calls) so tests can interrupt a run right after a shard.
    _write_json(path, state)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise DataError(
            f"{path}: unreadable ({_one_line(e)}); delete the output folder and start over"
        ) from None
    return value if isinstance(value, dict) else None


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` so two prepares never write the same output."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks, run unguarded
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DataError(
                f"another rankscope data prepare is writing to {folder}; wait for it or use another --out"
            ) from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _args_difference(recorded: dict[str, Any], current: dict[str, Any]) -> str | None:
    names = {
        "source": "SRC",
        "source_sha256": "the source files (changed since)",
        "tokenizer": "--tokenizer",
        "tokenizer_sha256": "the tokenizer file (changed since)",
        "text_field": "--text-field",
        "shard_tokens": "--shard-tokens",
        "val_tokens": "--val-tokens",
        "max_tokens": "--max-tokens",
        "eot_id": "--eot-id",
        "format": "the rankscope prepare format",
    }
    for key, label in names.items():
        if recorded.get(key) != current.get(key):
            if key.endswith("sha256") or key == "format":
                return label
            return f"{label} {recorded.get(key)} (now {current.get(key)})"
    return None


# --------------------------------------------------------------------------------------------
# Writing the token stream into shards


class _ShardSink:
    """Cuts the token stream into val then train shards and records a resume point after each.

    Token ``t`` of the stream goes to val shard ``t // S`` while ``t < V``, else to train shard
    ``(t - V) // S``. Each closed shard is appended to the state with the reader position of the
    batch holding the next token and how many of that batch's tokens are already written.
    """

    def __init__(
        self, out: Path, state: dict[str, Any], state_path: Path, shard_tokens: int, val_tokens: int
    ):
        self.out, self.state, self.state_path = out, state, state_path
        self.shard_tokens, self.val_tokens = shard_tokens, val_tokens
        shards = state["shards"]
        last = shards[-1]["resume"] if shards else None
        self.written = last["tokens"] if last else 0
        self.docs = last["documents"] if last else 0
        self.writer: ShardWriter | None = None
        self.end = 0
        self.split = ""
        self.shard_docs = 0
        self.last_resume: dict[str, Any] | None = last

    def _open(self) -> None:
        if self.written < self.val_tokens:
            self.split, index = "val", self.written // self.shard_tokens
            self.end = min(self.val_tokens, (index + 1) * self.shard_tokens)
        else:
            self.split, index = "train", (self.written - self.val_tokens) // self.shard_tokens
            self.end = self.val_tokens + (index + 1) * self.shard_tokens
        self.writer = ShardWriter(self.out / f"{self.split}_{index:06d}.bin")
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
        _save_state(self.state_path, self.state)

    def write(self, batch: _Batch, t0: int, tokens: np.ndarray, doc_starts: np.ndarray) -> None:
        """Append ``tokens``, stream offsets ``self.written`` on; ``t0`` is where the batch began."""
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

    def finish(self) -> None:
        if self.writer is not None:
            assert self.last_resume is not None
            self._close(self.last_resume)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


# --------------------------------------------------------------------------------------------
# prepare


def _parse_count(text: str) -> int:
    """'100M' -> 100_000_000, '1.5k' -> 1500, '4096' -> 4096, '1e6' -> 1_000_000."""
    m = re.fullmatch(
        r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgG]?)\s*", str(text).replace("_", "")
    )
    if not m:
        raise ValueError(f"expected a count like 4096, 100M or 1.5k, got {text!r}")
    value = float(m.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}[m.group(2).lower()]
    if value != int(value):
        raise ValueError(f"expected a whole number, got {text!r}")
    return int(value)


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        bound = f" and <= {maximum}" if maximum is not None else ""
        raise DataError(f"{name} must be an integer >= {minimum}{bound}, got {value!r}")
    return int(value)


def _resolve_tokenizer_args(tokenizer: str | os.PathLike | Tokenizer) -> tuple[str, str | None, Path | None]:
    """(spec as recorded, sha256 of the tokenizer content when known up front, file path)."""
    if isinstance(tokenizer, Tokenizer):
        text = tokenizer.to_str()
        return "<Tokenizer object>", _sha256_text(text), None
    spec = os.fspath(tokenizer)
    if not spec:
        raise DataError("--tokenizer is empty")
    if spec.startswith(TRAIN_PREFIX):
        _parse_train_spec(spec)
        return spec, None, None
    path = _tokenizer_file(spec)
    if path is None:
        return spec, None, None  # a hub name
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"tokenizer {path}: cannot read ({_one_line(e)})") from None
    return str(path.resolve()), _sha256_text(text), path


def _build_tokenizer(
    tokenizer: str | os.PathLike | Tokenizer,
    path: Path | None,
    sources: list[_Source],
    text_field: str,
    progress: bool,
) -> tuple[Tokenizer, str, str | None]:
    """(tokenizer, its JSON, eos named by a tokenizer_config.json) for a fresh output."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer, tokenizer.to_str(), None
    spec = os.fspath(tokenizer)
    if spec.startswith(TRAIN_PREFIX):
        vocab = _parse_train_spec(spec)
        if any(s.kind == "hub" for s in sources):
            raise DataError(
                "--tokenizer train:VOCAB needs a local SRC; for a hub stream pass a tokenizer.json "
                "or a hub tokenizer name"
            )
        _log(progress, f"training a {vocab}-token byte-level BPE on the source")
        t0 = time.perf_counter()
        tok = train_tokenizer(_training_texts(sources, text_field), vocab)
        _log(
            progress, f"tokenizer trained in {time.perf_counter() - t0:.1f}s ({tok.get_vocab_size()} tokens)"
        )
        return tok, tok.to_str(), None
    if path is not None:
        text = path.read_text(encoding="utf-8")
        return _tokenizer_from_json(text, spec), text, _config_eos(path)
    tok = _fetch_hub_tokenizer(spec)
    return tok, tok.to_str(), None


def _training_texts(sources: list[_Source], field: str) -> Iterator[str]:
    chars = 0
    for unit in _units(sources, (0, 0), field, splittable=True):
        for _, text in _payload_texts(unit.payload, field):
            yield text
            chars += len(text)
            if chars >= TRAIN_MAX_CHARS:
                return


def prepare(
    src: str | os.PathLike,
    tokenizer: str | os.PathLike | Tokenizer,
    out_dir: str | os.PathLike,
    *,
    text_field: str = "text",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    val_tokens: int = DEFAULT_VAL_TOKENS,
    workers: int = 1,
    eot_id: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize ``src`` into modded-nanogpt shards in ``out_dir`` and return its ``meta.json``.

    ``src``: a text/JSONL/Parquet/Arrow file, a folder of them (searched recursively, sorted), a
    ``save_to_disk`` dataset folder, or ``hf://datasets/NAME[/CONFIG][:SPLIT]`` (needs the
    ``hub`` extra and a network). ``tokenizer``: a ``tokenizer.json``, a folder holding one, a hub
    name, ``train:VOCAB`` (a byte-level BPE trained on ``src``) or a ``tokenizers.Tokenizer``.
    Each document is preceded by the end-of-text id: ``eot_id`` if given, else the tokenizer's
    ``<|endoftext|>``, else its end-of-sequence special token.

    The first ``val_tokens`` tokens (at most a tenth of the total) go to ``val_*.bin``, the rest
    to ``train_*.bin`` shards of ``shard_tokens`` tokens; ``max_tokens`` stops early. The output
    does not depend on ``workers`` (processes tokenizing batches in parallel; with 1, the
    tokenizer's own threads use every core). Workers are started with ``spawn``, so a script
    that calls this with ``workers > 1`` needs the usual ``if __name__ == "__main__":`` guard.
    An interrupted call resumes when repeated with the same arguments; a finished output is
    returned as is. Bad input raises :class:`DataError` with one line naming the problem.
    """
    meta, _ = _prepare(
        src,
        tokenizer,
        out_dir,
        text_field=text_field,
        shard_tokens=shard_tokens,
        val_tokens=val_tokens,
        workers=workers,
        eot_id=eot_id,
        max_tokens=max_tokens,
        progress=progress,
    )
    return meta


def _prepare(
    src: str | os.PathLike,
    tokenizer: str | os.PathLike | Tokenizer,
    out_dir: str | os.PathLike,
    *,
    text_field: str,
    shard_tokens: int,
    val_tokens: int,
    workers: int,
    eot_id: int | None,
    max_tokens: int | None,
    progress: bool,
) -> tuple[dict[str, Any], bool]:
    """:func:`prepare`, also saying whether the output was already complete (nothing done)."""
    t_start = time.perf_counter()
    shard_tokens = _check_int("shard_tokens", shard_tokens, 1, MAX_SHARD_TOKENS)
    val_tokens = _check_int("val_tokens", val_tokens, 0)
    workers = _check_int("workers", workers, 1)
    if eot_id is not None:
        eot_id = _check_int("eot_id", eot_id, 0, MAX_VOCAB - 1)
    if max_tokens is not None:
        max_tokens = _check_int("max_tokens", max_tokens, 2)
    if not isinstance(text_field, str) or not text_field:
        raise DataError(f"text_field must be a non-empty string, got {text_field!r}")

    src_text = os.fspath(src)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a folder")
    out_resolved = out.resolve()
    candidates = _discover(src_text, exclude=out_resolved)
    source_label = src_text if src_text.startswith(HUB_PREFIX) else str(Path(src_text).expanduser().resolve())
    fingerprint = _fingerprint(candidates)
    tok_spec, tok_sha, tok_path = _resolve_tokenizer_args(tokenizer)
    args = {
        "format": PREPARE_FORMAT,
        "source": source_label,
        "source_sha256": _sha256_json(fingerprint),
        "tokenizer": tok_spec,
        "tokenizer_sha256": tok_sha,
        "text_field": text_field,
        "shard_tokens": shard_tokens,
        "val_tokens": val_tokens,
        "max_tokens": max_tokens,
        "eot_id": eot_id,
    }

    meta_path, state_path = out / META_FILE, out / STATE_FILE
    done = _finished_meta(out, meta_path, args, progress)
    if done is not None:
        return done, True  # decided from names and stats alone: no source is read
    if state_path.is_file():
        _check_resumable(out, _read_json(state_path), args)  # refuse before reading any source
    sources, skipped = _check_sources(src_text, candidates, text_field)
    if skipped:
        _log(progress, f"skipping {len(skipped)} file(s) that are not UTF-8 text, e.g. {skipped[0]}")
    where = str(tok_path) if tok_path is not None else tok_spec
    fresh: _TokenizerInfo | None = None
    if not (meta_path.is_file() or state_path.is_file()):
        # A new output: get the tokenizer right (train, load or fetch it, check its vocabulary
        # and separator) before creating anything, so a mistake leaves no folder behind that
        # would then refuse the corrected command.
        _check_empty(out)
        fresh = _new_tokenizer(tokenizer, tok_path, where, sources, text_field, eot_id, progress)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None
    with _locked(out):
        done = _finished_meta(out, meta_path, args, progress)  # finished by another process meanwhile?
        if done is not None:
            return done, True
        state = _read_json(state_path)
        if state is not None:
            _check_resumable(out, state, args)
        else:
            _check_empty(out)
            state = {"args": args, "tokenizer": None, "val_tokens": None, "shards": [], "finished": False}
        for entry in out.iterdir():
            if _TMP_NAME.match(entry.name):
                entry.unlink(missing_ok=True)  # temp files of a killed run (we hold the lock)

        info = _open_tokenizer(
            state, state_path, out, fresh, tokenizer, tok_path, where, sources, text_field, eot_id, progress
        )
        resumed = bool(state["shards"])
        meta = _run_stream(
            out,
            state,
            state_path,
            sources,
            info,
            text_field=text_field,
            shard_tokens=shard_tokens,
            val_tokens=val_tokens,
            workers=workers,
            max_tokens=max_tokens,
            progress=progress,
        )
        meta["skipped_files"] = {"count": len(skipped), "first": skipped[:10]}
        meta["args"] = args
        meta["run"] = {
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - t_start, 2),
            "resumed": resumed,
            "workers": workers,
        }
        meta["complete"] = True  # the last key of the last file written
        _write_json(meta_path, meta)
        state_path.unlink(missing_ok=True)
        return meta, False


def _check_resumable(out: Path, state: dict[str, Any] | None, args: dict[str, Any]) -> None:
    diff = _args_difference((state or {}).get("args", {}), args)
    if diff:
        raise DataError(
            f"{out} holds an unfinished prepare with different arguments: {diff}; "
            "re-run it as it was, use another --out, or delete it"
        )


def _finished_meta(out: Path, meta_path: Path, args: dict[str, Any], progress: bool) -> dict[str, Any] | None:
    """The meta.json of a finished output made with ``args``; DataError if made with others."""
    meta = _read_json(meta_path) if meta_path.is_file() else None
    if meta is None or not meta.get("complete"):
        return None
    diff = _args_difference(meta.get("args", {}), args)
    if diff:
        raise DataError(
            f"{out} was already prepared with different arguments: {diff}; use another --out or delete it"
        )
    _log(progress, f"{out} is already complete; nothing to do")
    return meta


def _check_empty(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(
            f"--out {out} is not empty and holds no rankscope prepare output; use a new or empty folder"
        )


def _new_tokenizer(
    tokenizer: Any,
    tok_path: Path | None,
    where: str,
    sources: list[_Source],
    text_field: str,
    eot_id: int | None,
    progress: bool,
) -> _TokenizerInfo:
    tok, text, config_eos = _build_tokenizer(tokenizer, tok_path, sources, text_field, progress)
    info = _describe_tokenizer(tok, text, eot_id, config_eos, where)
    info.config_eos = config_eos
    return info


def _open_tokenizer(
    state: dict[str, Any],
    state_path: Path,
    out: Path,
    fresh: _TokenizerInfo | None,
    tokenizer: Any,
    tok_path: Path | None,
    where: str,
    sources: list[_Source],
    text_field: str,
    eot_id: int | None,
    progress: bool,
) -> _TokenizerInfo:
    """The output's tokenizer: its saved copy when resuming (no re-training, no network).

    For a new output ``fresh`` is the tokenizer already built; it is saved and recorded here,
    together with the first state, before any shard is written.
    """
    recorded = state.get("tokenizer")
    saved = out / TOKENIZER_FILE
    if recorded is not None:
        try:
            text = saved.read_text(encoding="utf-8")
        except OSError:
            text = None
        if text is not None and _sha256_text(text) == recorded["sha256"]:
            info = _describe_tokenizer(
                _tokenizer_from_json(text, str(saved)), text, eot_id, recorded.get("config_eos"), where
            )
            return info
        # The saved copy is gone or altered: whatever was tokenized with it cannot be trusted.
        _log(progress, f"{saved} is missing or changed; starting {out} over")
        state["shards"], state["val_tokens"], state["tokenizer"] = [], None, None
    info = fresh or _new_tokenizer(tokenizer, tok_path, where, sources, text_field, eot_id, progress)
    _write_text(saved, info.json)
    state["tokenizer"] = {"sha256": info.sha256, "config_eos": info.config_eos}
    _save_state(state_path, state)
    return info


def _verified_shards(out: Path, shards: list[dict[str, Any]], progress: bool) -> list[dict[str, Any]]:
    """The longest prefix of recorded shards whose files are intact (header and size)."""
    good = []
    for shard in shards:
        try:
            n = int(read_shard(out / shard["name"]).shape[0])
        except DataError as e:
            _log(progress, f"redoing from {shard['name']}: {e}")
            break
        if n != shard["tokens"]:
            _log(progress, f"redoing from {shard['name']}: it has {n} tokens, expected {shard['tokens']}")
            break
        good.append(shard)
    return good


def _run_stream(
    out: Path,
    state: dict[str, Any],
    state_path: Path,
    sources: list[_Source],
    info: _TokenizerInfo,
    *,
    text_field: str,
    shard_tokens: int,
    val_tokens: int,
    workers: int,
    max_tokens: int | None,
    progress: bool,
) -> dict[str, Any]:
    good = _verified_shards(out, state["shards"], progress)
    if len(good) < len(state["shards"]):
        state["shards"], state["finished"] = good, False
    if not state["shards"]:
        state["val_tokens"], state["finished"] = None, False
    total_progress = sum(s.progress_size for s in sources)
    hub = any(s.kind == "hub" for s in sources)
    eot = info.eot_id

    if not state.get("finished"):
        last = state["shards"][-1]["resume"] if state["shards"] else None
        if last:
            _log(
                progress,
                f"resuming {out} after {len(state['shards'])} shard(s), {human_count(last['tokens'])} tokens",
            )
        pos: Pos = tuple(last["pos"]) if last else (0, 0)  # type: ignore[assignment]
        skip = last["skip"] if last else 0
        progress_before = last["progress"] if last else 0
        spec = _EncoderSpec(info.json, eot, info.splittable, text_field)
        units = _units(sources, pos, text_field, info.splittable)
        by_tokens = hub  # a stream has no known size: count tokens instead of bytes
        bar = tqdm(
            total=(max_tokens if by_tokens else total_progress) or None,
            initial=(last["tokens"] if last else 0) if by_tokens else progress_before,
            unit="tok" if by_tokens else "B",
            unit_scale=True,
            desc="prepare",
            file=sys.stderr,
            disable=not progress,
            dynamic_ncols=True,
            # In a log file a redrawn bar is one line per update: keep those rare.
            mininterval=0.5 if sys.stderr.isatty() else 30.0,
        )
        V = state["val_tokens"]
        sink = _ShardSink(out, state, state_path, shard_tokens, V if V is not None else 0)
        head: list[tuple[_Batch, int, np.ndarray, np.ndarray]] = []  # held until V is known
        head_tokens = 0
        stream_T = sink.written  # tokens taken from the stream so far (written or held)
        truncated = False
        limit = BATCH_BYTES if workers == 1 else TASK_BYTES
        encoded = _encoded(_batches(units, progress_before, limit), spec, workers)
        try:
            for batch, tokens, doc_starts in encoded:
                t0 = stream_T - skip  # stream offset of this batch's first token
                if skip:
                    # Tokens a previous run already wrote. They may span several batches when
                    # this run cuts batches smaller (another --workers), hence the carry-over.
                    n = min(skip, tokens.shape[0])
                    tokens, doc_starts = tokens[n:], doc_starts[doc_starts >= n] - n
                    skip -= n
                if max_tokens is not None and stream_T + tokens.shape[0] >= max_tokens:
                    keep = max_tokens - stream_T
                    tokens, doc_starts = tokens[:keep], doc_starts[doc_starts < keep]
                    truncated = True
                stream_T += tokens.shape[0]
                bar.update(tokens.shape[0] if by_tokens else batch.progress)
                bar.set_postfix_str(f"{human_count(stream_T)} tokens", refresh=False)
                if V is None:
                    head.append((batch, t0, tokens, doc_starts))
                    head_tokens += tokens.shape[0]
                    if head_tokens >= VAL_SHARE * val_tokens:
                        V = _decide_val(state, sink, val_tokens, None)
                        _flush(sink, head)
                else:
                    sink.write(batch, t0, tokens, doc_starts)
                if truncated:
                    break
            if V is None:
                V = _decide_val(state, sink, val_tokens, head_tokens)
                _flush(sink, head)
            if sink.written == 0:
                raise DataError(f"{state['args']['source']} has no non-empty documents")
            sink.finish()
        except BaseException:
            sink.abort()
            raise
        finally:
            encoded.close()  # stops the pool now, not whenever the generator is collected
            bar.close()
        state["truncated"] = truncated
        state["finished"] = True
        _save_state(state_path, state)

    shards = state["shards"]
    counts = {split: sum(s["tokens"] for s in shards if s["split"] == split) for split in ("train", "val")}
    docs = {split: sum(s["documents"] for s in shards if s["split"] == split) for split in ("train", "val")}
    if counts["train"] == 0:
        raise DataError(f"{state['args']['source']}: too few tokens to train on after holding out validation")
    kinds: dict[str, int] = {}
    for s in sources:
        kinds[s.kind] = kinds.get(s.kind, 0) + 1
    return {
        "format": PREPARE_FORMAT,
        "shard_format": "modded-nanogpt .bin (256 x int32 header: 20240520, 1, n; then uint16 tokens)",
        "source": state["args"]["source"],
        "source_files": kinds,
        "text_field": text_field,
        "tokenizer": state["args"]["tokenizer"],
        "tokenizer_file": TOKENIZER_FILE,
        "tokenizer_sha256": info.sha256,
        "vocab_size": info.vocab_size,
        # The model's embedding must cover every id; a multiple of 64 is friendlier to kernels.
        "model_vocab_size": padded_vocab_size(info.vocab_size - 1),
        "eot_id": info.eot_id,
        "eot_token": info.eot_token,
        "shard_tokens": shard_tokens,
        "val_tokens": state["val_tokens"],
        "max_tokens": max_tokens,
        "truncated": bool(state.get("truncated")),
        "tokens": {**counts, "total": counts["train"] + counts["val"]},
        "documents": {**docs, "total": docs["train"] + docs["val"]},
        "shards": [{k: s[k] for k in ("name", "split", "tokens", "documents")} for s in shards],
    }


def _decide_val(state: dict[str, Any], sink: _ShardSink, val_tokens: int, total: int | None) -> int:
    """Fix the validation size: ``val_tokens``, or a tenth of ``total`` when the input is small."""
    V = val_tokens if total is None else min(val_tokens, total // VAL_SHARE)
    state["val_tokens"] = V
    sink.val_tokens = V
    return V


def _flush(sink: _ShardSink, head: list[tuple[_Batch, int, np.ndarray, np.ndarray]]) -> None:
    for item in head:
        sink.write(*item)
    head.clear()


# --------------------------------------------------------------------------------------------
# CLI hooks


def _count_arg(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = _parse_count(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``SRC``, ``--tokenizer``, ``--out`` and the options of :func:`prepare` to ``parser``."""
    parser.add_argument(
        "src",
        metavar="SRC",
        help="text/JSONL(.gz)/Parquet/Arrow file, a folder of them (recursive, sorted), a "
        "datasets.save_to_disk folder, or hf://datasets/NAME[/CONFIG][:SPLIT] (needs rankscope[hub])",
    )
    parser.add_argument(
        "--tokenizer",
        required=True,
        metavar="T",
        help="tokenizer.json or a folder holding one; a hub name (online, e.g. HuggingFaceTB/SmolLM-135M); "
        "or train:VOCAB to train a byte-level BPE on SRC (e.g. train:8192)",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output folder (new, empty, or an earlier prepare to resume)",
    )
    parser.add_argument(
        "--text-field",
        default="text",
        metavar="NAME",
        help="JSONL field / Parquet or Arrow column holding the text (default: text)",
    )
    parser.add_argument(
        "--shard-tokens",
        type=_count_arg(1),
        default=DEFAULT_SHARD_TOKENS,
        metavar="N",
        help="tokens per shard (default: 100M)",
    )
    parser.add_argument(
        "--val-tokens",
        type=_count_arg(0),
        default=DEFAULT_VAL_TOKENS,
        metavar="N",
        help="first N tokens become validation, at most a tenth of all (default: 10M)",
    )
    parser.add_argument(
        "--max-tokens", type=_count_arg(2), default=None, metavar="N", help="stop after N tokens in all"
    )
    parser.add_argument(
        "--workers",
        type=_count_arg(1),
        default=1,
        metavar="N",
        help="tokenizing processes; the output is identical for any N (default: 1)",
    )
    parser.add_argument(
        "--eot-id",
        type=int,
        default=None,
        metavar="ID",
        help="document separator id (default: the tokenizer's <|endoftext|> or eos token)",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bar or log lines on stderr"
    )


def run(args: argparse.Namespace) -> int:
    """Run :func:`prepare` from parsed arguments and print a one-line summary on stdout."""
    t0 = time.perf_counter()
    meta, already = _prepare(
        args.src,
        args.tokenizer,
        args.out,
        text_field=getattr(args, "text_field", "text"),
        shard_tokens=getattr(args, "shard_tokens", DEFAULT_SHARD_TOKENS),
        val_tokens=getattr(args, "val_tokens", DEFAULT_VAL_TOKENS),
        workers=getattr(args, "workers", 1),
        eot_id=getattr(args, "eot_id", None),
        max_tokens=getattr(args, "max_tokens", None),
        progress=getattr(args, "progress", True),
    )
    n_train = sum(1 for s in meta["shards"] if s["split"] == "train")
    n_val = len(meta["shards"]) - n_train
    tokens = meta["tokens"]
    summary = (
        f"{args.out}: {n_train} train + {n_val} val shards, {human_count(tokens['train'])} train + "
        f"{human_count(tokens['val'])} val tokens, {meta['documents']['total']:,} documents, "
        f"vocab {meta['vocab_size']}, eot {meta['eot_id']}"
    )
    if already:
        summary += " (already complete, nothing to do)"
    else:
        seconds = time.perf_counter() - t0
        summary += f" in {seconds:.1f}s"
    print(f"{summary}; train with --data {args.out} --set model.vocab_size={meta['model_vocab_size']}")
    return 0
