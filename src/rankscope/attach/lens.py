"""Detecting a TransformerLens `HookedTransformer`: its hook points already expose every site.

`hook_q`, `hook_k` (then the model's own QK-Norm, which TransformerLens applies after these hooks
and before rotary), `hook_rot_q`, `hook_rot_k` when the model is rotary, `hook_v` and `hook_z`;
attention statistics with each layer's `attn_scale` and local-attention window.
"""

from __future__ import annotations

from typing import Any

import torch

from ..measure.probe import AttentionStats
from ..measure.sites import Site
from .attachment import Attachment, KeyCache, Transform, child_path, layer_pattern, next_token_loss


def detect_lens(root: Any, prefix: str) -> Attachment | None:
    """The attachment of `root` when it is a HookedTransformer (at module path `prefix`), else None."""
    cfg: Any = getattr(root, "cfg", None)
    if cfg is None or not hasattr(root, "blocks") or not hasattr(cfg, "positional_embedding_type"):
        return None
    if not all(hasattr(b, "attn") and hasattr(b.attn, "hook_k") for b in root.blocks):
        return None
    attn = layer_pattern([child_path(prefix, f"blocks.{i}.attn") for i in range(len(root.blocks))])
    L, H, E = cfg.n_layers, cfg.n_heads, cfg.d_head
    G = getattr(cfg, "n_key_value_heads", None) or H
    rotary = cfg.positional_embedding_type == "rotary"
    q_norm = getattr(root.blocks[0].attn, "q_norm", None)
    notes = []

    def normed(which: str) -> Transform | None:
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
        "q_pre": Site("q_pre", child_path(attn, "hook_q"), transform=normed("q")),
        "k_pre": Site("k_pre", child_path(attn, "hook_k"), transform=normed("k")),
        "v": Site("v", child_path(attn, "hook_v")),
        "o": Site("o", child_path(attn, "hook_z")),
    }
    if rotary:
        sites["q"] = Site("q", child_path(attn, "hook_rot_q"))
        sites["k"] = Site("k", child_path(attn, "hook_rot_k"))
    else:  # without rotary the scores are made of the pre-RoPE q and k
        sites["q"] = Site("q", sites["q_pre"].pattern, transform=sites["q_pre"].transform)
        sites["k"] = Site("k", sites["k_pre"].pattern, transform=sites["k_pre"].transform)
    if getattr(cfg, "clip_qkv", None) is not None:
        notes.append("q_pre and k_pre are read before the model's QKV clamp (clip_qkv)")

    causal = getattr(cfg, "attention_dir", "causal") == "causal"
    attention = None
    if getattr(cfg, "attn_scores_soft_cap", -1.0) and cfg.attn_scores_soft_cap > 0:
        notes.append("attention entropy and max logit skipped: the model soft-caps its attention scores")
    elif getattr(cfg, "use_logn_attn", False):
        notes.append("attention entropy and max logit skipped: the model rescales queries by log n")
    else:
        window = {
            i: (cfg.window_size if getattr(b.attn, "attn_type", "global") == "local" else None)
            for i, b in enumerate(root.blocks)
        }
        attention = AttentionStats(
            sites["q"],
            sites["k"],
            scale={i: 1.0 / float(b.attn.attn_scale) for i, b in enumerate(root.blocks)},
            causal=causal,
            window=window if any(w is not None for w in window.values()) else None,
        )
    gains = {"q_gain": child_path(attn, "q_norm"), "k_gain": child_path(attn, "k_norm")} if q_norm is not None else {}
    r = (getattr(cfg, "rotary_dim", None) or E) if rotary else None
    # hook_k holds the cached keys only where no QK-Norm follows it; the scored keys are hook_rot_k's
    key_cache = KeyCache(sites["k_pre"], scored=sites["k"] if rotary else None) if q_norm is None else None
    return Attachment(
        family="transformer-lens",
        root=root,
        n_layer=L,
        n_head=H,
        n_kv_head=G,
        head_dim=E,
        rotary="none" if r is None else "full" if r == E else "partial",
        rotary_dims=r,
        qk_norm=q_norm is not None,
        sites=sites,
        attention=attention,
        gains=gains,
        forward=lambda x: root(x, return_type=None),
        notes=tuple(notes),
        key_cache=key_cache,
        loss=next_token_loss(lambda x: root(x, return_type="logits"), int(cfg.d_vocab)) if causal else None,
    )
