"""A run's state in its checkpoints, written and read back in one place: `save` assembles what a
checkpoint of a step holds (weights, optimizer state, RNG states, the loss sums and timers, the
last evaluation's values), `restore` reads the newest one that fits the run back into it.

Resuming reproduces the uninterrupted run bit for bit on CPU in float32: the batches are a pure
function of (seed, step), the RNG states are restored, and the sums since the last evaluation
carry on from where they were. `rankscope.run.checkpoint` holds the files (atomic writes, the last
K kept, unreadable ones set aside), `rankscope.run.fit` whether one fits this run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import RankscopeError
from ..storage.store import last_eval_from_tables
from . import checkpoint
from . import dist as rdist
from .build import RunSetup
from .fit import Target, misfit, non_finite, shape_settings


class RunDiverged(RankscopeError):
    """The loss became NaN or infinite; the rows and the last good checkpoint are kept."""


@dataclass
class Timers:
    """A run's counters that outlive a resume: optimizer steps since the last evaluation (what the
    loss sums are divided by), and seconds spent probing, evaluating and in all."""

    n_since: int = 0
    probe_s: float = 0.0
    eval_s: float = 0.0
    elapsed_s: float = 0.0


@dataclass
class RunState:
    """What a run carries from step to step besides its weights and optimizer state, as a
    checkpoint holds it: the sums of the training loss and gradient norm since the last evaluation
    (on the device, read on the host only at an evaluation), the timers, and `last`, what the last
    evaluation returned on rank 0 (its val_loss and key_pr go into checkpoints and done.json).
    `step`: the step the run starts from (the checkpoint's when `resumed`, else 0)."""

    loss_sum: torch.Tensor
    norm_sum: torch.Tensor
    timers: Timers = field(default_factory=Timers)
    last: dict[str, Any] = field(default_factory=dict)
    step: int = 0
    resumed: bool = False


def save(setup: RunSetup, state: RunState, step: int) -> None:
    """Write this rank's part of the checkpoint of `step` (every rank calls it at the same step).
    Its entries are the ones `fit.misfit` checks a checkpoint for before it resumes a run."""
    cfg, world, device = setup.cfg, setup.world, setup.device
    learner = setup.learner
    saved = {
        "format": checkpoint.FORMAT,
        "settings": shape_settings(cfg),
        "step": step,
        "tokens": step * setup.cadence.tokens_per_step,
        "model": learner.model.state_dict(),
        "optim": learner.opt.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "loss_sum": state.loss_sum,
        "norm_sum": state.norm_sum,
        "timers": dataclasses.asdict(state.timers),
        "world_size": world.size,
    }
    if state.last:
        saved["last_eval"] = {"val_loss": state.last.get("val_loss"), "key_pr": state.last.get("key_pr")}
    if device.type == "cuda":
        saved["rng_cuda"] = torch.cuda.get_rng_state(device)
    checkpoint.save(
        setup.out_dir,
        step,
        saved,
        world.rank,
        cfg.train.keep_checkpoints,
        lambda: rdist.barrier(world),
        setup.cadence.series,
    )


def restore(setup: RunSetup) -> RunState:
    """The state of the run in its folder from its newest checkpoint that fits, loaded into the
    setup's model, optimizers and RNGs; a fresh state when it has none. A checkpoint of NaN or
    infinite weights stops the run (RunDiverged): it diverged there."""
    cfg, world, device, out_dir, arm = setup.cfg, setup.world, setup.device, setup.out_dir, setup.arm
    model, opt = setup.learner.model, setup.learner.opt
    state = RunState(torch.zeros((), device=device), torch.zeros((), device=device))
    # a checkpoint is checked against this run before anything is loaded from it: one of other
    # settings or another rankscope's format stops here, a damaged one is set aside for the one before
    target = Target(
        shape_settings(cfg),
        world.size,
        model.state_dict(),
        opt,
        {"loss_sum": state.loss_sum, "norm_sum": state.norm_sum},
        dataclasses.asdict(state.timers),
        device,
    )
    # read to the CPU; the weights are copied into the model's own tensors, the optimizer moves its
    # state next to its parameters, and the rest is dropped on return: no second copy on the device
    saved = checkpoint.load(
        out_dir,
        world.rank,
        agree=lambda ok: not rdist.any_rank(not ok, world, device),
        set_aside=True,
        fit=lambda s: misfit(s, target),
    )
    if saved is None:
        return state
    if nan := non_finite(saved):
        # weights that are NaN or infinite: the run diverged there (rows and checkpoints stay as they are)
        raise RunDiverged(
            f"run {arm + ' ' if arm else ''}seed {cfg.seed} diverged at "
            f"{saved['step'] * setup.cadence.tokens_per_step:,} tokens: "
            f"its checkpoint of step {saved['step']} holds NaN or infinite values in {nan[0]}"
            + (f" and {len(nan) - 1} more" if len(nan) > 1 else "")
        )
    model.load_state_dict(saved["model"])
    try:
        opt.load_state_dict(saved["optim"])
    except ValueError as e:
        raise RankscopeError(f"{out_dir}: cannot resume: {e}") from None
    torch.set_rng_state(saved["rng_cpu"])
    if device.type == "cuda" and "rng_cuda" in saved:
        torch.cuda.set_rng_state(saved["rng_cuda"], device)
    state.loss_sum.copy_(saved["loss_sum"])
    state.norm_sum.copy_(saved["norm_sum"])
    state.timers = Timers(**saved["timers"])
    state.step, state.resumed = saved["step"], True
    if world.main:
        # a run resumed at its last step (killed before done.json, or run twice) evaluates no
        # more: its final values come from the checkpoint, or from the tables of an older one
        state.last = dict(saved.get("last_eval") or {})
        if not state.last and state.step == setup.cadence.total_steps:
            state.last = last_eval_from_tables(out_dir, state.step)
    return state
