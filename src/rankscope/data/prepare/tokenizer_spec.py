"""The ``--tokenizer`` of a prepare: what it names, how to get it, and what it means for the shards.

A spec is a ``tokenizer.json`` file, a folder holding one, a hub name (fetched online),
``train:VOCAB`` (a byte-level BPE trained on the source) or a ``tokenizers.Tokenizer`` object.
:func:`resolve_tokenizer` works out what a spec names without building anything;
:func:`get_tokenizer` trains, loads or fetches it; :func:`describe_tokenizer` checks that its
ids fit in a shard and finds the id that separates documents.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from ...settings.units import parse_count
from ..errors import DataError
from ..format import MAX_VOCAB, TOKENIZER_FILE
from ..messages import log, one_line
from ..tokenizer import EOT_TOKEN, train_tokenizer
from .decode import payload_texts
from .reader import read_units
from .sources import Source

TRAIN_PREFIX = "train:"
# `train:VOCAB` learns the BPE on at most this many characters of the source: merges stop
# changing long before that, and the trainer's word counts grow with the text.
TRAIN_MAX_CHARS = 2 << 30
# End-of-sequence spellings recognised among a tokenizer's special tokens, in order of preference.
EOS_CANDIDATES = ("<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|endofdocument|>")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class TokenizerSpec:
    """What ``--tokenizer`` names, worked out before anything is built, trained or fetched."""

    given: str | Tokenizer  # the spec as passed (a path as a string), or a Tokenizer object
    recorded: str  # as recorded with the arguments: a resolved path, a hub name, train:VOCAB
    sha256: str | None  # of the tokenizer's JSON, when known up front (a file or an object)
    path: Path | None  # the tokenizer.json it names, if it names a file

    @property
    def where(self) -> str:
        """The tokenizer as messages name it."""
        return str(self.path) if self.path is not None else self.recorded


@dataclass(frozen=True)
class TokenizerInfo:
    """A tokenizer as prepare uses it: its JSON (saved beside the shards) and what follows from it."""

    json: str
    sha256: str
    vocab_size: int
    eot_id: int
    eot_token: str | None
    splittable: bool  # documents may be encoded in pieces (see _splittable)
    config_eos: str | None  # eos named by a tokenizer_config.json beside the file


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def resolve_tokenizer(tokenizer: str | os.PathLike | Tokenizer) -> TokenizerSpec:
    """What ``tokenizer`` names; DataError for an empty spec, a bad train:VOCAB or a missing file."""
    if isinstance(tokenizer, Tokenizer):
        text = tokenizer.to_str()
        return TokenizerSpec(tokenizer, "<Tokenizer object>", sha256_text(text), None)
    spec = os.fspath(tokenizer)
    if not spec:
        raise DataError("--tokenizer is empty")
    if spec.startswith(TRAIN_PREFIX):
        _parse_train_spec(spec)
        return TokenizerSpec(spec, spec, None, None)
    path = _tokenizer_file(spec)
    if path is None:
        return TokenizerSpec(spec, spec, None, None)  # a hub name
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"tokenizer {path}: cannot read ({one_line(e)})") from None
    return TokenizerSpec(spec, str(path.resolve()), sha256_text(text), path)


def get_tokenizer(
    spec: TokenizerSpec, sources: list[Source], text_field: str, eot_id: int | None, progress: bool
) -> TokenizerInfo:
    """Train, load or fetch the tokenizer ``spec`` names, and describe it."""
    tok, text, config_eos = _build_tokenizer(spec, sources, text_field, progress)
    return describe_tokenizer(tok, text, eot_id, config_eos, spec.where)


def _build_tokenizer(
    spec: TokenizerSpec, sources: list[Source], text_field: str, progress: bool
) -> tuple[Tokenizer, str, str | None]:
    """(tokenizer, its JSON, eos named by a tokenizer_config.json)."""
    given = spec.given
    if isinstance(given, Tokenizer):
        return given, given.to_str(), None
    if given.startswith(TRAIN_PREFIX):
        vocab = _parse_train_spec(given)
        if any(s.kind == "hub" for s in sources):
            raise DataError(
                "--tokenizer train:VOCAB needs a local SRC; for a hub stream pass a tokenizer.json "
                "or a hub tokenizer name"
            )
        log(progress, f"training a {vocab}-token byte-level BPE on the source")
        t0 = time.perf_counter()
        tok = train_tokenizer(_training_texts(sources, text_field), vocab)
        log(progress, f"tokenizer trained in {time.perf_counter() - t0:.1f}s ({tok.get_vocab_size()} tokens)")
        return tok, tok.to_str(), None
    if spec.path is not None:
        text = spec.path.read_text(encoding="utf-8")
        return tokenizer_from_json(text, given), text, _config_eos(spec.path)
    tok = _fetch_hub_tokenizer(given)
    return tok, tok.to_str(), None


def _training_texts(sources: list[Source], field: str) -> Iterator[str]:
    chars = 0
    for unit in read_units(sources, (0, 0), field, splittable=True):
        for _, text in payload_texts(unit.payload, field):
            yield text
            chars += len(text)
            if chars >= TRAIN_MAX_CHARS:
                return


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
        return parse_count(value)
    except ValueError:
        raise DataError(f"--tokenizer {spec}: expected train:VOCAB, e.g. train:8192") from None


def tokenizer_from_json(text: str, where: str) -> Tokenizer:
    try:
        return Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a plain Exception for parse errors
        raise DataError(f"tokenizer {where} is not a valid tokenizer.json ({one_line(e)})") from None


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
    members = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
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


def describe_tokenizer(
    tok: Tokenizer, text: str, eot_id: int | None, config_eos: str | None, where: str
) -> TokenizerInfo:
    """What prepare needs to know of ``tok`` (whose JSON is ``text``); DataError if it cannot be used."""
    vocab = tok.get_vocab(with_added_tokens=True)
    vocab_size = max(vocab.values()) + 1 if vocab else 0
    if vocab_size > MAX_VOCAB:
        raise DataError(
            f"tokenizer {where} has ids up to {vocab_size - 1}, but token shards store uint16 ids "
            f"(at most {MAX_VOCAB} entries); use a tokenizer with a smaller vocabulary"
        )
    j = json.loads(text)
    eot, eot_token = _eot(tok, j, eot_id, vocab_size, config_eos, where)
    return TokenizerInfo(text, sha256_text(text), vocab_size, eot, eot_token, _splittable(j), config_eos)
