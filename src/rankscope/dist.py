"""Process group setup for `torchrun`: one process per device, rank 0 writes.

Under `torchrun --nproc_per_node N -m rankscope run ...` the environment carries RANK,
WORLD_SIZE and LOCAL_RANK; without them everything runs in one process and the collectives below
are no-ops, so the training loop has one code path.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


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
