"""Checkpoints that read but do not fit the run resuming them (issue 24): damaged in structure (an
entry missing, extra, renamed, of another type, shape or dtype; an RNG state that does not restore)
they are set aside for the one before, and the run goes on bitwise as if never stopped, or stops
with one line (exit 2) when none is left; written with other settings or by a rankscope of another
format, the resume stops with one line saying what differs; NaN weights mark the run diverged.

Every test starts from a copy of one run killed after the rows of step 12, holding the checkpoints
of steps 5 and 10, and compares with an uninterrupted run (the helpers in _runs.py)."""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from _runs import SETTINGS, Killed, assert_same_run, config, kill_after_row, shards
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rankscope.errors import RankscopeError
from rankscope.run import checkpoint
from rankscope.run.train import RunDiverged, train
from rankscope.storage import store

NEWEST, OLDER = "step-000000010.pt", "step-000000005.pt"


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Path:
    """A run killed after writing the rows of step 12, with checkpoints at steps 5 and 10 (its data
    folder beside it)."""
    tmp = tmp_path_factory.mktemp("killed")
    with pytest.MonkeyPatch.context() as m:
        kill_after_row(m, 12)
        with pytest.raises(Killed):
            train(config(shards(tmp)), tmp / "run", progress=False, arm="a")
    assert checkpoint.steps(tmp / "run") == [5, 10]
    return tmp / "run"


def copy_of(killed: Path, where: Path) -> Path:
    """A copy of the killed run, and of its data beside it."""
    shutil.copytree(killed.parent, where / "copy")
    return where / "copy" / "run"


def rewrite(run: Path, name: str, change) -> None:
    """Load checkpoint `name` of `run`, apply `change(state)` and save it back."""
    path = run / store.CHECKPOINTS / name
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def resume(run: Path, **settings) -> None:
    train(config(run.parent / "shards", **settings), run, progress=False, arm="a")


def delete(key):
    return lambda state: state.pop(key)


def wrong_shape(state):
    w = state["model"]["blocks.0.mlp.up.weight"]
    state["model"]["blocks.0.mlp.up.weight"] = w.T.contiguous()


def no_model(state):  # the model's entry holds no tensors (a missing "model" entry was refused before)
    state["model"] = {}


def short_rng(state):
    state["rng_cpu"] = state["rng_cpu"][:100]


def adam_without_step(state):  # one parameter's AdamW state lacks its step count
    del state["optim"]["optimizers"][1]["state"][3]["step"]


def muon_group_without_lr(state):  # torch loads it; the first Muon step would fail
    del state["optim"]["optimizers"][0]["param_groups"][0]["initial_lr"]


DAMAGE = {
    "wrong shapes": wrong_shape,
    "missing model": no_model,
    "missing optimizer": delete("optim"),
    "bad RNG": short_rng,
    "missing timers": delete("timers"),
    "missing AdamW step": adam_without_step,
    "Muon group without its lr": muon_group_without_lr,
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_checkpoint_damaged_in_structure_is_set_aside_and_the_run_resumes_bitwise(
    tmp_path, killed, whole, capsys, case
):
    run = copy_of(killed, tmp_path)
    rewrite(run, NEWEST, DAMAGE[case])
    capsys.readouterr()
    resume(run)  # from step 5
    err = capsys.readouterr().err
    newest = run / store.CHECKPOINTS / NEWEST
    assert err.count("\n") == 1 and err.startswith(f"rankscope: warning: checkpoint {newest} does not fit this run (")
    assert f"moved it to {NEWEST}.corrupt; resuming from step 5" in err
    assert (run / store.CHECKPOINTS / f"{NEWEST}.corrupt").exists()  # kept, not deleted
    assert_same_run(run, whole)


def test_no_checkpoint_that_fits_stops_with_one_line(tmp_path, killed):
    run = copy_of(killed, tmp_path)
    rewrite(run, NEWEST, delete("timers"))
    rewrite(run, OLDER, wrong_shape)
    with pytest.raises(RankscopeError) as e:
        resume(run)
    text = str(e.value)
    assert e.value.exit_code == 2 and "\n" not in text and type(e.value) is RankscopeError
    assert text.startswith(f"cannot use checkpoint {run / store.CHECKPOINTS / NEWEST} (the checkpoint lacks 'timers')")
    assert ", nor any of the 1 older one(s); to start the run over, remove the run folder" in text
    assert checkpoint.steps(run) == [5, 10]  # nothing set aside when nothing could replace it


def test_a_changed_setting_stops_naming_it_and_the_ways_out(tmp_path, killed):
    run = copy_of(killed, tmp_path)
    before = sorted(p.name for p in (run / store.CHECKPOINTS).iterdir()), (run / "scalars.csv").read_bytes()
    with pytest.raises(RankscopeError) as e:
        resume(run, **{"model.d_model": 96, "optim.muon_qkvo": "separate"})
    text = str(e.value)
    assert e.value.exit_code == 2 and "\n" not in text
    assert text.startswith(f"checkpoint {run / store.CHECKPOINTS / NEWEST}: written with other settings: ")
    assert "model.d_model=64 (this run: 96)" in text and "optim.muon_qkvo='stacked' (this run: 'separate')" in text
    assert "rerun with those settings, or start afresh with a new --out" in text
    assert "model.n_layer" not in text  # only the settings that differ
    after = sorted(p.name for p in (run / store.CHECKPOINTS).iterdir()), (run / "scalars.csv").read_bytes()
    assert after == before  # nothing set aside, no rows dropped


def as_format_1(state):
    """A checkpoint as format 1 wrote it: the same entries, without the settings."""
    del state["settings"]
    state["format"] = 1


def test_a_checkpoint_of_format_1_resumes_bitwise(tmp_path, killed, whole, capsys):
    assert checkpoint.FORMAT == 2 and 1 in checkpoint.READABLE
    run = copy_of(killed, tmp_path)
    for name in (OLDER, NEWEST):
        rewrite(run, name, as_format_1)
    capsys.readouterr()
    resume(run)  # from step 10
    assert capsys.readouterr().err == ""
    assert_same_run(run, whole)
    # format 1 carried no settings, but its process count is compared all the same
    run = copy_of(killed, tmp_path / "other")
    rewrite(run, NEWEST, lambda s: (as_format_1(s), s.update(world_size=2)))
    with pytest.raises(RankscopeError, match=r"written with other settings: world_size=2 \(this run: 1\)"):
        resume(run)


@pytest.mark.parametrize("fmt", [3, 0])
def test_a_format_this_version_cannot_read_stops_with_one_line(tmp_path, killed, fmt):
    run = copy_of(killed, tmp_path)
    rewrite(run, NEWEST, lambda s: s.update(format=fmt))
    with pytest.raises(RankscopeError) as e:
        resume(run)
    text = str(e.value)
    assert e.value.exit_code == 2 and "\n" not in text
    by = "a newer" if fmt == 3 else "an older"
    assert f"{NEWEST}: format {fmt} was written by {by} rankscope, and this one reads formats 1-2" in text
    assert checkpoint.steps(run) == [5, 10]


def test_nan_weights_in_a_checkpoint_mark_the_run_diverged_at_its_step(tmp_path, capsys):
    """Through the command line: done.json says "diverged" at the checkpoint's step (1,280 tokens),
    instead of training on from NaN weights."""
    from rankscope.cli import main

    data = shards(tmp_path)
    study = tmp_path / "s.toml"
    sets = "\n".join(f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in SETTINGS.items())
    study.write_text(f"[settings]\n{sets}\n\n[arms.a]\n")
    argv = ["run", str(study), "--data", str(data), "--out", str(tmp_path / "o"), "--no-progress", "--no-report"]
    with pytest.MonkeyPatch.context() as m:
        kill_after_row(m, 12)
        with pytest.raises(Killed):
            main(argv)
    run = tmp_path / "o" / "a" / "seed-0"

    def poison(state):
        state["model"]["blocks.1.attn.k_proj.weight"][3, 5] = float("nan")

    rewrite(run, NEWEST, poison)
    rows = (run / "scalars.csv").read_bytes()
    capsys.readouterr()
    assert main(argv) == 1
    done = store.read_json(run / store.DONE)
    assert done["status"] == "diverged"
    assert "diverged at 1,280 tokens: its checkpoint of step 10 holds NaN or infinite values" in done["message"]
    assert "model.blocks.1.attn.k_proj.weight" in done["message"]
    assert "1 run(s) diverged: a seed 0" in capsys.readouterr().err
    assert (run / "scalars.csv").read_bytes() == rows and checkpoint.steps(run) == [5, 10]  # nothing trained on


# --- random structural damage ----------------------------------------------------------------------


def entries(obj, path=()) -> list[tuple]:
    """The path of every entry of nested dicts, lists and tuples (tensors are leaves)."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return []
    return [p for k, v in items for p in [(*path, k), *entries(v, (*path, k))]]


def retyped(value) -> list:
    """Values of another type standing for `value`."""
    if isinstance(value, torch.Tensor):
        dtypes = (torch.float64, torch.int64, torch.bfloat16, torch.float32, torch.uint8)
        return [value.to(d) for d in dtypes if d != value.dtype] + ["not a tensor"]
    if isinstance(value, bool):
        return [int(value), str(value)]
    if isinstance(value, int):
        return [float(value), str(value)]
    if isinstance(value, float):
        return [int(value), str(value)]
    if isinstance(value, (list, tuple)):
        return [tuple(value) if isinstance(value, list) else list(value), len(value)]
    if isinstance(value, dict):
        return [list(value.items()), None]
    return [0, None] if isinstance(value, str) else [0, "x"]


def damaged(parent, key, how: str, pick: int):
    """`parent` (a dict, list or tuple) with its entry `key` dropped, renamed, reshaped or retyped."""
    value = parent[key]
    if isinstance(parent, tuple):
        items = list(parent)
        return tuple(damaged(items, key, how, pick))
    if how == "drop" or (how == "rename" and isinstance(parent, list)):
        del parent[key]
    elif how == "rename":
        del parent[key]
        parent[f"{key}_renamed" if isinstance(key, str) else key + 1000] = value
    elif how == "reshape" and isinstance(value, torch.Tensor):  # always to another shape
        parent[key] = value.reshape(-1)[:-1] if pick % 2 and value.numel() > 1 else value.unsqueeze(0)
    else:
        options = retyped(value)
        parent[key] = options[pick % len(options)]
    return parent


def damage(state, path: tuple, how: str, pick: int) -> None:
    parents = [state]
    for k in path[:-1]:
        parents.append(parents[-1][k])
    new = damaged(parents[-1], path[-1], how, pick)
    if new is not parents[-1]:  # a tuple was rebuilt: put it back in its own parent
        parents[-2][path[-2]] = new


@pytest.fixture(scope="module")
def paths(killed) -> list[tuple]:
    return entries(torch.load(killed / store.CHECKPOINTS / NEWEST, weights_only=True))


FUZZ = settings(
    max_examples=20,  # about 0.4 s each: a copy of the run and a resume
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(data=st.data(), both=st.booleans())
def test_random_structural_damage_resumes_bitwise_or_stops_with_one_line(killed, whole, paths, data, both):
    names = [NEWEST, OLDER] if both else [NEWEST]
    with tempfile.TemporaryDirectory() as tmp:
        run = copy_of(killed, Path(tmp))
        for name in names:
            path = data.draw(st.sampled_from(paths), label=f"entry of {name}")
            how = data.draw(st.sampled_from(["drop", "rename", "reshape", "retype"]), label="damage")
            pick = data.draw(st.integers(0, 7), label="variant")
            rewrite(run, name, lambda state, at=(path, how, pick): damage(state, *at))
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                resume(run)
        except RankscopeError as e:
            assert e.exit_code == 2 and "\n" not in str(e) and not isinstance(e, RunDiverged), str(e)
            assert not store.is_done(run)
        else:
            assert_same_run(run, whole)
            lines = err.getvalue().splitlines()
            assert all(line.startswith("rankscope: warning: checkpoint ") for line in lines), lines
