"""A GPT whose keys have a known rank, for the KV-cache headroom tests (test_kv_headroom and
test_kv_headroom_models): layer 1's kv head 0 computes its keys through a rank-3 map; a batch for
it, and headroom rows keyed by (site, layer, head, metric)."""

from __future__ import annotations

from dataclasses import replace

import torch

from rankscope.core.model import GPT, ModelConfig

E = 16
CFG = ModelConfig(vocab_size=61, n_layer=2, d_model=32, n_head=4, n_kv_head=2, head_dim=E, d_mlp=64, max_seq_len=64)


def rank3_model(seed: int = 1) -> GPT:
    """Layer 1's kv head 0 has W_K of rank 3 (a random 3-dim column space): its keys before RoPE
    lie in a 3-dim subspace (QK-Norm rescales each key and multiplies by a diagonal gain, which
    maps that subspace onto another of the same dimension)."""
    model = GPT(replace(CFG, init_std=0.3)).eval()
    model.reset_parameters(seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = model.blocks[1].attn.k_proj.weight.view(CFG.n_kv_head, E, CFG.d_model)
        w[0] = torch.randn(E, 3, generator=g) @ torch.randn(3, CFG.d_model, generator=g) * 0.3
    return model


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 61, (2, 40), generator=g), torch.randint(0, 61, (2, 40), generator=g)


def table(rows):
    return {(r["site"], r["layer"], r["head"], r["metric"]): r["value"] for r in rows}
