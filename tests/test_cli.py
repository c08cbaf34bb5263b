"""The command line end to end: a tiny study, a killed-and-rerun study, and every kind of bad input."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _corpus import write_corpus
from _tolerances import U32

from rankscope.cli import main
from rankscope.storage import store

SMALL = """
[settings]
model.n_layer = 2
model.d_model = 64
model.n_head = 1
model.n_kv_head = 1
model.d_mlp = 128
model.vocab_size = 512
train.batch_size = 4
train.seq_len = 64
train.eval_batches = 2
probe.batch_size = 4
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small text folder: sentences from a toy grammar, enough for a 512-token BPE."""
    return write_corpus(tmp_path_factory.mktemp("corpus"), files=12, lines=400, steps=True)


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RANKSCOPE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def write_study(path: Path, arms: str, tokens: str = "2048", every: str = "1024", seeds: str = "[0]") -> Path:
    path.write_text(
        f'description = "test"\ntokens = "{tokens}"\neval_every = "{every}"\nseeds = {seeds}\n{SMALL}\n{arms}'
    )
    return path


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path, corpus, capsys):
    study = write_study(
        tmp_path / "s.toml",
        '[arms.frozen]\nmodel.qk_norm = "frozen"\n'
        '[arms.free]\nmodel.qk_norm = "parameter_free"\n'
        '[arms.none]\nmodel.qk_norm = "none"\n',
        seeds="[0, 1]",
    )
    out = tmp_path / "out"
    assert main(["run", str(study), "--data", str(corpus), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "val loss @" in printed and "mean key PR @" in printed and "report:" in printed

    scalars, probes = store.load_scalars(out), store.load_probes(out)
    assert sorted(scalars["tokens"].unique()) == [0, 1024, 2048]
    assert len(scalars) == 3 * 2 * 3  # arms x seeds x eval points
    # every layer x head x metric at every eval point of every run, for the keys
    k = probes[
        (probes.site == "k")
        & (probes["head"] >= 0)
        & probes.metric.isin(["pr_sv", "pr_eig", "erank", "stable_rank", "r90"])
    ]
    assert len(k) == 3 * 2 * 3 * 2 * 1 * 5
    assert k["value"].between(1, 64).all()
    # downstream evaluations: scalars at every point, functional rank at the end
    assert scalars["icl_score"].notna().all() and scalars["induction_loss"].notna().all()
    fr = probes[probes.metric == "functional_rank"]
    assert sorted(fr["tokens"].unique()) == [2048] and fr["value"].between(1, 64).all()
    assert set(probes[probes.site == "attn"]["metric"]) >= {"entropy", "max_logit", "induction_score"}
    assert {"w_q", "w_k"} <= set(probes["site"])
    # frozen gain (= 1) and no gain are the same function: identical init and batches make
    # identical trajectories, which only holds if arms really share weights and data order. Bitwise:
    # both arms run the same ops on the same numbers (x̂ · 1.0 is exactly x̂, and the frozen gain is in
    # no optimizer group), and the table holds each float's shortest exact repr
    a = scalars[scalars.arm == "frozen"].sort_values(["seed", "tokens"])
    b = scalars[scalars.arm == "free"].sort_values(["seed", "tokens"])
    np.testing.assert_array_equal(a["val_loss"].to_numpy(), b["val_loss"].to_numpy())
    # without QK-Norm the function differs, by far more than round-off: one val loss, a float32 mean
    # over 2 x 4 rows x 64 positions of token losses (each a log-sum-exp of V = 512 exponentials), could
    # move by about (512 + 8 + 64) u if summed in other orders; the arms must differ by more than twice that
    c = scalars[scalars.arm == "none"].sort_values(["seed", "tokens"])
    rtol = 2 * (512 + 8 + 64) * U32
    assert not np.allclose(a["val_loss"].to_numpy()[1:], c["val_loss"].to_numpy()[1:], rtol=rtol, atol=0)
    # different seeds: different initial weights
    s0, s1 = a[a.seed == 0]["val_loss"].to_numpy(), a[a.seed == 1]["val_loss"].to_numpy()
    assert s0[0] != s1[0]

    report = (out / "report.md").read_text()
    assert "| val loss @" in report
    for png in ["loss_pr.png", "layer_pr_arms.png", "pr_heatmap_arms.png"]:
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "none" / "seed-1" / "config.json").read_text())
    assert config["model"]["qk_norm"] == "none" and config["seed"] == 1
    prov = json.loads((out / "none" / "seed-1" / "provenance.json").read_text())
    assert {"git_commit", "git_dirty", "torch", "device", "seed"} <= set(prov)

    # a rerun skips everything; `rankscope report` rewrites the report from the tables
    mtime = (out / "none" / "seed-1" / "done.json").stat().st_mtime_ns
    assert main(["run", str(study), "--data", str(corpus), "--out", str(out), "--no-progress"]) == 0
    assert "6 of 6 runs already finished" in capsys.readouterr().err
    assert (out / "none" / "seed-1" / "done.json").stat().st_mtime_ns == mtime
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").exists()

    # changing a setting of finished runs is refused, not silently mixed
    assert (
        main(
            [
                "run",
                str(study),
                "--data",
                str(corpus),
                "--out",
                str(out),
                "--no-progress",
                "--set",
                "optim.muon_lr=0.02",
            ]
        )
        == 2
    )
    assert "finished with different settings (optim.muon_lr)" in capsys.readouterr().err


@pytest.mark.slow
def test_killed_study_keeps_rows_and_rerun_redoes_only_the_broken_run(tmp_path, corpus):
    study = write_study(
        tmp_path / "s.toml",
        '[arms.a]\nmodel.qk_norm = "learned"\n[arms.b]\nmodel.qk_norm = "none"\n',
        tokens="60K",
        every="4096",
    )
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "rankscope",
        "run",
        str(study),
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--no-progress",
        "--no-report",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    b_scalars = out / "b" / "seed-0" / "scalars.csv"
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until run a is finished and run b has written rows
        if b_scalars.exists() and b_scalars.read_text().count("\n") >= 3:
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert store.is_done(out / "a" / "seed-0") and not store.is_done(out / "b" / "seed-0")
    partial = store.load_scalars(out)
    assert len(partial[partial.arm == "b"]) >= 2  # rows written before the kill are readable
    assert store.load_probes(out)["value"].notna().all()
    done_a = (out / "a" / "seed-0" / "done.json").stat().st_mtime_ns
    rows_a = (out / "a" / "seed-0" / "scalars.csv").read_bytes()

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "1 of 2 runs already finished" in rerun.stderr
    assert (out / "a" / "seed-0" / "done.json").stat().st_mtime_ns == done_a
    assert (out / "a" / "seed-0" / "scalars.csv").read_bytes() == rows_a
    full = store.load_scalars(out)
    b = full[full.arm == "b"]
    assert b["tokens"].is_unique and b["tokens"].max() >= 60_000  # redone from the start, no duplicates
    assert len(b) == len(full[full.arm == "a"])


def test_torn_last_line_is_dropped(tmp_path):
    rs = store.RunStore(tmp_path / "r")
    rs.scalars.append([dict(arm="x", seed=0, step=0, tokens=0, train_loss=1.5, val_loss=2.5)])
    rs.close()
    with open(tmp_path / "r" / "scalars.csv", "a") as f:
        f.write("x,0,1,40")  # a write cut off by a kill
    df = store.load_scalars(tmp_path)
    assert len(df) == 1 and df["val_loss"].iloc[0] == 2.5


def bad_shard(path: Path) -> Path:
    header = np.zeros(256, dtype=np.int32)
    header[:3] = (20240520, 7, 10)  # version 7
    path.write_bytes(header.tobytes() + np.arange(10, dtype=np.uint16).tobytes())
    return path


def fake_study(root: Path) -> Path:
    """A study folder as `rankscope report` finds one (a run's scalars table), without training."""
    run = root / "study" / "a" / "seed-0"
    run.mkdir(parents=True)
    (run / "scalars.csv").write_text("arm,seed,step,tokens\na,0,0,0\n")
    return root / "study"


@pytest.mark.parametrize(
    "case,needle",
    [
        ("malformed", "not valid TOML"),
        ("unknown_top", "unknown key 'colour'"),
        ("unknown_override", "unknown setting 'model.qk_nrom'"),
        ("wrong_type", "model.n_layer must be an integer from 1 to 1,024, got 'four'"),
        ("bad_value", "model.qk_norm must be"),
        ("no_arms", "no arms"),
        ("bad_seeds", "seeds must be a non-empty list of integers"),
        ("missing_study", "no built-in study or study file named"),
        ("missing_data", "--data: no such file or folder"),
        ("bad_shard", "version 7"),
        ("bad_set", "--set expects key=value"),
        ("bad_tokens", "--tokens must be an integer from 1 to 2^63 - 1 (a token count such as 2M), got 'lots'"),
        ("zero_tokens", "--tokens must be an integer from 1 to 2^63 - 1 (a token count such as 2M), got '0'"),
        ("huge_tokens", "--tokens must be an integer from 1 to 2^63 - 1 (a token count such as 2M), got '1e400'"),
        ("schedule_too_long", "train.eval_every (100,000) makes 10,000,000,000 evaluations, more than 100,000"),
        ("beta", "optim.adamw_beta1 must be a number >= 0 and < 1, got '1.5'"),
        ("init_std", "model.init_std must be a number > 0 and <= 1, got '-1'"),
        ("muon_lr", "optim.muon_lr must be a finite number >= 0, got '-0.01'"),
        ("nan", "optim.grad_clip must be a finite number >= 0, got 'nan'"),
        ("negative_seed", "--seeds must be an integer from 0 to 2^63 - 1, got -1"),
        ("huge_seed", "--seeds must be an integer from 0 to 2^63 - 1, got 99999999999999999999999"),
        ("duplicate_seeds", "--seeds: seed 0 is given twice; each seed is one run of every arm"),
        ("seed_setting", "'seed' cannot be set on the command line: each run's seed comes from the study's seeds"),
        ("file_seeds", "seeds: seed 1 is given twice"),
        ("file_negative_seed", "seeds must be an integer from 0 to 2^63 - 1, got -1"),
        ("file_tokens", "tokens must be an integer from 1 to 2^63 - 1 (a token count such as 2M), got -5"),
        ("file_name", "name '../up' must be a folder name"),
        ("arm_name", "arm name 'a\\n' must be letters, digits"),
        ("shard_range", "--shard '5/5': need 0 <= i < n"),
        ("out_is_file", "not a folder; choose another --out"),
        ("out_under_file", "is a file); choose another --out"),
        ("report_out_is_file", "not a folder; choose another --out"),
        ("bench_tokens", "--tokens must be an integer from 1 to 2^63 - 1 (a token count such as 2M), got 'abc'"),
        ("bench_zero_tokens", "got '0'"),
        ("bench_negative_tokens", "got '-5'"),
        ("unknown_preset", "unknown preset 'huge'"),
        ("missing_report_dir", "no such study folder"),
    ],
)
def test_bad_input_gets_one_clear_line_and_exit_2(tmp_path, capsys, case, needle):
    arms = '[arms.a]\nmodel.qk_norm = "learned"\n'
    s = tmp_path / "s.toml"
    args = {
        "malformed": lambda: s.write_text("preset = [unclosed\n") and ["run", str(s)],
        "unknown_top": lambda: s.write_text(f'colour = "red"\n{arms}') and ["run", str(s)],
        "unknown_override": lambda: s.write_text('[arms.a]\nmodel.qk_nrom = "none"\n') and ["run", str(s)],
        "wrong_type": lambda: s.write_text('[arms.a]\nmodel.n_layer = "four"\n') and ["run", str(s)],
        "bad_value": lambda: s.write_text('[arms.a]\nmodel.qk_norm = "maybe"\n') and ["run", str(s)],
        "no_arms": lambda: s.write_text('preset = "tiny"\n') and ["run", str(s)],
        "bad_seeds": lambda: s.write_text(f'seeds = ["one"]\n{arms}') and ["run", str(s)],
        "missing_study": lambda: ["run", str(tmp_path / "nope.toml")],
        "missing_data": lambda: ["run", "--data", str(tmp_path / "nowhere")],
        "bad_shard": lambda: ["run", "--data", str(bad_shard(tmp_path / "x.bin")), "--out", str(tmp_path / "o")],
        "bad_set": lambda: ["run", "--set", "model.qk_norm"],
        "bad_tokens": lambda: ["run", "--tokens", "lots"],
        "zero_tokens": lambda: ["run", "--tokens", "0"],
        "huge_tokens": lambda: ["run", "--tokens", "1e400"],
        "schedule_too_long": lambda: ["run", "--tokens", "1e15"],
        "beta": lambda: ["run", "--set", "optim.adamw_beta1=1.5"],
        "init_std": lambda: ["run", "--set", "model.init_std=-1"],
        "muon_lr": lambda: ["run", "--set", "optim.muon_lr=-0.01"],
        "nan": lambda: ["run", "--set", "optim.grad_clip=nan"],
        "negative_seed": lambda: ["run", "--seeds", "-1"],
        "huge_seed": lambda: ["run", "--seeds", "99999999999999999999999"],
        "duplicate_seeds": lambda: ["run", "--seeds", "0", "1", "0"],
        "seed_setting": lambda: ["run", "--set", "seed=3"],
        "file_seeds": lambda: s.write_text(f"seeds = [1, 2, 1]\n{arms}") and ["run", str(s)],
        "file_negative_seed": lambda: s.write_text(f"seeds = [-1]\n{arms}") and ["run", str(s)],
        "file_tokens": lambda: s.write_text(f"tokens = -5\n{arms}") and ["run", str(s)],
        "file_name": lambda: s.write_text(f'name = "../up"\n{arms}') and ["run", str(s)],
        "arm_name": lambda: s.write_text('[arms."a\\n"]\nmodel.qk_norm = "none"\n') and ["run", str(s)],
        "shard_range": lambda: ["run", "--shard", "5/5"],
        "out_is_file": lambda: s.write_text("x") and ["run", "--out", str(s)],
        "out_under_file": lambda: s.write_text("x") and ["run", "--out", str(s / "sub")],
        "report_out_is_file": lambda: s.write_text("x") and ["report", str(fake_study(tmp_path)), "--out", str(s)],
        "bench_tokens": lambda: ["bench", "--tokens", "abc"],
        "bench_zero_tokens": lambda: ["bench", "--tokens", "0"],
        "bench_negative_tokens": lambda: ["bench", "--tokens=-5"],
        "unknown_preset": lambda: ["run", "--preset", "huge"],
        "missing_report_dir": lambda: ["report", str(tmp_path / "nothing")],
    }[case]()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err, err
    assert len(err.splitlines()) == 1 and err.startswith("rankscope: error:")


def test_real_process_exit_code_and_no_traceback(tmp_path):
    s = tmp_path / "s.toml"
    s.write_text("[arms.a]\nmodel.qk_norm = 1\n")
    r = subprocess.run([sys.executable, "-m", "rankscope", "run", str(s)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip() == (
        "rankscope: error: study s, arm a: model.qk_norm must be learned, frozen, parameter_free or none, got 1"
    )


def test_list_shows_studies_and_presets(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "qk-muon" in out and "qk-4way" in out and "gamma" in out and "seed-88m" in out and "model.qk_norm" in out
    assert "muon-grouping" in out and "optim.muon_qkvo" in out
    assert "differs from the seed's 88M study in: none" in out  # seed-88m is the seed's run


def test_a_shard_with_no_run_says_so_and_exits_0(tmp_path, capsys):
    """An array job larger than the study is normal: its extra tasks say so in one line, exit 0
    and write nothing."""
    out = tmp_path / "out"
    assert main(["run", "--shard", "3/5", "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err.strip()
    assert err == (
        "rankscope: --shard 3/5 holds no run: study qk-muon has 2 run(s) (1 seed(s) x 2 arm(s)), so only slices "
        "0..1 have work; nothing to do"
    )
    assert not out.exists()


def test_diverged_runs_exit_1_naming_them(tmp_path, capsys, monkeypatch):
    """run_study returns a summary per run of the slice, finished now or before; any diverged one
    makes the command exit 1 after the rest of the study."""
    summaries = [
        {"status": "done", "arm": "qk-norm", "seed": 0},
        {"status": "diverged", "arm": "no-norm", "seed": 0, "message": "loss is nan"},
    ]
    monkeypatch.setattr("rankscope.run.study.run_study", lambda *a, **k: summaries)
    assert main(["run", "--out", str(tmp_path / "o"), "--no-report"]) == 1
    assert capsys.readouterr().err.strip() == "rankscope: error: 1 run(s) diverged: no-norm seed 0"
    monkeypatch.setattr("rankscope.run.study.run_study", lambda *a, **k: summaries[:1])
    assert main(["run", "--out", str(tmp_path / "o"), "--no-report"]) == 0


@pytest.mark.parametrize(
    "error,line",
    [
        (
            OSError(errno.EROFS, "Read-only file system", "/x/y"),
            "rankscope: error: cannot write /x/y: Read-only file system ([Errno 30]); choose another --out",
        ),
        (
            OSError(errno.ENOSPC, "No space left on device", "/x/.study.json.123.0123abcd.tmp"),
            "rankscope: error: cannot write /x: No space left on device ([Errno 28]); free some space or choose "
            "another --out",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/x/a"),
            "rankscope: error: cannot access /x/a: Permission denied ([Errno 13]); check its permissions or choose "
            "another --out",
        ),
        (
            NotADirectoryError(errno.ENOTDIR, "Not a directory", "/x/f/a"),
            "rankscope: error: cannot use /x/f/a: Not a directory ([Errno 20]); choose another --out",
        ),
        (OSError(errno.EIO, "Input/output error", "/x/z"), "rankscope: error: /x/z: Input/output error ([Errno 5])"),
    ],
)
def test_file_system_faults_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, error, line):
    def fail(*a, **k):
        raise error

    monkeypatch.setattr("rankscope.run.study.run_study", fail)
    assert main(["run", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == line
    # `report --out` goes the same way
    monkeypatch.setattr("rankscope.report.write_report", fail)
    assert main(["report", str(fake_study(tmp_path)), "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip() == line


def test_read_only_out_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch):
    # as root every folder is writable, so the file system's answer is imitated
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    assert main(["run", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"rankscope: error: --out {tmp_path / 'o'}: cannot write in {tmp_path} (read-only or not permitted); "
        "choose another --out"
    )


def test_closed_pipe_exits_quietly():
    """`rankscope list | head -1`: the reader is gone before rankscope writes; no traceback."""
    p = subprocess.Popen([sys.executable, "-m", "rankscope", "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # before the interpreter has even started: every write meets a closed pipe
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and err == ""


def test_a_run_folder_whose_config_is_not_json_is_one_line(tmp_path, capsys):
    study = write_study(tmp_path / "s.toml", '[arms.a]\nmodel.qk_norm = "none"\n')
    run = tmp_path / "out" / "a" / "seed-0"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{not json")
    assert main(["run", str(study), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "config.json: not valid JSON" in err and "Traceback" not in err
    assert (run / "config.json").read_text() == "{not json"  # nothing written over it


def test_hostile_study_files_are_one_line(tmp_path, capsys):
    """A study file is user input: what the TOML parser itself cannot hold ends in one line naming
    the file and the line, exit 2, never a RecursionError or int-conversion traceback."""
    cases = {
        "deep.toml": ("tokens = '1M'\nx = " + "[" * 5000 + "]" * 5000 + "\n", "line 2: values nested 5,000 deep"),
        "tables.toml": ("x = " + "{a = " * 3000 + "1" + "}" * 3000 + "\n", "line 1: values nested 3,000 deep"),
        "digits.toml": ("seeds = [0]\ntokens = " + "9" * 5000 + "\n", "line 2: an integer literal of 5,000 digits"),
    }
    for name, (text, words) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        assert main(["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(path) in err[0] and words in err[0], err
        assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize(
    "device, words",
    [("mps", "train.device=mps but MPS"), ("cuda:3", "train.device=cuda:3 but ")],
)
def test_a_device_this_machine_lacks_is_one_line_before_anything_is_written(tmp_path, capsys, device, words):
    out = tmp_path / "out"
    assert main(["run", "--set", f"train.device={device}", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not out.exists()
