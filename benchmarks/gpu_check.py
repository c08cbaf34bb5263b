"""The GPU checks as one verdict, for the first machine with one CUDA GPU (under 8 minutes on an H100).

    bash benchmarks/gpu_check.sh                 # OUT=gpu-out by default
    python benchmarks/gpu_check.py --dry-run     # every check's code path on the CPU at tiny sizes

Each check runs in a child process of its own, so a crash, an out-of-memory error or a hang in one
cannot take the others with it and each starts with fresh peak-memory counters. Each has a time
cap, all share one overall deadline, and each prints exactly one line, `PASS name: figure` or
`FAIL name: reason`; its details go to OUT/name.txt. The last line is `N PASS, M FAIL`, and the
exit code is 1 if any check failed. Only small text files are written under OUT.

GPU_CHECK_FAIL=name[:how][,...] injects a failure into check `name`: an exception (how = raise, the
default), the child exiting without a verdict (exit) or hanging past its time (hang), to see that
the others still run and the exit code says so.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent

# The checks' sizes at --dry-run: the tiny preset cut to one small layer (the tests' size), so a
# whole dry run takes about a minute on two CPU cores.
SMALL = {
    "model.n_layer": "1",
    "model.d_model": "64",
    "model.n_head": "1",
    "model.n_kv_head": "1",
    "model.d_mlp": "128",
    "train.batch_size": "4",
    "train.seq_len": "32",
    "probe.batch_size": "2",
    "probe.induction_batch": "2",
}


@dataclasses.dataclass
class Ctx:
    dry: bool  # the CPU at tiny sizes: the code paths, not the figures
    out: Path

    @property
    def device(self):
        import torch

        return torch.device("cpu" if self.dry else "cuda")

    @property
    def backend(self) -> str:
        # inductor is what train() compiles with; on the CPU it needs a C++ toolchain and about a
        # minute a graph, so the dry run traces the same graphs (forward and backward) without codegen
        return "aot_eager" if self.dry else "inductor"

    def autocast(self):
        """train()'s precision: bf16 autocast on CUDA, float32 on the CPU (whose fused output layer
        writes float32 gradients and does not run under autocast)."""
        from rankscope.core.model import mixed_precision

        return contextlib.nullcontext() if self.dry else mixed_precision("cuda")

    def judged(self, ok: bool, figure: str) -> tuple[bool, str]:
        """A verdict whose threshold is about a GPU's figures: at the dry run's tiny CPU sizes it
        cannot be judged, so the code path passes and the line says so."""
        return (True, figure + " (dry run: threshold not judged)") if self.dry else (ok, figure)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def peak_memory(device, into: dict):
    """Peak bytes allocated on `device` inside the block, above what was allocated when it began
    (what an earlier measurement left alive is not counted). On the CPU: the process's peak RSS,
    which never goes down, so a code path there, not a figure."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    yield
    if device.type == "cuda":
        into["peak"] = torch.cuda.max_memory_allocated(device) - base
    else:
        from rankscope.run.train import peak_memory_bytes

        into["peak"] = peak_memory_bytes(device)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


# --- (a) one bf16 training step, eager against compiled -----------------------------------------

# bf16 keeps 8 significant bits (a relative rounding of 2^-9 per operation); the loss is a mean over
# 8,192 tokens, which averages rounding out, so eager and compiled (which fuses operations and keeps
# some intermediates in float32) agree to about 1e-3: 0.5% means the compiled graph computes
# something else. The gradient norm carries rounding through 22 layers of backward: 2%.
LOSS_RTOL, GRAD_NORM_RTOL = 0.005, 0.02


def check_compile_step(ctx: Ctx) -> tuple[bool, str]:
    import torch

    from rankscope.core.model import GPT
    from rankscope.settings.config import apply_overrides, preset

    cfg = apply_overrides(preset("tiny"), SMALL) if ctx.dry else preset("seed-88m")
    device = ctx.device
    model = GPT(cfg.model).to(device).train()
    compiled = torch.compile(model, backend=ctx.backend)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, cfg.model.vocab_size, (2, cfg.train.batch_size, cfg.train.seq_len), generator=g).to(device)

    def step(m) -> tuple[float, float, float]:
        """Loss, global gradient norm and seconds of one forward and backward on the same weights."""
        model.zero_grad(set_to_none=True)
        sync(device)
        t = time.perf_counter()
        with ctx.autocast():
            loss = m(x, y)
        loss.backward()
        sync(device)
        s = time.perf_counter() - t
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        return loss.item(), norm.item(), s

    eager = step(model)
    t = time.perf_counter()
    comp = step(compiled)
    compile_s = time.perf_counter() - t
    times = {"eager": [step(model)[2] for _ in range(3)], "compiled": [step(compiled)[2] for _ in range(3)]}
    d_loss = abs(comp[0] - eager[0]) / abs(eager[0])
    d_norm = abs(comp[1] - eager[1]) / abs(eager[1])
    speed = min(times["eager"]) / min(times["compiled"])
    print(f"eager    loss {eager[0]:.6f}  grad norm {eager[1]:.6f}")
    print(f"compiled loss {comp[0]:.6f}  grad norm {comp[1]:.6f}  (first call, with compilation: {compile_s:.1f} s)")
    best = {k: min(v) * 1e3 for k, v in times.items()}
    print(f"forward + backward, best of 3: eager {best['eager']:.1f} ms, compiled {best['compiled']:.1f} ms")
    ok = d_loss <= LOSS_RTOL and d_norm <= GRAD_NORM_RTOL
    return ok, (
        f"loss differs by {d_loss:.1e} (<= {LOSS_RTOL}), grad norm by {d_norm:.1e} (<= {GRAD_NORM_RTOL}); "
        f"compiled {speed:.2f}x eager, compiling took {compile_s:.0f} s"
    )


# --- (b) rankscope bench at the seed's 88M model -------------------------------------------------

# MFU vs the bf16 peak at or above 20%. An estimate, not a measurement (no GPU has run this yet):
# nanoGPT's 124M (d_model 768) trains at about 40% of an A100's peak compiled; this model is
# narrower (d_model 512: the 8192 x 512 x 512 projections run well below peak) and its step adds
# Muon's orthogonalization, so we expect 25-40%. Below 20%, something outside the model's math (a
# host synchronisation, an eager fallback, the data loader) takes at least a third of each step.
MIN_MFU = 0.20


def check_bench(ctx: Ctx) -> tuple[bool, str]:
    from rankscope.run.bench import format_result, run_bench

    if ctx.dry:
        r = run_bench("tiny", 8 * 4 * 32, {**SMALL, "train.compile": "off"}, progress=False)
    else:
        # 3M tokens: about 370 steps, so the steady state between the 2nd and 4th evaluations is
        # ~180 steps, seconds on an H100, not the 20 steps the default 40-step budget times
        r = run_bench("seed-88m", 3_000_000, {}, progress=False)
    print(format_result(r))
    mfu, against = (r["mfu_peak"], "bf16 peak") if r["mfu_peak"] is not None else (r["mfu_matmul"], "measured matmul")
    return ctx.judged(
        mfu >= MIN_MFU,
        f"MFU {mfu:.1%} vs {against} (>= {MIN_MFU:.0%}), {r['tokens_per_s']:,.0f} tokens/s, "
        f"evaluation {r['eval_share']:.1%} of a full run, peak {r['peak_memory_gib']:.1f} GiB, on {r['device_name']}",
    )


# --- (c) the probe's eigenvalues: device against host ---------------------------------------------

# Both paths run LAPACK-style float64 solvers on the same matrices: they agree to round-off, about
# 1e-15 of the largest eigenvalue; 1e-10 leaves room for the spectrum's condition.
EIG_RTOL = 1e-10
# the path `auto` picks must not be slower than the other by more than this (timing noise)
SLOWER_OK = 1.2


def check_probe_eig(ctx: Ctx) -> tuple[bool, str]:
    import statistics

    import torch

    sys.path.insert(0, str(HERE))
    from bench_probe_eig import grams, probe_check, rel_metric_diff

    from rankscope.measure.metrics import eig_path, eigvalsh_batched, metrics_from_gram

    device = ctx.device
    shapes = [(8, 64), (4, 128)] if ctx.dry else [(176, 64), (512, 128)]  # seed-88m's and seed-1.5b's per site
    ok, parts = True, []
    for b, d in shapes:
        g, s, n = grams(b, d, torch.float64, device)
        ref = eigvalsh_batched(g, path="device")
        ev = eigvalsh_batched(g, path="host")
        agree = ((ev - ref).abs().amax() / ref.abs().amax()).item()
        metrics = rel_metric_diff(metrics_from_gram(g, s, n, path="host"), metrics_from_gram(g, s, n, path="device"))
        ms = {}
        for path in ("device", "host"):
            runs = []
            for _ in range(3):
                sync(device)
                t = time.perf_counter()
                eigvalsh_batched(g, path=path)
                sync(device)
                runs.append((time.perf_counter() - t) * 1e3)
            ms[path] = statistics.median(runs)
        auto = eig_path(g)
        other = "host" if auto == "device" else "device"
        # on the CPU both paths are the same call: no choice to check
        fast = device.type == "cpu" or ms[auto] <= SLOWER_OK * ms[other]
        ok &= agree <= EIG_RTOL and fast
        print(
            f"{b} x {d}x{d} float64: device {ms['device']:.1f} ms, host {ms['host']:.1f} ms, auto picks {auto}; "
            f"eigenvalues agree to {agree:.1e} of the largest, metrics to {metrics:.1e} relative"
        )
        parts.append(
            f"{b}x{d}² device {ms['device']:.0f} ms / host {ms['host']:.0f} ms (auto: {auto}), agree {agree:.0e}"
        )
    grams_line = probe_check(device)
    print(grams_line)
    tf32_ok = grams_line.split()[-1] == "ok"
    return ok and tf32_ok, "; ".join(parts) + f"; Grams under TF32 {'ok' if tf32_ok else 'TOO FAR'}"


# --- (c2) evaluation forwards grouped as a run groups them --------------------------------------


def check_eval_group(ctx: Ctx) -> tuple[bool, str]:
    """The validation batches an evaluation runs `eval_group` at a time (4 at seed-88m): one
    grouped forward against one forward each, the same losses, and not slower (BENCHMARKS.md models
    the eager forward at the balance of launching and FLOPs, so grouping should pay on a GPU)."""
    import statistics

    import torch

    from rankscope.core.model import GPT
    from rankscope.measure.icl import loss_and_icl
    from rankscope.run.estimate import eval_group
    from rankscope.settings.config import apply_overrides, preset

    cfg = apply_overrides(preset("tiny"), SMALL) if ctx.dry else preset("seed-88m")
    device = ctx.device
    group = eval_group(cfg, device.type)
    if group == 1:
        return False, f"eval_group is 1 at {cfg.train.eval_batches} batches of {cfg.train.batch_size}: nothing grouped"
    model = GPT(cfg.model).to(device).eval()
    g = torch.Generator().manual_seed(0)
    shape = (group, cfg.train.batch_size, cfg.train.seq_len)
    x, y = torch.randint(0, cfg.model.vocab_size, (2, *shape), generator=g).to(device)
    single = list(zip(x, y))
    grouped = [(x.flatten(0, 1), y.flatten(0, 1))]

    def timed(batches) -> tuple[float, float]:
        sync(device)
        t = time.perf_counter()
        with torch.no_grad(), ctx.autocast():
            loss, _ = loss_and_icl(model, batches)
        sync(device)
        return loss, (time.perf_counter() - t) * 1e3

    timed(single), timed(grouped)  # warm-up: kernels chosen, memory pooled
    runs = {"single": [], "grouped": []}
    for _ in range(5):
        for name, batches in (("single", single), ("grouped", grouped)):
            loss, ms = timed(batches)
            runs[name].append((loss, ms))
    ms = {k: statistics.median(m for _, m in v) for k, v in runs.items()}
    agree = abs(runs["grouped"][0][0] - runs["single"][0][0]) / abs(runs["single"][0][0])
    print(f"{group} batches of {cfg.train.batch_size} x {cfg.train.seq_len}, medians of 5:")
    print(f"one forward each {ms['single']:.1f} ms, one grouped forward {ms['grouped']:.1f} ms")
    print(f"losses agree to {agree:.1e}")
    ok = agree <= LOSS_RTOL and ms["grouped"] <= SLOWER_OK * ms["single"]
    return ok, (
        f"{group} batches: one forward each {ms['single']:.1f} ms, grouped {ms['grouped']:.1f} ms "
        f"({ms['single'] / ms['grouped']:.2f}x); losses agree to {agree:.0e} (<= {LOSS_RTOL})"
    )


# --- (d) a resumed run's peak memory --------------------------------------------------------------


def check_resume_memory(ctx: Ctx) -> tuple[bool, str]:
    from rankscope.data import load_data
    from rankscope.run.train import train
    from rankscope.settings.config import apply_overrides, preset
    from rankscope.storage.store import read_json

    base = apply_overrides(preset("tiny"), SMALL) if ctx.dry else preset("seed-88m")
    steps = 8 if ctx.dry else 24
    tps = base.train.batch_size * base.train.seq_len
    half = steps // 2
    cfg = apply_overrides(
        base,
        {
            "train.tokens": steps * tps,
            "train.eval_every": half * tps,
            "train.checkpoint_every": half * tps,
            "train.keep_checkpoints": 3,
        },
    )
    data = load_data(cfg.data.path or None, cfg.model.vocab_size, progress=False)
    device = ctx.device
    with tempfile.TemporaryDirectory() as tmp:
        whole, resumed = Path(tmp) / "whole", Path(tmp) / "resumed"
        m_whole, m_resumed = {}, {}
        with peak_memory(device, m_whole):
            s_whole = train(cfg, whole, data, arm="whole", progress=False)
        # the run as an interruption after its halfway checkpoint would have left it
        (resumed / "checkpoints").mkdir(parents=True)
        for name in ("config.json", "provenance.json", "scalars.csv", "probes.csv"):
            if (whole / name).exists():
                shutil.copy(whole / name, resumed / name)
        ckpt = f"step-{half:09d}.pt"
        shutil.copy(whole / "checkpoints" / ckpt, resumed / "checkpoints" / ckpt)
        _reset_compiler()
        with peak_memory(device, m_resumed):
            s_resumed = train(cfg, resumed, data, arm="whole", progress=False)
        params = read_json(whole / "config.json")["n_params"]
    # a resume that keeps the checkpoint it loaded alive (the model and the optimizer's states, at
    # least twice the weights' float32 bytes) exceeds half the weights' bytes; two runs of the
    # same shapes differ by the caching allocator's rounding, far less
    margin = params * 4 / 2
    grew = m_resumed["peak"] - m_whole["peak"]
    d_loss = abs(s_resumed["final_val_loss"] - s_whole["final_val_loss"])
    print(f"uninterrupted: peak {gib(m_whole['peak'])}, final val loss {s_whole['final_val_loss']!r}")
    print(f"resumed at step {half} of {steps}: peak {gib(m_resumed['peak'])}, val loss {s_resumed['final_val_loss']!r}")
    what = "" if device.type == "cuda" else " (CPU: the process's peak RSS, not a per-run figure)"
    return ctx.judged(
        grew <= margin,
        f"resumed peak {gib(m_resumed['peak'])} vs uninterrupted {gib(m_whole['peak'])} "
        f"(allowed {gib(margin)} more: half the weights){what}; final val loss differs by {d_loss:.1e}",
    )


def _reset_compiler() -> None:
    """Forget compiled graphs, which keep the model they were traced from (and its memory) alive."""
    import torch

    torch._dynamo.reset()
    gc.collect()


# --- (e) seed-1.5b: one accumulated training step and an evaluation fit 80 GB ---------------------

# An 80 GB H100 reports 79.6 GiB; the CUDA context (~0.5 GiB, outside the allocator's count) and
# the caching allocator's fragmentation (reserved above allocated) need the rest.
LIMIT_BYTES = 76 * 2**30


def step_and_eval_peaks(cfg, ctx: Ctx) -> tuple[int, int]:
    """Peak bytes of one accumulated training step (as train() takes it: compiled, autocast,
    micro-batches, activation checkpointing, the optimizer step that allocates its states) and of
    the evaluation that follows (the validation loss on one full batch, the probe, and what a run's
    last evaluation adds: functional rank and KV headroom), each counted from an empty device."""
    import torch

    from rankscope.core.model import GPT
    from rankscope.core.optim import build_optimizers, optimizer_step
    from rankscope.measure.functional_rank import functional_rank
    from rankscope.measure.headroom import kv_headroom
    from rankscope.measure.icl import loss_and_icl
    from rankscope.measure.probe import gpt_probe

    tc, device = cfg.train, ctx.device
    g = torch.Generator().manual_seed(0)

    def batch(rows: int):
        x, y = torch.randint(0, cfg.model.vocab_size, (2, rows, tc.seq_len), generator=g).to(device)
        return x, y

    train_m, eval_m = {}, {}
    with peak_memory(device, train_m):
        model = GPT(cfg.model).to(device).train()
        model.activation_checkpointing = tc.activation_checkpointing
        opt = build_optimizers(model, cfg.optim, fused=device.type == "cuda")
        step_model = torch.compile(model, backend=ctx.backend)
        micro = tc.batch_size // tc.grad_accum
        for _ in range(tc.grad_accum):
            x, y = batch(micro)
            with ctx.autocast():
                loss = step_model(x, y) / tc.grad_accum
            loss.backward()
        optimizer_step(model, opt, cfg.optim.grad_clip)
        sync(device)
    with peak_memory(device, eval_m):
        model.eval()
        px, py = batch(cfg.probe.batch_size)
        with torch.no_grad(), ctx.autocast():
            loss_and_icl(model, [batch(tc.batch_size)])
            gpt_probe(model, cfg.probe.sites).measure([px])
            functional_rank(model, px, py)
            kv_headroom(model, px, py, tol=cfg.probe.kv_tolerance)
        sync(device)
    del model, opt, step_model
    _reset_compiler()
    return train_m["peak"], eval_m["peak"]


def check_seed_1_5b_memory(ctx: Ctx) -> tuple[bool, str]:
    from rankscope.settings.config import apply_overrides, preset

    # The full model does not fit the time: 1.5B parameters drawn on the host, a 32-layer graph to
    # compile, a checkpoint-free step. Memory is linear in the layer count (weights, gradients,
    # optimizer states and each block's saved input per layer; the embedding, logits and one
    # block's recomputation once), so two short depths give the slope and the intercept.
    name, extra = (
        ("tiny", {**SMALL, "train.grad_accum": "2", "train.activation_checkpointing": "true"})
        if ctx.dry
        else ("seed-1.5b", {})
    )
    full = apply_overrides(preset(name), extra)
    depths = (1, 2) if ctx.dry else (2, 4)
    peaks = {L: step_and_eval_peaks(apply_overrides(full, {"model.n_layer": L}), ctx) for L in depths}
    (a, pa), (b, pb) = peaks.items()
    target = preset(name).model.n_layer

    def at(i: int) -> float:
        return pb[i] + (pb[i] - pa[i]) / (b - a) * (target - b)

    step, evaluation = at(0), at(1)
    for L, (t, e) in peaks.items():
        print(f"{L} layers: training step {gib(t)}, evaluation {gib(e)}")
    print(f"extrapolated to {target} layers: training step {gib(step)}, evaluation {gib(evaluation)}")
    peak = max(step, evaluation)
    return peak <= LIMIT_BYTES, (
        f"{name} ({target} layers, from {a} and {b}): step {gib(step)}, evaluation {gib(evaluation)}, "
        f"peak {gib(peak)} (<= {gib(LIMIT_BYTES)})"
    )


# --- (f) a short real study with its report --------------------------------------------------------


def check_study(ctx: Ctx) -> tuple[bool, str]:
    if ctx.dry:
        args = ["--preset", "tiny", "--tokens", "2K"] + [a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")]
    else:
        args = ["--preset", "seed-88m", "--tokens", "1M"]
    with tempfile.TemporaryDirectory() as tmp:  # checkpoints (~1 GB a run at seed-88m) stay out of OUT
        study = Path(tmp) / "qk-muon"
        cmd = [sys.executable, "-m", "rankscope", "run", "qk-muon", *args, "--out", str(study), "--no-progress"]
        print("$", " ".join(cmd[1:]), flush=True)
        t = time.perf_counter()
        rc = subprocess.run(cmd, stdout=sys.stdout, stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - t
        runs = [json.loads(p.read_text()) for p in sorted(study.glob("*/seed-*/done.json"))]
        written = (study / "report.md").exists()
        if written:
            shutil.copy(study / "report.md", ctx.out / "study-report.md")
    losses = ", ".join(f"{r['arm']} val {r['final_val_loss']:.3f} key PR {r['final_key_pr']:.1f}" for r in runs)
    report = f"report in {ctx.out}/study-report.md" if written else "report MISSING"
    return rc == 0 and written and len(
        runs
    ) == 2, f"exit {rc}, {len(runs)} of 2 runs in {wall:.0f} s, {report}; {losses}"


# --- running them ---------------------------------------------------------------------------------

# name, function, time cap in seconds on an H100 (estimates: child start ~8 s; compiling the
# 88M graph cold ~40 s; later compilations of it hit inductor's cache)
CHECKS: list[tuple[str, Callable[[Ctx], tuple[bool, str]], int]] = [
    ("compile-step", check_compile_step, 90),
    ("bench-seed-88m", check_bench, 120),
    ("probe-eig", check_probe_eig, 60),
    ("eval-group", check_eval_group, 40),
    ("resume-memory", check_resume_memory, 90),
    ("seed-1.5b-memory", check_seed_1_5b_memory, 100),
    ("study", check_study, 150),
]
BUDGET_S = 450  # all checks together: 7.5 minutes, inside the 8 the first GPU session allows


def injected(name: str) -> str | None:
    """The failure GPU_CHECK_FAIL asks of check `name`: 'raise', 'exit', 'hang' or None."""
    for item in filter(None, os.environ.get("GPU_CHECK_FAIL", "").split(",")):
        check, _, how = item.partition(":")
        if check == name:
            return how or "raise"
    return None


def one_line(e: BaseException) -> str:
    text = (str(e).strip() or type(e).__name__).splitlines()[0]
    return f"{type(e).__name__}: {text}"[:300]


def child(name: str, ctx: Ctx, verdict_file: Path) -> int:
    """Run one check in this process and write its verdict line to `verdict_file`."""
    fn = dict((n, f) for n, f, _ in CHECKS)[name]
    how = injected(name)
    try:
        if how == "exit":
            os._exit(3)  # dies without a verdict, as a crash of the interpreter would
        if how == "hang":
            time.sleep(3600)
        if how == "raise":
            raise RuntimeError("injected failure (GPU_CHECK_FAIL)")
        ok, figure = fn(ctx)
    except Exception as e:  # the verdict names any failure in one line; the traceback goes to the log
        import traceback

        traceback.print_exc()
        ok, figure = False, one_line(e)
    line = f"{'PASS' if ok else 'FAIL'} {name}: {figure}"
    print(line, flush=True)
    verdict_file.write_text(line + "\n")
    return 0


def run_child(name: str, args: argparse.Namespace, timeout: float) -> str:
    """The verdict line of check `name`, run in a child process (its own session, so that a timeout
    kills whatever it started too, inductor's compile workers and the study's process)."""
    out = Path(args.out)
    log = out / f"{name}.txt"
    with tempfile.TemporaryDirectory() as tmp:
        verdict = Path(tmp) / "verdict"
        cmd = [sys.executable, __file__, "--child", name, "--verdict-file", str(verdict), "--out", str(out)]
        cmd += ["--dry-run"] if args.dry_run else []
        with log.open("w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return f"FAIL {name}: timed out after {timeout:.0f} s (log {log})"
        if verdict.exists():
            return verdict.read_text().strip()
    last = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] or ["no output"]
    return f"FAIL {name}: exited with code {rc} and no verdict; last line: {last[0][:200]}"


def device_line(dry: bool) -> str:
    if dry:
        return "the CPU, tiny sizes (dry run: code paths, not figures)"
    try:
        q = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        return subprocess.run(q, capture_output=True, text=True, timeout=30).stdout.strip() or "nvidia-smi said nothing"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"no nvidia-smi ({one_line(e)})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="every check's code path on the CPU at tiny sizes")
    ap.add_argument(
        "--out", default=os.environ.get("OUT", "gpu-out"), help="folder for the logs (default: $OUT or gpu-out)"
    )
    ap.add_argument("--only", help="comma-separated check names (default: all)")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for all checks (default {BUDGET_S})")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--verdict-file", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.child:
        return child(args.child, Ctx(dry=args.dry_run, out=out), Path(args.verdict_file))

    names = [n for n, _, _ in CHECKS]
    wanted = args.only.split(",") if args.only else names
    unknown = set(wanted) - set(names)
    if unknown:
        ap.error(f"unknown check(s) {', '.join(sorted(unknown))}; choose from {', '.join(names)}")
    print(f"# gpu_check on {device_line(args.dry_run)}; logs in {out}/", flush=True)
    deadline = time.monotonic() + args.budget
    lines = []
    for name, _, cap in CHECKS:
        if name not in wanted:
            continue
        t = time.monotonic()
        left = deadline - t
        if left < 10:
            line = f"FAIL {name}: not run, the {args.budget:.0f} s budget was spent"
        else:
            line = run_child(name, args, min(cap, left))
        line += f" [{time.monotonic() - t:.0f} s]"  # what each check costs of the device's time
        print(line, flush=True)
        lines.append(line)
    fails = sum(ln.startswith("FAIL") for ln in lines)
    summary = f"{len(lines) - fails} PASS, {fails} FAIL"
    print(summary)
    (out / "verdict.txt").write_text("\n".join([*lines, summary]) + "\n")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
