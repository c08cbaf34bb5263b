"""One training run: train(cfg, out_dir) -> summary. One readable loop in labelled sections.

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
"""

from __future__ import annotations

import contextlib
import inspect
import math
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..core.model import GPT, mixed_precision, qk_clip
from ..core.optim import build_optimizers, lr_scale, optimizer_step
from ..data import BatchSampler, TokenData, fixed_batches, load_data
from ..errors import Interrupted, RankscopeError, first_line
from ..integrations.sinks import evaluation_summary, open_sinks
from ..measure.evals import functional_rank, gpt_induction_scores, induction_batch, loss_and_icl, weight_spectra
from ..measure.headroom import kv_headroom
from ..measure.probe import gpt_probe
from ..measure.update_geometry import UpdateGeometry, k_part
from ..settings.config import RunConfig
from ..storage import store as run_folder
from ..storage.provenance import environment, now
from ..storage.store import RunStore, last_eval_from_tables, naming, truncate_after
from . import checkpoint
from . import dist as rdist
from .cadence import eval_steps, schedule
from .progress import RunBar, StudyProgress
from .stopping import StopRequest


class RunDiverged(RankscopeError):
    """The loss became NaN or infinite; the rows and the last good checkpoint are kept."""


def resolve_device(name: str, world: rdist.World | None = None) -> torch.device:
    """The device `train.device` names, checked to exist here (one line if not, before anything runs):
    auto = CUDA where there is one, else the CPU; cuda:N below the device count; mps where built."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RankscopeError(f"train.device={name} but CUDA is not available on this machine")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise RankscopeError(
            f"train.device={name} but this machine has {n} CUDA device{'s' if n != 1 else ''} (cuda:0..{n - 1})"
        )
    if name == "mps" and not (torch.backends.mps.is_built() and torch.backends.mps.is_available()):
        raise RankscopeError("train.device=mps but MPS (Apple's GPU backend) is not available on this machine")
    if name == "cuda" and world is not None and world.distributed:
        name = f"cuda:{world.local_rank}"
    return torch.device(name)


def provenance(cfg: RunConfig, device: torch.device, world: rdist.World) -> dict[str, Any]:
    """Where and with what a run was made (see `rankscope.storage.provenance`), plus its world size and seed."""
    return {**environment(device), "world_size": world.size, "seed": cfg.seed, "started": now()}


def _close_tables(store: RunStore, quiet: bool) -> None:
    """Close both tables even when one fails (a full disk fails the flush in close() again); raise
    the first failure unless `quiet` (another exception is already on its way out)."""
    error = None
    for table in (store.scalars, store.probes):
        try:
            with naming(table.path):
                table.close()
        except OSError as e:
            error = error or e
    if error is not None and not quiet:
        raise error


# `train.compile=auto` on CPU: torch.compile fuses the memory-bound elementwise work (norms, RoPE,
# squared ReLU, residual adds) for about 1.15x tokens/s on two cores, for 20-60 s of compilation
# the first time a shape is compiled on a machine (inductor's caches make later arms and seeds,
# and later studies, cheap). A run of this many tokens or more earns it back the first time.
CPU_COMPILE_MIN_TOKENS = 1_000_000


def compiles(tc: Any, device: torch.device) -> bool:
    """Whether a run with train settings `tc` on `device` runs its training step compiled:
    train.compile on; off; auto = on CUDA always, on CPU when the run has at least
    CPU_COMPILE_MIN_TOKENS tokens and a C++ compiler is there for inductor's CPU kernels."""
    if tc.compile != "auto":
        return tc.compile == "on"
    if device.type == "cuda":
        return True
    if device.type != "cpu" or tc.tokens < CPU_COMPILE_MIN_TOKENS:
        return False
    import os
    import shutil

    return shutil.which(os.environ.get("CXX", "g++")) is not None or shutil.which("clang++") is not None


def keep_freed_memory() -> None:
    """Keep freed memory in the process (glibc only; nothing elsewhere). Each training step frees
    and allocates the same activation tensors again; by default glibc hands large blocks back to
    the system (mmap above 128 KiB, heap trimming above 128 KiB) and the next step page-faults them
    in again: 16-28k minor page faults a step at the tiny preset. Raising both thresholds (the
    mmap one to glibc's 32 MiB ceiling) keeps them: a few hundred faults a step, 1.01-1.15x faster
    steps on two cores (BENCHMARKS.md). Process-wide, as the allocator is; memory peaks where it did."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to set
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    mallopt(M_TRIM_THRESHOLD, ctypes.c_int(1 << 30))
    mallopt(M_MMAP_THRESHOLD, ctypes.c_int(32 << 20))


def reset_peak_memory(device: torch.device) -> str:
    """Start counting a run's peak memory afresh, so each run of a study reports its own peak and
    not the highest of every run before it in the process. Returns what `peak_memory_bytes` will
    measure: "run" on CUDA (tensors allocated on the device since now) and on Linux (the process's
    resident memory since now: writing 5 to /proc/self/clear_refs resets the kernel's high-water
    mark, which ru_maxrss reads); "process" where nothing can reset it (the peak since the process
    started, as getrusage counts it)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "run"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or a kernel or sandbox that forbids it
        return "process"
    return "run"


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    # on CPU the whole process's resident memory: the data and torch itself are in it too
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit


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
    # --- setup: processes, device, model, optimizers -------------------------------------------
    tc = cfg.train
    world = rdist.world()
    device = resolve_device(tc.device, world)
    use_cuda = device.type == "cuda"
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    memory_scope = reset_peak_memory(device)
    # each rank's whole sequences of the global batch, in micro-batches of at most batch_size / grad_accum
    split = rdist.split_batch(tc.batch_size, tc.grad_accum, world.size, tc.seq_len)
    if data is None:
        data = load_data(cfg.data.path or None, cfg.model.vocab_size, progress=progress and world.main)
    if data.vocab_size > cfg.model.vocab_size:
        raise RankscopeError(f"data has vocab_size {data.vocab_size} > model.vocab_size {cfg.model.vocab_size}")

    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model)
    model.reset_parameters(cfg.seed)
    model.to(device)
    model.activation_checkpointing = tc.activation_checkpointing
    clip_tau = cfg.optim.qk_clip_tau
    for block in model.blocks:
        block.attn.track_max_logit = clip_tau > 0
    opt = build_optimizers(model, cfg.optim, fused=use_cuda, rank=world.rank, world_size=world.size)
    step_model: torch.nn.Module = model
    ddp = None
    if world.distributed:
        # No buffer broadcast before each forward: the RoPE tables are constants, equal on every
        # rank, and each rank's QK-Clip max_logit is its own running maximum, all-reduced after the
        # step below (a broadcast would cost a collective each micro-batch and overwrite the other
        # ranks' maxima of the micro-batches before it with rank 0's). torch 2.13 renamed the switch.
        DDP = torch.nn.parallel.DistributedDataParallel
        renamed = "forward_sync_buffers" in inspect.signature(DDP).parameters
        ddp = DDP(
            model,
            device_ids=[device.index] if use_cuda else None,
            gradient_as_bucket_view=True,
            **{"forward_sync_buffers" if renamed else "broadcast_buffers": False},
        )
        step_model = ddp
    if device.type == "cpu":
        keep_freed_memory()
    compile_errors: tuple[type[BaseException], ...] = ()  # the failures step_loss falls back from
    if compiles(tc, device):
        from torch._dynamo.exc import BackendCompilerFailed
        from torch._inductor.exc import InductorError

        compile_errors = (BackendCompilerFailed, InductorError)
        step_model = torch.compile(step_model)
    autocast = (lambda: mixed_precision(device.type)) if use_cuda else contextlib.nullcontext

    # --- data: training batches by step; fixed validation, out-of-distribution and probe batches --
    tokens_per_step = tc.batch_size * tc.seq_len
    total_steps = max(1, math.ceil(tc.tokens / tokens_per_step))
    sampler = BatchSampler(data.train, tc.batch_size, tc.seq_len, seed=cfg.seed)
    my_rows = slice(world.rank * split.rows, (world.rank + 1) * split.rows)

    def fetch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the global batch of `step`, on its way to the device."""
        x, y = sampler.batch(step)
        x, y = x[my_rows], y[my_rows]
        if use_cuda:
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def on_device(batches: list) -> list:
        return [(x.to(device), y.to(device)) for x, y in batches]

    val_batches = ood_batches = []
    probe_batch = probe = induction = geometry = None
    downstream = cfg.probe.enabled and cfg.probe.downstream
    if world.main:
        val_batches = on_device(fixed_batches(data.val, tc.eval_batches, tc.batch_size, tc.seq_len))
        if data.ood:
            ood_batches = on_device(fixed_batches(data.ood, tc.eval_batches, tc.batch_size, tc.seq_len))
        if cfg.probe.enabled:
            probe_batch = on_device(fixed_batches(data.val, 1, cfg.probe.batch_size, tc.seq_len))[0]
            probe = gpt_probe(model, cfg.probe.sites, attention=cfg.probe.attention)
            if cfg.probe.update_geometry:  # the update W_K receives in the step before each evaluation
                geometry = UpdateGeometry(model, cfg.model.head_dim, k_part(cfg.optim))
        if downstream:  # repeated random tokens, the same for every arm and evaluation
            half = tc.seq_len // 2
            induction_x = induction_batch(data.vocab_size, cfg.probe.induction_batch, half, seed=0).to(device)
            induction = gpt_induction_scores(model, half)

    # --- resume from the newest checkpoint, or start fresh ----------------------------------------
    out_dir = Path(out_dir)
    loss_sum = torch.zeros((), device=device)
    norm_sum = torch.zeros((), device=device)
    timers = {"n_since": 0, "probe_s": 0.0, "eval_s": 0.0, "elapsed_s": 0.0}
    start_step = 0
    last: dict[str, Any] = {}  # what evaluate() returned last: the final values in done.json
    # a checkpoint is checked against this run before anything is loaded from it: one of other
    # settings or another rankscope's format stops here, a damaged one is set aside for the one before
    run_now = checkpoint.Run(
        checkpoint.shape_settings(cfg),
        world.size,
        model.state_dict(),
        opt,
        {"loss_sum": loss_sum, "norm_sum": norm_sum},
        timers,
        device,
    )
    # read to the CPU; the weights are copied into the model's own tensors, the optimizer moves its
    # state next to its parameters, and the rest is dropped below: no second copy on the device
    state = checkpoint.load(
        out_dir,
        world.rank,
        agree=lambda ok: not rdist.any_rank(not ok, world, device),
        set_aside=True,
        fit=lambda s: checkpoint.misfit(s, run_now),
    )
    resumed = state is not None
    if resumed and (nan := checkpoint.non_finite(state)):
        # weights that are NaN or infinite: the run diverged there (rows and checkpoints stay as they are)
        raise RunDiverged(
            f"run {arm + ' ' if arm else ''}seed {cfg.seed} diverged at {state['step'] * tokens_per_step:,} tokens: "
            f"its checkpoint of step {state['step']} holds NaN or infinite values in {nan[0]}"
            + (f" and {len(nan) - 1} more" if len(nan) > 1 else "")
        )
    if resumed:
        model.load_state_dict(state["model"])
        try:
            opt.load_state_dict(state["optim"])
        except ValueError as e:
            raise RankscopeError(f"{out_dir}: cannot resume: {e}") from None
        torch.set_rng_state(state["rng_cpu"])
        if use_cuda and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        loss_sum.copy_(state["loss_sum"])
        norm_sum.copy_(state["norm_sum"])
        timers.update(state["timers"])
        start_step = state["step"]
        if world.main:
            # a run resumed at its last step (killed before done.json, or run twice) evaluates no
            # more: its final values come from the checkpoint, or from the tables of an older one
            last = dict(state.get("last_eval") or {})
            if not last and start_step == total_steps:
                last = last_eval_from_tables(out_dir, start_step)
    del state  # the checkpoint's tensors must not live through the loop
    if world.main:
        if resumed:
            with naming(out_dir):
                truncate_after(out_dir, start_step)
        else:
            run_folder.write_start(
                out_dir,
                {
                    "arm": arm,
                    **cfg.to_dict(),
                    "n_params": model.num_params(),
                    "param_roles": opt.counts,
                    "data_source": data.source,
                    "tokens_per_step": tokens_per_step,
                    "steps": total_steps,
                    "flops_per_token": model.flops_per_token(tc.seq_len),
                    "world_size": world.size,
                },
                provenance(cfg, device, world),
            )
    store = RunStore(out_dir) if world.main else None
    # a summary of each evaluation streamed while the run trains (train.log); the tables are the record
    sinks = open_sinks(cfg.train.log, out_dir) if world.main and cfg.train.log else []

    # --- evaluation, probing and checkpoints (rank 0 evaluates; everyone checkpoints) -------------
    @torch.no_grad()
    def mean_loss(batches: list) -> float:
        with autocast():
            losses = [model(x, y) for x, y in batches]
        return torch.stack(losses).mean().item() if losses else float("nan")

    def evaluate(step: int, train_loss: float, grad_norm: float, scale: float, elapsed: float) -> dict[str, Any]:
        t0 = time.perf_counter()
        base = dict(arm=arm, seed=cfg.seed, step=step, tokens=step * tokens_per_step)
        model.eval()
        with torch.no_grad(), autocast():
            # validation loss and the in-context learning score from the same forward passes
            val_loss, icl = loss_and_icl(model, val_batches) if downstream else (mean_loss(val_batches), "")
            row = dict(
                base,
                train_loss=train_loss,
                val_loss=val_loss,
                icl_score=icl,
                ood_loss=mean_loss(ood_batches) if ood_batches else "",
                lr_scale=scale,
                grad_norm=grad_norm,
            )
            probe_rows: list[dict[str, Any]] = []
            extra: list[dict[str, Any]] = []
            healthy = math.isfinite(val_loss)  # a diverged model has no geometry left to measure
            if bar is not None and healthy and (probe is not None or induction is not None):
                bar.phase("probing…")
            if probe is not None and healthy:
                tp = time.perf_counter()
                probe_rows = probe.measure([probe_batch[0]])
                timers["probe_s"] += time.perf_counter() - tp
            if induction is not None and healthy:
                row["induction_loss"], extra = induction.measure_with_loss(induction_x)
                extra += weight_spectra(model)
            if geometry is not None and healthy:
                extra += geometry.measure()
            elif geometry is not None:  # a diverged step has no geometry: forget its snapshot
                geometry.discard()
            if step in rank_steps and healthy:  # the dimensions the model uses (costly: not every time)
                extra += functional_rank(model, *probe_batch)
            if step == total_steps and cfg.probe.enabled and cfg.probe.kv_headroom == "end" and healthy:
                extra += kv_headroom(model, *probe_batch, tol=cfg.probe.kv_tolerance)  # keys per kv head
        if probe_rows or extra:
            with naming(store.probes.path):
                store.probes.append(dict(base, **r) for r in probe_rows + extra)
        model.train()
        timers["eval_s"] += time.perf_counter() - t0
        row.update(elapsed_s=elapsed + time.perf_counter() - t0, probe_s=timers["probe_s"], eval_s=timers["eval_s"])
        with naming(store.scalars.path):
            store.scalars.append([row])
        for sink in sinks:
            sink.log(evaluation_summary(row, probe_rows), step, step * tokens_per_step)
        key = [r["value"] for r in probe_rows if r["site"] == "k" and r["metric"] == "pr_sv"]
        row["key_pr"] = sum(key) / len(key) if key else float("nan")
        return row

    def save_checkpoint(step: int) -> None:
        state = {
            "format": checkpoint.FORMAT,
            "settings": checkpoint.shape_settings(cfg),
            "step": step,
            "tokens": step * tokens_per_step,
            "model": model.state_dict(),
            "optim": opt.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "loss_sum": loss_sum,
            "norm_sum": norm_sum,
            "timers": dict(timers),
            "world_size": world.size,
        }
        if last:
            state["last_eval"] = {"val_loss": last.get("val_loss"), "key_pr": last.get("key_pr")}
        if use_cuda:
            state["rng_cuda"] = torch.cuda.get_rng_state(device)
        checkpoint.save(out_dir, step, state, world.rank, tc.keep_checkpoints, lambda: rdist.barrier(world))

    def step_loss(xm: torch.Tensor, ym: torch.Tensor) -> torch.Tensor:
        """The training loss; a run compiled by `auto` whose compilation fails on this machine (no
        working C++ toolchain for inductor, say) says so once and trains uncompiled: the failure
        comes before any gradient, so nothing is half done. Asked for (`on`) or under torchrun, a
        failure stops the run with one line instead."""
        nonlocal step_model, compile_errors
        try:
            return step_model(xm, ym)
        except compile_errors as e:
            why = first_line(e)[:200]
            if tc.compile == "on" or world.distributed:
                raise RankscopeError(f"torch.compile failed ({why}); run with --set train.compile=off") from None
            print(f"rankscope: torch.compile failed ({why}); this run trains uncompiled", file=sys.stderr)
            step_model, compile_errors = (ddp if ddp is not None else model), ()
            return step_model(xm, ym)

    # --- the loop ---------------------------------------------------------------------------------
    evals = set(eval_steps(total_steps, tokens_per_step, tc.eval_every, tc.eval_schedule, tc.eval_points))
    rank_steps = (
        {
            "off": set(),
            "end": {total_steps},
            "every": evals,
            "middle-end": {total_steps, min(evals, key=lambda s: (abs(s - total_steps / 2), s))},
        }[cfg.probe.functional_rank]
        if cfg.probe.enabled
        else set()
    )
    saves = set(schedule(total_steps, tokens_per_step, tc.checkpoint_every)) - {0}
    bar = None
    if progress and world.main:
        bar = RunBar(
            total_steps * tokens_per_step,
            start_step * tokens_per_step,
            progress_desc or f"{arm or 'run'} seed {cfg.seed}",
            study_progress,
        )
    scale = lr_scale(start_step * tokens_per_step, tc.tokens, cfg.optim)
    t_start = time.perf_counter() - timers["elapsed_s"]
    model.train()
    batch = fetch(start_step) if start_step < total_steps else None
    label = f"run {arm + ' ' if arm else ''}seed {cfg.seed}"
    with StopRequest(world) as stop:
        try:
            for step in range(start_step, total_steps + 1):
                resumed_here = resumed and step == start_step  # its eval and checkpoint exist
                if step in evals and not resumed_here:
                    # the only place losses are read on the host: once per evaluation
                    n = timers["n_since"]
                    means = torch.stack([loss_sum, norm_sum]) / max(n, 1)
                    if world.distributed:
                        torch.distributed.all_reduce(means, op=torch.distributed.ReduceOp.AVG)
                    train_loss, grad_norm = means.tolist() if n else (float("nan"), float("nan"))
                    loss_sum.zero_(), norm_sum.zero_()
                    timers["n_since"] = 0
                    bad = ""
                    # rank 0 evaluates while the others wait at the all-reduce below: a failure in
                    # its evaluation (the final one's extras, say) must stop them too, at once
                    with rdist.together(world, device):
                        if world.main:
                            if bar is not None:
                                bar.phase("evaluating…")
                            last = evaluate(step, train_loss, grad_norm, scale, time.perf_counter() - t_start)
                            bad = next(
                                (
                                    f"{k} is {last[k]}"
                                    for k in ("train_loss", "val_loss")
                                    if step > 0 and not math.isfinite(last[k])
                                ),
                                "",
                            )
                            if bar is not None:
                                bar.show_measured(train_loss, last["val_loss"], last["key_pr"])
                        elif step > 0 and not math.isfinite(train_loss):
                            bad = f"train_loss is {train_loss}"
                    if rdist.any_rank(bool(bad), world, device):
                        raise RunDiverged(
                            f"run {arm} seed {cfg.seed} diverged at {step * tokens_per_step:,} tokens"
                            f"{': ' + bad if bad else ''}; its rows and last good checkpoint are kept"
                        )
                # the safe point: after this step's evaluation (a resume skips the evaluation of
                # its first step, so none is lost), before the next optimizer step; on the last
                # step the run finishes first
                halt = stop.agreed() if step < total_steps else 0
                if (step in saves or halt) and not resumed_here:
                    if step not in evals and rdist.any_rank(not bool(torch.isfinite(loss_sum)), world, device):
                        raise RunDiverged(
                            f"run {arm} seed {cfg.seed} diverged before {step * tokens_per_step:,} "
                            f"tokens; its rows and last good checkpoint are kept"
                        )
                    timers["elapsed_s"] = time.perf_counter() - t_start
                    if bar is not None:
                        bar.phase("saving a checkpoint…")
                    save_checkpoint(step)
                    if bar is not None:
                        bar.phase("")
                if halt:
                    raise Interrupted(
                        f"stopped by {signal.Signals(halt).name}: {label} saved at step {step} of {total_steps} "
                        f"({step * tokens_per_step:,} tokens); rerun the same command to resume",
                        halt,
                    )
                if step == total_steps:
                    break

                # one optimizer step on the global batch: this rank's rows, in split.accum micro-batches
                scale = lr_scale(step * tokens_per_step, tc.tokens, cfg.optim)
                opt.set_lr(scale)
                x, y = batch
                for i, (xm, ym) in enumerate(zip(x.split(split.micro), y.split(split.micro))):
                    sync = ddp is None or i == split.accum - 1  # all-reduce gradients once, after the last
                    with contextlib.nullcontext() if sync else ddp.no_sync(), autocast():
                        loss = step_loss(xm, ym) / split.accum
                    loss.backward()
                    loss_sum += loss.detach()
                if geometry is not None and step + 1 in evals:
                    geometry.before_step()
                try:
                    norm = optimizer_step(model, opt, cfg.optim.grad_clip)
                except RuntimeError as e:  # an update past float range (a learning rate of 1e308)
                    if "overflow" not in str(e):
                        raise
                    raise RunDiverged(
                        f"run {arm} seed {cfg.seed} diverged at step {step}: its update overflowed "
                        f"({first_line(e)}); its rows and last good checkpoint are kept"
                    ) from None
                if clip_tau > 0:
                    if world.distributed:  # every rank must clip the same heads: use the global maxima
                        maxima = torch.stack([b.attn.max_logit for b in model.blocks])
                        torch.distributed.all_reduce(maxima, op=torch.distributed.ReduceOp.MAX)
                        for b, m in zip(model.blocks, maxima):
                            b.attn.max_logit.copy_(m)
                    qk_clip(model, clip_tau)
                norm_sum += norm.detach()
                timers["n_since"] += 1
                if step + 1 < total_steps:
                    batch = fetch(step + 1)  # prepared while the device works on this step
                if bar is not None:
                    bar.update(tokens_per_step)
        except BaseException:
            if store is not None:
                _close_tables(store, quiet=True)  # without hiding the error on its way out
            for sink in sinks:
                with contextlib.suppress(Exception):  # what was logged is flushed already
                    sink.close()
            raise
        finally:
            if bar is not None:
                bar.close()

        elapsed = time.perf_counter() - t_start
        summary = {
            "status": "done",
            "arm": arm,
            "seed": cfg.seed,
            "steps": total_steps,
            "tokens": total_steps * tokens_per_step,
            "elapsed_s": elapsed,
            "probe_s": timers["probe_s"],
            "eval_s": timers["eval_s"],
            "tokens_per_s": total_steps * tokens_per_step / max(elapsed, 1e-9),
            "final_val_loss": last.get("val_loss"),
            "final_key_pr": last.get("key_pr"),
            "peak_memory_bytes": peak_memory_bytes(device),
            "peak_memory_of": memory_scope,  # "run": since this run started; "process": since the process did
            "world_size": world.size,
        }
        with rdist.together(world, device):  # rank 0 writes while the others wait in stop.agreed()
            if store is not None:
                _close_tables(store, quiet=False)
                for sink in sinks:
                    sink.close()
                with naming(out_dir / run_folder.DONE):
                    store.finish(summary)
                checkpoint.finished(out_dir, tc.keep_checkpoints)  # after done.json: the run needs no fallback now
        halt = stop.agreed()  # a signal during the last step: the run is finished; stop before the next
        if halt:
            raise Interrupted(
                f"stopped by {signal.Signals(halt).name} after finishing {label}; rerun the same command to continue",
                halt,
            )
    return summary
