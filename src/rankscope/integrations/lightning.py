"""`LightningProbeCallback`: rankscope's probe inside a Lightning `Trainer`.

    trainer = lightning.Trainer(callbacks=[LightningProbeCallback("runs/mine", every_steps=100, batch=ids)])

The language model is found inside the LightningModule (rankscope's GPT, a Hugging Face model, a
HookedTransformer), so the module's own `forward` may take anything. It probes when training
starts, then every N optimizer steps or tokens, and closes the run when training ends. Training
losses returned by `training_step` are averaged between probes into scalars.csv. Only global rank
0 probes. Imported only when used, so rankscope never needs Lightning installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package of older installs
    from pytorch_lightning import Callback  # type: ignore[assignment]

from ..attach import Site
from ..errors import RankscopeError
from .logger import ProbeLogger


def _count_tokens(batch: Any) -> int | None:
    """Token ids in one training batch: a (B, T) tensor, a dict with input_ids, or a tuple/list
    whose first item is one."""
    if isinstance(batch, torch.Tensor):
        return batch.numel() if batch.ndim == 2 else None
    if isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), torch.Tensor):
        return batch["input_ids"].numel()
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor) and batch[0].ndim == 2:
        return batch[0].numel()
    return None


class LightningProbeCallback(Callback):
    """Probe every `every_steps` optimizer steps or `every_tokens` training tokens.

    Tokens are counted from the training batches (their token ids x the number of processes) unless
    `tokens_per_step` is given. The other arguments are `ProbeLogger`'s.
    """

    def __init__(self, out: str | Path, *, every_steps: int | None = None, every_tokens: int | None = None,
                 tokens_per_step: int | None = None, batch: torch.Tensor | Sequence[torch.Tensor] | None = None,
                 text: str | Iterable[str] | None = None, tokenizer: Any = None, seq_len: int = 256,
                 batch_size: int = 8, sites: Iterable[str | Site] = ("k",), attention: bool = True,
                 arm: str = "run", seed: int = 0, config: Mapping[str, Any] | None = None,
                 tensorboard: bool | str | Path | None = None, wandb: bool | Mapping[str, Any] | None = None,
                 overwrite: bool = False):
        super().__init__()
        if (every_tokens is None) == (every_steps is None):
            raise RankscopeError("give exactly one of every_tokens and every_steps")
        if (batch is None) == (text is None):
            raise RankscopeError("give the held-out probe batch: batch= (token ids) or text= with tokenizer=")
        self.out, self.tokens_per_step = out, tokens_per_step
        self.options = dict(every_steps=every_steps, every_tokens=every_tokens, batch=batch, text=text,
                            tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size, sites=sites,
                            attention=attention, arm=arm, seed=seed, config=config, tensorboard=tensorboard,
                            wandb=wandb, overwrite=overwrite)
        self.logger: ProbeLogger | None = None
        self.tokens = 0
        self._step = 0

    def _tokens(self, trainer: Any) -> int:
        return trainer.global_step * self.tokens_per_step if self.tokens_per_step else self.tokens

    def on_train_start(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        self.logger = ProbeLogger(pl_module, self.out, **self.options)
        self._step = trainer.global_step
        self.logger.step(self._tokens(trainer), step=self._step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.logger is None:
            return
        if self.tokens_per_step is None:
            n = _count_tokens(batch)
            if n is None:
                raise RankscopeError("LightningProbeCallback cannot count the tokens of this batch type; "
                                     "pass tokens_per_step=")
            self.tokens += n * trainer.world_size
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            self.logger.add_loss(loss)
        if trainer.global_step != self._step:  # an optimizer step happened (not just a micro-batch)
            self._step = trainer.global_step
            self.logger.step(self._tokens(trainer), step=self._step)

    def on_train_end(self, trainer, pl_module):
        if self.logger is not None:
            self.logger.close()
            self.logger = None

    def on_exception(self, trainer, pl_module, exception):
        if self.logger is not None:  # an unfinished run, as a killed `rankscope run` leaves
            self.logger.abandon()
            self.logger = None


__all__ = ["LightningProbeCallback"]
