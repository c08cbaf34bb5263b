"""Stopping a run cleanly on Ctrl-C or SIGTERM: the signal only asks; the training loop stops at its
next safe point, writes a checkpoint and raises `Interrupted`.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch

from . import dist as rdist


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM (what a cluster scheduler sends before it kills a job) ask the
    training loop to stop at its next safe point, between two optimizer steps, rather than at
    whatever bytecode the signal lands on; the loop then writes a checkpoint and raises
    `Interrupted`. The handlers are installed only in the main thread (Python allows no other), not
    over a signal the caller ignores (a background job's SIGINT), and restored on exit.

    A second SIGINT while stopping forces the stop at once (KeyboardInterrupt): every file is written
    atomically, so the run then resumes from its previous checkpoint. Under torchrun a repeated
    signal is ignored instead, because torchrun forwards the signal it got to workers that the
    terminal or the scheduler already signalled."""

    def __init__(self, world: rdist.World):
        self.signum = 0
        self._world = world
        self._old: dict[int, Any] = {}
        self._group = None
        if world.distributed and torch.distributed.get_backend() != "gloo":
            # agree on a small CPU group: an all-reduce on the GPU would make the host wait for
            # every step to finish, where the loop otherwise never synchronises between evaluations
            self._group = torch.distributed.new_group(backend="gloo")

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum and signum == signal.SIGINT and not self._world.distributed:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old = signal.getsignal(sig)
                if old is signal.SIG_IGN or old is None:  # ignored on purpose, or owned by non-Python code
                    continue
                try:
                    signal.signal(sig, self._handle)
                except ValueError:  # a subinterpreter's main thread: no signals there either
                    continue
                self._old[sig] = old
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def agreed(self) -> int:
        """The signal to stop for (0: none), the same on every rank: a collective under torchrun,
        so every rank must call it at the same steps."""
        if not self._world.distributed:
            return self.signum
        t = torch.tensor([self.signum], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self._group)
        return int(t.item())
