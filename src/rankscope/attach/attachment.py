"""What `detect` reports about one model (`Attachment`), and the path and head helpers that every
family's detector uses to build one.

A detector turns a model it recognises into an `Attachment`: the model's shape (layers, heads,
head size, rotary, QK-Norm), one `measure.sites.Site` per activation site it can read, the attention and
gain statistics it supports, and how to run the model on token ids. Every module pattern in it is
relative to the model given to `detect`, so a language model found inside a wrapper is hooked
through the wrapper's own module tree.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import RankscopeError
from ..measure.probe import AttentionStats
from ..measure.sites import Site, layer_of

if TYPE_CHECKING:
    from .rotary import RotaryContext

# What a site's `transform` is: (activation, layer index) -> activation, never in place.
Transform = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class KeyCache:
    """Where the keys a KV cache holds can be replaced, one kv head at a time (`headroom.kv_headroom`).

    store:  a module output holding every kv head's keys after QK-Norm and before RoPE (what a
            low-rank key cache stores), read with `read="output"`; its transform must return a view
            into that output, (B, T, kv heads, E), so that writing into the view of a clone
            replaces the keys the layer goes on with.
    scored: the same for the keys after RoPE, where a model exposes them as a module output of
            their own (rankscope's `k` tap, TransformerLens's `hook_rot_k`); None where it does not.
    rotate: the layer's RoPE as a function of stored keys, `rotate(keys, layer)` (B, T, heads, E),
            linear and orthogonal in the keys (a Hugging Face model's own rotary function); used to
            replace post-RoPE keys through `store` when there is no `scored`. None: not available.
    """

    store: Site
    scored: Site | None = None
    rotate: Transform | None = None


@dataclass(frozen=True)
class Attachment:
    """Where and how a probe attaches to one model: what `detect` found.

    `sites` maps each available site name to its `measure.sites.Site`; `attention` reads attention entropy
    and max logit from the post-RoPE q and k (None where they cannot be had exactly); `gains` maps
    row names (`q_gain`, `k_gain`) to the QK-Norm modules whose weights are gains; `forward` runs
    the model on a (B, T) batch of token ids; `root` is the language model found inside the model
    given to `detect` (the patterns are relative to the model given, so they include root's path);
    `contexts` are the rotary captures a measurement must attach alongside the sites; `key_cache`
    says where the cached keys can be replaced and `loss(x, y)` gives the model's mean next-token
    cross-entropy on inputs x and targets y (B, T), both for the KV headroom (None where not known).
    """

    family: str
    root: nn.Module = field(repr=False)
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    rotary: str  # "none", "full", "partial" (rotary_dims of head_dim), "unknown"
    qk_norm: bool
    sites: Mapping[str, Site] = field(repr=False)
    attention: AttentionStats | None = field(repr=False)
    gains: Mapping[str, str] = field(repr=False)
    forward: Callable[[torch.Tensor], Any] = field(repr=False)
    contexts: tuple[RotaryContext, ...] = field(default=(), repr=False)
    notes: tuple[str, ...] = ()
    rotary_dims: int | None = None  # dimensions of each head that RoPE turns, where known
    key_cache: KeyCache | None = field(default=None, repr=False)
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)

    def describe(self) -> str:
        """One line: family, layers, heads, head size, positions, QK-Norm."""
        kv = (
            f", {self.n_kv_head} key/value head{'s' if self.n_kv_head != 1 else ''} (GQA)"
            if self.n_kv_head != self.n_head
            else ""
        )
        pos = {"none": "no RoPE", "unknown": "positional scheme not recognised", "full": "RoPE"}.get(
            self.rotary, f"partial RoPE ({self.rotary_dims} of {self.head_dim} dims)"
        )
        norm = ", QK-Norm" if self.qk_norm else ""
        return (
            f"{self.family}: {self.n_layer} layer{'s' if self.n_layer != 1 else ''}, {self.n_head} query "
            f"head{'s' if self.n_head != 1 else ''}{kv} of {self.head_dim} dims, {pos}{norm}"
        )

    def config(self) -> dict[str, Any]:
        """The model facts rankscope's tables and reports read (config.json's `model` section)."""
        return {
            "family": self.family,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_kv_head": self.n_kv_head,
            "head_dim": self.head_dim,
            "rotary": self.rotary,
            "rotary_dims": self.rotary_dims,
            "qk_norm": self.qk_norm,
        }


def next_token_loss(logits: Callable[[torch.Tensor], torch.Tensor], vocab: int) -> Callable:
    """loss(x, y): the mean cross-entropy, in float32, of `logits(x)` (B, T, vocab) against targets
    y (B, T), run on a few sequences at a time so that no more than 2^26 logits are held at once."""

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rows = max(1, (1 << 26) // max(1, x.shape[1] * vocab))
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        for xs, ys in zip(x.split(rows), y.split(rows)):
            z = logits(xs)
            total += torch.nn.functional.cross_entropy(z.flatten(0, 1).float(), ys.flatten(), reduction="sum")
        return (total / y.numel()).float()

    return loss


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, T, heads*E) -> (B, T, heads, E)."""
    return x.unflatten(-1, (-1, head_dim))


def layer_pattern(paths: Sequence[str]) -> str:
    """The fnmatch pattern of one module path per layer, with the layer index as '*':
    ['model.layers.0.self_attn', 'model.layers.1.self_attn'] -> 'model.layers.*.self_attn'.

    The probe reads a row's layer as the first integer in a module path, so that integer must be
    the layer's index; a wrapper that puts another number first is refused rather than mislabelled.
    """
    split = [p.split(".") for p in paths]
    if len({len(s) for s in split}) != 1:
        raise RankscopeError(f"attention layers sit at unlike paths ({paths[0]}, {paths[-1]}); pass explicit sites")
    varying = [i for i in range(len(split[0])) if len({s[i] for s in split}) > 1]
    digits = [i for i in range(len(split[0])) if all(s[i].isdigit() for s in split)]
    slot = varying[0] if len(varying) == 1 else (digits[0] if len(paths) == 1 and digits else None)
    if slot is None or slot not in digits:
        raise RankscopeError(
            f"cannot tell the layer index in the attention paths ({paths[0]}, ...); pass explicit sites"
        )
    for p in paths:
        if layer_of(p) != int(p.split(".")[slot]):
            raise RankscopeError(
                f"the first number in the module path {p!r} is not its layer index; probe the inner model instead"
            )
    return ".".join("*" if i == slot else part for i, part in enumerate(split[0]))


def child_path(pattern: str, name: str) -> str:
    """The pattern of a submodule: child_path('model.layers.*.self_attn', 'k_proj')."""
    return f"{pattern}.{name}" if pattern else name


def chain(*steps: Transform | None) -> Transform:
    """One site transform that applies `steps` in order (None steps are skipped)."""
    kept = [s for s in steps if s is not None]

    def transform(x: torch.Tensor, layer: int) -> torch.Tensor:
        for s in kept:
            x = s(x, layer)
        return x

    return transform


def parameters_of(fn: Callable) -> Mapping[str, inspect.Parameter]:
    """The parameters of `fn`'s signature; none when it has no inspectable signature."""
    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
