"""The seed's GPT, top to bottom like the math.

RMSNorm pre-norm blocks; attention with separate Q, K, V, O weights, grouped-query heads, optional
QK-Norm (before RoPE), RoPE, causal scaled-dot-product attention; squared-ReLU MLP; tied embeddings
scaled by sqrt(d_model). Identity `Tap` modules mark where probes attach; they cost nothing.

Shapes: B batch, T tokens, D d_model, H query heads, G key/value heads, E head dim, V vocab.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..settings.config import ModelConfig  # the model's settings live with the others, torch-free
from .attention import logit_chunks


class Tap(nn.Identity):
    """A named point in the forward pass where a probe can hook. Layout (B, T, heads, E)."""


class RMSNormFunction(torch.autograd.Function):
    """y = x / rms(x) · w with a hand-written backward, dx = rstd · (ĝ - x̂ · mean(ĝ · x̂)), ĝ = g · w.
    On CPU it makes half the passes over memory of F.rms_norm's autograd graph (about 1.6x faster);
    on CUDA F.rms_norm is used, which torch.compile fuses."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
        rstd = torch.rsqrt(x.square().mean(-1, keepdim=True).add_(eps))
        xhat = x * rstd
        ctx.save_for_backward(xhat, rstd, w)
        return xhat * w if w is not None else xhat

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xhat, rstd, w = ctx.saved_tensors
        ghat = grad * w if w is not None else grad
        dw = (grad * xhat).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        dx = (ghat - xhat * (ghat * xhat).mean(-1, keepdim=True)).mul_(rstd)
        return dx, dw, None


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension. gain: 'learned' (trained), 'frozen' (fixed at 1, kept as a
    parameter that never trains, so it is visible and counted), or 'parameter_free' (no gain)."""

    def __init__(self, dim: int, eps: float, gain: str = "learned"):
        super().__init__()
        self.eps = eps
        self.weight = None
        if gain in ("learned", "frozen"):
            self.weight = nn.Parameter(torch.ones(dim), requires_grad=(gain == "learned"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_grad_enabled():
            return RMSNormFunction.apply(x, self.weight, self.eps)
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def rope_tables(seq_len: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (T, E/2) for rotary position embeddings (Su et al. 2021)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x1[i], x2[i]) of the two halves of the head dimension. x: (B, T, heads, E)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)  # (1, T, 1, E/2)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def mixed_precision(device_type: str) -> torch.autocast:
    """The trainer's autocast on a GPU: bfloat16 matmuls, float32 weights and reductions. It takes
    the device type so that the same context runs on the CPU too, where the tests check what it
    does to the model, the probes and the evaluations without a GPU."""
    return torch.autocast(device_type, dtype=torch.bfloat16)


def causal_max_logit(q: torch.Tensor, k: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Largest pre-softmax logit q·k/sqrt(E) of each query head under the causal mask.
    q (B, T, H, E), k (B, T, G, E) -> (H,). Computed in query chunks, in float32 also under
    autocast (which would run the logits' matmul in bf16, 8 significant bits); no gradient."""
    best = torch.full((q.shape[2],), float("-inf"), device=q.device)
    with torch.autocast(q.device.type, enabled=False):
        for _, logits in logit_chunks(q, k, 1.0 / math.sqrt(q.shape[3]), chunk):
            best = torch.maximum(best, logits.amax(dim=(0, 2, 3)))
    return best


@torch.no_grad()
def qk_clip(model: GPT, tau: float) -> torch.Tensor:
    """QK-Clip (Kimi K2, 2025): after an optimizer step, rescale the query and key weights of every
    head whose largest logit S_h exceeded tau so that its logits shrink by γ_h = tau / S_h, leaving
    the forward pass itself unchanged. With grouped-query attention a key head is shared: it takes
    sqrt(min γ) of its group and each query head the rest, γ_h / sqrt(min γ). Resets the tracked
    maxima and returns the number of heads clipped, as a 0-d tensor on the model's device: counting
    on the host would make every training step wait for the device. Under QK-Norm the rescaling is
    undone by the normalisation, so QK-Clip is meant for models without it."""
    clipped = torch.zeros((), dtype=torch.int64, device=model.rope_cos.device)
    for block in model.blocks:
        attn = block.attn
        gamma = (tau / attn.max_logit.clamp_min(1e-30)).clamp(max=1.0)  # (H,)
        clipped += (gamma < 1).sum()
        group = attn.n_head // attn.n_kv_head
        gamma_k = gamma.view(attn.n_kv_head, group).amin(dim=1).sqrt()  # (G,)
        gamma_q = gamma / gamma_k.repeat_interleave(group)  # (H,)
        E = attn.head_dim
        attn.q_proj.weight.mul_(gamma_q.repeat_interleave(E)[:, None].to(attn.q_proj.weight.dtype))
        attn.k_proj.weight.mul_(gamma_k.repeat_interleave(E)[:, None].to(attn.k_proj.weight.dtype))
        attn.max_logit.zero_()
    return clipped


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm != "none":
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.qk_norm)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.qk_norm)
        # QK-Clip (Kimi K2): the largest attention logit of each head seen in training forwards
        self.track_max_logit = False
        self.register_buffer("max_logit", torch.zeros(cfg.n_head), persistent=False)
        # probe taps, all (B, T, heads, E)
        self.q_pre, self.k_pre = Tap(), Tap()  # after QK-Norm, before RoPE
        self.q, self.k, self.v = Tap(), Tap(), Tap()  # q, k after RoPE
        self.o = Tap()  # each head's attention output, before the output projection

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)  # (B, T, H, E)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, G, E)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, G, E)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.q_pre(q), self.k_pre(k)
        q, k, v = self.q(apply_rope(q, cos, sin)), self.k(apply_rope(k, cos, sin)), self.v(v)
        if self.track_max_logit and self.training:
            with torch.no_grad():
                self.max_logit.copy_(torch.maximum(self.max_logit, causal_max_logit(q, k)))
        y = F.scaled_dot_product_attention(  # (B, H, T, E); head h reads kv head h // (H/G)
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            enable_gqa=self.n_kv_head != self.n_head,
        )
        y = self.o(y.transpose(1, 2))  # (B, T, H, E)
        return self.o_proj(y.reshape(B, T, self.n_head * self.head_dim))  # (B, T, D)


class ReluSquared(torch.autograd.Function):
    """relu(x)² with a one-pass backward, 2·relu(x)·g: autograd's pow + threshold backward would
    take three passes over the (B, T, d_mlp) activations, about 7% of a CPU training step."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        r = F.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (r,) = ctx.saved_tensors
        return r.mul(grad).mul_(2.0)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.down = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(ReluSquared.apply(self.up(x)))  # squared ReLU (So et al. 2021, Primer)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


# Rows per chunk of LinearCrossEntropy: 512 x V floats fit in cache for V up to a few thousand. A
# module constant, not a class attribute: torch.compile cannot read the Function's own class
# inside its forward, and broke the graph there.
_CE_ROWS = 512
# Logits per chunk of an evaluation's loss off the CPU: 2^24 (64 MiB in float32; 341 rows at vocab
# 49152). An accelerator gains nothing from a cache-sized chunk, only more launches; this bounds the
# transient at a few hundred MiB where whole float32 logits of a 32 x 2048 batch at vocab 49152
# (the seed-1.5b evaluation) would be 13 GB, and 32 GB with cross-entropy's own float32 copies.
_CE_DEVICE_ELEMS = 1 << 24


def _ce_rows(h: torch.Tensor, w: torch.Tensor) -> int:
    return _CE_ROWS if h.device.type == "cpu" else max(1, _CE_DEVICE_ELEMS // w.shape[0])


def chunked_cross_entropy(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits h @ wᵀ (h (N, D), w (V, D), targets (N,)) without gradients,
    in row chunks, so the (N, V) logits never exist whole: an evaluation's output layer is about
    1.5x faster on two CPU cores than logits + F.cross_entropy, and needs a bounded transient on a
    GPU. Each chunk's logits are reduced in float32 (bf16 under autocast otherwise)."""
    total = torch.zeros((), dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
    rows = _ce_rows(h, w)
    for i in range(0, h.shape[0], rows):
        logits = h[i : i + rows] @ w.T  # (c, V)
        logits = logits.to(total.dtype)  # a no-op for float32 and float64 logits
        total += torch.logsumexp(logits, dim=-1).sum() - logits.gather(1, targets[i : i + rows, None]).sum()
    return total / h.shape[0]


def chunked_token_losses(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every row of the logits h @ wᵀ in float32 (h (N, D), w (V, D), targets (N,))
    -> (N,), in chunks of at most 2^24 logits: the per-token losses an evaluation needs (the ICL
    score, the induction loss) without the (N, V) logits ever existing whole."""
    out = torch.empty(targets.shape[0], dtype=torch.float32, device=h.device)
    rows = max(1, _CE_DEVICE_ELEMS // w.shape[0])
    for i in range(0, targets.shape[0], rows):
        logits = F.linear(h[i : i + rows], w).float()  # (c, V)
        out[i : i + rows] = F.cross_entropy(logits, targets[i : i + rows], reduction="none")
    return out


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits h @ wᵀ, computed in row chunks that stay in cache.

    The loss is the graph's end, so each chunk's gradient (softmax - onehot) is formed right away
    and folded into dh and dw; the (N, V) logits never exist whole and are never recomputed
    (the idea behind fused linear-cross-entropy kernels such as Liger's). On two CPU cores this
    makes the output layer about 1.7x faster than logits + F.cross_entropy.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        N = h.shape[0]  # h (N, D), w (V, D), targets (N,)
        dh, dw = torch.empty_like(h), torch.zeros_like(w)
        total = torch.zeros((), dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
        c = _CE_ROWS
        for i in range(0, N, c):
            hc, tc = h[i : i + c], targets[i : i + c, None]
            logits = hc @ w.T  # (c, V)
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (c, 1)
            total += lse.sum() - logits.gather(1, tc).sum()
            p = logits.sub_(lse).exp_()  # softmax, in place
            p.scatter_add_(1, tc, torch.full_like(lse, -1.0))  # softmax - onehot
            torch.mm(p, w, out=dh[i : i + c])
            dw.addmm_(p.T, hc)
        ctx.save_for_backward(dh, dw)
        ctx.n = N
        return total / N

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dh, dw = ctx.saved_tensors
        scale = grad / ctx.n
        return dh * scale, dw * scale, None


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)  # tied with the output head
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        cos, sin = rope_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = False  # recompute each block in backward (set by the trainer)
        self.reset_parameters(seed=0)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, V), or the mean cross-entropy if targets are given."""
        return self.head(self.trunk(idx), targets)

    def trunk(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) -> the residual stream after the last block (B, T, D), before the head: what a
        probe runs, since nothing it reads lies in the head (at vocab 49152 the head is a fifth
        of seed-88m's forward FLOPs, and its logits the largest tensor of the pass)."""
        return self.forward_blocks(self.embed_tokens(idx))

    # The forward pass in three stages, so an evaluation can cache the residual stream at a layer
    # and re-run only the layers after it (functional rank does, once per projection rank).
    def embed_tokens(self, idx: torch.Tensor) -> torch.Tensor:
        return self.embed(idx) * math.sqrt(self.cfg.d_model)  # (B, T, D)

    def forward_blocks(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Blocks start..stop-1 on the residual stream x (B, T, D) -> (B, T, D)."""
        T = x.size(1)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks[start:stop]:
            if recompute:  # keep only each block's input; redo its forward during backward
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        return x

    def head(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm and tied output layer: logits (B, T, V), or the mean cross-entropy."""
        x = self.final_norm(x)
        if targets is None:
            return F.linear(x, self.embed.weight)  # (B, T, V)
        h, t = x.flatten(0, 1), targets.flatten()
        if not torch.is_grad_enabled():  # an evaluation, on every device: the logits never exist whole
            return chunked_cross_entropy(h, self.embed.weight, t)
        if x.device.type == "cpu" and x.requires_grad:
            return LinearCrossEntropy.apply(h, self.embed.weight, t)
        return F.cross_entropy(F.linear(x, self.embed.weight).flatten(0, 1).float(), targets.flatten())

    def token_losses(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Final norm and tied output layer as per-token float32 cross-entropy: the residual stream
        x (..., D) and targets (...) -> (...), in chunks (`chunked_token_losses`), no gradient."""
        h = self.final_norm(x).flatten(0, -2)  # (N, D)
        return chunked_token_losses(h, self.embed.weight, targets.reshape(-1)).view(targets.shape)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Initialise each parameter from a generator seeded by (seed, parameter name), so models
        that differ only in some modules (QK-Norm or not) start from identical shared weights."""
        n_out = 2 * self.cfg.n_layer  # residual-branch outputs (GPT-2's scaling, when asked for)
        for name, p in self.named_parameters():
            if p.is_meta:  # shape-only model (parameter counts): nothing to fill
                continue
            if p.ndim == 1:
                p.fill_(1.0)  # norm gains
                continue
            g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))
            std = self.cfg.init_std
            if self.cfg.scaled_residual_init and name.endswith(("o_proj.weight", "down.weight")):
                std /= math.sqrt(n_out)
            p.copy_(torch.randn(p.shape, generator=g) * std)

    def param_roles(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Each trainable parameter's role, declared by module type (never by name):
        'matrix' = 2D hidden weights (Muon's), 'embedding', 'gain' = norm gains."""
        roles: dict[str, list[tuple[str, nn.Parameter]]] = {"matrix": [], "embedding": [], "gain": []}
        for mod_name, mod in self.named_modules():
            role = {nn.Linear: "matrix", nn.Embedding: "embedding", RMSNorm: "gain"}.get(type(mod))
            if role is None:
                continue
            for p_name, p in mod.named_parameters(recurse=False):
                if p.requires_grad:
                    roles[role].append((f"{mod_name}.{p_name}", p))
        return roles

    def attention_matrices(self) -> list[tuple[nn.Parameter, nn.Parameter, nn.Parameter, nn.Parameter]]:
        """Each layer's Q, K, V and O weights, in the order the seed stacks them by rows into one
        (H·E + 2·G·E + D, D) matrix; the optimizer's grouping (`optim.muon_qkvo`) reads this."""
        return [
            (b.attn.q_proj.weight, b.attn.k_proj.weight, b.attn.v_proj.weight, b.attn.o_proj.weight)
            for b in self.blocks
        ]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x matmul parameters (the tied head counts once, the embedding
        lookup not at all), plus attention's 12 x layers x heads x head_dim x T (PaLM, Chowdhery et al.
        2022, appendix B), halved for the causal mask that flash kernels skip."""
        c = self.cfg
        matmul = sum(p.numel() for _, p in self.param_roles()["matrix"]) + c.vocab_size * c.d_model
        attention = 12 * c.n_layer * c.n_head * c.head_dim * seq_len / 2
        return 6 * matmul + attention
