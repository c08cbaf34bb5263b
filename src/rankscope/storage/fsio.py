"""The one atomic write: a reader sees the old file or the new one, never half of either.

Every file rankscope writes whole (JSON, reports, tables rewritten on resume, checkpoints,
token shards) goes to a hidden temporary name in the target's folder, is flushed and fsynced,
then renamed over the target, and the folder is fsynced so the rename itself survives a crash.
The temporary name carries the process id and a random suffix, so two processes writing the same
target (the shards of one study starting together) never collide; if the write fails, the
temporary file is removed and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

# `.name.<pid>.<8 hex>.tmp`: what `temp_name` makes, so cleanups can recognise leftovers.
TEMP_NAME = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$")


def temp_name(path: Path) -> Path:
    """A hidden, unique sibling of `path` (same folder, so the final rename never crosses devices)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in `folder` durable. Not every platform lets a folder be opened, and the data
    is already safe without it, so failure is ignored."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def open_temp(path: Path, binary: bool = True) -> tuple[Path, IO[Any]]:
    """Create a fresh temporary sibling of `path` with O_EXCL (mode 0o666, so the umask decides the
    permissions as for any ordinary file; mkstemp would force 0o600). Returns (name, open file)."""
    while True:
        tmp = temp_name(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    if binary:
        return tmp, os.fdopen(fd, "wb")
    return tmp, os.fdopen(fd, "w", encoding="utf-8", newline="")


def commit(tmp: Path, f: IO[Any], path: Path) -> None:
    """Flush, fsync and close `f` (the file open on `tmp`), then rename it over `path`; on any
    failure the temporary file is removed and `path` is untouched."""
    try:
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            f.close()  # a full disk fails close()'s flush again; the file is closed regardless
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | Path, binary: bool = True) -> Iterator[IO[Any]]:
    """Write `path` through a temporary file: ``with atomic_open(p) as f: f.write(...)``. The target
    is replaced only when the block ends without an exception."""
    path = Path(path)
    tmp, f = open_temp(path, binary)
    try:
        yield f
    except BaseException:
        with contextlib.suppress(OSError):
            f.close()  # a full disk fails close()'s flush again; the file is closed regardless
        tmp.unlink(missing_ok=True)
        raise
    commit(tmp, f, path)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, binary=False) as f:
        f.write(text)


def write_json(path: str | Path, obj: Any, *, sort_keys: bool = False, default: Any = None) -> None:
    """JSON with two-space indents and a final newline."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=default) + "\n")
