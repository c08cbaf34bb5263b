"""The command line as a terminal user meets it: a light --help, every option explained, `list`
with what each setting accepts, tables fitted to the terminal, the progress bar, and what a run
names at its end."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from _corpus import write_corpus

from rankscope.cli import _parser, main
from rankscope.cli_text import report_files, settings_lines
from rankscope.report.format import text_table, text_width
from rankscope.run.progress import RunBar, StudyProgress, fmt_duration, measured_text, tokens_left
from rankscope.settings.config import RunConfig, known_keys


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RANKSCOPE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def fresh_python(code: str) -> subprocess.CompletedProcess:
    """`code` in a new interpreter, so no other test's imports are in sys.modules."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


# --- --help is light --------------------------------------------------------------------------


def test_building_the_parser_imports_neither_torch_nor_pandas():
    r = fresh_python(
        "import rankscope.cli, sys; rankscope.cli._parser(); print('torch' in sys.modules, 'pandas' in sys.modules)"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False False"


@pytest.mark.parametrize(
    "command",
    [
        "",
        "run",
        "report",
        "list",
        "bench",
        "analyze",
        "data",
        "data prepare",
    ],
)
def test_help_of_every_command_imports_neither_torch_nor_pandas(command):
    r = fresh_python(
        "import sys\nfrom rankscope.cli import main\n"
        f"try:\n    main({command.split()!r} + ['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "print('torch' in sys.modules, 'pandas' in sys.modules, file=sys.stderr)"
    )
    assert r.returncode == 0, r.stderr
    assert "usage: rankscope" in r.stdout
    assert r.stderr.strip().splitlines()[-1] == "False False"


def subparsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("rankscope",)):
    """(path, parser) for the parser and every subcommand's, with their arguments added."""
    if hasattr(parser, "installed"):
        parser.installed()
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from subparsers(sub, (*path, name))


def test_every_option_and_command_has_help():
    seen = set()
    for path, parser in subparsers(_parser()):
        seen.add(" ".join(path))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert choice.help, f"{' '.join(path)} {choice.dest}: no help"
            else:
                assert action.help and action.help != argparse.SUPPRESS, f"{' '.join(path)} {action.dest}: no help"
    assert {"rankscope bench", "rankscope analyze", "rankscope data prepare", "rankscope run"} <= seen


def test_lazily_added_arguments_parse_help_and_refuse_as_before(capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--tokens N" in out and "training tokens to time" in out and "no progress bars" in out
    with pytest.raises(SystemExit) as e:
        main(["bench", "--preset"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: rankscope bench" in err and "argument --preset: expected one argument" in err
    # help wraps at spaces only: names stay whole
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    flat = " ".join(out.split())  # argparse wraps help at the terminal's width
    assert "(default: qk-muon)" in flat and "tiny, deep, seed-88m, seed-1.5b" in flat
    args = _parser().parse_args(["bench", "--preset", "tiny", "--set", "train.compile=off"])
    assert (args.command, args.preset, args.overrides) == ("bench", "tiny", ["train.compile=off"])
    args = _parser().parse_args(["analyze", "some/run", "--sites", "k,q"])
    assert (args.path, args.sites, args.device) == ("some/run", "k,q", "auto")


# --- rankscope list -------------------------------------------------------------------------------


def setting_line(lines: list[str], key: str) -> str:
    return next(line for line in lines if line.startswith(f"  {key} "))


def test_list_shows_each_setting_with_type_default_and_what_it_accepts():
    lines = settings_lines(120)
    cfg = RunConfig()
    for key in known_keys(cfg):
        default = cfg
        for part in key.split("."):
            default = getattr(default, part)
        line = setting_line(lines, key)
        shown = line.split()[2]
        if isinstance(default, bool):
            assert shown == str(default).lower()
        elif isinstance(default, tuple):
            assert shown.split(",") == list(default) if default else shown == '""'
        elif isinstance(default, str):
            assert shown == (default or '""')
        else:
            assert type(default)(shown) == default, (key, shown)
    assert setting_line(lines, "model.n_layer").split() == ["model.n_layer", "int", "4", "1", "to", "1,024"]
    assert setting_line(lines, "model.qk_norm").split(None, 3)[1:] == [
        "choice",
        "learned",
        "learned | frozen | parameter_free | none",
    ]
    assert setting_line(lines, "optim.adamw_beta1").split(None, 3)[1:] == ["float", "0.9", ">= 0 and < 1"]
    assert setting_line(lines, "model.init_std").endswith("> 0 and <= 1")
    assert setting_line(lines, "optim.muon_lr").endswith(">= 0")
    assert setting_line(lines, "train.tokens").endswith("1 to 2^63 - 1 (a token count such as 2M)")
    assert setting_line(lines, "train.device").endswith("auto, cpu, mps, cuda or cuda:N")
    assert setting_line(lines, "model.scaled_residual_init").split()[1:] == ["bool", "false", "true", "|", "false"]
    sites = setting_line(lines, "probe.sites")
    assert sites.split()[1:3] == ["list", "k"] and sites.endswith(
        "comma-separated, each once: q_pre | q | k_pre | k | v | o"
    )
    # a default too long for its column: what the setting accepts goes on the next line
    i = lines.index(setting_line(lines, "model.norm_eps"))
    assert lines[i].split() == ["model.norm_eps", "float", repr(RunConfig().model.norm_eps)]
    assert lines[i + 1].strip() == "> 0 and <= 1"


def test_list_choices_follow_the_config_annotations(monkeypatch):
    """The text comes from the annotations, not from a copy: a new choice shows up by itself."""
    import rankscope.settings.config as config

    real = config.field_type

    def field_type(key):
        if key == "optim.schedule":
            return typing.Literal["constant", "cosine", "linear", "wsd"]
        return real(key)

    monkeypatch.setattr(config, "field_type", field_type)
    assert setting_line(settings_lines(120), "optim.schedule").endswith("constant | cosine | linear | wsd")


@pytest.mark.parametrize("columns", [80, 100, 120])
def test_list_fits_the_terminal(capsys, monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", str(columns))
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    too_wide = [line for line in lines if len(line) > columns]
    assert too_wide == []
    for heading in ("studies", "presets", "corpora", "settings"):
        assert any(line.startswith(heading) for line in lines), heading
    corpora = lines[next(i for i, line in enumerate(lines) if line.startswith("corpora")) + 1]
    assert corpora.split()[0] == "sotu" and re.search(r"\d MB", "\n".join(lines))
    assert all(setting_line(lines, key) for key in known_keys())


def test_list_and_help_into_a_closed_pipe_exit_0_quietly():
    """`rankscope list | head`: the reader is gone; neither a traceback nor a failing status."""
    for args in (["list"], ["--help"]):
        p = subprocess.Popen([sys.executable, "-m", "rankscope", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        p.stdout.close()  # before the interpreter has started: every write meets a closed pipe
        err = p.stderr.read().decode()
        assert (p.wait(timeout=120), err) == (0, "")


def test_list_into_head_under_pipefail():
    r = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {sys.executable} -m rankscope list | head -n 2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout.splitlines()[0].startswith("studies")


# --- tables fitted to the terminal ----------------------------------------------------------------

HEADER = ["quantity", "qk-norm-muon", "no-norm-muon", "qk-norm-adamw", "no-norm-adamw"]
ROWS = [
    ["val loss @ 102k", "4.233 [4.220, 4.246] *", "4.301 [4.280, 4.322]", "4.412 [4.390, 4.434]", "4.5"],
    ["mean key PR @ 102k", "41.2 [40.1, 42.3]", "52.0 [50.2, 53.8] *", "39.9 [38.0, 41.8]", "48.1"],
]


def test_a_wide_table_is_printed_in_parts_that_fit():
    whole = text_table(HEADER, ROWS)
    assert max(map(len, whole)) > 100 and len(whole) == 4  # one table: header, rule, two rows
    for width in (60, 80, 100):
        lines = text_table(HEADER, ROWS, width)
        assert max(map(len, lines)) <= width
        parts = "\n".join(lines).split("\n\n")
        assert len(parts) > 1
        for part in parts:  # each part: the row labels, then whole columns
            rows = part.splitlines()
            assert rows[0].startswith("quantity") and rows[2].startswith("val loss @ 102k")
            assert rows[3].startswith("mean key PR @ 102k")
        text = "\n".join(lines)
        for cell in [*HEADER[1:], *ROWS[0][1:], *ROWS[1][1:]]:  # every cell, once
            assert len(re.findall(re.escape(cell) + r"(?![\d\]])", text)) == 1, cell
    assert text_table(HEADER, ROWS, 500) == whole
    # a column wider than the terminal on its own still gets printed, in a part of its own
    assert len("\n".join(text_table(HEADER, ROWS, 20)).split("\n\n")) == 4


def test_text_width_applies_to_tables_made_inside_it():
    with text_width(80):
        inside = text_table(HEADER, ROWS)
        with text_width(None):
            assert text_table(HEADER, ROWS) == text_table(HEADER, ROWS, 10**6)
    assert max(map(len, inside)) <= 80
    assert text_table(HEADER, ROWS) == text_table(HEADER, ROWS, 10**6)  # reset on the way out


def test_the_end_of_a_run_fits_the_terminal_and_names_every_file(tmp_path, capsys, monkeypatch):
    """`run` and `report` print the paradox table fitted to the terminal (the sentences around it
    wrapped under their indent), then report.md, report.html and plots/."""
    import rankscope.cli_text as cli_text
    import rankscope.report as report

    sentence = "  val loss  " + " ".join(["qk-norm-muon − no-norm-muon: −0.079 (1 seed: no interval possible)"] * 3)
    monkeypatch.setattr(report, "paradox_text", lambda dirs: "\n".join([*text_table(HEADER, ROWS), "", sentence]))
    md = tmp_path / "report.md"
    md.write_text("# r")
    for width in (80, None):
        monkeypatch.setattr(cli_text, "table_width", lambda w=width: w)
        cli_text.print_report(tmp_path, md)
        out = capsys.readouterr().out
        lines = out.splitlines()
        assert lines[-1] == f"report: {md}"
        if width is not None:
            assert max(map(len, lines)) <= width
            assert out.count("quantity") == "\n".join(text_table(HEADER, ROWS, width)).count("quantity") > 1
            first = next(i for i, line in enumerate(lines) if line.startswith("  val loss  "))
            assert re.match(r"    \S", lines[first + 1])  # wrapped under its indent, plus two
            assert " ".join(out.split()).count("no interval possible") == 3
        else:
            assert out.count("quantity") == 1 and sentence in lines


# --- the end of a run names what it wrote ----------------------------------------------------------


def test_report_files_names_what_is_there(tmp_path):
    md = tmp_path / "report.md"
    assert report_files(md) == []
    md.write_text("# r")
    assert report_files(md) == [f"report: {md}"]
    (tmp_path / "report.html").write_text("<html>")
    (tmp_path / "plots").mkdir()
    for name in ("a.png", "b.png", "notes.txt"):
        (tmp_path / "plots" / name).write_text("x")
    assert report_files(md) == [
        f"report: {md}",
        f"        {tmp_path / 'report.html'} (figures embedded)",
        f"plots:  {tmp_path / 'plots'}{os.sep} (2 figures)",
    ]


# --- the progress bar -----------------------------------------------------------------------------


def test_measured_values_leave_out_what_has_no_value_yet():
    nan = float("nan")
    assert measured_text(nan, 8.3491, 59.54) == "val=8.349 pr=59.5"  # before the first step: no loss=nan
    assert measured_text(3.41234, 3.5, nan) == "loss=3.412 val=3.500"
    assert measured_text(nan, nan, nan) == ""


def test_study_time_left_counts_this_run_and_the_later_ones():
    now = [100.0]
    study = StudyProgress([1000, 1000, 500], clock=lambda: now[0])
    assert study.eta_s(1000) is None  # no token yet
    study.start_run(1)
    now[0] = 110.0
    study.trained = 250  # 25 tokens/s so far
    assert study.eta_s(750) == pytest.approx((750 + 1000 + 500) / 25)
    study.start_run(2)  # the first run's leftovers are no longer counted
    assert study.eta_s(1000) == pytest.approx((1000 + 500) / 25)
    assert [fmt_duration(s) for s in (0.4, 42, 725, 10920)] == ["0s", "42s", "12:05", "3:02:00"]
    assert tokens_left(100, 30, 0) == 120 and tokens_left(100, 30, 2) == 60 and tokens_left(1, 30, 0) == 30


def test_the_bar_says_what_it_does_and_the_study_time_left(capsys):
    now = [0.0]
    study = StudyProgress([400, 400], clock=lambda: now[0])
    study.start_run(1)
    bar = RunBar(400, 0, "run 1/2: a seed 0", study)
    bar.phase("evaluating…")
    assert bar.postfix() == "evaluating…"
    bar.show_measured(float("nan"), 8.349, 59.5)
    assert bar.postfix() == "val=8.349 pr=59.5"
    now[0] = 10.0
    bar.update(100)  # 10 tokens/s: 300 + 400 tokens left
    assert bar.postfix() == "val=8.349 pr=59.5, study 1:10 left"
    bar.phase("saving a checkpoint…")
    assert bar.postfix() == "val=8.349 pr=59.5, saving a checkpoint…, study 1:10 left"
    bar.close()
    err = capsys.readouterr().err
    assert "run 1/2: a seed 0" in err and "evaluating…" in err and "loss=nan" not in err
    # a single run has no study line: its own bar's time left says it
    alone = RunBar(400, 0, "a seed 0", StudyProgress([400]))
    alone.update(100)
    assert "study" not in alone.postfix()
    alone.close()


SMALL = """
description = "test"
tokens = "2048"
eval_every = "1024"
seeds = [0]
[settings]
model.n_layer = 1
model.d_model = 64
model.n_head = 1
model.n_kv_head = 1
model.d_mlp = 128
model.vocab_size = 512
train.batch_size = 4
train.seq_len = 64
train.eval_batches = 1
probe.batch_size = 4
[arms.a]
model.qk_norm = "learned"
[arms.b]
model.qk_norm = "none"
"""


@pytest.mark.slow
def test_a_study_run_shows_run_i_of_n_phases_and_no_nan_loss(tmp_path, capsys):
    (tmp_path / "corpus").mkdir()
    corpus = write_corpus(tmp_path / "corpus", files=12, lines=400, steps=True)
    (tmp_path / "s.toml").write_text(SMALL)
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "s.toml"), "--data", str(corpus), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    bars = captured.err.replace("\r", "\n")
    assert "run 1/2: a seed 0" in bars and "run 2/2: b seed 0" in bars
    assert "evaluating…" in bars and "probing…" in bars and "saving a checkpoint…" in bars
    assert "loss=nan" not in bars and re.search(r"study [\d:]+s? left", bars)
    # the end names the report in both forms and the figures, each of which is there
    printed = captured.out.splitlines()
    i = next(i for i, line in enumerate(printed) if line.startswith("report: "))
    assert printed[i : i + 3] == report_files(out / "report.md")
    assert Path(printed[i].split(": ", 1)[1]).is_file() and (out / "report.html").is_file()
    assert printed[i + 2].startswith(f"plots:  {out / 'plots'}")
