"""Downstream evaluations against closed forms, hand-built cases and direct computations;
the lm-evaluation-harness adapter's pure functions against direct log-probabilities."""

import math
import sys
import types
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from _tolerances import U32
from torch import nn

from rankscope.core.model import GPT, ModelConfig, Tap
from rankscope.errors import RankscopeError
from rankscope.integrations import lm_eval as lm_eval_adapter
from rankscope.measure.functional_rank import functional_rank, rank_ladder
from rankscope.measure.icl import icl_score, icl_windows, loss_and_icl, per_position_loss
from rankscope.measure.induction import InductionScores, gpt_induction_scores, induction_batch, induction_loss
from rankscope.measure.sites import Site
from rankscope.measure.weight_spectra import weight_spectra
from rankscope.settings.vocab import LAYER_WIDE

CFG = ModelConfig(vocab_size=61, n_layer=2, d_model=32, n_head=4, n_kv_head=2, head_dim=8, d_mlp=64, max_seq_len=64)


def gpt(seed=0, qk_norm="learned", init_std=0.02, **kw):
    model = GPT(replace(CFG, qk_norm=qk_norm, init_std=init_std, **kw)).eval()
    model.reset_parameters(seed)
    return model


def batch(B=3, T=40, seed=0, V=61):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def table(rows):
    return {(r["site"], r["layer"], r["head"], r["metric"]): r["value"] for r in rows}


def no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# --- per-position loss and the in-context learning score ----------------------------------------


def test_per_position_loss_and_loss_and_icl_match_direct_cross_entropy():
    model = gpt()
    batches = [batch(3, 40, 0), batch(5, 40, 1)]  # unequal batch sizes: per-row average
    per_pos = per_position_loss(model, batches)
    with torch.no_grad():
        direct = torch.cat(
            [F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none").view(y.shape) for x, y in batches]
        ).mean(0)
    assert per_pos.shape == (40,)
    # the same token losses (the same logits, the same F.cross_entropy) summed over the R = 8 rows in
    # another grouping (3 + 5 rows, then both; /8 is exact): a sum of R non-negative terms in any order
    # is within (R - 1) u of itself, so the two are 2 (R - 1) u apart at most
    R, T = 8, 40
    torch.testing.assert_close(per_pos, direct, rtol=2 * (R - 1) * U32, atol=0)
    mean, icl = loss_and_icl(model, batches)
    # and then each side's mean of T = 40 non-negative values adds (T - 1) u
    assert mean == pytest.approx(direct.mean().item(), rel=2 * (R - 1 + T - 1) * U32)
    assert icl == icl_score(per_pos)  # the same per-position losses and the same two window means
    # equal batch sizes: the mean is the trainer's mean of per-batch losses
    same = [batch(4, 40, 2), batch(4, 40, 3)]
    with torch.no_grad():
        trainer = torch.stack([model(x, y) for x, y in same]).mean().item()
    # the same token losses averaged two ways: the trainer's mean of 4 x 40 = 160 per batch, then of 2
    # batches; here per position over 8 rows, then the mean of 40 positions. A sum of n non-negative
    # terms is within (n - 1) u of itself, and each division by a count not a power of 2 rounds once:
    # (159 + 1 + 1) u for the trainer's, (7 + 39 + 1) u for this one
    assert loss_and_icl(model, same)[0] == pytest.approx(trainer, rel=(161 + 47) * U32)


def test_icl_score_closed_form_windows():
    T = 160  # late: last 16 positions [144, 160); early: [10, 20)
    curve = 5.0 - 0.01 * torch.arange(T, dtype=torch.float32)
    assert icl_windows(T) == (slice(10, 20), slice(144, 160))
    # mean(5 - 0.01 t) over t in [144,160) minus over [10,20): -0.01 * (151.5 - 14.5)
    assert icl_score(curve) == pytest.approx(-0.01 * (151.5 - 14.5), abs=1e-5)
    assert icl_windows(128) == (slice(8, 16), slice(115, 128))
    assert icl_windows(2048) == (slice(128, 256), slice(1843, 2048))
    # short sequences: early falls back to position 1 (the first prediction with any context)
    assert icl_windows(10) == (slice(1, 2), slice(9, 10))
    assert icl_score([9.0, 4.0, 3.0, 2.0, 1.0]) == pytest.approx(1.0 - 4.0)
    assert icl_score([3.0, 2.0, 1.0]) == pytest.approx(1.0 - 2.0)
    with pytest.raises(ValueError):
        icl_score([1.0, 2.0])
    assert icl_score(torch.ones(64)) == 0.0


def test_loss_and_icl_casts_low_precision_logits_to_float32():
    logits = torch.randn(2, 32, 61)
    y = torch.randint(0, 61, (2, 32))
    mean, _ = loss_and_icl(lambda x: logits.bfloat16(), [(y, y)])
    direct = F.cross_entropy(logits.bfloat16().float().flatten(0, 1), y.flatten()).item()
    assert mean == pytest.approx(direct, rel=1e-6)


# --- induction ------------------------------------------------------------------------------------


def copier(V):
    """Hand-written perfect induction: all mass on the token that followed the most recent earlier
    occurrence of the current token; uniform where the token has not occurred before."""

    def logits_fn(x):
        B, T = x.shape
        out = torch.zeros(B, T, V)
        for b in range(B):
            last = {}
            for t in range(T):
                tok = int(x[b, t])
                if tok in last:
                    out[b, t, int(x[b, last[tok] + 1])] = 60.0
                last[tok] = t
        return out

    return logits_fn


def test_induction_batch_is_fixed_repeated_and_avoids_low_ids():
    x = induction_batch(61, 5, 20, seed=3, low=2)
    assert x.shape == (5, 40) and x.dtype == torch.long
    assert torch.equal(x[:, :20], x[:, 20:])
    assert x.min() >= 2 and x.max() < 61
    assert all(len(set(row[:20].tolist())) == 20 for row in x)  # distinct within a copy
    assert torch.equal(x, induction_batch(61, 5, 20, seed=3, low=2))  # same for every arm and eval
    assert not torch.equal(x, induction_batch(61, 5, 20, seed=4, low=2))
    assert induction_batch(10, 2, 30, low=1, distinct=False).shape == (2, 60)
    with pytest.raises(ValueError):
        induction_batch(10, 2, 30, low=1)  # 30 distinct ids from 9


def test_induction_loss_perfect_copier_and_uniform():
    V = 61
    x = induction_batch(V, 4, 24, seed=0)
    assert induction_loss(copier(V), x) == pytest.approx(0.0, abs=1e-6)
    assert induction_loss(lambda t: torch.zeros(*t.shape, V), x) == pytest.approx(math.log(V), rel=1e-6)
    with pytest.raises(ValueError):
        induction_loss(copier(V), torch.randint(0, V, (2, 20)))  # not a repeated batch


class RiggedAttention(nn.Module):
    """A tiny module tree with q/k taps fed hand-built activations (B, T, heads, E), T = E = 2L.
    Keys of kv head 0 are one-hot in their position; kv head 1's keys are zero. Query heads 0 and 1
    (which read kv head 0) point at key j + 1 for the query at L + j; heads 2 and 3 have zero
    queries. So heads 0, 1 attend exactly to the induction target and heads 2, 3 uniformly."""

    def __init__(self, L, B=2):
        super().__init__()
        self.layers = nn.ModuleList([nn.Module()])
        self.layers[0].q, self.layers[0].k = Tap(), Tap()
        T = 2 * L
        k = torch.zeros(B, T, 2, T)
        k[:, :, 0, :] = torch.eye(T)
        q = torch.zeros(B, T, 4, T)
        for j in range(L):
            q[:, L + j, 0:2, j + 1] = 1e4
        self.qv, self.kv = q, k

    def forward(self, x):
        self.layers[0].q(self.qv)
        self.layers[0].k(self.kv)
        return torch.zeros(*x.shape, 7)


def test_induction_score_is_one_for_a_rigged_head_and_harmonic_for_uniform_attention():
    L = 8
    rig = RiggedAttention(L)
    x = induction_batch(61, 2, L)
    rows = table(InductionScores(rig, Site("q", "layers.*.q"), Site("k", "layers.*.k"), L, query_chunk=3).measure(x))
    uniform = sum(1.0 / (L + j + 1) for j in range(L)) / L  # query L+j sees L+j+1 keys
    assert rows[("attn", 0, 0, "induction_score")] == pytest.approx(1.0, abs=1e-6)
    assert rows[("attn", 0, 1, "induction_score")] == pytest.approx(1.0, abs=1e-6)  # GQA: head 1 reads kv head 0
    for h in (2, 3):
        assert rows[("attn", 0, h, "induction_score")] == pytest.approx(uniform, rel=1e-6)
        assert rows[("attn", 0, h, "prev_token_score")] == pytest.approx(uniform, rel=1e-6)
    assert rows[("attn", 0, 0, "prev_token_score")] == pytest.approx(0.0, abs=1e-6)
    assert no_hooks(rig)


def capture(model, x, names):
    out, handles = {}, []
    for i, b in enumerate(model.blocks):
        for n in names:
            handles.append(
                getattr(b.attn, n).register_forward_hook(lambda m, a, o, key=(n, i): out.__setitem__(key, o.clone()))
            )
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return out


# CPU autocast feeds bf16 activations to the float32 QK-Norm gains, which torch.rms_norm warns about
bf16_warning = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")


def autocast(on):
    """CPU bf16 autocast stands in for the trainer's CUDA autocast: under it even float32 einsums
    return bf16, so this checks that the evaluations' own math stays in float32."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=on)


@bf16_warning
@pytest.mark.parametrize("bf16", [False, True])
def test_induction_scores_on_the_gpt_match_a_direct_softmax_and_leave_the_model_unchanged(bf16):
    model = gpt(seed=1, init_std=0.3)  # large weights: peaked, non-uniform attention
    L = 12
    x = induction_batch(61, 3, L, seed=1)
    with torch.no_grad(), autocast(bf16):
        before = model(x)
        scores = gpt_induction_scores(model, L, query_chunk=5)
        loss, rows = scores.measure_with_loss(x)
        rows = table(rows)
        assert no_hooks(model)
        assert torch.equal(model(x), before)
        # the same forward and the same token losses, and the same scores again: bitwise
        assert loss == induction_loss(model, x)
        assert table(scores.measure(x)) == rows
        acts = capture(model, x, ["q", "k"])
    acts = {key: a.float() for key, a in acts.items()}  # the direct softmax below runs in float32
    T = 2 * L
    B, E = x.shape[0], CFG.head_dim
    for layer in range(CFG.n_layer):
        q = acts[("q", layer)].transpose(1, 2)  # (B, H, T, E)
        k = acts[("k", layer)].transpose(1, 2).repeat_interleave(2, dim=1)
        future = torch.ones(T, T, dtype=torch.bool).triu(1)
        logits = (q @ k.mT / math.sqrt(CFG.head_dim)).masked_fill(future, float("-inf"))
        p = logits.softmax(-1)  # (B, H, T, T)
        j = torch.arange(L)
        ind = p[:, :, L + j, j + 1].mean((0, 2))
        prev = p[:, :, L + j, L + j - 1].mean((0, 2))
        # both sides read the same q and k (under bf16 autocast: the same bf16 values, made float32 on
        # both sides, so bf16 does not enter). Logits: float32 dot products of E terms in two orders,
        # scaled by a product there and a division here: 2 (E + 1) u of scale Σ|q_e k_e| apart; a
        # probability exp(l_t - lse) moves relatively by twice a logit's move, and each side rounds its
        # softmax ((T + 2) u: T exponentials summed, exp, division) and its mean over B L queries
        dlogit = 2 * (E + 1) * U32 * (q.abs() @ k.abs().mT).amax().item() / math.sqrt(E)
        rel = 2 * dlogit + 2 * (T + 2 + B * L) * U32
        for h in range(CFG.n_head):
            assert rows[("attn", layer, h, "induction_score")] == pytest.approx(ind[h].item(), rel=rel, abs=0)
            assert rows[("attn", layer, h, "prev_token_score")] == pytest.approx(prev[h].item(), rel=rel, abs=0)
    with pytest.raises(ValueError):
        scores.measure(induction_batch(61, 3, L + 1))  # wrong length


# --- functional rank ------------------------------------------------------------------------------


def test_rank_ladder():
    assert rank_ladder(64) == [1, 2, 4, 8, 16, 32, 64]
    assert rank_ladder(8) == [1, 2, 4, 8]
    assert rank_ladder(48) == [1, 2, 4, 8, 16, 32, 48]
    assert rank_ladder(1) == [1]


def test_functional_rank_rows_full_rank_changes_nothing_and_model_is_unchanged():
    model = gpt(seed=2, init_std=0.3)
    x, y = batch(2, 24, 5)
    with torch.no_grad():
        before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = functional_rank(model, x, y)
    t = table(rows)
    assert len(rows) == 2 * CFG.n_layer * (1 + 4)  # sites x layers x (functional_rank + 4 ladder rungs)
    for site in ("k", "q"):
        for layer in range(CFG.n_layer):
            assert t[(site, layer, LAYER_WIDE, "dloss_r8")] == pytest.approx(0.0, abs=1e-6)
            assert 1 <= t[(site, layer, LAYER_WIDE, "functional_rank")] <= CFG.head_dim
    assert any(abs(t[(s, l, LAYER_WIDE, "dloss_r1")]) > 1e-3 for s in ("k", "q") for l in range(2))  # it bites
    assert no_hooks(model)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_functional_rank_matches_a_direct_projected_forward():
    model = gpt(seed=3, init_std=0.3)
    x, y = batch(2, 24, 6)
    t = table(functional_rank(model, x, y, sites=("q",), ladder=[2, 8]))
    acts = capture(model, x, ["q"])
    with torch.no_grad():
        full = model(x, y).item()
    for layer in range(CFG.n_layer):
        # each head's Gram summed as functional_rank sums it (one float32 einsum over the N rows, then
        # float64), so the top-2 eigenvectors, the projection and the projected forward are its own to
        # the bit; its cached residual stream repeats the full forward op for op: dloss is exact
        a = acts[("q", layer)].float().flatten(0, 1)  # (N, H, E)
        g = torch.einsum("nhe,nhf->hef", a, a).double()  # (H, E, E)
        vecs = torch.linalg.eigh(g).eigenvectors[..., -2:]  # (H, E, 2)
        p = (vecs @ vecs.mT).float()
        hook = model.blocks[layer].attn.q.register_forward_hook(
            lambda m, i, o, p=p: torch.einsum("bthe,hef->bthf", o, p)
        )
        with torch.no_grad():
            projected = model(x, y).item()
        hook.remove()
        assert t[("q", layer, LAYER_WIDE, "dloss_r2")] == (projected - full) / full


@bf16_warning
@pytest.mark.parametrize("qk_norm,bf16", [("learned", False), ("none", False), ("learned", True)])
def test_exactly_rank_two_keys_have_functional_rank_at_most_two(qk_norm, bf16):
    """Keep only one RoPE pair of k_proj's output rows in each kv head (a different pair per head):
    RoPE rotates within that plane and QK-Norm only rescales it, so every head's keys (after both)
    span at most 2 dimensions, and a per-head rank-2 projection is exact. A projection shared by
    the heads would not be: their planes differ."""
    model = gpt(seed=4, qk_norm=qk_norm, init_std=0.3)
    E, half = CFG.head_dim, CFG.head_dim // 2
    with torch.no_grad():
        w = model.blocks[1].attn.k_proj.weight.view(CFG.n_kv_head, E, CFG.d_model)
        for g in range(CFG.n_kv_head):
            keep = torch.zeros(E, dtype=torch.bool)
            keep[[g, g + half]] = True
            w[g, ~keep] = 0.0
    x, y = batch(2, 24, 7)
    with autocast(bf16):
        acts = capture(model, x, ["k"])
        t = table(functional_rank(model, x, y, sites=("k",)))
    s = torch.linalg.svdvals(acts[("k", 1)].flatten(0, 1).transpose(0, 1).double())
    assert (s[:, 2:] < 1e-6 * s[:, :1]).all()  # the setup: rank-2 keys
    assert t[("k", 1, LAYER_WIDE, "functional_rank")] <= 2
    # exactly 0, in float32 or bf16: the keys lie on two coordinates of each head, so the float64
    # projector onto its top 2 (or all 8) eigenvectors is the identity there up to about 1e-16 (its
    # diagonal rounds to exactly 1.0 in float32) and zero elsewhere up to as much; x P moves no key by
    # more than 1e-16 of its norm, some 1e-9 of a float32 rounding (let alone a bf16 one), so the
    # projected forward rounds exactly as the plain one: the same ops on the same numbers
    assert t[("k", 1, LAYER_WIDE, "dloss_r2")] == 0.0
    assert t[("k", 1, LAYER_WIDE, "dloss_r8")] == 0.0
    assert abs(t[("k", 1, LAYER_WIDE, "dloss_r1")]) > 1e-4  # rank 1 is not enough


def test_functional_rank_rejects_bad_arguments():
    model = gpt()
    x, y = batch(1, 8)
    with pytest.raises(ValueError):
        functional_rank(model, x, y, ladder=[0, 4])
    with pytest.raises(ValueError):
        functional_rank(model, x, y, ladder=[16])
    for site in ("keys", "k_proj"):  # only the taps, whose outputs are (B, T, heads, E)
        with pytest.raises(ValueError):
            functional_rank(model, x, y, sites=(site,))


# --- weight spectra -------------------------------------------------------------------------------


def test_weight_spectra_match_svdvals_of_the_head_slices():
    model = gpt(seed=5)
    E = CFG.head_dim
    with torch.no_grad():  # a closed form: head 2 of layer 1's W_Q = 3 x orthonormal rows
        q = torch.linalg.qr(torch.randn(CFG.d_model, E, dtype=torch.float64)).Q.T
        model.blocks[1].attn.q_proj.weight[2 * E : 3 * E] = (3.0 * q).float()
    t = table(weight_spectra(model))
    for layer, block in enumerate(model.blocks):
        for site, w, heads in (
            ("w_q", block.attn.q_proj.weight, CFG.n_head),
            ("w_k", block.attn.k_proj.weight, CFG.n_kv_head),
        ):
            for h in range(heads):
                s = torch.linalg.svdvals(w[h * E : (h + 1) * E].double())
                assert t[(site, layer, h, "pr_sv")] == pytest.approx((s.sum() ** 2 / (s**2).sum()).item(), rel=1e-9)
                sr = (s**2).sum() / s[0] ** 2
                assert t[(site, layer, h, "stable_rank")] == pytest.approx(sr.item(), rel=1e-9)
                assert t[(site, layer, h, "spectral_norm")] == pytest.approx(s[0].item(), rel=1e-9)
            assert (site, layer, heads, "pr_sv") not in t
    assert t[("w_q", 1, 2, "pr_sv")] == pytest.approx(E, rel=1e-5)
    assert t[("w_q", 1, 2, "stable_rank")] == pytest.approx(E, rel=1e-5)
    assert t[("w_q", 1, 2, "spectral_norm")] == pytest.approx(3.0, rel=1e-6)


# --- lm-evaluation-harness adapter ----------------------------------------------------------------

TEXTS = [
    "def add(x, y):\n    return x + y\n\n",
    "The quick brown fox jumps over the lazy dog. " * 4,
    "import os\nimport sys\nprint(os.getcwd())\n",
]


@pytest.fixture(scope="module")
def tok():
    from rankscope.data.tokenizer import train_tokenizer

    return train_tokenizer(TEXTS, 300)


@pytest.fixture(scope="module")
def lm():
    model = GPT(replace(CFG, vocab_size=300, max_seq_len=24, init_std=0.2)).eval()
    model.reset_parameters(6)
    return model


def direct_logprobs(model, ids):
    """log p(ids[t+1] | ids[:t+1]) for t = 0..len-2 from one plain forward."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].float(), -1)
    return logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0], logp.argmax(-1)


def test_loglikelihood_matches_direct_log_probabilities(tok, lm):
    requests = [
        ("The quick brown", " fox"),
        ("def add(x, y):", "\n    return"),
        ("", "import os"),
        ("import os\nimport sys\nprint(os.getcwd())\n" * 2, " x"),  # longer than 24: left-truncated
        ("a dog ", "jumps"),
    ]  # trailing space moves to the continuation
    pairs = lm_eval_adapter.encode_pairs(tok, requests)
    assert pairs[2][0] == [0]  # empty context: the document separator
    assert pairs[4][1][0] == tok.encode(" jumps").ids[0]
    got = lm_eval_adapter.loglikelihood(lm, tok, requests, batch_size=2)
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        ids = (ctx + cont)[-(24 + 1) :]
        lps, argmax = direct_logprobs(lm, ids)
        m = len(cont)
        assert lp == pytest.approx(lps[-m:].sum().item(), rel=1e-5)
        assert greedy == bool((argmax[-m:] == torch.tensor(cont)).all())
    assert len(pairs[3][0]) + len(pairs[3][1]) > 25  # the truncation was exercised


def test_loglikelihood_tokens_flags_the_greedy_continuation(lm):
    ctx = [5, 17, 42, 99]
    cont = []
    for _ in range(3):  # the model's own greedy continuation
        with torch.no_grad():
            cont.append(int(lm(torch.tensor([ctx + cont]))[0, -1].argmax()))
    (lp, greedy), (lp2, greedy2), (lp0, greedy0) = lm_eval_adapter.loglikelihood_tokens(
        lm, [(ctx, cont), (ctx, cont[:2] + [(cont[2] + 1) % 300]), (ctx, [])]
    )
    assert greedy and not greedy2 and lp > lp2
    assert (lp0, greedy0) == (0.0, True)
    with pytest.raises(ValueError):
        lm_eval_adapter.loglikelihood_tokens(lm, [(ctx, list(range(30)))])  # longer than the context


def test_rolling_windows_follow_the_harness_example():
    # lm_eval's LM.loglikelihood_rolling docstring: tokens 0..9, prefix BOS, context 4
    B = -1
    assert lm_eval_adapter.rolling_windows(list(range(10)), B, 4) == [
        ([B, 0, 1, 2], [0, 1, 2, 3]),
        ([3, 4, 5, 6], [4, 5, 6, 7]),
        ([5, 6, 7, 8], [8, 9]),
    ]
    assert lm_eval_adapter.rolling_windows([], B, 4) == []


def test_loglikelihood_rolling_matches_direct_windows(tok, lm):
    short, long = "import os\n", TEXTS[1] + TEXTS[2]
    got = lm_eval_adapter.loglikelihood_rolling(lm, tok, [short, long, ""], batch_size=3)
    ids = tok.encode(short).ids
    assert got[0] == pytest.approx(direct_logprobs(lm, [0] + ids)[0].sum().item(), rel=1e-5)
    ids = tok.encode(long).ids
    assert len(ids) > 2 * 24 and len(ids) % 24  # three windows, the last one partly scored
    expected = 0.0
    for s in range(0, len(ids), 24):  # each chunk predicted from the 24 tokens before its end
        e = min(s + 24, len(ids))
        window = ([0] + ids)[max(0, e - 24) : e + 1]
        expected += direct_logprobs(lm, window)[0][-(e - s) :].sum().item()
    assert got[1] == pytest.approx(expected, rel=1e-5)
    assert got[2] == 0.0


def test_greedy_until_matches_a_direct_greedy_loop_and_stops(tok, lm):
    ctx = tok.encode("The quick").ids
    ids = list(ctx)
    for _ in range(8):
        with torch.no_grad():
            nxt = int(lm(torch.tensor([ids[-24:]]))[0, -1].argmax())
        if nxt == 0:
            break
        ids.append(nxt)
    full = tok.decode(ids[len(ctx) :])
    assert lm_eval_adapter.greedy_until(lm, tok, "The quick", max_gen_toks=8) == full
    if len(full) >= 4:
        stop = full[2:4]
        assert lm_eval_adapter.greedy_until(lm, tok, "The quick", until=[stop], max_gen_toks=8) == full.split(stop)[0]


def test_missing_lm_eval_is_a_clear_rankscope_error(monkeypatch, tok, lm):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail even where installed
    monkeypatch.setattr(lm_eval_adapter, "_LM_CLASS", None)
    with pytest.raises(RankscopeError, match=r"pip install 'rankscope\[lm-eval\]'"):
        lm_eval_adapter.evaluate(lm, tok, ["lambada_openai"])
    with pytest.raises(RankscopeError, match="lm_eval"):
        getattr(lm_eval_adapter, "RankscopeLM")  # noqa: B009  (the attribute access is what raises)
    with pytest.raises(ImportError):
        from rankscope.integrations.lm_eval import RankscopeLM  # noqa: F401


def test_rankscope_lm_routes_instances_to_the_pure_functions(monkeypatch, tok, lm):
    """With a stand-in lm_eval (its LM base class and simple_evaluate), RankscopeLM reads
    Instance.args as the harness passes them and answers with the pure functions' results."""
    root, api, model_mod = (types.ModuleType(n) for n in ("lm_eval", "lm_eval.api", "lm_eval.api.model"))

    class LM:
        def __init__(self):
            self._rank, self._world_size = 0, 1

    model_mod.LM = LM
    calls = {}

    def simple_evaluate(model, tasks, **kw):
        req = lambda *args: types.SimpleNamespace(args=args)  # noqa: E731
        calls["ll"] = model.loglikelihood([req("The quick brown", " fox")])
        calls["roll"] = model.loglikelihood_rolling([req("import os\n")])
        calls["gen"] = model.generate_until([req("The quick", {"until": ["\n"], "max_gen_toks": 3})])
        return {"results": {t: {} for t in tasks}, "kw": kw}

    root.simple_evaluate, root.api, api.model = simple_evaluate, api, model_mod
    for name, mod in (("lm_eval", root), ("lm_eval.api", api), ("lm_eval.api.model", model_mod)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(lm_eval_adapter, "_LM_CLASS", None)
    lm.train()
    out = lm_eval_adapter.evaluate(lm, tok, ["t"], batch_size=4, limit=5)
    assert lm.training  # mode restored
    assert out["kw"] == {"limit": 5} and "t" in out["results"]
    assert calls["ll"] == lm_eval_adapter.loglikelihood(lm.eval(), tok, [("The quick brown", " fox")])
    assert calls["roll"] == lm_eval_adapter.loglikelihood_rolling(lm, tok, ["import os\n"])
    assert calls["gen"] == [lm_eval_adapter.greedy_until(lm, tok, "The quick", ["\n"], 3)]
    assert issubclass(lm_eval_adapter.RankscopeLM, LM)
