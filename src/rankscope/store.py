"""Append-only tidy tables on disk, one folder per run.

Layout of a study folder::

    study.json                      the resolved study (arms, seeds, base overrides)
    <arm>/seed-<k>/config.json      resolved run config
    <arm>/seed-<k>/provenance.json  git commit + dirty flag, torch version, device, seed, start time
    <arm>/seed-<k>/scalars.csv      one row per eval point
    <arm>/seed-<k>/probes.csv       one row per (tokens, layer, head, site, metric); head -1 (vocab.LAYER_WIDE)
                                    marks a per-layer value
    <arm>/seed-<k>/done.json        written last; its presence marks the run finished

Rows are appended as whole lines with one write and a flush, so a run killed at any moment leaves
every complete line readable; the loaders drop a torn last line. This module never imports torch.
"""

from __future__ import annotations

import csv
import io
import json
import numbers
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from . import fsio

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


def run_dir(study_dir: str | Path, arm: str, seed: int) -> Path:
    return Path(study_dir) / arm / f"seed-{seed}"


def write_json(path: str | Path, obj: Any) -> None:
    """JSON with sorted keys (anything else as its str), written atomically (`fsio`)."""
    fsio.write_json(path, obj, sort_keys=True, default=str)


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


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
        write_json(self.path / DONE, dict(summary))

    def close(self) -> None:
        self.scalars.close()
        self.probes.close()


def is_done(path: str | Path) -> bool:
    return (Path(path) / DONE).exists()


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
        lines = data[: data.rfind(b"\n") + 1].splitlines(keepends=True)
        if not lines:
            continue
        col = lines[0].decode().rstrip("\n").split(",").index("step")
        kept = [lines[0]] + [ln for ln in lines[1:] if int(next(csv.reader([ln.decode()]))[col]) <= step]
        fsio.write_bytes(path, b"".join(kept))


def read_table(path: str | Path) -> pd.DataFrame:
    """Read one CSV table, dropping a torn last line left by a killed writer."""
    data = Path(path).read_bytes()
    if not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
    if not data:
        return pd.DataFrame()
    return pd.read_csv(io.BytesIO(data))


def run_dirs(study_dir: str | Path) -> list[Path]:
    """Every run folder (one holding a scalars table) under a study folder, sorted."""
    return sorted(p.parent for p in Path(study_dir).glob(f"**/{SCALARS}"))


def _load(
    study_dirs: str | Path | Sequence[str | Path], name: str, columns: Sequence[str], finished_only: bool
) -> pd.DataFrame:
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
