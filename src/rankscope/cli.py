"""Command line: parse, look up presets and studies, apply overrides, dispatch. Kept thin.

rankscope run [STUDY] [--preset P] [--tokens N] [--seeds S ...] [--out DIR] [--data PATH] [--set k=v ...]
rankscope report DIR [DIR ...] [--out DIR]
rankscope list
rankscope bench [--preset P]
rankscope data prepare SRC --tokenizer T --out DIR
rankscope analyze PATH [--data PATH]
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path

from .errors import ConfigError, Interrupted, RankscopeError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rankscope", description="Train QK-Norm x optimizer arms and probe the rank of every attention head."
    )
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a study (default: the built-in qk-muon) and write its report")
    run.add_argument(
        "study", nargs="?", default=None, help="a built-in study name or a study TOML file (default: qk-muon)"
    )
    run.add_argument("--preset", help="model and training preset: tiny, seed-88m, seed-1.5b")
    run.add_argument("--tokens", help="token budget per run, e.g. 2M")
    run.add_argument("--seeds", nargs="+", type=int, help="seeds to run (default: the study's)")
    run.add_argument("--out", help="study folder (default: rankscope-out/STUDY)")
    run.add_argument("--data", help="text files/folder or .bin token shards (default: the embedded corpus)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set optim.muon_lr=0.024 (repeatable)",
    )
    run.add_argument("--shard", help="run only slice i of n of the study's runs, e.g. 0/4 (for job arrays)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--no-report", action="store_true", help="skip writing the report at the end")

    rep = sub.add_parser("report", help="write report.md and plots for one or more study folders")
    rep.add_argument("dirs", nargs="+", help="study folders (several are merged)")
    rep.add_argument("--out", help="where to write the report (default: the first folder)")

    sub.add_parser("list", help="list built-in studies, presets and settings")

    from . import bench

    bench.add_arguments(sub.add_parser("bench", help="measure training throughput, MFU, memory and probe cost"))

    from . import analyze

    analyze.add_arguments(
        sub.add_parser(
            "analyze", help="probe one trained model: a rankscope run or checkpoint, or a local Hugging Face folder"
        )
    )

    from .data import prepare

    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    prepare.add_arguments(
        data.add_parser(
            "prepare", help="tokenize text, JSONL, Parquet or a saved Hugging Face dataset into token shards"
        )
    )
    return p


def _run(args: argparse.Namespace) -> int:
    from . import dist as rdist
    from .config import parse_set, setting_value
    from .study import DEFAULT_STUDY, check_seeds, parse_shard, read_study, resolve, run_study, shard_runs

    # every flag and setting is checked here, before any data is read or anything is written
    study = read_study(args.study if args.study is not None else DEFAULT_STUDY)
    if args.preset is not None:
        study = replace(study, preset=args.preset)
    overrides: dict[str, object] = {}
    if args.tokens is not None:
        overrides["train.tokens"] = setting_value("--tokens", "train.tokens", args.tokens)
    if args.data is not None:
        if not args.data or not Path(args.data).exists():
            raise ConfigError(f"--data: no such file or folder: {args.data!r}")
        overrides["data.path"] = str(Path(args.data).resolve())
    overrides.update(parse_set(args.overrides))
    out = Path(args.out) if args.out is not None else Path("rankscope-out") / study.name
    _check_out(out, args.out)
    seeds = check_seeds(args.seeds, "--seeds") if args.seeds is not None else None
    shard = parse_shard(args.shard) if args.shard is not None else (0, 1)
    runs = resolve(study, overrides, seeds)
    world = rdist.world()
    if not shard_runs(runs, *shard):
        # a Slurm array larger than the study is normal: its extra tasks have nothing to do
        if world.main:
            print(
                f"rankscope: --shard {shard[0]}/{shard[1]} holds no run: study {study.name} has {len(runs)} "
                f"run(s) ({len(runs) // len(study.arms)} seed(s) x {len(study.arms)} arm(s)), so only slices "
                f"0..{min(len(runs), shard[1]) - 1} have work; nothing to do",
                file=sys.stderr,
            )
        return 0

    summaries = run_study(study, out, overrides, seeds, progress=not args.no_progress, shard=shard)
    if not world.main:
        return 0
    if not args.no_report:
        from .report import paradox_text, write_report

        path = write_report(out)
        print(paradox_text(out))
        print(f"\nreport: {path}")
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
    from .report import paradox_text, write_report
    from .store import run_dirs

    for d in args.dirs:
        if not Path(d).is_dir():
            raise ConfigError(f"no such study folder: {d}")
        if not run_dirs(d):
            raise ConfigError(f"{d}: no runs found (expected <arm>/seed-<k>/scalars.csv)")
    _check_out(Path(args.out if args.out is not None else args.dirs[0]), args.out)
    path = write_report(args.dirs if len(args.dirs) > 1 else args.dirs[0], args.out)
    print(paradox_text(args.dirs if len(args.dirs) > 1 else args.dirs[0]))
    print(f"\nreport: {path}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from .config import PRESETS, known_keys
    from .seedref import SEED_DATA, differences_text, reference_for
    from .study import BUILTIN

    print("studies:")
    for name, s in BUILTIN.items():
        print(f"  {name:14s} {s.description}\n  {'':14s} arms: {', '.join(s.arms)}")
    print("presets:")
    for name, cfg in PRESETS.items():
        m = cfg.model
        print(
            f"  {name:10s} {m.n_layer} layers, d_model {m.d_model}, "
            f"{m.n_head} heads ({m.n_kv_head} kv) x {m.head_dim}, vocab {m.vocab_size}, {cfg.train.tokens:,} tokens"
        )
        seed_run, reference = reference_for(name)
        print(f"  {'':10s} differs from {seed_run} in: {differences_text(cfg.to_dict(), reference)}")
    print(
        f"  {'':10s} and every preset trains on --data (default: the embedded corpus), where the seed used {SEED_DATA}"
    )
    print("settings (--set KEY=VALUE):")
    print("  " + "\n  ".join(known_keys()))
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from .analyze import run

    return run(args)


def _data(args: argparse.Namespace) -> int:
    from .data.prepare import run

    return run(args)


def _bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(args)


# OSError numbers that mean "this place cannot take the files", and what to do about each
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_READ_ONLY = (errno.EROFS,)
_NOT_ALLOWED = (errno.EACCES, errno.EPERM)
_WRONG_KIND = (errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG)


def os_error_line(e: OSError, args: argparse.Namespace) -> str:
    """One line for a file-system fault: the path, the system's reason and its number, and what
    the user can do (`--out` for the commands that have one)."""
    from .fsio import TEMP_NAME

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
    args = _parser().parse_args(argv)
    try:
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
        # `rankscope list | head`: the reader left. Python's documented recipe: point stdout at
        # devnull so the flush at exit cannot fail again, and exit 1 without a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
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
        from .dist import shutdown

        shutdown()


if __name__ == "__main__":
    sys.exit(main())
