"""The one exception type the data layer raises for problems with the user's data."""

from __future__ import annotations

from ..errors import RankscopeError


class DataError(RankscopeError, ValueError):
    """A problem with the data: a missing path, a malformed shard, a vocabulary mismatch.

    The message is a single line meant to be shown to the user as-is (the CLI reports every
    RankscopeError without a traceback), so it always names the file or folder concerned and,
    where one exists, the fix.
    """
