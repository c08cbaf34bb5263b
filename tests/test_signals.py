"""Ctrl-C and SIGTERM: training stops between two optimizer steps, writes a checkpoint of that step
and says in one line how to resume; the rerun finishes bitwise as an uninterrupted run. Signals are
sent by the process to itself at fixed points (or, for the command line, once the child says it
has written a row), so nothing depends on timing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from _runs import SETTINGS, after_row, assert_same_run, config, shards

from rankscope.errors import Interrupted
from rankscope.run import checkpoint
from rankscope.run import train as train_module
from rankscope.run.train import train
from rankscope.storage import store

TOKENS_PER_STEP = SETTINGS["train.batch_size"] * SETTINGS["train.seq_len"]


def send(signum: int):
    """An action that signals this process; its Python handler runs at the next bytecode."""
    return lambda: os.kill(os.getpid(), signum)


def during_step(monkeypatch, step: int, action) -> None:
    """Call `action` as the optimizer step `step` begins (it asks for its learning rate)."""
    real = train_module.lr_scale

    def lr_scale(tokens, *args):
        if tokens == step * TOKENS_PER_STEP:
            action()
        return real(tokens, *args)

    monkeypatch.setattr(train_module, "lr_scale", lr_scale)


def handlers() -> dict:
    return {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}


@pytest.mark.parametrize(
    "signum, where, stop_step",
    [
        (signal.SIGTERM, "after the row of step 6", 6),  # an evaluation step: stops right after it
        (signal.SIGINT, "during step 8", 9),  # neither evaluated nor saved: a checkpoint of its own
    ],
)
def test_signal_stops_at_a_safe_point_and_the_rerun_is_bitwise(tmp_path, whole, monkeypatch, signum, where, stop_step):
    run = tmp_path / "run"
    cfg = config(shards(tmp_path))
    before = handlers()
    with monkeypatch.context() as m:
        if where.startswith("after"):
            m.setattr(store.TableWriter, "append", after_row(6, send(signum)))
        else:
            during_step(m, 8, send(signum))
        with pytest.raises(Interrupted) as e:
            train(cfg, run, progress=False, arm="a")
    name = signal.Signals(signum).name
    assert str(e.value) == (
        f"stopped by {name}: run a seed 0 saved at step {stop_step} of 16 "
        f"({stop_step * TOKENS_PER_STEP:,} tokens); rerun the same command to resume"
    )
    assert e.value.signum == signum and e.value.exit_code == 128 + signum
    assert handlers() == before  # restored for whoever called train()
    assert checkpoint.steps(run) == [5, stop_step]
    assert store.read_table(run / "scalars.csv")["step"].max() == stop_step // 2 * 2
    assert not store.is_done(run)

    train(cfg, run, progress=False, arm="a")
    assert_same_run(run, whole)


def test_second_ctrl_c_while_stopping_interrupts_the_checkpoint_write_safely(tmp_path, whole, monkeypatch):
    run = tmp_path / "run"
    cfg = config(shards(tmp_path))
    fired = []
    write = checkpoint._Recorder.write

    def first():
        fired.append("first")
        os.kill(os.getpid(), signal.SIGINT)

    def write_then_second(self, data):  # the second Ctrl-C lands inside the checkpoint of step 6
        if fired == ["first"]:
            fired.append("second")
            os.kill(os.getpid(), signal.SIGINT)
        return write(self, data)

    with monkeypatch.context() as m:
        m.setattr(store.TableWriter, "append", after_row(6, first))
        m.setattr(checkpoint._Recorder, "write", write_then_second)
        with pytest.raises(KeyboardInterrupt):  # cli.main: one line, exit 130
            train(cfg, run, progress=False, arm="a")
    assert fired == ["first", "second"]
    folder = run / store.CHECKPOINTS
    assert sorted(p.name for p in folder.iterdir()) == ["step-000000005.pt"]  # no half-written step 6
    assert checkpoint.load(run)["step"] == 5

    train(cfg, run, progress=False, arm="a")
    assert_same_run(run, whole)


def test_signal_during_the_last_step_finishes_the_run_then_stops(tmp_path, whole, monkeypatch):
    run = tmp_path / "run"
    cfg = config(shards(tmp_path))
    with monkeypatch.context() as m:
        during_step(m, 15, send(signal.SIGTERM))
        with pytest.raises(Interrupted, match="^stopped by SIGTERM after finishing run a seed 0; rerun") as e:
            train(cfg, run, progress=False, arm="a")
    assert e.value.exit_code == 143
    assert_same_run(run, whole)


def test_handlers_only_in_the_main_thread_and_not_over_an_ignored_signal(tmp_path, monkeypatch):
    cfg = config(shards(tmp_path), **{"train.tokens": 4 * TOKENS_PER_STEP})
    result = {}

    def in_thread():
        try:
            result["summary"] = train(cfg, tmp_path / "thread", progress=False)
        except BaseException as e:  # signal.signal raises ValueError outside the main thread
            result["error"] = e

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert "error" not in result and result["summary"]["status"] == "done"

    seen = []
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a background job (`cmd &`) starts
    try:
        monkeypatch.setattr(store.TableWriter, "append", after_row(2, lambda: seen.append(handlers())))
        train(cfg, tmp_path / "ignored", progress=False)
    finally:
        signal.signal(signal.SIGINT, old)
    assert seen[0][signal.SIGINT] is signal.SIG_IGN
    assert seen[0][signal.SIGTERM] not in (signal.SIG_DFL, signal.SIG_IGN)  # training's own handler


# `python -m rankscope run ...`, made to wait after writing the row of step 6 until a signal has
# reached training's handler, so the test knows the run is mid-way without sleeping a guessed time
CHILD = textwrap.dedent("""
    import os, runpy, signal, sys, time
    from rankscope.storage import store
    append = store.TableWriter.append
    def append_then_wait(self, rows):
        rows = list(rows)
        append(self, rows)
        if self.path.name == "scalars.csv" and rows and rows[0]["step"] == 6:
            stop = signal.getsignal(signal.SIGTERM).__self__  # train's StopRequest
            print("wrote step 6", os.getpid(), flush=True)
            deadline = time.monotonic() + 120
            while not stop.signum and time.monotonic() < deadline:
                time.sleep(0.01)
    store.TableWriter.append = append_then_wait
    sys.argv[0] = "rankscope"
    runpy.run_module("rankscope", run_name="__main__", alter_sys=True)
""")


def study_file(tmp: Path) -> Path:
    sets = "\n".join(f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in SETTINGS.items())
    path = tmp / "s.toml"
    path.write_text(f'[settings]\n{sets}\n\n[arms.a]\nmodel.qk_norm = "learned"\n')
    return path


@pytest.fixture(scope="module")
def cli_whole(tmp_path_factory) -> tuple[Path, Path]:
    """(study file, an uninterrupted run of it made by the command line)."""
    from rankscope.cli import main

    tmp = tmp_path_factory.mktemp("cli")
    data = shards(tmp)
    study = study_file(tmp)
    args = ["run", str(study), "--data", str(data), "--out", str(tmp / "whole"), "--no-progress", "--no-report"]
    assert main(args) == 0
    return study, tmp / "whole" / "a" / "seed-0"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_command_line_stops_on_a_signal_with_one_line_and_resumes_bitwise(tmp_path, cli_whole, signum):
    from rankscope.cli import main

    study, whole_run = cli_whole
    data = shards(tmp_path)
    args = ["run", str(study), "--data", str(data), "--out", str(tmp_path / "out"), "--no-progress", "--no-report"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        line = proc.stdout.readline()
        if not line.startswith("wrote step 6"):
            proc.kill()
            pytest.fail(f"child did not reach step 6: {line!r} {proc.communicate(timeout=60)[1][-3000:]}")
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err and "Exception ignored" not in err
    lines = err.splitlines()
    assert all(ln.startswith("rankscope: ") for ln in lines), err  # "rankscope: data: ..." comes first
    assert lines[-1] == (
        f"rankscope: stopped by {name}: run a seed 0 saved at step 6 of 16 (768 tokens); "
        f"rerun the same command to resume"
    )
    run = tmp_path / "out" / "a" / "seed-0"
    assert checkpoint.steps(run) == [5, 6]

    assert main(args) == 0  # the same command again
    assert_same_run(run, whole_run)


@pytest.mark.slow
def test_under_torchrun_every_rank_stops_at_the_same_step_and_resumes_bitwise(tmp_path, cli_whole):
    # SIGTERM reaches rank 0 alone: both ranks must still stop after the same step (each writes its
    # share of the checkpoint); then the newest checkpoint is damaged, so the rerun falls back to
    # step 5, where each rank's loss sums since the last evaluation come from its own share
    study, _ = cli_whole
    data = shards(tmp_path)
    args = ["run", str(study), "--data", str(data), "--no-progress", "--no-report"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    whole = subprocess.run(
        [*torchrun, "-m", "rankscope", *args, "--out", str(tmp_path / "whole")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert whole.returncode == 0, whole.stderr[-3000:]

    child = tmp_path / "child.py"
    child.write_text(CHILD)
    out = ["--out", str(tmp_path / "out")]
    proc = subprocess.Popen(
        [*torchrun, str(child), *args, *out], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        line = proc.stdout.readline()
        if not line.startswith("wrote step 6"):
            proc.kill()
            pytest.fail(f"rank 0 did not reach step 6: {line!r} {proc.communicate(timeout=60)[1][-3000:]}")
        os.kill(int(line.split()[-1]), signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0  # torchrun's own code for workers that stopped
    assert "rankscope: stopped by SIGTERM: run a seed 0 saved at step 6 of 16" in err, err[-3000:]
    run = tmp_path / "out" / "a" / "seed-0"
    names = sorted(p.name for p in (run / store.CHECKPOINTS).iterdir())
    assert names == [f"step-00000000{s}{r}.pt" for s in (5, 6) for r in ("", ".rank1")]

    newest = run / store.CHECKPOINTS / "step-000000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    again = subprocess.run(
        [*torchrun, "-m", "rankscope", *args, *out], capture_output=True, text=True, timeout=300, env=env
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"rankscope: warning: checkpoint {newest} is unreadable" in again.stderr
    assert "resuming from step 5" in again.stderr
    assert_same_run(run, tmp_path / "whole" / "a" / "seed-0")
