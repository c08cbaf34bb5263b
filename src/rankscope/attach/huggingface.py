"""Detecting Hugging Face `transformers` decoders and reading their six sites.

Three kinds of attention layer are recognised, each by the modules it holds:

- "qkvo": separate `q_proj`, `k_proj`, `v_proj`, `o_proj` (Llama, Mistral, Mixtral, Qwen2, Qwen3
  and their kin), with grouped-query heads and the layer's own `q_norm`/`k_norm` where it has them;
- "gpt2": one fused `c_attn` holding [q | k | v], learned positions (no RoPE);
- "neox": one fused, head-interleaved `query_key_value` and a partial rotary (GPT-NeoX, Pythia).

A reader for each kind says where q_pre, k_pre, v and o are read and how to split them into heads;
the post-RoPE q and k are q_pre and k_pre turned by the model's own rotary function (`rotary.py`).
Attention statistics take each layer's own scale and sliding window.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..measure.probe import AttentionStats
from ..measure.sites import Site
from .attachment import (
    Attachment,
    KeyCache,
    Transform,
    chain,
    child_path,
    layer_pattern,
    next_token_loss,
    parameters_of,
    split_heads,
)
from .rotary import RotaryContext, inv_freq_rotary_dims, model_rotary

# Model types whose attention rankscope's tests check against the model's own internals.
HF_TESTED = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox")
# Families whose q_norm/k_norm weight multiplies the normalised vector directly (a gain); others
# (Gemma's 1 + w) would be misread, so their gain rows are left out.
_GAIN_FAMILIES = ("qwen3", "qwen3_moe", "olmo2", "olmo3")


@dataclass
class _Reader:
    """How to read one kind of attention layer: where q_pre, k_pre, v and o are (each a `Site`
    whose transform yields (B, T, heads, E)), the head counts, and the positional scheme."""

    n_head: int
    n_kv_head: int
    head_dim: int
    q_pre: Site
    k_pre: Site
    v: Site
    o: Site
    qk_norm: bool
    rotary: str  # as `Attachment.rotary`
    rotary_dims: int | None
    context: RotaryContext | None  # set exactly when q and k can be rotated as the model does
    k_store: Site  # the module output holding the keys after QK-Norm, before RoPE (`KeyCache.store`)
    notes: tuple[str, ...] = ()


def _kind(m: nn.Module) -> str | None:
    if all(isinstance(getattr(m, a, None), nn.Linear) for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return "qkvo"
    if hasattr(m, "c_attn") and hasattr(m, "c_proj") and not getattr(m, "is_cross_attention", False):
        return "gpt2"
    if isinstance(getattr(m, "query_key_value", None), nn.Linear) and isinstance(getattr(m, "dense", None), nn.Linear):
        return "neox"
    return None


def _rope(
    modules: Mapping[int, Any], head_dim: int, rotary_dims: Callable[[], int | None]
) -> tuple[str, int | None, RotaryContext | None, tuple[str, ...]]:
    """(rotary, rotary_dims, context, notes) of layers that rotate q and k with the model's own
    function; `rotary_dims()` says how many dimensions of a head turn (None: all)."""
    context = model_rotary(modules)
    if context is None:
        return (
            "unknown",
            None,
            None,
            (
                f"no rotary embedding found in {type(modules[0]).__name__}; q and k "
                f"(post-RoPE) and attention statistics are not available",
            ),
        )
    r = rotary_dims() or head_dim
    return ("full" if r == head_dim else "partial"), r, context, ()


def _config_heads(config: Any) -> int | None:
    return getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)


def _qkvo(root: nn.Module, config: Any, pattern: str, modules: Mapping[int, Any]) -> _Reader:
    attn0 = modules[0]
    E = (
        getattr(attn0, "head_dim", None)
        or getattr(config, "head_dim", None)
        or config.hidden_size // _config_heads(config)
    )
    H, G = attn0.q_proj.out_features // E, attn0.k_proj.out_features // E
    has_norm = all(isinstance(getattr(attn0, n, None), nn.Module) for n in ("q_norm", "k_norm"))

    def norm(which: str) -> Transform | None:
        """The layer's own q_norm/k_norm, applied as the layer applies it, before RoPE: over each
        head (Qwen3, Gemma 3) or over the whole projection (OLMo 2), told apart by its size."""
        if not has_norm:
            return None

        def apply(x: torch.Tensor, layer: int) -> torch.Tensor:  # x (B, T, heads, E)
            mod = getattr(modules[layer], f"{which}_norm")
            w = getattr(mod, "weight", None)
            if w is not None and w.shape[-1] != x.shape[-1]:
                return mod.forward(x.flatten(-2)).unflatten(-1, x.shape[-2:])
            return mod.forward(x)

        return apply

    def split(x: torch.Tensor, layer: int) -> torch.Tensor:
        return split_heads(x, E)

    def heads(x: torch.Tensor, layer: int) -> torch.Tensor:
        return x if x.ndim == 4 else split_heads(x, E)

    # the keys a cache stores: k_proj's output, or where the layer has QK-Norm, its k_norm's output:
    # per head (Qwen3: (B, T, G, E); Gemma 3: (B, G, T, E), told apart by `headroom`) or over the
    # whole projection (OLMo 2: (B, T, G*E))
    k_store = Site("k_store", child_path(pattern, "k_norm"), transform=heads) if has_norm else None
    rotary, r, context, notes = _rope(modules, E, lambda: inv_freq_rotary_dims(root))
    return _Reader(
        n_head=H,
        n_kv_head=G,
        head_dim=E,
        q_pre=Site("q_pre", child_path(pattern, "q_proj"), transform=chain(split, norm("q"))),
        k_pre=Site("k_pre", child_path(pattern, "k_proj"), transform=chain(split, norm("k"))),
        v=Site("v", child_path(pattern, "v_proj"), transform=split),
        o=Site("o", child_path(pattern, "o_proj"), read="input", transform=split),
        qk_norm=has_norm,
        rotary=rotary,
        rotary_dims=r,
        context=context,
        k_store=k_store or Site("k_store", child_path(pattern, "k_proj"), transform=split),
        notes=notes,
    )


def _gpt2(root: nn.Module, config: Any, pattern: str, modules: Mapping[int, Any]) -> _Reader:
    attn0 = modules[0]
    H = getattr(attn0, "num_heads", None) or _config_heads(config)
    E = attn0.head_dim
    D = H * E

    def third(i: int) -> Transform:
        return lambda x, layer: split_heads(x[..., i * D : (i + 1) * D], E)  # c_attn: [q | k | v]

    fused = child_path(pattern, "c_attn")
    return _Reader(
        n_head=H,
        n_kv_head=H,
        head_dim=E,
        q_pre=Site("q_pre", fused, transform=third(0)),
        k_pre=Site("k_pre", fused, transform=third(1)),
        v=Site("v", fused, transform=third(2)),
        o=Site("o", child_path(pattern, "c_proj"), read="input", transform=lambda x, layer: split_heads(x, E)),
        qk_norm=False,
        rotary="none",
        rotary_dims=None,
        context=None,
        k_store=Site("k_store", fused, transform=third(1)),
    )


def _neox(root: nn.Module, config: Any, pattern: str, modules: Mapping[int, Any]) -> _Reader:
    attn0 = modules[0]
    E = getattr(attn0, "head_size", None) or config.hidden_size // _config_heads(config)
    H = attn0.query_key_value.out_features // (3 * E)

    def part(i: int) -> Transform:
        # query_key_value interleaves per head: (B, T, H, [q | k | v] of E each)
        return lambda x, layer: x.unflatten(-1, (H, 3 * E))[..., i * E : (i + 1) * E]

    fused = child_path(pattern, "query_key_value")
    rotary, r, context, notes = _rope(modules, E, lambda: getattr(attn0, "rotary_ndims", None))
    return _Reader(
        n_head=H,
        n_kv_head=H,
        head_dim=E,
        q_pre=Site("q_pre", fused, transform=part(0)),
        k_pre=Site("k_pre", fused, transform=part(1)),
        v=Site("v", fused, transform=part(2)),
        o=Site("o", child_path(pattern, "dense"), read="input", transform=lambda x, layer: split_heads(x, E)),
        qk_norm=False,
        rotary=rotary,
        rotary_dims=r,
        context=context,
        k_store=Site("k_store", fused, transform=part(1)),
        notes=notes,
    )


_READERS = {"qkvo": _qkvo, "gpt2": _gpt2, "neox": _neox}


def _is_hf(root: nn.Module) -> bool:
    tf = sys.modules.get("transformers")  # never imported here: a model of it means it is loaded
    return tf is not None and isinstance(root, tf.PreTrainedModel)


def _forward(root: nn.Module) -> Callable[[torch.Tensor], Any]:
    params = parameters_of(root.forward)
    kwargs: dict[str, Any] = {}
    if "use_cache" in params:
        kwargs["use_cache"] = False  # no key/value cache to build and throw away
    if "logits_to_keep" in params:  # skip the (B, T, vocab) head: the probe reads attention only
        kwargs["logits_to_keep"] = 1
    elif "num_logits_to_keep" in params:
        kwargs["num_logits_to_keep"] = 1
    return lambda x: root(input_ids=x, **kwargs)


def _loss(root: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The model's next-token loss from its own logits (None for a model without a language-model head)."""
    try:
        head = root.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    if head is None:
        return None
    kwargs = {"use_cache": False} if "use_cache" in parameters_of(root.forward) else {}
    return next_token_loss(lambda x: root(input_ids=x, **kwargs).logits, int(root.config.vocab_size))


def _scale(attn: Any, head_dim: int, layer: int) -> float:
    s = getattr(attn, "scaling", None)
    if isinstance(s, (int, float)):
        return float(s)
    # GPT-2 before transformers kept no `scaling`: 1/sqrt(E), optionally / (layer + 1)
    scale = head_dim**-0.5 if getattr(attn, "scale_attn_weights", True) else 1.0
    if getattr(attn, "scale_attn_by_inverse_layer_idx", False):
        scale /= float(layer + 1)
    return scale


def _window(attn: Any, config: Any, model_type: str) -> int | None:
    if hasattr(attn, "sliding_window"):  # set per layer by families with mixed layer types
        w = attn.sliding_window
        return int(w) if w else None
    if model_type in ("mistral", "mixtral"):  # the window comes from the config, for every layer
        w = getattr(config, "sliding_window", None)
        return int(w) if w else None
    return None


def detect_hf(root: nn.Module, prefix: str) -> Attachment | None:
    """The attachment of `root` when it is a transformers model (at module path `prefix`) whose
    attention layers are all of one recognised layout, else None."""
    if not _is_hf(root):
        return None
    config: Any = root.config
    model_type = getattr(config, "model_type", type(root).__name__)
    found = [(p, m, k) for p, m in root.named_modules(prefix=prefix) if (k := _kind(m)) is not None]
    kinds = {k for _, _, k in found}
    if not found or len(kinds) != 1:
        return None
    kind = kinds.pop()
    modules: dict[int, Any] = {i: m for i, (_, m, _) in enumerate(found)}  # foreign modules: duck-typed
    pattern = layer_pattern([p for p, _, _ in found])
    reader = _READERS[kind](root, config, pattern, modules)
    notes = list(reader.notes)

    sites: dict[str, Site] = {"q_pre": reader.q_pre, "k_pre": reader.k_pre, "v": reader.v, "o": reader.o}
    if reader.rotary == "none":  # the scores are made of the pre-RoPE q and k
        sites["q"] = Site("q", reader.q_pre.pattern, transform=reader.q_pre.transform)
        sites["k"] = Site("k", reader.k_pre.pattern, transform=reader.k_pre.transform)
    elif reader.context is not None:
        sites["q"] = Site("q", reader.q_pre.pattern, transform=chain(reader.q_pre.transform, reader.context.rotate))
        sites["k"] = Site("k", reader.k_pre.pattern, transform=chain(reader.k_pre.transform, reader.context.rotate))

    attention = None
    if "q" in sites and getattr(config, "attn_logit_softcapping", None):
        notes.append("attention entropy and max logit skipped: the model soft-caps its attention logits")
    elif "q" in sites:
        scale = {i: _scale(m, reader.head_dim, i) for i, m in modules.items()}
        window = {i: _window(m, config, model_type) for i, m in modules.items()}
        attention = AttentionStats(
            sites["q"], sites["k"], scale=scale, window=window if any(w is not None for w in window.values()) else None
        )
    gains = {}
    if reader.qk_norm and model_type in _GAIN_FAMILIES and getattr(modules[0].q_norm, "weight", None) is not None:
        gains = {"q_gain": child_path(pattern, "q_norm"), "k_gain": child_path(pattern, "k_norm")}
    if model_type not in HF_TESTED:
        notes.append(
            f"model type {model_type!r} is read as a {kind} attention layout (tested families: {', '.join(HF_TESTED)})"
        )
    return Attachment(
        family=f"hf-{model_type}",
        root=root,
        n_layer=len(found),
        n_head=reader.n_head,
        n_kv_head=reader.n_kv_head,
        head_dim=reader.head_dim,
        rotary=reader.rotary,
        rotary_dims=reader.rotary_dims,
        qk_norm=reader.qk_norm,
        sites=sites,
        attention=attention,
        gains=gains,
        forward=_forward(root),
        contexts=(reader.context,) if reader.context is not None else (),
        notes=tuple(notes),
        key_cache=KeyCache(reader.k_store, rotate=reader.context.rotate if reader.context is not None else None),
        loss=_loss(root),
    )
