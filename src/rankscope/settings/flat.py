"""Nested settings as dotted keys: {'model': {'qk_norm': 'none'}} -> {'model.qk_norm': 'none'}.
Torch-free; study files, run configs and the report all read settings this way."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
