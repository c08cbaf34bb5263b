"""Studies: arms x seeds on identical data and initial weights; built-in studies and TOML files.

A study file::

    name = "my-study"           # optional; default: the file's stem
    description = "what it asks"
    preset = "tiny"             # tiny | seed-88m | seed-1.5b
    tokens = "2M"               # token budget per run (train.tokens)
    probe_every = "200K"        # tokens between evaluations and probes (train.eval_every)
    seeds = [0, 1, 2]

    [settings]                  # overrides for every arm
    optim.muon_lr = 0.024

    [arms.qk-norm]              # one table of overrides per arm
    model.qk_norm = "learned"
    [arms.no-norm]
    model.qk_norm = "none"

    contrasts = [["qk-norm", "no-norm"]]   # optional, before the tables: the comparisons
                                           # (treatment, control) the study exists for

Without `contrasts`, the pairs of arms that differ in exactly one setting are the contrasts (see
`rankscope.settings.contrasts`). The report, the summary and the terminal lead with them, in this order.

Settings apply in order: preset, study settings, the arm's overrides, then the command line.
Re-running a study skips its finished runs and redoes unfinished ones from the start.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, RankscopeError
from ..settings.config import RunConfig, apply_overrides, preset, setting_value
from ..settings.contrasts import Contrast, derive
from ..settings.contrasts import check as check_contrasts
from ..settings.flat import flatten
from ..settings.rules import show_value
from ..storage import store
from ..storage.locks import LockHeld

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Study:
    name: str
    description: str
    arms: dict[str, dict[str, Any]]
    preset: str = "tiny"
    seeds: tuple[int, ...] = (0,)
    settings: dict[str, Any] = field(default_factory=dict)
    declared_contrasts: tuple[Contrast, ...] = ()  # empty: derived from the arms' settings

    @property
    def contrasts(self) -> list[Contrast]:
        """The (treatment, control) pairs the study compares first: declared, else derived."""
        return list(self.declared_contrasts) or derive(self.arms)


_MUON, _ADAMW = {"optim.name": "muon"}, {"optim.name": "adamw"}

BUILTIN: dict[str, Study] = {
    "qk-muon": Study(
        "qk-muon",
        "Muon with learned QK-Norm vs Muon without: the seed's comparison.",
        {"qk-norm": {"model.qk_norm": "learned", **_MUON}, "no-norm": {"model.qk_norm": "none", **_MUON}},
    ),
    "qk-4way": Study(
        "qk-4way",
        "QK-Norm on/off under Muon and under AdamW: the seed's 4-way comparison.",
        {
            "qk-norm-muon": {"model.qk_norm": "learned", **_MUON},
            "no-norm-muon": {"model.qk_norm": "none", **_MUON},
            "qk-norm-adamw": {"model.qk_norm": "learned", **_ADAMW},
            "no-norm-adamw": {"model.qk_norm": "none", **_ADAMW},
        },
        # QK-Norm on vs off within each optimizer: the question; optimizer pairs are in the all-pairs table
        declared_contrasts=(("qk-norm-muon", "no-norm-muon"), ("qk-norm-adamw", "no-norm-adamw")),
    ),
    "gamma": Study(
        "gamma",
        "Under Muon: QK-Norm with a learned gain, with the gain frozen at 1, and no QK-Norm "
        "(the seed author's 1.5B follow-up; run it with --preset seed-1.5b for its settings). Keys are "
        "probed before RoPE too, where that study read them.",
        {
            "learned-gain": {"model.qk_norm": "learned", **_MUON},
            "frozen-gain": {"model.qk_norm": "frozen", **_MUON},
            "no-norm": {"model.qk_norm": "none", **_MUON},
        },
        settings={"probe.sites": "k_pre,k"},
        declared_contrasts=(("learned-gain", "no-norm"), ("frozen-gain", "no-norm"), ("learned-gain", "frozen-gain")),
    ),
    "clip": Study(
        "clip",
        "Under Muon: QK-Clip (MuonClip, Kimi K2; threshold 15 on each head's max logit) vs "
        "QK-Norm vs neither. Is bounding logits without normalising enough to keep keys high-rank?",
        {
            "qk-clip": {"model.qk_norm": "none", "optim.qk_clip_tau": 15.0, **_MUON},
            "qk-norm": {"model.qk_norm": "learned", **_MUON},
            "no-norm": {"model.qk_norm": "none", **_MUON},
        },
        declared_contrasts=(("qk-clip", "no-norm"), ("qk-norm", "no-norm"), ("qk-clip", "qk-norm")),
    ),
    "norm-variants": Study(
        "norm-variants",
        "Under Muon: QK-Norm with a learned gain, a gain frozen at 1, no gain "
        "(parameter-free, as modded-nanogpt), and no QK-Norm.",
        {
            "learned": {"model.qk_norm": "learned", **_MUON},
            "frozen": {"model.qk_norm": "frozen", **_MUON},
            "parameter-free": {"model.qk_norm": "parameter_free", **_MUON},
            "none": {"model.qk_norm": "none", **_MUON},
        },
        declared_contrasts=(("learned", "none"), ("frozen", "none"), ("parameter-free", "none")),
    ),
    "muon-grouping": Study(
        "muon-grouping",
        "Under Muon (Polar Express): QK-Norm on and off, each with Q, K, V, O orthogonalized "
        "stacked in one matrix (the seed's), separately, and per head. How much of the key-PR "
        "gap belongs to QK-Norm, and how much to the grouping?",
        {
            f"{norm}.{name}": {"model.qk_norm": qk, "optim.muon_qkvo": grouping, **_MUON}
            for norm, qk in (("qk-norm", "learned"), ("no-norm", "none"))
            for name, grouping in (("stacked", "stacked"), ("separate", "separate"), ("per-head", "per_head"))
        },
        # QK-Norm on vs off under each grouping; the grid's effects and interactions follow in the report
        declared_contrasts=tuple((f"qk-norm.{g}", f"no-norm.{g}") for g in ("stacked", "separate", "per-head")),
    ),
}
DEFAULT_STUDY = "qk-muon"

_ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")  # a folder name on every system (fullmatch)
# The study's name is the default --out folder (rankscope-out/NAME): one folder, not a path.
_STUDY_NAME = re.compile(r"[^/\\\x00-\x1f]+")
_TOP_KEYS = {"name", "description", "preset", "tokens", "probe_every", "seeds", "settings", "arms", "contrasts"}


def read_study(spec: str) -> Study:
    """A built-in study by name, or a study TOML file by path."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"no built-in study or study file named {spec!r} (built in: {', '.join(BUILTIN)})")
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except (RecursionError, ValueError) as e:  # the parser's own limits, met by hostile files
        raise ConfigError(f"{path}: {_beyond_parser(text, e)}") from None
    return study_from_dict(raw, default_name=path.stem, where=str(path))


def _beyond_parser(text: str, error: BaseException) -> str:
    """What a TOML file that the parser cannot hold has, and where: arrays or tables nested deeper
    than Python's recursion allows, or an integer of more digits than Python converts (4,300)."""
    lines = text.splitlines() or [""]
    if isinstance(error, RecursionError):
        depth, worst, line = 0, 0, 1
        for i, ln in enumerate(lines, 1):
            for ch in ln:
                depth += (ch in "[{") - (ch in "]}")
                if depth > worst:
                    worst, line = depth, i
        return f"line {line}: values nested {worst:,} deep, more than a study file can hold"
    for i, ln in enumerate(lines, 1):
        run = max((len(m) for m in re.findall(r"[0-9_]+", ln)), default=0)
        if run > 4300:
            return f"line {i}: an integer literal of {run:,} digits, more than Python reads (4,300)"
    return f"cannot be read: {error}"


def study_from_dict(raw: Mapping[str, Any], default_name: str = "study", where: str = "study") -> Study:
    unknown = sorted(str(k) for k in set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {show_value(unknown[0])} (known: {', '.join(sorted(_TOP_KEYS))})")

    def typed(key: str, typ: type | tuple, what: str) -> Any:
        value = raw[key]
        if not isinstance(value, typ) or isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be {what}, got {show_value(value)}")
        return value

    settings: dict[str, Any] = {}
    if "settings" in raw:
        settings.update(flatten(typed("settings", dict, "a table of overrides")))
    for key, target in (("tokens", "train.tokens"), ("probe_every", "train.eval_every")):
        if key in raw:  # checked here by the setting's own rule, so the message names the study's key
            settings[target] = setting_value(f"{where}: {key}", target, raw[key])
    arms_raw = typed("arms", dict, "a table of arms") if "arms" in raw else {}
    if not arms_raw:
        raise ConfigError(f"{where}: no arms (add tables such as [arms.qk-norm])")
    arms = {}
    for name, overrides in arms_raw.items():
        if not _ARM_NAME.fullmatch(name):
            raise ConfigError(
                f"{where}: arm name {show_value(name)} must be letters, digits, '-', '_', '.' or '+', "
                "starting with a letter or digit"
            )
        if not isinstance(overrides, dict):
            raise ConfigError(f"{where}: arms.{name} must be a table of overrides, got {show_value(overrides)}")
        arms[name] = flatten(overrides)
    seeds = (0,)
    if "seeds" in raw:
        seeds = check_seeds(typed("seeds", list, "a list of integers"), f"{where}: seeds")
    name = typed("name", str, "a string") if "name" in raw else default_name
    if not _STUDY_NAME.fullmatch(name) or name in (".", ".."):
        raise ConfigError(
            f"{where}: name {show_value(name)} must be a folder name (it is the default --out, rankscope-out/NAME): "
            "not empty, no '/', '\\' or control characters"
        )
    study = Study(
        name=name,
        description=typed("description", str, "a string") if "description" in raw else "",
        arms=arms,
        preset=typed("preset", str, "a preset name") if "preset" in raw else "tiny",
        seeds=seeds,
        settings=settings,
        declared_contrasts=tuple(check_contrasts(raw["contrasts"], list(arms), where)) if "contrasts" in raw else (),
    )
    resolve(study, {})  # fail now on unknown keys or wrong types, before any run starts
    return study


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
    if len(paths) != 1:  # several: run_study names the problem when it loads the data
        return dict(overrides), None
    sized = shard_vocab_size(paths.pop())
    if sized is None:
        return dict(overrides), None
    return {**overrides, "model.vocab_size": sized[0]}, sized[1]


def check_seeds(seeds: Sequence[Any], what: str) -> tuple[int, ...]:
    """Seeds from a study file or --seeds: integers in the `seed` setting's range, each once (a
    seed given twice would train the same run twice, into the same folder)."""
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{what} must be a non-empty list of integers, got {show_value(list(seeds))}")
    checked = tuple(setting_value(what, "seed", s) for s in seeds)
    seen: set[int] = set()
    for s in checked:
        if s in seen:
            raise ConfigError(f"{what}: seed {s} is given twice; each seed is one run of every arm")
        seen.add(s)
    return checked


# Settings that change where or how fast a run goes, not what it computes.
_NOT_IDENTITY = (
    "train.device",
    "train.threads",
    "train.compile",
    "train.activation_checkpointing",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.log",
)


def _identity(cfg_dict: Mapping[str, Any]) -> dict[str, Any]:
    flat = flatten({k: cfg_dict[k] for k in ("model", "optim", "train", "probe", "data", "seed") if k in cfg_dict})
    return {k: v for k, v in json.loads(json.dumps(flat)).items() if k not in _NOT_IDENTITY}


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
    from .dist import split_batch

    arms_of: dict[str, list[str]] = {}
    for arm, cfg in runs:
        t = cfg.train
        text = split_batch(t.batch_size, t.grad_accum, ranks, t.seq_len).describe(t.seq_len)
        if arm not in arms_of.setdefault(text, []):
            arms_of[text].append(arm)
    if len(arms_of) == 1:
        return [f"rankscope: batch: {text}" for text in arms_of]
    return [f"rankscope: batch of {', '.join(arms)}: {text}" for text, arms in arms_of.items()]


def run_study(
    study: Study,
    out_dir: str | Path,
    overrides: Mapping[str, Any] | None = None,
    seeds: tuple[int, ...] | None = None,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> list[dict[str, Any]]:
    """Run every unfinished (arm, seed) of the study (or of its slice `shard`) into out_dir.

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
    from ..data import load_data
    from . import checkpoint
    from . import dist as rdist
    from .train import RunDiverged, train

    world = rdist.world()
    say = log if world.main else (lambda s: None)
    overrides, vocab_note = vocab_from_data(study, dict(overrides or {}))
    runs = resolve(study, overrides, seeds)
    out_dir = Path(out_dir)
    batch_said = batch_lines(shard_runs(runs, *shard), world.size)  # a batch the ranks cannot share stops here
    from .train import resolve_device

    for device in sorted({cfg.train.device for _, cfg in runs}):
        resolve_device(device)  # a device this machine lacks stops here, before anything is written

    # a run folder is kept only when it was made with the same settings
    todo = []
    for arm, cfg in shard_runs(runs, *shard):
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

    if world.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        # the same text from every shard (the whole study, not the slice): the first shard to
        # start writes it, the others find it there and leave it alone
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
                "overrides": overrides,
                "tokens": runs[0][1].train.tokens,
            },
        )

    # what finished before (rank 0 reads, every rank gets the same list)
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
    pending = [(a, c, rd) for (a, c, rd), s in zip(todo, before) if s is None]
    data = None
    summaries = []
    started, warned = 0, False
    # the progress bars name each run "run i/N" and show the time left for all N
    study_progress = None
    if progress and world.main:
        from .progress import StudyProgress, tokens_left

        study_progress = StudyProgress(
            [
                tokens_left(c.train.tokens, c.train.batch_size * c.train.seq_len, (checkpoint.steps(rd) or [0])[-1])
                for _, c, rd in pending
            ]
        )
    for (arm, cfg, rd), done_before in zip(todo, before):
        if done_before is not None:
            summaries.append(done_before)
            continue
        started += 1  # which of the pending runs this is
        # rank 0 takes the run's lock and, holding it, looks again: another process may have
        # finished the run since the list above was made
        lock = store.run_lock(rd) if world.main else None
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
                if lock.unguarded and not warned:
                    say(f"rankscope: warning: {lock.unguarded}; nothing stops two processes writing one run")
                    warned = True
                if store.is_done(rd):
                    lock.release()
                    verdict = ("done", store.read_done(rd, arm, cfg.seed))
        verdict = rdist.broadcast_object(verdict, world)  # every rank stops or skips with rank 0
        if verdict is not None:
            if verdict[0] == "stop":
                raise RankscopeError(verdict[1])
            say(f"rankscope: {arm} seed {cfg.seed}: finished by another process meanwhile; skipping it")
            summaries.append(verdict[1])
            continue
        try:
            if data is None:
                sources = {(c.data.path, c.model.vocab_size) for _, c, _ in pending}
                if len(sources) > 1:
                    raise ConfigError("all arms of a study must share data.path and model.vocab_size")
                if world.main:  # rank 0 builds the tokenizer cache; the others then read it
                    data = load_data(cfg.data.path or None, cfg.model.vocab_size, progress=progress)
                rdist.barrier(world)
                if not world.main:
                    data = load_data(cfg.data.path or None, cfg.model.vocab_size, progress=False)
                say(f"rankscope: data: {data.source}" + (f"; {vocab_note}" if vocab_note else ""))
                for line in batch_said:
                    say(line)
            if world.main:
                if checkpoint.steps(rd):
                    say(
                        f"rankscope: {arm} seed {cfg.seed}: resuming from the checkpoint at step "
                        f"{checkpoint.steps(rd)[-1]}"
                    )
                else:
                    store.clear_run(rd)  # an unfinished run without a checkpoint starts over
            rdist.barrier(world)
            if study_progress is not None:
                study_progress.start_run(started)
            try:
                summaries.append(
                    train(
                        cfg,
                        rd,
                        data,
                        arm=arm,
                        progress=progress,
                        progress_desc=f"run {started}/{len(pending)}: {arm} seed {cfg.seed}",
                        study_progress=study_progress,
                    )
                )
            except RunDiverged as e:
                say(f"rankscope: {e}")
                summary = {"status": "diverged", "arm": arm, "seed": cfg.seed, "message": str(e)}
                if world.main:
                    store.write_record(rd / store.DONE, summary)
                summaries.append(summary)
        finally:
            if lock is not None:
                lock.release()  # also after an error or Ctrl-C; a kill leaves it to the kernel
    return summaries
