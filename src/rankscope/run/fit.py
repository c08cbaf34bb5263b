"""Whether a checkpoint that reads fits the run that resumes it, found before anything is loaded.

A checkpoint that reads but does not fit is one of three things. Written by a rankscope whose
format this one cannot read, or with other settings that fix its shapes (`SHAPE_SETTINGS`, the
process count): every checkpoint of the run shares that, so the resume stops with one line naming
what differs and the ways out. Damaged in structure (an entry missing, extra, renamed, of another
type, shape or dtype; an RNG state that does not restore): `misfit` finds it before anything is
loaded into the model or optimizer, and `checkpoint.load` skips it and sets it aside like an
unreadable file. Holding NaN or infinite weights: the run diverged (`non_finite`; the resume stops
it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import RankscopeError
from .checkpoint import FORMAT, READABLE, gist

# The settings that fix the shapes of what a checkpoint holds: the model's tensors (qk_norm: which
# gains train), and which parameters each optimizer and each Muon block holds (muon_ns: with separate
# matrices newton_schulz is torch's Muon, another optimizer). The process count fixes each rank's share.
SHAPE_SETTINGS = (
    *("model.vocab_size", "model.n_layer", "model.d_model", "model.n_head", "model.n_kv_head", "model.head_dim"),
    *("model.d_mlp", "model.qk_norm", "optim.name", "optim.muon_qkvo", "optim.muon_head_group", "optim.muon_ns"),
)
# A checkpoint's top-level entries (what `resume.save` writes): in every format, from the format that
# added them, and optional ("last_eval": none before the first evaluation or in older checkpoints;
# "rng_cuda": a CUDA run's)
_ENTRIES = {"format", "step", "tokens", "model", "optim", "rng_cpu", "loss_sum", "norm_sum", "timers", "world_size"}
_ADDED = {"settings": 2}
_OPTIONAL = {"last_eval", "rng_cuda"}


def shape_settings(cfg: Any) -> dict[str, Any]:
    """The settings of run config `cfg` that fix its checkpoints' shapes, by dotted name."""
    out = {}
    for name in SHAPE_SETTINGS:
        section, key = name.split(".")
        out[name] = getattr(getattr(cfg, section), key)
    return out


@dataclass
class Target:
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


def misfit(state: dict[str, Any], run: Target) -> str | None:
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
        return f"{where} does not restore ({gist(e)})"
    finally:
        put(before)
    return None
