"""A setting's value as its field declares it: a TOML value or a command-line string turned into
the field's type (bool, int, float, str, a `Literal`'s choices, a tuple) and checked by its rules
(`rules.Range`, `Match`, `Distinct`), or refused in one line that names the key, the value and what
is allowed. Torch-free.
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, Literal

from ..errors import ConfigError
from .rules import Range, show_value
from .units import parse_count

# What each plain type accepts, for messages.
_KIND = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def coerce(key: str, typ: Any, value: Any) -> Any:
    """Turn a TOML value or a command-line string into the field's type and check its rule, or fail
    with one line that names the key, the value and what is allowed."""
    origin = typing.get_origin(typ)
    if origin is Annotated:
        base, *rules = typing.get_args(typ)
        try:
            typed = coerce(key, base, value)
        except ConfigError:
            ranges = [r for r in rules if isinstance(r, Range)]
            if ranges:  # '1e400' or 'lots' for a count: say which numbers would do
                raise ConfigError(f"{key} must be {ranges[0].describe(base)}, got {show_value(value)}") from None
            raise
        for rule in rules:
            rule.check(key, typed, value)  # the message shows the value as given: '-1', not -1.0
        return typed
    from_text = isinstance(value, str)
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if from_text and value.strip().lower() in ("true", "1", "yes", "on"):
                return True
            if from_text and value.strip().lower() in ("false", "0", "no", "off"):
                return False
        elif typ is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():  # TOML's 2.0; not inf or nan
                return int(value)
            if from_text:
                try:
                    return int(value)  # exact, however many digits ('-3' included, for a range message)
                except ValueError:
                    return parse_count(value)  # 2M, 1.5e6, 4_096
        elif typ is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if from_text:
                return float(value)
        elif typ is str:
            if isinstance(value, str):
                return value
        elif origin is Literal:
            choices = typing.get_args(typ)
            if isinstance(value, str) and value in choices:
                return value
            raise ConfigError(f"{key} must be {', '.join(choices[:-1])} or {choices[-1]}, got {show_value(value)}")
        elif origin is tuple:
            (inner, _) = typing.get_args(typ)
            items = value.split(",") if from_text else value
            if isinstance(items, (list, tuple)):
                return tuple(coerce(key, inner, v.strip() if isinstance(v, str) else v) for v in items if v != "")
            raise ConfigError(f"{key} must be a comma-separated list, got {show_value(value)}")
    except ConfigError:
        raise
    except (ValueError, OverflowError):  # float('x'), float(10**400), int('9' * 5000)
        pass
    raise ConfigError(f"{key} must be {_KIND.get(typ, getattr(typ, '__name__', str(typ)))}, got {show_value(value)}")
