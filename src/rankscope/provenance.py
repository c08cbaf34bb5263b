"""Where and with what a result was made: versions, git commit, device, time.

Every folder rankscope writes (a training run, a probe logger's run, an analysis) records this,
so a number can be traced back to the code and machine that produced it (modded-nanogpt's habit
of logging its own environment).
"""

from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from . import __version__

# Frameworks whose version matters when rankscope probes their models or runs in their loops.
_FRAMEWORKS = ("transformers", "lightning", "transformer_lens")


def _git(*args: str) -> str | None:
    src = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def now() -> str:
    """The current UTC time, to the second, ISO 8601."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def environment(device: torch.device) -> dict[str, Any]:
    """rankscope's version and git commit (with a dirty flag), torch, CUDA, Python, the platform,
    the device and its name, torch's CPU threads, and the version of each framework already loaded."""
    commit = _git("rev-parse", "HEAD")
    env: dict[str, Any] = {
        "rankscope": __version__,
        "git_commit": commit,
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
    }
    for name in _FRAMEWORKS:
        mod = sys.modules.get(name)
        if mod is not None:
            env[name] = getattr(mod, "__version__", None)
    return env
