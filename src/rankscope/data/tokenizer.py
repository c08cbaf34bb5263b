"""Byte-level BPE: training with Hugging Face ``tokenizers`` and streaming documents into shards.

Byte-level BPE (the GPT-2 scheme) covers every possible input with its 256-byte alphabet, so
there is no unknown token and decoding gives back the exact text. Documents are separated by the
single special token ``<|endoftext|>``, which is always id 0.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from .errors import DataError
from .format import MAX_VOCAB
from .shards import ShardWriter

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 0
# 256 byte tokens plus <|endoftext|>: a smaller vocabulary could not encode arbitrary text.
MIN_VOCAB_SIZE = 257
# Long documents are cut into pieces of at most this many characters so encode_batch can spread
# one big file over all cores (a single string is always encoded by one thread).
PIECE_CHARS = 1 << 20
# Characters handed to one encode_batch call: big enough to keep every core busy, small enough to
# bound memory (the Encoding objects cost far more than the text).
BATCH_CHARS = 8 << 20


def check_vocab_size(vocab_size: int) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
        raise DataError(f"vocab_size must be an integer, got {vocab_size!r}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(
            f"vocab_size {vocab_size} is too small for a byte-level tokenizer "
            f"(needs at least {MIN_VOCAB_SIZE}: 256 bytes + {EOT_TOKEN})"
        )
    if vocab_size > MAX_VOCAB:
        raise DataError(
            f"vocab_size {vocab_size} is too large: token shards store uint16 ids, so at most {MAX_VOCAB} entries fit"
        )


def _safe_cut(text: str, lo: int, hi: int) -> int | None:
    """The last index ``c`` in ``(lo, hi]`` where a piece may start, or None.

    A piece may start at a newline or space that follows a non-whitespace character. The GPT-2
    pre-tokenizer regex never puts a non-space character and the whitespace after it in the same
    pre-token (whitespace only ever leads a pre-token or forms its own), and BPE merges never
    cross pre-tokens, so encoding the pieces separately and concatenating gives exactly the ids
    of encoding the whole text. ``str.isspace`` accepts a superset of the regex's whitespace
    class, so it can only reject a good cut, never allow a bad one. Newlines are preferred so
    pieces end at line ends.
    """
    hi = min(hi, len(text) - 1)
    for ch in ("\n", " "):
        i = text.rfind(ch, lo + 1, hi + 1)
        while i > lo:
            if not text[i - 1].isspace():
                return i
            i = text.rfind(ch, lo + 1, i)
    return None


def _safe_cut_after(text: str, lo: int) -> int | None:
    best = None
    for ch in ("\n", " "):
        i = text.find(ch, lo + 1)
        while i != -1 and (best is None or i < best):
            if not text[i - 1].isspace():
                best = i
                break
            i = text.find(ch, i + 1)
    return best


def split_text(text: str, max_chars: int = PIECE_CHARS) -> list[str]:
    """Cut ``text`` into pieces of about ``max_chars`` that tokenize exactly like the whole.

    A piece exceeds ``max_chars`` only when no safe cut point exists near the limit (e.g. a huge
    single-line file), in which case the next safe point further on is used.
    """
    if len(text) <= max_chars:
        return [text]
    pieces = []
    start = 0
    while len(text) - start > max_chars:
        cut = _safe_cut(text, start + max_chars // 2, start + max_chars)
        if cut is None:
            cut = _safe_cut(text, start, start + max_chars) or _safe_cut_after(text, start + max_chars)
        if cut is None:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE tokenizer (GPT-2 style, no prefix space, exact round trip)."""
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: a leading space would change the first token of every document
    # and break the exact decode(encode(text)) == text round trip.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of (at most) ``vocab_size`` entries with ``<|endoftext|>`` at id 0.

    The vocabulary comes out smaller than ``vocab_size`` when the text is too small to supply
    that many merges; ids stay below ``vocab_size`` either way.
    """
    check_vocab_size(vocab_size)
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size),
        special_tokens=[EOT_TOKEN],  # listed first, so it gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        # The trainer's own progress bars print stray newlines to stdout, which must stay clean
        # for the CLI; callers log around training on stderr instead.
        show_progress=False,
    )
    pieces = (piece for text in texts for piece in split_text(text))
    tok.train_from_iterator(pieces, trainer=trainer)
    if tok.token_to_id(EOT_TOKEN) != EOT_ID:
        raise RuntimeError(f"tokenizers placed {EOT_TOKEN} at id {tok.token_to_id(EOT_TOKEN)}, not {EOT_ID}")
    return tok


def _batches(texts: Iterable[str]) -> Iterator[list[tuple[bool, str]]]:
    """Group document pieces into encode batches; each item is (starts a new document, piece)."""
    batch: list[tuple[bool, str]] = []
    chars = 0
    for text in texts:
        if not text:
            continue  # an empty document would only add a doubled separator
        for k, piece in enumerate(split_text(text)):
            batch.append((k == 0, piece))
            chars += len(piece)
            if chars >= BATCH_CHARS:
                yield batch
                batch, chars = [], 0
    if batch:
        yield batch


def encode_documents(
    tokenizer: Tokenizer,
    texts: Iterable[str],
    writer: ShardWriter,
    *,
    eot_id: int = EOT_ID,
    progress: bool = False,
    desc: str = "tokenizing",
    total_chars: int | None = None,
) -> int:
    """Encode documents into ``writer`` with ``eot_id`` between consecutive documents.

    Returns the number of documents written. A literal ``<|endoftext|>`` inside a document is
    encoded as ordinary text, so id ``eot_id`` in a shard always marks a real boundary.
    """
    encode = getattr(tokenizer, "encode_batch_fast", None) or tokenizer.encode_batch
    eot = np.array([eot_id], dtype=np.uint16)
    saved = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    n_docs = 0
    bar = tqdm(
        total=total_chars,
        desc=desc,
        unit="char",
        unit_scale=True,
        file=sys.stderr,
        # A bar redrawn into a log file is just noise: only draw it on a terminal.
        disable=not (progress and sys.stderr.isatty()),
        leave=False,
    )
    try:
        for batch in _batches(texts):
            encodings = encode([piece for _, piece in batch], add_special_tokens=False)
            parts = []
            for (first, _piece), enc in zip(batch, encodings):
                if first:
                    if n_docs:
                        parts.append(eot)
                    n_docs += 1
                parts.append(np.asarray(enc.ids, dtype=np.uint16))
            writer.write(np.concatenate(parts))
            bar.update(sum(len(piece) for _, piece in batch))
    finally:
        tokenizer.encode_special_tokens = saved
        bar.close()
    return n_docs
