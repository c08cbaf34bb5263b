"""Cost of the downstream evaluations (rankscope.measure's icl, induction, functional_rank and
weight_spectra) against a training run.

    python benchmarks/bench_evals.py [--preset tiny] [--rounds 5] [--steps 4] [--set key=value ...]

Measured side by side in one process, interleaved round by round so a noisy shared machine moves
every number together; medians over rounds:

- one training step of the preset (batch sampling, forward, backward, clipping, optimizer steps),
- the trainer's current validation loss (model(x, y) on the fixed validation batches), for scale,
- `loss_and_icl` on the same batches (it replaces the line above: its marginal cost is the difference),
- the rank probe (`gpt_probe` at the preset's sites), for scale,
- induction loss + induction scores from one forward on an 8 x 128 repeated batch (half_len 64),
- `functional_rank` (sites k and q, the full ladder) on the probe batch,
- `weight_spectra`.

Each cost is then expressed as a share of a whole run's wall time (training steps plus the
trainer's evaluations and probes at every evaluation point), if run at every evaluation point, and
for functional rank also if run only at the end, or at the middle and the end.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from _common import train_step_fn

from rankscope.core.model import GPT
from rankscope.core.optim import build_optimizers
from rankscope.data import BatchSampler, fixed_batches, load_data
from rankscope.measure.functional_rank import functional_rank, rank_ladder
from rankscope.measure.icl import loss_and_icl
from rankscope.measure.induction import gpt_induction_scores, induction_batch
from rankscope.measure.probe import gpt_probe
from rankscope.measure.weight_spectra import weight_spectra
from rankscope.run.cadence import eval_steps
from rankscope.settings.config import apply_overrides, preset

BUDGET = 0.10  # the target: all downstream evaluations together at most 10% of a run


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="training steps timed per round")
    ap.add_argument("--induction-batch", type=int, default=8)
    ap.add_argument("--half-len", type=int, default=64)
    ap.add_argument("--qk-norm", default="learned", help="model.qk_norm of the benchmarked arm")
    ap.add_argument("--set", nargs="*", default=[], help="overrides key=value")
    args = ap.parse_args()

    overrides = {"model.qk_norm": args.qk_norm, **dict(s.split("=", 1) for s in args.set)}
    cfg = apply_overrides(preset(args.preset), overrides)
    tc, mc = cfg.train, cfg.model
    data = load_data(None, mc.vocab_size, progress=False)
    model = GPT(mc)
    opt = build_optimizers(model, cfg.optim)
    sampler = BatchSampler(data.train, tc.batch_size, tc.seq_len, seed=0)
    val = fixed_batches(data.val, tc.eval_batches, tc.batch_size, tc.seq_len)
    px, py = fixed_batches(data.val, 1, cfg.probe.batch_size, tc.seq_len)[0]
    probe = gpt_probe(model, cfg.probe.sites, attention=cfg.probe.attention)
    ind_x = induction_batch(mc.vocab_size, args.induction_batch, args.half_len, seed=0)
    ind = gpt_induction_scores(model, args.half_len)
    train_step = train_step_fn(model, opt, sampler, cfg.optim.grad_clip)

    @torch.no_grad()
    def val_loss() -> float:
        return torch.stack([model(x, y) for x, y in val]).mean().item()

    evals: dict[str, Callable[[], object]] = {
        "validation loss (trainer's, for scale)": val_loss,
        "loss_and_icl (replaces it)": lambda: loss_and_icl(model, val),
        "rank probe (for scale)": lambda: probe.measure([px]),
        f"induction loss + scores, {args.induction_batch} x {2 * args.half_len}": lambda: ind.measure_with_loss(ind_x),
        f"functional_rank k+q, ladder {rank_ladder(mc.head_dim)}": lambda: functional_rank(model, px, py),
        "weight_spectra": lambda: weight_spectra(model),
    }
    for _ in range(3):
        train_step()  # warm up (allocator, Muon state)
    model.eval()
    for fn in evals.values():
        fn()
    model.train()

    step_s: list[float] = []
    eval_s: dict[str, list[float]] = {k: [] for k in evals}
    for _ in range(args.rounds):
        model.train()
        step_s.append(timed(lambda: [train_step() for _ in range(args.steps)]) / args.steps)
        model.eval()
        for name, fn in evals.items():
            eval_s[name].append(timed(fn))

    med = statistics.median
    tokens_per_step = tc.batch_size * tc.seq_len
    steps = math.ceil(tc.tokens / tokens_per_step)
    n_evals = len(eval_steps(steps, tokens_per_step, tc.eval_every))
    names = list(evals)
    val_name, icl_name, probe_name, ind_name, fr_name, ws_name = names
    cost = {k: med(v) for k, v in eval_s.items()}
    # a run as the trainer runs it today: steps, plus validation (and the same again for the
    # out-of-distribution set) and the probe at every evaluation point
    run_s = steps * med(step_s) + n_evals * (2 * cost[val_name] + cost[probe_name])

    def share(seconds: float) -> str:
        return f"{seconds / run_s:.2%}"

    icl_marginal = max(0.0, cost[icl_name] - cost[val_name])
    every = icl_marginal + cost[ind_name] + cost[ws_name]  # the cheap ones, at every point

    print(
        f"# rankscope downstream-evaluation benchmark: preset {args.preset} (qk_norm={args.qk_norm}), "
        f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    print(
        f"# batch {tc.batch_size} x {tc.seq_len}, {tc.tokens:,} tokens per run = {steps} steps, "
        f"{n_evals} evaluation points (every {tc.eval_every:,} tokens), "
        f"probe batch {cfg.probe.batch_size} x {tc.seq_len}; "
        f"medians of {args.rounds} rounds; estimated run {run_s:.0f} s"
    )
    print()
    print("| measurement | median ms | x training steps | share of run, at every eval point |")
    print("|---|---|---|---|")
    print(f"| one training step | {med(step_s) * 1e3:.0f} | 1.0 | {share(steps * med(step_s))} (all {steps} steps) |")
    for name in names:
        print(f"| {name} | {cost[name] * 1e3:.0f} | {cost[name] / med(step_s):.2f} | {share(n_evals * cost[name])} |")
    print(
        f"| loss_and_icl, marginal over the validation loss | {icl_marginal * 1e3:.0f} | "
        f"{icl_marginal / med(step_s):.2f} | {share(n_evals * icl_marginal)} |"
    )
    print()
    print("| cadence of the downstream evaluations | share of run | within 10%? |")
    print("|---|---|---|")
    cadences = [
        (
            "ICL + induction + weight spectra at every point, functional rank at the end",
            n_evals * every + cost[fr_name],
        ),
        ("same, functional rank at the middle and the end", n_evals * every + 2 * cost[fr_name]),
        ("everything at every point", n_evals * (every + cost[fr_name])),
    ]
    for label, seconds in cadences:
        print(f"| {label} | {share(seconds)} | {'yes' if seconds / run_s <= BUDGET else 'no'} |")


if __name__ == "__main__":
    sys.exit(main())
