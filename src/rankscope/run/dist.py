"""Process group setup for `torchrun`: one process per device, rank 0 writes.

Under `torchrun --nproc_per_node N -m rankscope run ...` the environment carries RANK,
WORLD_SIZE and LOCAL_RANK; without them everything runs in one process and the collectives below
are no-ops, so the training loop has one code path. `split_batch` says how a step's global batch is
shared between the processes; `together` makes a failure on one rank reach every rank.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError, RankscopeError, first_line


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """The current process's place, initialising the default process group on first use:
    NCCL when CUDA is present, gloo on CPU."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            # device_id binds the group to this rank's GPU: NCCL connects at once (a rank that
            # cannot fails here, not at the first collective) and barriers use this GPU, not GPU 0
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
            dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=30), device_id=device)
        else:
            dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
        # One group for the process's life, shared by run after run: leaving it after each run and
        # joining anew would race (a rank's new rendezvous can reach a peer's old store before that
        # peer has left: a hang, seen on gloo) and pay NCCL's set-up per run. It is left at exit,
        # unless left before (the command line leaves it in its `finally`; shutdown is idempotent).
        atexit.register(shutdown)
    return World(dist.get_rank(), dist.get_world_size(), local_rank)


@dataclass(frozen=True)
class BatchSplit:
    """How one optimizer step's global batch is shared: each of `ranks` processes takes `rows`
    whole sequences and runs them as `accum` micro-batches of `micro` sequences."""

    micro: int
    accum: int
    ranks: int

    @property
    def rows(self) -> int:
        return self.micro * self.accum

    def describe(self, seq_len: int) -> str:
        """'32 sequences of 2,048 tokens (65,536 tokens a step) as 8 processes x 2 micro-batches x 2 sequences'."""
        total = self.rows * self.ranks
        return (
            f"{total} sequences of {seq_len:,} tokens ({total * seq_len:,} tokens a step) as "
            f"{self.ranks} process{'es' if self.ranks > 1 else ''} x {self.accum} micro-batch"
            f"{'es' if self.accum > 1 else ''} x {self.micro} sequence{'s' if self.micro > 1 else ''}"
        )


def split_batch(batch_size: int, grad_accum: int, ranks: int, seq_len: int) -> BatchSplit:
    """Share `batch_size` sequences a step between `ranks` processes without changing the step.

    The global batch (tokens a step) is the experiment and stays as set; `grad_accum` is a memory
    knob: on one process it cuts the step into that many micro-batches, which makes
    batch_size / grad_accum sequences the largest forward pass. On several, each rank takes
    batch_size / ranks whole sequences and accumulates as few micro-batches as keep each within
    that size: seed-1.5b's 32 sequences in 4 x 8 run as 2 x 8 a rank on 2 GPUs, 1 x 4 on 8. A
    sequence is never cut (attention spans it), so a batch that ranks cannot share stops here with
    the settings that would work. config.validate holds batch_size a multiple of grad_accum."""
    rows, rem = divmod(batch_size, ranks)
    if rem or rows == 0:
        fewer = [str(n) for n in range(1, ranks) if batch_size % n == 0]
        fewer_text = ", ".join(fewer[:-1]) + f" or {fewer[-1]}" if len(fewer) > 1 else fewer[0]
        bigger = -(-batch_size // ranks) * ranks
        raise ConfigError(
            f"train.batch_size={batch_size} ({batch_size * seq_len:,} tokens a step) cannot be split over {ranks} "
            f"processes, each of which needs whole sequences: run on {fewer_text} process"
            f"{'es' if fewer[-1] != '1' else ''}, run study slices side by side (--shard i/n, one GPU each), "
            f"or --set train.batch_size={bigger} ({bigger * seq_len:,} tokens a step, not {batch_size * seq_len:,})"
        )
    most = max(1, batch_size // grad_accum)
    micro = next(m for m in range(min(rows, most), 0, -1) if rows % m == 0)
    return BatchSplit(micro, rows // micro, ranks)


def barrier(w: World) -> None:
    if w.distributed:
        dist.barrier()


def any_rank(flag: bool, w: World, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any rank (one small all-reduce)."""
    if not w.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj, w: World, src: int = 0):
    if not w.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class PeerFailed(RankscopeError):
    """Another rank failed: this one stops too (it did nothing wrong; exit code 1, not usage's 2)."""

    exit_code = 1


@contextlib.contextmanager
def together(w: World, device: torch.device) -> Iterator[None]:
    """A block in which ranks do different work (rank 0 evaluates and writes while the others go
    straight to the next collective), entered by every rank. An exception in it on one rank
    reaches every rank at its end: that rank raises its own, the others PeerFailed naming it.
    Without this the others would wait at their next collective for the group's 30-minute timeout
    while the failed rank waits for them at its exit. Costs one small all-reduce."""
    if not w.distributed:
        yield
        return
    error: Exception | None = None
    try:
        yield
    except Exception as e:  # a KeyboardInterrupt is not caught: torchrun's signals go through StopRequest
        error = e
    if not any_rank(error is not None, w, device):
        return
    said: list[str | None] = [None] * w.size
    dist.all_gather_object(said, None if error is None else f"{type(error).__name__}: {first_line(error)}")
    if error is not None:
        raise error
    rank, why = next((r, s) for r, s in enumerate(said) if s is not None)
    raise PeerFailed(f"process {rank} of {w.size} failed ({why}); process {w.rank} stops too")


def shutdown() -> None:
    """Leave the process group together: a rank that tears gloo down while a peer is still using
    the connection aborts the peer ("terminate called without an active exception"), so wait for
    every rank first; a bounded wait, as a rank that failed may never arrive."""
    if not dist.is_initialized():
        return
    with contextlib.suppress(Exception):
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
        else:
            dist.barrier()
    dist.destroy_process_group()
