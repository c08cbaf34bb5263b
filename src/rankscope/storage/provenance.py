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

from .. import __version__

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


# CPU features that decide how fast a float32 or bfloat16 matmul runs (Linux /proc/cpuinfo flags).
_ISA = (("avx512f", "AVX-512"), ("avx512_bf16", "AVX-512 BF16"), ("amx_bf16", "AMX-BF16"))


def cpu_info() -> dict[str, Any]:
    """The CPU's model name, its matmul-relevant instruction sets (AVX2, AVX-512, AVX-512 BF16,
    AMX-BF16: from /proc/cpuinfo on Linux, none elsewhere), the kernels torch dispatches to
    (`torch.backends.cpu.get_cpu_capability()`) and torch's threads."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not name:
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {
        "name": name or platform.processor() or platform.machine() or "cpu",
        "isa": [label for flag, label in _ISA if flag in flags] or (["AVX2"] if "avx2" in flags else []),
        "amx": "amx_bf16" in flags,
        "kernels": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


def describe_cpu(info: dict[str, Any] | None = None) -> str:
    """'AMD EPYC (AVX-512, AVX-512 BF16, no AMX; torch kernels AVX512), 2 threads'."""
    c = info or cpu_info()
    isa = ", ".join(c["isa"] + ([] if c["amx"] else ["no AMX"]))
    return f"{c['name']} ({isa}; torch kernels {c['kernels']}), {c['threads']} thread{'s' if c['threads'] != 1 else ''}"


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
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_info()["name"],
        "threads": torch.get_num_threads(),
    }
    for name in _FRAMEWORKS:
        mod = sys.modules.get(name)
        if mod is not None:
            env[name] = getattr(mod, "__version__", None)
    return env
