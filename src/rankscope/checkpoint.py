"""Checkpoints: written atomically, the last K kept, read back with `weights_only=True`.

A checkpoint of step s lives in `<run>/checkpoints/step-<s>.pt` (model, optimizer state of rank 0,
RNG states, counters) plus, with several processes, `step-<s>.rank<r>.pt` for each other rank's
share of Muon's state. Every file goes to a temporary name, is fsynced, then renamed, and the main
file is written last, so its presence means the whole checkpoint is on disk. Loading with
`weights_only=True` means a checkpoint from elsewhere can hold tensors and plain data, never code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from . import fsio
from .errors import RankscopeError

FOLDER = "checkpoints"
_MAIN = re.compile(r"^step-(\d+)\.pt$")


def _path(run_dir: Path, step: int, rank: int) -> Path:
    name = f"step-{step:09d}.pt" if rank == 0 else f"step-{step:09d}.rank{rank}.pt"
    return Path(run_dir) / FOLDER / name


def _atomic_save(obj: Any, path: Path) -> None:
    with fsio.atomic_open(path) as f:
        torch.save(obj, f)


def steps(run_dir: str | Path) -> list[int]:
    """Steps of the complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / FOLDER
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _MAIN.match(p.name)))


def save(
    run_dir: str | Path, step: int, state: dict[str, Any], rank: int = 0, keep: int = 2, barrier=lambda: None
) -> None:
    """Write this rank's part of the checkpoint of `step`; rank 0 writes last, then old ones go."""
    folder = Path(run_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    if rank != 0:
        _atomic_save({"optim": state["optim"]}, _path(run_dir, step, rank))
    barrier()  # every rank's share is on disk before the main file says the checkpoint exists
    if rank == 0:
        _atomic_save(state, _path(run_dir, step, 0))
        for old in steps(run_dir)[:-keep]:  # run folders are on a file system every rank sees
            for f in folder.glob(f"step-{old:09d}.*"):
                f.unlink(missing_ok=True)
    barrier()


def load(run_dir: str | Path, rank: int = 0, device: torch.device | str = "cpu") -> dict[str, Any] | None:
    """The newest complete checkpoint as seen by `rank` (rank 0's file, with this rank's optimizer
    share swapped in), or None when the run has none."""
    found = steps(run_dir)
    if not found:
        return None
    main = _path(run_dir, found[-1], 0)
    try:
        state = torch.load(main, map_location=device, weights_only=True)
        if rank != 0:
            state["optim"] = torch.load(_path(run_dir, found[-1], rank), map_location=device, weights_only=True)[
                "optim"
            ]
    except FileNotFoundError as e:
        raise RankscopeError(
            f"checkpoint {main} is missing its share for rank {rank} ({e.filename}); "
            f"resume with the same number of processes"
        ) from None
    except Exception as e:  # unpickling refused, truncated file, ...
        raise RankscopeError(f"cannot read checkpoint {main}: {str(e).splitlines()[0]}") from None
    return state
