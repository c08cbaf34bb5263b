"""Gather one or more study folders into one in-memory study: run inventory, scalars and probes.

Reads only what `rankscope.storage.store` wrote; never imports torch. Runs are loaded one folder at a time
(rather than with one `load_scalars(study_dir)` call) so that every row keeps track of where it
came from: whether its run finished, its resolved config, and which of several merged study
folders it lives in. A damaged table (anything but a torn last line) stops the load with one line
naming the file and line (`store.read_table`), and so does a row whose arm or seed is not its run's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import RankscopeError
from ..settings.contrasts import Contrast, derive
from ..storage.locks import live_holder
from ..storage.store import (
    CONFIG,
    DONE,
    PROBE_COLUMNS,
    PROBES,
    SCALAR_COLUMNS,
    SCALARS,
    SERIES_KIND,
    STUDY,
    is_done,
    read_json,
    read_table,
    run_dirs,
    run_lock_path,
)

StudyDirs = str | Path | Sequence[str | Path]
FINISHED, DIVERGED, UNFINISHED = "finished", "diverged", "unfinished"


@dataclass(frozen=True)
class Run:
    """One (arm, seed) run as found on disk."""

    arm: str
    seed: int
    path: Path
    done: bool  # finished normally (done.json present and not marked diverged)
    config: dict[str, Any]
    target_tokens: int | None  # the run's token budget, from its config (or the study's)
    last_tokens: int | None  # the last evaluation point it wrote; None = no rows yet
    status: str = "unfinished"  # "finished" | "diverged" | "unfinished" (still running, or stopped)
    message: str | None = None  # why it stopped, for a diverged run (from its done.json)
    last_finite_tokens: int | None = None  # the last eval point whose val loss is a number
    running: str | None = None  # an unfinished run's writer, when one is alive ("pid 12 on host since ...")

    @property
    def diverged(self) -> bool:
        return self.status == DIVERGED


@dataclass
class StudyData:
    """Everything the report needs, merged over the given study folders."""

    dirs: list[Path]
    studies: list[dict[str, Any]]  # each folder's study.json ({} where absent)
    runs: list[Run]
    scalars: pd.DataFrame  # store.SCALAR_COLUMNS; arm is str, seed and tokens int
    probes: pd.DataFrame  # store.PROBE_COLUMNS; same dtypes
    notes: list[str] = field(default_factory=list)  # anything odd met while merging

    @property
    def arms(self) -> list[str]:
        """Arms in the order the study files declare them, then any others found on disk."""
        order: list[str] = []
        for s in self.studies:
            # "arm_order" keeps the declared order; older study.json files have only the sorted "arms"
            for a in s.get("arm_order") or s.get("arms") or {}:
                if str(a) not in order:
                    order.append(str(a))
        for r in self.runs:
            if r.arm not in order:
                order.append(r.arm)
        return order

    @property
    def contrasts(self) -> list[Contrast]:
        """The (treatment, control) pairs the study compares first: as its study.json lists them,
        else derived from the runs' settings (`rankscope.settings.contrasts`); only pairs of arms that ran."""
        arms = self.arms
        have = {r.arm for r in self.runs}
        for s in self.studies:
            if s.get("contrasts"):
                return [(str(a), str(b)) for a, b in s["contrasts"] if a in have and b in have]
        configs: dict[str, dict[str, Any]] = {}
        for r in self.runs:
            configs.setdefault(r.arm, r.config)
        return derive({a: configs[a] for a in arms if a in configs})

    @property
    def finished(self) -> set[tuple[str, int]]:
        """Runs that reached their budget. A diverged run has a done.json too, but it stopped early:
        counting it here would pull an arm's END back to where it blew up."""
        return {(r.arm, r.seed) for r in self.runs if r.done}

    @property
    def diverged(self) -> set[tuple[str, int]]:
        return {(r.arm, r.seed) for r in self.runs if r.diverged}

    @property
    def is_series(self) -> bool:
        """The study holds checkpoint series (`rankscope analyze --series`): each run's points are
        checkpoints of one training run probed on one fixed batch, not a run's own evaluations."""
        return any(s.get("kind") == SERIES_KIND for s in self.studies)

    def seeds(self, arm: str | None = None) -> list[int]:
        return sorted({r.seed for r in self.runs if arm is None or r.arm == arm})


def _as_dirs(study_dirs: StudyDirs) -> list[Path]:
    if isinstance(study_dirs, (str, Path)):
        study_dirs = [study_dirs]
    dirs = [Path(d) for d in study_dirs]
    if not dirs:
        raise RankscopeError("no study folder given")
    for d in dirs:
        if not d.is_dir():
            raise RankscopeError(f"no study folder at {d}")
    return dirs


_SEED_DIR = re.compile(r"^seed-(-?\d+)$")


def _identify(rd: Path, config: dict[str, Any], scalars: pd.DataFrame) -> tuple[str, int]:
    """(arm, seed) of a run folder: from its config first (typed, written by the trainer), then its
    tables, then the folder names. CSV values alone are not trusted for the arm: pandas would read
    an arm called "001" as the integer 1."""
    arm = config.get("arm")
    seed = config.get("seed")
    if arm is None:
        arm = rd.parent.name if _SEED_DIR.match(rd.name) else (scalars["arm"].iloc[0] if len(scalars) else rd.name)
    if seed is None:
        m = _SEED_DIR.match(rd.name)
        seed = int(m.group(1)) if m else (int(scalars["seed"].iloc[0]) if len(scalars) else 0)
    return str(arm), int(seed)


def _normalise(df: pd.DataFrame, columns: Sequence[str], arm: str, seed: int, keep_extra: bool = False) -> pd.DataFrame:
    """Give every table the store's columns and stable dtypes, whatever pandas inferred.

    With `keep_extra`, columns a newer trainer wrote beyond `columns` (icl_score, induction_loss,
    ...) are kept as numbers too, so the report can use them whether or not this version of the
    store lists them; a table of an older run simply lacks them (NaN after merging).
    """
    if keep_extra:
        columns = list(columns) + [c for c in df.columns if c not in columns and not str(c).startswith("Unnamed")]
    df = df.reindex(columns=list(columns)).copy()
    df["arm"] = arm
    df["seed"] = seed
    for c in columns:
        if c in ("site", "metric"):
            df[c] = df[c].astype(str)
        elif c != "arm":
            # an empty ood_loss column reads as object; make every number a float (NaN = absent)
            df[c] = pd.to_numeric(df[c], errors="coerce")
    df = df[df["tokens"].notna()]
    df["tokens"] = df["tokens"].astype("int64")
    return df


def load_study(study_dirs: StudyDirs) -> StudyData:
    """Load every run under one or more study folders.

    Several folders merge into one study (the same arms/seeds layout split over machines or
    sessions). If the same (arm, seed) appears twice, the finished copy wins, then the one that got
    furthest; the choice is recorded in `notes` so the report can say so.
    """
    dirs = _as_dirs(study_dirs)
    studies = []
    for d in dirs:
        studies.append(read_json(d / STUDY) if (d / STUDY).exists() else {})

    chosen: dict[tuple[str, int], tuple[Run, pd.DataFrame, pd.DataFrame]] = {}
    notes: list[str] = []
    for d, study in zip(dirs, studies):
        for rd in run_dirs(d):
            config = read_json(rd / CONFIG) if (rd / CONFIG).exists() else {}
            # exactly this folder's tables (the store's loaders would also glob any folder inside it)
            scalars = read_table(rd / SCALARS)
            arm, seed = _identify(rd, config, scalars)
            # every row must be this run's: read again with the run's arm and seed to check against
            # (a scalars table has a row per eval point; reading it twice costs little)
            own = {"arm": arm, "seed": seed}
            scalars = read_table(rd / SCALARS, own)
            probes = read_table(rd / PROBES, own) if (rd / PROBES).exists() else pd.DataFrame()
            scalars = _normalise(scalars, SCALAR_COLUMNS, arm, seed, keep_extra=True)
            probes = _normalise(probes, PROBE_COLUMNS, arm, seed)
            target = (config.get("train") or {}).get("tokens", study.get("tokens"))
            last = int(scalars["tokens"].max()) if len(scalars) else None
            finite = scalars.loc[np.isfinite(scalars["val_loss"].to_numpy(dtype=float)), "tokens"]
            last_finite = int(finite.max()) if len(finite) else None
            status, message = _status(rd)
            holder = live_holder(run_lock_path(rd)) if status == UNFINISHED else None
            run = Run(
                arm,
                seed,
                rd,
                status == FINISHED,
                config,
                None if target is None else int(target),
                last,
                status,
                message,
                last_finite,
                None if holder is None else str(holder),
            )
            key = (arm, seed)
            if key in chosen:
                old = chosen[key][0]
                rank = lambda r: (r.done, -1 if r.last_tokens is None else r.last_tokens)  # noqa: E731
                keep, drop = (run, old) if rank(run) > rank(old) else (old, run)
                notes.append(f"{arm} seed {seed} found twice; used {keep.path}, ignored {drop.path}")
                if keep is old:
                    continue
            chosen[key] = (run, scalars, probes)

    runs = [v[0] for v in chosen.values()]
    frames_s = [v[1] for v in chosen.values() if len(v[1])]
    frames_p = [v[2] for v in chosen.values() if len(v[2])]
    scalars = pd.concat(frames_s, ignore_index=True) if frames_s else _empty(SCALAR_COLUMNS)
    probes = pd.concat(frames_p, ignore_index=True) if frames_p else _empty(PROBE_COLUMNS)
    probes = probes.dropna(subset=["layer", "head"])
    probes = probes.astype({"layer": "int64", "head": "int64"})
    study = StudyData(dirs, studies, sorted(runs, key=lambda r: (r.arm, r.seed)), scalars, probes, notes)
    order = {a: i for i, a in enumerate(study.arms)}
    study.runs.sort(key=lambda r: (order[r.arm], r.seed))
    return study


def _status(rd: Path) -> tuple[str, str | None]:
    """(status, message) of a run folder from its done.json: `rankscope.run.study` writes
    ``{"status": "diverged", "message": ...}`` there for a run whose loss became NaN or infinite;
    a normal finish writes the run's summary (no status, or any other status)."""
    if not is_done(rd):
        return UNFINISHED, None
    try:
        done = read_json(rd / DONE)
    except (OSError, ValueError):
        return FINISHED, None  # present but unreadable: the run got to the end of its loop
    if isinstance(done, dict) and str(done.get("status", "")).lower() == DIVERGED:
        msg = done.get("message")
        return DIVERGED, None if msg is None else str(msg)
    return FINISHED, None


def _empty(columns: Sequence[str]) -> pd.DataFrame:
    df = pd.DataFrame({c: pd.Series(dtype="float64") for c in columns})
    df["arm"] = df["arm"].astype(str)
    for c in ("seed", "tokens", "step") + (("layer", "head") if "layer" in columns else ()):
        df[c] = df[c].astype("int64")
    return df
