"""Finding the sources under SRC and checking each one can be read, before anything is written.

A source is one text, JSON Lines, Parquet or Arrow file, or a stream from the Hugging Face hub.
:func:`discover` lists them from names and stat alone (cheap enough to tell whether a finished
output is still up to date); :func:`check_sources` then opens each one: the text field or column
must exist, and text files must be UTF-8.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..corpus import TEXT_SUFFIXES, USER_SKIPPED_DIRS
from ..errors import DataError
from ..messages import one_line
from .decode import jsonl_texts

HUB_PREFIX = "hf://datasets/"
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
# The loader's text extensions, less .jsonl which is read as JSON Lines here.
PREPARE_TEXT_SUFFIXES = frozenset(TEXT_SUFFIXES - {".jsonl"})
HF_DATASET_MARKERS = ("state.json", "dataset_info.json")
# Text files are checked in blocks of this size, so a huge file is never held in memory.
CHECK_BLOCK_BYTES = 4 << 20


@dataclass(frozen=True)
class Source:
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


# --------------------------------------------------------------------------------------------
# Optional libraries: pyarrow for Parquet and Arrow, datasets for hub streams


def import_pyarrow() -> Any:
    try:
        import pyarrow
    except ImportError:
        raise DataError("reading Parquet and Arrow files needs pyarrow: pip install pyarrow") from None
    return pyarrow


def import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError("streaming from the hub needs the optional 'hub' extra: pip install 'rankscope[hub]'") from None
    return datasets


def ipc_reader(source: Any) -> tuple[Any, Iterator[Any]]:
    """(schema, record batches) of an Arrow IPC stream (what save_to_disk writes) or IPC file."""
    import pyarrow as pa

    try:
        reader = pa.ipc.open_stream(source)
        return reader.schema, iter(reader)
    except pa.ArrowInvalid:
        source.seek(0)
        fr = pa.ipc.open_file(source)
        return fr.schema, (fr.get_batch(i) for i in range(fr.num_record_batches))


# --------------------------------------------------------------------------------------------
# Discovery: names and stat only


def _named_file(path: Path, relpath: str) -> Source:
    """The source for a file named explicitly (SRC itself, or a dataset's listed .arrow file)."""
    source = _discovered_file(path, relpath, explicit=True)
    assert source is not None  # explicit files are always taken, as text if nothing else
    return source


def _discovered_file(path: Path, relpath: str, explicit: bool) -> Source | None:
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
    return Source(kind, str(path), path, relpath, st.st_size, st.st_mtime_ns)


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
        f"{folder} holds a DatasetDict ({names}); pass one split's folder as SRC, e.g.{example or ' its train folder'}"
    )


def discover(src: str, exclude: Path | None) -> list[Source]:
    """Every candidate source under ``src`` in sorted order of relative path.

    Names and stat only, so it is cheap enough to run just to see whether a finished output is
    still up to date; :func:`check_sources` then looks inside. ``exclude`` (the resolved output
    folder) is never searched.
    """
    if src.startswith(HUB_PREFIX):
        return [Source("hub", src, hub=_parse_hub(src))]
    root = Path(src).expanduser()
    if not root.exists():
        raise DataError(f"source {src} does not exist")
    try:
        if root.is_file():
            return [_named_file(root, root.name)]
        found: list[tuple[str, list[Source]]] = []
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
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in USER_SKIPPED_DIRS]
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


def source_sha256(sources: list[Source]) -> str:
    """A hash of what the sources are, to tell on a re-run whether they changed since."""
    # Size and modification time stand in for content: hashing terabytes to detect a changed
    # source on resume would cost as much as preparing it again.
    fingerprint = [[s.kind, s.relpath or s.label, s.size, s.mtime_ns] for s in sources]
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# Checking: a look inside every candidate


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
        raise DataError(f"{label}: {what} {field!r} holds {t}, not text; choose a string {what} with --text-field")


def _checked_arrow(src: Source, field: str) -> Source:
    pa = import_pyarrow()
    path = src.path
    try:
        with pa.memory_map(str(path)) as mm:
            schema, batches = ipc_reader(mm)
            _check_text_column(str(path), schema.names, schema.types, field, "column")
            # Counting rows walks the batch headers of a memory map: no data is read.
            rows = sum(b.num_rows for b in batches)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Arrow file ({one_line(e)})") from None
    return replace(src, rows=rows)


def _checked_parquet(src: Source, field: str) -> Source:
    pa = import_pyarrow()
    import pyarrow.parquet as pq

    path = src.path
    try:
        pf = pq.ParquetFile(str(path))
        schema = pf.schema_arrow
        rows = pf.metadata.num_rows
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({one_line(e)})") from None
    _check_text_column(str(path), schema.names, schema.types, field, "column")
    return replace(src, rows=rows)


def _checked_jsonl(src: Source, field: str) -> Source:
    path = src.path
    assert path is not None
    # Check the field on the first record now, so a wrong --text-field fails in a second rather
    # than after a tokenizer has been trained; later records are checked as they are read.
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    for _ in jsonl_texts(str(path), n, line, field):
                        pass
                    break
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({one_line(e)})") from None
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
            block = f.read(CHECK_BLOCK_BYTES)
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


def _checked_text(src: Source, explicit: bool, skipped: list[str]) -> Source | None:
    assert src.path is not None
    problem = "empty" if src.size == 0 else _text_problem(src.path)
    if problem is not None:
        if explicit:
            raise DataError(f"{src.path} is {problem}; convert it to UTF-8 text or pass another source")
        if src.size:
            skipped.append(src.relpath)  # empty files are no loss; the rest are reported
        return None
    return src


def check_sources(src: str, candidates: list[Source], field: str) -> tuple[list[Source], list[str]]:
    """Open every candidate: the text field or column must exist and text files must be UTF-8.

    Returns the usable sources and the relative paths of text files skipped as not text (only
    in a folder: a file named on its own raises). Raises DataError when nothing usable is left.
    """
    explicit = len(candidates) == 1 and not src.startswith(HUB_PREFIX) and Path(src).expanduser().is_file()
    sources: list[Source] = []
    skipped: list[str] = []
    for c in candidates:
        if c.kind == "hub":
            import_datasets()  # fail before anything is written when the extra is missing
            checked: Source | None = c
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
