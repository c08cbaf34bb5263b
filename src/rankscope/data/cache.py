"""Tokenize a text corpus once and keep the result on disk, keyed by the corpus content.

A cache folder is named by a sha256 over the format version, the vocabulary size, the split
rule and every file's relative path and content, so editing, adding or renaming any file (or
upgrading Python, which changes the stdlib) builds a fresh folder instead of silently reusing
stale tokens. A folder is built under a temporary name and renamed into place only when
complete, so a killed build never leaves something that looks like a valid cache.

Folder contents: ``tokenizer.json``, ``train.bin``, ``val.bin``, ``ood.bin`` (built-in corpora
only) and ``meta.json`` (counts and provenance).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import Tokenizer

from ..storage.fsio import write_json, write_text
from .corpus import SourceFile
from .errors import DataError
from .messages import log
from .shards import ShardWriter, read_shard, truncate_shard, write_shard
from .tokenizer import EOT_ID, EOT_TOKEN, encode_documents, train_tokenizer

# Bump whenever the bytes a build produces for the same input could change (tokenizer settings,
# document separator, split rule), so old caches are not mistaken for new ones.
FORMAT_VERSION = "rankscope-data-v1"
CACHE_ENV = "RANKSCOPE_CACHE"
TOKENIZER_FILE, META_FILE = "tokenizer.json", "meta.json"
TRAIN_BIN, VAL_BIN, OOD_BIN = "train.bin", "val.bin", "ood.bin"
# Builds left behind by killed processes are swept once they are clearly abandoned.
STALE_TMP_SECONDS = 24 * 3600


def default_cache_dir() -> Path:
    """``$RANKSCOPE_CACHE`` when set, else ``~/.cache/rankscope``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rankscope"


@dataclass
class CorpusPlan:
    """What to tokenize: the hashed file lists and how to turn each entry into text.

    ``ood_docs`` produces the out-of-distribution documents (may be empty); ``ood_files`` are the
    files they come from, listed only so the cache key covers them. When ``val`` is empty the
    last ``val_percent`` of the train tokens become validation instead.
    """

    kind: str
    description: str
    train: list[SourceFile]
    val: list[SourceFile]
    read: Callable[[SourceFile], str]
    val_percent: int
    ood_files: list[SourceFile] = field(default_factory=list)
    ood_docs: Callable[[], list[str]] = list


@dataclass
class CachedCorpus:
    folder: Path
    meta: dict[str, Any]
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    ood: np.ndarray | None


def corpus_key(plan: CorpusPlan, vocab_size: int) -> str:
    """sha256 over everything that determines the cache contents.

    Files enter as (relative path, sha256 of content): a hash of hashes, equivalent to hashing
    the bytes themselves but computed while the files were listed. Every field is
    length-prefixed so no two different inputs can produce the same byte stream.
    """
    h = hashlib.sha256()

    def put(value: str | bytes) -> None:
        data = value.encode("utf-8") if isinstance(value, str) else value
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    for value in (FORMAT_VERSION, plan.kind, str(int(vocab_size)), str(plan.val_percent)):
        put(value)
    for split, files in (("train", plan.train), ("val", plan.val), ("ood", plan.ood_files)):
        put(split)
        put(str(len(files)))
        for f in files:
            put(f.relpath)
            put(bytes.fromhex(f.sha256))
    return h.hexdigest()


def tail_split(tokens: np.ndarray, val_percent: int, eot_id: int) -> tuple[int, int]:
    """Where to cut a token stream so the last ~``val_percent``% becomes validation.

    Returns ``(train_end, val_start)``. The cut snaps to the ``<|endoftext|>`` nearest the target
    when one lies within a factor of two of the target val size, so validation starts at a
    document boundary (the separator itself is dropped); otherwise it is the exact tail.
    """
    n = int(tokens.shape[0])
    n_val = max(1, round(n * val_percent / 100))
    target = n - n_val
    lo, hi = max(1, n - 2 * n_val), max(1, n - n_val // 2)
    if hi > lo:
        eots = np.flatnonzero(np.asarray(tokens[lo:hi]) == eot_id) + lo
        if eots.size:
            p = int(eots[np.argmin(np.abs(eots - target))])
            if p + 1 < n:
                return p, p + 1
    return target, target


def _sweep_stale_builds(root: Path) -> None:
    now = time.time()
    for entry in root.iterdir():
        if entry.name.startswith((".tmp-", ".stale-")) and entry.is_dir():
            try:
                if now - entry.stat().st_mtime > STALE_TMP_SECONDS or entry.name.startswith(".stale-"):
                    shutil.rmtree(entry, ignore_errors=True)
            except OSError:
                pass


def _new_build_dir(root: Path, name: str) -> Path:
    # os.mkdir rather than tempfile.mkdtemp: mkdtemp forces mode 0o700, and the renamed folder
    # should get the same umask-derived permissions as any other cache folder.
    while True:
        tmp = root / f".tmp-{name}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def _open_cached(folder: Path, key: str) -> CachedCorpus:
    """Load a finished cache folder, raising DataError if anything disagrees with its meta.json."""
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"cache {folder}: unreadable {META_FILE} ({e})") from None
    if meta.get("format") != FORMAT_VERSION or meta.get("key") != key:
        raise DataError(f"cache {folder}: {META_FILE} is for a different corpus or format")
    try:
        tok = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
    except Exception as e:  # tokenizers raises its own Exception subclass for parse errors
        raise DataError(f"cache {folder}: cannot load {TOKENIZER_FILE} ({e})") from None
    arrays: dict[str, np.ndarray] = {}
    for split, name in (("train", TRAIN_BIN), ("val", VAL_BIN), ("ood", OOD_BIN)):
        expected = meta["tokens"].get(split)
        if expected is None:
            continue
        arr = read_shard(folder / name)
        if arr.shape[0] != expected:
            raise DataError(f"cache {folder}: {name} has {arr.shape[0]} tokens, meta.json says {expected}")
        arrays[split] = arr
    return CachedCorpus(folder, meta, tok, arrays["train"], arrays["val"], arrays.get("ood"))


def _build(plan: CorpusPlan, vocab_size: int, key: str, out: Path, progress: bool) -> None:
    t0 = time.perf_counter()
    log(progress, f"training a {vocab_size}-token BPE on {len(plan.train)} files ({plan.description})")
    tok = train_tokenizer((plan.read(f) for f in plan.train), vocab_size)
    write_text(out / TOKENIZER_FILE, tok.to_str())
    t_train = time.perf_counter() - t0
    log(progress, f"tokenizer trained in {t_train:.1f}s ({tok.get_vocab_size()} tokens); tokenizing")

    def encode(name: str, texts: Iterable[str], total: int | None, desc: str) -> tuple[int, int]:
        with ShardWriter(out / name) as w:
            n_docs = encode_documents(tok, texts, w, eot_id=EOT_ID, progress=progress, desc=desc, total_chars=total)
        return n_docs, w.n_tokens

    def chars(files: list[SourceFile]) -> int:
        return sum(f.n_bytes for f in files)  # bytes ~ chars; only sizes the progress bar

    docs, tokens = {}, {}
    docs["train"], tokens["train"] = encode(
        TRAIN_BIN, (plan.read(f) for f in plan.train), chars(plan.train), "tokenizing train"
    )
    if plan.val:
        val_split = "by-file"
        docs["val"], tokens["val"] = encode(
            VAL_BIN, (plan.read(f) for f in plan.val), chars(plan.val), "tokenizing val"
        )
    else:
        # Too few files for the per-file rule to pick any: hold out the tail of the train stream.
        val_split = "tail"
        train = read_shard(out / TRAIN_BIN)
        if train.shape[0] < 2:
            raise DataError(f"{plan.description}: only {train.shape[0]} token(s) of text, too little to train on")
        train_end, val_start = tail_split(train, plan.val_percent, EOT_ID)
        val = np.array(train[val_start:])
        del train  # release the map before shrinking the file under it
        write_shard(out / VAL_BIN, val)
        truncate_shard(out / TRAIN_BIN, train_end)
        tokens["val"], tokens["train"] = int(val.shape[0]), train_end
        docs["val"] = int(np.count_nonzero(val == EOT_ID)) + 1
        docs["train"] -= docs["val"] - (1 if val_start == train_end else 0)

    ood_docs = plan.ood_docs()
    if ood_docs:
        docs["ood"], tokens["ood"] = encode(OOD_BIN, ood_docs, sum(map(len, ood_docs)), "tokenizing ood")

    meta = {
        "format": FORMAT_VERSION,
        "key": key,
        "kind": plan.kind,
        "source": plan.description,
        "vocab_size": int(vocab_size),
        "tokenizer_vocab_size": tok.get_vocab_size(),
        "eot_token": EOT_TOKEN,
        "eot_id": EOT_ID,
        "val_percent": plan.val_percent,
        "val_split": val_split,
        "files": {"train": len(plan.train), "val": len(plan.val), "ood": len(plan.ood_files)},
        "documents": docs,
        "tokens": tokens,
        "bytes": {"train": chars(plan.train), "val": chars(plan.val)},
        "python": sys.version.split()[0],
        "tokenizers": tokenizers.__version__,
        "tokenizer_seconds": round(t_train, 2),
        "build_seconds": round(time.perf_counter() - t0, 2),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    # Written last: a folder whose meta.json parses was built to the end.
    write_json(out / META_FILE, meta, sort_keys=True)


def cached_corpus(
    plan: CorpusPlan, vocab_size: int, cache_dir: str | Path | None = None, *, progress: bool = True
) -> CachedCorpus:
    """Return the tokenized corpus for ``plan``, building the cache folder on the first call."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = corpus_key(plan, vocab_size)
    folder = root / f"{plan.kind}-v{int(vocab_size)}-{key[:24]}"
    if folder.is_dir():
        try:
            return _open_cached(folder, key)
        except DataError as e:
            # Only something outside rankscope can damage a renamed-into-place folder; rebuild
            # rather than make the user find and delete it.
            log(True, f"rebuilding damaged cache: {e}")
            try:
                os.rename(folder, root / f".stale-{folder.name}-{os.getpid()}")
            except OSError:
                raise DataError(f"cache {folder} is damaged and cannot be moved aside; delete it") from None
    try:
        root.mkdir(parents=True, exist_ok=True)
        _sweep_stale_builds(root)
        tmp = _new_build_dir(root, folder.name)
    except OSError as e:
        raise DataError(
            f"cannot write the token cache under {root} ({e.strerror or e}); set {CACHE_ENV} to a writable folder"
        ) from None
    try:
        t0 = time.perf_counter()
        _build(plan, vocab_size, key, tmp, progress)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / META_FILE).is_file():
                raise
            # Another process finished the same build first; use its folder (same corpus, same key).
            shutil.rmtree(tmp, ignore_errors=True)
        log(progress, f"token cache ready in {time.perf_counter() - t0:.1f}s: {folder}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _open_cached(folder, key)
