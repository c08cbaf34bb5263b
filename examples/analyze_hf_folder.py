"""`rankscope analyze` on a Hugging Face model folder.

Saves a randomly initialised Mistral and its tokenizer the way `save_pretrained` does (any local
folder from the Hub or from your own training looks the same), then analyzes it: the tidy table,
a layer x head key-PR heatmap and a summary.

    python examples/analyze_hf_folder.py [FOLDER]     # default: rankscope-examples/tiny-mistral
    rankscope analyze rankscope-examples/tiny-mistral # the same from the command line
"""

import sys

import torch
from _common import stdlib_text, tiny_tokenizer
from transformers import MistralConfig, MistralForCausalLM

from rankscope.analyze import analyze

folder = sys.argv[1] if len(sys.argv) > 1 else "rankscope-examples/tiny-mistral"
tokenizer = tiny_tokenizer(stdlib_text(20))
torch.manual_seed(0)
model = MistralForCausalLM(
    MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=256,
        max_position_embeddings=512,
    )
)
model.save_pretrained(folder)
tokenizer.save_pretrained(folder)

result = analyze(folder, batch_size=4, seq_len=128)  # default data: the embedded corpus's validation files
print(result.summary)
print(f"heatmap: {result.heatmap}")
