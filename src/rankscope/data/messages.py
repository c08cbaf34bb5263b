"""How the data layer talks while it works: log lines on stderr, and foreign errors in one line.

stderr only: stdout belongs to the CLI's one-line summaries and machine-readable output.
"""

from __future__ import annotations

import sys


def log(progress: bool, msg: str) -> None:
    """Print ``rankscope: msg`` on stderr when ``progress`` is on."""
    if progress:
        print(f"rankscope: {msg}", file=sys.stderr, flush=True)


def one_line(e: BaseException) -> str:
    """The first line of an exception from another library (at most 300 characters), for a
    :class:`~rankscope.data.errors.DataError` message, which is always one line."""
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
