"""The checkpoints of a series for `rankscope analyze PATH --series`: found in a rankscope run
folder (`checkpoints/step-*.pt`), a folder of Hugging Face checkpoint folders (`step1000/`,
`checkpoint-500/`, ...: the step from trainer_state.json or the folder's name), or the branches of
a hub repository that name steps (Pythia's `step1000`, OLMo's `step1000-tokens4B`); `select` picks
some (`--steps`, `--max-checkpoints`), and `check_vocab` refuses checkpoints that disagree on the
vocabulary before anything is loaded or written.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import RankscopeError
from ..storage.store import CHECKPOINTS, CONFIG, read_record
from .inputs import LoadedModel, first_line, load_checkpoint, load_revision

_STEP_NAME = re.compile(r"(?:global_step|step|checkpoint)[-_]?(\d+)", re.I)
_TOKENS_NAME = re.compile(r"tokens[-_]?(\d+(?:\.\d+)?)([KMBT]?)", re.I)
_UNIT = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


@dataclass
class Checkpoint:
    """One checkpoint of a series: where training was, and how to load it."""

    step: int
    label: str  # file, folder or revision name
    load: Callable[[], LoadedModel] = field(repr=False)
    tokens: int | None = None  # where the name says (OLMo revisions); else what the loaded model says
    vocab_size: int | None = None  # where known without loading the weights


def step_of(name: str) -> int | None:
    """The step a checkpoint folder or revision name says: step1000, step-1000, checkpoint-500,
    global_step500, step1000-tokens4B; a name that is only a number is that number."""
    m = _STEP_NAME.search(name)
    if m:
        return int(m.group(1))
    return int(name) if name.isdigit() else None


def tokens_of(name: str) -> int | None:
    """Tokens a revision name states (OLMo's `step1000-tokens4B`), else None."""
    m = _TOKENS_NAME.search(name)
    return None if m is None else int(float(m.group(1)) * _UNIT[m.group(2).upper()])


def is_checkpoint_folder(path: Path) -> bool:
    """A folder (not itself a model) holding Hugging Face model folders."""
    return (
        path.is_dir()
        and not (path / CONFIG).exists()
        and any("model_type" in read_record(d / CONFIG) for d in path.iterdir() if d.is_dir())
    )


def _rankscope_checkpoints(run: Path) -> list[Checkpoint]:
    vocab = (read_record(run / CONFIG).get("model") or {}).get("vocab_size")
    out = []
    for f in sorted((run / CHECKPOINTS).glob("step-*.pt")):
        m = re.fullmatch(r"step-(\d+)\.pt", f.name)  # not a rank's share (step-*.rank1.pt)
        if m:
            out.append(Checkpoint(int(m.group(1)), f.name, lambda f=f: load_checkpoint(run, f), vocab_size=vocab))
    return out


def _hf_checkpoints(folder: Path) -> list[Checkpoint]:
    from .inputs import load_model

    out = []
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        config = read_record(d / CONFIG)
        if "model_type" not in config:
            continue
        state = read_record(d / "trainer_state.json")
        step = state.get("global_step") if isinstance(state.get("global_step"), int) else step_of(d.name)
        if step is None:
            raise RankscopeError(f"{d}: cannot tell its step (no trainer_state.json, no step number in its name)")
        vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
        out.append(Checkpoint(int(step), d.name, lambda d=d: load_model(d), vocab_size=vocab))
    return out


def list_revisions(repo: str) -> list[str]:
    """The branch names of a hub repository (needs `huggingface_hub` and the network)."""
    try:
        from huggingface_hub import list_repo_refs
    except ImportError:
        raise RankscopeError("--hub-revisions needs huggingface_hub: pip install 'rankscope[hub]'") from None
    try:
        refs = list_repo_refs(repo)
    except Exception as e:
        raise RankscopeError(f"cannot list the revisions of {repo}: {first_line(e)}") from None
    return [b.name for b in refs.branches]


def hub_checkpoints(repo: str, names: Sequence[str]) -> list[Checkpoint]:
    """The revisions among `names` that name a step (`main` and others are left out)."""
    out = []
    for name in names:
        step = step_of(name)
        if step is not None:
            out.append(Checkpoint(step, name, lambda n=name: load_revision(repo, n), tokens=tokens_of(name)))
    if not out:
        raise RankscopeError(f"{repo}: no branch names a step (such as step1000); branches: {', '.join(names[:8])}")
    return out


def select(
    checkpoints: list[Checkpoint], steps: Sequence[int] | None = None, limit: int | None = None
) -> list[Checkpoint]:
    """Sorted by step; only `steps` (each must exist); at most `limit`, evenly spaced, first and last kept."""
    by_step: dict[int, Checkpoint] = {}
    for c in sorted(checkpoints, key=lambda c: (c.step, c.label)):
        if c.step in by_step:
            raise RankscopeError(f"{by_step[c.step].label} and {c.label} are both step {c.step}; pick one with --steps")
        by_step[c.step] = c
    chosen = list(by_step.values())
    if steps:
        missing = [s for s in steps if s not in by_step]
        if missing:
            have = ", ".join(str(s) for s in list(by_step)[:12])
            raise RankscopeError(f"no checkpoint at step {', '.join(map(str, missing))} (there are: {have})")
        chosen = [by_step[s] for s in sorted(set(steps))]
    if limit is not None and len(chosen) > limit:
        if limit < 1:
            raise RankscopeError(f"--max-checkpoints must be positive, got {limit}")
        picks = sorted({round(i * (len(chosen) - 1) / max(limit - 1, 1)) for i in range(limit)})
        chosen = [chosen[i] for i in picks]
    return chosen


def is_run_folder(path: Path) -> bool:
    """PATH is a rankscope run folder: it has a checkpoints/ folder."""
    return (path / CHECKPOINTS).is_dir()


def find_series(path: str, hub: bool = False) -> tuple[list[Checkpoint], str, int, Path]:
    """(checkpoints, series name, seed, default output folder) of PATH."""
    if hub:
        name = path.rstrip("/").split("/")[-1]
        return hub_checkpoints(path, list_revisions(path)), name, 0, Path("rankscope-series") / name
    p = Path(path)
    if not p.is_dir():
        raise RankscopeError(f"{p}: no such folder (--series takes a run folder or a folder of checkpoint folders)")
    if is_run_folder(p):
        raw = read_record(p / CONFIG)
        name, seed = str(raw.get("arm") or p.parent.name), int(raw.get("seed") or 0)
        study = p.parent.parent if re.fullmatch(r"seed-\d+", p.name) else p
        found = _rankscope_checkpoints(p)
        if not found:
            raise RankscopeError(f"{p}/checkpoints holds no step-*.pt checkpoint")
        return found, name, seed, study.parent / f"{study.name}-series"
    if is_checkpoint_folder(p):
        return _hf_checkpoints(p), p.resolve().name, 0, p.parent / f"{p.resolve().name}-series"
    if "model_type" in read_record(p / CONFIG):
        raise RankscopeError(f"{p} is one Hugging Face model; a series is a folder of checkpoint folders")
    raise RankscopeError(
        f"{p} is neither a rankscope run folder (checkpoints/) nor a folder of Hugging Face checkpoints"
    )


def check_vocab(checkpoints: Sequence[Checkpoint]) -> None:
    """Refuse, in one line, checkpoints that disagree on the vocabulary size (where known before loading)."""
    known = [(c, c.vocab_size) for c in checkpoints if c.vocab_size is not None]
    for c, v in known[1:]:
        if v != known[0][1]:
            first = known[0][0]
            raise RankscopeError(
                f"the checkpoints do not share one tokenizer: {first.label} has a vocabulary of {known[0][1]}, "
                f"{c.label} of {v}; a series is measured on one batch, so give checkpoints of one run"
            )


__all__ = [
    "is_run_folder",
    "Checkpoint",
    "check_vocab",
    "find_series",
    "hub_checkpoints",
    "is_checkpoint_folder",
    "list_revisions",
    "select",
    "step_of",
    "tokens_of",
]
