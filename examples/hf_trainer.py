"""rankscope's probe inside a Hugging Face Trainer: one callback.

Fine-tunes a small randomly initialised GPT-2 on the standard library for a few dozen steps,
probing every 10 optimizer steps. The Trainer counts tokens itself
(`include_num_input_tokens_seen=True`); its logged losses go to scalars.csv.

    python examples/hf_trainer.py [OUT [STEPS]]  # default: rankscope-examples/hf-trainer 40
    rankscope report rankscope-examples/hf-trainer
"""

import sys

import torch
from _common import stdlib_text, tiny_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from rankscope.attach import token_batches
from rankscope.integrations import TrainerProbeCallback

out = sys.argv[1] if len(sys.argv) > 1 else "rankscope-examples/hf-trainer"
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 40
tokenizer = tiny_tokenizer(stdlib_text(40))
ids = torch.tensor(tokenizer("\n".join(stdlib_text(40)))["input_ids"])
blocks = ids[: len(ids) // 128 * 128].view(-1, 128)
train = [{"input_ids": b, "labels": b} for b in blocks]
held_out = token_batches(stdlib_text(10, split="val"), tokenizer, seq_len=128, batch_size=8)

torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=128, n_layer=4, n_head=4, n_positions=128))
args = TrainingArguments(
    output_dir=f"{out}/trainer",
    max_steps=steps,
    per_device_train_batch_size=8,
    learning_rate=1e-3,
    logging_steps=10,
    report_to=[],
    save_strategy="no",
    include_num_input_tokens_seen=True,
    use_cpu=True,
    disable_tqdm=True,
)
callback = TrainerProbeCallback(out, every_steps=10, batch=held_out, arm="gpt2", sites=["k", "q", "v"], overwrite=True)
Trainer(model=model, args=args, train_dataset=train, callbacks=[callback]).train()
print(f"read the rows with: rankscope report {out}")
