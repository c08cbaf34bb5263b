"""rankscope's probe inside Lightning: one callback (needs `pip install lightning`).

The LightningModule wraps rankscope's own GPT; the callback finds the GPT inside it, counts
tokens from the training batches and probes every 8k tokens.

    python examples/lightning_callback.py [OUT [STEPS]]  # default: rankscope-examples/lightning 60
"""

import sys

import lightning
import torch
from _common import stdlib_text, tiny_tokenizer

from rankscope.attach import token_batches
from rankscope.core.model import GPT, ModelConfig
from rankscope.integrations import LightningProbeCallback

out = sys.argv[1] if len(sys.argv) > 1 else "rankscope-examples/lightning"
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 60
tokenizer = tiny_tokenizer(stdlib_text(40))
ids = torch.tensor(tokenizer("\n".join(stdlib_text(40)))["input_ids"])
windows = ids[: len(ids) // 65 * 65].view(-1, 65)  # (N, 65): inputs are the first 64, targets the last 64
held_out = token_batches(stdlib_text(10, split="val"), tokenizer, seq_len=64, batch_size=16)


class LM(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.gpt = GPT(
            ModelConfig(
                vocab_size=len(tokenizer),
                n_layer=2,
                d_model=128,
                n_head=2,
                n_kv_head=1,
                head_dim=64,
                d_mlp=512,
                max_seq_len=64,
            )
        )

    def training_step(self, batch, batch_idx):
        (window,) = batch
        return self.gpt(window[:, :-1], window[:, 1:])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(windows), batch_size=8, shuffle=True)
callback = LightningProbeCallback(
    out, every_tokens=8_192, tokens_per_step=8 * 64, batch=held_out, arm="gpt-adamw", overwrite=True
)
lightning.Trainer(
    max_steps=steps,
    callbacks=[callback],
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    accelerator="cpu",
    devices=1,
).fit(LM(), loader)
print(f"read the rows with: rankscope report {out}")
