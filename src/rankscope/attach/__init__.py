"""Point rankscope's probes at any language model: find its attention sites by itself.

`Probe(model)` recognises

- rankscope's own GPT (its identity taps),
- Hugging Face `transformers` decoders: the Llama-style attention of Llama, Mistral, Mixtral,
  Qwen2, Qwen3 and their kin (separate q/k/v/o projections, grouped-query heads, QK-Norm),
  GPT-2 (one fused `c_attn`) and GPT-NeoX (one fused, head-interleaved `query_key_value`,
  partial rotary),
- TransformerLens `HookedTransformer` hook points (`blocks.{i}.attn.hook_q/k/v/z`, `hook_rot_q/k`),

and reads, for every layer and head, the six sites of rankscope's GPT:

    q_pre, k_pre   queries and keys after QK-Norm (where the model has it), before RoPE
    q, k           the same after RoPE: what the attention scores are made of
    v              values
    o              each head's attention output, before the output projection

A Hugging Face attention layer never exposes its post-RoPE keys as a module output, so they are
rebuilt exactly as the layer builds them: the layer's `k_proj` output split into heads, the
layer's own `k_norm` where it has one, then the modeling module's own `apply_rotary_pos_emb`
with the (cos, sin) the model passes to that layer (captured by a forward pre-hook). Using the
model's own functions rather than a re-implementation is what keeps interleaved, partial or
scaled rotary variants right. Anything else attaches through explicit `probe.Site`s.

Probes never change the model: hooks only read, run under `no_grad`, and are removed after each
measurement; the model is put in eval mode for the measurement (no dropout) and every module's
mode and the random number generators are restored afterwards, so a training loop that probes
is bitwise the loop that does not.
"""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from .errors import RankscopeError
from .probe import AttentionStats, GramProbe, Site, _layer_of

SITE_NAMES = ("q_pre", "q", "k_pre", "k", "v", "o")
COLUMNS = ("layer", "head", "site", "metric", "value")

__all__ = ["Attachment", "Probe", "SITE_NAMES", "Site", "AttentionStats", "detect", "token_batches"]


@dataclass(frozen=True)
class Attachment:
    """Where and how a probe attaches to one model: what `detect` found.

    `sites` maps each available site name to its `probe.Site`; `attention` reads attention entropy
    and max logit from the post-RoPE q and k (None where they cannot be had exactly); `gains` maps
    row names (`q_gain`, `k_gain`) to the QK-Norm modules whose weights are gains; `forward` runs
    the model on a (B, T) batch of token ids; `root` is the language model found inside the model
    given to `detect` (the patterns are relative to the model given, so they include root's path).
    """

    family: str
    root: nn.Module = field(repr=False)
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    rotary: str                      # "none", "full", "partial" (rotary_dims of head_dim), "unknown"
    qk_norm: bool
    sites: Mapping[str, Site] = field(repr=False)
    attention: AttentionStats | None = field(repr=False)
    gains: Mapping[str, str] = field(repr=False)
    forward: Callable[[torch.Tensor], Any] = field(repr=False)
    contexts: tuple["_RotaryContext", ...] = field(default=(), repr=False)
    notes: tuple[str, ...] = ()
    rotary_dims: int | None = None   # dimensions of each head that RoPE turns, where known

    def describe(self) -> str:
        """One line: family, layers, heads, head size, positions, QK-Norm."""
        kv = (f", {self.n_kv_head} key/value head{'s' if self.n_kv_head != 1 else ''} (GQA)"
              if self.n_kv_head != self.n_head else "")
        pos = {"none": "no RoPE", "unknown": "positional scheme not recognised", "full": "RoPE"}.get(
            self.rotary, f"partial RoPE ({self.rotary_dims} of {self.head_dim} dims)")
        norm = ", QK-Norm" if self.qk_norm else ""
        return (f"{self.family}: {self.n_layer} layer{'s' if self.n_layer != 1 else ''}, {self.n_head} query "
                f"head{'s' if self.n_head != 1 else ''}{kv} of {self.head_dim} dims, {pos}{norm}")

    def config(self) -> dict[str, Any]:
        """The model facts rankscope's tables and reports read (config.json's `model` section)."""
        return {"family": self.family, "n_layer": self.n_layer, "n_head": self.n_head,
                "n_kv_head": self.n_kv_head, "head_dim": self.head_dim, "rotary": self.rotary,
                "rotary_dims": self.rotary_dims, "qk_norm": self.qk_norm}


# --- helpers shared by the families ---------------------------------------------------------------

def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, T, heads*E) -> (B, T, heads, E)."""
    return x.unflatten(-1, (-1, head_dim))


def _layer_pattern(paths: Sequence[str]) -> str:
    """The fnmatch pattern of one module path per layer, with the layer index as '*':
    ['model.layers.0.self_attn', 'model.layers.1.self_attn'] -> 'model.layers.*.self_attn'.

    The probe reads a row's layer as the first integer in a module path, so that integer must be
    the layer's index; a wrapper that puts another number first is refused rather than mislabelled.
    """
    split = [p.split(".") for p in paths]
    if len({len(s) for s in split}) != 1:
        raise RankscopeError(f"attention layers sit at unlike paths ({paths[0]}, {paths[-1]}); "
                             f"pass explicit sites")
    varying = [i for i in range(len(split[0])) if len({s[i] for s in split}) > 1]
    digits = [i for i in range(len(split[0])) if all(s[i].isdigit() for s in split)]
    slot = varying[0] if len(varying) == 1 else (digits[0] if len(paths) == 1 and digits else None)
    if slot is None or slot not in digits:
        raise RankscopeError(f"cannot tell the layer index in the attention paths ({paths[0]}, ...); "
                             f"pass explicit sites")
    for i, p in enumerate(paths):
        if _layer_of(p) != int(p.split(".")[slot]):
            raise RankscopeError(f"the first number in the module path {p!r} is not its layer index; "
                                 f"probe the inner model instead")
    return ".".join("*" if i == slot else part for i, part in enumerate(split[0]))


def _child(pattern: str, name: str) -> str:
    return f"{pattern}.{name}" if pattern else name


def _signature_params(fn: Callable) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}


class _RotaryContext:
    """The (cos, sin) each attention layer receives, captured while it runs, so that sites can
    rotate queries and keys with the model's own `apply_rotary_pos_emb`.

    A forward pre-hook (with kwargs) on each attention module stores the layer's
    `position_embeddings`; a forward hook drops them when the layer returns, so a projection
    called outside its layer's forward can never use stale tables.
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
                pe = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments.get("position_embeddings")
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
            raise RankscopeError(f"layer {layer}'s attention was called without position_embeddings "
                                 f"(cos, sin); this transformers version is not supported for the q and k "
                                 f"sites (q_pre, k_pre, v and o still work)")
        cos, sin = self.current[layer]
        r = cos.shape[-1]
        xt = x.transpose(1, 2)  # (B, heads, T, E): the layout apply_rotary_pos_emb expects
        turned, passed = xt[..., :r], xt[..., r:]
        turned = self.apply_fn(turned, turned, cos, sin)[1]
        return torch.cat([turned, passed], dim=-1).transpose(1, 2)  # (B, T, heads, E)


def _compose(*steps: Callable[[torch.Tensor, int], torch.Tensor] | None) -> Callable[[torch.Tensor, int], torch.Tensor]:
    chain = [s for s in steps if s is not None]

    def transform(x: torch.Tensor, layer: int) -> torch.Tensor:
        for s in chain:
            x = s(x, layer)
        return x
    return transform


# --- rankscope's own GPT ----------------------------------------------------------------------------

def _detect_gpt(root: nn.Module, prefix: str) -> Attachment | None:
    from .model import GPT, Attention

    if not isinstance(root, GPT):
        return None
    paths = [p for p, m in root.named_modules(prefix=prefix) if isinstance(m, Attention)]
    attn: Any = root.blocks[0].attn
    pattern = _layer_pattern(paths)
    sites = {n: Site(n, _child(pattern, n)) for n in SITE_NAMES}
    gains = {}
    if attn.q_norm is not None and attn.q_norm.weight is not None:
        gains = {"q_gain": _child(pattern, "q_norm"), "k_gain": _child(pattern, "k_norm")}
    return Attachment(
        family="rankscope-gpt", root=root, n_layer=len(paths), n_head=attn.n_head, n_kv_head=attn.n_kv_head,
        head_dim=attn.head_dim, rotary="full", qk_norm=attn.q_norm is not None, sites=sites,
        attention=AttentionStats(sites["q"], sites["k"]), gains=gains, forward=root, rotary_dims=attn.head_dim,
    )


# --- TransformerLens HookedTransformer ----------------------------------------------------------------

def _detect_lens(root: Any, prefix: str) -> Attachment | None:
    cfg: Any = getattr(root, "cfg", None)
    if cfg is None or not hasattr(root, "blocks") or not hasattr(cfg, "positional_embedding_type"):
        return None
    if not all(hasattr(b, "attn") and hasattr(b.attn, "hook_k") for b in root.blocks):
        return None
    attn = _layer_pattern([_child(prefix, f"blocks.{i}.attn") for i in range(len(root.blocks))])
    L, H, E = cfg.n_layers, cfg.n_heads, cfg.d_head
    G = getattr(cfg, "n_key_value_heads", None) or H
    rotary = cfg.positional_embedding_type == "rotary"
    attn0 = root.blocks[0].attn
    q_norm = getattr(attn0, "q_norm", None)
    notes = []

    def normed(which: str) -> Callable[[torch.Tensor, int], torch.Tensor] | None:
        """QK-Norm after hook_q/hook_k, as TransformerLens applies it (before rotary): per head
        (`use_qk_norm`) or over the whole projection (the OLMo family)."""
        if q_norm is None:
            return None

        def apply(x: torch.Tensor, layer: int) -> torch.Tensor:
            norm = getattr(root.blocks[layer].attn, f"{which}_norm")
            if norm.w.shape[-1] == x.shape[-1]:
                return norm.forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)
            return norm.forward(x.flatten(-2)).unflatten(-1, x.shape[-2:])
        return apply

    sites = {
        "q_pre": Site("q_pre", _child(attn, "hook_q"), transform=normed("q")),
        "k_pre": Site("k_pre", _child(attn, "hook_k"), transform=normed("k")),
        "v": Site("v", _child(attn, "hook_v")),
        "o": Site("o", _child(attn, "hook_z")),
    }
    if rotary:
        sites["q"] = Site("q", _child(attn, "hook_rot_q"))
        sites["k"] = Site("k", _child(attn, "hook_rot_k"))
    else:
        sites["q"] = Site("q", sites["q_pre"].pattern, transform=sites["q_pre"].transform)
        sites["k"] = Site("k", sites["k_pre"].pattern, transform=sites["k_pre"].transform)
    if getattr(cfg, "clip_qkv", None) is not None:
        notes.append("q_pre and k_pre are read before the model's QKV clamp (clip_qkv)")

    attention = None
    if getattr(cfg, "attn_scores_soft_cap", -1.0) and cfg.attn_scores_soft_cap > 0:
        notes.append("attention entropy and max logit skipped: the model soft-caps its attention scores")
    elif getattr(cfg, "use_logn_attn", False):
        notes.append("attention entropy and max logit skipped: the model rescales queries by log n")
    else:
        window = {i: (cfg.window_size if getattr(b.attn, "attn_type", "global") == "local" else None)
                  for i, b in enumerate(root.blocks)}
        attention = AttentionStats(
            sites["q"], sites["k"], scale={i: 1.0 / float(b.attn.attn_scale) for i, b in enumerate(root.blocks)},
            causal=getattr(cfg, "attention_dir", "causal") == "causal",
            window=window if any(w is not None for w in window.values()) else None)
    gains = {"q_gain": _child(attn, "q_norm"), "k_gain": _child(attn, "k_norm")} if q_norm is not None else {}
    r = (getattr(cfg, "rotary_dim", None) or E) if rotary else None
    return Attachment(
        family="transformer-lens", root=root, n_layer=L, n_head=H, n_kv_head=G, head_dim=E,
        rotary="none" if r is None else "full" if r == E else "partial", rotary_dims=r,
        qk_norm=q_norm is not None, sites=sites, attention=attention, gains=gains,
        forward=lambda x: root(x, return_type=None), notes=tuple(notes),
    )


# --- Hugging Face transformers ----------------------------------------------------------------------

# Model types whose attention rankscope's tests check against the model's own internals.
HF_TESTED = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox")
# Families whose q_norm/k_norm weight multiplies the normalised vector directly (a gain); others
# (Gemma's 1 + w) would be misread, so their gain rows are left out.
_HF_GAIN_FAMILIES = ("qwen3", "qwen3_moe", "olmo2", "olmo3")


def _hf_kind(m: nn.Module) -> str | None:
    if all(isinstance(getattr(m, a, None), nn.Linear) for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return "qkvo"
    if hasattr(m, "c_attn") and hasattr(m, "c_proj") and not getattr(m, "is_cross_attention", False):
        return "gpt2"
    if isinstance(getattr(m, "query_key_value", None), nn.Linear) and isinstance(getattr(m, "dense", None), nn.Linear):
        return "neox"
    return None


def _is_hf(root: nn.Module) -> bool:
    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(root, tf.PreTrainedModel)


def _hf_forward(root: nn.Module) -> Callable[[torch.Tensor], Any]:
    params = _signature_params(root.forward)
    kwargs: dict[str, Any] = {}
    if "use_cache" in params:
        kwargs["use_cache"] = False  # no key/value cache to build and throw away
    if "logits_to_keep" in params:  # skip the (B, T, vocab) head: the probe reads attention only
        kwargs["logits_to_keep"] = 1
    elif "num_logits_to_keep" in params:
        kwargs["num_logits_to_keep"] = 1
    return lambda x: root(input_ids=x, **kwargs)


def _detect_hf(root: nn.Module, prefix: str) -> Attachment | None:
    if not _is_hf(root):
        return None
    config: Any = root.config
    model_type = getattr(config, "model_type", type(root).__name__)
    found = [(p, m, k) for p, m in root.named_modules(prefix=prefix) if (k := _hf_kind(m)) is not None]
    kinds = {k for _, _, k in found}
    if not found or len(kinds) != 1:
        return None
    kind = kinds.pop()
    paths = [p for p, _, _ in found]
    modules: dict[int, Any] = {i: m for i, (_, m, _) in enumerate(found)}  # foreign modules: duck-typed
    pattern = _layer_pattern(paths)
    attn0: Any = modules[0]
    notes: list[str] = []
    n_head_cfg = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)

    if kind == "qkvo":
        E = getattr(attn0, "head_dim", None) or getattr(config, "head_dim", None) or config.hidden_size // n_head_cfg
        H, G = attn0.q_proj.out_features // E, attn0.k_proj.out_features // E
        has_norm = isinstance(getattr(attn0, "q_norm", None), nn.Module) and isinstance(getattr(attn0, "k_norm", None), nn.Module)

        def norm(which: str) -> Callable[[torch.Tensor, int], torch.Tensor] | None:
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
            return _heads(x, E)

        proj = {"q": "q_proj", "k": "k_proj", "v": "v_proj"}
        pre = {w: (_child(pattern, proj[w]), _compose(split, norm(w))) for w in ("q", "k")}
        v_site = Site("v", _child(pattern, "v_proj"), transform=split)
        o_site = Site("o", _child(pattern, "o_proj"), read="input", transform=split)
        rot_module = sys.modules.get(type(attn0).__module__)
        apply_fn = getattr(rot_module, "apply_rotary_pos_emb", None)
        takes_pe = "position_embeddings" in _signature_params(attn0.forward)
        rotary, r, context = "unknown", None, None
        if apply_fn is not None and takes_pe:
            context = _RotaryContext(modules, apply_fn)
            r = _rotary_dims(root) or E
            rotary = "full" if r == E else "partial"
        else:
            notes.append(f"no rotary embedding found in {type(attn0).__name__}; q and k (post-RoPE) "
                         f"and attention statistics are not available")
    elif kind == "gpt2":
        H = getattr(attn0, "num_heads", None) or n_head_cfg
        E = attn0.head_dim
        G, D = H, H * E
        has_norm, context, rotary, r = False, None, "none", None

        def third(i: int) -> Callable[[torch.Tensor, int], torch.Tensor]:
            return lambda x, layer: _heads(x[..., i * D:(i + 1) * D], E)  # c_attn: [q | k | v]
        pre = {"q": (_child(pattern, "c_attn"), third(0)), "k": (_child(pattern, "c_attn"), third(1))}
        v_site = Site("v", _child(pattern, "c_attn"), transform=third(2))
        o_site = Site("o", _child(pattern, "c_proj"), read="input", transform=lambda x, layer: _heads(x, E))
    else:  # neox
        E = getattr(attn0, "head_size", None) or config.hidden_size // n_head_cfg
        H = attn0.query_key_value.out_features // (3 * E)
        G = H
        has_norm = False

        def part(i: int) -> Callable[[torch.Tensor, int], torch.Tensor]:
            # query_key_value interleaves per head: (B, T, H, [q | k | v] of E each)
            return lambda x, layer: x.unflatten(-1, (H, 3 * E))[..., i * E:(i + 1) * E]
        pre = {"q": (_child(pattern, "query_key_value"), part(0)), "k": (_child(pattern, "query_key_value"), part(1))}
        v_site = Site("v", _child(pattern, "query_key_value"), transform=part(2))
        o_site = Site("o", _child(pattern, "dense"), read="input", transform=lambda x, layer: _heads(x, E))
        rot_module = sys.modules.get(type(attn0).__module__)
        apply_fn = getattr(rot_module, "apply_rotary_pos_emb", None)
        context = _RotaryContext(modules, apply_fn) if apply_fn is not None and "position_embeddings" in _signature_params(attn0.forward) else None
        r = (getattr(attn0, "rotary_ndims", None) or E) if context is not None else None
        rotary = "unknown" if context is None else "full" if r == E else "partial"
        if context is None:
            notes.append("no rotary embedding found; q and k (post-RoPE) and attention statistics are not available")

    sites: dict[str, Site] = {
        "q_pre": Site("q_pre", pre["q"][0], transform=pre["q"][1]),
        "k_pre": Site("k_pre", pre["k"][0], transform=pre["k"][1]),
        "v": v_site, "o": o_site,
    }
    if rotary == "none":
        sites["q"] = Site("q", pre["q"][0], transform=pre["q"][1])
        sites["k"] = Site("k", pre["k"][0], transform=pre["k"][1])
    elif context is not None:
        rotate = lambda x, layer, c=context: c.rotate(x, layer)  # noqa: E731
        sites["q"] = Site("q", pre["q"][0], transform=_compose(pre["q"][1], rotate))
        sites["k"] = Site("k", pre["k"][0], transform=_compose(pre["k"][1], rotate))

    attention = None
    softcap = getattr(config, "attn_logit_softcapping", None)
    if "q" in sites and softcap:
        notes.append("attention entropy and max logit skipped: the model soft-caps its attention logits")
    elif "q" in sites:
        scale = {i: _hf_scale(m, E, i) for i, m in modules.items()}
        window = {i: _hf_window(m, config, model_type) for i, m in modules.items()}
        attention = AttentionStats(sites["q"], sites["k"], scale=scale,
                                   window=window if any(w is not None for w in window.values()) else None)
    gains = {}
    if has_norm and model_type in _HF_GAIN_FAMILIES and getattr(attn0.q_norm, "weight", None) is not None:
        gains = {"q_gain": _child(pattern, "q_norm"), "k_gain": _child(pattern, "k_norm")}
    if model_type not in HF_TESTED:
        notes.append(f"model type {model_type!r} is read as a {kind} attention layout "
                     f"(tested families: {', '.join(HF_TESTED)})")
    return Attachment(
        family=f"hf-{model_type}", root=root, n_layer=len(found), n_head=H, n_kv_head=G, head_dim=E,
        rotary=rotary, rotary_dims=r, qk_norm=has_norm, sites=sites, attention=attention, gains=gains,
        forward=_hf_forward(root), contexts=(context,) if context is not None else (), notes=tuple(notes),
    )


def _rotary_dims(root: nn.Module) -> int | None:
    """How many dimensions of each head the rotary embedding turns (None: all), from the model's
    rotary module when it has one (its inv_freq has r/2 entries)."""
    for m in root.modules():
        inv = getattr(m, "inv_freq", None)
        if isinstance(inv, torch.Tensor) and inv.ndim == 1:
            return 2 * inv.numel()
    return None


def _hf_scale(attn: Any, head_dim: int, layer: int) -> float:
    s = getattr(attn, "scaling", None)
    if isinstance(s, (int, float)):
        return float(s)
    # GPT-2 before transformers kept no `scaling`: 1/sqrt(E), optionally / (layer + 1)
    scale = head_dim ** -0.5 if getattr(attn, "scale_attn_weights", True) else 1.0
    if getattr(attn, "scale_attn_by_inverse_layer_idx", False):
        scale /= float(layer + 1)
    return scale


def _hf_window(attn: Any, config: Any, model_type: str) -> int | None:
    if hasattr(attn, "sliding_window"):  # set per layer by families with mixed layer types
        w = attn.sliding_window
        return int(w) if w else None
    if model_type in ("mistral", "mixtral"):  # the window comes from the config, for every layer
        w = getattr(config, "sliding_window", None)
        return int(w) if w else None
    return None


# --- finding the model inside whatever wraps it -------------------------------------------------

_DETECTORS = (_detect_gpt, _detect_hf, _detect_lens)


def detect(model: nn.Module) -> Attachment:
    """Find the language model in `model` (itself, or a submodule: inside DDP, torch.compile, a
    Lightning module, ...) and its attention sites. Raises RankscopeError when none is recognised."""
    for path, m in model.named_modules():  # outermost first: the language model, not one of its parts
        for d in _DETECTORS:
            found = d(m, path)
            if found is not None:
                return found
    raise RankscopeError(
        f"rankscope does not recognise the attention layers of {type(model).__name__} (it knows its own GPT, "
        f"Hugging Face Llama-style, GPT-2 and GPT-NeoX attention, and TransformerLens HookedTransformer); "
        f"pass explicit sites, e.g. Probe(model, sites=[Site('k', 'layers.*.attn.k_proj', 'BTC', head_dim=64)])")


# --- turning text into probe batches ----------------------------------------------------------------

def _encode(tokenizer: Any, text: str) -> list[int]:
    if hasattr(tokenizer, "encode") and type(tokenizer).__module__.startswith("tokenizers"):
        return tokenizer.encode(text).ids  # a `tokenizers.Tokenizer`
    if callable(tokenizer) and hasattr(tokenizer, "convert_tokens_to_ids"):  # a transformers tokenizer
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if hasattr(tokenizer, "to_tokens"):  # a HookedTransformer
        return tokenizer.to_tokens(text, prepend_bos=False)[0].tolist()
    if hasattr(tokenizer, "encode"):
        ids = tokenizer.encode(text)
        return list(getattr(ids, "ids", ids))
    raise RankscopeError(f"cannot tokenize with a {type(tokenizer).__name__}: give a transformers or "
                         f"tokenizers tokenizer, or token ids")


def _separator(tokenizer: Any) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None and hasattr(tokenizer, "token_to_id"):
        eos = tokenizer.token_to_id("<|endoftext|>")
    return [int(eos)] if eos is not None else []


def token_batches(text: str | Iterable[str], tokenizer: Any, seq_len: int = 256, batch_size: int = 8,
                  max_chars: int = 8_000_000) -> torch.Tensor:
    """One (batch_size, seq_len) batch of token ids from text, the way rankscope cuts its own probe
    batches: documents tokenized without special tokens and joined by the end-of-text token (when
    the tokenizer has one), then `batch_size` windows evenly spaced over the whole stream
    (`rankscope.data.fixed_batches`). At most `max_chars` characters are tokenized."""
    from .data import fixed_batches

    docs = [text] if isinstance(text, str) else list(text)
    sep, ids, chars = _separator(tokenizer), [], 0
    for doc in docs:
        if chars >= max_chars:
            break
        doc = doc[: max_chars - chars]
        chars += len(doc)
        ids += _encode(tokenizer, doc) + sep
    if len(ids) < seq_len + 1:
        raise RankscopeError(f"the probe text gives {len(ids)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                             f"give more text or a shorter seq_len")
    return fixed_batches([np.asarray(ids, dtype=np.int64)], 1, batch_size, seq_len)[0][0]


# --- the public probe ---------------------------------------------------------------------------

class Probe:
    """Per layer x head x site x metric geometry of a model's attention, as a pandas DataFrame.

    >>> probe = Probe(model)                         # keys after QK-Norm and RoPE, + attention stats
    >>> df = probe.measure(tokens)                   # tokens: (B, T) ids, or a list of such batches
    >>> df = probe.measure(text=docs, tokenizer=tok) # or text and the model's tokenizer
    >>> df.query("site == 'k' and metric == 'pr_sv'").groupby("layer").value.mean()

    sites: names among q_pre, q, k_pre, k, v, o (found in the model by `detect`) and/or explicit
        `probe.Site`s for models rankscope does not know.
    attention: True = per-head attention entropy and max logit wherever the post-RoPE q and k can be
        had exactly; False = none; or an explicit `probe.AttentionStats`.
    gains: QK-Norm gain statistics (per layer, head -1) where the model has learned gains.
    forward: how to run the model on a batch of token ids (found by `detect` when not given).

    Columns of the result: layer, head, site, metric, value (the metric names of
    `rankscope.metrics.METRICS`; site "attn" holds entropy and max_logit; site q_gain/k_gain holds
    gain_mean, gain_cv, gain_near_zero with head -1).
    """

    def __init__(self, model: nn.Module, sites: Iterable[str | Site] = ("k",), *,
                 attention: bool | AttentionStats = True, gains: bool = True,
                 forward: Callable[[torch.Tensor], Any] | None = None):
        self.model = model
        sites = [sites] if isinstance(sites, (str, Site)) else list(sites)
        names = [s for s in sites if isinstance(s, str)]
        explicit = [s for s in sites if isinstance(s, Site)]
        unknown = [n for n in names if n not in SITE_NAMES]
        if unknown:
            raise RankscopeError(f"unknown site {unknown[0]!r} (choose from {', '.join(SITE_NAMES)}, or pass a Site)")
        every = names + [s.name for s in explicit]
        if len(set(every)) != len(every):
            raise RankscopeError(f"site names must be unique, got {', '.join(every)}")

        # Every pattern is relative to `model` as given (detect() prefixes the path of the language
        # model inside it), so detected and explicit sites hook the same tree.
        self.attachment: Attachment | None = None
        try:
            self.attachment = detect(model)
        except RankscopeError:
            if names:
                raise
        att = self.attachment
        chosen: list[Site] = []
        for n in names:
            assert att is not None  # detect() raised above when names were asked of an unknown model
            if n not in att.sites:
                raise RankscopeError(f"site {n!r} is not available for {att.family}: " + "; ".join(att.notes))
            chosen.append(att.sites[n])
        chosen += explicit
        stats: AttentionStats | None
        if isinstance(attention, AttentionStats):
            stats = attention
        else:
            stats = att.attention if (attention and att is not None) else None
        self.notes = tuple(att.notes) if att is not None else ()
        self.forward = forward or (att.forward if att is not None else model)
        self._contexts = att.contexts if att is not None else ()
        try:
            self._probe = GramProbe(model, chosen, stats, dict(att.gains) if (gains and att is not None) else None)
        except ValueError as e:  # an explicit pattern that matches nothing
            raise RankscopeError(f"{e} in {type(model).__name__}") from None
        self._site_order = {s.name: i for i, s in enumerate(chosen)}

    # -- measuring --

    def measure(self, batches: torch.Tensor | Iterable[torch.Tensor] | None = None, *,
                text: str | Iterable[str] | None = None, tokenizer: Any = None,
                seq_len: int = 256, batch_size: int = 8) -> pd.DataFrame:
        """Run the model on token batches (or on `text` cut into one batch with `tokenizer`) with the
        hooks attached; return the tidy table. The model's outputs, parameters, modes and the random
        number generators are as they were before."""
        if text is not None:
            if batches is not None:
                raise RankscopeError("give either token batches or text (with a tokenizer) to measure on, not both")
            if tokenizer is None:
                raise RankscopeError("measuring on text needs the model's tokenizer (tokenizer=...)")
            given: list[torch.Tensor] = [token_batches(text, tokenizer, seq_len, batch_size)]
        elif batches is None:
            raise RankscopeError("give either token batches or text (with a tokenizer) to measure on")
        else:
            given = [batches] if isinstance(batches, torch.Tensor) else list(batches)
        device = _device_of(self.model)
        given = [b.to(device) if b.device != device else b for b in given]
        for b in given:
            if b.ndim != 2 or b.dtype not in (torch.int64, torch.int32):
                raise RankscopeError(f"token batches must be (batch, tokens) integer ids, got {tuple(b.shape)} {b.dtype}")
        return self._frame(self._measure(given))

    __call__ = measure

    def _measure(self, batches: list[torch.Tensor]) -> list[dict[str, Any]]:
        modes = {m: m.training for m in self.model.modules()}
        devices = [d for d in {p.device for p in self.model.parameters()} if d.type == "cuda"]
        handles = [h for c in self._contexts for h in c.attach()]
        try:
            # fork_rng: a model whose forward draws random numbers even in eval mode still leaves
            # the caller's generators where they were
            with torch.random.fork_rng(devices=devices):
                self.model.eval()  # no dropout while measuring; every module's own flag comes back below
                return self._probe.measure(batches, forward=self.forward)
        finally:
            for h in handles:
                h.remove()
            for m, was in modes.items():
                m.training = was

    def _frame(self, rows: list[dict[str, Any]]) -> pd.DataFrame:
        df = pd.DataFrame(rows, columns=list(COLUMNS))
        df = df.astype({"layer": "int64", "head": "int64", "site": str, "metric": str, "value": "float64"})
        return df

    # -- what was found --

    @property
    def sites(self) -> list[str]:
        return list(self._site_order)

    def describe(self) -> str:
        text = self.attachment.describe() if self.attachment is not None else f"{type(self.model).__name__} (explicit sites)"
        return text + "".join(f"\n  note: {n}" for n in self.notes)

    def __repr__(self) -> str:
        return f"Probe({self.describe().splitlines()[0]}; sites {', '.join(self.sites)})"


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")
