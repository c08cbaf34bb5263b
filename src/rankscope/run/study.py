"""Running a study (`rankscope.run.studies` defines them): resolved once into a `Plan` of runs, then
each run of the plan's slice trained into the study folder, in order.

`run_study` goes through its phases, one function each: `check_machine` (the batch split between
processes, the devices), `check_folders` (a run folder is reused only with the same settings),
`write_study_json`, `finished_before` (what to skip), then `_Runner.run` for each run still to do
(claim its lock, load the data once, resume or start over, train). Every setting is checked by
`plan_study`, before any of them; the command line counts its runs from the same plan.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import load_data
from ..errors import ConfigError, RankscopeError
from ..settings.config import RunConfig, apply_overrides, preset
from ..settings.flat import flatten
from ..settings.rules import show_value
from ..storage import store
from ..storage.locks import FileLock, LockHeld
from . import checkpoint
from . import dist as rdist
from .estimate import busy_line, memory_line, time_line
from .progress import StudyProgress, tokens_left
from .studies import Study, check_seeds
from .train import RunDiverged, resolve_device, train

Run = tuple[str, RunConfig, Path]  # (arm, config, run folder)


@dataclass(frozen=True)
class Plan:
    """A study resolved once: every run's config, the overrides they were made with, and which
    slice of the runs this process does (`--shard i/n`)."""

    study: Study
    overrides: dict[str, Any]  # the command line's, with model.vocab_size when sized from the data
    runs: list[tuple[str, RunConfig]]  # every (arm, config) of the study, seed-major
    shard: tuple[int, int] = (0, 1)
    vocab_note: str | None = None  # where model.vocab_size came from, when sized from the data

    @property
    def mine(self) -> list[tuple[str, RunConfig]]:
        """The runs of this process's slice, in the study's order."""
        return shard_runs(self.runs, *self.shard)


def plan_study(
    study: Study,
    overrides: Mapping[str, Any] | None = None,
    seeds: tuple[int, ...] | None = None,
    shard: tuple[int, int] = (0, 1),
) -> Plan:
    """The study resolved once, for `run_study` and for anyone counting its runs: the vocabulary
    sized from token shards where nobody set it, then every (arm, seed) config made and checked.
    ConfigError, before any data is loaded or anything is written."""
    sized, note = vocab_from_data(study, dict(overrides or {}))
    return Plan(study, sized, resolve(study, sized, seeds), shard, note)


def resolve(
    study: Study, overrides: Mapping[str, Any], seeds: tuple[int, ...] | None = None
) -> list[tuple[str, RunConfig]]:
    """Every (arm, config) of the study, seed-major, so partial results hold whole seeds. Every
    setting is checked here, before any data is read or anything is written."""
    # each run's seed comes from the seed list; a `seed` setting would be overwritten without a word
    sources = [("in the study's settings", study.settings), ("on the command line", overrides)]
    for where, given in sources + [(f"in arm {a}", o) for a, o in study.arms.items()]:
        if "seed" in given:
            raise ConfigError(
                f"study {study.name}: 'seed' cannot be set {where}: each run's seed comes from the "
                "study's seeds (seeds = [...] in the study file, or --seeds)"
            )
    runs = []
    base = preset(study.preset)
    for seed in check_seeds(seeds or study.seeds, "seeds"):
        for arm, arm_overrides in study.arms.items():
            try:
                cfg = apply_overrides(base, {**study.settings, **arm_overrides, **overrides, "seed": seed})
            except ConfigError as e:
                raise ConfigError(f"study {study.name}, arm {arm}: {e}") from None
            runs.append((arm, cfg))
    return runs


def vocab_from_data(study: Study, overrides: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """`overrides` with model.vocab_size sized from the data when the arms train on token shards
    and nobody set it (in the study's settings, an arm or `overrides`; a preset's value is not a
    choice about this data), and a phrase for the data line saying so; else unchanged and None.
    A size set explicitly stays as set: load_data refuses one too small for the shards' ids."""
    from ..data.loader import shard_vocab_size

    given = [study.settings, overrides, *study.arms.values()]
    if any("model.vocab_size" in g for g in given):
        return dict(overrides), None
    # each arm's data.path as resolve applies them (the command line over the arm over the study)
    paths = {str({**study.settings, **arm, **overrides}.get("data.path", "")) for arm in study.arms.values()}
    if len(paths) != 1:  # several: the first run to train names the problem when it loads the data
        return dict(overrides), None
    sized = shard_vocab_size(paths.pop())
    if sized is None:
        return dict(overrides), None
    return {**overrides, "model.vocab_size": sized[0]}, sized[1]


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n: the i-th of n disjoint slices of a study's runs."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:  # also a number of more than 4,300 digits
        raise ConfigError(f"--shard expects i/n such as 0/4, got {show_value(text)}") from None
    if not 0 <= i < n:
        raise ConfigError(f"--shard {show_value(text)}: need 0 <= i < n (slice i of n, counted from 0)")
    return i, n


def shard_runs(runs: list, i: int, n: int) -> list:
    """Slice i of n: every n-th run starting at i, so slices are disjoint, cover every run once,
    and each holds a mix of arms and seeds (for a Slurm array, i = $SLURM_ARRAY_TASK_ID)."""
    return runs[i::n]


def batch_lines(runs: Sequence[tuple[str, RunConfig]], ranks: int) -> list[str]:
    """How each run's global batch is shared between `ranks` processes (`dist.split_batch`), one
    line per distinct split, naming the arms when they differ; ConfigError, before anything is
    written, for a batch the processes cannot share."""
    arms_of: dict[str, list[str]] = {}
    for arm, cfg in runs:
        t = cfg.train
        text = rdist.split_batch(t.batch_size, t.grad_accum, ranks, t.seq_len).describe(t.seq_len)
        if arm not in arms_of.setdefault(text, []):
            arms_of[text].append(arm)
    if len(arms_of) == 1:
        return [f"rankscope: batch: {text}" for text in arms_of]
    return [f"rankscope: batch of {', '.join(arms)}: {text}" for text, arms in arms_of.items()]


# Settings that change where or how fast a run goes, not what it computes.
_NOT_IDENTITY = (
    "train.device",
    "train.threads",
    "train.compile",
    "train.activation_checkpointing",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.checkpoint_series",
    "train.log",
)


def _identity(cfg_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that make a run what it is, flattened: a folder made with others is another run."""
    flat = flatten({k: cfg_dict[k] for k in ("model", "optim", "train", "probe", "data", "seed") if k in cfg_dict})
    return {k: v for k, v in json.loads(json.dumps(flat)).items() if k not in _NOT_IDENTITY}


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _silent(line: str) -> None:
    """What ranks other than 0 say: nothing (rank 0 says it once for all)."""


def run_study(
    plan: Plan, out_dir: str | Path, progress: bool = True, log: Callable[[str], None] = _stderr
) -> list[dict[str, Any]]:
    """Run every unfinished (arm, seed) of the plan's slice into out_dir.

    Finished runs are skipped; unfinished ones resume from their newest checkpoint, or start over
    when they have none. Returns one summary per run of the slice, in order: what `train` returned
    ("status": "done"), the done.json of a run finished before, or {"status": "diverged", "arm",
    "seed", "message"} for a run that diverged, now or before.

    One process at a time writes a run: it holds the run's lock (`store.run_lock`) while it works
    on it. Shards of one study never share runs, so a run held by another process means the same
    study or shard was started twice; that raises RankscopeError naming the holder, before this
    process touches the run, rather than writing its rows twice or quietly taking over part of the
    other's slice. Under torchrun every rank walks the same list; rank 0 alone locks, decides what
    to run and writes, and the other ranks follow its decisions.
    """
    world = rdist.world()
    say = log if world.main else _silent
    out_dir = Path(out_dir)
    batch_said = check_machine(plan, world.size)
    todo = check_folders(plan, out_dir)
    if world.main:
        write_study_json(plan, out_dir)
    before = finished_before(todo, out_dir, world, say)
    runner = _Runner(plan, [run for run, done in zip(todo, before) if done is None], world, batch_said, say, progress)
    return [done if done is not None else runner.run(*run) for run, done in zip(todo, before)]


def check_machine(plan: Plan, ranks: int) -> list[str]:
    """What the plan asks of this machine, checked before anything is written: the batch of each
    run of the slice shared between `ranks` processes, every run's device (ConfigError for one this
    machine lacks) and its peak memory (ConfigError for one that cannot fit, `estimate`); returns
    the lines saying how the batch is shared and what memory the largest run needs, to be said with
    the data."""
    said = batch_lines(plan.mine, ranks)
    for device in sorted({cfg.train.device for _, cfg in plan.runs}):
        resolve_device(device)
    return said + memory_line(plan.mine, ranks) + busy_line(plan.mine)


def check_folders(plan: Plan, out_dir: Path) -> list[Run]:
    """The slice's runs with their folders; RankscopeError for a folder made with other settings
    (kept only when it was made with the same ones, so a study never mixes two)."""
    todo = []
    for arm, cfg in plan.mine:
        rd = store.run_dir(out_dir, arm, cfg.seed)
        if (rd / store.CONFIG).exists():
            old, new = _identity(store.read_json(rd / store.CONFIG)), _identity(cfg.to_dict())
            if old != new:
                diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                state = "finished" if store.is_done(rd) else "was started"
                raise RankscopeError(
                    f"{rd} {state} with different settings ({', '.join(diff[:4])}); use another --out or remove it"
                )
        todo.append((arm, cfg, rd))
    return todo


def write_study_json(plan: Plan, out_dir: Path) -> None:
    """study.json: the whole study as planned (not the slice), for the report."""
    study, runs = plan.study, plan.runs
    out_dir.mkdir(parents=True, exist_ok=True)
    # the same text from every shard: the first shard to start writes it, the others find it
    # there and leave it alone
    store.write_json_once(
        out_dir / store.STUDY,
        {
            "name": study.name,
            "description": study.description,
            "preset": study.preset,
            "seeds": sorted({cfg.seed for _, cfg in runs}),
            "arms": study.arms,
            "arm_order": list(study.arms),  # "arms" is written with sorted keys
            "contrasts": [list(c) for c in study.contrasts],
            "settings": study.settings,
            "overrides": plan.overrides,
            "tokens": runs[0][1].train.tokens,
        },
    )


def finished_before(
    todo: list[Run], out_dir: Path, world: rdist.World, say: Callable[[str], None]
) -> list[dict[str, Any] | None]:
    """Each run's summary if it finished before (done or diverged), else None; rank 0 reads the
    folders and every rank gets the same list. Says what is skipped, diverged runs by name."""
    before = [store.read_done(rd, a, c.seed) if store.is_done(rd) else None for a, c, rd in todo] if world.main else []
    before = rdist.broadcast_object(before, world)
    finished = [s for s in before if s is not None]
    if finished:
        say(f"rankscope: {len(finished)} of {len(todo)} runs already finished in {out_dir}; skipping them")
        # a rerun must not pass over a failed run in silence (its exit code counts it too)
        diverged = [f"{s['arm']} seed {s['seed']}" for s in finished if s["status"] == "diverged"]
        if diverged:
            say(f"rankscope: diverged before, not rerun: {', '.join(diverged)} (remove a run's folder to run it again)")
        for s in finished:
            if s["status"] not in ("done", "diverged"):
                say(f"rankscope: {s['arm']} seed {s['seed']}: status {s['status']}: {s.get('message', '')}")
    return before


class _Runner:
    """Trains a study's pending runs one after another, holding what they share: the data (loaded
    when the first of them trains), the study's progress bars and the run count."""

    def __init__(
        self,
        plan: Plan,
        pending: list[Run],
        world: rdist.World,
        batch_said: list[str],
        say: Callable[[str], None],
        progress: bool,
    ):
        self.plan, self.pending, self.world = plan, pending, world
        self.batch_said, self.say, self.progress = batch_said, say, progress
        self.data: Any = None
        self.started = 0  # which of the pending runs is under way
        self.warned = False  # the unguarded-lock warning is said once
        self.bars: StudyProgress | None = None
        if progress and self.world.main:  # the bars name each run "run i/N" and show the time left for all N
            self.bars = StudyProgress(
                [
                    tokens_left(c.train.tokens, c.train.batch_size * c.train.seq_len, (checkpoint.steps(rd) or [0])[-1])
                    for _, c, rd in pending
                ]
            )

    def run(self, arm: str, cfg: RunConfig, rd: Path) -> dict[str, Any]:
        """One pending run, start to summary: claimed, then trained; or skipped when another process
        finished it meanwhile; RankscopeError when another process holds it."""
        self.started += 1
        lock, verdict = self._claim(arm, cfg, rd)
        if verdict is not None:
            if verdict[0] == "stop":
                raise RankscopeError(verdict[1])
            self.say(f"rankscope: {arm} seed {cfg.seed}: finished by another process meanwhile; skipping it")
            return verdict[1]
        try:
            self._load_data(cfg)
            self._prepare_folder(arm, cfg, rd)
            return self._train(arm, cfg, rd)
        finally:
            if lock is not None:
                lock.release()  # also after an error or Ctrl-C; a kill leaves it to the kernel

    def _claim(self, arm: str, cfg: RunConfig, rd: Path) -> tuple[FileLock | None, tuple[str, Any] | None]:
        """Rank 0 takes the run's lock and, holding it, looks again: another process may have
        finished the run since the list was made. Returns the lock held (None off rank 0) and rank
        0's verdict, the same on every rank: None to train, ("done", summary) or ("stop", why)."""
        lock = store.run_lock(rd) if self.world.main else None
        verdict: tuple[str, Any] | None = None
        if lock is not None:
            rd.parent.mkdir(parents=True, exist_ok=True)
            try:
                lock.acquire()
            except LockHeld as e:
                verdict = (
                    "stop",
                    f"run {arm} seed {cfg.seed} ({rd}) is being written by {e.holder}; not writing it a second "
                    "time (the same study or --shard started twice?): wait for that process, or end it and rerun",
                )
            except RankscopeError as e:  # no lock file can be made there: stop every rank, not only this one
                verdict = ("stop", str(e))
            else:
                if lock.unguarded and not self.warned:
                    self.say(f"rankscope: warning: {lock.unguarded}; nothing stops two processes writing one run")
                    self.warned = True
                if store.is_done(rd):
                    lock.release()
                    verdict = ("done", store.read_done(rd, arm, cfg.seed))
        return lock, rdist.broadcast_object(verdict, self.world)  # every rank stops or skips with rank 0

    def _load_data(self, cfg: RunConfig) -> None:
        """The study's data, loaded once, when the first pending run trains (they all share it),
        and the data and batch lines said then."""
        if self.data is not None:
            return
        if len({(c.data.path, c.model.vocab_size) for _, c, _ in self.pending}) > 1:
            raise ConfigError("all arms of a study must share data.path and model.vocab_size")
        if self.world.main:  # rank 0 builds the tokenizer cache; the others then read it
            self.data = load_data(cfg.data.path or None, cfg.model.vocab_size, progress=self.progress)
        rdist.barrier(self.world)
        if not self.world.main:
            self.data = load_data(cfg.data.path or None, cfg.model.vocab_size, progress=False)
        note = self.plan.vocab_note
        self.say(f"rankscope: data: {self.data.source}" + (f"; {note}" if note else ""))
        for line in self.batch_said + time_line([(arm, c) for arm, c, _ in self.pending], self.world.size):
            self.say(line)

    def _prepare_folder(self, arm: str, cfg: RunConfig, rd: Path) -> None:
        """The run's folder made ready: resumed from its newest checkpoint, or emptied to start over
        (an unfinished run without a checkpoint)."""
        if self.world.main:
            if checkpoint.steps(rd):
                self.say(
                    f"rankscope: {arm} seed {cfg.seed}: resuming from the checkpoint at step {checkpoint.steps(rd)[-1]}"
                )
            else:
                store.clear_run(rd)
        rdist.barrier(self.world)

    def _train(self, arm: str, cfg: RunConfig, rd: Path) -> dict[str, Any]:
        """The run trained: its summary, or for a run that diverged the summary written as its
        done.json (so a rerun skips it and names it)."""
        if self.bars is not None:
            self.bars.start_run(self.started)
        try:
            return train(
                cfg,
                rd,
                self.data,
                arm=arm,
                progress=self.progress,
                progress_desc=f"run {self.started}/{len(self.pending)}: {arm} seed {cfg.seed}",
                study_progress=self.bars,
            )
        except RunDiverged as e:
            self.say(f"rankscope: {e}")
            summary = {"status": "diverged", "arm": arm, "seed": cfg.seed, "message": str(e)}
            if self.world.main:
                store.write_record(rd / store.DONE, summary)
            return summary
