"""Probes: forward hooks that feed `metrics.py`, attachable to any model.

A site (`sites.Site`) is a module-path pattern plus a head layout, so the same probe reads
rankscope's GPT or another model's attention modules. The hooks accumulate each head's Gram matrix XᵀX and column
sum Σx in one batched pass (no per-head loops, no stored activations); `measure` then runs one
batched eigen-decomposition for every layer, head and site, on the host when the Grams sit on a GPU
(see `metrics.eig_path`), and reads its results back with one host sync per kind of row. Probes
never change the model: the hooks return nothing and run under `no_grad`, and they are removed
when the pass ends.

Every accumulator is a sum over tokens (Grams, column sums, token counts, attention-entropy sums)
or a maximum (max logits), so data-parallel ranks that each measure their share of a batch give
the metrics of the whole batch once those are reduced: `measure(..., reduce=True)` packs every sum
into one float64 buffer for one all-reduce (SUM) and the maxima into a second (MAX), just before
the metrics. Without `reduce` nothing is communicated and the rows are those of one process.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.attention import logit_chunks
from ..settings.vocab import LAYER_WIDE, METRICS
from .metrics import EIG_PATHS, metrics_from_gram
from .sites import Site, SiteCalls, gpt_sites, matching_modules, pair_qk


@dataclass(frozen=True)
class AttentionStats:
    """Per-head attention entropy and max logit from the post-RoPE query and key sites of a layer."""

    q: Site
    k: Site
    scale: float | Mapping[int, float] | None = None  # default 1/sqrt(head_dim); or per layer
    causal: bool = True
    query_chunk: int = 256  # bounds the (B, H, chunk, T) logits held at once
    # sliding-window attention: query i sees keys j with i - window < j <= i (Mistral's and
    # Hugging Face's convention); None = full causal; a mapping gives each layer its own (or None)
    window: int | Mapping[int, int | None] | None = None

    def layer_scale(self, layer: int, head_dim: int) -> float:
        s = self.scale.get(layer) if isinstance(self.scale, Mapping) else self.scale
        return s if s is not None else 1.0 / math.sqrt(head_dim)

    def layer_window(self, layer: int) -> int | None:
        return self.window.get(layer) if isinstance(self.window, Mapping) else self.window


class GramProbe:
    """Measure rank metrics (and attention statistics, gain statistics) on fixed batches.

    >>> probe = GramProbe(model, gpt_sites(["k"]), attention=AttentionStats(*gpt_sites(["q", "k"])))
    >>> rows = probe.measure([x_batch])   # [{'layer', 'head', 'site', 'metric', 'value'}, ...]

    eig_path: where the eigenvalues are computed ('auto', 'device' or 'host'; see
    `metrics.eig_path`); 'auto' is right everywhere, the others are for benchmarks and tests.
    forward: what `measure` runs on each batch when it is given none (default: the model). A
    forward that stops where the last site is read saves the rest: `gpt_probe` runs the GPT's
    trunk, without the LM head whose logits nothing here reads.
    """

    def __init__(
        self,
        model: nn.Module,
        sites: Sequence[Site],
        attention: AttentionStats | None = None,
        gains: dict[str, str] | None = None,
        *,
        eig_path: str = "auto",
        forward: Callable[[torch.Tensor], Any] | None = None,
    ):
        if eig_path not in EIG_PATHS:
            raise ValueError(f"eig_path must be one of {', '.join(EIG_PATHS)}, got {eig_path!r}")
        self.model, self.sites, self.attention, self.eig_path = model, list(sites), attention, eig_path
        self.forward = forward
        self.gains = dict(gains or {})  # row site name -> module pattern whose .weight is a gain
        # validate patterns now, so a bad site fails before any training
        for s in self.sites + ([attention.q, attention.k] if attention else []):
            matching_modules(model, s.pattern)

    # --- accumulation inside the hooks --------------------------------------------------------

    def _reset(self) -> None:
        self._gram: dict[tuple[str, int], torch.Tensor] = {}
        self._sum: dict[tuple[str, int], torch.Tensor] = {}
        self._n: dict[tuple[str, int], int] = {}
        self._pending: dict[tuple[str, int], torch.Tensor] = {}
        self._ent: dict[int, torch.Tensor] = {}
        self._ent_n: dict[int, int] = {}
        self._maxlogit: dict[int, torch.Tensor] = {}

    def _accumulate(self, site: Site, layer: int, x: torch.Tensor) -> None:
        with torch.autocast(x.device.type, enabled=False):  # else a float32 einsum runs in bf16 on GPU
            self._accumulate_gram(site, layer, x)

    def _accumulate_gram(self, site: Site, layer: int, x: torch.Tensor) -> None:
        # Each batch's Gram in float32 on the CPU, whose matmuls are IEEE; in float64 on CUDA, where a
        # float32 matmul runs in TF32 (10 significant bits) once allow_tf32 is set, as the trainer
        # does, and float64 costs little at a probe's size. Whatever the activations' dtype (bf16
        # under autocast), the sums across batches are float64.
        x = (x.double() if x.device.type == "cuda" else x.float()).flatten(0, 1)  # (B, T, H, E) -> (N, H, E)
        g = torch.einsum("nhe,nhf->hef", x, x)  # (H, E, E): every head in one batched matmul
        key = (site.name, layer)
        if key in self._gram:
            self._gram[key] += g
            self._sum[key] += x.sum(0)
            self._n[key] += x.shape[0]
        else:
            self._gram[key], self._sum[key], self._n[key] = g.double(), x.sum(0).double(), x.shape[0]

    def _attend(self, which: str, layer: int, x: torch.Tensor) -> None:
        with torch.autocast(x.device.type, enabled=False):  # attention logits in float32, not bf16
            self._attend_f32(which, layer, x)

    def _attend_f32(self, which: str, layer: int, x: torch.Tensor) -> None:
        spec = self.attention
        pair = pair_qk(self._pending, which, layer, x)
        if pair is None:
            return
        q, k = pair  # (B, T, H, E), (B, T, G, E)
        B, T, H, E = q.shape
        ent, mx = torch.zeros(H, dtype=torch.float64, device=q.device), None
        for _, logits in logit_chunks(
            q, k, spec.layer_scale(layer, E), spec.query_chunk, causal=spec.causal, window=spec.layer_window(layer)
        ):
            chunk_max = logits.amax(dim=(0, 2, 3))  # (H,)
            mx = chunk_max if mx is None else torch.maximum(mx, chunk_max)
            logp = torch.log_softmax(logits, dim=-1)
            ent += -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1).sum((0, 2)).double()
        self._ent[layer] = self._ent.get(layer, 0) + ent
        self._ent_n[layer] = self._ent_n.get(layer, 0) + B * T
        self._maxlogit[layer] = mx if layer not in self._maxlogit else torch.maximum(self._maxlogit[layer], mx)

    def _hooks(self) -> list[Any]:
        self._calls = SiteCalls()
        handles = []
        for site in self.sites:
            handles += self._calls.attach(
                self.model, f"site {site.name!r}", site, lambda l, x, s=site: self._accumulate(s, l, x)
            )
        if self.attention:
            for which, site in (("q", self.attention.q), ("k", self.attention.k)):
                handles += self._calls.attach(
                    self.model,
                    f"attention {which} site {site.name!r}",
                    site,
                    lambda l, x, w=which: self._attend(w, l, x),
                )
        return handles

    # --- one measurement ----------------------------------------------------------------------

    @torch.no_grad()
    def measure(
        self, batches: Iterable[torch.Tensor], forward: Any = None, *, reduce: bool = False, group: Any = None
    ) -> list[dict[str, Any]]:
        """Run the model on each batch of token ids with the hooks attached; return tidy rows.

        reduce: sum the accumulators over the ranks of `group` (a torch.distributed process group;
        None = the default group) before the metrics, so every rank of the group returns the rows
        of all the ranks' tokens together. Every rank of the group must call `measure` with the
        same sites and at least one batch (the reduced buffers have one layout). Gain rows read
        the parameters, which are the same on every rank (a sharded DTensor parameter is gathered).
        """
        self._reset()
        forward = forward or self.forward or self.model
        handles = self._hooks()
        try:
            try:
                for x in batches:
                    self._calls.start()  # calls are counted per forward pass, not per measurement
                    forward(x)
                    self._calls.check()
            finally:
                for h in handles:
                    h.remove()
            if reduce:
                self._all_reduce(group)
            return self._spectral_rows() + self._attention_rows() + self._gain_rows()
        finally:
            self._reset()  # the Grams and held activations leave device memory, also when a pass failed

    def _all_reduce(self, group: Any) -> None:
        """Sum every accumulator over the ranks of `group` in one all-reduce of one float64 buffer, and
        take the max logits' maxima in a second: two collectives per measurement, whatever the number
        of layers, heads and sites. Token counts travel as float64, exact below 2^53; the reduced
        counts stay tensors (no host sync here), which the rows read as they read Python ints."""
        import torch.distributed as dist

        grams = sorted(self._gram)  # (site, layer): the same order on every rank
        layers = sorted(self._ent)
        maxima = [self._maxlogit[l] for l in layers]
        # a NaN max logit (a diverged model) is NaN in one process; MAX across ranks may drop it, so
        # the NaNs are counted in the sum and put back
        nans = [m.isnan().double() for m in maxima]
        sums = [t for k in grams for t in (self._gram[k], self._sum[k])] + [self._ent[l] for l in layers] + nans
        counts = [self._n[k] for k in grams] + [self._ent_n[l] for l in layers]
        if sums:
            device = sums[0].device
            flat = torch.cat(
                [t.reshape(-1).double() for t in sums] + [torch.tensor(counts, dtype=torch.float64).to(device)]
            )
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            parts = iter(flat.split([t.numel() for t in sums] + [len(counts)]))
            for k in grams:
                self._gram[k] = next(parts).view(self._gram[k].shape)
                self._sum[k] = next(parts).view(self._sum[k].shape)
            for l in layers:
                self._ent[l] = next(parts).view(self._ent[l].shape)
            nans = [next(parts).view(m.shape) for m in maxima]
            n = next(parts)
            for i, k in enumerate(grams):
                self._n[k] = n[i]
            for i, l in enumerate(layers):
                self._ent_n[l] = n[len(grams) + i]
        if maxima:
            # float32 and bfloat16 values are exact in float64, so the maxima come back unchanged
            flat = torch.cat([t.reshape(-1).double() for t in maxima])
            dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group)
            for l, t, m, nan in zip(layers, flat.split([t.numel() for t in maxima]), maxima, nans):
                t = torch.where(nan > 0, float("nan"), t.view(m.shape))
                self._maxlogit[l] = t.to(m.dtype)

    def _spectral_rows(self) -> list[dict[str, Any]]:
        keys = list(self._gram)
        if not keys:
            return []
        by_dim: dict[int, list[tuple[str, int]]] = {}
        for key in keys:  # one batched eigendecomposition per head size (normally just one)
            by_dim.setdefault(self._gram[key].shape[-1], []).append(key)
        rows = []
        for group in by_dim.values():
            heads = [self._gram[k].shape[0] for k in group]
            g = torch.cat([self._gram[k] for k in group])  # (sum of heads, E, E)
            s = torch.cat([self._sum[k] for k in group])
            counts = [self._n[k] for k, h in zip(group, heads) for _ in range(h)]
            if isinstance(counts[0], torch.Tensor):  # reduced across ranks: float64 tensors already
                n = torch.stack(counts)
            else:
                n = torch.tensor(counts, dtype=torch.float64, device=g.device)
            values = metrics_from_gram(g, s, n, path=self.eig_path)  # on the host path: CPU tensors
            table = torch.stack([values[m] for m in METRICS], -1).cpu().tolist()  # one host sync (or none)
            i = 0
            for (site, layer), h in zip(group, heads):
                for head in range(h):
                    rows += [
                        dict(layer=layer, head=head, site=site, metric=m, value=v) for m, v in zip(METRICS, table[i])
                    ]
                    i += 1
        return rows

    def _attention_rows(self) -> list[dict[str, Any]]:
        layers = sorted(self._ent)
        if not layers:
            return []
        # every layer's entropy and max logit in one host sync (float32 and float64 values are
        # exact in float64, so the rows hold what a per-layer .tolist() would)
        parts = [t.double() for l in layers for t in (self._ent[l] / self._ent_n[l], self._maxlogit[l])]
        values = iter(torch.cat(parts).cpu().split([t.numel() for t in parts]))
        rows = []
        for layer in layers:
            ent, mx = next(values).tolist(), next(values).tolist()
            for head, (e, m) in enumerate(zip(ent, mx)):
                rows += [
                    dict(layer=layer, head=head, site="attn", metric="entropy", value=e),
                    dict(layer=layer, head=head, site="attn", metric="max_logit", value=m),
                ]
        return rows

    def _gain_rows(self) -> list[dict[str, Any]]:
        found = []
        for name, pattern in self.gains.items():
            for layer, mod in matching_modules(self.model, pattern):
                w = getattr(mod, "weight", None)
                if w is None:  # TransformerLens names a norm's gain `w`
                    w = getattr(mod, "w", None)
                if w is not None:
                    found.append((name, layer, _gain_tensor(full_tensor(w.detach()))))
        if not found:
            return []
        table = torch.stack([t for _, _, t in found]).cpu().tolist()  # one host sync for every gain
        return [
            dict(layer=layer, head=LAYER_WIDE, site=name, metric=metric, value=v)
            for (name, layer, _), values in zip(found, table)
            for metric, v in zip(GAIN_STATS, values)
        ]


GAIN_STATS = ("gain_mean", "gain_cv", "gain_near_zero")


def full_tensor(w: torch.Tensor) -> torch.Tensor:
    """A parameter as one whole tensor. Under FSDP2 (`fully_shard`) or tensor parallelism a parameter
    is a `DTensor` holding this rank's shard; its `full_tensor()` gathers every shard, a collective
    that every rank of its mesh must call in the same order (the probe reads gains in module order on
    every rank). Anything else is returned as it is."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # not imported: no DTensor can exist
    if dtensor is not None and isinstance(w, dtensor.DTensor):
        return w.full_tensor()
    return w


def _gain_tensor(w: torch.Tensor, near_zero: float = 0.1) -> torch.Tensor:
    """`gain_stats` as a float64 tensor (3,) on w's device, in GAIN_STATS order: no host sync."""
    w = w.double()
    mean = w.mean()
    cv = torch.where(mean != 0, w.std(unbiased=False) / mean.abs(), torch.full_like(mean, float("inf")))
    return torch.stack([mean, cv, (w.abs() < near_zero).double().mean()])


def gain_stats(w: torch.Tensor, near_zero: float = 0.1) -> dict[str, float]:
    """Mean, coefficient of variation (std / |mean|, inf for a zero mean) and share of
    |gain| < near_zero of a gain vector."""
    return dict(zip(GAIN_STATS, _gain_tensor(w, near_zero).tolist()))


def gpt_probe(model: nn.Module, sites: Sequence[str], attention: bool = True) -> GramProbe:
    """The probe for rankscope's GPT: rank metrics at `sites`, attention statistics from the
    post-RoPE q and k, and QK-Norm gain statistics when the model has learned or frozen gains."""
    q, k = gpt_sites(["q", "k"])
    stats = AttentionStats(q, k) if attention else None
    return GramProbe(model, gpt_sites(sites), stats, gpt_gains(model), forward=model.trunk)


def gpt_gains(model: nn.Module, attention: str = "blocks.*.attn") -> dict[str, str]:
    """The gain sites of rankscope's GPT: {'q_gain': ..., 'k_gain': ...} module patterns under the
    attention pattern, when its QK-Norm has gains (learned or frozen); {} otherwise."""
    norm = getattr(model.blocks[0].attn, "q_norm", None)
    if norm is None or norm.weight is None:
        return {}
    return {"q_gain": f"{attention}.q_norm", "k_gain": f"{attention}.k_norm"}
