"""The package's layout holds to its own rules: imports run down the layers, no module reaches
into another's private names, no source file grows past 450 lines, and the torch-free parts
stay torch-free."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "rankscope"
MAX_LINES = 450
# who may import whom, by sub-package (a module's own sub-package is always allowed); the rest of
# the package (errors) sits below everything
LAYERS = {
    "settings": set(),
    "storage": {"settings"},
    "core": {"settings"},
    "data": {"settings", "storage"},
    "measure": {"core", "settings", "data"},
    "attach": {"core", "measure", "settings", "data"},
    "report": {"settings", "storage"},
    "integrations": {"attach", "core", "data", "measure", "settings", "storage", "run"},
    "analyze": {"attach", "core", "data", "measure", "report", "run", "settings", "storage"},
    "run": {"core", "data", "measure", "settings", "storage"},
}


def modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py"))


def package_of(path: Path) -> str:
    rel = path.relative_to(SRC).parts
    return rel[0] if len(rel) > 1 else ""


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(absolute module under rankscope, imported names, line) of every relative import."""
    tree = ast.parse(path.read_text())
    pkg = list(path.relative_to(SRC).parent.parts)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
            mod = ".".join(base + ([node.module] if node.module else []))
            found.append((mod, [a.name for a in node.names], node.lineno))
    return found


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_no_source_file_is_over_the_line_limit(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(SRC)} has {n} lines (at most {MAX_LINES})"


def test_no_module_imports_another_modules_private_names():
    bad = [
        f"{p.relative_to(SRC)}:{line} imports {name} from {mod or 'rankscope'}"
        for p in modules()
        for mod, names, line in imports(p)
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not bad, "\n".join(bad)


def test_imports_run_down_the_layers():
    bad = []
    for p in modules():
        own = package_of(p)
        if own not in LAYERS:
            continue  # cli, __main__, __init__, errors: the top and the bottom
        for mod, names, line in imports(p):
            target = mod.split(".")[0] if mod else ""
            targets = {target} if target else {n for n in names if (SRC / n).is_dir()}
            for t in targets:
                if t and t != own and (SRC / t).is_dir() and t not in LAYERS[own]:
                    bad.append(f"{p.relative_to(SRC)}:{line}: {own}/ imports {t}/")
    assert not bad, "\n".join(bad)


def test_the_torch_free_parts_import_without_torch():
    code = (
        "import sys, rankscope, rankscope.settings.config, rankscope.settings.contrasts, rankscope.settings.seedref,"
        " rankscope.storage.store, rankscope.storage.locks, rankscope.report;"
        " assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
