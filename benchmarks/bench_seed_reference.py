"""Usage: python bench_seed_reference.py [--rounds N] [--steps N] [--compile] [--keep-freed-memory] [--mirror PATH]

One training step of the seed's implementation (vukrosic/attention-keys-analysis at 772cf07) timed
side by side with rankscope's, at the shape of rankscope's `tiny` preset, on the CPU, in one process.

The seed's code is not part of this repository. At run time its files are read from a git mirror of
it (`git show 772cf07:<path>`, mirror path `--mirror`) into a temporary directory that is put on
sys.path for the import. Its attention takes RoPE from torchtune, which is not installed here; a
short stand-in with torchtune's interface is registered as `torchtune.modules` before the import.

What one step is, per arm (both draw their batches from the same rankscope BatchSampler):
  seed       its trainer's step (training/trainer.py, `train_model`): logits = model(x), cross-entropy
             on the labels shifted by one (last position ignored; its data loader's labels are a copy
             of the input ids), backward, clip_grad_norm_ at its config's grad_clip, then its own
             optimizers as its `setup_muon_optimizer` builds them (its Muon, Polar Express compiled
             with torch.compile as its code does, on the 2D matrices; AdamW on the rest), each
             followed by zero_grad.
  rankscope  benchmarks/_common.py's `train_step_fn`: loss, backward, gradient norm, its optimizers,
             zero_grad; eager, and with torch.compile(model) as a third arm when --compile is given.

Both arms run in float32. The seed's trainer casts its model to bfloat16 and runs the forward under
CUDA autocast; here it stays float32 like rankscope's CPU runs and the matmul rate below (its
autocast is CUDA's, which would do nothing on the CPU, so use_amp is off). Its Polar Express still
runs in bfloat16, as its code does.

Timing: 2 warm-up steps per arm (compilation included, done in this process: no background compile
workers), then rounds; each round measures the float32 2048 x 2048 matmul rate
(rankscope.run.bench.matmul_rate) and then runs every arm for --steps steps, in an order rotated each
round, so a noisy shared machine moves all arms together. Each step is timed
with time.perf_counter. Reported per arm: the median step time over all timed steps, tokens per
second from it, and MFU, the median over rounds of model FLOP/s (rankscope's GPT.flops_per_token at
this shape, the same for both) over that round's matmul rate.

--keep-freed-memory sets rankscope's allocator setting (`train.keep_freed_memory`, glibc's trim
and mmap thresholds raised) for the whole process, so for every arm: run once with it and once
without to see rankscope's CPU default before and after it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import io
import itertools
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from _common import train_step_fn
from torch import nn

from rankscope.core.model import GPT
from rankscope.core.optim import build_optimizers
from rankscope.data import BatchSampler, load_data
from rankscope.run.bench import matmul_rate
from rankscope.settings.config import RunConfig, preset
from rankscope.storage.provenance import describe_cpu

SEED = "the seed's implementation (vukrosic/attention-keys-analysis at 772cf07)"
SEED_COMMIT = "772cf07"
DEFAULT_MIRROR = "/work/.mirror/vukrosic+attention-keys-analysis/repo"
# The seed's files its model, optimizer and trainer import (training/__init__ pulls in evaluation,
# configs/__init__ the dataset config, trainer utils.helpers).
SEED_FILES = (
    "configs/__init__.py",
    "configs/llm_config.py",
    "configs/dataset_config.py",
    "models/__init__.py",
    "models/components.py",
    "models/layers.py",
    "models/llm.py",
    "optimizers/__init__.py",
    "optimizers/muon.py",
    "training/__init__.py",
    "training/evaluation.py",
    "training/trainer.py",
    "utils/__init__.py",
    "utils/helpers.py",
)
WARMUP = 2  # untimed steps per arm before the rounds


class RotaryPositionalEmbeddings(nn.Module):
    """Stand-in for torchtune.modules.RotaryPositionalEmbeddings, with torchtune's interface:
    `RotaryPositionalEmbeddings(dim, max_seq_len=4096, base=10000)` and `forward(x, *, input_pos=None)`
    on x of shape (batch, seq, heads, head_dim), rotating interleaved pairs (x[2i], x[2i+1]) in
    float32 and returning x's dtype. Functionally RoPE (a timing reference), not bitwise torchtune."""

    def __init__(self, dim: int, max_seq_len: int = 4096, base: int = 10000):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (S, dim/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, *, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        pos = slice(0, x.size(1)) if input_pos is None else input_pos
        cos, sin = self.cos[pos].unsqueeze(-2), self.sin[pos].unsqueeze(-2)  # broadcast over heads
        x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2).type_as(x)


def install_torchtune_stand_in() -> None:
    package, modules = types.ModuleType("torchtune"), types.ModuleType("torchtune.modules")
    modules.RotaryPositionalEmbeddings = RotaryPositionalEmbeddings
    package.modules = modules
    sys.modules["torchtune"], sys.modules["torchtune.modules"] = package, modules


def import_seed(mirror: Path, where: Path) -> types.SimpleNamespace:
    """Write the seed's files from the mirror into `where` and import its config, model, Muon and
    optimizer set-up from there."""
    for path in SEED_FILES:
        shown = subprocess.run(
            ["git", "-C", str(mirror), "show", f"{SEED_COMMIT}:{path}"], capture_output=True, text=True
        )
        if shown.returncode != 0:
            sys.exit(f"cannot read {path} at {SEED_COMMIT} from {mirror}: {shown.stderr.strip()}")
        (where / path).parent.mkdir(parents=True, exist_ok=True)
        (where / path).write_text(shown.stdout)
    install_torchtune_stand_in()
    sys.path.insert(0, str(where))
    try:
        config, llm, muon, trainer = (
            importlib.import_module(m)
            for m in ("configs.llm_config", "models.llm", "optimizers.muon", "training.trainer")
        )
    finally:
        sys.path.remove(str(where))
    for module in (config, llm, muon, trainer):  # not some installed package of the same name
        if not Path(module.__file__).resolve().is_relative_to(where.resolve()):
            sys.exit(f"{module.__name__} was imported from {module.__file__}, not from the seed's files")
    return types.SimpleNamespace(
        LLMConfig=config.LLMConfig,
        MinimalLLM=llm.MinimalLLM,
        setup_muon_optimizer=trainer.setup_muon_optimizer,
        muon=muon,
    )


def seed_knobs(cfg: RunConfig) -> dict:
    """The seed's LLMConfig fields, set to rankscope's preset as far as its code allows."""
    m, o, t = cfg.model, cfg.optim, cfg.train
    if m.n_head * m.head_dim != m.d_model:
        sys.exit(
            f"the seed's heads are d_model / n_heads wide; this preset has {m.n_head} x {m.head_dim} != {m.d_model}"
        )
    if m.rope_base != 10000 or m.qk_norm not in ("learned", "none"):
        sys.exit("the seed has RoPE base 10000 and learned QK-Norm gains or none; this preset differs")
    return dict(
        vocab_size=m.vocab_size,
        n_layers=m.n_layer,
        d_model=m.d_model,
        n_heads=m.n_head,
        n_kv_heads=m.n_kv_head,
        d_ff=m.d_mlp,
        max_seq_len=m.max_seq_len,  # its RoPE table's length, as rankscope's
        batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        use_qk_norm=m.qk_norm == "learned",
        use_muon=o.name == "muon",
        dropout=0.0,  # rankscope's model has no dropout
        compile_model=False,  # the model runs eager; its Muon's own torch.compile stays
        use_amp=False,  # its autocast is CUDA's: nothing on the CPU
        muon_lr=o.muon_lr,
        muon_momentum=o.muon_momentum,
        adamw_lr=o.adamw_lr,
        weight_decay=o.adamw_weight_decay,
        # its trainer always clips, and clipping at 0 would zero every gradient: where rankscope only
        # measures the norm (grad_clip 0), the seed keeps its own threshold
        **({"grad_clip": o.grad_clip} if o.grad_clip > 0 else {}),
    )


def seed_step_fn(seed: types.SimpleNamespace, knobs: dict, sampler: BatchSampler) -> tuple[Callable[[], None], int]:
    """One step of the seed's trainer (see the module docstring) and its model's parameter count."""
    scfg = seed.LLMConfig(**knobs)
    torch.manual_seed(0)
    model = seed.MinimalLLM(scfg).train()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its Muon / AdamW parameter counts
        optimizers = seed.setup_muon_optimizer(model, scfg)
    steps = itertools.count()

    def step() -> None:
        x, _ = sampler.batch(next(steps))
        labels = torch.full_like(x, -100)  # predict token t+1 at t; nothing at the last position
        labels[:, :-1] = x[:, 1:]
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, scfg.vocab_size), labels.view(-1), ignore_index=-100)
        (loss / scfg.gradient_accumulation_steps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), scfg.grad_clip)
        for opt in optimizers:
            opt.step()
            opt.zero_grad()

    return step, sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[1].split()))
    ap.add_argument("--rounds", type=int, default=5, metavar="N", help="rounds of interleaved timing")
    ap.add_argument("--steps", type=int, default=4, metavar="N", help="steps timed per arm per round")
    ap.add_argument("--compile", action="store_true", help="also time rankscope with torch.compile(model)")
    ap.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="raise glibc's trim and mmap thresholds for the whole process (rankscope's CPU default)",
    )
    ap.add_argument(
        "--mirror", type=Path, default=Path(DEFAULT_MIRROR), metavar="PATH", help="git mirror of the seed's repository"
    )
    args = ap.parse_args()
    if args.keep_freed_memory:
        from rankscope.run.train import keep_freed_memory

        keep_freed_memory()

    # torch.compile (the seed's Muon; rankscope with --compile) would otherwise start a pool of
    # compile workers in the background that takes the CPU from the timed steps for seconds
    inductor_config.compile_threads = 1
    cfg = preset("tiny")
    m, tc = cfg.model, cfg.train
    data = load_data(None, m.vocab_size, progress=False)
    notes = []

    def sampler() -> BatchSampler:
        return BatchSampler(data.train, tc.batch_size, tc.seq_len, seed=0)

    with tempfile.TemporaryDirectory() as tmp:
        seed = import_seed(args.mirror, Path(tmp))
        knobs = seed_knobs(cfg)
        defaults = {f.name: f.default for f in dataclasses.fields(seed.LLMConfig)}
        seed_step, seed_params = seed_step_fn(seed, knobs, sampler())

        def rankscope_step(compiled: bool) -> Callable[[], None]:
            model = GPT(m)
            model.reset_parameters(0)
            opt = build_optimizers(model, cfg.optim)
            return train_step_fn(torch.compile(model) if compiled else model, opt, sampler(), cfg.optim.grad_clip)

        arms = {"seed (772cf07), eager": seed_step, "rankscope, eager": rankscope_step(False)}
        if args.compile:
            arms["rankscope, torch.compile"] = rankscope_step(True)
        flops_model = GPT(m)
        flops = flops_model.flops_per_token(tc.seq_len) * tc.batch_size * tc.seq_len  # per step

        try:
            for _ in range(WARMUP):
                seed_step()
        except Exception as e:  # its torch.compile needs inductor's C++ toolchain on a CPU
            seed.muon.zeropower_polar_express = seed.muon.zeropower_polar_express.__wrapped__
            notes.append(f"its Muon's torch.compile failed on this CPU ({type(e).__name__}); Polar Express ran eager")
            for _ in range(WARMUP):
                seed_step()
        for step in list(arms.values())[1:]:
            for _ in range(WARMUP):
                step()

        names = list(arms)
        times: dict[str, list[float]] = {n: [] for n in names}
        mfu: dict[str, list[float]] = {n: [] for n in names}
        rates = []
        for r in range(args.rounds):
            rate = matmul_rate(torch.device("cpu"))
            rates.append(rate)
            for name in names[r % len(names) :] + names[: r % len(names)]:
                round_times = []
                for _ in range(args.steps):
                    t = time.perf_counter()
                    arms[name]()
                    round_times.append(time.perf_counter() - t)
                times[name] += round_times
                mfu[name].append(flops / statistics.median(round_times) / rate)

    med = statistics.median
    set_knobs = ", ".join(f"{k} {defaults[k]!r} -> {v!r}" for k, v in knobs.items() if defaults.get(k) != v)
    kept = ", ".join(f"{k} {defaults[k]!r}" for k in ("grad_clip",) if k not in knobs)
    print(f"# {SEED} vs rankscope: one training step on the CPU, {datetime.date.today()}, torch {torch.__version__}")
    print(f"# CPU: {describe_cpu()}")
    print(f"# command: python {shlex.join(sys.argv)}")
    print(
        f"# shape: rankscope preset tiny: vocab {m.vocab_size}, {m.n_layer} layers, d_model {m.d_model}, "
        f"{m.n_head} heads x {m.head_dim} ({m.n_kv_head} kv heads), d_mlp {m.d_mlp}, batch {tc.batch_size} x "
        f"{tc.seq_len}; parameters: seed {seed_params:,}, rankscope {flops_model.num_params():,}"
    )
    same = ", ".join(f"{k} {v!r}" for k, v in knobs.items() if defaults.get(k) == v)
    print(f"# seed config (its LLMConfig) set: {set_knobs}; set, equal to its defaults: {same}")
    if kept:
        print(
            f"# seed config kept its own: {kept} (its trainer always clips; rankscope's preset only measures the norm)"
        )
    print(
        "# the seed runs in float32 here (its trainer casts to bfloat16, CUDA autocast); its Polar Express in bfloat16"
        + "".join(f"; {n}" for n in notes)
    )
    print(
        f"# medians of {args.rounds} rounds x {args.steps} steps after {WARMUP} warm-up steps per arm; "
        f"float32 2048 x 2048 matmul {med(rates) / 1e9:.1f} GFLOP/s; "
        f"model {flops / 1e9:.1f} GFLOP per step (rankscope's flops_per_token)"
    )
    print("| implementation | median step ms | tokens/s | MFU vs matmul | ratio to seed |")
    print("|---|---|---|---|---|")
    seed_s = med(times[names[0]])
    for name in names:
        s = med(times[name])
        print(
            f"| {name} | {s * 1e3:.0f} | {tc.batch_size * tc.seq_len / s:,.0f} | {med(mfu[name]):.1%} "
            f"| {seed_s / s:.2f} |"
        )
    print("# ratio to seed: the seed's median step time over this one's (above 1: faster than the seed)")


if __name__ == "__main__":
    sys.exit(main())
