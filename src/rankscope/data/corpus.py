"""Finding the documents to train on: the interpreter's standard library and text folders.

The python-stdlib corpus (see `corpora`) is the running interpreter's own standard library, so it
is on every machine with nothing to download. Every listing is sorted by relative POSIX path and the
train/validation split is a hash of that path, so the same files give the same split on every
machine and on every run, independent of file-system ordering.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sys
import sysconfig
import tokenize
import zlib
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

# Directories never descended into for the python-stdlib corpus: installed third-party packages (they
# differ between machines, so they would make the "same" corpus differ) and the test suites
# (huge, repetitive, and full of deliberately odd code). Any directory whose name starts with
# "test" is skipped as well.
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
# pydoc_data holds English reference prose (the help() topics): kept out of training and used as
# the out-of-distribution set instead.
PYDOC_DIR = "pydoc_data"
TOPICS_RELPATH = "pydoc_data/topics.py"

TEXT_SUFFIXES = frozenset(
    {
        ".txt",
        ".md",
        ".py",
        ".rst",
        ".json",
        ".jsonl",
        ".csv",
        ".html",
        ".tex",
        ".c",
        ".h",
        ".js",
        ".ts",
        ".java",
        ".go",
        ".rs",
        ".toml",
        ".yaml",
        ".yml",
    }
)
# Never worth reading in a user folder: version-control internals, bytecode caches, virtualenvs.
USER_SKIPPED_DIRS = frozenset({"__pycache__", "node_modules"})


@dataclass(frozen=True)
class SourceFile:
    """One document on disk: its path relative to the corpus root (the key for the split and the
    cache hash) and the sha256 of its bytes (so the cache key covers content without re-reading)."""

    relpath: str
    path: Path
    sha256: str
    n_bytes: int


def is_val(relpath: str, val_percent: int) -> bool:
    """The held-out rule: a file is validation when crc32 of its relative path mod 100 < val_percent."""
    return zlib.crc32(relpath.encode("utf-8")) % 100 < val_percent


def check_val_percent(val_percent: int) -> None:
    if not isinstance(val_percent, int) or not 0 <= val_percent <= 100:
        raise ValueError(f"val_percent must be an integer in [0, 100], got {val_percent!r}")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _stdlib_relpaths(root: Path) -> list[str]:
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        # Pruning in place stops os.walk from descending (site-packages alone can hold 10k+ files).
        dirnames[:] = [
            d
            for d in dirnames
            if d not in STDLIB_EXCLUDED_DIRS
            and not d.startswith("test")
            and not (rel_dir == Path(".") and d == PYDOC_DIR)
        ]
        found.extend((rel_dir / f).as_posix() for f in filenames if f.endswith(".py"))
    return sorted(found)


def stdlib_corpus_files(val_percent: int = 5) -> tuple[list[Path], list[Path], list[str]]:
    """The python-stdlib corpus: (train files, val files, OOD documents).

    Train/val are the stdlib's ``*.py`` files (tests, third-party packages and ``pydoc_data``
    excluded) split by :func:`is_val`, each list sorted by relative path. The OOD documents are
    the English ``help()`` topics from ``pydoc_data/topics.py``, sorted by topic name; empty when
    the interpreter ships without them (some distributions strip ``pydoc_data``).
    """
    check_val_percent(val_percent)
    root = stdlib_root()
    train, val = [], []
    for rel in _stdlib_relpaths(root):
        (val if is_val(rel, val_percent) else train).append(root / rel)
    return train, val, pydoc_topics()


def pydoc_topics() -> list[str]:
    """The values of ``pydoc_data.topics.topics``, sorted by key.

    The file is parsed and the dict literal evaluated with ``ast.literal_eval``, which reads the
    exact file the cache hash covers and runs no code; importing the module is the fallback for
    a layout the parser does not recognise.
    """
    path = stdlib_root() / TOPICS_RELPATH
    topics: dict[str, str] | None = None
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError):
        tree = None
    if tree is not None:
        for node in tree.body:
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else ([node.target] if isinstance(node, ast.AnnAssign) and node.value is not None else [])
            )
            if any(isinstance(t, ast.Name) and t.id == "topics" for t in targets):
                try:
                    value = ast.literal_eval(node.value)  # type: ignore[union-attr]
                except ValueError:
                    break
                if isinstance(value, dict):
                    topics = value
                break
    if topics is None:
        try:
            from pydoc_data import topics as topics_module  # stdlib; no third-party code runs
        except ImportError:
            return []
        topics = dict(getattr(topics_module, "topics", {}))
    return [str(topics[k]) for k in sorted(topics) if str(topics[k]).strip()]


def decode_python_source(data: bytes) -> str:
    """Decode a .py file the way the interpreter would (PEP 263 coding cookie, UTF-8 default)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        import io

        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        return data.decode(encoding, errors="replace")


def decode_text(data: bytes) -> str | None:
    """UTF-8 text with any byte-order mark dropped, or None for anything that looks binary.

    Binary is: not valid UTF-8, or containing NUL bytes (valid UTF-8 but never in real text,
    e.g. UTF-16 files or some packed formats).
    """
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def read_document(path: Path, *, python_source: bool = False) -> str:
    data = path.read_bytes()
    if python_source:
        return decode_python_source(data)
    text = decode_text(data)
    # Files were validated when listed; one that turned binary since then is a race we report
    # rather than silently train on garbage.
    if text is None:
        raise DataError(f"file {path} is no longer valid UTF-8 text (changed while loading?)")
    return text


def _source_file(root_for_rel: Path, path: Path, data: bytes) -> SourceFile:
    rel = path.relative_to(root_for_rel).as_posix()
    return SourceFile(rel, path, hashlib.sha256(data).hexdigest(), len(data))


def stdlib_source_files(val_percent: int = 5) -> tuple[list[SourceFile], list[SourceFile], list[SourceFile]]:
    """The python-stdlib corpus as hashed :class:`SourceFile` lists (train, val, OOD source file)."""
    train_paths, val_paths, _ = stdlib_corpus_files(val_percent)
    root = stdlib_root()
    train = [_source_file(root, p, p.read_bytes()) for p in train_paths]
    val = [_source_file(root, p, p.read_bytes()) for p in val_paths]
    topics = root / TOPICS_RELPATH
    ood = [_source_file(root, topics, topics.read_bytes())] if topics.is_file() else []
    return train, val, ood


def _has_text_suffix(name: str) -> bool:
    suffix = os.path.splitext(name)[1].lower()
    return suffix == "" or suffix in TEXT_SUFFIXES


def text_source_files(path: Path) -> list[SourceFile]:
    """Usable text files under ``path`` (a folder, searched recursively, or a single file).

    In a folder a file is used when its extension is in :data:`TEXT_SUFFIXES` (or it has none)
    and its bytes decode as UTF-8 text; hidden files and folders (``.git`` and the like),
    ``__pycache__`` and ``node_modules`` are skipped. A single file named explicitly is used
    whatever its extension, as long as it is text. Sorted by relative POSIX path.
    """
    if path.is_file():
        data = path.read_bytes()
        if decode_text(data) is None:
            raise DataError(f"data file {path} is not UTF-8 text (binary files cannot be used)")
        if not data.strip():
            raise DataError(f"data file {path} is empty")
        return [_source_file(path.parent, path, data)]

    candidates: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in USER_SKIPPED_DIRS]
        candidates.extend(Path(dirpath) / f for f in filenames if not f.startswith(".") and _has_text_suffix(f))
    candidates.sort(key=lambda p: p.relative_to(path).as_posix())
    files = []
    for p in candidates:
        try:
            data = p.read_bytes()
        except OSError:
            continue  # unreadable (permissions, dangling symlink): not part of the corpus
        if data.strip() and decode_text(data) is not None:
            files.append(_source_file(path, p, data))
    return files


def split_files(files: list[SourceFile], val_percent: int) -> tuple[list[SourceFile], list[SourceFile]]:
    train = [f for f in files if not is_val(f.relpath, val_percent)]
    val = [f for f in files if is_val(f.relpath, val_percent)]
    return train, val
