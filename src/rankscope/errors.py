"""Errors that reach the user as one clear line and exit code 2 (see cli.main)."""


class RankscopeError(Exception):
    """Base class: its message is shown to the user as-is, without a traceback."""


class ConfigError(RankscopeError, ValueError):
    """A bad setting, override, preset or study file."""
