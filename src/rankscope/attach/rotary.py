"""Post-RoPE queries and keys of Hugging Face attention layers, rotated by the model's own code.

A Hugging Face attention layer never exposes its post-RoPE queries and keys as a module output,
so they are rebuilt exactly as the layer builds them: its projection output split into heads, its
own QK-Norm where it has one (see `huggingface.py`), then the modeling module's own
`apply_rotary_pos_emb` with the (cos, sin) the model passes that layer, captured by a forward
pre-hook. Using the model's own functions rather than a re-implementation is what keeps
interleaved, partial or scaled rotary variants right.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import RankscopeError
from .attachment import parameters_of


class RotaryContext:
    """The (cos, sin) each attention layer receives, captured while it runs, so that sites can
    rotate queries and keys with the model's own `apply_rotary_pos_emb`.

    A forward pre-hook (with kwargs) on each attention module stores the layer's
    `position_embeddings`; a forward hook drops them when the layer returns, so a projection
    called outside its layer's forward can never use stale tables. `attach` registers both and
    returns their handles; the caller removes them when the measurement ends.
    """

    def __init__(self, attention_modules: Mapping[int, nn.Module], apply_fn: Callable):
        self.modules = dict(attention_modules)
        self.apply_fn = apply_fn
        self.current: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def attach(self) -> list[Any]:
        handles = []
        for layer, mod in self.modules.items():
            handles.append(mod.register_forward_pre_hook(functools.partial(self._enter, layer), with_kwargs=True))
            handles.append(mod.register_forward_hook(functools.partial(self._leave, layer), always_call=True))
        return handles

    def _enter(self, layer: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        pe = kwargs.get("position_embeddings")
        if pe is None and args:
            try:  # passed positionally
                bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
                pe = bound.arguments.get("position_embeddings")
            except TypeError:
                pe = None
        if pe is not None:
            self.current[layer] = pe
        return None

    def _leave(self, layer: int, module: nn.Module, args: tuple, output: Any) -> None:
        self.current.pop(layer, None)

    def rotate(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Apply the layer's rotary embedding to x (B, T, heads, E); a partial rotary (GPT-NeoX's
        rotary_pct) turns only the first r = cos.shape[-1] dimensions and passes the rest."""
        if layer not in self.current:
            raise RankscopeError(
                f"layer {layer}'s attention was called without position_embeddings "
                f"(cos, sin); this transformers version is not supported for the q and k "
                f"sites (q_pre, k_pre, v and o still work)"
            )
        cos, sin = self.current[layer]
        r = cos.shape[-1]
        xt = x.transpose(1, 2)  # (B, heads, T, E): the layout apply_rotary_pos_emb expects
        turned, passed = xt[..., :r], xt[..., r:]
        turned = self.apply_fn(turned, turned, cos, sin)[1]
        return torch.cat([turned, passed], dim=-1).transpose(1, 2)  # (B, T, heads, E)


def model_rotary(attention_modules: Mapping[int, nn.Module]) -> RotaryContext | None:
    """A `RotaryContext` for these attention layers when their modeling module defines
    `apply_rotary_pos_emb` and their forward takes `position_embeddings`; None otherwise (a
    transformers version or a family whose rotary the probe cannot reproduce exactly)."""
    first = attention_modules[0]
    apply_fn = getattr(sys.modules.get(type(first).__module__), "apply_rotary_pos_emb", None)
    if apply_fn is None or "position_embeddings" not in parameters_of(first.forward):
        return None
    return RotaryContext(attention_modules, apply_fn)


def inv_freq_rotary_dims(root: nn.Module) -> int | None:
    """How many dimensions of each head the rotary embedding turns (None: not known), from the
    model's rotary module when it has one (its inv_freq has r/2 entries)."""
    for m in root.modules():
        inv = getattr(m, "inv_freq", None)
        if isinstance(inv, torch.Tensor) and inv.ndim == 1:
            return 2 * inv.numel()
    return None
