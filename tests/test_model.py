"""The GPT: preset sizes, causality, QK-Norm placement, attention against a reference, shared init."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from _tolerances import U32

from rankscope.core.model import GPT, LinearCrossEntropy, ModelConfig, apply_rope
from rankscope.settings.config import PRESETS

SMALL = ModelConfig(vocab_size=97, n_layer=2, d_model=32, n_head=4, n_kv_head=2, head_dim=8, d_mlp=64, max_seq_len=16)


def count_params(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return GPT(cfg).num_params()


def test_seed_88m_has_the_seeds_parameter_count():
    cfg = PRESETS["seed-88m"].model
    assert count_params(cfg) == 88_630_528
    # without QK-Norm: two 64-gain norms fewer in each of 22 layers
    assert count_params(replace(cfg, qk_norm="none")) == 88_630_528 - 22 * 128
    assert count_params(replace(cfg, qk_norm="parameter_free")) == 88_630_528 - 22 * 128
    assert count_params(replace(cfg, qk_norm="frozen")) == 88_630_528


def test_seed_1_5b_and_tiny_counts_match_closed_form():
    for name in ("seed-1.5b", "tiny"):
        c = PRESETS[name].model
        q_o = 2 * c.d_model * c.n_head * c.head_dim
        k_v = 2 * c.d_model * c.n_kv_head * c.head_dim
        mlp = 2 * c.d_model * c.d_mlp
        norms = 2 * c.d_model + 2 * c.head_dim
        expected = c.n_layer * (q_o + k_v + mlp + norms) + c.vocab_size * c.d_model + c.d_model
        assert count_params(c) == expected, name
    c = PRESETS["seed-1.5b"].model
    assert (c.n_layer, c.d_model, c.n_head, c.n_kv_head, c.head_dim, c.d_mlp) == (32, 2048, 16, 8, 128, 8192)


def test_causal():
    torch.manual_seed(0)
    model = GPT(SMALL).eval()
    x = torch.randint(0, 97, (2, 12))
    y = x.clone()
    y[:, 7:] = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        a, b = model(x), model(y)
    # bitwise: both batches have one shape, so every kernel is the same and sums each row in the
    # same order, and a masked key adds exp(-inf) = 0 exactly to the softmax of an earlier query
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_same_seed_gives_same_shared_weights_across_arms():
    a = GPT(SMALL)
    a.reset_parameters(5)
    b = GPT(replace(SMALL, qk_norm="none"))
    b.reset_parameters(5)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert set(pb) < set(pa)
    for name, p in pb.items():
        assert torch.equal(p, pa[name]), name
    c = GPT(SMALL)
    c.reset_parameters(6)
    assert not torch.equal(c.embed.weight, a.embed.weight)


def test_frozen_gain_equals_parameter_free():
    a, b = GPT(replace(SMALL, qk_norm="frozen")), GPT(replace(SMALL, qk_norm="parameter_free"))
    a.reset_parameters(1)
    b.reset_parameters(1)
    x = torch.randint(0, 97, (2, 10))
    assert torch.equal(a(x), b(x))  # bitwise: the same ops, and x̂ · 1.0 is exactly x̂
    assert not a.blocks[0].attn.q_norm.weight.requires_grad


def reference_attention(model: GPT, block: int, h: torch.Tensor) -> torch.Tensor:
    """Attention written out by hand: explicit GQA repeat, causal softmax, QK-Norm before RoPE."""
    attn, cfg = model.blocks[block].attn, model.cfg
    B, T, _ = h.shape
    q = (h @ attn.q_proj.weight.T).view(B, T, cfg.n_head, cfg.head_dim)
    k = (h @ attn.k_proj.weight.T).view(B, T, cfg.n_kv_head, cfg.head_dim)
    v = (h @ attn.v_proj.weight.T).view(B, T, cfg.n_kv_head, cfg.head_dim)
    if attn.q_norm is not None:
        q = q / q.pow(2).mean(-1, keepdim=True).add(cfg.norm_eps).sqrt() * attn.q_norm.weight
        k = k / k.pow(2).mean(-1, keepdim=True).add(cfg.norm_eps).sqrt() * attn.k_norm.weight
    q, k = apply_rope(q, model.rope_cos[:T], model.rope_sin[:T]), apply_rope(k, model.rope_cos[:T], model.rope_sin[:T])
    rep = cfg.n_head // cfg.n_kv_head
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bthe,bshe->bhts", q, k) / math.sqrt(cfg.head_dim)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.einsum("bhts,bshe->bthe", scores.softmax(-1), v).reshape(B, T, -1)
    return y @ attn.o_proj.weight.T


@pytest.mark.parametrize("qk_norm", ["learned", "none"])
def test_attention_matches_reference(qk_norm):
    model = GPT(replace(SMALL, qk_norm=qk_norm))
    model.reset_parameters(3)
    with torch.no_grad():
        for blk in model.blocks:
            if blk.attn.q_norm is not None:  # non-trivial gains
                blk.attn.q_norm.weight.uniform_(0.5, 1.5)
                blk.attn.k_norm.weight.uniform_(0.5, 1.5)
    h = torch.randn(2, 11, SMALL.d_model)
    out = model.blocks[1].attn(h, model.rope_cos[:11], model.rope_sin[:11])
    ref = reference_attention(model, 1, h)
    # every rounding differs (SDPA against einsum and softmax, rsqrt against 1/sqrt): a chain of float32
    # sums of D = 32 (projections), E = 8 (norm, logits), T = 11 (softmax, weighted values) and H E = 32
    # (output) terms, about 102 u in all, with the logits' error multiplied by up to 1 + max|logit|
    # (softmax; |logit| <= sqrt(E) x 1.5² under QK-Norm with these gains, far less without): relative
    # to the output's scale, which random weights make about its largest entry
    terms, logit = 32 + 8 + 8 + 11 + 11 + 32, math.sqrt(8) * 1.5**2
    assert torch.allclose(out, ref, rtol=0, atol=terms * (1 + logit) * U32 * ref.abs().max().item())


def test_rope_preserves_norm_and_is_relative():
    cos, sin = GPT(SMALL).rope_cos, GPT(SMALL).rope_sin
    x = torch.randn(1, 16, 1, 8)
    # the rotated vector is within about 5 u of its norm of the exact rotation (two products and a sum
    # per coordinate, cos and sin rounded to float32); each norm sums E = 8 squares (E u, halved by the
    # square root, plus its own rounding): 5 + 2 (E / 2 + 1) = E + 7 u relative in all
    rtol = (8 + 7) * U32
    assert torch.allclose(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1), rtol=rtol, atol=0)
    # <R_m q, R_n k> depends only on m - n
    q, k = torch.randn(8), torch.randn(8)
    rq = apply_rope(q.expand(1, 16, 1, 8), cos, sin)[0, :, 0]
    rk = apply_rope(k.expand(1, 16, 1, 8), cos, sin)[0, :, 0]
    # each rotated vector is within 5 u of its norm of the exact rotation (above; the float64 angles
    # leave only the tables' float32 rounding), each dot product of E terms within E u of Σ|terms| <=
    # |q||k|: 2 (E + 2 x 5) u |q||k| apart at most
    atol = 2 * (8 + 2 * 5) * U32 * (q.norm() * k.norm()).item()
    assert torch.allclose(rq[5] @ rk[2], rq[12] @ rk[9], rtol=0, atol=atol)


def test_linear_cross_entropy_matches_reference():
    torch.manual_seed(0)
    h = torch.randn(1100, 16, dtype=torch.float64, requires_grad=True)  # not a multiple of the chunk
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (1100,))
    ref = F.cross_entropy(h @ w.T, t)
    gh, gw = torch.autograd.grad(ref * 3.0, (h, w))
    loss = LinearCrossEntropy.apply(h, w, t)
    fh, fw = torch.autograd.grad(loss * 3.0, (h, w))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    assert torch.allclose(fh, gh, atol=1e-12) and torch.allclose(fw, gw, atol=1e-12)


def test_chunked_cross_entropy_matches_reference():
    from rankscope.core.model import chunked_cross_entropy

    torch.manual_seed(0)
    h, w = torch.randn(1100, 16, dtype=torch.float64), torch.randn(50, 16, dtype=torch.float64)
    t = torch.randint(0, 50, (1100,))  # 1100 rows: two whole chunks and a part
    assert chunked_cross_entropy(h, w, t).item() == pytest.approx(F.cross_entropy(h @ w.T, t).item(), rel=1e-12)


def test_training_loss_equals_eval_loss():
    model = GPT(SMALL)
    x, y = torch.randint(0, 97, (2, 10)), torch.randint(0, 97, (2, 10))
    train_loss = model(x, y)  # the fused CPU path (parameters require grad)
    with torch.no_grad():
        eval_loss = model(x, y)
        direct = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    # training and evaluation take the same chunks, logits and log-sum-exps in the same order
    assert train_loss.item() == eval_loss.item()
    # the chunked loss against logits + F.cross_entropy: on each side a token's lse - logit is
    # within (V + 2 D) u absolute (logits: dot products of D = 32 terms, Σ|terms| <= |x| |w| < 1 here;
    # the log-sum-exp of V = 97 exponentials), (V + 2 D) u / log V relative to a loss near log V, and
    # the mean over N = 20 tokens adds N u: twice that apart at most
    assert eval_loss.item() == pytest.approx(direct.item(), rel=2 * ((97 + 2 * 32) / math.log(97) + 20) * U32)
    assert train_loss.item() == pytest.approx(math.log(97), rel=0.1)  # near uniform at init


def test_relu_squared_matches_autograd():
    from rankscope.core.model import ReluSquared

    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ReluSquared.apply, (x,))
    assert torch.equal(ReluSquared.apply(x), F.relu(x).square())


@pytest.mark.parametrize("with_gain", [True, False])
def test_rms_norm_function_matches_reference(with_gain):
    from rankscope.core.model import RMSNormFunction

    x = torch.randn(3, 4, 8, dtype=torch.float64, requires_grad=True)
    w = torch.rand(8, dtype=torch.float64, requires_grad=True) + 0.5 if with_gain else None
    args = (x, w) if with_gain else (x,)
    f = (
        (lambda x, w: RMSNormFunction.apply(x, w, 1e-6))
        if with_gain
        else (lambda x: RMSNormFunction.apply(x, None, 1e-6))
    )
    assert torch.autograd.gradcheck(f, args)
    assert torch.allclose(f(*args), F.rms_norm(x, (8,), w, 1e-6))


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_qk_clip_caps_each_heads_max_logit_at_tau(n_kv_head):
    from rankscope.core.model import causal_max_logit, qk_clip

    model = GPT(replace(SMALL, qk_norm="none", n_kv_head=n_kv_head))
    model.reset_parameters(0)
    with torch.no_grad():  # large weights so some heads have large logits
        for b in model.blocks:
            b.attn.q_proj.weight.mul_(torch.linspace(1, 20, 32)[:, None])
            b.attn.k_proj.weight.mul_(5)
    x = torch.randint(0, 97, (3, 16))
    taps = {}
    hooks = [
        b.attn.q.register_forward_hook(lambda m, i, o, l=l: taps.__setitem__(("q", l), o))
        for l, b in enumerate(model.blocks)
    ]
    hooks += [
        b.attn.k.register_forward_hook(lambda m, i, o, l=l: taps.__setitem__(("k", l), o))
        for l, b in enumerate(model.blocks)
    ]
    for b in model.blocks:
        b.attn.track_max_logit = True
    model.train()
    model(x)
    attn = model.blocks[0].attn
    before = attn.max_logit.clone()
    assert torch.equal(before, causal_max_logit(taps[("q", 0)], taps[("k", 0)]))  # the same function, same q, k
    tau = float(before.median())
    wq_before = attn.q_proj.weight.clone()
    assert qk_clip(model, tau) >= 1
    assert torch.equal(attn.max_logit, torch.zeros(4))  # reset for the next step
    # layer 0's input is unchanged by the clip, so its new logits are exactly the old ones x gamma
    model(x)
    after = causal_max_logit(taps[("q", 0)], taps[("k", 0)])
    expected = torch.minimum(before, torch.full_like(before, tau))
    # the rescaled weights change every rounding: queries and keys are float32 sums of D = 32 products
    # (whose Σ|terms| random weights make about sqrt(D) times the sum), the logits of E = 8 (aligned q
    # and k for the largest one), and γ = tau / S, γ_q = γ / γ_k round once each; before and after
    rtol = 2 * (2 * 32 * math.sqrt(32) + 8 + 2) * U32
    assert torch.allclose(after, expected, rtol=rtol, atol=0)
    unclipped = before <= tau
    E = 8
    for h in range(4):
        if unclipped[h] and n_kv_head == 4:  # a head under tau keeps its weights
            assert torch.equal(attn.q_proj.weight[h * E : (h + 1) * E], wq_before[h * E : (h + 1) * E])
    for h in hooks:
        h.remove()
