"""Unit payloads back into document texts, with errors that name the file and the line.

A payload is what :mod:`.reader` cut from a source: ``("text", label, byte offset, bytes)``,
``("jsonl", label, first line number, bytes of whole lines)`` or ``("docs", label, [texts])``.
Decoding happens where the tokens are made (in the worker processes), not in the reader.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Iterator
from typing import Any

from ..errors import DataError
from ..messages import one_line


def decode_text(label: str, offset: int, data: bytes) -> str:
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
            f"{label}: not UTF-8 text (bad byte near offset {offset + e.start}); convert it to UTF-8 or remove it"
        ) from None


def jsonl_texts(label: str, first_line: int, data: bytes, field: str) -> Iterator[str | None]:
    """The ``field`` of every record in ``data`` (whole lines, the first numbered ``first_line``)."""
    for k, line in enumerate(data.split(b"\n")):
        if not line.strip():
            continue
        if first_line + k == 1 and line.startswith(codecs.BOM_UTF8):
            line = line[len(codecs.BOM_UTF8) :]  # json.loads refuses a byte-order mark
        where = f"{label} line {first_line + k}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"{where}: not valid JSON ({one_line(e)})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: a JSON {type(row).__name__}, not an object with a {field!r} field")
        if field not in row:
            keys = ", ".join(list(row)[:12]) or "none"
            raise DataError(f"{where}: no field {field!r} (it has: {keys}); choose one with --text-field")
        value = row[field]
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}: field {field!r} is a JSON {type(value).__name__}, not a string")
        yield value


def payload_texts(payload: tuple, field: str) -> Iterator[tuple[bool, str]]:
    """(starts a new document, text) for every non-empty piece of text in a unit's payload."""
    kind, label = payload[0], payload[1]
    if kind == "text":
        _, _, offset, data = payload
        text = decode_text(label, offset, data)
        if text:
            yield offset == 0, text
        return
    if kind == "jsonl":
        texts: Iterable[Any] = jsonl_texts(label, payload[2], payload[3], field)
    else:
        texts = payload[2]
    for text in texts:
        if text is None or text == "":
            continue  # a null or empty row is not a document: no lone separator for it
        if not isinstance(text, str):
            raise DataError(f"{label}: field {field!r} holds {type(text).__name__} values, not text")
        yield True, text
