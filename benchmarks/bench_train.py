"""Training throughput, model FLOPs utilisation and probe cost on this machine.

    python benchmarks/bench_train.py [--preset tiny] [--rounds 5] [--steps 8]

Measured side by side in one process, interleaved round by round, so a noisy shared machine moves
both numbers together: (1) the float32 matmul rate on 2048 x 2048 matrices, (2) the time of a
full training step of the preset (batch sampling, forward, backward, clipping, optimizer steps),
(3) one probe measurement and one evaluation on the fixed batches. Medians over rounds; MFU is
the median over rounds of (model FLOPs per second / matmul rate) measured in the same round.
The probe's share is what it would cost at the preset's default cadence over a whole run.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import sys
import time

import torch
from _common import train_step_fn

from rankscope.core.model import GPT
from rankscope.core.optim import build_optimizers
from rankscope.data import BatchSampler, fixed_batches, load_data
from rankscope.measure.probe import gpt_probe
from rankscope.run.bench import matmul_rate
from rankscope.run.cadence import eval_steps
from rankscope.settings.config import apply_overrides, preset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8, help="training steps timed per round")
    ap.add_argument("--set", nargs="*", default=[], help="overrides key=value")
    args = ap.parse_args()

    cfg = apply_overrides(preset(args.preset), dict(s.split("=", 1) for s in args.set))
    tc = cfg.train
    data = load_data(None, cfg.model.vocab_size, progress=False)
    results = {}
    for qk in ("learned", "none"):
        model = GPT(apply_overrides(cfg, {"model.qk_norm": qk}).model)
        opt = build_optimizers(model, cfg.optim)
        sampler = BatchSampler(data.train, tc.batch_size, tc.seq_len, seed=0)
        val = fixed_batches(data.val, tc.eval_batches, tc.batch_size, tc.seq_len)
        probe_x = fixed_batches(data.val, 1, cfg.probe.batch_size, tc.seq_len)[0][0]
        probe = gpt_probe(model, cfg.probe.sites)
        train_step = train_step_fn(model, opt, sampler, cfg.optim.grad_clip)

        for _ in range(3):
            train_step()  # warm up
        step_s, mfu, rate, probe_s, eval_s = [], [], [], [], []
        flops = model.flops_per_token(tc.seq_len) * tc.batch_size * tc.seq_len
        for _ in range(args.rounds):
            r = matmul_rate(torch.device("cpu"))
            t = time.perf_counter()
            for _ in range(args.steps):
                train_step()
            s = (time.perf_counter() - t) / args.steps
            step_s.append(s)
            rate.append(r)
            mfu.append(flops / s / r)
            t = time.perf_counter()
            model.eval()
            with torch.no_grad():
                probe.measure([probe_x])
            probe_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            with torch.no_grad():
                for x, y in val:
                    model(x, y)
            eval_s.append(time.perf_counter() - t)
            model.train()
        tokens_per_step = tc.batch_size * tc.seq_len
        steps = math.ceil(tc.tokens / tokens_per_step)
        n_evals = len(eval_steps(steps, tokens_per_step, tc.eval_every, tc.eval_schedule, tc.eval_points))
        med = statistics.median
        run_s = steps * med(step_s) + n_evals * (med(probe_s) + 2 * med(eval_s))  # val + ood
        results[qk] = dict(
            tok_s=tokens_per_step / med(step_s),
            mfu=med(mfu),
            rate=med(rate) / 1e9,
            model_gflops=flops / med(step_s) / 1e9,
            probe_ms=med(probe_s) * 1e3,
            probe_share=n_evals * med(probe_s) / run_s,
            eval_share=n_evals * 2 * med(eval_s) / run_s,
            run_s=run_s,
            params=model.num_params(),
        )

    print(
        f"# rankscope training benchmark: preset {args.preset}, {datetime.date.today()}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(
        f"# batch {tc.batch_size} x {tc.seq_len}, {tc.tokens:,} tokens per run, "
        f"eval+probe every {tc.eval_every:,} tokens; "
        f"medians of {args.rounds} rounds x {args.steps} steps"
    )
    print(
        "| arm (Muon) | params | tokens/s | model GFLOP/s | fp32 matmul GFLOP/s | MFU vs matmul | probe ms "
        "| probe share | eval share | est. run s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for qk, r in results.items():
        print(
            f"| qk_norm={qk} | {r['params'] / 1e6:.2f}M | {r['tok_s']:.0f} | {r['model_gflops']:.1f} "
            f"| {r['rate']:.1f} | {r['mfu']:.0%} | {r['probe_ms']:.0f} | {r['probe_share']:.2%} "
            f"| {r['eval_share']:.1%} | {r['run_s']:.0f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
