"""rankscope's probe inside a plain PyTorch training loop: two lines.

Trains a small Llama (random init, grouped-query attention) on this Python's standard library for
150 steps on the CPU (15-30 s on two cores), probing the keys every 10k tokens; the rows land in a
rankscope results folder that `rankscope report` reads, and in TensorBoard when it is installed.

    python examples/plain_loop.py [OUT [STEPS]]  # default: rankscope-examples/plain-loop 150
    rankscope report rankscope-examples/plain-loop
"""

import sys

import torch
from _common import stdlib_text, tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from rankscope.attach import token_batches
from rankscope.integrations import ProbeLogger

out = sys.argv[1] if len(sys.argv) > 1 else "rankscope-examples/plain-loop"
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 150
torch.manual_seed(0)
tokenizer = tiny_tokenizer(stdlib_text(40))
train_ids = torch.tensor(tokenizer("\n".join(stdlib_text(40)))["input_ids"])
held_out = token_batches(stdlib_text(10, split="val"), tokenizer, seq_len=64, batch_size=16)

model = LlamaForCausalLM(
    LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        max_position_embeddings=256,
    )
)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

logger = ProbeLogger(
    model,
    out,
    every_tokens=10_000,
    batch=held_out,
    arm="llama-adamw",
    seed=0,
    config={"train": {"tokens": steps * 8 * 64}},
    overwrite=True,
)  # (1)
logger.step(0)  # also measure the initial model
tokens = 0
for step in range(steps):
    starts = torch.randint(0, len(train_ids) - 65, (8,))
    x = torch.stack([train_ids[s : s + 65] for s in starts])
    loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    tokens += x[:, :-1].numel()
    logger.step(tokens, loss=loss)  # (2) probes when due; the loss is averaged between probes
    if (step + 1) % 25 == 0 or step + 1 == steps:
        print(f"step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
logger.close()  # probes the final model, writes done.json

print(f"rows in {logger.path}; read them with: rankscope report {out}")
