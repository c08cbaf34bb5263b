"""`rankscope bench`: throughput, model FLOPs utilisation, peak memory and probe cost of the real
training loop on this machine.

It runs `train()` itself (compile, autocast, data loading, evaluation and probes as in a study)
for a short budget with four evaluation points, and measures the steady state between the second
and the last: tokens per second of training alone (evaluation and probe time taken out), model
FLOPs per second (6 x matmul parameters + attention, see `GPT.flops_per_token`) against the
device's bf16 peak where known and against a matmul rate measured here before and after, and
what the probe would cost over a whole run at the preset's own cadence.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..settings.config import PRESETS

if TYPE_CHECKING:
    import torch

# Dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s, no sparsity: the sheets' starred
# figures are with 2:4 sparsity, twice these). Hopper parts come in variants whose clocks and power
# differ, so one name does not fix the peak; see `HOPPER_PEAK`.
BF16_PEAK = {
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "B200": 2250e12,
    "GH200": 989e12,
}

# NVIDIA H100 Tensor Core GPU data sheet (BF16 Tensor Core 1,979 / 1,513 / 1,671 TFLOPS with sparsity
# for SXM / PCIe / NVL) and H200 data sheet (1,979 SXM, 1,671 NVL); the H800 is the H100's export
# variant with the same tensor cores. The CUDA device name says the variant: "NVIDIA H100 PCIe",
# "NVIDIA H100 NVL", "NVIDIA H200 NVL"; the SXM parts carry no form factor ("NVIDIA H100 80GB HBM3",
# "NVIDIA H200"), so SXM is what a Hopper name without PCIe or NVL is.
HOPPER_PEAK = {
    ("H100", "SXM"): 989e12,
    ("H100", "PCIe"): 756e12,
    ("H100", "NVL"): 835e12,
    ("H800", "SXM"): 989e12,
    ("H800", "PCIe"): 756e12,
    ("H200", "SXM"): 989e12,
    ("H200", "NVL"): 835e12,
}


def hopper_variant(name: str) -> str:
    """The form factor a Hopper CUDA device name says: 'PCIe', 'NVL', else 'SXM'."""
    words = name.upper().split()
    return "PCIe" if "PCIE" in words else "NVL" if "NVL" in words else "SXM"


def bf16_peak(name: str) -> float | None:
    """The dense bf16 peak (FLOP/s) of a CUDA device named `name`, or None when unknown. A MIG slice
    has a fraction of the SMs, so the whole card's peak would understate its MFU: unknown."""
    if "MIG" in name.split():
        return None
    if "GH200" not in name:
        for chip in ("H100", "H200", "H800"):
            if chip in name:
                return HOPPER_PEAK.get((chip, hopper_variant(name)))
    for key in sorted(BF16_PEAK, key=len, reverse=True):
        if key in name:
            return BF16_PEAK[key]
    return None


def device_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    import torch

    return bf16_peak(torch.cuda.get_device_name(device))


def matmul_rate(device: torch.device, reps: int = 10, scale: int = 1) -> float:
    """Measured FLOP/s of a large square matmul: bf16 on CUDA, float32 on CPU; `scale` > 1 divides
    its side for a reading in milliseconds (a little low on a CPU)."""
    import torch

    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    n //= scale
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(reps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def step_parts(cfg, device: torch.device, steps: int = 6, warmup: int = 2, compiled: bool = False) -> dict[str, float]:
    """Median seconds of the three parts of one training step at `cfg`'s shapes, timed apart with
    the device synchronised after each: forward (the loss, under the run's autocast), backward,
    and optimizer (the gradient norm, the optimizer step and zero_grad, QK-Clip where set), as
    `train()` takes them, on a random batch, after `warmup` untimed steps (compilation, first-call
    allocation). The model, optimizers, compilation and autocast are the run's own
    (`build.build_learner`) in one process; `compiled`: the step runs under torch.compile, as
    `train()` runs it when `train.compiles` says so."""
    import torch

    from ..core.model import qk_clip
    from ..core.optim import optimizer_step
    from .build import build_learner
    from .dist import World

    learner = build_learner(cfg, device, World(), compiled)
    model, opt = learner.model, learner.opt
    model.train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, cfg.model.vocab_size, (2, cfg.train.batch_size, cfg.train.seq_len), generator=g).to(device)

    def sync() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    parts: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}
    for i in range(warmup + steps):
        t0 = sync()
        with learner.autocast():
            loss = learner.loss(x, y)
        t1 = sync()
        loss.backward()
        t2 = sync()
        optimizer_step(model, opt, cfg.optim.grad_clip)
        if cfg.optim.qk_clip_tau > 0:
            qk_clip(model, cfg.optim.qk_clip_tau)
        t3 = sync()
        if i >= warmup:
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
                parts[k].append(v)
    return {k: statistics.median(v) for k, v in parts.items()}


def run_bench(preset: str, tokens: int | None, overrides: dict[str, str], progress: bool) -> dict:
    import torch

    from ..data import load_data
    from ..settings.config import apply_overrides
    from ..settings.config import preset as get_preset
    from ..storage.provenance import cpu_info
    from ..storage.store import CONFIG, load_scalars, read_json
    from .build import compiles, resolve_device
    from .cadence import run_cadence
    from .train import train

    cfg = apply_overrides(get_preset(preset), overrides)
    device = resolve_device(cfg.train.device)
    compiled = compiles(cfg.train, device)  # as the preset's full run decides, not the short budget timed here
    tps = cfg.train.batch_size * cfg.train.seq_len
    budget = tokens or 40 * tps
    steps = max(4, -(-budget // tps))
    bench_cfg = apply_overrides(
        cfg,
        {
            "train.tokens": steps * tps,
            "train.eval_every": steps * tps // 4,
            "train.eval_schedule": "linear",
            "train.checkpoint_every": 0,
            "train.compile": "on" if compiled else "off",
        },
    )
    data = load_data(cfg.data.path or None, cfg.model.vocab_size, progress=progress)
    rates = [matmul_rate(device)]
    with tempfile.TemporaryDirectory() as tmp:
        summary = train(bench_cfg, Path(tmp) / "run", data, arm="bench", progress=progress)
        rows = load_scalars(tmp).sort_values("tokens")
        config = read_json(Path(tmp) / "run" / CONFIG)
    rates.append(matmul_rate(device))
    parts = step_parts(cfg, device, compiled=compiled)  # train() above set this process's allocator
    rates.append(matmul_rate(device))
    first, last = rows.iloc[1], rows.iloc[-1]  # skip the first interval: compilation and warm-up
    train_s = (last.elapsed_s - last.eval_s) - (first.elapsed_s - first.eval_s)
    tok_s = (last.tokens - first.tokens) / train_s
    flops = config["flops_per_token"] * tok_s
    n_evals = len(rows)
    probe_each = summary["probe_s"] / n_evals
    # each evaluation's own time; the last also runs what a run does only at its end (functional
    # rank, KV headroom), so the others give one evaluation and the last the end's extra
    each = rows["eval_s"].diff().fillna(rows["eval_s"]).to_numpy()
    eval_each = float(statistics.median(each[:-1])) if n_evals > 1 else float(each[0])
    end_extra = max(0.0, float(each[-1]) - eval_each)
    full_evals = len(run_cadence(cfg).evals)  # the preset's own schedule over its whole budget
    full_eval_s = full_evals * eval_each + end_extra
    full_s = cfg.train.tokens / tok_s + full_eval_s
    rate = statistics.mean(rates)
    peak = device_peak(device)
    return {
        "preset": preset,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_info()["name"],
        "cpu": cpu_info(),
        "step_parts_s": parts,
        "eval_ms": eval_each * 1e3,
        "params": config["n_params"],
        "tokens_per_s": tok_s,
        "model_tflops": flops / 1e12,
        "mfu_peak": flops / peak if peak else None,
        "peak_tflops": peak / 1e12 if peak else None,
        "mfu_matmul": flops / rate,
        "matmul_tflops": rate / 1e12,
        "peak_memory_gib": summary["peak_memory_bytes"] / 2**30,
        "probe_ms": probe_each * 1e3,
        "probe_share": full_evals * probe_each / full_s,
        "eval_share": full_eval_s / full_s,
        "end_eval_ms": end_extra * 1e3,
        "full_evals": full_evals,
        "full_run_min": full_s / 60,
        "compile": cfg.train.compile,
        "compiled": compiled,
        "bench_tokens": int(last.tokens),
    }


def format_result(r: dict) -> str:
    def pct(v):
        return "n/a" if v is None else f"{v:.1%}"

    from ..storage.provenance import describe_cpu

    parts = r["step_parts_s"]
    step = sum(parts.values())
    lines = [
        f"rankscope bench: preset {r['preset']} on {r['device_name']} ({r['device']}), "
        f"{r['params'] / 1e6:.1f}M parameters",
        f"  CPU                                 {describe_cpu(r['cpu'])}",
        f"  torch.compile                       {'on' if r['compiled'] else 'off'} (train.compile={r['compile']})",
        f"  tokens/s (training, steady state)   {r['tokens_per_s']:,.0f}",
        f"  model TFLOP/s                       {r['model_tflops']:.2f}",
        f"  MFU vs bf16 peak                    {pct(r['mfu_peak'])}"
        + (f" (peak {r['peak_tflops']:.0f} TFLOP/s)" if r["peak_tflops"] else " (peak unknown for this device)"),
        f"  MFU vs measured matmul              {pct(r['mfu_matmul'])} (measured {r['matmul_tflops']:.3f} TFLOP/s)",
        f"  one step, timed apart               {step * 1e3:.0f} ms: "
        + ", ".join(f"{k} {v * 1e3:.0f} ms ({v / step:.0%})" for k, v in parts.items()),
        f"  one evaluation                      {r['eval_ms']:.0f} ms (probe {r['probe_ms']:.0f} ms of it); "
        f"the run's end adds {r['end_eval_ms']:.0f} ms (functional rank, KV headroom)",
        f"  peak memory                         {r['peak_memory_gib']:.2f} GiB",
        f"  share of a full run                 evaluation {pct(r['eval_share'])} ({r['full_evals']} evaluations; "
        f"probe {pct(r['probe_share'])})",
        f"  full run at this speed              {r['full_run_min']:.1f} min",
    ]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        default="tiny",
        metavar="P",
        help=f"model and training preset to time: {', '.join(PRESETS)} (default: tiny)",
    )
    p.add_argument("--tokens", metavar="N", help="training tokens to time, e.g. 200K (default: 40 steps)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting of the preset, e.g. --set train.compile=off (repeatable; see rankscope list)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    from ..settings.config import parse_set, setting_value

    # the budget to time follows train.tokens' rule (a count from 1 up), so 0, -5 and abc are refused
    tokens = setting_value("--tokens", "train.tokens", args.tokens) if args.tokens is not None else None
    print(format_result(run_bench(args.preset, tokens, parse_set(args.overrides), not args.no_progress)))
    return 0
