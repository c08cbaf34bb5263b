"""`ProbeLogger`: probe a model inside someone else's training loop and keep rankscope's tables.

Two lines in a plain PyTorch loop::

    logger = ProbeLogger(model, "runs/mine", every_tokens=1_000_000, batch=held_out_ids)
    ...
        logger.step(tokens_seen, loss=loss)       # after each optimizer step
    logger.close()

Every `every_tokens` tokens (or `every_steps` steps) the probe measures the fixed batch and the
rows are appended to a rankscope results folder, `<out>/<arm>/seed-<k>/`, with the same files a
`rankscope run` writes (config.json, provenance.json, scalars.csv, probes.csv, and done.json on
close), so `rankscope report <out>` compares arms and seeds written this way. A summary (mean key
PR per layer and overall, attention entropy) goes to TensorBoard and Weights & Biases when they
are there: a handful of scalars per probe instead of layers x heads x sites x metrics.

In a data-parallel or fully sharded run (DDP, FSDP2) make a logger on every rank, each with its own
share of the held-out batch, and call it on every rank at the same steps: each probe sums over all
the ranks' tokens (`Probe(distributed=...)`, `ProbeOptions.distributed`) and the train loss is the
mean over the ranks, as `rankscope run` averages it; global rank 0 alone writes the folder and the
TensorBoard / W&B summaries, and every rank gets the same table back.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..attach import Probe, device_of, reduction, token_batches
from ..errors import RankscopeError
from ..run.cadence import next_multiple
from ..run.sinks import TensorBoardSink, WandbSink, installed, summarize
from ..storage.provenance import environment, now
from ..storage.store import RunStore, is_done, run_dir, write_start
from .options import ProbeOptions


class ProbeLogger:
    """Probe `model` on a fixed batch every N tokens or steps and keep the rows.

    model: any model `rankscope.attach.Probe` understands (or give `probe=` for explicit sites).
    out: the results folder; rows go to `<out>/<arm>/seed-<seed>/`.
    options, **settings: a `ProbeOptions`, and/or its fields as keyword arguments (every_tokens or
        every_steps, batch or text and tokenizer, sites, attention, arm, seed, config, tensorboard,
        wandb, overwrite, distributed; see `ProbeOptions`). seed None means 0.

    Under torch.distributed only global rank 0 writes (`writes`): the folder, its files and the
    TensorBoard / W&B sinks. When the probe reduces over the ranks (the default with more than one
    process), every rank must make the logger and call `step`, `measure` and `close` at the same
    points, each with its own share of the probe batch; every rank gets the same table back.
    """

    def __init__(
        self,
        model: nn.Module,
        out: str | Path,
        options: ProbeOptions | None = None,
        *,
        probe: Probe | None = None,
        **settings: Any,
    ):
        opts = ProbeOptions.of(options, settings)
        self.options = opts
        self.model = model
        self.probe = probe or Probe(model, opts.sites, attention=opts.attention, distributed=opts.distributed)
        if opts.text is not None:
            if opts.tokenizer is None:
                raise RankscopeError("text= needs the model's tokenizer (tokenizer=...)")
            batch = token_batches(opts.text, opts.tokenizer, opts.seq_len, opts.batch_size)
        else:
            batch = opts.batch
        self.batches = [batch] if isinstance(batch, torch.Tensor) else list(batch)
        self.arm, self.seed = str(opts.arm), int(opts.seed or 0)
        self.path = run_dir(out, self.arm, self.seed)
        self.writes, self.world_size = _place()
        refused = self.writes and is_done(self.path) and not opts.overwrite
        if self._agree(refused):  # every rank raises together, rather than the others waiting at a probe
            raise RankscopeError(f"{self.path} holds a finished run; choose another arm or seed, or overwrite=True")
        self.store: RunStore | None = None
        if self.writes:
            if is_done(self.path):
                shutil.rmtree(self.path)
            self.store = RunStore(self.path)
            self._write_config(opts.config or {})

        self._t0 = time.perf_counter()
        self.probe_s = 0.0
        self._next = 0  # the next token (or step) count due for a probe
        self._calls = 0  # step() calls that counted as optimizer steps
        self._loss_sum: torch.Tensor | float = 0.0
        self._loss_n = 0
        self._val_loss: float | None = None
        self.last_step = 0
        self.last_tokens = 0
        self.n_probes = 0
        self._probed_at: tuple[int, int] | None = None
        self.closed = False
        self.sinks: list[Any] = []
        if self.writes:
            self._open_sinks(opts.tensorboard, opts.wandb)

    # -- setup --

    def _agree(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank of the probe's group (one small
        all-reduce, only where the probe reduces over ranks); `flag` itself otherwise."""
        reduce, group = reduction(self.probe.distributed)
        if not reduce:
            return flag
        import torch.distributed as tdist

        t = torch.tensor([1.0 if flag else 0.0], device=device_of(self.model))
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=group)
        return bool(t.item())

    def _write_config(self, user: Mapping[str, Any]) -> None:
        att = self.probe.attachment
        model = {**(att.config() if att is not None else {}), **dict(user.get("model") or {})}
        shapes = [list(b.shape) for b in self.batches]
        write_start(
            self.path,
            {
                **dict(user),
                "arm": self.arm,
                "seed": self.seed,
                "model": model,
                "probe": {
                    "sites": self.probe.sites,
                    "every_tokens": self.options.every_tokens,
                    "every_steps": self.options.every_steps,
                    "batches": shapes,
                    "notes": list(self.probe.notes),
                },
                "source": "rankscope.integrations.ProbeLogger",
            },
            {
                **environment(device_of(self.model)),
                "arm": self.arm,
                "seed": self.seed,
                "started": now(),
                "world_size": self.world_size,
            },
        )

    def _open_sinks(self, tensorboard: bool | str | Path | None, wandb: bool | Mapping[str, Any] | None) -> None:
        if tensorboard is not False and (tensorboard is not None or installed("tensorboard")):
            logdir = Path(tensorboard) if isinstance(tensorboard, (str, Path)) else self.path / "tensorboard"
            try:
                self.sinks.append(TensorBoardSink(logdir))
            except ImportError:
                raise RankscopeError(
                    "tensorboard=True needs the tensorboard package: pip install tensorboard"
                ) from None
        if wandb is False:
            return
        if wandb is None:
            mod = sys.modules.get("wandb")  # only into a run that someone already started
            if mod is not None and getattr(mod, "run", None) is not None:
                self.sinks.append(WandbSink({}, self.path))
            return
        if not installed("wandb"):
            raise RankscopeError("wandb=True needs the wandb package: pip install wandb")
        self.sinks.append(WandbSink(wandb if isinstance(wandb, Mapping) else {}, self.path))

    # -- in the loop --

    def step(
        self,
        tokens: int,
        *,
        step: int | None = None,
        loss: float | torch.Tensor | None = None,
        val_loss: float | None = None,
    ) -> pd.DataFrame | None:
        """Call after each optimizer step with the training tokens seen so far (and, if you like,
        this step's loss: losses are averaged between probes, and a tensor is read only then, so
        passing one costs no device sync). Call once with tokens=0 before the loop to also measure
        the initial model. Returns the probe table when this call probed, else None.

        step: the optimizer step count; by default the logger counts its calls (a call with
        tokens=0 is step 0).
        """
        if self.closed:
            raise RankscopeError("this ProbeLogger is closed")
        if step is None:
            if tokens > 0:
                self._calls += 1
            step = self._calls
        else:
            self._calls = step
        if loss is not None:
            self.add_loss(loss)
        if val_loss is not None:
            self._val_loss = float(val_loss)
        self.last_step, self.last_tokens = step, tokens
        # the first call at or after each multiple of the cadence probes, as a run's schedule does
        count = tokens if self.options.by_tokens else step
        if count < self._next:
            return None
        self._next = next_multiple(count, self.options.every)
        return self.measure(tokens, step)

    def add_loss(self, loss: float | torch.Tensor) -> None:
        """Count one training loss towards the mean written at the next probe (for callers that
        see several losses per optimizer step, such as micro-batches)."""
        self._loss_sum = self._loss_sum + (loss.detach().float() if isinstance(loss, torch.Tensor) else float(loss))
        self._loss_n += 1

    def measure(self, tokens: int, step: int) -> pd.DataFrame:
        """Probe now, whatever the cadence; append the rows and a scalars row; log the summary.
        Where the probe reduces over ranks, the train loss written is the mean of every rank's
        losses since the last probe; val_loss is rank 0's."""
        t = time.perf_counter()
        table = self.probe.measure(self.batches)
        self.probe_s += time.perf_counter() - t
        loss_total, loss_n = self._losses()
        self._loss_sum, self._loss_n = 0.0, 0
        val_loss, self._val_loss = self._val_loss, None
        self.n_probes += 1
        self._probed_at = (step, tokens)
        if self.store is None:  # not rank 0: it measured its share and took part in the sums
            return table
        base = {"arm": self.arm, "seed": self.seed, "step": step, "tokens": tokens}
        self.store.probes.append({**base, **r} for r in table.to_dict("records"))
        row = dict(base, elapsed_s=time.perf_counter() - self._t0, probe_s=self.probe_s)
        if loss_n:
            row["train_loss"] = loss_total / loss_n
        if val_loss is not None:
            row["val_loss"] = val_loss
        self.store.scalars.append([row])
        summary = summarize(table)
        for sink in self.sinks:
            sink.log(summary, step, tokens)
        return table

    def _losses(self) -> tuple[float, float]:
        """(sum, count) of the losses since the last probe: this rank's, or every rank's where the
        probe reduces over ranks (one small all-reduce, which every rank makes at every probe)."""
        total, n = self._loss_sum, self._loss_n
        reduce, group = reduction(self.probe.distributed)
        if not reduce:
            return (total.item() if isinstance(total, torch.Tensor) else total), n
        import torch.distributed as tdist

        device = device_of(self.model)  # where the probe's own collectives run (CUDA under NCCL)
        t = torch.stack(
            [
                torch.as_tensor(total, dtype=torch.float64, device=device),
                torch.tensor(float(n), dtype=torch.float64, device=device),
            ]
        )
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM, group=group)
        total, n = t.tolist()
        return total, n

    def log_scalars(self, step: int, tokens: int, **values: float | None) -> None:
        """Append one scalars row (train_loss, val_loss, grad_norm, ... of `store.SCALAR_COLUMNS`)
        now, for callers that learn their losses elsewhere than at probe points (a Trainer's logs)."""
        row = {k: v for k, v in values.items() if v is not None}
        if row and self.store is not None:  # rank 0's values; the other ranks write nothing
            self.store.scalars.append(
                [
                    dict(
                        arm=self.arm,
                        seed=self.seed,
                        step=step,
                        tokens=tokens,
                        elapsed_s=time.perf_counter() - self._t0,
                        **row,
                    )
                ]
            )

    # -- the end --

    def close(self, status: str = "done", probe_last: bool = True) -> None:
        """Probe the final model (unless the last probe was at this very step: the end of training
        is the point a study compares), write done.json (the run is finished for `rankscope
        report`) and close every sink."""
        if self.closed:
            return
        if probe_last and self.n_probes and self._probed_at != (self.last_step, self.last_tokens):
            self.measure(self.last_tokens, self.last_step)
        self.closed = True
        try:
            if self.store is None:
                return
            self.store.finish(
                {
                    "status": status,
                    "arm": self.arm,
                    "seed": self.seed,
                    "step": self.last_step,
                    "tokens": self.last_tokens,
                    "probes": self.n_probes,
                    "elapsed_s": time.perf_counter() - self._t0,
                    "probe_s": self.probe_s,
                }
            )
        finally:
            for sink in self.sinks:
                sink.close()

    def abandon(self) -> None:
        """Close the files and sinks without marking the run finished (it stays 'unfinished')."""
        if self.closed:
            return
        self.closed = True
        if self.store is not None:
            self.store.close()
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> ProbeLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # a loop that failed leaves an unfinished run, as a killed `rankscope run` does
        if exc_type is None:
            self.close()
        else:
            self.abandon()


def _place() -> tuple[bool, int]:
    """(writes, world size): whether this process writes (global rank 0, or no process group) and
    how many processes the run has."""
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()):
        return True, 1
    return tdist.get_rank() == 0, tdist.get_world_size()


__all__ = ["ProbeLogger", "summarize"]
