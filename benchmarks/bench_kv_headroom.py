"""Usage: python bench_kv_headroom.py REPEATS [THREADS].

Cost of the KV-cache headroom of `rankscope analyze` on a model that is not rankscope's, measured
side by side: `headroom.model_kv_headroom` (whole forward passes) on a GPT-NeoX with Pythia-70m's
shapes (6 layers, d_model 512, 8 heads of 64, partial RoPE, vocabulary 50304; random weights) and a
Llama of the same size (full RoPE), on analyze's default batch of 8 x 256 random token ids, next to
one probe measurement (`Probe(model).measure`, keys) and one plain loss pass of the same model."""

import statistics
import sys
import time

import torch
import transformers

from rankscope.attach import Probe, detect
from rankscope.attach.headroom import model_kv_headroom

repeats = int(sys.argv[1])
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else torch.get_num_threads())
shape = dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048, vocab_size=50304)
models = {
    "gpt-neox (pythia-70m shapes, rotary_pct 0.25)": transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(**shape, rotary_pct=0.25, max_position_embeddings=2048)
    ),
    "llama (same shapes, full RoPE)": transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**shape, max_position_embeddings=2048)
    ),
}
ids = torch.randint(0, 50304, (8, 257), generator=torch.Generator().manual_seed(0))
x, y = ids[:, :-1], ids[:, 1:]
print(f"threads {torch.get_num_threads()}, batch 8 x 256, torch {torch.__version__}", flush=True)
for name, model in models.items():
    model.eval()
    att = detect(model)
    times: dict[str, list[float]] = {"loss pass": [], "probe (k)": [], "kv headroom": []}
    passes = []
    with torch.no_grad():
        att.loss(x, y)  # warm-up: first-call allocation
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            att.loss(x, y)
        t1 = time.perf_counter()
        Probe(model).measure(ids[:, :-1])
        t2 = time.perf_counter()
        count: list[int] = []
        model_kv_headroom(model, x, y, attachment=att, progress=lambda done, total, c=count: c.append(done))
        t3 = time.perf_counter()
        passes.append(len(count))
        for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
            times[k].append(v)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{name}: "
        + ", ".join(f"{k} {v:.2f}s" for k, v in med.items())
        + f"; {statistics.median(passes):.0f} projected passes"
        + f", {med['kv headroom'] / statistics.median(passes):.2f}s each",
        flush=True,
    )
