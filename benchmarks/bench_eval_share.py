"""The evaluation's share of a seed-88m run on one GPU, modelled, with the parts a CPU can measure.

    cd benchmarks && python bench_eval_share.py [--rounds 5] [--seq 256]

No GPU has been lent to this project, so the GPU share is a model: FLOPs of each evaluation part at
the seed-88m preset (closed forms below) at the training step's achieved rate, plus a launch and a
solver-call cost. What the CPU can tell is measured here, medians of interleaved rounds:

- the evaluation forward before (whole logits, then float32 cross-entropy) and after (the trunk,
  then chunked per-token losses) at seed-88m widths and vocabulary, 2 layers, batch 4 x --seq;
- four validation batches one forward each, and grouped into one forward as a run does now
  (`estimate.eval_group`: 4 at seed-88m), same shapes;
- the probe forward with and without the LM head, same shapes;
- the host side of every small decomposition at full seed-88m size (it runs on the host after the
  change whatever the device): 264 W_Q/W_K slices 64 x 512, 264 key/query Grams 64 x 64 (functional
  rank), 176 key Grams (KV headroom);
- kernel launches, counted as the non-view aten operations of each part (a CUDA launch each, or
  about), at 1 and 2 layers and extrapolated to 22.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from dataclasses import replace

import torch
from _common import cpu_name
from torch.utils._python_dispatch import TorchDispatchMode

from rankscope.core.model import GPT
from rankscope.measure.functional_rank import all_layer_grams
from rankscope.measure.icl import loss_and_icl, token_losses
from rankscope.measure.metrics import eigh_batched
from rankscope.measure.probe import GramProbe, gpt_probe
from rankscope.measure.weight_spectra import weight_spectra
from rankscope.run.estimate import eval_group
from rankscope.settings.config import preset


class Ops(TorchDispatchMode):
    """Counts the non-view aten operations run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.n += 1
        return func(*args, **(kwargs or {}))


def count(fn) -> int:
    with torch.no_grad(), Ops() as ops:
        fn()
    return ops.n


def median_ms(fns: dict, rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            with torch.no_grad():
                fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def old_losses(model: GPT, batches) -> float:
    """The evaluation forward before: whole (B, T, V) logits, then float32 cross-entropy."""
    sums = sum(token_losses(model(x), y).sum(0) for x, y in batches)
    return sums.mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    cfg = preset("seed-88m")
    mc, tc = cfg.model, cfg.train
    g = torch.Generator().manual_seed(0)

    # --- measured: forwards at seed-88m widths, 2 layers ---------------------------------------
    small = GPT(replace(mc, n_layer=2)).eval()
    ids = [torch.randint(0, mc.vocab_size, (tc.batch_size, args.seq), generator=g) for _ in range(2)]
    batches = [(ids[0], ids[1])]
    group = eval_group(cfg, "cuda")  # what a seed-88m run on one GPU groups
    four = [tuple(torch.randint(0, mc.vocab_size, (tc.batch_size, args.seq), generator=g) for _ in range(2))] * group
    grouped = [(torch.cat([x for x, _ in four]), torch.cat([y for _, y in four]))]

    def full_probe(m: GPT) -> GramProbe:
        """gpt_probe as it was: the same sites, statistics and gains, on a forward through the head."""
        p = gpt_probe(m, ["k"])
        return GramProbe(m, p.sites, p.attention, p.gains, forward=m)

    probe_old = full_probe(small)
    probe_new = gpt_probe(small, ["k"])
    fwd = {
        "eval forward, whole logits (before)": lambda: old_losses(small, batches),
        "eval forward, trunk + chunked losses (after)": lambda: loss_and_icl(small, batches),
        f"{group} val batches, one forward each": lambda: loss_and_icl(small, four),
        f"{group} val batches, one grouped forward (after)": lambda: loss_and_icl(small, grouped),
        "probe, forward with LM head (before)": lambda: probe_old.measure([ids[0]]),
        "probe, trunk only (after)": lambda: probe_new.measure([ids[0]]),
    }
    # --- measured: the host side of the decompositions, full seed-88m size ----------------------
    full = GPT(replace(mc, n_layer=mc.n_layer)).eval()  # weights only; never run forward here
    grams_q = [torch.randn(mc.n_head + mc.n_kv_head, 64, 128, generator=g, dtype=torch.float64) for _ in range(22)]
    grams = [x @ x.mT for x in grams_q]  # (12, 64, 64) per layer: functional rank's k and q heads
    host = {
        "weight spectra, svdvals per layer (before's math)": lambda: weight_spectra(full, path="device"),
        "weight spectra, Grams + one host eigvalsh (after)": lambda: weight_spectra(full, path="host"),
        "functional rank eigh, per layer (before's calls)": lambda: [torch.linalg.eigh(m) for m in grams],
        "functional rank eigh, one batched host call (after)": lambda: eigh_batched(grams, path="host"),
    }
    ms = median_ms({**fwd, **host}, args.rounds)

    # --- launches, 1 and 2 layers -> 22 ------------------------------------------------------------
    one, two = GPT(replace(mc, n_layer=1)).eval(), GPT(replace(mc, n_layer=2)).eval()

    def per_layers(fn_of_model) -> tuple[int, int]:
        """Operations per layer and fixed, of the work alone (the models are built outside the count)."""
        c1, c2 = count(lambda: fn_of_model(one)), count(lambda: fn_of_model(two))
        return c2 - c1, 2 * c1 - c2

    x, y = ids  # launches at the preset's own length (the chunked head's launches grow with the tokens)
    x, y = (torch.randint(0, mc.vocab_size, (tc.batch_size, tc.seq_len), generator=g) for _ in range(2))
    launches = {
        "val forward before": per_layers(lambda m: token_losses(m(x), y).sum(0)),
        "val forward after": per_layers(lambda m: loss_and_icl(m, [(x, y)])),
        f"val forward, {group} batches grouped": per_layers(
            lambda m: loss_and_icl(m, [(torch.cat([x] * group), torch.cat([y] * group))])
        ),
        "probe before": per_layers(lambda m: full_probe(m).measure([x])),
        "probe after": per_layers(lambda m: gpt_probe(m, ["k"]).measure([x])),
        "block": per_layers(lambda m: m.forward_blocks(m.embed_tokens(x))),
        "grams": per_layers(lambda m: all_layer_grams(m, x, ["k", "q"])),
    }

    print(f"# {datetime.date.today()}, {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"# seed-88m widths, batch {tc.batch_size} x {args.seq}, medians of {args.rounds} rounds\n")
    print("| part | median ms |\n|---|---|")
    for k, v in ms.items():
        print(f"| {k} | {v:.1f} |")
    print("\n| part (non-view aten ops) | per layer | fixed | at 22 layers |\n|---|---|---|---|")
    for k, (per, fixed) in launches.items():
        print(f"| {k} | {per} | {fixed} | {22 * per + fixed} |")


if __name__ == "__main__":
    main()
