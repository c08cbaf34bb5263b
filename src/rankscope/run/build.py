"""Building a run: the process world and its device, the model with its optimizers and the way a
training step calls it (DDP, torch.compile, autocast), this rank's training batches and the fixed
evaluation batches.

`build_run(cfg, data)` is what `train()` starts from; `rankscope bench` times its steps on
`build_learner`, the same model, optimizers, compilation and autocast a run trains with. Also the
device-level helpers both use: `resolve_device`, `compiles`, the CPU allocator setting and the
peak-memory counters.
"""

from __future__ import annotations

import contextlib
import inspect
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.model import GPT, mixed_precision
from ..core.optim import Optimizers, build_optimizers
from ..data import BatchSampler, TokenData, fixed_batches, load_data
from ..errors import RankscopeError, first_line
from ..measure.induction import induction_batch
from ..settings.config import RunConfig
from . import dist as rdist
from .cadence import Cadence, run_cadence
from .estimate import eval_group


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


def prepare_device(tc: Any, world: rdist.World) -> torch.device:
    """This process's device for train settings `tc`, made current, with torch's CPU threads and
    CUDA's TF32 matmuls set as a run trains with them."""
    device = resolve_device(tc.device, world)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


class Learner:
    """The model being trained and how a training step calls it: its optimizers, the DDP wrapper
    under torchrun (`ddp`), the module the step runs (`forward`: the wrapper or the model, compiled
    where the run compiles; `compile_errors`: the failures of its compilation that `loss` falls
    back from) and the autocast the step and the evaluations run under."""

    def __init__(
        self,
        model: GPT,
        opt: Optimizers,
        ddp: Any,
        forward: Any,
        compile_errors: tuple[type[BaseException], ...],
        compile_setting: str,
        world: rdist.World,
        device: torch.device,
    ):
        self.model, self.opt, self.ddp, self.forward = model, opt, ddp, forward
        self.compile_errors, self.compile_setting, self.world = compile_errors, compile_setting, world
        # bf16 autocast on CUDA; the CPU trains in float32 (bitwise reproducible, resumes included)
        cuda = device.type == "cuda"
        self.autocast: Callable[[], Any] = (lambda: mixed_precision(device.type)) if cuda else contextlib.nullcontext

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss; a run compiled by `auto` whose compilation fails on this machine (no
        working C++ toolchain for inductor, say) says so once and trains uncompiled: the failure
        comes before any gradient, so nothing is half done. Asked for (`on`) or under torchrun, a
        failure stops the run with one line instead."""
        try:
            return self.forward(x, y)
        except self.compile_errors as e:
            why = first_line(e)[:200]
            if self.compile_setting == "on" or self.world.distributed:
                raise RankscopeError(f"torch.compile failed ({why}); run with --set train.compile=off") from None
            print(f"rankscope: torch.compile failed ({why}); this run trains uncompiled", file=sys.stderr)
            self.forward, self.compile_errors = (self.ddp if self.ddp is not None else self.model), ()
            return self.forward(x, y)

    def accumulating(self, sync: bool) -> Any:
        """The context of one micro-batch's forward and backward: DDP all-reduces the gradients only
        where `sync` (the step's last micro-batch), not after each one."""
        return contextlib.nullcontext() if sync or self.ddp is None else self.ddp.no_sync()


def build_learner(cfg: RunConfig, device: torch.device, world: rdist.World, compiled: bool) -> Learner:
    """The model of `cfg` (its weights fixed by the seed alone, see `GPT.reset_parameters`) on
    `device`, its optimizers (Muon's work divided over `world`), the DDP wrapper when there are
    several processes, and torch.compile over them when `compiled`."""
    tc = cfg.train
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model)
    model.reset_parameters(cfg.seed)
    model.to(device)
    model.activation_checkpointing = tc.activation_checkpointing
    for block in model.blocks:
        block.attn.track_max_logit = cfg.optim.qk_clip_tau > 0  # QK-Clip reads each layer's max logit
    use_cuda = device.type == "cuda"
    opt = build_optimizers(model, cfg.optim, fused=use_cuda, rank=world.rank, world_size=world.size)
    forward: Any = model
    ddp = None
    if world.distributed:
        # No buffer broadcast before each forward: the RoPE tables are constants, equal on every
        # rank, and each rank's QK-Clip max_logit is its own running maximum, all-reduced after the
        # optimizer step (a broadcast would cost a collective each micro-batch and overwrite the other
        # ranks' maxima of the micro-batches before it with rank 0's). torch 2.13 renamed the switch.
        DDP = torch.nn.parallel.DistributedDataParallel
        renamed = "forward_sync_buffers" in inspect.signature(DDP).parameters
        ddp = DDP(
            model,
            device_ids=[device.index] if use_cuda else None,
            gradient_as_bucket_view=True,
            **{"forward_sync_buffers" if renamed else "broadcast_buffers": False},
        )
        forward = ddp
    if device.type == "cpu":
        keep_freed_memory()
    compile_errors: tuple[type[BaseException], ...] = ()
    if compiled:
        from torch._dynamo.exc import BackendCompilerFailed
        from torch._inductor.exc import InductorError

        compile_errors = (BackendCompilerFailed, InductorError)
        forward = torch.compile(forward)
    return Learner(model, opt, ddp, forward, compile_errors, tc.compile, world, device)


@dataclass
class TrainBatches:
    """This rank's share of each step's global batch: `rows` of the batch `sampler` draws for the
    step (a pure function of seed and step, so every arm sees the same batches in the same order)."""

    sampler: BatchSampler
    rows: slice
    device: torch.device

    def fetch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the global batch of `step`, on its way to the device."""
        x, y = self.sampler.batch(step)
        x, y = x[self.rows], y[self.rows]
        if self.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


@dataclass
class FixedBatches:
    """What rank 0 evaluates on, the same at every evaluation and for every arm: validation and
    out-of-distribution batches (fixed by the data alone), the probe's batch, and the induction
    batch of repeated random tokens (None where the probe or its downstream evaluations are off)."""

    val: list[tuple[torch.Tensor, torch.Tensor]]
    ood: list[tuple[torch.Tensor, torch.Tensor]]
    probe: tuple[torch.Tensor, torch.Tensor] | None = None
    induction: torch.Tensor | None = None


def fixed_eval_batches(cfg: RunConfig, data: TokenData, device: torch.device, world_size: int = 1) -> FixedBatches:
    """The fixed evaluation batches of a run of `cfg` on `data`, on `device`; the validation and
    out-of-distribution batches concatenated `eval_group` at a time, one forward each."""
    tc = cfg.train
    group = eval_group(cfg, device.type, world_size)

    def on_device(batches: list) -> list:
        return [(x.to(device), y.to(device)) for x, y in batches]

    def grouped(shards: list) -> list:
        batches = fixed_batches(shards, tc.eval_batches, tc.batch_size, tc.seq_len)
        return on_device(
            (torch.cat([x for x, _ in batches[i : i + group]]), torch.cat([y for _, y in batches[i : i + group]]))
            for i in range(0, len(batches), group)
        )

    fixed = FixedBatches(val=grouped(data.val), ood=[])
    if data.ood:
        fixed.ood = grouped(data.ood)
    if cfg.probe.enabled:
        fixed.probe = on_device(fixed_batches(data.val, 1, cfg.probe.batch_size, tc.seq_len))[0]
        if cfg.probe.downstream:  # repeated random tokens, the same for every arm and evaluation
            batch = induction_batch(data.vocab_size, cfg.probe.induction_batch, tc.seq_len // 2, seed=0)
            fixed.induction = batch.to(device)
    return fixed


@dataclass
class RunSetup:
    """Everything a run is built from before it trains: its config and schedules (`cadence`), its
    folder and arm, this process's place (`world`) and device, how each step's batch is split
    (`split`), the data, the model and its optimizers (`learner`), this rank's training batches,
    and rank 0's fixed evaluation batches (empty on the other ranks). `memory_scope`: what the
    peak memory counts."""

    cfg: RunConfig
    cadence: Cadence
    out_dir: Path
    arm: str
    world: rdist.World
    device: torch.device
    memory_scope: str
    split: rdist.BatchSplit
    data: TokenData
    learner: Learner
    batches: TrainBatches
    fixed: FixedBatches


def build_run(
    cfg: RunConfig, out_dir: str | Path, data: TokenData | None = None, *, arm: str = "", progress: bool = True
) -> RunSetup:
    """Build the run of `cfg` into `out_dir` on `data` (loaded from `data.path` when None) in this
    process: its world, device, model, optimizers and batches. A batch that ranks cannot share and
    data of a larger vocabulary than the model's stop here, before the model is made."""
    tc = cfg.train
    world = rdist.world()
    device = prepare_device(tc, world)
    memory_scope = reset_peak_memory(device)
    # each rank's whole sequences of the global batch, in micro-batches of at most batch_size / grad_accum
    split = rdist.split_batch(tc.batch_size, tc.grad_accum, world.size, tc.seq_len)
    if data is None:
        data = load_data(cfg.data.path or None, cfg.model.vocab_size, progress=progress and world.main)
    if data.vocab_size > cfg.model.vocab_size:
        raise RankscopeError(f"data has vocab_size {data.vocab_size} > model.vocab_size {cfg.model.vocab_size}")
    learner = build_learner(cfg, device, world, compiles(tc, device))
    sampler = BatchSampler(data.train, tc.batch_size, tc.seq_len, seed=cfg.seed)
    batches = TrainBatches(sampler, slice(world.rank * split.rows, (world.rank + 1) * split.rows), device)
    fixed = fixed_eval_batches(cfg, data, device, world.size) if world.main else FixedBatches(val=[], ood=[])
    return RunSetup(
        cfg, run_cadence(cfg), Path(out_dir), arm, world, device, memory_scope, split, data, learner, batches, fixed
    )
