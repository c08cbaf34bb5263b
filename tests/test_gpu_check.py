"""benchmarks/gpu_check.py: one verdict line per check, a summary line, an exit code that says
whether anything failed, and a failing, crashing or hanging check that leaves the others running.
The dry run takes every check's code path on the CPU at tiny sizes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
NAMES = ["compile-step", "bench-seed-88m", "probe-eig", "eval-group", "resume-memory", "seed-1.5b-memory", "study"]
VERDICT = re.compile(r"^(PASS|FAIL) ([\w.-]+): (.+) \[\d+ s\]$")


def dry_run(tmp_path: Path, *args: str, fail: str = "") -> tuple[int, list[str]]:
    env = {**os.environ, "GPU_CHECK_FAIL": fail}
    cmd = [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path / "out"), *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=800)
    return p.returncode, p.stdout.splitlines()


def verdicts(lines: list[str]) -> dict[str, tuple[str, str]]:
    """name -> (PASS or FAIL, figure) for every verdict line; the lines are nothing else than a
    header (#), the verdicts and the summary."""
    assert lines[0].startswith("# gpu_check on the CPU")
    found = {}
    for line in lines[1:-1]:
        m = VERDICT.match(line)
        assert m, f"not a verdict line: {line!r}"
        assert m[2] not in found, f"two lines for {m[2]}"
        found[m[2]] = (m[1], m[3])
    return found


def test_the_shell_wrapper_is_a_thin_call_without_set_e():
    text = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    assert "gpu_check.py" in text and "set -e" not in text.replace("`set -e`", "")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_failing_and_a_crashing_check_leave_the_others_running_and_fail_the_exit_code(tmp_path):
    rc, lines = dry_run(tmp_path, fail="seed-1.5b-memory,study:exit")
    found = verdicts(lines)
    assert list(found) == NAMES  # every check, in order, once
    assert found["seed-1.5b-memory"] == ("FAIL", "RuntimeError: injected failure (GPU_CHECK_FAIL)")
    assert found["study"][0] == "FAIL" and "exited with code 3 and no verdict" in found["study"][1]
    for name in NAMES[:5]:
        assert found[name][0] == "PASS", found[name]
    assert lines[-1] == "5 PASS, 2 FAIL" and rc == 1
    out = tmp_path / "out"
    assert (out / "verdict.txt").read_text().splitlines() == lines[1:]
    assert "Traceback" in (out / "seed-1.5b-memory.txt").read_text()  # the details go to the log
    # the figures of the checks that ran: agreement within tolerance, the bench's table in its log
    assert found["compile-step"][1].startswith("loss differs by")
    assert "tokens/s (training, steady state)" in (out / "bench-seed-88m.txt").read_text()
    assert "agree 0e+00" in found["probe-eig"][1] and "Grams under TF32 ok" in found["probe-eig"][1]
    assert found["eval-group"][1].startswith("2 batches: one forward each")
    assert "final val loss differs by 0.0e+00" in found["resume-memory"][1]  # CPU float32: bitwise
    # small text files only
    assert all(p.suffix in (".txt", ".md") and p.stat().st_size < 1_000_000 for p in out.iterdir())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_memory_extrapolation_and_the_study_pass_and_write_the_report(tmp_path):
    rc, lines = dry_run(tmp_path, "--only", "seed-1.5b-memory,study")
    found = verdicts(lines)
    assert list(found) == ["seed-1.5b-memory", "study"] and lines[-1] == "2 PASS, 0 FAIL" and rc == 0
    assert re.search(
        r"tiny \(4 layers, from 1 and 2\): step [\d.]+ GiB, evaluation [\d.]+ GiB", found["seed-1.5b-memory"][1]
    )
    assert "2 of 2 runs" in found["study"][1]
    assert (tmp_path / "out" / "study-report.md").read_text().startswith("#")


@pytest.mark.slow
def test_a_hanging_check_is_killed_at_the_deadline_and_later_ones_are_not_run(tmp_path):
    rc, lines = dry_run(tmp_path, "--only", "probe-eig,study", "--budget", "15", fail="probe-eig:hang")
    found = verdicts(lines)
    assert found["probe-eig"][0] == "FAIL" and found["probe-eig"][1].startswith("timed out after 15 s")
    assert found["study"] == ("FAIL", "not run, the 15 s budget was spent")
    assert lines[-1] == "0 PASS, 2 FAIL" and rc == 1


def test_an_unknown_check_name_is_refused(tmp_path):
    rc, _ = dry_run(tmp_path, "--only", "nope")
    assert rc == 2
