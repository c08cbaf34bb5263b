"""Reading: every source, from a resume position on, cut into units in stream order.

A unit is a piece of one source small enough to batch: a block of a text file (cut where a
splitting-safe tokenizer cannot merge across), whole lines of a JSON Lines file, or up to
UNIT_ROWS rows of a Parquet, Arrow or hub column. Each unit records the position it starts at
(source index, byte or row offset), so any unit start is a point a later run can resume from.
The sizes below decide how reading is cut up, never which tokens come out.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import DataError
from ..messages import one_line
from .sources import Source, import_datasets, ipc_reader

TEXT_BLOCK_BYTES = 4 << 20  # text files larger than this are read in blocks (when exact)
JSONL_CHUNK_BYTES = 1 << 20
UNIT_ROWS = 1024  # rows per unit from Parquet, Arrow and hub sources
UNIT_BYTES = 1 << 20

Pos = tuple[int, int]  # (source index, byte offset or row offset inside that source)


@dataclass
class Unit:
    """A piece of one source, as read; :mod:`.decode` turns its payload into texts."""

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


def _text_units(index: int, src: Source, start: int, splittable: bool) -> Iterator[Unit]:
    assert src.path is not None
    with open(src.path, "rb") as f:
        if not splittable or src.size <= TEXT_BLOCK_BYTES:
            # One document read whole: a tokenizer that is not known to be exact on pieces
            # must see each document as one string.
            if start:
                raise DataError(f"{src.label}: cannot resume inside this file; delete the output and start over")
            data = f.read()
            yield Unit((index, 0), len(data), len(data), ("text", src.label, 0, data))
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
            yield Unit((index, off), cut, cut, ("text", src.label, off, bytes(buf[:cut])))
            off += cut
            del buf[:cut]
            scanned = 0


def _jsonl_units(index: int, src: Source, start: int) -> Iterator[Unit]:
    assert src.path is not None
    opener = gzip.open if src.label.lower().endswith(".gz") else open
    try:
        yield from _jsonl_chunks(index, src, start, opener)
    except (OSError, EOFError, zlib.error) as e:
        # Typically a truncated .gz (an interrupted download).
        raise DataError(f"{src.label}: cannot read ({one_line(e)}); is the file truncated?") from None


def _jsonl_chunks(index: int, src: Source, start: int, opener: Callable[..., Any]) -> Iterator[Unit]:
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
            yield Unit((index, off), len(data), len(data), ("jsonl", src.label, line_no, data))
            line_no += data.count(b"\n")
            off += len(data)


def _column_units(index: int, src: Source, row: int, col: Any) -> Iterator[Unit]:
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
        yield Unit(
            (index, row + first), size, progress, ("docs", src.label, col.slice(first, last - first).to_pylist())
        )
        base, first = int(ends[last - 1]), last


def _parquet_units(index: int, src: Source, start: int, field: str) -> Iterator[Unit]:
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
    batches = pf.iter_batches(batch_size=UNIT_ROWS, row_groups=range(group, md.num_row_groups), columns=[field])
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


def _arrow_units(index: int, src: Source, start: int, field: str) -> Iterator[Unit]:
    import pyarrow as pa

    with pa.memory_map(str(src.path)) as mm:
        schema, batches = ipc_reader(mm)
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


def _hub_units(index: int, src: Source, start: int, field: str) -> Iterator[Unit]:
    datasets = import_datasets()
    assert src.hub is not None
    name, config, split = src.hub
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        if start:
            ds = ds.skip(start)
    except Exception as e:  # datasets raises many kinds (connection, missing config, ...)
        raise DataError(f"could not stream {src.label} from the hub (offline?): {one_line(e)}") from None
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
                f"streaming {src.label} failed after row {row + len(texts)} ({one_line(e)}); "
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
            yield Unit((index, row), size, size, ("docs", src.label, texts))
            row, texts, size = row + len(texts), [], 0
    if texts:
        yield Unit((index, row), size, size, ("docs", src.label, texts))


def read_units(sources: list[Source], start: Pos, field: str, splittable: bool) -> Iterator[Unit]:
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
