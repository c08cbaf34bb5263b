"""Checkpoints and resume: a run killed with SIGKILL and resumed writes exactly the rows of an
uninterrupted run (CPU float32, compared bitwise); a damaged newest checkpoint falls back to the one
before it; done.json keeps its final values however the run was resumed; divergence; untrusted
checkpoints refused. The helpers (an uninterrupted run, the comparison, a stand-in for a kill) are
in _runs.py, shared with test_signals, test_faults and the other tests that train."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from _runs import SETTINGS, Killed, assert_same_run, config, final_values, kill_after_row, shards

from rankscope.errors import RankscopeError
from rankscope.run import checkpoint
from rankscope.run.train import RunDiverged, train
from rankscope.settings.config import RunConfig, apply_overrides
from rankscope.storage import store


def test_resume_after_sigkill_is_bitwise_identical(tmp_path, whole):
    data = shards(tmp_path)
    cfg = config(data)

    # the same run in a child process, killed with SIGKILL once it has written rows past its
    # second checkpoint (step 10) -- the rows of step 12 must be dropped on resume
    killed = tmp_path / "killed"
    child = textwrap.dedent(f"""
        import os, sys, time
        from rankscope.storage import store
        from rankscope.settings.config import RunConfig, apply_overrides
        from rankscope.run.train import train
        append = store.TableWriter.append
        def append_then_wait(self, rows):
            rows = list(rows)
            append(self, rows)
            if self.path.name == "scalars.csv" and rows and rows[0]["step"] == 12:
                print("wrote step 12", flush=True)
                time.sleep(120)
        store.TableWriter.append = append_then_wait
        cfg = apply_overrides(RunConfig(), {{**{SETTINGS!r}, "data.path": {str(data)!r}}})
        train(cfg, {str(killed)!r}, progress=False, arm="a")
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "wrote step 12", proc.stderr.read()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not store.is_done(killed)
    assert checkpoint.steps(killed) == [5, 10]  # keep_checkpoints=2 pruned older ones
    assert store.read_table(killed / "scalars.csv")["step"].max() == 12

    train(cfg, killed, progress=False, arm="a")  # resumes from step 10
    assert checkpoint.steps(whole) == [16]  # finished: the fallback before the final checkpoint is gone
    assert_same_run(killed, whole)


def test_run_resumed_at_its_last_step_keeps_its_final_values(tmp_path, whole):
    # killed between the last checkpoint and done.json: the rerun evaluates nothing more, and
    # done.json must still carry the final values of the uninterrupted run
    run = tmp_path / "run"
    cfg = config(shards(tmp_path))
    train(cfg, run, progress=False, arm="a")
    (run / store.DONE).unlink()
    train(cfg, run, progress=False, arm="a")
    assert_same_run(run, whole)

    # trained again although finished (`--seeds 0 0`): done.json is rewritten with the same values
    train(cfg, run, progress=False, arm="a")
    assert_same_run(run, whole)

    # a checkpoint from before checkpoints carried the last evaluation: read back from the tables
    path = run / store.CHECKPOINTS / "step-000000016.pt"
    state = torch.load(path, weights_only=True)
    del state["last_eval"]
    torch.save(state, path)
    (run / store.DONE).unlink()
    train(cfg, run, progress=False, arm="a")
    assert final_values(run) == final_values(whole)


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, whole, monkeypatch, capsys):
    run = tmp_path / "run"
    cfg = config(shards(tmp_path))
    with monkeypatch.context() as m:
        kill_after_row(m, 12)
        with pytest.raises(Killed):
            train(cfg, run, progress=False, arm="a")
    folder = run / store.CHECKPOINTS
    assert checkpoint.steps(run) == [5, 10]
    newest = folder / "step-000000010.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # as a crash of the file system would leave it
    stale = folder / ".step-000000015.pt.12345.0123abcd.tmp"  # left by a write that was killed
    stale.write_bytes(b"half a checkpoint")
    capsys.readouterr()

    train(cfg, run, progress=False, arm="a")  # resumes from step 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rankscope: warning: checkpoint ")
    assert str(newest) in err and "step-000000010.pt.corrupt" in err and "resuming from step 5" in err
    assert (folder / "step-000000010.pt.corrupt").read_bytes() == data[: len(data) // 2]  # kept, not deleted
    assert not stale.exists()
    assert_same_run(run, whole)

    # a file of garbage is set aside the same way, next to the first one
    (folder / "step-000000017.pt").write_bytes(b"not a checkpoint")
    state = checkpoint.load(run, set_aside=True)
    assert state["step"] == 16 and (folder / "step-000000017.pt.corrupt").exists()


def test_no_readable_checkpoint_is_one_clear_error(tmp_path):
    run = tmp_path / "run"
    cfg = config(shards(tmp_path), **{"train.keep_checkpoints": 3})  # finished, it keeps two
    train(cfg, run, progress=False, arm="a")
    (run / store.DONE).unlink()
    for step in checkpoint.steps(run):
        (run / store.CHECKPOINTS / f"step-{step:09d}.pt").write_bytes(b"truncated")
    with pytest.raises(RankscopeError, match="cannot read checkpoint .*step-000000016.pt") as e:
        train(cfg, run, progress=False, arm="a")
    assert "\n" not in str(e.value) and ", nor any of the 1 older one(s); to start the run over" in str(e.value)
    assert checkpoint.steps(run) == [15, 16]  # nothing set aside when nothing could replace it


def test_diverging_run_stops_clearly_and_keeps_rows_and_checkpoint(tmp_path):
    data = shards(tmp_path)
    cfg = config(
        data,
        **{
            "optim.name": "adamw",
            "optim.adamw_lr": 1e6,
            "optim.adamw_matrix_lr": 1e6,
            "optim.grad_clip": 0.0,
            "train.checkpoint_every": 128,
        },
    )
    with pytest.raises(RunDiverged, match="diverged at") as e:
        train(cfg, tmp_path / "run", progress=False, arm="hot")
    assert "\n" not in str(e.value)
    rows = store.read_table(tmp_path / "run" / "scalars.csv")
    assert len(rows) >= 1 and not store.is_done(tmp_path / "run")
    kept = checkpoint.load(tmp_path / "run")
    if kept is not None:  # whatever checkpoint survives holds finite weights
        assert all(torch.isfinite(v).all() for v in kept["model"].values())


@pytest.mark.slow
def test_cli_study_continues_after_a_diverging_run(tmp_path, capsys):
    from rankscope.cli import main

    data = shards(tmp_path)
    study = tmp_path / "s.toml"
    sets = "\n".join(f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in SETTINGS.items())
    study.write_text(
        f'[settings]\n{sets}\n\n[arms.hot]\noptim.name = "adamw"\noptim.adamw_lr = 1e6\n'
        f'optim.adamw_matrix_lr = 1e6\noptim.grad_clip = 0.0\n[arms.ok]\nmodel.qk_norm = "learned"\n'
    )
    assert main(["run", str(study), "--data", str(data), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "hot seed 0 diverged" in err and "1 run(s) diverged: hot seed 0" in err
    assert store.is_done(tmp_path / "o" / "ok" / "seed-0")
    assert store.read_json(tmp_path / "o" / "hot" / "seed-0" / "done.json")["status"] == "diverged"


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_with_code_is_refused(tmp_path):
    folder = tmp_path / "run" / store.CHECKPOINTS
    folder.mkdir(parents=True)
    torch.save({"step": 3, "model": Payload()}, folder / "step-000000003.pt")
    with pytest.raises(RankscopeError, match="cannot read checkpoint"):
        checkpoint.load(tmp_path / "run")


def test_truncated_checkpoint_is_refused_clearly(tmp_path):
    folder = tmp_path / "run" / store.CHECKPOINTS
    folder.mkdir(parents=True)
    torch.save({"step": 3, "w": torch.ones(1000)}, folder / "step-000000003.pt")
    data = (folder / "step-000000003.pt").read_bytes()
    (folder / "step-000000003.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(RankscopeError, match="cannot read checkpoint"):
        checkpoint.load(tmp_path / "run")


def test_truncate_after_keeps_rows_up_to_the_step(tmp_path):
    rs = store.RunStore(tmp_path)
    rs.scalars.append([dict(arm="a", seed=0, step=s, tokens=s * 10, val_loss=1.0 / (s + 1)) for s in range(5)])
    rs.probes.append(
        [
            dict(arm="a", seed=0, step=s, tokens=s, layer=0, head=0, site="k", metric="pr_sv", value=2.0)
            for s in range(5)
        ]
    )
    rs.close()
    with open(tmp_path / "probes.csv", "a") as f:
        f.write("a,0,9,9,0,0,k,pr")  # torn
    store.truncate_after(tmp_path, 2)
    assert list(store.read_table(tmp_path / "scalars.csv")["step"]) == [0, 1, 2]
    assert list(store.read_table(tmp_path / "probes.csv")["step"]) == [0, 1, 2]


# --- torch.compile on the CPU: when it is used, what it guarantees, and what happens when it fails ---------


def test_compile_auto_compiles_long_cpu_runs_only_with_a_cpp_compiler(monkeypatch):
    import shutil

    from rankscope.run.train import CPU_COMPILE_MIN_TOKENS, compiles

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    tc = RunConfig().train
    assert tc.compile == "auto" and tc.tokens >= CPU_COMPILE_MIN_TOKENS  # the default run compiles
    short = apply_overrides(RunConfig(), {"train.tokens": CPU_COMPILE_MIN_TOKENS - 1}).train
    assert compiles(tc, cuda) and compiles(short, cuda) and not compiles(short, cpu)
    for mode, want in (("on", True), ("off", False)):
        assert compiles(apply_overrides(RunConfig(), {"train.compile": mode}).train, cpu) is want
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no C++ compiler for inductor's kernels
    assert not compiles(tc, cpu) and compiles(tc, cuda)


def failing_compile(monkeypatch) -> None:
    """torch.compile whose compiled module fails as inductor does without a working toolchain."""
    from torch._inductor.exc import InductorError

    def compile_(module, *args, **kwargs):
        def call(*a, **k):
            raise InductorError(RuntimeError("C++ compile error: g++ not found"), "")

        return call

    monkeypatch.setattr(torch, "compile", compile_)


def test_a_failing_auto_compile_trains_uncompiled_and_says_so(tmp_path, whole, monkeypatch, capsys):
    from rankscope.run import build as build_module

    failing_compile(monkeypatch)
    monkeypatch.setattr(build_module, "CPU_COMPILE_MIN_TOKENS", 1)  # auto compiles this short run
    run = tmp_path / "run"
    train(config(shards(tmp_path)), run, progress=False, arm="a")
    assert "torch.compile failed" in capsys.readouterr().err
    assert_same_run(run, whole)  # eager from the first step: the uncompiled run, bit for bit
    with pytest.raises(RankscopeError, match="train.compile=off"):  # asked for: one line, no traceback
        train(config(shards(tmp_path), **{"train.compile": "on"}), tmp_path / "on", progress=False, arm="a")


def test_a_compiled_run_resumes_bitwise(tmp_path, monkeypatch):
    """Compiled training steps are not bitwise the eager ones (inductor fuses and reorders), but a
    compiled run killed and resumed is bitwise the compiled run that was not."""
    data = shards(tmp_path)
    cfg = config(data, **{"train.compile": "on"})
    train(cfg, tmp_path / "whole", progress=False, arm="a")
    kill_after_row(monkeypatch, 12)
    with pytest.raises(Killed):
        train(cfg, tmp_path / "killed", progress=False, arm="a")
    monkeypatch.undo()
    train(cfg, tmp_path / "killed", progress=False, arm="a")  # resumes from step 10
    assert_same_run(tmp_path / "killed", tmp_path / "whole")


@pytest.mark.parametrize(
    "arm",
    [
        "optim.muon_lr = 1e308\n",  # BlockMuon (stacked, Polar Express)
        'optim.muon_lr = 1e308\noptim.muon_qkvo = "separate"\noptim.muon_ns = "newton_schulz"\n',  # torch's Muon
        'optim.name = "adamw"\noptim.adamw_lr = 1e308\noptim.adamw_matrix_lr = 1e308\n',
    ],
)
def test_a_learning_rate_past_float_range_is_a_divergence_not_a_traceback(tmp_path, capsys, arm):
    from rankscope.cli import main

    data = shards(tmp_path)
    study = tmp_path / "s.toml"
    sets = "\n".join(f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in SETTINGS.items())
    study.write_text(f'[settings]\n{sets}\n\n[arms.hot]\n{arm}[arms.ok]\nmodel.qk_norm = "learned"\n')
    args = ["run", str(study), "--data", str(data), "--out", str(tmp_path / "o"), "--no-progress", "--no-report"]
    for _ in range(2):  # and the rerun says the same, without training it again
        assert main(args) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and "1 run(s) diverged: hot seed 0" in err
    assert store.read_json(tmp_path / "o" / "hot" / "seed-0" / "done.json")["status"] == "diverged"
    assert store.is_done(tmp_path / "o" / "ok" / "seed-0")  # the study went on
