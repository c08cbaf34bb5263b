"""What checking every row of a run's table costs `rankscope report`: `store.read_table` (which
names the file and line of a damaged row) against a bare `pandas.read_csv` of the same file.

    python benchmarks/bench_read_table.py [--rows 500000] [--rounds 5]

Medians of `--rounds` alternating reads of one synthetic probes.csv in the store's format.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from rankscope.storage.store import PROBE_COLUMNS, read_table


def write_table(path: Path, rows: int) -> None:
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {
            "arm": "qk-norm",
            "seed": 0,
            "step": np.arange(rows) // 1000,
            "tokens": np.arange(rows) // 1000 * 4096,
            "layer": rng.integers(0, 12, rows),
            "head": rng.integers(-1, 12, rows),
            "site": "k",
            "metric": "pr_sv",
            "value": rng.random(rows) * 64,
        },
        columns=PROBE_COLUMNS,
    )
    df.to_csv(path, index=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    from _common import cpu_name

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probes.csv"
        write_table(path, args.rows)
        times: dict[str, list[float]] = {"read_table": [], "pandas": []}
        for _ in range(args.rounds):
            for name, fn in (("read_table", lambda: read_table(path)), ("pandas", lambda: pd.read_csv(path))):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"# {cpu_name()}, {datetime.date.today()}, {args.rows:,} rows, medians of {args.rounds}")
    print("| reader | median s | ratio |")
    print("|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} | {v / med['pandas']:.2f}x |")


if __name__ == "__main__":
    main()
