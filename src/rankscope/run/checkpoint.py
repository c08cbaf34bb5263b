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
default of 2, the final checkpoint alone; a series kept for `rankscope analyze --series` with a
larger `train.keep_checkpoints` stays).

A checkpoint that cannot be read (truncated by a full disk or a crashed file system, corrupted,
refused) is skipped for the previous one with a warning; when resuming it is also renamed to
`<name>.corrupt`, so it is not tried again and nothing is deleted. Only when no checkpoint can be
read is that an error.

A checkpoint that reads but does not fit the run resuming it is one of three things. Written by
a rankscope whose format this one cannot read, or with other settings that fix its shapes
(`SHAPE_SETTINGS`, the process count): every checkpoint of the run shares that, so the resume stops
with one line naming what differs and the ways out. Damaged in structure (an entry missing, extra,
renamed, of another type, shape or dtype; an RNG state that does not restore): `misfit` finds it
before anything is loaded into the model or optimizer, and it is skipped and set aside like an
unreadable file. Holding NaN or infinite weights: the run diverged (`non_finite`; train stops it).
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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

# The layout of a checkpoint's contents. 2 adds "settings" (`shape_settings`). A checkpoint of
# format 1 is still read: its process count is compared, and every tensor is checked as in any.
FORMAT = 2
READABLE = (1, 2)
# The settings that fix the shapes of what a checkpoint holds: the model's tensors (qk_norm: which
# gains train), and which parameters each optimizer and each Muon block holds (muon_ns: with separate
# matrices newton_schulz is torch's Muon, another optimizer). The process count fixes each rank's share.
SHAPE_SETTINGS = (
    *("model.vocab_size", "model.n_layer", "model.d_model", "model.n_head", "model.n_kv_head", "model.head_dim"),
    *("model.d_mlp", "model.qk_norm", "optim.name", "optim.muon_qkvo", "optim.muon_head_group", "optim.muon_ns"),
)
# A checkpoint's top-level entries: in every format, from the format that added them, and optional
# ("last_eval": none before the first evaluation or in older checkpoints; "rng_cuda": a CUDA run's)
_ENTRIES = {"format", "step", "tokens", "model", "optim", "rng_cpu", "loss_sum", "norm_sum", "timers", "world_size"}
_ADDED = {"settings": 2}
_OPTIONAL = {"last_eval", "rng_cuda"}


def _path(run_dir: Path, step: int, rank: int) -> Path:
    name = f"step-{step:09d}.pt" if rank == 0 else f"step-{step:09d}.rank{rank}.pt"
    return Path(run_dir) / CHECKPOINTS / name


def _first_line(e: BaseException) -> str:
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
    run_dir: str | Path, step: int, state: dict[str, Any], rank: int = 0, keep: int = 2, barrier=lambda: None
) -> None:
    """Write this rank's part of the checkpoint of `step`; rank 0 writes last, then old ones go."""
    folder = Path(run_dir) / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    if rank != 0:
        _atomic_save({k: state[k] for k in RANK_KEYS if k in state}, _path(run_dir, step, rank))
    barrier()  # every rank's share is on disk before the main file says the checkpoint exists
    if rank == 0:
        _atomic_save(state, _path(run_dir, step, 0))
        _keep_newest(run_dir, keep)  # run folders are on a file system every rank sees
    barrier()


def _keep_newest(run_dir: str | Path, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints (their main files and rank shares)."""
    folder = Path(run_dir) / CHECKPOINTS
    for old in steps(run_dir)[:-keep]:
        for f in _files(folder, old):
            f.unlink(missing_ok=True)


def finished(run_dir: str | Path, keep: int) -> None:
    """A run finished (done.json written): drop the fallback of its newest checkpoint, keeping the
    newest `max(1, keep - 1)`. At 1.5B parameters a checkpoint is about 13 GB."""
    _keep_newest(run_dir, max(1, keep - 1))


def _read(run_dir: Path, step: int, rank: int) -> tuple[dict | None, tuple | None]:
    """(state, None), or (None, (unreadable file, why, whether this rank owns that file)), on the CPU."""
    main = _path(run_dir, step, 0)
    try:
        state = torch.load(main, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused, truncated file, I/O error, ...
        return None, (main, _first_line(e), rank == 0)
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
            return None, (share, _first_line(e), True)
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
                moved = f"could not move it aside ({_first_line(e)})"
            warn(f"checkpoint {path} {wrong} ({why}); {moved}; resuming from step {state['step']}")
        else:
            warn(f"checkpoint {path} {wrong} ({why}); using the one of step {state['step']}")
    return state


# --- whether a checkpoint that reads fits the run that resumes it -------------------------------


def shape_settings(cfg: Any) -> dict[str, Any]:
    """The settings of run config `cfg` that fix its checkpoints' shapes, by dotted name."""
    out = {}
    for name in SHAPE_SETTINGS:
        section, key = name.split(".")
        out[name] = getattr(getattr(cfg, section), key)
    return out


@dataclass
class Run:
    """What a checkpoint must match to resume a run: its shape settings and process count, its
    model's tensors (`state_dict()`), its optimizers (`rankscope.core.optim.Optimizers`), its loss sums
    and timers, and the device whose RNG a CUDA run restores."""

    settings: dict[str, Any]
    world_size: int
    model: Mapping[str, torch.Tensor]
    optim: Any
    sums: dict[str, torch.Tensor]
    timers: dict[str, Any]
    device: torch.device


def misfit(state: dict[str, Any], run: Run) -> str | None:
    """Why `state` (as `load` read it) cannot resume `run`, or None when it can, found before
    anything is loaded: loading it must neither fail half-way nor leave an optimizer that fails at
    its first step. Damage is returned as a reason (the checkpoint is set aside for the one before);
    a format this rankscope cannot read, or other shape settings, raise RankscopeError, as every
    checkpoint of the run shares them."""
    fmt = state.get("format")
    if type(fmt) is not int:
        return f"format is {_show(fmt)}, not a number"
    if fmt not in READABLE:
        by = "a newer" if fmt > FORMAT else "an older"
        raise RankscopeError(
            f"format {fmt} was written by {by} rankscope, and this one reads formats {READABLE[0]}-{READABLE[-1]}; "
            f"resume it with that version, or start afresh with a new --out"
        )
    entries = _ENTRIES | {k for k, since in _ADDED.items() if fmt >= since}
    if why := _keys_misfit(state, dict.fromkeys(sorted(entries | _OPTIONAL)), "the checkpoint", optional=_OPTIONAL):
        return why
    for key in ("step", "tokens", "world_size"):
        if type(state[key]) is not int:
            return f"{key} is {_show(state[key])}, not an integer"

    # settings first: another run's tensors would only look damaged
    saved = {"world_size": state["world_size"]}
    if fmt >= 2:
        if why := _plain_misfit(state["settings"], run.settings, "settings"):
            return why
        saved.update(state["settings"])
    now = {**run.settings, "world_size": run.world_size}
    if differ := [k for k in now if k in saved and saved[k] != now[k]]:
        raise RankscopeError(
            "written with other settings: "
            + ", ".join(f"{k}={saved[k]!r} (this run: {now[k]!r})" for k in differ)
            + "; to resume it, rerun with those settings, or start afresh with a new --out"
        )

    if why := _tensors_misfit(state["model"], run.model, "model") or _optim_misfit(state["optim"], run.optim):
        return why
    if why := _tensors_misfit({k: state[k] for k in run.sums}, run.sums, ""):
        return why
    if why := _plain_misfit(state["timers"], run.timers, "timers"):
        return why
    last = state.get("last_eval")
    if last is not None and not (
        isinstance(last, dict) and all(v is None or type(v) in (int, float) for v in last.values())
    ):
        return f"last_eval is {_show(last)}"
    if why := _rng_misfit(state["rng_cpu"], torch.get_rng_state, torch.set_rng_state, "rng_cpu"):
        return why
    if "rng_cuda" in state:  # restored by a CUDA run only; a CPU run ignores it
        device = run.device
        get = (lambda: torch.cuda.get_rng_state(device)) if device.type == "cuda" else None
        put = (lambda s: torch.cuda.set_rng_state(s, device)) if device.type == "cuda" else None
        if why := _rng_misfit(state["rng_cuda"], get, put, "rng_cuda"):
            return why
    return None


def non_finite(state: dict[str, Any]) -> list[str]:
    """The model tensors and loss sums of a checkpoint that hold NaN or infinity: a diverged run."""
    named = {**{f"model.{k}": v for k, v in state["model"].items()}, **{k: state[k] for k in ("loss_sum", "norm_sum")}}
    return [k for k, v in named.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _tensor_kind(dtype: torch.dtype, shape: tuple | torch.Size) -> str:
    return _a(f"{str(dtype).removeprefix('torch.')} tensor of shape {tuple(shape)}")


def _show(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return _tensor_kind(value.dtype, value.shape)
    text = repr(value)
    return text if len(text) <= 40 else _a(type(value).__name__)


def _keys_misfit(saved: Any, live: Mapping, where: str, optional: Any = ()) -> str | None:
    if not isinstance(saved, dict):
        return f"{where} is {_show(saved)}, not a dict"
    if missing := [k for k in live if k not in saved and k not in optional]:
        return f"{where} lacks {', '.join(map(repr, missing[:3]))}" + (" and more" if len(missing) > 3 else "")
    if extra := [k for k in saved if k not in live]:
        return f"{where} has an unexpected {_show(extra[0])}"
    return None


def _tensors_misfit(saved: Any, live: Mapping[str, torch.Tensor], where: str) -> str | None:
    """The same names, each a tensor of the live one's shape and dtype."""
    if why := _keys_misfit(saved, live, where):
        return why
    for k, t in live.items():
        if why := _tensor_misfit(saved[k], t.shape, t.dtype, f"{where}.{k}" if where else k):
            return why
    return None


def _tensor_misfit(value: Any, shape: tuple | torch.Size, dtype: torch.dtype, where: str) -> str | None:
    if isinstance(value, torch.Tensor) and value.shape == shape and value.dtype == dtype:
        return None
    return f"{where} is {_show(value)}, not {_tensor_kind(dtype, shape)}"


def _plain_misfit(saved: Any, live: Any, where: str) -> str | None:
    """Plain data (numbers, strings, flags, lists, dicts) of this run's types and lengths all the
    way down. A flag torch leaves None ("decide later", e.g. `fused`) matches a bool: a checkpoint
    of a CUDA run resumes on a CPU."""
    if isinstance(live, dict):
        if why := _keys_misfit(saved, live, where):
            return why
        pairs = [(saved[k], v, f"{where}.{k}") for k, v in live.items()]
    elif isinstance(live, (list, tuple)):
        if type(saved) is not type(live) or len(saved) != len(live):
            return f"{where} is {_show(saved)}, not {_a(type(live).__name__)} of {len(live)}"
        pairs = [(s, v, f"{where}[{i}]") for i, (s, v) in enumerate(zip(saved, live))]
    elif type(saved) is type(live) or {type(saved), type(live)} <= {bool, type(None)}:
        return None
    else:
        return f"{where} is {_show(saved)}, not {_a(type(live).__name__)}"
    return next((why for s, v, w in pairs if (why := _plain_misfit(s, v, w))), None)


def _optim_misfit(saved: Any, opt: Any) -> str | None:
    """Each optimizer's parameter groups as this run's, and a state its step can use: torch's
    load_state_dict checks the groups' sizes only, so a momentum of another shape or a group
    without its learning rate would fail at the first step, after the weights were loaded."""
    live = opt.state_dict()
    if why := _keys_misfit(saved, live, "optim"):
        return why
    if type(saved["world_size"]) is not int or saved["world_size"] != live["world_size"]:
        return f"optim.world_size is {_show(saved['world_size'])}, not {live['world_size']}"
    if not isinstance(saved["optimizers"], list) or len(saved["optimizers"]) != len(opt.optimizers):
        return f"optim.optimizers is {_show(saved['optimizers'])}, not a list of {len(opt.optimizers)}"
    for i, (o, mine, theirs) in enumerate(zip(opt.optimizers, live["optimizers"], saved["optimizers"])):
        where = f"optim.optimizers[{i}]"
        params = [p for group in o.param_groups for p in group["params"]]  # as torch numbers them
        why = (
            _keys_misfit(theirs, mine, where)
            or _groups_misfit(theirs["param_groups"], mine["param_groups"], _filled_in(o), f"{where}.param_groups")
            or _state_misfit(theirs["state"], params, f"{where}.state")
        )
        if why:
            return why
    return None


def _groups_misfit(saved: Any, live: list[dict], filled: set[str], where: str) -> str | None:
    if not isinstance(saved, list) or len(saved) != len(live):
        return f"{where} is {_show(saved)}, not a list of {len(live)}"
    for j, (theirs, mine) in enumerate(zip(saved, live)):
        w = f"{where}[{j}]"
        why = _keys_misfit(theirs, mine, w, optional=filled) or next(
            (x for k in theirs if (x := _plain_misfit(theirs[k], mine[k], f"{w}.{k}"))), None
        )
        if why:
            return why
        if theirs["params"] != mine["params"]:
            return f"{w}.params is {_show(theirs['params'])}, not {_show(mine['params'])}"
    return None


def _state_misfit(saved: Any, params: list[torch.Tensor], where: str) -> str | None:
    """An optimizer's state: none before its first step, then an entry for each of its parameters
    (each has a gradient at every step), all alike: the same names, each a tensor of its
    parameter's shape and dtype or a 0-dim one (AdamW's step) of one dtype. What most entries hold
    is the pattern, so a message names the damaged entry, not its neighbours."""
    if not isinstance(saved, dict):
        return f"{where} is {_show(saved)}, not a dict"
    if saved and len(saved) != len(params):
        return f"{where} holds {len(saved)} parameters' state, not {len(params)}"
    entries = [e for e in saved.values() if isinstance(e, dict)]
    usual = Counter(map(_state_signature, entries)).most_common(1)
    pattern = next(e for e in entries if _state_signature(e) == usual[0][0]) if entries else {}
    for i, entry in saved.items():
        w = f"{where}[{i!r}]"
        if type(i) is not int or not 0 <= i < len(params):
            return f"{where} has an unexpected {_show(i)}"
        if why := _keys_misfit(entry, pattern, w):
            return why
        for k, value in entry.items():
            scalar = isinstance(pattern[k], torch.Tensor) and pattern[k].ndim == 0
            shape, dtype = ((), pattern[k].dtype) if scalar else (params[i].shape, params[i].dtype)
            if why := _tensor_misfit(value, shape, dtype, f"{w}.{k}"):
                return why
    return None


def _state_signature(entry: dict) -> tuple:
    """The names of an optimizer state entry, each with its dtype when it is a 0-dim tensor."""
    return tuple((k, v.dtype if isinstance(v, torch.Tensor) and v.ndim == 0 else None) for k, v in entry.items())


def _filled_in(opt: torch.optim.Optimizer) -> set[str]:
    """The parameter-group entries `opt`'s own loading fills in where a checkpoint lacks them
    (flags torch added over versions, such as AdamW's decoupled_weight_decay): asked of the
    optimizer's __setstate__ on an empty shell, so a checkpoint of an older torch still resumes."""
    shell = object.__new__(type(opt))
    try:
        type(opt).__setstate__(shell, {"state": {}, "param_groups": [{"params": []}], "defaults": {}})
    except Exception:  # an optimizer that fills in nothing, or needs more than an empty group
        return set()
    return set(shell.param_groups[0]) - {"params"}


def _rng_misfit(saved: Any, get: Callable | None, put: Callable | None, where: str) -> str | None:
    """A generator state restores when the generator takes it; tried, then the state before put back."""
    if not isinstance(saved, torch.Tensor) or saved.dtype != torch.uint8:
        return f"{where} is {_show(saved)}, not a uint8 tensor"
    if get is None or put is None:
        return None
    before = get()
    try:
        put(saved)
    except Exception as e:  # torch's RuntimeError/TypeError for a state of another size or kind
        return f"{where} does not restore ({_first_line(e)})"
    finally:
        put(before)
    return None
