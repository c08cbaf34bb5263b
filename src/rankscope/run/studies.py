"""What a study is: arms x seeds on identical data and initial weights; the built-in studies and
study TOML files. (Running one is `rankscope.run.study`.)

A study file::

    name = "my-study"           # optional; default: the file's stem
    description = "what it asks"
    preset = "tiny"             # tiny | seed-88m | seed-1.5b
    tokens = "2M"               # token budget per run (train.tokens)
    eval_every = "200K"         # tokens between evaluations and probes (train.eval_every)
    seeds = [0, 1, 2]

    [settings]                  # overrides for every arm
    optim.muon_lr = 0.024

    [arms.qk-norm]              # one table of overrides per arm
    model.qk_norm = "learned"
    [arms.no-norm]
    model.qk_norm = "none"

    contrasts = [["qk-norm", "no-norm"]]   # optional, before the tables: the comparisons
                                           # (treatment, control) the study exists for

`probe_every`, the old name of `eval_every`, is still read (and said on stderr).

Without `contrasts`, the pairs of arms that differ in exactly one setting are the contrasts (see
`rankscope.settings.contrasts`). The report, the summary and the terminal lead with them, in this order.

Settings apply in order: preset, study settings, the arm's overrides, then the command line.
Re-running a study skips its finished runs and redoes unfinished ones from the start.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..settings.config import setting_value
from ..settings.contrasts import Contrast, derive
from ..settings.contrasts import check as check_contrasts
from ..settings.flat import flatten
from ..settings.rules import show_value

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Study:
    """A study as defined: its arms' overrides, preset, seeds and shared settings, not yet resolved
    into run configs (`rankscope.run.study.plan_study` does that, once)."""

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
_TOP_KEYS = {"name", "description", "preset", "tokens", "eval_every", "seeds", "settings", "arms", "contrasts"}
# Study keys that set one run setting each, checked by that setting's own rule.
_SETTING_KEYS = (("tokens", "train.tokens"), ("eval_every", "train.eval_every"))
# Old names still read, each with the name it now has: files written before a rename keep working.
_OLD_NAMES = {"probe_every": "eval_every"}


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def read_study(spec: str, say: Callable[[str], None] = _stderr) -> Study:
    """A built-in study by name, or a study TOML file by path; `say` gets the file's notes (an
    old key name read under its new one)."""
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
    return study_from_dict(raw, default_name=path.stem, where=str(path), say=say)


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


def _current_names(raw: Mapping[str, Any], where: str, say: Callable[[str], None]) -> dict[str, tuple[str, Any]]:
    """The file's top-level keys under their current names, each with (the name as written, its
    value): an old name is read as its new one, said once; both at once is an error."""
    keys: dict[str, tuple[str, Any]] = {}
    for key, value in raw.items():
        new = _OLD_NAMES.get(key)
        if new is None:
            keys[key] = (key, value)
            continue
        if new in raw:
            raise ConfigError(f"{where}: {key} is the old name of {new}; give only {new}")
        say(f"rankscope: {where}: {key} is the old name of {new}; read as {new}")
        keys[new] = (key, value)
    return keys


def study_from_dict(
    raw: Mapping[str, Any], default_name: str = "study", where: str = "study", say: Callable[[str], None] = _stderr
) -> Study:
    """A study from a study file's table, its structure and names checked (one line of ConfigError
    naming `where` for anything wrong); its settings are checked when the study is resolved
    (`rankscope.run.study.plan_study`), before anything runs."""
    keys = _current_names(raw, where, say)
    unknown = sorted(str(k) for k in set(keys) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {show_value(unknown[0])} (known: {', '.join(sorted(_TOP_KEYS))})")

    def typed(key: str, typ: type | tuple, what: str) -> Any:
        given, value = keys[key]
        if not isinstance(value, typ) or isinstance(value, bool):
            raise ConfigError(f"{where}: {given} must be {what}, got {show_value(value)}")
        return value

    settings: dict[str, Any] = {}
    if "settings" in keys:
        settings.update(flatten(typed("settings", dict, "a table of overrides")))
    for key, target in _SETTING_KEYS:
        if key in keys:  # checked here by the setting's own rule, so the message names the study's key
            given, value = keys[key]
            settings[target] = setting_value(f"{where}: {given}", target, value)
    arms = _arms(typed("arms", dict, "a table of arms") if "arms" in keys else {}, where)
    seeds = (0,)
    if "seeds" in keys:
        seeds = check_seeds(typed("seeds", list, "a list of integers"), f"{where}: seeds")
    name = typed("name", str, "a string") if "name" in keys else default_name
    if not _STUDY_NAME.fullmatch(name) or name in (".", ".."):
        raise ConfigError(
            f"{where}: name {show_value(name)} must be a folder name (it is the default --out, rankscope-out/NAME): "
            "not empty, no '/', '\\' or control characters"
        )
    contrasts = keys["contrasts"][1] if "contrasts" in keys else None
    return Study(
        name=name,
        description=typed("description", str, "a string") if "description" in keys else "",
        arms=arms,
        preset=typed("preset", str, "a preset name") if "preset" in keys else "tiny",
        seeds=seeds,
        settings=settings,
        declared_contrasts=tuple(check_contrasts(contrasts, list(arms), where)) if contrasts is not None else (),
    )


def _arms(arms_raw: Mapping[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """The study file's [arms.NAME] tables, flattened to dotted keys; each name a folder name."""
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
    return arms


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
