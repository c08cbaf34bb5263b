"""Induction: how well a model copies a repeated random sequence, and which heads attend as an
induction circuit does (Olsson et al. 2022).

Part of the seed's first open question ("Does QK-Norm find low-rank shortcuts that sacrifice
in-context learning?"): `induction_batch` builds the repeated sequences, `induction_loss` is the
loss on their second copy, and `InductionScores` reads every head's induction and previous-token
attention from hooks on the post-RoPE query and key sites. Hooks live only for the duration of a
call; weights are never touched, and the attention is recomputed in float32 regardless of autocast.
Rows are tidy `{layer, head, site, metric, value}` in the store's format.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..core.attention import logit_chunks
from ..core.model import GPT
from .icl import LogitsFn, token_losses
from .precision import no_autocast
from .sites import Site, SiteCalls, gpt_sites, matching_modules, pair_qk

Row = dict[str, Any]


def induction_batch(
    vocab_size: int, batch_size: int, half_len: int, seed: int = 0, low: int = 1, distinct: bool = True
) -> torch.Tensor:
    """(batch_size, 2 * half_len) token ids: a random sequence followed by an exact copy of it
    (Olsson et al. 2022). The second copy can only be predicted by looking back at the first, so
    its loss measures copying from context, free of any knowledge of the data.

    Ids come from [low, vocab_size): the default low=1 skips rankscope's document separator
    (id 0); with rankscope's byte-level BPE, low=257 also skips the 256 single-byte tokens.
    distinct: no id repeats within a row, so "the token that followed the earlier occurrence" is
    unambiguous (needs half_len <= vocab_size - low). The generator is seeded by `seed` alone, so
    every arm and every evaluation sees the same batch. Returned on the CPU.
    """
    n = vocab_size - low
    if half_len < 2 or batch_size < 1 or n < 1:
        raise ValueError(
            f"need half_len >= 2, batch_size >= 1 and low < vocab_size; got "
            f"half_len={half_len}, batch_size={batch_size}, low={low}, vocab_size={vocab_size}"
        )
    g = torch.Generator().manual_seed(seed)
    if distinct:
        if half_len > n:
            raise ValueError(f"cannot draw {half_len} distinct ids from [{low}, {vocab_size}); use distinct=False")
        r = torch.rand(batch_size, n, generator=g).argsort(-1)[:, :half_len] + low  # (B, L), no repeats
    else:
        r = torch.randint(low, vocab_size, (batch_size, half_len), generator=g)
    return torch.cat([r, r], dim=1)  # (B, 2L)


def _half_len(x: torch.Tensor) -> int:
    T = x.shape[1]
    L = T // 2
    if T % 2 or L < 2 or not torch.equal(x[:, :L], x[:, L:]):
        raise ValueError("x must be a batch of sequences repeated twice (see induction_batch)")
    return L


def _induction_loss_from_logits(logits: torch.Tensor, x: torch.Tensor, L: int) -> torch.Tensor:
    # positions L .. 2L-2 predict tokens L+1 .. 2L-1; position L-1, which predicts the first token
    # of the second copy, is excluded: nothing in the context says the sequence starts over there
    return token_losses(logits[:, L:-1], x[:, L + 1 :]).mean()


@torch.no_grad()
def induction_loss(logits_fn: LogitsFn, x: torch.Tensor) -> float:
    """Mean cross-entropy on the second copy of a repeated batch x (B, 2L) from `induction_batch`:
    about 0 for a perfect copier, log(vocab) for a model that ignores its context."""
    L = _half_len(x)
    if isinstance(logits_fn, GPT):  # per-token losses from the trunk: no (B, T, V) logits
        return logits_fn.token_losses(logits_fn.trunk(x)[:, L:-1], x[:, L + 1 :]).mean().item()
    return _induction_loss_from_logits(logits_fn(x), x, L).item()


class InductionScores:
    """Per-head induction attention score (Olsson et al. 2022) on a repeated random batch.

    For a query at position i = L + j of the second copy (token r[j]) the score is the attention
    weight on key j + 1, the token that followed the earlier occurrence of r[j]; averaged over
    queries j = 0..L-1 and the batch. An induction head scores near 1; uniform causal attention
    scores the mean of 1/(i+1). Also `prev_token_score`, the weight on key i - 1: induction runs
    through a previous-token head in an earlier layer, so both halves of the circuit are visible.

    Hooks on the post-RoPE query and key sites (like `probe.AttentionStats`, read as the sites say:
    input or output, transform, layout, and which call of a module that runs more than once; see
    `sites.SiteCalls`) recompute the causal softmax in query chunks, in float32; query head h reads
    key head h // (H/G). The hooks return nothing and are removed after each call, so outputs are
    unchanged.

    >>> scores = InductionScores(model, *gpt_sites(["q", "k"]), half_len=64)
    >>> loss, rows = scores.measure_with_loss(induction_batch(4096, 8, 64).to(device))
    """

    def __init__(
        self, model: nn.Module, q: Site, k: Site, half_len: int, scale: float | None = None, query_chunk: int = 256
    ):
        if half_len < 2:
            raise ValueError(f"half_len must be at least 2, got {half_len}")
        self.model, self.q, self.k, self.half_len = model, q, k, half_len
        self.scale, self.query_chunk = scale, query_chunk
        for site in (q, k):
            matching_modules(model, site.pattern)  # a pattern that matches nothing fails here, not mid-training

    def _attend(self, which: str, layer: int, x: torch.Tensor) -> None:
        pair = pair_qk(self._pending, which, layer, x)
        if pair is not None:
            with no_autocast(x):
                self._score(layer, *pair)

    def _score(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        L = self.half_len
        q = q[:, L:]  # (B, L, H, E): queries of the second copy, at positions L .. 2L - 1; k is (B, T, G, E)
        B, _, H, E = q.shape
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(E)
        ind = torch.zeros(H, dtype=torch.float64, device=q.device)
        prev = torch.zeros(H, dtype=torch.float64, device=q.device)
        for j0, logits in logit_chunks(q, k, scale, self.query_chunk, first=L):  # (B, H, c, T), causal
            j = torch.arange(j0, j0 + logits.shape[2], device=q.device)  # second-copy offsets
            lse = torch.logsumexp(logits, dim=-1)  # (B, H, c)
            for acc, target in ((ind, j + 1), (prev, L + j - 1)):
                idx = target[None, None, :, None].expand(B, H, -1, 1)
                acc += (logits.gather(-1, idx).squeeze(-1) - lse).exp().sum((0, 2)).double()
        # one (q, k) pair per layer and pass: SiteCalls hands on one call of each module, and refuses
        # a module that runs twice unless its site picks the call (a shared module would sum both)
        s_ind, s_prev, s_n = self._sums.get(layer, (0.0, 0.0, 0))
        self._sums[layer] = (s_ind + ind, s_prev + prev, s_n + B * L)

    @torch.no_grad()
    def _run(self, x: torch.Tensor, forward: Any) -> Any:
        if x.shape[1] != 2 * self.half_len:
            raise ValueError(f"x has {x.shape[1]} tokens; expected 2 x half_len = {2 * self.half_len}")
        self._pending: dict[tuple[str, int], torch.Tensor] = {}
        self._sums: dict[int, Any] = {}
        calls, handles = SiteCalls(), []
        for which, site in (("q", self.q), ("k", self.k)):
            handles += calls.attach(
                self.model, f"induction {which} site {site.name!r}", site, lambda l, t, w=which: self._attend(w, l, t)
            )
        try:
            calls.start()
            out = (forward or self.model)(x)
            calls.check()
        finally:
            for h in handles:
                h.remove()
        return out

    def _rows(self) -> list[Row]:
        rows = []
        layers = sorted(self._sums)
        if not layers:
            return rows
        means = [torch.stack(self._sums[l][:2]) / self._sums[l][2] for l in layers]  # (2, H) per layer
        table = torch.stack(means).cpu().tolist()  # one host sync
        for layer, (ind, prev) in zip(layers, table):
            for head, (a, b) in enumerate(zip(ind, prev)):
                rows += [
                    dict(layer=layer, head=head, site="attn", metric="induction_score", value=a),
                    dict(layer=layer, head=head, site="attn", metric="prev_token_score", value=b),
                ]
        self._sums = {}
        return rows

    def measure(self, x: torch.Tensor, forward: Any = None) -> list[Row]:
        """Rows {layer, head, site: 'attn', metric: 'induction_score' | 'prev_token_score', value}
        from one forward pass on x (B, 2 * half_len), e.g. from `induction_batch`."""
        _half_len(x)
        self._run(x, forward)
        return self._rows()

    def measure_with_loss(self, x: torch.Tensor, forward: Any = None) -> tuple[float, list[Row]]:
        """(induction_loss, rows) from the same single forward pass; `forward(x)` (default: the
        model) must return logits (B, T, V). Without `forward`, rankscope's GPT runs its trunk and
        the loss of the second copy alone, in chunks: no (B, T, V) logits."""
        L = _half_len(x)
        if forward is None and isinstance(self.model, GPT):
            h = self._run(x, self.model.trunk)  # (B, T, D)
            loss = self.model.token_losses(h[:, L:-1], x[:, L + 1 :]).mean().item()
        else:
            loss = _induction_loss_from_logits(self._run(x, forward), x, L).item()
        return loss, self._rows()


def gpt_induction_scores(model: nn.Module, half_len: int, query_chunk: int = 256) -> InductionScores:
    """InductionScores on rankscope's GPT: its post-RoPE q and k taps."""
    q, k = gpt_sites(["q", "k"])
    return InductionScores(model, q, k, half_len, query_chunk=query_chunk)
