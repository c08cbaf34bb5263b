"""`TrainerProbeCallback`: rankscope's probe inside a Hugging Face `Trainer`.

    trainer = Trainer(model, args, train_dataset=ds,
                      callbacks=[TrainerProbeCallback("runs/mine", every_steps=100, batch=held_out_ids)])

It probes the initial model when training starts, then every N steps or tokens at the end of an
optimizer step, and closes the run (done.json) when training ends. The Trainer's logged losses
(`loss`, `eval_loss`, `grad_norm`) become rows of scalars.csv. Only the main process probes.
Models sharded across processes (FSDP, DeepSpeed ZeRO-3) cannot be probed from one process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from transformers import TrainerCallback

from ..attach import Site
from ..errors import RankscopeError
from .logger import ProbeLogger


class TrainerProbeCallback(TrainerCallback):
    """Probe every `every_steps` optimizer steps or `every_tokens` training tokens.

    Tokens are the Trainer's own count (`TrainingArguments(include_num_input_tokens_seen=True)`)
    when it keeps one, else `global_step * tokens_per_step`; with neither, training stops at the
    start with a message saying so. `text` without a `tokenizer` uses the Trainer's
    `processing_class`. The other arguments are `ProbeLogger`'s; `seed` defaults to `args.seed`.
    """

    def __init__(self, out: str | Path, *, every_steps: int | None = None, every_tokens: int | None = None,
                 tokens_per_step: int | None = None, batch: torch.Tensor | Sequence[torch.Tensor] | None = None,
                 text: str | Iterable[str] | None = None, tokenizer: Any = None, seq_len: int = 256,
                 batch_size: int = 8, sites: Iterable[str | Site] = ("k",), attention: bool = True,
                 arm: str = "run", seed: int | None = None, config: Mapping[str, Any] | None = None,
                 tensorboard: bool | str | Path | None = None, wandb: bool | Mapping[str, Any] | None = None,
                 overwrite: bool = False):
        if (every_tokens is None) == (every_steps is None):
            raise RankscopeError("give exactly one of every_tokens and every_steps")
        if (batch is None) == (text is None):
            raise RankscopeError("give the held-out probe batch: batch= (token ids) or text=")
        self.out, self.tokens_per_step = out, tokens_per_step
        self.options = dict(every_steps=every_steps, every_tokens=every_tokens, batch=batch, text=text,
                            tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size, sites=sites,
                            attention=attention, arm=arm, config=config, tensorboard=tensorboard,
                            wandb=wandb, overwrite=overwrite)
        self.seed = seed
        self.logger: ProbeLogger | None = None

    def _tokens(self, args: Any, state: Any) -> int:
        if args.include_num_input_tokens_seen not in (False, "no", None):
            return int(state.num_input_tokens_seen)
        return int(state.global_step * self.tokens_per_step)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.tokens_per_step is None and args.include_num_input_tokens_seen in (False, "no", None):
            raise RankscopeError("TrainerProbeCallback needs the token count: set TrainingArguments("
                                 "include_num_input_tokens_seen=True) or pass tokens_per_step=")
        options = dict(self.options)
        if options["text"] is not None and options["tokenizer"] is None:
            options["tokenizer"] = kwargs.get("processing_class") or kwargs.get("tokenizer")
        options["config"] = {"train": {"max_steps": state.max_steps,
                                       "tokens": state.max_steps * self.tokens_per_step if self.tokens_per_step else None,
                                       "learning_rate": args.learning_rate,
                                       "per_device_train_batch_size": args.per_device_train_batch_size,
                                       "gradient_accumulation_steps": args.gradient_accumulation_steps,
                                       "world_size": args.world_size},
                             "trainer": True, **dict(options["config"] or {})}
        self.logger = ProbeLogger(model, self.out, seed=self.seed if self.seed is not None else args.seed, **options)
        self.logger.step(self._tokens(args, state), step=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.logger is not None:
            self.logger.step(self._tokens(args, state), step=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.logger is None or not logs:
            return
        self.logger.log_scalars(state.global_step, self._tokens(args, state), train_loss=logs.get("loss"),
                                val_loss=logs.get("eval_loss"), grad_norm=logs.get("grad_norm"))

    def on_train_end(self, args, state, control, **kwargs):
        if self.logger is not None:
            self.logger.close()
            self.logger = None


__all__ = ["TrainerProbeCallback"]
