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
from typing import Any

import torch

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package of older installs
    from pytorch_lightning import Callback  # type: ignore[assignment]

from ..errors import RankscopeError
from .logger import ProbeLogger
from .options import ProbeOptions


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
    `tokens_per_step` is given. The other settings are `ProbeOptions` (as one `options` and/or
    keyword arguments).
    """

    def __init__(
        self,
        out: str | Path,
        options: ProbeOptions | None = None,
        *,
        tokens_per_step: int | None = None,
        **settings: Any,
    ):
        super().__init__()
        self.out, self.tokens_per_step = out, tokens_per_step
        self.options = ProbeOptions.of(options, settings)
        self.logger: ProbeLogger | None = None
        self.tokens = 0
        self._step = 0

    def _tokens(self, trainer: Any) -> int:
        return trainer.global_step * self.tokens_per_step if self.tokens_per_step else self.tokens

    def on_train_start(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        # rank 0 alone probes the whole batch: no collective the other ranks would miss
        self.logger = ProbeLogger(pl_module, self.out, self.options, distributed=False)
        self._step = trainer.global_step
        self.logger.step(self._tokens(trainer), step=self._step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.logger is None:
            return
        if self.tokens_per_step is None:
            n = _count_tokens(batch)
            if n is None:
                raise RankscopeError(
                    "LightningProbeCallback cannot count the tokens of this batch type; pass tokens_per_step="
                )
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
