"""The GPU path on any number of processes, checked on CPU with gloo: the presets' global batch
shared over 1 to 16 processes, the README's torchrun commands as written (on 2 and 4 processes,
the model shrunk), a failure on rank 0 stopping every rank at once, and bookkeeping in a process
that trains run after run (one process group, left at exit; each run's own peak memory)."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _runs import SETTINGS, shards

from rankscope.errors import ConfigError
from rankscope.run import dist as rdist
from rankscope.settings.config import PRESETS, RunConfig, apply_overrides
from rankscope.storage import store

README = Path(__file__).resolve().parents[1] / "README.md"
# (micro-batch sequences, micro-batches) a rank runs, by number of processes; the step stays the
# preset's: seed-1.5b's 32 sequences in 4 x 8 on one process, seed-88m's 4 in one
SPLITS = {
    "seed-1.5b": {1: (8, 4), 2: (8, 2), 4: (8, 1), 8: (4, 1), 16: (2, 1)},
    "seed-88m": {1: (4, 1), 2: (2, 1), 4: (1, 1)},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", SPLITS)
@pytest.mark.parametrize("ranks", [1, 2, 4, 8, 16])
def test_a_presets_step_is_shared_whole_or_refused_in_one_line(name, ranks):
    t = PRESETS[name].train
    if ranks not in SPLITS[name]:
        # seed-88m's 4 sequences cannot go to 8 or 16 processes without changing the step
        with pytest.raises(ConfigError) as e:
            rdist.split_batch(t.batch_size, t.grad_accum, ranks, t.seq_len)
        assert str(e.value) == (
            f"train.batch_size=4 (8,192 tokens a step) cannot be split over {ranks} processes, each of which "
            "needs whole sequences: run on 1, 2 or 4 processes, run study slices side by side (--shard i/n, one "
            f"GPU each), or --set train.batch_size={ranks} ({ranks * 2048:,} tokens a step, not 8,192)"
        )
        return
    split = rdist.split_batch(t.batch_size, t.grad_accum, ranks, t.seq_len)
    assert (split.micro, split.accum) == SPLITS[name][ranks]
    assert split.rows * ranks == t.batch_size  # tokens a step: the preset's
    assert split.micro <= t.batch_size // t.grad_accum  # no forward pass larger than on one process


def test_a_split_keeps_to_the_memory_knob_when_the_numbers_are_not_powers_of_two():
    assert rdist.split_batch(12, 4, 2, 8) == rdist.BatchSplit(micro=3, accum=2, ranks=2)
    assert rdist.split_batch(30, 3, 5, 8) == rdist.BatchSplit(micro=6, accum=1, ranks=5)
    assert rdist.split_batch(14, 2, 2, 8) == rdist.BatchSplit(micro=7, accum=1, ranks=2)
    with pytest.raises(ConfigError, match=r"run on 1 process, .*--set train.batch_size=4 \(32 tokens a step"):
        rdist.split_batch(3, 1, 2, 8)


def readme_torchrun_commands() -> list[list[str]]:
    """Every `torchrun ...` command in the README's code blocks, continuation lines joined."""
    text = README.read_text().replace("\\\n", " ")
    return [shlex.split(line) for line in text.splitlines() if line.startswith("torchrun ")]


def option(argv: list[str], name: str, default: str | None = None) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else default


def test_every_readme_torchrun_command_can_share_its_presets_batch():
    commands = readme_torchrun_commands()
    assert len(commands) >= 2
    for argv in commands:
        ranks = int(option(argv, "--nnodes", "1")) * int(option(argv, "--nproc_per_node"))
        t = PRESETS[option(argv, "--preset")].train
        rdist.split_batch(t.batch_size, t.grad_accum, ranks, t.seq_len)  # raises ConfigError if not


# The model shrunk and a run cut to two steps; the batch settings (batch_size, grad_accum) stay
# the preset's, and with them how a step is shared. 32-token sequences stand in for 2,048.
SMALL = {
    "model.n_layer": 1,
    "model.d_model": 64,
    "model.n_head": 2,
    "model.n_kv_head": 1,
    "model.head_dim": 32,
    "model.d_mlp": 128,
    "model.vocab_size": 64,
    "model.max_seq_len": 32,
    "train.seq_len": 32,
    "train.eval_batches": 1,
    "train.checkpoint_every": 0,
    "train.compile": "off",
    "train.threads": 1,
    "probe.batch_size": 2,
}


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("index", range(3))
def test_the_readme_torchrun_commands_run_on_2_and_4_processes(tmp_path, index, ranks):
    commands = readme_torchrun_commands()
    if index >= len(commands):
        pytest.skip("the README has fewer torchrun commands")
    argv = commands[index]
    name = option(argv, "--preset")
    t = PRESETS[name].train
    # torchrun's own options for one machine here; the command rankscope gets, exactly as written
    swap = {"--nproc_per_node": str(ranks), "--nnodes": "1", "--rdzv-endpoint": f"127.0.0.1:{free_port()}"}
    swap["--data"] = str(shards(tmp_path))
    argv = [swap.get(argv[i - 1], a) if i else a for i, a in enumerate(argv)]
    step = t.batch_size * 32
    small = {**SMALL, "train.tokens": 2 * step, "train.eval_every": 2 * step}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    cmd += ["--out", str(out), "--no-progress", "--no-report"]
    cmd += [a for k, v in small.items() for a in ("--set", f"{k}={v}")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    micro, accum = SPLITS[name][ranks]
    line = (
        f"rankscope: batch: {t.batch_size} sequences of 32 tokens ({step:,} tokens a step) as {ranks} processes x "
        f"{accum} micro-batch{'es' if accum > 1 else ''} x {micro} sequence{'s' if micro > 1 else ''}"
    )
    assert line in done.stderr.splitlines(), done.stderr[-3000:]
    runs = store.run_dirs(out)
    assert len(runs) >= 3
    for run in runs:
        summary = store.read_json(run / "done.json")
        assert summary["status"] == "done" and summary["world_size"] == ranks
        assert store.read_json(run / "config.json")["tokens_per_step"] == step


# A rank-0 failure in the end-of-run work, injected by a launcher that patches rankscope before
# running its command line: the final evaluation's last extra (kv_headroom) or writing done.json
# finds the disk full. The time of the failure goes to a file, as stderr must hold one line.
LAUNCHER = """
import os, sys, time
from pathlib import Path

import rankscope.storage.store
import rankscope.run.evaluator
from rankscope.cli import main

def full_disk(*args, **kwargs):
    Path(sys.argv[1]).write_text(str(time.time()))
    raise OSError(28, "No space left on device")

if os.environ["RANK"] == "0":
    if sys.argv[2] == "evaluation":
        rankscope.run.evaluator.kv_headroom = full_disk
    else:
        rankscope.storage.store.RunStore.finish = full_disk
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("where", ["evaluation", "done.json"])
def test_a_failure_on_rank_0_at_the_end_stops_every_rank_at_once(tmp_path, where):
    data = shards(tmp_path)
    study = tmp_path / "s.toml"
    settings = {**SETTINGS, "train.tokens": 4 * 128, "train.checkpoint_every": 0}
    lines = [f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in settings.items()]
    study.write_text("seeds = [0]\n[settings]\n" + "\n".join(lines) + '\n[arms.a]\nmodel.qk_norm = "learned"\n')
    (tmp_path / "launch.py").write_text(LAUNCHER)
    failed_at = tmp_path / "failed_at"
    args = ["run", str(study), "--data", str(data), "--out", str(tmp_path / "out"), "--no-progress", "--no-report"]
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, str(tmp_path / "launch.py"), str(failed_at), where, *args],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    ended: dict[int, float] = {}
    deadline = time.time() + 300
    while len(ended) < 2 and time.time() < deadline:
        for r, p in enumerate(procs):
            if r not in ended and p.poll() is not None:
                ended[r] = time.time()
        time.sleep(0.1)
    errs = []
    for p in procs:
        if p.poll() is None:
            p.kill()
        errs.append(p.communicate()[1])
    assert failed_at.exists(), errs
    # without the failure reaching it, rank 1 waits at its next collective (30 minutes) while rank
    # 0 waits for it at its exit (60 s)
    assert len(ended) == 2 and max(ended.values()) - float(failed_at.read_text()) < 30, errs
    for err in errs:  # rank 0 also says what data and batch it ran; then one line of error each
        assert "Traceback" not in err and all(ln.startswith("rankscope: ") for ln in err.splitlines()), err
        assert [ln for ln in err.splitlines() if "error" in ln] == err.splitlines()[-1:], err
    assert procs[0].returncode == 2 and "No space left on device" in errs[0], errs[0]
    assert procs[1].returncode == 1 and len(errs[1].splitlines()) == 1, errs[1]
    assert errs[1].startswith("rankscope: error: process 0 of 2 failed (OSError: [Errno 28] No space left on device")
    assert errs[1].endswith("); process 1 stops too\n")


# Two runs in one process under a 2-process group, as a library caller trains them; an exit hook
# registered first runs last (atexit is last in, first out) and records whether the group was left.
TWO_RUNS = """
import atexit, sys
from pathlib import Path

import torch.distributed as dist

from rankscope.settings.config import RunConfig, apply_overrides
from rankscope.run.train import train

atexit.register(lambda: Path(sys.argv[2]).write_text("left" if not dist.is_initialized() else "still joined"))
cfg = apply_overrides(RunConfig(), {**eval(sys.argv[3]), "data.path": sys.argv[1], "train.tokens": 256})
groups = []
for seed in (0, 1):
    train(apply_overrides(cfg, {"seed": seed}), Path(sys.argv[2]).parent / f"seed-{seed}", progress=False)
    groups.append(dist.group.WORLD)
assert groups[0] is groups[1] and dist.is_initialized()  # one group, kept from run to run
"""


@pytest.mark.slow
def test_runs_in_one_process_share_its_group_which_is_left_at_exit(tmp_path):
    data = shards(tmp_path)
    (tmp_path / "two_runs.py").write_text(TWO_RUNS)
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, str(tmp_path / "two_runs.py"), str(data), str(tmp_path / f"exit-{r}"), repr(SETTINGS)],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert [(tmp_path / f"exit-{r}").read_text() for r in range(2)] == ["left", "left"]
    for seed in (0, 1):
        summary = store.read_json(tmp_path / f"seed-{seed}" / "done.json")
        assert summary["status"] == "done" and summary["world_size"] == 2


def test_each_run_reports_its_own_peak_memory(tmp_path):
    """Two runs in one process: the second's peak must not be the first's (here a larger one,
    made by a 1 GiB buffer in between, as a bigger arm earlier in a study would)."""
    from rankscope.run.train import train

    data = shards(tmp_path)
    cfg = apply_overrides(RunConfig(), {**SETTINGS, "data.path": str(data), "train.tokens": 2 * 128})
    import resource

    first = train(cfg, tmp_path / "a", progress=False)
    hog = torch.ones(2**28)  # 1 GiB, touched
    with_hog = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's high-water mark now
    del hog
    second = train(cfg, tmp_path / "b", progress=False)
    assert first["peak_memory_of"] == second["peak_memory_of"] == "run"  # this machine is Linux
    # the process may hold anything before (a whole test session does): what matters is that the
    # second run's peak was counted from its start, below the mark the 1 GiB buffer set
    assert second["peak_memory_bytes"] < with_hog - 2**29
    assert abs(second["peak_memory_bytes"] - first["peak_memory_bytes"]) < 2**28


def test_cuda_runs_count_peak_memory_from_their_start(monkeypatch):
    from rankscope.run import train

    reset = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset.append)
    assert train.reset_peak_memory(torch.device("cuda", 1)) == "run"
    assert reset == [torch.device("cuda", 1)]


def test_nccl_binds_the_process_group_to_the_ranks_gpu(monkeypatch):
    """init_process_group(device_id=...): NCCL then connects at start and never puts a barrier on GPU 0."""
    import torch.distributed as dist

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    assert rdist.world() == rdist.World(1, 2, 1)
    assert calls[0] == ("set_device", 1)
    backend, kw = calls[1]
    assert backend == "nccl" and kw["device_id"] == torch.device("cuda", 1)


def test_a_batch_the_processes_cannot_share_stops_before_anything_is_written(tmp_path, monkeypatch, capsys):
    """8 processes for seed-88m's 4 sequences a step: one line, exit code 2, nothing written."""
    from rankscope.cli import main

    monkeypatch.setattr(rdist, "world", lambda: rdist.World(0, 8, 0))  # rank 0 of 8, without the processes
    out = tmp_path / "out"
    assert main(["run", "qk-4way", "--preset", "seed-88m", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rankscope: error: train.batch_size=4 (8,192 tokens a step) cannot be split over 8 ")
    assert len(err.splitlines()) == 1 and not out.exists()
