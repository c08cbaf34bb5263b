"""Detecting rankscope's own GPT: its attention modules carry an identity tap for every site
(`blocks.<i>.attn.{q_pre,q,k_pre,k,v,o}`), so nothing needs rebuilding."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..measure.probe import AttentionStats, gpt_gains
from ..measure.sites import Site
from ..settings.vocab import PROBE_SITES
from .attachment import Attachment, KeyCache, child_path, layer_pattern


def detect_gpt(root: nn.Module, prefix: str) -> Attachment | None:
    """The attachment of `root` when it is rankscope's GPT (at module path `prefix`), else None."""
    from ..core.model import GPT, Attention

    if not isinstance(root, GPT):
        return None
    paths = [p for p, m in root.named_modules(prefix=prefix) if isinstance(m, Attention)]
    attn: Any = root.blocks[0].attn
    pattern = layer_pattern(paths)
    sites = {n: Site(n, child_path(pattern, n)) for n in PROBE_SITES}
    return Attachment(
        family="rankscope-gpt",
        root=root,
        n_layer=len(paths),
        n_head=attn.n_head,
        n_kv_head=attn.n_kv_head,
        head_dim=attn.head_dim,
        rotary="full",
        qk_norm=attn.q_norm is not None,
        sites=sites,
        attention=AttentionStats(sites["q"], sites["k"]),
        gains=gpt_gains(root, pattern),
        forward=root,
        rotary_dims=attn.head_dim,
        key_cache=KeyCache(store=sites["k_pre"], scored=sites["k"]),
        loss=lambda x, y: root(x, y).float(),
    )
