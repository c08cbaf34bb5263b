"""Usage: python bench_series.py PRESET REPEATS [THREADS].

Cost per checkpoint of `rankscope analyze --series` at a preset's shapes, on random weights and
random token ids of the preset's probe batch (probe.batch_size x train.seq_len): load the checkpoint,
probe (k), the fixed-batch loss, the induction scores (probe.induction_batch x seq_len)."""

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from rankscope.analyze.inputs import load_checkpoint
from rankscope.analyze.series import _loss
from rankscope.attach import Probe
from rankscope.core.model import GPT
from rankscope.measure.induction import gpt_induction_scores, induction_batch
from rankscope.run import checkpoint
from rankscope.settings.config import preset
from rankscope.storage import store

name, repeats = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else torch.get_num_threads())
cfg = preset(name)
run = Path(tempfile.mkdtemp()) / "bench" / "seed-0"
run.mkdir(parents=True)
store.write_json(run / "config.json", {**cfg.to_dict(), "arm": "bench"})
model = GPT(cfg.model)
model.reset_parameters(0)
checkpoint.save(run, 1, {"model": model.state_dict(), "step": 1, "tokens": 1000})
ckpt = next((run / "checkpoints").glob("step-*.pt"))
B, T = cfg.probe.batch_size, cfg.train.seq_len
ids = torch.randint(0, cfg.model.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
half = T // 2
xi = induction_batch(cfg.model.vocab_size, cfg.probe.induction_batch, half, seed=0)
print(
    f"preset {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
    f"probe batch {B}x{T}, induction batch {cfg.probe.induction_batch}x{2 * half}, threads {torch.get_num_threads()}, "
    f"checkpoint {ckpt.stat().st_size / 1e6:.0f} MB",
    flush=True,
)
times = {k: [] for k in ("load", "probe_k", "loss", "induction", "total")}
for r in range(repeats):
    t0 = time.perf_counter()
    loaded = load_checkpoint(run, ckpt)
    t1 = time.perf_counter()
    print(f"    load {t1 - t0:.2f}s", flush=True)
    Probe(loaded.model, ["k"]).measure(ids)
    t2 = time.perf_counter()
    print(f"    probe_k {t2 - t1:.2f}s", flush=True)
    _loss(loaded.model, ids)
    t3 = time.perf_counter()
    print(f"    loss {t3 - t2:.2f}s", flush=True)
    gpt_induction_scores(loaded.model, half).measure_with_loss(xi)
    t4 = time.perf_counter()
    for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
        times[k].append(v)
    print(f"  repeat {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
print("median: " + ", ".join(f"{k} {statistics.median(v):.2f}s" for k, v in times.items()))
