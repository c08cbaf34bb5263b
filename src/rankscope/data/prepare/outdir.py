"""The output folder of a prepare: its state file, its lock, and what it already holds.

While a prepare runs, ``prepare_state.json`` records its arguments, its tokenizer and every
shard finished so far with the point to resume from after it; ``meta.json`` replaces it at the
end. The checks here decide whether a folder is new, resumable, already complete, or someone
else's, and refuse a re-run whose arguments differ from the recorded ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ...errors import RankscopeError
from ...storage.fsio import TEMP_NAME, write_json
from ...storage.locks import FileLock, LockHeld
from ..errors import DataError
from ..format import META_FILE
from ..messages import log, one_line
from ..shards import read_shard

# Held while a prepare writes the folder; hidden, so no source listing or loader ever reads it.
LOCK_FILE = ".rankscope-prepare.lock"

# How a differing recorded argument is named in the refusal.
_ARG_NAMES = {
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


def save_state(path: Path, state: dict[str, Any]) -> None:
    # A named step (rather than inline calls) so tests can interrupt a run right after a shard;
    # callers use it as outdir.save_state so that a patched one is the one called.
    write_json(path, state)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when the file is missing or holds no object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({one_line(e)}); delete the output folder and start over") from None
    return value if isinstance(value, dict) else None


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` so two prepares never write the same output. The lock
    (``rankscope.storage.locks``) dies with its process, so a killed prepare leaves the folder resumable."""
    lock = FileLock(folder / LOCK_FILE, "rankscope data prepare")
    try:
        lock.acquire()
    except LockHeld as e:
        raise DataError(
            f"another process is writing to {folder}: {e.holder}; wait for it or use another --out"
        ) from None
    except RankscopeError as e:
        raise DataError(str(e)) from None
    if lock.unguarded:
        log(True, f"warning: {lock.unguarded}; nothing stops two prepares writing this folder")
    try:
        yield
    finally:
        lock.release()


def remove_temp_files(folder: Path) -> None:
    """Delete the temporary files of a killed run (only while holding the lock)."""
    for entry in folder.iterdir():
        if TEMP_NAME.match(entry.name):
            entry.unlink(missing_ok=True)


def _args_difference(recorded: dict[str, Any], current: dict[str, Any]) -> str | None:
    for key, label in _ARG_NAMES.items():
        if recorded.get(key) != current.get(key):
            if key.endswith("sha256") or key == "format":
                return label
            return f"{label} {recorded.get(key)} (now {current.get(key)})"
    return None


def check_resumable(out: Path, state: dict[str, Any] | None, args: dict[str, Any]) -> None:
    """Refuse to resume an unfinished prepare that was started with other arguments."""
    diff = _args_difference((state or {}).get("args", {}), args)
    if diff:
        raise DataError(
            f"{out} holds an unfinished prepare with different arguments: {diff}; "
            "re-run it as it was, use another --out, or delete it"
        )


def finished_meta(out: Path, args: dict[str, Any], progress: bool) -> dict[str, Any] | None:
    """The meta.json of a finished output made with ``args``; DataError if made with others."""
    meta_path = out / META_FILE
    meta = read_json(meta_path) if meta_path.is_file() else None
    if meta is None or not meta.get("complete"):
        return None
    diff = _args_difference(meta.get("args", {}), args)
    if diff:
        raise DataError(f"{out} was already prepared with different arguments: {diff}; use another --out or delete it")
    log(progress, f"{out} is already complete; nothing to do")
    return meta


def check_empty(out: Path) -> None:
    """A new output goes only into a new or empty folder (the lock file of a prepare killed before
    it wrote anything else does not count)."""
    if out.exists() and (not out.is_dir() or any(p.name != LOCK_FILE for p in out.iterdir())):
        raise DataError(f"--out {out} is not empty and holds no rankscope prepare output; use a new or empty folder")


def verified_shards(out: Path, shards: list[dict[str, Any]], progress: bool) -> list[dict[str, Any]]:
    """The longest prefix of recorded shards whose files are intact (header and size)."""
    good = []
    for shard in shards:
        try:
            n = int(read_shard(out / shard["name"]).shape[0])
        except DataError as e:
            log(progress, f"redoing from {shard['name']}: {e}")
            break
        if n != shard["tokens"]:
            log(progress, f"redoing from {shard['name']}: it has {n} tokens, expected {shard['tokens']}")
            break
        good.append(shard)
    return good
