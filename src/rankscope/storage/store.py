"""The run folder's format, in one place: its file names, the writer of a run's start, and its
append-only tidy tables. Every writer of a run folder (`train`, `ProbeLogger`, `rankscope analyze
--series`) and every reader (the report, the analyzer) names its files from here.

Layout of a study folder::

    study.json                      the resolved study (arms, seeds, base overrides)
    <arm>/seed-<k>/config.json      resolved run config
    <arm>/seed-<k>/provenance.json  git commit + dirty flag, torch version, device, seed, start time
    <arm>/seed-<k>/scalars.csv      one row per eval point
    <arm>/seed-<k>/probes.csv       one row per (tokens, layer, head, site, metric); head -1 (vocab.LAYER_WIDE)
                                    marks a per-layer value
    <arm>/seed-<k>/done.json        written last; its presence marks the run finished ("status": "done"
                                    or "diverged")
    <arm>/seed-<k>/checkpoints/     step-<n>.pt, the newest few (`rankscope.run.checkpoint`)
    <arm>/.seed-<k>.lock            while a process writes the run: its advisory lock (`locks`), naming it

Rows are appended as whole lines with one write and a flush, so a run killed at any moment leaves
every complete line readable; the loaders drop a torn last line. This module never imports torch.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import numbers
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RankscopeError
from . import fsio
from .locks import FileLock

if TYPE_CHECKING:  # pandas is imported where a table is read: `--help` and the writers never need it
    import pandas as pd

SCALAR_COLUMNS = (
    "arm",
    "seed",
    "step",
    "tokens",
    "train_loss",
    "val_loss",
    "ood_loss",
    "lr_scale",
    "grad_norm",
    "icl_score",
    "induction_loss",
    "elapsed_s",
    "probe_s",
    "eval_s",
)
PROBE_COLUMNS = ("arm", "seed", "step", "tokens", "layer", "head", "site", "metric", "value")

SCALARS, PROBES, DONE = "scalars.csv", "probes.csv", "done.json"
CONFIG, PROVENANCE, STUDY, CHECKPOINTS = "config.json", "provenance.json", "study.json", "checkpoints"
# study.json's "kind" in a study folder of checkpoint series (`rankscope analyze --series`), where
# each run's points are checkpoints of one training run, not that run's own evaluations
SERIES_KIND = "checkpoint-series"


def run_dir(study_dir: str | Path, arm: str, seed: int) -> Path:
    return Path(study_dir) / arm / f"seed-{seed}"


def run_lock_path(path: str | Path) -> Path:
    """The lock file of a run folder. It sits next to the run folder, not in it, so clearing the
    folder to start the run over never removes a held lock."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def run_lock(path: str | Path) -> FileLock:
    """The lock that makes one process at a time the writer of a run (`run_lock_path`)."""
    return FileLock(run_lock_path(path), "rankscope run")


def write_record(path: str | Path, obj: Any) -> None:
    """One of the run folder's JSON records: sorted keys (anything else as its str), written
    atomically (`fsio`)."""
    fsio.write_json(path, obj, sort_keys=True, default=str)


@contextlib.contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """A failed write on an open file (a full disk) raises an OSError without a file name; add it
    so the one-line error says which file could not be written."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


def write_start(run: str | Path, config: Mapping[str, Any], provenance: Mapping[str, Any]) -> None:
    """A run's start: the folder, its resolved config and its provenance, before its first row."""
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    for name, record in ((CONFIG, config), (PROVENANCE, provenance)):
        with naming(run / name):
            write_record(run / name, record)


def read_record(path: str | Path) -> dict[str, Any]:
    """A JSON object that may be missing or not ours (a Hugging Face folder's config.json, say):
    {} unless the file reads back as an object. `read_json` is the strict reader."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


class DamagedFile(RankscopeError, ValueError):
    """A file the store wrote that no longer reads back: one line for the CLI, and still a
    ValueError for the callers that skip unreadable files."""


def read_json(path: str | Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise DamagedFile(f"{path}: not valid JSON ({e}); fix or remove the file (for a run, its folder)") from None


class TableWriter:
    """Appends rows of a fixed column set to a CSV file, whole lines at a time."""

    def __init__(self, path: str | Path, columns: Sequence[str]):
        self.path = Path(path)
        self.columns = tuple(columns)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._f = open(self.path, "a", newline="")
        if new:
            self._write_lines([self.columns])

    def _write_lines(self, rows: Iterable[Sequence[Any]]) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        self._f.write(buf.getvalue())  # one write per batch of rows
        self._f.flush()

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        self._write_lines([[_fmt(r.get(c, "")) for c in self.columns] for r in rows])

    def close(self) -> None:
        self._f.close()


def _fmt(v: Any) -> Any:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return repr(float(v))  # shortest exact round-trip; numpy and torch scalars as plain numbers
    return v


class RunStore:
    """Everything one run writes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.scalars = TableWriter(self.path / SCALARS, SCALAR_COLUMNS)
        self.probes = TableWriter(self.path / PROBES, PROBE_COLUMNS)

    def finish(self, summary: Mapping[str, Any]) -> None:
        self.scalars.close()
        self.probes.close()
        write_record(self.path / DONE, dict(summary))

    def close(self) -> None:
        self.scalars.close()
        self.probes.close()


def is_done(path: str | Path) -> bool:
    return (Path(path) / DONE).exists()


def read_done(path: str | Path, arm: str, seed: int) -> dict[str, Any]:
    """The summary a finished run left in its done.json, with its arm, seed and status ("done"
    when a file from before statuses has none). A done.json that cannot be read gets the status
    "unknown" and says why, rather than stopping the study over a file its rows do not need."""
    try:
        summary = read_json(Path(path) / DONE)
    except (OSError, ValueError) as e:
        summary = {"status": "unknown", "message": f"{Path(path) / DONE}: unreadable ({e})"}
    if not isinstance(summary, dict):
        summary = {"status": "unknown", "message": f"{Path(path) / DONE}: not a JSON object"}
    return {"status": "done", **summary, "arm": arm, "seed": seed}


def write_json_once(path: str | Path, obj: Any) -> None:
    """Write `obj` unless `path` already holds it: the shards of one study all describe it the same
    way, and whichever starts first writes the file the others then leave alone."""
    path = Path(path)
    try:
        if read_json(path) == json.loads(json.dumps(obj, sort_keys=True, default=str)):
            return
    except (OSError, ValueError):
        pass  # missing or unreadable: write it
    write_record(path, obj)


def clear_run(path: str | Path) -> None:
    """Remove an unfinished run's folder so it can be redone from the start."""
    path = Path(path)
    if path.exists() and not is_done(path):
        shutil.rmtree(path)


def truncate_after(run_path: str | Path, step: int) -> None:
    """Drop the rows of steps after `step` (and any torn last line) from a run's tables, so a run
    resumed from its checkpoint at `step` appends exactly what an uninterrupted run would have."""
    for name in (SCALARS, PROBES):
        path = Path(run_path) / name
        if not path.exists():
            continue
        data = path.read_bytes()
        data = data[: data.rfind(b"\n") + 1]  # a torn last line goes
        if not data:
            continue
        _check_lines(path, data)  # a damaged line is named, not a traceback from int() below
        lines = data.splitlines(keepends=True)
        col = lines[0].decode().rstrip("\n").split(",").index("step")
        kept = [lines[0]] + [ln for ln in lines[1:] if int(next(csv.reader([ln.decode()]))[col]) <= step]
        fsio.write_bytes(path, b"".join(kept))


def last_eval_from_tables(run: Path, step: int) -> dict[str, Any]:
    """The values `evaluate` returned at `step`, read back from the tables: for a run resumed at its
    last step from a checkpoint written before checkpoints carried them (format 1 without
    "last_eval"). Parsed with float(), which round-trips the repr() the tables hold exactly."""

    def rows(name: str) -> list[dict[str, str]]:
        path = run / name
        if not path.exists():
            return []
        text = path.read_text()
        return [r for r in csv.DictReader(io.StringIO(text[: text.rfind("\n") + 1])) if r.get("step") == str(step)]

    scalars = rows(SCALARS)
    if not scalars:
        return {}
    key = [float(r["value"]) for r in rows(PROBES) if r["site"] == "k" and r["metric"] == "pr_sv"]
    return {"val_loss": float(scalars[-1]["val_loss"]), "key_pr": sum(key) / len(key) if key else float("nan")}


def read_table(path: str | Path, expect: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Read one CSV table, dropping a torn last line left by a killed writer.

    Any other damage raises RankscopeError naming the file and the line: bytes that are not UTF-8,
    control characters, a line with the wrong number of fields, a value of the wrong type in one of
    the store's columns (`_INT_COLUMNS`, `_NUMBER_COLUMNS`), or, given `expect` (e.g. {"arm": "qk",
    "seed": 1}), a row with another value there: a row of another run. Pandas alone would turn such
    a row into NaN, a column of strings or a traceback. The store's text columns are read as text,
    so an arm named "001" stays "001".
    """
    import pandas as pd

    path = Path(path)
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
    if not data:
        return pd.DataFrame()
    text, header, starts = _check_lines(path, data)
    try:
        df = pd.read_csv(
            io.StringIO(text),
            dtype={c: str for c in _TEXT_COLUMNS if c in header},
            keep_default_na=False,  # only what the writers write for "no value" is NaN, not "NA" or "null"
            na_values=sorted(_ABSENT),
        )
    except (ValueError, pd.errors.ParserError) as e:  # not expected after `_check_lines`; still one line
        raise _damaged(path, None, f"unreadable ({e})".replace("\n", " ")) from None
    if len(df) != len(starts):  # not expected after `_check_lines`: the line numbers would be wrong
        raise _damaged(path, None, f"{len(df)} rows read from {len(starts)} lines")
    _check_values(path, text, header, starts, df, expect or {})
    return df


# The store's columns by the type its writers give them. Numbers may be empty (an absent value; a
# NaN is written "nan"), except in the columns every row fills (`_REQUIRED`); columns not named
# here (a newer trainer's) are not checked.
_INT_COLUMNS = ("seed", "step", "tokens", "layer", "head")
_REQUIRED = ("step", "tokens", "layer", "head")
_NUMBER_COLUMNS = ("value",) + tuple(c for c in SCALAR_COLUMNS if c not in ("arm", "seed", "step", "tokens"))
_TEXT_COLUMNS = ("arm", "site", "metric")
_ABSENT = frozenset(("", "nan", "NaN", "-nan"))
# control characters other than line ends (and a carriage return that ends no line): random bytes or
# a zeroed disk block; no writer of the store makes them
_CONTROL = re.compile(r"[\x00-\x09\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)")


def _damaged(path: Path, line: int | None, what: str) -> Exception:
    where = f"{path} line {line}" if line is not None else str(path)
    return DamagedFile(f"{where}: {what}; the run's table is damaged: remove the line or rerun the run")


def _show(v: str) -> str:
    return repr(v if len(v) <= 40 else v[:40] + "...")


def _check_lines(path: Path, data: bytes) -> tuple[str, list[str], list[int]]:
    """(text, header, the line each row starts on) of a table's complete lines, or `_damaged` at
    the earliest line that is not UTF-8, holds a control character or has the wrong field count."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _damaged(path, data.count(b"\n", 0, e.start) + 1, "bytes that are not UTF-8") from None
    first: list[tuple[int, str]] = []  # (line, what): the first damage of each kind
    ctrl = _CONTROL.search(text)
    if ctrl:
        first.append((text.count("\n", 0, ctrl.start()) + 1, f"a control character {ctrl.group()!r}"))
    if '"' not in text:  # no quoted field (the store's values never need quotes): a line is a row
        lines = text.split("\n")[:-1]
        header, starts = lines[0].rstrip("\r").split(","), list(range(2, len(lines) + 1))
        for k, ln in enumerate(lines[1:], 2):
            if ln.count(",") != len(header) - 1 or not ln.rstrip("\r"):
                got = f"got {ln.count(',') + 1}"
                first.append((k, f"expected {len(header)} fields, {got}" if ln.rstrip("\r") else "an empty line"))
                break
            if ln == lines[0]:  # two writers on one file, or two files run together
                first.append((k, "the header again, amid the rows"))
                break
    else:  # quoted fields may hold commas and line breaks: the csv module finds the rows
        header, starts = _csv_rows(text, first)
    missing = [c for c in ("step", "tokens") if c not in header]
    if missing:  # first: with a damaged header, every row would have the wrong field count
        raise _damaged(path, 1, f"the header {_show(','.join(header))} lacks the column(s) {', '.join(missing)}")
    if first:
        raise _damaged(path, *min(first))
    return text, header, starts


def _csv_rows(text: str, first: list[tuple[int, str]]) -> tuple[list[str], list[int]]:
    """(header, the line each row starts on) by the csv module, for tables with quoted fields;
    appends the first row with a wrong field count (or no CSV at all) to `first`."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] = []
    starts: list[int] = []
    start = 1
    try:
        for row in reader:
            if not header:
                header, start = row, reader.line_num + 1
                continue
            if len(row) != len(header):
                first.append((start, f"expected {len(header)} fields, got {len(row)}" if row else "an empty line"))
                break
            if row == header:
                first.append((start, "the header again, amid the rows"))
                break
            starts.append(start)
            start = reader.line_num + 1
    except csv.Error as e:
        first.append((start, f"not CSV ({e})"))
    return header, starts


def _check_values(
    path: Path, text: str, header: list[str], starts: list[int], df: pd.DataFrame, expect: Mapping[str, Any]
) -> None:
    """`_damaged` at the earliest row with a value of the wrong type, or (after those) another run's.

    A probes table has a row per layer, head, site and metric at every eval point (hundreds of
    thousands of lines in a long run), so the checks work on whole columns of pandas' own parse: a
    column the C parser read as numbers holds only numbers; only a column it could not is parsed
    again, cell by cell, to find the bad one."""
    import pandas as pd

    bad: list[tuple[int, int, int]] = []  # (row, kind: 0 wrong type, 1 another run's, column)
    for j, col in enumerate(header):
        v = df.iloc[:, j]
        if col in _INT_COLUMNS + _NUMBER_COLUMNS:
            if pd.api.types.is_numeric_dtype(v) and not pd.api.types.is_bool_dtype(v):
                num, wrong = v.astype(float), pd.Series(False, index=v.index)
            else:
                num = pd.to_numeric(v, errors="coerce").astype(float)
                wrong = num.isna() & v.notna()
            if col in _INT_COLUMNS:
                wrong |= num.notna() & ((num != num.round()) | (num.abs() == float("inf")))  # 3.5, inf
            if col in _REQUIRED:
                wrong |= num.isna() & v.isna()
            if wrong.any():
                bad.append((int(wrong.to_numpy().argmax()), 0, j))
            other = num.notna() & (num != float(expect[col])) if col in expect else None
        else:
            other = v.fillna("").astype(str) != str(expect[col]) if col in expect else None
        if other is not None and other.any():
            bad.append((int(other.to_numpy().argmax()), 1, j))
    if not bad:
        return
    i, kind, j = min(bad)
    line = starts[i]
    # the cell as written: its row parsed again from the line it starts on
    value = _show(next(csv.reader(io.StringIO("\n".join(text.split("\n")[line - 1 :]), newline="")))[j])
    if kind == 0:
        what = f"{header[j]} {value} is not {'an integer' if header[j] in _INT_COLUMNS else 'a number'}"
    else:
        run = ", ".join(f"{c} {w!r}" for c, w in expect.items())
        what = f"{header[j]} is {value} but the table is in the folder of {run}"
    raise _damaged(path, line, what)


def run_dirs(study_dir: str | Path) -> list[Path]:
    """Every run folder (one holding a scalars table) under a study folder, sorted."""
    return sorted(p.parent for p in Path(study_dir).glob(f"**/{SCALARS}"))


def _load(
    study_dirs: str | Path | Sequence[str | Path], name: str, columns: Sequence[str], finished_only: bool
) -> pd.DataFrame:
    import pandas as pd

    if isinstance(study_dirs, (str, Path)):
        study_dirs = [study_dirs]
    frames = []
    for d in study_dirs:
        for rd in run_dirs(d):
            if finished_only and not is_done(rd):
                continue
            if (rd / name).exists():
                df = read_table(rd / name)
                if len(df):
                    frames.append(df)
    if not frames:
        return pd.DataFrame(columns=list(columns))
    return pd.concat(frames, ignore_index=True)


def load_scalars(study_dirs: str | Path | Sequence[str | Path], finished_only: bool = False) -> pd.DataFrame:
    """All scalar rows of every run under one or more study folders, as one DataFrame."""
    return _load(study_dirs, SCALARS, SCALAR_COLUMNS, finished_only)


def load_probes(study_dirs: str | Path | Sequence[str | Path], finished_only: bool = False) -> pd.DataFrame:
    """All probe rows (arm, seed, step, tokens, layer, head, site, metric, value) as one DataFrame."""
    return _load(study_dirs, PROBES, PROBE_COLUMNS, finished_only)
