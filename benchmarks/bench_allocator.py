"""Usage: python bench_allocator.py [ROUNDS].

The allocator setting of CPU runs (`rankscope.run.train.keep_freed_memory`) measured apart: the tiny
preset's eager training step (loss, backward, optimizer step, zero_grad) in child processes that
alternate without and with the setting, ROUNDS pairs (default 2), 3 warm-up and 12 timed steps
each: the median step time and the minor page faults per step."""

import subprocess
import sys

CHILD = """
import resource, statistics, sys, time
import torch
from rankscope.settings.config import preset
from rankscope.core.model import GPT
from rankscope.core.optim import build_optimizers
from rankscope.run.train import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
cfg = preset("tiny")
model = GPT(cfg.model)
model.reset_parameters(0)
opt = build_optimizers(model, cfg.optim)
g = torch.Generator().manual_seed(0)
x, y = torch.randint(0, cfg.model.vocab_size, (2, cfg.train.batch_size, cfg.train.seq_len), generator=g)
def step():
    model(x, y).backward()
    opt.step()
    opt.zero_grad()
for _ in range(3):
    step()
faults, times = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, []
for _ in range(12):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 12
print(f"{sys.argv[1]:8s} median step {statistics.median(times) * 1e3:6.1f} ms, minor page faults a step {faults:8.0f}")
"""

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
for _ in range(rounds):
    for mode in ("default", "keep"):
        subprocess.run([sys.executable, "-c", CHILD, mode], check=True)
