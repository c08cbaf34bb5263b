"""What the command line prints beside its errors, fitted to the terminal: `rankscope list`, and the
end of `run` and `report` (the paradox table and the files written).

Like `rankscope.cli`, this module imports only the standard library at the top; each function
imports what it reads (settings, studies, corpora, the report) when it is called.
"""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any


def table_width() -> int | None:
    """The terminal's width when stdout is one (tables are fitted to it); None for a file or a
    pipe, which take the table whole."""
    return shutil.get_terminal_size().columns if sys.stdout.isatty() else None


def report_files(report_md: Path) -> list[str]:
    """Lines naming what a report wrote, each only if it is there: report.md, report.html, plots/."""
    html, plots = report_md.with_name("report.html"), report_md.with_name("plots")
    lines = [f"report: {report_md}"] if report_md.is_file() else []
    if html.is_file():
        lines.append(f"        {html} (figures embedded)")
    if plots.is_dir():
        n = sum(1 for p in plots.iterdir() if p.suffix == ".png")
        lines.append(f"plots:  {plots}{os.sep} ({n} figure{'' if n == 1 else 's'})")
    return lines


def print_report(study_dirs: Any, report_md: Path) -> None:
    """The end of `run` and `report`: the paradox table, fitted to the terminal, and the files."""
    from .report import paradox_text
    from .report.format import text_width

    width = table_width()
    with text_width(width):
        text = paradox_text(study_dirs)
    if width is not None:  # the tables fit already; the sentences around them wrap under their indent
        text = "\n".join(
            wrap(line, width, "", " " * (len(line) - len(line.lstrip()) + 2)) if len(line) > width else line
            for line in text.splitlines()
        )
    print(text)
    print()
    print("\n".join(report_files(report_md)))


def list_width() -> int:
    """The width to wrap `rankscope list` to: the terminal's (80 when it is not one, or $COLUMNS),
    at most 120 so a wide terminal still gets lines that read as lines."""
    return max(40, min(shutil.get_terminal_size().columns, 120))


def wrap(text: str, width: int, first: str, rest: str) -> str:
    """`text` filled to `width`, `first` before its first line and `rest` before the others,
    broken at spaces only (names such as qk-muon and seed-1.5b stay whole)."""
    return textwrap.fill(
        text, width, initial_indent=first, subsequent_indent=rest, break_long_words=False, break_on_hyphens=False
    )


def _setting_text(typ: Any, default: Any) -> tuple[str, str, str]:
    """(type, default, accepted values) of one setting, read from its annotation in `config`: a
    Literal's choices, or the `Range`, `Match` and `Distinct` rules of `Annotated[type, rule]`."""
    import typing

    from .settings.rules import Distinct, Match, Range, show_bound

    rules: list[Any] = []
    if typing.get_origin(typ) is typing.Annotated:
        typ, *rules = typing.get_args(typ)
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is typing.Literal:
        kind, accepts = "choice", " | ".join(args)
    elif origin is tuple:
        inner = args[0]
        choices = typing.get_args(inner) if typing.get_origin(inner) is typing.Literal else ()
        kind, accepts = "list", "comma-separated" + (f": {' | '.join(choices)}" if choices else "")
    elif typ is bool:
        kind, accepts = "bool", "true | false"
    else:
        kind, accepts = getattr(typ, "__name__", str(typ)), ""
    for rule in rules:
        if isinstance(rule, Range):
            lo, hi = show_bound(rule.lo), show_bound(rule.hi)
            if typ is int:
                accepts = f"{lo} to {hi}" if rule.hi != float("inf") else f">= {lo}"
            else:
                accepts = f"{'>' if rule.lo_open else '>='} {lo}"
                if rule.hi != float("inf"):
                    accepts += f" and {'<' if rule.hi_open else '<='} {hi}"
            accepts += f" ({rule.why})" if rule.why else ""
        elif isinstance(rule, Match):
            accepts = rule.what
        elif isinstance(rule, Distinct):
            accepts = accepts.replace("comma-separated", "comma-separated, each once", 1)
    if isinstance(default, bool):
        shown = str(default).lower()
    elif isinstance(default, tuple):
        shown = ",".join(map(str, default)) or '""'  # an empty list: --set key= with nothing after it
    elif default == "":
        shown = '""'
    else:
        shown = str(default)
    return kind, shown, accepts


def settings_lines(width: int) -> list[str]:
    """Every `--set` key with its type, default and accepted values, as a table `width` wide: the
    accepted values wrap under their column, and a default too long for its column puts them on
    the next line."""
    from .settings.config import RunConfig, field_type, known_keys

    cfg = RunConfig()
    rows = []
    for key in known_keys(cfg):
        default: Any = cfg
        for part in key.split("."):
            default = getattr(default, part)
        rows.append((key, *_setting_text(field_type(key), default)))
    header = ("KEY", "TYPE", "DEFAULT", "ACCEPTS")
    kw = max(len(r[0]) for r in rows)
    tw = max(len(r[1]) for r in rows)
    dw = min(max(len(r[2]) for r in rows), 13)
    indent = " " * (2 + kw + 2 + tw + 2 + dw + 2)
    out = []
    for key, kind, default, accepts in [header, *rows]:
        first = f"  {key:<{kw}}  {kind:<{tw}}  {default:<{dw}}  "
        if len(first) > len(indent):  # a long default: what it accepts goes on the next line
            out.append(first.rstrip())
            first = indent
        out += wrap(accepts, max(width, len(indent) + 20), first, indent).splitlines() if accepts else [first.rstrip()]
    return out


def print_list() -> None:
    """`rankscope list`: the built-in studies, presets, corpora and settings, wrapped to the terminal."""
    from .data.corpora import DEFAULT_CORPUS, describe_corpora
    from .run.studies import BUILTIN
    from .settings.config import PRESETS
    from .settings.seedref import SEED_DATA, differences_text, reference_for

    width = list_width()
    print("studies (rankscope run STUDY):")
    nw = max(len(n) for n in BUILTIN) + 2
    for name, s in BUILTIN.items():
        print(wrap(s.description, width, f"  {name:<{nw}}", " " * (2 + nw)))
        print(wrap(f"arms: {', '.join(s.arms)}", width, " " * (2 + nw), " " * (4 + nw)))
        contrasts = "; ".join(f"{a} − {b}" for a, b in s.contrasts)
        print(wrap(f"compares: {contrasts}", width, " " * (2 + nw), " " * (4 + nw)))
    print("presets (--preset P):")
    nw = max(len(n) for n in PRESETS) + 2
    for name, cfg in PRESETS.items():
        m = cfg.model
        line = (
            f"{m.n_layer} layers, d_model {m.d_model}, {m.n_head} heads ({m.n_kv_head} kv) x {m.head_dim}, "
            f"vocab {m.vocab_size}, {cfg.train.tokens:,} tokens"
        )
        print(wrap(line, width, f"  {name:<{nw}}", " " * (2 + nw)))
        seed_run, reference = reference_for(name)
        diff = f"differs from {seed_run} in: {differences_text(cfg.to_dict(), reference)}"
        print(wrap(diff, width, " " * (2 + nw), " " * (4 + nw)))
    every = f"every preset trains on --data (default: {DEFAULT_CORPUS}), where the seed used {SEED_DATA}"
    print(wrap(every, width, "  ", "  "))
    print("corpora (--data NAME):")
    corpora = describe_corpora()
    nw = max((len(n) for n, _ in corpora), default=0) + 2
    for name, line in corpora:
        print(wrap(line, width, f"  {name:<{nw}}", " " * (2 + nw)))
    print("settings (--set KEY=VALUE):")
    print("\n".join(settings_lines(width)))
