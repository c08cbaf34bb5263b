"""Errors that reach the user as one clear line and a non-zero exit code (see cli.main)."""


class RankscopeError(Exception):
    """Base class: its message is shown to the user as-is, without a traceback."""

    exit_code = 2  # a usage or input error, as argparse exits


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for the one
    line a RankscopeError wrapping it shows."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


class ConfigError(RankscopeError, ValueError):
    """A bad setting, override, preset or study file."""


class Interrupted(RankscopeError):
    """Ctrl-C or SIGTERM stopped the work at a safe point; the message says how to resume. Exits with
    the shell's convention for a signal: 128 + its number (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
