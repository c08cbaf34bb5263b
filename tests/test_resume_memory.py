"""What a resume and a finished run leave behind: the checkpoint read on resume does not outlive the
resume (no second copy of the weights through the loop), a rank reads rank 0's optimizer share into
no memory of its own, and a finished run keeps its final checkpoint without the fallback before it."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from _runs import Killed, assert_same_run, config, final_values, kill_after_row, shards

import rankscope.run.train as rtrain
from rankscope.run import checkpoint
from rankscope.run.train import train
from rankscope.storage import store


def tensors(obj) -> list[torch.Tensor]:
    """Every tensor in nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors(v)]
    return []


def recording_load(monkeypatch) -> list[dict]:
    """Patch torch.load to keep, for each call, its map_location, weak references to the tensors it
    returned, by top-level key ("model", "optim", ...), and how many optimizer tensors of the
    calls before were still alive when it began."""
    load, calls = torch.load, []

    def recorded(*args, **kwargs):
        gc.collect()
        before = sum(len(alive(c["refs"].get("optim", []))) for c in calls)
        obj = load(*args, **kwargs)
        refs = {k: [weakref.ref(t) for t in tensors(v)] for k, v in obj.items()} if isinstance(obj, dict) else {}
        calls.append({"map_location": kwargs.get("map_location"), "refs": refs, "optim_alive_before": before})
        return obj

    monkeypatch.setattr(torch, "load", recorded)
    return calls


def alive(refs: list[weakref.ref]) -> list[torch.Tensor]:
    return [t for r in refs if (t := r()) is not None]


def test_resume_frees_the_checkpoint_before_training(tmp_path, whole, monkeypatch):
    run, cfg = tmp_path / "run", config(shards(tmp_path))
    with monkeypatch.context() as m:
        kill_after_row(m, 6)  # after the checkpoint of step 5
        with pytest.raises(Killed):
            train(cfg, run, progress=False, arm="a")
    assert checkpoint.steps(run) == [5]

    loads = recording_load(monkeypatch)
    seen = []
    step = rtrain.optimizer_step

    def first_step_checks(model, opt, grad_clip):
        if not seen:  # the first optimizer step after the resume: the loop is running
            gc.collect()
            (main,) = loads
            assert main["map_location"] == "cpu"  # read to the CPU whatever the device
            refs = main["refs"]
            assert len(refs["model"]) == len(model.state_dict()) > 0
            # the weights were copied into the model's own tensors; nothing else of them is left
            leftover = [k for k, rs in refs.items() if k != "optim" and alive(rs)]
            assert not leftover, f"still referenced after resuming: {leftover}"
            # the optimizer state alone lives on, and only as the optimizer's own state (on a GPU the
            # optimizer copies it next to its parameters, and nothing of the checkpoint is left)
            owned = {id(v) for o in opt.optimizers for s in o.state.values() for v in s.values()}
            assert all(id(t) in owned for t in alive(refs["optim"]))
            seen.append(True)
        return step(model, opt, grad_clip)

    monkeypatch.setattr(rtrain, "optimizer_step", first_step_checks)
    train(cfg, run, progress=False, arm="a")
    assert seen
    monkeypatch.undo()
    assert_same_run(run, whole)  # and resuming still reproduces the run bit for bit


def test_a_rank_keeps_its_own_optimizer_share_only(tmp_path, monkeypatch):
    """Rank 1 reads rank 0's file (the weights) and its own share: rank 0's Muon share is dropped
    before rank 1's is read, and what load returns is rank 1's."""
    mine, theirs = torch.full((4, 4), 1.0), torch.full((4, 4), 0.0)
    state = {"step": 3, "model": {"w": torch.ones(2)}, "optim": {"state": {0: {"momentum_buffer": theirs}}}}
    checkpoint.save(tmp_path, 3, {**state, "optim": {"state": {0: {"momentum_buffer": mine}}}}, rank=1)
    checkpoint.save(tmp_path, 3, state, rank=0)
    loads = recording_load(monkeypatch)
    got = checkpoint.load(tmp_path, rank=1)
    gc.collect()
    main, share = loads
    assert [c["map_location"] for c in loads] == ["cpu", "cpu"]
    assert main["refs"]["optim"] and share["optim_alive_before"] == 0  # rank 0's share: freed before rank 1's is read
    assert torch.equal(got["optim"]["state"][0]["momentum_buffer"], mine)
    assert torch.equal(got["model"]["w"], torch.ones(2))


def test_a_finished_run_keeps_its_final_checkpoint_and_resumes(tmp_path, whole):
    run, cfg = tmp_path / "run", config(shards(tmp_path))  # checkpoints at 5, 10, 15, 16; keep 2
    train(cfg, run, progress=False, arm="a")
    assert store.is_done(run) and checkpoint.steps(run) == [16]
    assert sorted(p.name for p in (run / store.CHECKPOINTS).iterdir()) == ["step-000000016.pt"]
    done = final_values(run)

    train(cfg, run, progress=False, arm="a")  # run again although finished: reads the final checkpoint
    assert checkpoint.steps(run) == [16] and final_values(run) == done
    assert_same_run(run, whole)

    # a series kept on purpose (a larger keep_checkpoints, for analyze --series) stays
    series = tmp_path / "series"
    train(config(shards(tmp_path), **{"train.keep_checkpoints": 10}), series, progress=False, arm="a")
    assert checkpoint.steps(series) == [5, 10, 15, 16]


def test_finishing_removes_the_rank_shares_of_older_checkpoints(tmp_path):
    for step in (5, 10):
        for rank in (1, 0):
            checkpoint.save(tmp_path, step, {"step": step, "model": {}, "optim": {}}, rank=rank, keep=2)
    assert len(list((tmp_path / store.CHECKPOINTS).iterdir())) == 4
    checkpoint.finished(tmp_path, keep=2)
    assert sorted(p.name for p in (tmp_path / store.CHECKPOINTS).iterdir()) == [
        "step-000000010.pt",
        "step-000000010.rank1.pt",
    ]
