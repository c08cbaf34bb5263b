"""Checkpoints: written atomically, the last K kept, read back to the CPU with `weights_only=True`.

A checkpoint of step s lives in `<run>/checkpoints/step-<s>.pt` (model, optimizer state of rank 0,
RNG states, counters) plus, with several processes, `step-<s>.rank<r>.pt` for each other rank's
own state (its share of Muon's state, its loss sums, its RNG). Every file goes to a temporary
name, is fsynced, then renamed, and the main file is written last, so its presence means the
whole checkpoint is on disk. Loading with `weights_only=True` means a checkpoint from elsewhere
can hold tensors and plain data, never code. Loading goes to the CPU whatever the device: the
caller copies the weights into its model's own tensors and its optimizer moves its state next to
its parameters, so a resumed run never holds a second copy of the weights on the GPU, and a rank
never puts rank 0's optimizer share there.

While a run trains, the checkpoint before the newest is its fallback should the newest be
unreadable; a finished run needs none, so `finished` removes it (`keep` - 1 remain: with the
default of 2, the final checkpoint alone). The checkpoints of the run's series (`series`: the
`train.checkpoint_series` log-spaced steps) are never removed, so `rankscope analyze --series`
can probe a finished run over its history.

A checkpoint that cannot be read (truncated by a full disk or a crashed file system, corrupted,
refused) is skipped for the previous one with a warning; when resuming it is also renamed to
`<name>.corrupt`, so it is not tried again and nothing is deleted. Only when no checkpoint can be
read is that an error.

A checkpoint that reads but does not fit the run resuming it (another format, other shape
settings, damaged in structure, NaN or infinite weights) is told apart in `rankscope.run.fit`;
`load(fit=...)` skips and sets aside the damaged ones as it does unreadable files. What a run's
checkpoint holds, and how a run is restored from it, is `rankscope.run.resume`.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import RankscopeError
from ..storage import fsio
from ..storage.store import CHECKPOINTS

# What differs between ranks, so each rank's share carries its own: its part of Muon's state, its
# sums of the loss over its rows since the last evaluation, and its random number generators.
RANK_KEYS = ("optim", "loss_sum", "norm_sum", "rng_cpu", "rng_cuda")
_MAIN = re.compile(r"^step-(\d+)\.pt$")

# The layout of a checkpoint's contents. 2 adds "settings" (`fit.shape_settings`). A checkpoint of
# format 1 is still read: its process count is compared, and every tensor is checked as in any.
FORMAT = 2
READABLE = (1, 2)


def _path(run_dir: Path, step: int, rank: int) -> Path:
    name = f"step-{step:09d}.pt" if rank == 0 else f"step-{step:09d}.rank{rank}.pt"
    return Path(run_dir) / CHECKPOINTS / name


def gist(e: BaseException) -> str:
    """The gist of an error for a one-line message (torch's zip reader appends a paragraph)."""
    text = (str(e).strip() or type(e).__name__).splitlines()[0]
    return text.split(". ")[0] if len(text) > 120 else text


class _Recorder:
    """A file wrapper that remembers what a write raised: torch.save reports any failed write as
    RuntimeError('unexpected pos ...'), which would hide 'No space left on device' or turn a
    KeyboardInterrupt into an error with a traceback."""

    def __init__(self, f: Any):
        self._f = f
        self.error: BaseException | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except BaseException as e:
            self.error = e
            raise

    def flush(self) -> None:
        try:
            self._f.flush()
        except BaseException as e:
            self.error = e
            raise


def _atomic_save(obj: Any, path: Path) -> None:
    recorder = None
    try:
        with fsio.atomic_open(path) as f:
            recorder = _Recorder(f)
            torch.save(obj, recorder)
    except BaseException as e:
        # fsio removes its temporary file, except when closing the file fails again (a full disk
        # fails the flush in close() too): a half-written checkpoint must not stay behind.
        for tmp in path.parent.glob(f".{path.name}.{os.getpid()}.*.tmp"):
            tmp.unlink(missing_ok=True)
        error = recorder.error if recorder is not None and recorder.error is not None else e
        if isinstance(error, OSError) and error.filename is None:  # a write on an open file names none
            error.filename = str(path)
        if error is e:
            raise
        raise error from None


def steps(run_dir: str | Path) -> list[int]:
    """Steps of the complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _MAIN.match(p.name)))


def _files(folder: Path, step: int) -> list[Path]:
    """The files of the checkpoint of `step` (main and rank shares); not the ones set aside."""
    pattern = re.compile(rf"^step-{step:09d}(\.rank\d+)?\.pt$")
    return [p for p in folder.iterdir() if pattern.match(p.name)]


def save(
    run_dir: str | Path,
    step: int,
    state: dict[str, Any],
    rank: int = 0,
    keep: int = 2,
    barrier=lambda: None,
    series: frozenset[int] = frozenset(),
) -> None:
    """Write this rank's part of the checkpoint of `step`; rank 0 writes last, then old ones go
    (all but the newest `keep` and those at the steps of `series`)."""
    folder = Path(run_dir) / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    if rank != 0:
        _atomic_save({k: state[k] for k in RANK_KEYS if k in state}, _path(run_dir, step, rank))
    barrier()  # every rank's share is on disk before the main file says the checkpoint exists
    if rank == 0:
        _atomic_save(state, _path(run_dir, step, 0))
        _keep_newest(run_dir, keep, series)  # run folders are on a file system every rank sees
    barrier()


def _keep_newest(run_dir: str | Path, keep: int, series: frozenset[int] = frozenset()) -> None:
    """Remove all but the newest `keep` checkpoints and those of `series` (main files and rank shares)."""
    folder = Path(run_dir) / CHECKPOINTS
    for old in steps(run_dir)[:-keep]:
        if old not in series:
            for f in _files(folder, old):
                f.unlink(missing_ok=True)


def finished(run_dir: str | Path, keep: int, series: frozenset[int] = frozenset()) -> None:
    """A run finished (done.json written): drop the fallback of its newest checkpoint, keeping the
    newest `max(1, keep - 1)` and the `series`. At 1.5B parameters a checkpoint is about 13 GB."""
    _keep_newest(run_dir, max(1, keep - 1), series)


def _read(run_dir: Path, step: int, rank: int) -> tuple[dict | None, tuple | None]:
    """(state, None), or (None, (unreadable file, why, whether this rank owns that file)), on the CPU."""
    main = _path(run_dir, step, 0)
    try:
        state = torch.load(main, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused, truncated file, I/O error, ...
        return None, (main, gist(e), rank == 0)
    if not isinstance(state, dict) or state.get("step") != step or not isinstance(state.get("model"), dict):
        return None, (main, f"not a rankscope checkpoint of step {step}", rank == 0)
    if rank != 0:
        state.pop("optim", None)  # rank 0's share of Muon's state: freed before this rank's own is read
        share = _path(run_dir, step, rank)
        try:
            own = torch.load(share, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise RankscopeError(
                f"checkpoint {main} is missing its share for rank {rank} ({share}); "
                f"resume with the same number of processes"
            ) from None
        except Exception as e:
            return None, (share, gist(e), True)
        if not isinstance(own, dict) or "optim" not in own:
            return None, (share, f"not a rankscope checkpoint share of step {step}", True)
        state.update({k: own[k] for k in RANK_KEYS if k in own})  # older shares hold "optim" only
    return state, None


def _set_aside(path: Path) -> Path:
    """Rename `path` to `<name>.corrupt` (or `.corrupt-2`, ... if taken) and return the new name."""
    target = path.with_name(path.name + ".corrupt")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{n}")
    path.rename(target)
    return target


def _warn(message: str) -> None:
    print(f"rankscope: warning: {message}", file=sys.stderr, flush=True)


def load(
    run_dir: str | Path,
    rank: int = 0,
    *,
    agree: Callable[[bool], bool] | None = None,
    set_aside: bool = False,
    warn: Callable[[str], None] = _warn,
    fit: Callable[[dict[str, Any]], str | None] | None = None,
) -> dict[str, Any] | None:
    """The newest usable checkpoint as seen by `rank` (rank 0's file, with this rank's optimizer
    share swapped in), on the CPU, or None when the run has none.

    An unreadable checkpoint (or one `fit` refuses) is skipped for the one before it, with a warning
    naming the file.
    `set_aside` (when resuming) also renames unreadable files to `*.corrupt` and removes temporary
    files left by a write that was killed. Under torchrun pass `agree(ok) -> ok on every rank`, so
    that all ranks settle on the same checkpoint. `fit(state)` (when resuming: `misfit` against the
    run) says why a checkpoint that reads cannot be used, or None: it is skipped and set aside as an
    unreadable one is; a RankscopeError it raises (another format or other settings) stops the load,
    naming the checkpoint."""
    run_dir = Path(run_dir)
    found = steps(run_dir)
    if set_aside and rank == 0 and found:
        # a write killed mid-way leaves its hidden temporary file (as large as a checkpoint); nothing
        # else writes here while a run resumes
        for tmp in (run_dir / CHECKPOINTS).iterdir():
            if tmp.name.startswith(".step-") and fsio.TEMP_NAME.match(tmp.name):
                tmp.unlink(missing_ok=True)
    bad: list[tuple[Path, str, bool, str]] = []  # (file, why, whether this rank owns it, what is wrong)
    state = None
    for step in reversed(found):
        state, failure = _read(run_dir, step, rank)
        if failure is not None:
            failure = (*failure, "is unreadable")
        elif fit is not None:
            try:
                why = fit(state)
            except RankscopeError as e:
                raise RankscopeError(f"checkpoint {_path(run_dir, step, 0)}: {e}") from None
            if why is not None:  # this rank's file: rank 0's main file, another rank's own share
                failure = (_path(run_dir, step, rank), why, True, "does not fit this run")
        ok = agree(failure is None) if agree is not None else failure is None
        if failure is not None:
            bad.append(failure)
        if ok:
            break
        state = None
    if not found:
        return None
    if state is None:
        what = f"read checkpoint {_path(run_dir, found[-1], 0)} on another process"
        if bad:
            path, why, _, wrong = bad[0]
            what = f"{'read' if wrong == 'is unreadable' else 'use'} checkpoint {path} ({why})"
        older = f", nor any of the {len(found) - 1} older one(s)" if len(found) > 1 else ""
        raise RankscopeError(f"cannot {what}{older}; to start the run over, remove the run folder {run_dir}")
    for path, why, owned, wrong in bad:
        if not owned:  # rank 0 reports and moves the main file; each rank its own share
            continue
        if set_aside:
            try:
                moved = f"moved it to {_set_aside(path).name}"
            except OSError as e:
                moved = f"could not move it aside ({gist(e)})"
            warn(f"checkpoint {path} {wrong} ({why}); {moved}; resuming from step {state['step']}")
        else:
            warn(f"checkpoint {path} {wrong} ({why}); using the one of step {state['step']}")
    return state
