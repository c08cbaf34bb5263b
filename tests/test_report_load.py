"""rankscope.report.load: several study folders merged into one study; a damaged table stops the
load with one line naming its file and line (`rankscope report` exits 2), a torn last line is
dropped, and text columns stay text."""

from __future__ import annotations

from pathlib import Path

import pytest
from _studies import N_HEAD, N_LAYER, TOKENS, add_run, make_study

from rankscope.report import load_study, paradox_table
from rankscope.storage.store import run_dir


def test_multiple_study_folders_merge(tmp_path):
    a = make_study(tmp_path / "a", {"qk": "qk", "none": "none"}, [0])
    b = make_study(tmp_path / "b", {"qk": "qk", "none": "none"}, [1])
    study = load_study([a, b])
    assert study.seeds() == [0, 1]
    table = paradox_table(study.scalars, study.probes, finished=study.finished)
    assert table.loc["val loss @ 400", ("qk", "n")] == 2
    assert table.loc["val loss @ 400", ("qk", "mean")] == pytest.approx(5 - 0.4 + 0.01)
    # the same run in two folders: the finished copy wins, and the choice is noted
    add_run(tmp_path / "b", "qk", "qk", 0, tokens=TOKENS[:2], done=False)
    study = load_study([a, b])
    assert len(study.runs) == 4 and any("found twice" in n for n in study.notes)
    assert next(r for r in study.runs if (r.arm, r.seed) == ("qk", 0)).done


# --- damaged tables: one line naming the file and line, exit code 2 -------------------------------


def _report_error(root: Path, capsys) -> tuple[int, str]:
    from rankscope.cli import main

    capsys.readouterr()
    code = main(["report", str(root)])
    return code, capsys.readouterr().err


DAMAGED = "the run's table is damaged: remove the line or rerun the run"


@pytest.mark.parametrize(
    "table, line, raw, replace, what",
    [
        ("probes.csv", 7, b"garbage,1,2", False, "expected 9 fields, got 3"),
        ("probes.csv", 7, b"", False, "an empty line"),
        ("probes.csv", 7, b"\x00\x00\x00\x00", False, "a control character '\\x00'"),  # a zeroed disk block
        ("probes.csv", 5, b"qk,0,1,100,0,1,k,pr_sv,9.5,extra", True, "expected 9 fields, got 10"),
        ("scalars.csv", 3, b"qk,0,1,100,4.9,4.9,,1.0,1.0,1.0", True, "expected 14 fields, got 10"),
        ("probes.csv", 7, b"\x8f\xff\xfe random \xc3(", False, "bytes that are not UTF-8"),
        ("scalars.csv", 4, b"\xe9t\xe9,0,2,200,4.8,4.8,,1.0,1.0,,,2.0,0.0,", True, "bytes that are not UTF-8"),
        ("scalars.csv", 3, b"qk,0,1,lots,4.9,4.9,,1.0,1.0,,,1.0,0.0,", True, "tokens 'lots' is not an integer"),
        ("scalars.csv", 3, b"qk,0,1,,4.9,4.9,,1.0,1.0,,,1.0,0.0,", True, "tokens '' is not an integer"),
        ("probes.csv", 5, b"qk,0,1,100,0,1,k,pr_sv,9.5x", True, "value '9.5x' is not a number"),
        ("probes.csv", 5, b"qk,0,1.5,100,0,1,k,pr_sv,9.5", True, "step '1.5' is not an integer"),
        ("probes.csv", 5, b"qk,0,1,100,0,inf,k,pr_sv,9.5", True, "head 'inf' is not an integer"),
        ("scalars.csv", 3, b"qk,0,1,100,4.9,fast,,1.0,1.0,,,1.0,0.0,", True, "val_loss 'fast' is not a number"),
        ("probes.csv", 5, b"qk,0,1,100,0,1,k\x01,pr_sv,9.5", True, "a control character '\\x01'"),
        (
            "probes.csv",
            1,
            b"arm,seed,step,tokens,layer,head,site,metric,value",
            False,
            "the header again, amid the rows",
        ),
        (
            "probes.csv",
            3,
            b"arm,seed,step,tokens,layer,head,site,metric,value",
            True,
            "the header again, amid the rows",
        ),
        ("probes.csv", 5, b"qk,0,step,100,0,1,k,pr_sv,9.5", True, "step 'step' is not an integer"),
        (
            "probes.csv",
            5,
            b"none,0,1,100,0,1,k,pr_sv,9.5",
            True,
            "arm is 'none' but the table is in the folder of arm 'qk', seed 0",
        ),
        (
            "scalars.csv",
            3,
            b"qk,7,1,100,4.9,4.9,,1.0,1.0,,,1.0,0.0,",
            True,
            "seed is '7' but the table is in the folder of arm 'qk', seed 0",
        ),
        ("scalars.csv", 1, b"a,b,c", True, "the header 'a,b,c' lacks the column(s) step, tokens"),
    ],
)
def test_report_names_the_file_and_line_of_a_damaged_row(tmp_path, capsys, table, line, raw, replace, what):
    root = make_study(tmp_path / "s", {"qk": "qk", "none": "none"}, [0, 1])
    path = run_dir(root, "qk", 0) / table
    # line 1 of a table is its header; inserted at line 1 the damage lands on line 2 after it
    at = line + 1 if (line == 1 and not replace) else line
    lines = path.read_bytes().splitlines(keepends=True)
    lines[at - 1 : at - 1 + replace] = [raw + b"\n"]
    path.write_bytes(b"".join(lines))
    code, err = _report_error(root, capsys)
    assert code == 2
    assert err == f"rankscope: error: {path} line {at}: {what}; {DAMAGED}\n"


def test_report_still_drops_a_torn_last_line(tmp_path, capsys):
    root = make_study(tmp_path / "s", {"qk": "qk", "none": "none"}, [0, 1])
    for table, torn in (("scalars.csv", b"qk,0,5,50"), ("probes.csv", b"qk,0,5,500,0,1,k,pr_\xc3")):
        with open(run_dir(root, "qk", 0) / table, "ab") as f:
            f.write(torn)  # a kill in the middle of a write, even in the middle of a UTF-8 character
    code, err = _report_error(root, capsys)
    assert code == 0 and err == ""
    s = load_study(root)
    assert s.scalars["tokens"].max() == 400 and len(s.probes) == 2 * 2 * len(TOKENS) * N_LAYER * N_HEAD


def test_an_arm_named_like_a_number_stays_text(tmp_path):
    """Text columns are read as text: an arm "001" is not the integer 1, so its rows are its own."""
    root = make_study(tmp_path / "s", {"001": "qk"}, [0])
    (run_dir(root, "001", 0) / "config.json").unlink()  # the arm then comes from the folder and the rows
    s = load_study(root)
    assert [r.arm for r in s.runs] == ["001"] and set(s.probes["arm"]) == {"001"}


def test_quoted_fields_are_read_and_checked_too(tmp_path, capsys):
    """An arm name with a comma is quoted in the tables: rows are then found by the csv module."""
    root = make_study(tmp_path / "s", {"a,b": "qk"}, [0])
    s = load_study(root)
    assert set(s.scalars["arm"]) == {"a,b"} and len(s.probes) == len(TOKENS) * N_LAYER * N_HEAD
    path = run_dir(root, "a,b", 0) / "probes.csv"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[3] = b'"a,b",0,1,100,0,1,k,pr_sv\n'
    path.write_bytes(b"".join(lines))
    code, err = _report_error(root, capsys)
    assert (code, err) == (2, f"rankscope: error: {path} line 4: expected 9 fields, got 8; {DAMAGED}\n")
    lines[3] = b'"a,c",0,1,100,0,1,k,pr_sv,9.5\n'
    path.write_bytes(b"".join(lines))
    code, err = _report_error(root, capsys)
    msg = f"line 4: arm is 'a,c' but the table is in the folder of arm 'a,b', seed 0; {DAMAGED}\n"
    assert (code, err) == (2, f"rankscope: error: {path} {msg}")
