"""Command line: parse, look up presets and studies, apply overrides, dispatch. Kept thin.

rankscope run [STUDY] [--preset P] [--tokens N] [--seeds S ...] [--out DIR] [--data PATH] [--set k=v ...]
rankscope report DIR [DIR ...] [--out DIR]
rankscope list
rankscope bench [--preset P]
rankscope data prepare SRC --tokenizer T --out DIR
rankscope analyze PATH [--data PATH] [--series | --hub-revisions] [--steps S,S] [--max-checkpoints N]
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import textwrap
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from .errors import ConfigError, Interrupted, RankscopeError
from .settings.config import PRESETS

# `rankscope --help` and every subcommand's --help import neither torch nor pandas: this module
# imports only the standard library and the errors at the top, and the subcommands whose
# arguments live in heavier modules (bench, analyze, data prepare) add them only when that
# subcommand is parsed (`_LazyParser`). Each command imports what it runs.


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help, wrapped at spaces only: names such as qk-muon and seed-1.5b stay whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _LazyParser(argparse.ArgumentParser):
    """A subcommand's parser whose arguments are added by `install` when it is first used (to
    parse or for its help), so building the whole command line imports no subcommand's module."""

    def __init__(self, *args: Any, install: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs: Any):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self._install = install

    def installed(self) -> _LazyParser:
        if self._install is not None:
            install, self._install = self._install, None
            install(self)
        return self

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self.installed()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self.installed()
        return super().format_usage()

    def format_help(self) -> str:
        self.installed()
        return super().format_help()


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    from .run.bench import add_arguments

    add_arguments(p)


def _analyze_arguments(p: argparse.ArgumentParser) -> None:
    from .analyze.command import add_arguments

    add_arguments(p)


def _prepare_arguments(p: argparse.ArgumentParser) -> None:
    from .data.prepare import add_arguments

    add_arguments(p)


def _parser() -> argparse.ArgumentParser:
    p = _LazyParser(
        prog="rankscope", description="Train QK-Norm x optimizer arms and probe the rank of every attention head."
    )
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a study (default: the built-in qk-muon) and write its report")
    run.add_argument(
        "study", nargs="?", default=None, help="a built-in study name or a study TOML file (default: qk-muon)"
    )
    run.add_argument(
        "--preset", metavar="P", help=f"model and training preset: {', '.join(PRESETS)} (default: the study's)"
    )
    run.add_argument("--tokens", metavar="N", help="token budget per run, e.g. 2M (default: the study's)")
    run.add_argument("--seeds", nargs="+", type=int, metavar="S", help="seeds to run (default: the study's)")
    run.add_argument("--out", metavar="DIR", help="study folder (default: rankscope-out/STUDY)")
    run.add_argument(
        "--data",
        metavar="PATH",
        help="a built-in corpus (see rankscope list), text files/folder or .bin token shards (default: sotu)",
    )
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set optim.muon_lr=0.024 (repeatable; rankscope list shows them all)",
    )
    run.add_argument(
        "--shard", metavar="I/N", help="run only slice i of n of the study's runs, e.g. 0/4 (for job arrays)"
    )
    run.add_argument(
        "--log",
        metavar="SINKS",
        help="stream each evaluation to tensorboard and/or wandb (offline) while training, e.g. "
        "--log tensorboard,wandb (train.log)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--no-report", action="store_true", help="skip writing the report at the end")

    rep = sub.add_parser("report", help="write report.md, report.html and plots for one or more study folders")
    rep.add_argument("dirs", nargs="+", metavar="DIR", help="study folders (several are merged)")
    rep.add_argument("--out", metavar="DIR", help="where to write the report (default: the first folder)")

    sub.add_parser("list", help="list built-in studies, presets, corpora and settings")
    sub.add_parser("bench", help="measure training throughput, MFU, memory and probe cost", install=_bench_arguments)
    sub.add_parser(
        "analyze",
        help="probe one trained model (a rankscope run or checkpoint, or a local Hugging Face folder), "
        "or with --series every checkpoint of a run, as a study folder for rankscope report",
        install=_analyze_arguments,
    )
    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    data.add_parser(
        "prepare",
        help="tokenize text, JSONL, Parquet or a saved Hugging Face dataset into token shards",
        install=_prepare_arguments,
    )
    return p


def _run(args: argparse.Namespace) -> int:
    from .run import dist as rdist
    from .run.studies import DEFAULT_STUDY, check_seeds, read_study
    from .run.study import parse_shard, plan_study, run_study

    # every flag and setting is checked here, before any data is read or anything is written
    notes: list[str] = []  # said once the rank is known (joining a process group waits for the plan)
    study = read_study(args.study if args.study is not None else DEFAULT_STUDY, say=notes.append)
    if args.preset is not None:
        study = replace(study, preset=args.preset)
    overrides = _run_overrides(args)
    out = Path(args.out) if args.out is not None else Path("rankscope-out") / study.name
    _check_out(out, args.out)
    seeds = check_seeds(args.seeds, "--seeds") if args.seeds is not None else None
    shard = parse_shard(args.shard) if args.shard is not None else (0, 1)
    plan = plan_study(study, overrides, seeds, shard)
    world = rdist.world()
    if world.main:
        for note in notes:
            print(note, file=sys.stderr)
    if not plan.mine:
        # a Slurm array larger than the study is normal: its extra tasks have nothing to do
        if world.main:
            n, arms = len(plan.runs), len(study.arms)
            print(
                f"rankscope: --shard {shard[0]}/{shard[1]} holds no run: study {study.name} has {n} "
                f"run(s) ({n // arms} seed(s) x {arms} arm(s)), so only slices "
                f"0..{min(n, shard[1]) - 1} have work; nothing to do",
                file=sys.stderr,
            )
        return 0

    summaries = run_study(plan, out, progress=not args.no_progress)
    if not world.main:
        return 0
    if not args.no_report:
        from .cli_text import print_report
        from .report import write_report

        print_report(out, write_report(out))
    # run_study returns a summary for every run of the slice, finished now or before
    diverged = [s for s in summaries if s.get("status") == "diverged"]
    if diverged:
        print(
            f"rankscope: error: {len(diverged)} run(s) diverged: "
            + ", ".join(f"{s['arm']} seed {s['seed']}" for s in diverged),
            file=sys.stderr,
        )
        return 1
    return 0


def _run_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The settings `run`'s flags stand for (--tokens, --data, --log), then each --set, checked."""
    from .settings.config import parse_set, setting_value

    overrides: dict[str, object] = {}
    if args.tokens is not None:
        overrides["train.tokens"] = setting_value("--tokens", "train.tokens", args.tokens)
    if args.data is not None:
        from .settings.vocab import BUILTIN_CORPORA

        if args.data in BUILTIN_CORPORA:
            overrides["data.path"] = args.data
        elif not args.data or not Path(args.data).exists():
            raise ConfigError(
                f"--data: no such file or folder, nor a built-in corpus ({', '.join(BUILTIN_CORPORA)}): {args.data!r}"
            )
        else:
            overrides["data.path"] = str(Path(args.data).resolve())
    if args.log is not None:
        overrides["train.log"] = setting_value("--log", "train.log", args.log)
    overrides.update(parse_set(args.overrides))
    return overrides


def _check_out(out: Path, given: str | None) -> None:
    """Refuse a study or report folder that cannot be made or written, before any work starts: a
    file in its place or above it, or a folder that is read-only. (main still turns a later
    OSError, such as a full disk, into one line.)"""
    if given is not None and not given.strip():
        raise ConfigError(f"--out must name a folder, got {given!r}")
    what = f"--out {out}" if given is not None else f"{out} (the default for --out)"
    for p in (out, *out.absolute().parents):
        if not os.path.lexists(p):
            continue
        if not p.is_dir():
            where = "" if p == out else f" ({p} is a file)"
            raise ConfigError(f"{what}: not a folder{where}; choose another --out")
        if not os.access(p, os.W_OK | os.X_OK):  # also refused to root, on a read-only file system
            raise ConfigError(f"{what}: cannot write in {p} (read-only or not permitted); choose another --out")
        return


def _report(args: argparse.Namespace) -> int:
    from .cli_text import print_report
    from .report import write_report
    from .storage.store import run_dirs

    for d in args.dirs:
        if not Path(d).is_dir():
            raise ConfigError(f"no such study folder: {d}")
        if not run_dirs(d):
            raise ConfigError(f"{d}: no runs found (expected <arm>/seed-<k>/scalars.csv)")
    _check_out(Path(args.out if args.out is not None else args.dirs[0]), args.out)
    dirs = args.dirs if len(args.dirs) > 1 else args.dirs[0]
    print_report(dirs, write_report(dirs, args.out))
    return 0


def _list(args: argparse.Namespace) -> int:
    from .cli_text import print_list

    print_list()
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from .analyze.command import run

    return run(args)


def _data(args: argparse.Namespace) -> int:
    from .data.prepare import run

    return run(args)


def _bench(args: argparse.Namespace) -> int:
    from .run.bench import main as bench_main

    return bench_main(args)


# OSError numbers that mean "this place cannot take the files", and what to do about each
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_READ_ONLY = (errno.EROFS,)
_NOT_ALLOWED = (errno.EACCES, errno.EPERM)
_WRONG_KIND = (errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG)


def os_error_line(e: OSError, args: argparse.Namespace) -> str:
    """One line for a file-system fault: the path, the system's reason and its number, and what
    the user can do (`--out` for the commands that have one)."""
    from .storage.fsio import TEMP_NAME

    path = os.fsdecode(e.filename) if e.filename is not None else None
    if path is not None and TEMP_NAME.match(Path(path).name):
        path = str(Path(path).parent)  # the hidden temporary file of an atomic write: name its folder
    reason = f"{e.strerror} ([Errno {e.errno}])" if e.strerror else str(e) or type(e).__name__
    at = f" {path}" if path is not None else ""
    out = "choose another --out" if hasattr(args, "out") else ""
    if e.errno in _NO_ROOM + _READ_ONLY:
        hint = ("free some space or " if e.errno in _NO_ROOM else "") + (out or "choose another place")
        line = f"cannot write{at}: {reason}; {hint}"
    elif e.errno in _NOT_ALLOWED:
        line = f"cannot access{at}: {reason}; check its permissions" + (f" or {out}" if out else "")
    elif e.errno in _WRONG_KIND:
        line = f"cannot use{at}: {reason}" + (f"; {out}" if out else "")
    else:
        line = f"{path}: {reason}" if path is not None else reason
    return line.replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        try:
            args = _parser().parse_args(argv)
        finally:
            sys.stdout.flush()  # --help's text: a closed pipe is met here, inside this try
        code = {"run": _run, "report": _report, "list": _list, "bench": _bench, "data": _data, "analyze": _analyze}[
            args.command
        ](args)
        sys.stdout.flush()  # here, so a closed pipe is met inside this try and not at exit
        return code
    except Interrupted as e:
        if threading.current_thread() is threading.main_thread():  # a third Ctrl-C must not cut this line short
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(f"rankscope: {e}", file=sys.stderr)
        return e.exit_code
    except RankscopeError as e:  # DataError and ConfigError included
        print(f"rankscope: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        # `rankscope list | head`: the reader took what it wanted and left, which is no error.
        # Python's documented recipe: point stdout at devnull so the flush at exit cannot fail
        # again, and exit quietly (0, so a pipeline under `set -o pipefail` does not fail).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as e:  # not a folder, read-only, disk full, no permission: the user's to fix, not a bug
        print(f"rankscope: error: {os_error_line(e, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "rankscope: interrupted; finished runs and checkpoints are kept, rerun the same command to continue",
            file=sys.stderr,
        )
        return 130
    finally:
        # only a command that imported rankscope.run.dist can have joined a process group (and
        # importing it here would import torch into `rankscope --help` and `rankscope list`)
        dist = sys.modules.get(f"{__package__}.run.dist")
        if dist is not None:
            dist.shutdown()


if __name__ == "__main__":
    sys.exit(main())
