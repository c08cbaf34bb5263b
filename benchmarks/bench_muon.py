"""Muon's cost by grouping and iteration, side by side in one process.

    python benchmarks/bench_muon.py [--preset tiny] [--rounds 7] [--steps 4] [--optimizer-only]

For every `optim.muon_qkvo` (stacked, separate, per_head) x `optim.muon_ns` (polar_express,
newton_schulz): (1) one optimizer step alone on fixed random gradients, (2) a full training step
of the preset (forward, backward, gradient norm, optimizer step). Rounds are interleaved (every
combination once per round, in a rotated order), so a noisy shared machine moves all of them
together; medians over rounds, and each one's ratio to separate + newton_schulz, which is
torch.optim.Muon itself. `--optimizer-only` skips (2), e.g. for the seed-88m preset on a CPU.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch
from _common import cpu_name, train_step_fn

from rankscope.core.model import GPT
from rankscope.core.optim import build_optimizers
from rankscope.data import BatchSampler, load_data
from rankscope.settings.config import apply_overrides, preset

COMBOS = [(g, ns) for g in ("stacked", "separate", "per_head") for ns in ("polar_express", "newton_schulz")]
BASE = ("separate", "newton_schulz")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=4, help="steps timed per combination per round")
    ap.add_argument("--optimizer-only", action="store_true")
    args = ap.parse_args()

    cfg = preset(args.preset)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda" and not args.optimizer_only:
        ap.error("on CUDA, time only the optimizer (--optimizer-only); `rankscope bench` times training there")
    torch.manual_seed(0)
    model = GPT(cfg.model).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    opts = {
        c: build_optimizers(model, apply_overrides(cfg, {"optim.muon_qkvo": c[0], "optim.muon_ns": c[1]}).optim)
        for c in COMBOS
    }
    data = None if args.optimizer_only else load_data(None, cfg.model.vocab_size, progress=False)
    steps = {}
    if data is not None:
        sampler = BatchSampler(data.train, cfg.train.batch_size, cfg.train.seq_len, seed=0)
        steps = {c: train_step_fn(model, opts[c], sampler, cfg.optim.grad_clip) for c in COMBOS}

    def opt_step(c) -> None:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opts[c].step()

    for c in COMBOS:  # warm up every path once
        opt_step(c)
        if steps:
            steps[c]()
    times: dict[str, dict] = {"opt": {c: [] for c in COMBOS}, "step": {c: [] for c in COMBOS}}
    for r in range(args.rounds):
        order = COMBOS[r % len(COMBOS) :] + COMBOS[: r % len(COMBOS)]
        for c in order:
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                opt_step(c)
            sync()
            times["opt"][c].append((time.perf_counter() - t0) / args.steps)
            if steps:
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    steps[c]()
                times["step"][c].append((time.perf_counter() - t0) / args.steps)

    med = {k: {c: statistics.median(v) for c, v in d.items() if v} for k, d in times.items()}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(
        f"{datetime.date.today()} {where}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}; preset {args.preset}; {args.rounds} rounds x {args.steps} steps, "
        "medians"
    )
    head = "| grouping | iteration | optimizer step ms | vs torch.optim.Muon |"
    if steps:
        head += " full training step ms | vs torch.optim.Muon |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for c in COMBOS:
        row = f"| {c[0]} | {c[1]} | {1e3 * med['opt'][c]:.1f} | {med['opt'][c] / med['opt'][BASE]:.2f}x |"
        if steps:
            row += f" {1e3 * med['step'][c]:.0f} | {med['step'][c] / med['step'][BASE]:.2f}x |"
        print(row)


if __name__ == "__main__":
    main()
