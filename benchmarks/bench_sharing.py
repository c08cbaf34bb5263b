"""Two training processes on one machine: tokens/s of a run alone and of two side by side, under
torch's default threads, OpenMP's passive wait policy, and one thread each (`train.threads=1`).

    python benchmarks/bench_sharing.py [--tokens 40960]

Each case starts fresh processes that train the tiny preset (compile off, probes off, same data)
and prints every process's training tokens/s; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = """
import json, sys, tempfile
from rankscope.data import load_data
from rankscope.run.train import train
from rankscope.settings.config import PRESETS, apply_overrides
cfg = apply_overrides(PRESETS["tiny"], json.loads(sys.argv[1]))
data = load_data("sotu", cfg.model.vocab_size, progress=False)
with tempfile.TemporaryDirectory() as d:
    s = train(cfg, d, data, progress=False)
print(json.dumps({"tokens_per_s": s["tokens_per_s"]}))
"""


def run_case(n: int, settings: dict, env: dict) -> list[float]:
    """Start n processes at once and return each one's tokens/s."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps(settings)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )
        for _ in range(n)
    ]
    out = [p.communicate()[0] for p in procs]
    return [json.loads(o.strip().splitlines()[-1])["tokens_per_s"] for o in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="40960")
    args = ap.parse_args()
    base = {
        "train.tokens": args.tokens,
        "train.eval_every": args.tokens,
        "train.compile": "off",
        "probe.enabled": "false",
        "train.checkpoint_every": "0",
    }
    cases = [
        ("alone, default threads", 1, {}, {}),
        ("two side by side, default threads", 2, {}, {}),
        ("two side by side, OMP_WAIT_POLICY=PASSIVE", 2, {}, {"OMP_WAIT_POLICY": "PASSIVE"}),
        ("two side by side, train.threads=1", 2, {"train.threads": "1"}, {}),
        ("alone, train.threads=1", 1, {"train.threads": "1"}, {}),
    ]
    print(f"{os.cpu_count()} CPUs; tiny preset, {args.tokens} tokens a run, compile off, probes off")
    for name, n, extra, env in cases:
        t = time.perf_counter()
        rates = run_case(n, {**base, **extra}, env)
        each = ", ".join(f"{r:,.0f}" for r in rates)
        print(f"{name:45s} tokens/s each: {each:20s} total {sum(rates):,.0f}  ({time.perf_counter() - t:.0f} s wall)")


if __name__ == "__main__":
    main()
