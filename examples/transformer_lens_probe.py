"""Probe a TransformerLens HookedTransformer (needs `pip install 'transformer_lens<4'`).

The probe reads the hook points TransformerLens already has: hook_rot_k / hook_rot_q (keys and
queries after RoPE), hook_k / hook_q, hook_v and hook_z.

    python examples/transformer_lens_probe.py
"""

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from rankscope.attach import Probe

cfg = HookedTransformerConfig(
    n_layers=3,
    d_model=128,
    n_ctx=128,
    d_head=32,
    n_heads=4,
    n_key_value_heads=2,
    d_vocab=1000,
    act_fn="gelu",
    normalization_type="RMS",
    positional_embedding_type="rotary",
    seed=0,
)
model = HookedTransformer(cfg)
probe = Probe(model, sites=["q", "k", "v", "o"])
print(probe.describe())
table = probe.measure(torch.randint(0, 1000, (4, 128)))
print(table.query("metric == 'pr_sv'").groupby(["site", "layer"])["value"].mean().unstack().round(2))
