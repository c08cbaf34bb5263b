"""The probe's eigenvalues: where a batch of float64 Gram matrices is fastest decomposed.

    python benchmarks/bench_probe_eig.py [--repeats 7] [--shapes 176x64,512x128]

The probe decomposes every head's Gram at once: 88-176 of 64 x 64 per site at seed-88m, 256-512 of
128 x 128 at seed-1.5b. On CUDA, torch hands only matrices up to 32 x 32 to cuSOLVER's batched
solver and loops over larger ones one at a time (pytorch issues 174674 and 175585), so
`metrics.eigvalsh_batched` can send them to the host instead. On a GPU this times, per shape and
dtype (float64 as the probe, float32 for comparison), the median over interleaved rounds of:

  device        torch.linalg.eigvalsh where the Grams live
  host          copy to the CPU, `host_eigvalsh` (one thread per matrix, 1 or torch's thread
                count of them at once), copy the eigenvalues back
  probe device  the probe's whole computation, `metrics_from_gram` (two decompositions: the Gram
                and the centered one) and its read-back, on the device path (float64 only)
  probe host    the same on the host path: one copy there, everything else on the CPU

and checks that both paths agree (largest eigenvalue difference over the largest eigenvalue, and
the largest relative metric difference). Then, on a GPU only, it checks the probe's own Grams:
a small float32 model with TF32 matmuls on (as the trainer sets them), probed, against metrics
computed in float64 from the activations it read.

Without a GPU both paths are the same call, so it times the host side alone: torch.linalg.eigvalsh
with torch's threads (what a CPU run does), `host_eigvalsh` with one worker and with torch's thread
count of workers, and the probe's metrics on the CPU.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections.abc import Callable

import torch
from _common import cpu_name

from rankscope.measure.metrics import eigvalsh_batched, host_eigvalsh, metrics_from_gram
from rankscope.settings.vocab import METRICS


def grams(b: int, d: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """b Gram matrices XᵀX of (2d, d) Gaussian activations with a mean (so the centered ones
    differ), their column sums and row counts: what the probe hands `metrics_from_gram`."""
    gen = torch.Generator().manual_seed(b * 1000 + d)
    x = torch.randn(b, 2 * d, d, generator=gen, dtype=torch.float64) + 0.5
    g, s = x.mT @ x, x.sum(-2)
    n = torch.full((b,), 2.0 * d, dtype=torch.float64)
    return g.to(device, dtype), s.to(device), n.to(device)


def median_ms(cases: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None]) -> dict[str, list[float]]:
    """Each case timed once per round, rounds interleaved (a busy machine slows all of them alike),
    after one untimed warm-up call each."""
    for f in cases.values():
        f()
        sync()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(repeats):
        names = list(cases)
        for k in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            t = time.perf_counter()
            cases[k]()
            sync()
            times[k].append((time.perf_counter() - t) * 1e3)
    return times


def rel_metric_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    worst = 0.0
    for m in METRICS:
        x, y = a[m].cpu(), b[m].cpu()
        worst = max(worst, ((x - y).abs() / y.abs().clamp_min(1e-300)).max().item())
    return worst


def probe_check(device: torch.device) -> str:
    """On a GPU with TF32 on: the probe's metrics against float64 ones from the same activations."""
    from rankscope.core.model import GPT, ModelConfig
    from rankscope.measure.probe import GramProbe
    from rankscope.measure.sites import gpt_sites

    cfg = ModelConfig(vocab_size=256, n_layer=2, d_model=256, n_head=4, n_kv_head=2, head_dim=64, d_mlp=512)
    model = GPT(cfg).to(device).eval()
    x = torch.randint(0, 256, (4, 256), generator=torch.Generator().manual_seed(0)).to(device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # as train() sets it on CUDA
    try:
        acts, handles = {}, []
        for i, b in enumerate(model.blocks):
            handles.append(b.attn.k.register_forward_hook(lambda m, a, o, i=i: acts.__setitem__(i, o.clone())))
        with torch.no_grad():
            model(x)
        for h in handles:
            h.remove()
        rows = GramProbe(model, gpt_sites(["k"])).measure([x])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    worst = 0.0
    for i, a in acts.items():
        per_head = a.flatten(0, 1).transpose(0, 1).double().cpu()  # (heads, N, E)
        ref = metrics_from_gram(per_head.mT @ per_head, per_head.sum(-2), per_head.shape[-2])
        for r in rows:
            if r["layer"] == i and r["metric"] in ("pr_sv", "erank", "stable_rank", "pr_eig"):
                v = ref[r["metric"]][r["head"]].item()
                worst = max(worst, abs(r["value"] - v) / abs(v))
    # a float64 Gram of float32 activations: float32 round-off at worst (1e-7 relative, times the
    # spectrum's condition); a TF32 Gram (10 significant bits) would be off by about 1e-3
    verdict = "ok" if worst < 1e-5 else "TOO FAR (a reduced-precision Gram?)"
    return f"probe Grams on {device} with TF32 on, metrics vs float64 from the same activations: {worst:.2e} {verdict}"


def timed_cases(g: torch.Tensor, s: torch.Tensor, n: torch.Tensor, gpu: bool) -> dict[str, Callable[[], object]]:
    """What to time for one batch of Grams: both paths on a GPU, the host side's variants on a CPU."""
    f64 = g.dtype == torch.float64
    threads = torch.get_num_threads()
    if gpu:
        cases = {
            "device": lambda: eigvalsh_batched(g, path="device"),
            "host, 1 worker": lambda: eigvalsh_batched(g, path="host", workers=1),
            f"host, {threads} workers": lambda: eigvalsh_batched(g, path="host"),
        }
        if f64:
            cases["probe device"] = lambda: _read(metrics_from_gram(g, s, n, path="device"))
            cases["probe host"] = lambda: _read(metrics_from_gram(g, s, n, path="host"))
        return cases
    cases = {
        f"torch.linalg.eigvalsh, {threads} threads": lambda: torch.linalg.eigvalsh(g),
        "host_eigvalsh, 1 worker": lambda: host_eigvalsh(g, workers=1),
        f"host_eigvalsh, {threads} workers": lambda: host_eigvalsh(g),
    }
    if f64:
        cases["probe metrics (CPU run)"] = lambda: _read(metrics_from_gram(g, s, n))
    return cases


def agreement(g: torch.Tensor, s: torch.Tensor, n: torch.Tensor, cases: dict, gpu: bool) -> dict[str, str]:
    """How far each timed case's results are from the reference's: the device path on a GPU,
    torch.linalg.eigvalsh with torch's threads on a CPU."""
    ref = eigvalsh_batched(g, path="device")
    scale = ref.abs().amax().item()
    out = {}
    for k in cases:
        if k.startswith("host"):
            ev = cases[k]().to(ref.device)
            out[k] = f"eigenvalues {(ev - ref).abs().amax().item() / scale:.1e} of λ_max"
    if gpu and g.dtype == torch.float64:
        md, mh = metrics_from_gram(g, s, n, path="device"), metrics_from_gram(g, s, n, path="host")
        out["probe host"] = f"metrics {rel_metric_diff(mh, md):.1e} relative"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--shapes", default="176x64,512x128", help="batch x size, comma-separated")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    threads = torch.get_num_threads()

    print(f"# {datetime.datetime.now().isoformat(timespec='seconds')}  torch {torch.__version__}")
    print(f"# CPU: {cpu_name()} ({platform.machine()}), torch threads {threads}")
    if cuda:
        print(f"# GPU: {torch.cuda.get_device_name()}  (cuda {torch.version.cuda})")
    else:
        print("# no GPU: on the CPU both paths are the same call, so this times the host side only")
    print(f"# median of {args.repeats} interleaved rounds, ms\n")
    print("| Grams | dtype | path | median ms | min ms | agreement |\n|---|---|---|---|---|---|")
    for b, d in shapes:
        for dtype in (torch.float64, torch.float32):
            g, s, n = grams(b, d, dtype, device)
            cases = timed_cases(g, s, n, gpu=cuda)
            agree = agreement(g, s, n, cases, gpu=cuda)
            name = str(dtype).removeprefix("torch.")
            for k, t in median_ms(cases, args.repeats, sync).items():
                med, low = statistics.median(t), min(t)
                print(f"| {b} x {d}x{d} | {name} | {k} | {med:.1f} | {low:.1f} | {agree.get(k, '')} |")
    if cuda:
        print()
        print(probe_check(device))


def _read(values: dict[str, torch.Tensor]) -> list:
    """What the probe does with the metrics: one table, read back to Python."""
    return torch.stack([values[m] for m in METRICS], -1).cpu().tolist()


if __name__ == "__main__":
    main()
