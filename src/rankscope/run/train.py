"""One training run: train(cfg, out_dir) -> summary, a short loop over named parts.

For a given seed every arm starts from the same initial weights (per-parameter seeding, see
`GPT.reset_parameters`) and sees the same batches in the same order (`BatchSampler` is a pure
function of (seed, step)); validation and probe batches are fixed by the data alone. So arms
compare seed by seed.

A run checkpoints every `train.checkpoint_every` tokens and at the end; calling train() again on
the same folder resumes from the newest checkpoint and, on CPU in float32, reproduces the rows of
an uninterrupted run bit for bit. Ctrl-C (SIGINT) and SIGTERM stop it between two optimizer steps,
after writing a checkpoint of that step, with `Interrupted`; a newest checkpoint that cannot be read
is set aside for the one before it. Under torchrun the global batch is split across ranks
(DistributedDataParallel), Muon's work is divided between them, and rank 0 alone evaluates,
probes and writes.

The parts: `build.build_run` makes the run (world, device, model, optimizers, batches),
`cadence.run_cadence` its schedules, `resume` its checkpoints' state, `evaluator.Evaluator` rank 0's
evaluations and tables; here are the loop and its points: `train_step` (one optimizer step), an
evaluation (`evaluation_point`), a checkpoint at the safe point (`checkpoint_point`), the start of
the run folder (`start_folder`) and the finish (`finish`: done.json).
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path
from typing import Any

import torch

from ..core.model import qk_clip
from ..core.optim import lr_scale, optimizer_step
from ..data import TokenData
from ..errors import Interrupted, first_line
from ..measure.update_geometry import UpdateGeometry
from ..settings.config import RunConfig
from ..storage.provenance import environment, now
from ..storage.store import DONE, naming, truncate_after, write_start
from . import checkpoint, resume
from . import dist as rdist
from .build import (
    CPU_COMPILE_MIN_TOKENS,
    RunSetup,
    build_run,
    compiles,
    keep_freed_memory,
    peak_memory_bytes,
    reset_peak_memory,
    resolve_device,
)
from .evaluator import Evaluator
from .progress import RunBar, StudyProgress
from .resume import RunDiverged, RunState
from .stopping import StopRequest

# what other modules import from here (the device helpers live in `build`)
__all__ = [
    "CPU_COMPILE_MIN_TOKENS",
    "RunDiverged",
    "compiles",
    "keep_freed_memory",
    "peak_memory_bytes",
    "provenance",
    "reset_peak_memory",
    "resolve_device",
    "train",
    "train_step",
]


def train(
    cfg: RunConfig,
    out_dir: str | Path,
    data: TokenData | None = None,
    *,
    arm: str = "",
    progress: bool = True,
    progress_desc: str | None = None,
    study_progress: StudyProgress | None = None,
) -> dict[str, Any]:
    """Train one run into `out_dir` (resuming from its newest checkpoint) and return its summary.
    `study_progress`: the study this run belongs to, for the progress bar's "time left" of the
    whole study (`rankscope.run.progress`)."""
    setup = build_run(cfg, out_dir, data, arm=arm, progress=progress)
    world, cadence = setup.world, setup.cadence
    tps, total = cadence.tokens_per_step, cadence.total_steps
    evaluator = Evaluator(setup) if world.main else None  # rank 0 evaluates; everyone checkpoints
    state = resume.restore(setup)
    start = state.step
    if evaluator is not None:
        start_folder(setup, state)
        evaluator.open()
    bar = None
    if progress and world.main:
        bar = RunBar(total * tps, start * tps, progress_desc or f"{arm or 'run'} seed {cfg.seed}", study_progress)
    scale = lr_scale(start * tps, cfg.train.tokens, cfg.optim)
    t_start = time.perf_counter() - state.timers.elapsed_s
    setup.learner.model.train()
    batch = setup.batches.fetch(start) if start < total else None
    label = f"run {arm + ' ' if arm else ''}seed {cfg.seed}"
    with StopRequest(world) as stop:
        try:
            for step in range(start, total + 1):
                resumed_here = state.resumed and step == start  # its evaluation and checkpoint exist
                if step in cadence.evals and not resumed_here:
                    evaluation_point(setup, state, evaluator, step, scale, t_start, bar)
                # the safe point: after this step's evaluation (a resume skips the evaluation of
                # its first step, so none is lost), before the next optimizer step; on the last
                # step the run finishes first
                halt = stop.agreed() if step < total else 0
                if (step in cadence.saves or halt) and not resumed_here:
                    checkpoint_point(setup, state, step, t_start, bar)
                if halt:
                    raise Interrupted(
                        f"stopped by {signal.Signals(halt).name}: {label} saved at step {step} of {total} "
                        f"({step * tps:,} tokens); rerun the same command to resume",
                        halt,
                    )
                if step == total:
                    break
                watching = evaluator.watching(step) if evaluator is not None else None
                scale = train_step(setup, state, batch, step, watching)
                if step + 1 < total:
                    batch = setup.batches.fetch(step + 1)  # prepared while the device works on this step
                if bar is not None:
                    bar.update(tps)
        except BaseException:
            if evaluator is not None:
                evaluator.close(quiet=True)  # without hiding the error on its way out
            raise
        finally:
            if bar is not None:
                bar.close()
        summary = finish(setup, state, evaluator, t_start)
        halt = stop.agreed()  # a signal during the last step: the run is finished; stop before the next
        if halt:
            raise Interrupted(
                f"stopped by {signal.Signals(halt).name} after finishing {label}; rerun the same command to continue",
                halt,
            )
    return summary


def train_step(
    setup: RunSetup,
    state: RunState,
    batch: tuple[torch.Tensor, torch.Tensor],
    step: int,
    watching: UpdateGeometry | None = None,
) -> float:
    """Optimizer step `step` on the global batch (this rank's rows `batch`, in the split's
    micro-batches), QK-Clip after it where set, its loss and gradient norm added to the state's
    sums; returns its learning-rate scale. An update past float range stops the run (RunDiverged).
    `watching`: the update geometry to snapshot before the update, which the next evaluation measures."""
    cfg, world, split, learner = setup.cfg, setup.world, setup.split, setup.learner
    model, opt = learner.model, learner.opt
    scale = lr_scale(step * setup.cadence.tokens_per_step, cfg.train.tokens, cfg.optim)
    opt.set_lr(scale)
    x, y = batch
    for i, (xm, ym) in enumerate(zip(x.split(split.micro), y.split(split.micro))):
        # all-reduce the gradients once, after the last micro-batch
        with learner.accumulating(sync=i == split.accum - 1), learner.autocast():
            loss = learner.loss(xm, ym) / split.accum
        loss.backward()
        state.loss_sum += loss.detach()
    if watching is not None:
        watching.before_step()
    try:
        norm = optimizer_step(model, opt, cfg.optim.grad_clip)
    except RuntimeError as e:  # an update past float range (a learning rate of 1e308)
        if "overflow" not in str(e):
            raise
        raise RunDiverged(
            f"run {setup.arm} seed {cfg.seed} diverged at step {step}: its update overflowed "
            f"({first_line(e)}); its rows and last good checkpoint are kept"
        ) from None
    if cfg.optim.qk_clip_tau > 0:
        if world.distributed:  # every rank must clip the same heads: use the global maxima
            maxima = torch.stack([b.attn.max_logit for b in model.blocks])
            torch.distributed.all_reduce(maxima, op=torch.distributed.ReduceOp.MAX)
            for b, m in zip(model.blocks, maxima):
                b.attn.max_logit.copy_(m)
        qk_clip(model, cfg.optim.qk_clip_tau)
    state.norm_sum += norm.detach()
    state.timers.n_since += 1
    return scale


def take_means(state: RunState, world: rdist.World) -> tuple[float, float]:
    """The mean training loss and gradient norm since the last evaluation, over every rank (NaN
    when no step was taken since), with the sums started afresh: the only place losses are read on
    the host, once per evaluation."""
    n = state.timers.n_since
    means = torch.stack([state.loss_sum, state.norm_sum]) / max(n, 1)
    if world.distributed:
        torch.distributed.all_reduce(means, op=torch.distributed.ReduceOp.AVG)
    train_loss, grad_norm = means.tolist() if n else (float("nan"), float("nan"))
    state.loss_sum.zero_(), state.norm_sum.zero_()
    state.timers.n_since = 0
    return train_loss, grad_norm


def evaluation_point(
    setup: RunSetup,
    state: RunState,
    evaluator: Evaluator | None,
    step: int,
    scale: float,
    t_start: float,
    bar: RunBar | None,
) -> None:
    """The evaluation after `step` optimizer steps, entered by every rank: rank 0 evaluates (its
    row becomes `state.last`); a loss that is NaN or infinite after step 0 stops every rank
    (RunDiverged), keeping the rows and the last good checkpoint."""
    world, device = setup.world, setup.device
    train_loss, grad_norm = take_means(state, world)
    bad = ""
    # rank 0 evaluates while the others wait at the all-reduce below: a failure in its evaluation
    # (the final one's extras, say) must stop them too, at once
    with rdist.together(world, device):
        if evaluator is not None:
            if bar is not None:
                bar.phase("evaluating…")
            last = evaluator.evaluate(
                step, train_loss, grad_norm, scale, time.perf_counter() - t_start, state.timers, bar
            )
            state.last = last
            bad = next(
                (f"{k} is {last[k]}" for k in ("train_loss", "val_loss") if step > 0 and not math.isfinite(last[k])),
                "",
            )
            if bar is not None:
                bar.show_measured(train_loss, last["val_loss"], last["key_pr"])
        elif step > 0 and not math.isfinite(train_loss):
            bad = f"train_loss is {train_loss}"
    if rdist.any_rank(bool(bad), world, device):
        raise RunDiverged(
            f"run {setup.arm} seed {setup.cfg.seed} diverged at {step * setup.cadence.tokens_per_step:,} tokens"
            f"{': ' + bad if bad else ''}; its rows and last good checkpoint are kept"
        )


def checkpoint_point(setup: RunSetup, state: RunState, step: int, t_start: float, bar: RunBar | None) -> None:
    """The checkpoint of `step`, written by every rank at the safe point. Steps since the last
    evaluation whose loss went NaN or infinite stop the run instead (RunDiverged): the checkpoint
    before them stays the last good one."""
    world, device = setup.world, setup.device
    if step not in setup.cadence.evals and rdist.any_rank(not bool(torch.isfinite(state.loss_sum)), world, device):
        raise RunDiverged(
            f"run {setup.arm} seed {setup.cfg.seed} diverged before {step * setup.cadence.tokens_per_step:,} "
            f"tokens; its rows and last good checkpoint are kept"
        )
    state.timers.elapsed_s = time.perf_counter() - t_start
    if bar is not None:
        bar.phase("saving a checkpoint…")
    resume.save(setup, state, step)
    if bar is not None:
        bar.phase("")


def provenance(cfg: RunConfig, device: torch.device, world: rdist.World) -> dict[str, Any]:
    """Where and with what a run was made (see `rankscope.storage.provenance`), plus its world size and seed."""
    return {**environment(device), "world_size": world.size, "seed": cfg.seed, "started": now()}


def start_folder(setup: RunSetup, state: RunState) -> None:
    """Rank 0 readies the run folder: a resumed run drops the rows past its checkpoint (written
    after it, they will be written again); a fresh one writes its config and provenance."""
    if state.resumed:
        with naming(setup.out_dir):
            truncate_after(setup.out_dir, state.step)
        return
    cfg, model, tc = setup.cfg, setup.learner.model, setup.cfg.train
    write_start(
        setup.out_dir,
        {
            "arm": setup.arm,
            **cfg.to_dict(),
            "n_params": model.num_params(),
            "param_roles": setup.learner.opt.counts,
            "data_source": setup.data.source,
            "tokens_per_step": setup.cadence.tokens_per_step,
            "steps": setup.cadence.total_steps,
            "flops_per_token": model.flops_per_token(tc.seq_len),
            "world_size": setup.world.size,
        },
        provenance(cfg, setup.device, setup.world),
    )


def finish(setup: RunSetup, state: RunState, evaluator: Evaluator | None, t_start: float) -> dict[str, Any]:
    """The run's summary; rank 0 closes its tables and sinks and writes it to done.json (the run
    is finished), then drops the fallback checkpoint, while the other ranks wait."""
    cfg, world, device, timers = setup.cfg, setup.world, setup.device, state.timers
    tps, total = setup.cadence.tokens_per_step, setup.cadence.total_steps
    elapsed = time.perf_counter() - t_start
    summary = {
        "status": "done",
        "arm": setup.arm,
        "seed": cfg.seed,
        "steps": total,
        "tokens": total * tps,
        "elapsed_s": elapsed,
        "probe_s": timers.probe_s,
        "eval_s": timers.eval_s,
        "tokens_per_s": total * tps / max(elapsed, 1e-9),
        "final_val_loss": state.last.get("val_loss"),
        "final_key_pr": state.last.get("key_pr"),
        "peak_memory_bytes": peak_memory_bytes(device),
        "peak_memory_of": setup.memory_scope,  # "run": since this run started; "process": since the process did
        "world_size": world.size,
    }
    with rdist.together(world, device):  # rank 0 writes while the others wait in stop.agreed()
        if evaluator is not None:
            evaluator.close()
            with naming(setup.out_dir / DONE):
                evaluator.store.finish(summary)
            # after done.json: no fallback needed now; the series stays
            checkpoint.finished(setup.out_dir, cfg.train.keep_checkpoints, setup.cadence.series)
    return summary
