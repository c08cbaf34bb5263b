"""Probe a Hugging Face model: key participation ratio per layer and head, as a DataFrame.

The model is a Qwen3 (grouped-query attention, QK-Norm, RoPE) built from a config with random
weights, so this runs offline in seconds; with a real model, swap in
`AutoModelForCausalLM.from_pretrained(name)` and its tokenizer, nothing else changes.

    python examples/probe_hf_model.py
"""

import torch
from _common import stdlib_text, tiny_tokenizer
from transformers import Qwen3Config, Qwen3ForCausalLM

from rankscope.attach import Probe

tokenizer = tiny_tokenizer(stdlib_text(20))
torch.manual_seed(0)
model = Qwen3ForCausalLM(
    Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=256,
        max_position_embeddings=512,
    )
)

probe = Probe(model, sites=["k", "k_pre", "v"])  # keys after QK-Norm and RoPE, before RoPE, values
print(probe.describe())

# Held-out text, tokenized with the model's own tokenizer: 8 windows of 256 tokens.
table = probe.measure(text=stdlib_text(10, split="val"), tokenizer=tokenizer, seq_len=256, batch_size=8)
print(table.head())

keys = table.query("site == 'k' and metric == 'pr_sv'")
print("\nmean key PR per layer (of 32 dimensions):")
print(keys.groupby("layer")["value"].mean().round(2).to_string())
print("\nkey PR per layer x key/value head:")
print(keys.pivot(index="layer", columns="head", values="value").round(1).to_string())
print("\nattention entropy per layer (nats):")
print(table.query("metric == 'entropy'").groupby("layer")["value"].mean().round(3).to_string())

# Token ids work as well: a (batch, tokens) tensor, or a list of them.
ids = torch.randint(0, len(tokenizer), (4, 128))
random_keys = probe.measure(ids).query("site == 'k' and metric == 'pr_sv'")
print("\nrandom tokens, mean key PR:", round(random_keys["value"].mean(), 2))
