"""Many processes, one study folder: one writer per run (a lock that names its holder and dies with
it), the shards of a job array side by side, and reruns that never pass over a diverged run.

No test waits on a clock: a second writer is started only once the first is known to hold the
lock (it says so on a pipe), so every outcome is decided by the lock, not by timing.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _corpus import write_corpus
from _runs import SETTINGS, shards

from rankscope.cli import main
from rankscope.run.studies import read_study
from rankscope.run.study import plan_study, run_study
from rankscope.storage import store
from rankscope.storage.locks import FileLock, LockHeld

TINY = """
[settings]
model.n_layer = 1
model.d_model = 32
model.n_head = 1
model.n_kv_head = 1
model.head_dim = 32
model.d_mlp = 64
model.vocab_size = 512
train.batch_size = 2
train.seq_len = 32
train.eval_batches = 1
train.threads = 1
probe.batch_size = 2
"""
EVAL_POINTS = 3  # tokens 0, 64 and 128: see write_study


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small text folder, so every shard builds (or finds) the same tokenizer cache."""
    return write_corpus(tmp_path_factory.mktemp("corpus"), files=6, lines=300)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    # each test its own token cache, so the job array below really builds it from six processes
    monkeypatch.setenv("RANKSCOPE_CACHE", str(tmp_path / "cache"))


def write_study(path: Path, seeds: str = "[0, 1, 2]") -> Path:
    path.write_text(
        f'description = "test"\ntokens = "128"\neval_every = "64"\nseeds = {seeds}\n{TINY}\n'
        '[arms.a]\nmodel.qk_norm = "learned"\n[arms.b]\nmodel.qk_norm = "none"\n'
    )
    return path


def run_cmd(study: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "run",
        str(study),
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--no-progress",
        "--no-report",
        *extra,
    ]


def env() -> dict[str, str]:
    # one thread per process: seven of them share the machine's cores
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def assert_ran_once(run: Path, arm: str, seed: int) -> None:
    """The run is finished, and each evaluation point's rows are there exactly once."""
    assert store.read_json(run / store.DONE)["status"] == "done"
    scalars = store.read_table(run / store.SCALARS)
    assert list(scalars["tokens"]) == [0, 64, 128]
    assert set(scalars["arm"]) == {arm} and set(scalars["seed"]) == {seed}
    probes = store.read_table(run / store.PROBES)
    assert len(probes) and not probes.duplicated(["step", "layer", "head", "site", "metric"]).any()
    assert sorted(probes["tokens"].unique()) == [0, 64, 128]


def leftovers(out: Path) -> list[str]:
    """Lock files and temporary files anywhere in the study folder: none once every writer ended."""
    return sorted(str(p.relative_to(out)) for p in out.rglob(".*") if p.name.endswith((".lock", ".tmp")))


# --- the lock itself -------------------------------------------------------------------------


def test_lock_names_its_holder_and_goes_with_release(tmp_path):
    path = tmp_path / "x.lock"
    with FileLock(path, "rankscope run") as held:
        assert held.held and held.unguarded is None
        recorded = json.loads(path.read_text())
        assert recorded["pid"] == os.getpid() and recorded["host"] == socket.gethostname()
        with pytest.raises(LockHeld) as e:  # a second descriptor, even in this process, is refused
            FileLock(path, "other").acquire()
        holder = e.value.holder
        assert (holder.pid, holder.host, holder.what) == (os.getpid(), socket.gethostname(), "rankscope run")
        assert str(holder) == f"pid {os.getpid()} on {socket.gethostname()} since {recorded['since']} (rankscope run)"
        assert recorded["since"].endswith(" UTC")
    assert not path.exists()  # removed on release
    with FileLock(path, "again"):  # and free again
        pass


def test_lock_dies_with_a_killed_holder(tmp_path):
    path = tmp_path / "x.lock"
    child = textwrap.dedent(f"""
        import sys
        from rankscope.storage.locks import FileLock
        with FileLock({str(path)!r}, "child"):
            print("locked", flush=True)
            sys.stdin.readline()  # until killed
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(LockHeld) as e:
            FileLock(path, "test").acquire()
        assert e.value.holder.pid == proc.pid and e.value.holder.what == "child"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert path.exists()  # SIGKILL leaves the file, but the kernel dropped the lock
    with FileLock(path, "test"):
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_lock_on_a_file_system_without_locks_is_unguarded(tmp_path, monkeypatch):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock = FileLock(tmp_path / "x.lock", "test").acquire()
    assert not lock.held and "No locks available" in lock.unguarded
    lock.release()


def test_lock_removed_under_a_waiting_opener_is_not_trusted(tmp_path, monkeypatch):
    # A opens the file, B releases (unlinking it) before A locks: A must lock the file now at the
    # path, not the removed one that nobody else can see any more.
    path = tmp_path / "x.lock"
    first = FileLock(path, "first").acquire()
    real_open = FileLock._open
    calls = []

    def open_then_release(self):
        fd = real_open(self)
        if not calls:
            first.release()
        calls.append(fd)
        return fd

    monkeypatch.setattr(FileLock, "_open", open_then_release)
    with FileLock(path, "second") as second:
        assert len(calls) == 2 and second.held
        assert os.path.samestat(os.fstat(second._fd), os.stat(path))
        with pytest.raises(LockHeld):
            FileLock(path, "third").acquire()


# --- one writer per run ------------------------------------------------------------------------


def test_second_writer_of_a_run_stops_and_names_the_holder(tmp_path, corpus, capsys):
    study, out = write_study(tmp_path / "s.toml", seeds="[0]"), tmp_path / "out"
    (out / "b").mkdir(parents=True)
    # run b seed 0 held here, as by another `rankscope run`: a runs, then b stops the command
    with store.run_lock(out / "b" / "seed-0"):
        assert main(run_cmd(study, corpus, out)) == 2
        err = capsys.readouterr().err
        assert (
            f"rankscope: error: run b seed 0 ({out / 'b' / 'seed-0'}) is being written by pid {os.getpid()} "
            f"on {socket.gethostname()} since " in err
        )
        assert err.rstrip().endswith("wait for that process, or end it and rerun")
        assert store.is_done(out / "a" / "seed-0")
        assert not (out / "b" / "seed-0").exists()  # not touched
    assert main(run_cmd(study, corpus, out)) == 0
    assert "1 of 2 runs already finished" in capsys.readouterr().err
    assert_ran_once(out / "a" / "seed-0", "a", 0)
    assert_ran_once(out / "b" / "seed-0", "b", 0)
    assert leftovers(out) == []


@pytest.mark.slow
def test_job_array_shards_side_by_side_and_a_duplicate_shard(tmp_path, corpus):
    """The README's Slurm pattern: six shards of a 2-arm x 3-seed study start together on one --out
    and one empty token cache, and shard 2 is started a second time while its first copy works."""
    study, out, n = write_study(tmp_path / "s.toml"), tmp_path / "out", 6
    cmd = [sys.executable, "-m", "rankscope"]
    # shard 2's first copy stops inside its run, holding the run's lock, until told to go on
    paused = textwrap.dedent(f"""
        import sys
        import rankscope.run.train
        train = rankscope.run.train.train
        def wait_then_train(*args, **kwargs):
            print("holding", flush=True)
            sys.stdin.readline()
            return train(*args, **kwargs)
        rankscope.run.train.train = wait_then_train
        from rankscope.cli import main
        sys.exit(main({run_cmd(study, corpus, out, "--shard", f"2/{n}")!r}))
    """)
    procs = {}
    for i in range(n):
        if i == 2:
            argv = [sys.executable, "-c", paused]
        else:
            argv = cmd + run_cmd(study, corpus, out, "--shard", f"{i}/{n}")
        stdin = subprocess.PIPE if i == 2 else subprocess.DEVNULL
        procs[i] = subprocess.Popen(
            argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()
        )
    try:
        first = procs[2]
        line = first.stdout.readline()
        assert line.strip() == "holding", first.stderr.read()
        duplicate = subprocess.run(
            cmd + run_cmd(study, corpus, out, "--shard", f"2/{n}"),
            capture_output=True,
            text=True,
            timeout=300,
            env=env(),
        )
        first.stdin.write("go\n")
        first.stdin.close()
        results = {i: (p.wait(timeout=300), p.stderr.read()) for i, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()

    assert duplicate.returncode == 2, duplicate.stderr
    run_2 = out / "a" / "seed-1"  # slice 2 of 6 of the seed-major list a0 b0 a1 b1 a2 b2
    assert (
        f"rankscope: error: run a seed 1 ({run_2}) is being written by pid {procs[2].pid} on {socket.gethostname()}"
        in duplicate.stderr
    )
    assert duplicate.stderr.count("\n") <= 3 and "Traceback" not in duplicate.stderr
    for i, (rc, err) in results.items():
        assert rc == 0, f"shard {i}: {err}"
        assert "Traceback" not in err
    for seed in (0, 1, 2):
        for arm in ("a", "b"):
            assert_ran_once(out / arm / f"seed-{seed}", arm, seed)
    study_json = json.loads((out / "study.json").read_text())
    assert study_json["name"] == "s" and study_json["seeds"] == [0, 1, 2] and set(study_json["arms"]) == {"a", "b"}
    assert len(store.load_scalars(out)) == 6 * EVAL_POINTS
    assert leftovers(out) == []
    # a rerun of the whole study finds all six finished, none diverged
    assert main(run_cmd(study, corpus, out)) == 0


def test_study_json_is_written_once_and_left_alone(tmp_path, corpus):
    study, out = write_study(tmp_path / "s.toml", seeds="[0]"), tmp_path / "out"
    assert main(run_cmd(study, corpus, out, "--shard", "0/2")) == 0
    stamp = (out / "study.json").stat().st_mtime_ns
    assert main(run_cmd(study, corpus, out, "--shard", "1/2")) == 0
    assert (out / "study.json").stat().st_mtime_ns == stamp  # same study: not rewritten


# --- diverged runs are never silent -------------------------------------------------------------


def test_rerun_returns_and_names_runs_that_diverged_before(tmp_path, capsys):
    data = shards(tmp_path)
    sets = "\n".join(f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in SETTINGS.items())
    (tmp_path / "s.toml").write_text(
        f'[settings]\n{sets}\n\n[arms.hot]\noptim.name = "adamw"\noptim.adamw_lr = 1e6\n'
        f'optim.adamw_matrix_lr = 1e6\noptim.grad_clip = 0.0\n[arms.ok]\nmodel.qk_norm = "learned"\n'
    )
    study = read_study(str(tmp_path / "s.toml"))
    out = tmp_path / "o"
    plan = plan_study(study, {"data.path": str(data)})
    first = run_study(plan, out, progress=False, log=lambda s: None)
    assert [(s["arm"], s["seed"], s["status"]) for s in first] == [("hot", 0, "diverged"), ("ok", 0, "done")]

    said: list[str] = []
    again = run_study(plan, out, progress=False, log=said.append)
    assert [(s["arm"], s["seed"], s["status"]) for s in again] == [("hot", 0, "diverged"), ("ok", 0, "done")]
    assert again[0]["message"] == first[0]["message"]
    assert again[1] == {**first[1], "status": "done"}  # a finished run's summary, as train returned it
    assert said == [
        f"rankscope: 2 of 2 runs already finished in {out}; skipping them",
        "rankscope: diverged before, not rerun: hot seed 0 (remove a run's folder to run it again)",
    ]
    # the command line says it too, and fails
    argv = ["run", str(tmp_path / "s.toml"), "--data", str(data), "--out", str(out), "--no-progress", "--no-report"]
    assert main(argv) == 1
    assert "diverged before, not rerun: hot seed 0" in capsys.readouterr().err


def test_unreadable_done_json_is_reported_not_trusted_in_silence(tmp_path):
    run = tmp_path / "a" / "seed-0"
    run.mkdir(parents=True)
    (run / store.DONE).write_text("{")
    summary = store.read_done(run, "a", 0)
    assert summary["status"] == "unknown" and "unreadable" in summary["message"]
    old = tmp_path / "b" / "seed-0"
    old.mkdir(parents=True)
    (old / store.DONE).write_text(json.dumps({"steps": 3}))  # from before done.json had a status
    assert store.read_done(old, "b", 0) == {"status": "done", "steps": 3, "arm": "b", "seed": 0}
