"""Sites: where a per-head activation is read in any model (a module-path pattern, a head layout,
which call), the modules a pattern matches, and the hooks that read one call of each per forward pass.

The probe (`probe.GramProbe`), the induction scores (`induction.InductionScores`) and the KV-headroom
measurements all read activations through these: a site names what to read, `SiteCalls` hooks every
matching module and hands on the one call the site asks for, and refuses a module that runs more
often than its site allows rather than mixing calls into one measurement.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import RankscopeError


@dataclass(frozen=True)
class Site:
    """Where to read one kind of per-head activation.

    pattern:   fnmatch pattern over module paths; the layer index is the first integer in the path.
    layout:    'BTHE' (batch, tokens, heads, head dim), 'BHTE', or 'BTC' (heads*head_dim flattened,
               which needs head_dim).
    read:      'output' (what the module returns) or 'input' (its first argument: e.g. the input of
               an output projection holds every head's attention output).
    transform: optional `f(x, layer) -> x` applied to what was read, before the layout. It lets a site
               read what a model never materialises in a module of its own: one third of a fused
               QKV projection, or keys with the model's rotary embedding applied (see
               `rankscope.attach`). It must not modify x in place.
    call:      which call of the module to read when it runs more than once in one forward pass
               (0-based: 1 = the second), e.g. one rotary module applied to queries and then to
               keys. None (the default) expects a single call and raises `RankscopeError` when a
               module runs more often, rather than mixing the calls into one measurement.
    """

    name: str
    pattern: str
    layout: str = "BTHE"
    head_dim: int | None = None
    read: str = "output"
    transform: Callable[[torch.Tensor, int], torch.Tensor] | None = None
    call: int | None = None

    def __post_init__(self) -> None:
        if self.call is not None and (isinstance(self.call, bool) or not isinstance(self.call, int) or self.call < 0):
            raise ValueError(f"site {self.name!r}: call must be None or a call index >= 0, got {self.call!r}")

    def capture(self, layer: int, args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
        """The (B, T, heads, E) activation of one forward call of a matching module."""
        return self.finish(self.raw(args, kwargs, output), layer)

    def raw(self, args: tuple, kwargs: dict, output: Any) -> Any:
        """What the site reads from one call (its output or first input), before transform and layout."""
        if self.read == "output":
            return output[0] if isinstance(output, (tuple, list)) else output
        if self.read == "input":
            return args[0] if args else next(iter(kwargs.values()))
        raise ValueError(f"unknown read {self.read!r} (output or input)")

    def finish(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """The transform, then the layout: what `raw` read as (B, T, heads, E)."""
        if self.transform is not None:
            x = self.transform(x, layer)
        return self.to_bthe(x)

    def to_bthe(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "BTHE":
            return x
        if self.layout == "BHTE":
            return x.transpose(1, 2)
        if self.layout == "BTC":
            return x.unflatten(-1, (-1, self.head_dim))
        raise ValueError(f"unknown layout {self.layout!r}")


def pair_qk(pending: dict, which: str, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Hooks on a layer's q and k fire one after the other: hold the first in `pending` until its
    partner arrives, then return (q, k); None while one is still missing."""
    other = "k" if which == "q" else "q"
    if (other, layer) not in pending:
        pending[(which, layer)] = x
        return None
    y = pending.pop((other, layer))
    return (x, y) if which == "q" else (y, x)


def gpt_sites(names: Iterable[str]) -> list[Site]:
    """Sites of rankscope's own GPT: q_pre, q, k_pre, k, v, o taps in every block."""
    return [Site(n, f"blocks.*.attn.{n}") for n in names]


def layer_of(path: str) -> int:
    """The layer index of a module path: its first integer component (`blocks.3.attn.k` -> 3)."""
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
    if m is None:
        raise ValueError(f"no layer index in module path {path!r}")
    return int(m.group(1))


def _matching_paths(model: nn.Module, pattern: str) -> list[tuple[int, str, nn.Module]]:
    found = [(layer_of(p), p, m) for p, m in model.named_modules() if fnmatch.fnmatchcase(p, pattern)]
    if not found:
        raise ValueError(f"no module matches {pattern!r}")
    return sorted(found, key=lambda t: t[0])


def matching_modules(model: nn.Module, pattern: str) -> list[tuple[int, nn.Module]]:
    """(layer, module) of every module of `model` whose path matches the fnmatch `pattern`, by layer;
    ValueError when none does."""
    return [(layer, m) for layer, _, m in _matching_paths(model, pattern)]


def _shape(x: Any) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


class SiteCalls:
    """Hooks that read sites, one call of each module per forward pass.

    A module can run more than once in one forward pass: one rotary module applied to the queries
    and then to the keys (the seed's own model), or a block whose weights are shared across depth.
    Reading every call would sum different tensors into one measurement (or fail deep inside the
    hook when their head counts differ), so each hook counts the calls of its (site, module) since
    `start` and hands on only the one the site asks for (`Site.call`, else the first); `check`,
    after the forward pass, raises when a module ran more often than its site allows. Counting is
    per forward pass: a measurement over several batches runs every module once per batch.
    """

    def __init__(self) -> None:
        self._shapes: dict[tuple[str, str], list[str]] = {}  # (label, module path) -> shapes, in call order
        self._sites: dict[tuple[str, str], Site] = {}

    def attach(self, model: nn.Module, label: str, site: Site, take: Callable[[int, torch.Tensor], None]) -> list[Any]:
        """Hook every module matching `site` and call `take(layer, x)` with the (B, T, heads, E)
        activation of the chosen call; `label` names the site in errors. Returns the handles."""
        handles = []
        for layer, path, mod in _matching_paths(model, site.pattern):
            key = (label, path)
            self._shapes[key], self._sites[key] = [], site
            handles.append(mod.register_forward_hook(self._hook(key, site, layer, take), with_kwargs=True))
        return handles

    def _hook(self, key: tuple[str, str], site: Site, layer: int, take: Callable[[int, torch.Tensor], None]):
        want = site.call if site.call is not None else 0
        shapes = self._shapes[key]

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x = site.raw(args, kwargs, output)
            shapes.append(_shape(x))
            if len(shapes) - 1 == want:  # other calls are only counted: no transform, no accumulation
                take(layer, site.finish(x, layer))

        return hook

    def start(self) -> None:
        """A forward pass begins: no module has run yet."""
        for shapes in self._shapes.values():
            shapes.clear()

    def check(self) -> None:
        """After a forward pass: raise RankscopeError when a site's module ran more often than the site
        allows (more than once without `call`), or fewer times than its `call` needs."""
        bad = [
            key
            for key, shapes in self._shapes.items()
            if (self._sites[key].call is None and len(shapes) > 1)
            or (self._sites[key].call is not None and 0 < len(shapes) <= self._sites[key].call)
        ]
        if not bad:
            return
        (label, path), site = bad[0], self._sites[bad[0]]
        shapes = self._shapes[bad[0]]
        others = len(bad) - 1
        more = f"; so did {others} other module{'s' if others > 1 else ''}" if others else ""
        ran = f"ran {len(shapes)} times in one forward pass (shapes {', '.join(shapes)}{more})"
        if site.call is None:
            raise RankscopeError(
                f"{label} reads {path}, which {ran}, and reading every call would mix different tensors "
                f"(queries and keys through one rotary module, say) into one measurement; hook a module that "
                f"runs once (e.g. the norm before a shared rotary, with a transform that applies the rotary) "
                f"or say which call to read with Site(..., call=i), 0-based (call=1: the second)"
            )
        raise RankscopeError(
            f"{label} reads call {site.call} (0-based) of {path}, but it {ran}; choose call={len(shapes) - 1} or less"
        )
