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
from typing import Any

from transformers import TrainerCallback

from ..errors import RankscopeError
from .logger import ProbeLogger
from .options import ProbeOptions


def _trainer_counts_tokens(args: Any) -> bool:
    """Whether the Trainer keeps `state.num_input_tokens_seen` (True, or "all"/"non_padding" in
    newer transformers)."""
    return args.include_num_input_tokens_seen not in (False, "no", None)


class TrainerProbeCallback(TrainerCallback):
    """Probe every `every_steps` optimizer steps or `every_tokens` training tokens.

    Tokens are the Trainer's own count (`TrainingArguments(include_num_input_tokens_seen=True)`)
    when it keeps one, else `global_step * tokens_per_step`; with neither, training stops at the
    start with a message saying so. `text` without a `tokenizer` uses the Trainer's
    `processing_class`. The other settings are `ProbeOptions` (as one `options` and/or keyword
    arguments); `seed` defaults to `args.seed`.
    """

    def __init__(
        self,
        out: str | Path,
        options: ProbeOptions | None = None,
        *,
        tokens_per_step: int | None = None,
        **settings: Any,
    ):
        self.out, self.tokens_per_step = out, tokens_per_step
        self.options = ProbeOptions.of(options, settings)
        self.logger: ProbeLogger | None = None

    def _tokens(self, args: Any, state: Any) -> int:
        if _trainer_counts_tokens(args):
            return int(state.num_input_tokens_seen)
        return int(state.global_step * self.tokens_per_step)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.tokens_per_step is None and not _trainer_counts_tokens(args):
            raise RankscopeError(
                "TrainerProbeCallback needs the token count: set TrainingArguments("
                "include_num_input_tokens_seen=True) or pass tokens_per_step="
            )
        opts = self.options
        tokenizer = opts.tokenizer
        if opts.text is not None and tokenizer is None:  # the Trainer's own
            tokenizer = kwargs.get("processing_class") or kwargs.get("tokenizer")
        train = {
            "max_steps": state.max_steps,
            "tokens": state.max_steps * self.tokens_per_step if self.tokens_per_step else None,
            "learning_rate": args.learning_rate,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "world_size": args.world_size,
        }
        self.logger = ProbeLogger(
            model,
            self.out,
            opts,
            tokenizer=tokenizer,
            seed=opts.seed if opts.seed is not None else args.seed,
            config={"train": train, "trainer": True, **dict(opts.config or {})},
            distributed=False,  # rank 0 alone probes the whole batch: no collective the other ranks would miss
        )
        self.logger.step(self._tokens(args, state), step=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.logger is not None:
            self.logger.step(self._tokens(args, state), step=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.logger is None or not logs:
            return
        self.logger.log_scalars(
            state.global_step,
            self._tokens(args, state),
            train_loss=logs.get("loss"),
            val_loss=logs.get("eval_loss"),
            grad_norm=logs.get("grad_norm"),
        )

    def on_train_end(self, args, state, control, **kwargs):
        if self.logger is not None:
            self.logger.close()
            self.logger = None


__all__ = ["TrainerProbeCallback"]
