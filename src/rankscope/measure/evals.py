"""Downstream evaluations: the seed's open questions turned into measurements.

The seed (QK-Norm + Muon: lower loss, yet keys that use fewer dimensions) leaves three questions
open, and each function here answers one of them at an evaluation point:

- "Does QK-Norm find low-rank shortcuts that sacrifice in-context learning?"
  `loss_and_icl` (the in-context learning score of Olsson et al. 2022, from the validation forward
  the trainer runs anyway), `induction_loss` and `InductionScores` (copying a repeated random
  sequence, and which heads attend to the token after the earlier occurrence).
- "Is a PR of 51 better than 30, or is it ghost compute?" `functional_rank`: how many principal
  directions of a layer's keys (or queries) the model needs before its loss stops changing. A
  participation ratio counts the directions that hold variance; this counts the ones that matter.
- Where the geometry comes from: `weight_spectra`, the singular values of each head's W_Q and W_K.

All functions are pure: they take a model (or a `logits_fn`) and fixed batches and return floats
or tidy rows `{layer, head, site, metric, value}` in the store's format (head -1 = per layer).
Hooks are attached only for the duration of a call and removed afterwards; weights are never
touched, and only `functional_rank` replaces activations, inside its own forward passes. Call them
under the same autocast context as the trainer's evaluation; everything numerically delicate
(cross-entropy, Gram matrices, projections) is done in float32 or float64 regardless.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.attention import logit_chunks
from ..core.model import GPT, Tap
from ..settings.vocab import LAYER_WIDE
from .metrics import eigh_batched, metrics_from_gram, singular_value_metrics, to_host
from .probe import Site, SiteCalls, _matching, gpt_sites, pair_qk

Row = dict[str, Any]
LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # token ids (B, T) -> logits (B, T, V)

# Cross-entropy runs in float32 on chunks of at most this many logits (64 MiB), so bf16 logits of a
# large vocabulary (seed-88m: 49152) are never copied to float32 all at once.
_CE_CHUNK_ELEMS = 1 << 24


def _no_autocast(t: torch.Tensor) -> torch.autocast:
    """Autocast off for math inside hooks: under autocast even float32 einsums and matmuls run in
    bf16 and return bf16, which would round Gram matrices, projections and attention logits."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def _exact(t: torch.Tensor) -> torch.dtype:
    """The dtype of Grams and projections: float32 on the CPU, whose matmuls are IEEE; float64 on
    CUDA, where float32 matmuls run in TF32 (10 significant bits) once the trainer allows it, as
    the probe's Grams do (`GramProbe._accumulate_gram`); these matmuls are tiny at float64's rate."""
    return torch.float64 if t.device.type == "cuda" else torch.float32


# --- per-token losses and the in-context learning score ------------------------------------------


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every token in float32: logits (..., V), targets (...) -> (...)."""
    V = logits.shape[-1]
    flat, tgt = logits.reshape(-1, V), targets.reshape(-1)
    if flat.shape[0] != tgt.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
    out = torch.empty(tgt.shape[0], dtype=torch.float32, device=logits.device)
    rows = max(1, _CE_CHUNK_ELEMS // V)
    for i in range(0, tgt.shape[0], rows):
        out[i : i + rows] = F.cross_entropy(flat[i : i + rows].float(), tgt[i : i + rows], reduction="none")
    return out.view(targets.shape)


def _position_loss_sums(
    logits_fn: LogitsFn, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, int]:
    """Per-position sums of cross-entropy over all rows of all batches (T,), and the row count.
    One forward per batch; nothing is read back to the host here. rankscope's GPT runs its trunk
    and chunked per-token losses, so no (B, T, V) logits exist (1.6 GB in float32 at seed-88m's
    4 x 2048 x 49152); any other `logits_fn` returns its logits."""
    sums, n, T = None, 0, None
    for x, y in batches:
        loss = _losses(logits_fn, x, y)  # (B, T)
        if T is not None and loss.shape[1] != T:
            raise ValueError(f"every batch must have the same length, got {loss.shape[1]} after {T}")
        T = loss.shape[1]
        sums = loss.sum(0) if sums is None else sums + loss.sum(0)
        n += loss.shape[0]
    if sums is None:
        raise ValueError("no batches given")
    return sums, n


def _losses(logits_fn: LogitsFn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token float32 cross-entropy of the model on (x, y): (B, T)."""
    if isinstance(logits_fn, GPT):
        return logits_fn.token_losses(logits_fn.trunk(x), y)
    return token_losses(logits_fn(x), y)


@torch.no_grad()
def per_position_loss(logits_fn: LogitsFn, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean cross-entropy at each position (T,) over fixed (x, y) batches of equal length, where
    `logits_fn(x)` returns logits (B, T, V) (rankscope's GPT itself is such a function)."""
    sums, n = _position_loss_sums(logits_fn, batches)
    return sums / n


def icl_windows(T: int) -> tuple[slice, slice]:
    """The (early, late) position windows of `icl_score` for sequences of T positions.

    late:  the last 10% of positions, [T - ceil(T/10), T).
    early: [T//16, T//8) (positions 8..15 of 128, 128..255 of 2048). Olsson et al. (2022) compare
           the 500th token with the 50th of 512, i.e. about T/10: early enough that the model has
           seen little of the document, late enough that it is not predicting from the token alone.
    For T < 16 that window would be empty or hold position 0 (no context at all), so early is
    position 1, the first prediction made with any context. T must be at least 3.
    """
    if T < 3:
        raise ValueError(f"the in-context learning score needs at least 3 positions, got {T}")
    late = slice(T - math.ceil(T / 10), T)
    early = slice(T // 16, T // 8) if T >= 16 else slice(1, 2)
    return early, late


def icl_score(per_pos: torch.Tensor | Sequence[float]) -> float:
    """In-context learning score (Olsson et al. 2022, "In-context learning and induction heads"):
    mean loss over the late window minus mean loss over the early window (see `icl_windows`).
    Negative: later tokens are predicted better, so the model uses its context; more negative is
    more in-context learning."""
    per_pos = torch.as_tensor(per_pos, dtype=torch.float32)
    early, late = icl_windows(per_pos.shape[-1])
    return (per_pos[late].mean() - per_pos[early].mean()).item()


@torch.no_grad()
def loss_and_icl(logits_fn: LogitsFn, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """(mean validation loss, in-context learning score) from ONE forward per batch.

    Meant to replace the trainer's validation loss: the per-token losses it needs for the mean are
    the same ones the score needs per position, so the score costs nothing extra. The mean is over
    all tokens (equal to the mean of per-batch means when batches have equal size)."""
    sums, n = _position_loss_sums(logits_fn, batches)
    per_pos = sums / n
    early, late = icl_windows(per_pos.shape[0])
    mean, icl = torch.stack([per_pos.mean(), per_pos[late].mean() - per_pos[early].mean()]).tolist()  # one sync
    return mean, icl


# --- induction: repeated random tokens -----------------------------------------------------------


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
    `probe.SiteCalls`) recompute the causal softmax in query chunks, in float32; query head h reads
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
            _matching(model, site.pattern)  # a pattern that matches nothing fails here, not mid-training

    def _attend(self, which: str, layer: int, x: torch.Tensor) -> None:
        pair = pair_qk(self._pending, which, layer, x)
        if pair is not None:
            with _no_autocast(x):
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


# --- functional rank: how many key (query) directions the loss needs -----------------------------


def rank_ladder(head_dim: int) -> list[int]:
    """Powers of two below head_dim, then head_dim itself: 1, 2, 4, ..., 32, 64 for 64."""
    ladder, r = [], 1
    while r < head_dim:
        ladder.append(r)
        r *= 2
    return ladder + [head_dim]


def _gram_hook(store: dict[str, torch.Tensor], site: str):
    def hook(module: nn.Module, inputs: Any, out: torch.Tensor) -> None:
        x = out.to(_exact(out)).flatten(0, 1)  # (N, heads, E)
        with _no_autocast(x):
            store[site] = torch.einsum("nhe,nhf->hef", x, x).double()  # every head's XᵀX at once

    return hook


def layer_grams(
    model: nn.Module, h: torch.Tensor, layer: int, sites: Sequence[str]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Run block `layer` unprojected on the residual stream `h`, reading every head's Gram at each
    of `sites` (its taps): ({site: (heads, E, E) float64}, the stream after the block)."""
    taps = {s: getattr(model.blocks[layer].attn, s) for s in sites}
    grams: dict[str, torch.Tensor] = {}
    handles = [tap.register_forward_hook(_gram_hook(grams, s)) for s, tap in taps.items()]
    try:
        h_next = model.forward_blocks(h, layer, layer + 1)
    finally:
        for hd in handles:
            hd.remove()
    return grams, h_next


def all_layer_grams(
    model: nn.Module, x: torch.Tensor, sites: Sequence[str]
) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """Every layer's `layer_grams` from one unprojected pass on token ids x: ([{site: (heads, E, E)}
    per layer], the stream after the last block). Taking them all before any is decomposed lets
    one batched eigh (`metrics.eigh_batched`) serve every layer: on a GPU one copy to the host."""
    h, grams = model.embed_tokens(x), []
    for layer in range(len(model.blocks)):
        g, h = layer_grams(model, h, layer, sites)
        grams.append(g)
    return grams, h


def _projection_hook(p: torch.Tensor):
    """A forward hook that replaces a tap's output (B, T, heads, E) by its projection x P_h per
    head (P symmetric), computed in P's dtype (`_exact`) and cast back, so that projecting onto
    every direction (P = I) reproduces the output to float32 round-off."""

    def hook(module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
        with _no_autocast(out):
            return torch.einsum("bthe,hef->bthf", out.to(p.dtype), p).to(out.dtype)

    return hook


@torch.no_grad()
def functional_rank(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sites: Sequence[str] = ("k", "q"),
    ladder: Sequence[int] | None = None,
    tol: float = 0.01,
    *,
    eig_path: str = "auto",
) -> list[Row]:
    """Functional rank of each layer's keys (and queries) in rankscope's GPT.

    For layer l and site s (a tap of `blocks.<l>.attn`: 'k' = keys after QK-Norm and RoPE, 'q',
    or any other of q_pre, k_pre, v, o), each head's activations on the batch (x, y) are projected
    onto their top-r principal directions (eigenvectors of the uncentered Gram XᵀX, float64) and
    the loss on the same batch is measured, for r on `ladder` (default `rank_ladder(head_dim)`).
    Rows per layer and site, head -1:
      dloss_r{r}      (L_r - L_full) / L_full, the relative loss increase at rank r
      functional_rank the smallest r on the ladder from which dloss stays <= tol at every larger r
    The participation ratio says how many directions carry variance; this says how many the model
    needs: keys with PR 51 and functional rank 8 would be the seed's "ghost compute".

    Cost: one unprojected pass reads every layer's Grams, decomposed by one `metrics.eigh_batched`
    call (`eig_path`: on a GPU, one copy to the host and back rather than a cuSOLVER call per
    matrix); a second walks the layers, keeping the residual stream at the current layer's input,
    from which each (layer, site, r) re-runs only blocks l.. and the head, n_layer (n_layer + 1) / 2
    blocks per (site, r) in all. Every head of the layer is projected at once by one batched
    einsum. Memory stays at one residual stream plus the pass itself.
    """
    E = model.cfg.head_dim
    ladder = sorted(set(ladder if ladder is not None else rank_ladder(E)))
    if not ladder or ladder[0] < 1 or ladder[-1] > E:
        raise ValueError(f"ladder ranks must lie in [1, head_dim={E}], got {ladder}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    for s in sites:
        if not isinstance(getattr(model.blocks[0].attn, s, None), Tap):
            raise ValueError(f"unknown site {s!r}: expected a tap of blocks.<i>.attn (q_pre, q, k_pre, k, v, o)")

    grams, h_last = all_layer_grams(model, x, sites)  # the unprojected pass
    keys = [(layer, s) for layer in range(len(model.blocks)) for s in sites]
    eig = dict(zip(keys, eigh_batched([grams[layer][s] for layer, s in keys], path=eig_path)))
    del grams
    losses: dict[tuple[str, int, int], torch.Tensor] = {}
    h = model.embed_tokens(x)  # (B, T, D): the residual stream at the input of layer 0
    for layer, block in enumerate(model.blocks):
        for s in sites:
            vecs = eig[(layer, s)].eigenvectors  # (heads, E, E), eigenvalues ascending
            for r in ladder:
                v = vecs[..., E - r :]  # (heads, E, r): the top r directions
                hd = getattr(block.attn, s).register_forward_hook(_projection_hook((v @ v.mT).to(_exact(v))))
                try:
                    losses[(s, layer, r)] = model.head(model.forward_blocks(h, start=layer), y).float()
                finally:
                    hd.remove()
        h = model.forward_blocks(h, layer, layer + 1)  # the same block the Gram pass ran, unhooked
    full = model.head(h_last, y).float()  # the unprojected loss

    keys = list(losses)
    values = torch.stack([full] + [losses[k] for k in keys]).tolist()  # one host sync
    l_full, by_key = values[0], dict(zip(keys, values[1:]))
    rows = []
    for s in sites:
        for layer in range(len(model.blocks)):
            d = {r: (by_key[(s, layer, r)] - l_full) / l_full for r in ladder}
            # the smallest r from which the loss STAYS within tol: on a noisy, non-monotone curve a
            # single lucky rung below a failing one does not count as enough dimensions
            fr = next((r for i, r in enumerate(ladder) if all(d[q] <= tol for q in ladder[i:])), E)
            rows.append(dict(layer=layer, head=LAYER_WIDE, site=s, metric="functional_rank", value=float(fr)))
            rows += [dict(layer=layer, head=LAYER_WIDE, site=s, metric=f"dloss_r{r}", value=d[r]) for r in ladder]
    return rows


# --- weight spectra per head ---------------------------------------------------------------------

WEIGHT_METRICS = ("pr_sv", "stable_rank", "spectral_norm")


@torch.no_grad()
def weight_spectra(
    model: nn.Module,
    q: str = "blocks.*.attn.q_proj",
    k: str = "blocks.*.attn.k_proj",
    head_dim: int | None = None,
    *,
    path: str = "auto",
) -> list[Row]:
    """Singular-value statistics of each head's slice of W_Q and W_K.

    Head h's slice is rows h*E:(h+1)*E of the projection's weight (E, d_model): the map from the
    residual stream to that head's queries (keys; one per KV head). Its singular values s
    (batched `torch.linalg.svdvals`, float64, all heads of a layer at once) give, through
    `metrics.singular_value_metrics`,
      pr_sv         (Σ s)² / Σ s²   the seed's participation ratio, applied to the weights
      stable_rank   Σ s² / s_max²
      spectral_norm s_max
    Rows {layer, head, site: 'w_q' | 'w_k', metric, value}. Muon orthogonalizes each update of
    these matrices (pushing toward flat spectra) while QK-Norm makes the logits invariant to
    their scale: the weight spectra show which pressure wins. Patterns are module paths (fnmatch)
    of linear layers, so other models with the same layout work too; head_dim defaults to
    `model.cfg.head_dim`.

    path: 'device' takes `svdvals` of the slices where they live, the default on the CPU (and the
    only way the numbers were computed before). 'host', the default elsewhere: on CUDA `svdvals`
    of a 64 x 512 matrix is one cuSOLVER call and wait per matrix (264 at seed-88m), so each
    slice's Gram W Wᵀ (E x E, float64) is formed on the device, all go to the host in one copy,
    and s = sqrt(eigenvalues) there (`metrics.metrics_from_gram`, floored at the round-off level as
    the probe's are): equal to `svdvals` to about E eps of s_max.
    """
    E = head_dim if head_dim is not None else model.cfg.head_dim
    per_layer: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for site, pattern in (("w_q", q), ("w_k", k)):
        for layer, mod in _matching(model, pattern):
            w = mod.weight.detach()
            if w.shape[0] % E:
                raise ValueError(f"{pattern}: {w.shape[0]} output rows is not a multiple of head_dim {E}")
            per_layer.setdefault(layer, []).append((site, w.view(-1, E, w.shape[1])))  # (heads, E, D)
    index, stats = [], []
    weights = [w for layer in sorted(per_layer) for _, w in per_layer[layer]]
    if not weights:
        return []
    where = path if path != "auto" else ("device" if weights[0].device.type == "cpu" else "host")
    if where not in ("device", "host"):
        raise ValueError(f"path must be auto, device or host, got {path!r}")
    for layer in sorted(per_layer):
        mats = per_layer[layer]
        index += [(layer, site, head) for site, w in mats for head in range(w.shape[0])]
        if where == "device":
            s = torch.linalg.svdvals(torch.cat([w for _, w in mats]).double())  # (heads, min(E, D)), descending
            m = singular_value_metrics(s)
            stats.append(torch.stack([m["pr_sv"], m["stable_rank"], s[:, 0]], -1))
    if where == "host":
        w = torch.cat(weights).to(torch.float64)  # (all heads, E, D)
        with _no_autocast(w):
            (g,) = to_host(w @ w.mT)  # every slice's Gram, in one copy to the host
        m = metrics_from_gram(g)
        # s_max² = λ_max = Σ s² / stable_rank, and Σ s² = trace(W Wᵀ)
        sr = m["stable_rank"]
        spectral = torch.where(sr > 0, g.diagonal(dim1=-2, dim2=-1).sum(-1) / sr.clamp_min(1e-300), 0.0).sqrt()
        stats.append(torch.stack([m["pr_sv"], sr, spectral], -1))
    table = torch.cat(stats).cpu().tolist()  # one host sync
    return [
        dict(layer=layer, head=head, site=site, metric=m, value=v)
        for (layer, site, head), vals in zip(index, table)
        for m, v in zip(WEIGHT_METRICS, vals)
    ]
