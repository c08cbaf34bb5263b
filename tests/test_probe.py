"""Probes: rows equal a direct computation from captured activations; the model is unchanged."""

import math
from dataclasses import replace

import pytest
import torch
from _tolerances import U32, gram_rtol

from rankscope.core.model import GPT, ModelConfig
from rankscope.measure.metrics import effective_rank, gram, participation_ratio, r90, stable_rank
from rankscope.measure.probe import AttentionStats, GramProbe, gain_stats, gpt_probe
from rankscope.measure.sites import Site, gpt_sites
from rankscope.settings.vocab import LAYER_WIDE, METRICS

CFG = ModelConfig(vocab_size=61, n_layer=3, d_model=32, n_head=4, n_kv_head=2, head_dim=8, d_mlp=64, max_seq_len=32)


def model_and_batch(qk_norm="learned", seed=0):
    model = GPT(replace(CFG, qk_norm=qk_norm)).eval()
    model.reset_parameters(seed)
    with torch.no_grad():  # non-trivial gains, so gain statistics are not all ones
        for b in model.blocks:
            if b.attn.q_norm is not None and b.attn.q_norm.weight is not None:
                b.attn.q_norm.weight.uniform_(0.05, 2.0)
                b.attn.k_norm.weight.uniform_(0.05, 2.0)
    x = torch.randint(0, 61, (3, 20), generator=torch.Generator().manual_seed(seed))
    return model, x


def capture(model, x, names):
    """Activations of every tap, captured directly: {(name, layer): (B, T, heads, E)}."""
    out, handles = {}, []
    for i, b in enumerate(model.blocks):
        for n in names:
            handles.append(
                getattr(b.attn, n).register_forward_hook(lambda m, a, o, k=(n, i): out.__setitem__(k, o.clone()))
            )
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return out


def table(rows):
    return {(r["site"], r["layer"], r["head"], r["metric"]): r["value"] for r in rows}


def test_spectral_rows_equal_direct_computation():
    model, x = model_and_batch()
    sites = ["q_pre", "q", "k_pre", "k", "v", "o"]
    rows = table(gpt_probe(model, sites, attention=False).measure([x]))
    acts = capture(model, x, sites)
    rtol = gram_rtol(a.flatten(0, 1).transpose(0, 1) for a in acts.values())  # 2e-4 here; measured 1e-7
    direct = {
        "pr_sv": participation_ratio,
        "erank": effective_rank,
        "stable_rank": stable_rank,
        "r90": r90,
        "pr_eig": lambda a: participation_ratio(a, kind="eig"),
    }
    for (site, layer), a in acts.items():
        per_head = a.flatten(0, 1).transpose(0, 1)  # (heads, N, E)
        assert per_head.shape[0] == (2 if site in ("k_pre", "k", "v") else 4)
        share = (ev := torch.linalg.eigvalsh(gram(per_head)).flip(-1)).cumsum(-1) / ev.sum(-1, keepdim=True)
        for metric, f in direct.items():
            expected = f(per_head)
            for head in range(per_head.shape[0]):
                if metric == "r90":  # a count: equal unless a cumulative share of eigenvalues lies within
                    # their round-off of 90% (each moves by sqrt(N) U32 λ_max, E of them, over Σ λ >= λ_max)
                    n, e = per_head.shape[-2:]
                    assert (share[head] - 0.9).abs().min() > 2 * e * math.sqrt(n) * U32
                    assert rows[(site, layer, head, metric)] == expected[head].item()
                else:
                    assert rows[(site, layer, head, metric)] == pytest.approx(expected[head].item(), rel=rtol)
    assert len([k for k in rows if k[3] in METRICS]) == sum(
        (2 if s in ("k_pre", "k", "v") else 4) for s in sites
    ) * 3 * len(METRICS)


def test_batches_accumulate_like_one_concatenated_batch():
    model, x = model_and_batch()
    probe = gpt_probe(model, ["k"], attention=True)
    split = table(probe.measure([x[:1], x[1:]]))
    whole = table(probe.measure([x]))
    assert split.keys() == whole.keys()
    # Grams summed per batch (float64 across batches) against one float32 sum: `gram_rtol`; the
    # attention rows are sums of per-query values in another grouping, within a few U32 of them
    acts = capture(model, x, ["k"])
    rtol = gram_rtol(a.flatten(0, 1).transpose(0, 1) for a in acts.values())
    for k in whole:
        assert split[k] == pytest.approx(whole[k], rel=rtol), k


def test_probe_never_changes_the_model():
    model, x = model_and_batch()
    with torch.no_grad():
        before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gpt_probe(model, ["q_pre", "q", "k_pre", "k", "v", "o"]).measure([x])
    with torch.no_grad():
        after = model(x)
    assert torch.equal(before, after)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed


def test_attention_entropy_and_max_logit_against_direct_softmax():
    model, x = model_and_batch(seed=2)
    rows = table(GramProbe(model, [], AttentionStats(*gpt_sites(["q", "k"]), query_chunk=7)).measure([x]))
    acts = capture(model, x, ["q", "k"])
    T = x.shape[1]
    for layer in range(3):
        q = acts[("q", layer)].transpose(1, 2)  # (B, H, T, E)
        k = acts[("k", layer)].transpose(1, 2).repeat_interleave(2, dim=1)
        logits = q @ k.mT / math.sqrt(8)
        logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        p = logits.softmax(-1)
        ent = -(p * p.clamp_min(1e-30).log()).sum(-1).mean((0, 2))
        mx = logits.amax((0, 2, 3))
        # the probe's logits come in query chunks of 7, the reference's in one matmul: each is a
        # float32 dot product of E = 8 terms, off by at most E U32 |q||k| <= 5e-7 of the largest
        # logit in another summation order; the entropy moves by at most log T times a logit's
        # move. rel 1e-5 is 5x the larger of these bounds (log 20 x 5e-7 = 1.5e-6 on entropies > 0.3)
        for h in range(4):
            assert rows[("attn", layer, h, "entropy")] == pytest.approx(ent[h].item(), rel=1e-5)
            assert rows[("attn", layer, h, "max_logit")] == pytest.approx(mx[h].item(), rel=1e-5)
        # the first query sees one key: entropy is bounded by log(T) on average
        assert 0 < ent.max().item() < math.log(T)


def test_gain_rows_and_closed_form_stats():
    model, x = model_and_batch()
    rows = table(gpt_probe(model, ["k"]).measure([x]))
    w = model.blocks[1].attn.k_norm.weight.detach().double()
    assert rows[("k_gain", 1, LAYER_WIDE, "gain_mean")] == pytest.approx(w.mean().item())
    assert rows[("k_gain", 1, LAYER_WIDE, "gain_cv")] == pytest.approx((w.std(unbiased=False) / w.mean()).item())
    assert gain_stats(torch.tensor([0.0, 0.05, 1.0, 2.0])) == pytest.approx(
        {
            "gain_mean": 0.7625,
            "gain_cv": torch.tensor([0.0, 0.05, 1.0, 2.0]).std(unbiased=False).item() / 0.7625,
            "gain_near_zero": 0.5,
        }
    )
    none_rows = table(gpt_probe(model_and_batch("none")[0], ["k"]).measure([x]))
    assert not any(k[0].endswith("_gain") for k in none_rows)
    pf_rows = table(gpt_probe(model_and_batch("parameter_free")[0], ["k"]).measure([x]))
    assert not any(k[0].endswith("_gain") for k in pf_rows)


def test_layouts_agree_for_a_model_described_by_patterns():
    """The same activations read through 'BTHE', 'BHTE' and flattened 'BTC' give the same rows."""

    class Wrapper(torch.nn.Module):  # another model's module tree: layers.<i>.keys emitting (B, T, heads*E)
        def __init__(self, layout):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Identity() for _ in range(2))
            self.layout = layout

        def forward(self, x):  # x: (L, B, T, H, E)
            for i, layer in enumerate(self.layers):
                a = x[i]
                layer(a if self.layout == "BTHE" else a.transpose(1, 2) if self.layout == "BHTE" else a.flatten(2))

    x = torch.randn(2, 3, 10, 4, 8, generator=torch.Generator().manual_seed(0))
    results = []
    for layout in ("BTHE", "BHTE", "BTC"):
        probe = GramProbe(Wrapper(layout), [Site("k", "layers.*", layout, head_dim=8)])
        results.append(table(probe.measure([x], forward=probe.model)))
    assert results[0].keys() == results[1].keys() == results[2].keys()
    # the same numbers through views: equal today, but an einsum may sum a transposed view in
    # another order (`gram_rtol`)
    rtol = gram_rtol(x[i].flatten(0, 1).transpose(0, 1) for i in range(2))
    for k in results[0]:
        assert results[0][k] == pytest.approx(results[1][k], rel=rtol) == pytest.approx(results[2][k], rel=rtol)


def test_bad_pattern_fails_at_construction():
    model, _ = model_and_batch()
    with pytest.raises(ValueError, match="no module matches"):
        GramProbe(model, [Site("k", "blocks.*.nothing")])


# --- a module that runs more than once in one forward pass -----------------------------------------


class Rotary(torch.nn.Module):
    """RoPE as a module of its own, as the seed's attention has it."""

    def __init__(self, head_dim, max_len=32):
        super().__init__()
        from rankscope.core.model import rope_tables

        cos, sin = rope_tables(max_len, head_dim, 10000.0)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)

    def forward(self, x):  # (B, T, heads, E)
        from rankscope.core.model import apply_rope

        T = x.shape[1]
        return apply_rope(x, self.cos[:T], self.sin[:T])


class RotaryModel(torch.nn.Module):
    """Token ids -> layers of q/k projections and causal attention. shared=True: one `rotary` module
    per layer turns the queries and then the keys (two calls per forward pass, like the seed's
    model); shared=False: `rotary_q` and `rotary_k`, one call each. Same weights for the same seed."""

    def __init__(self, n_head=4, n_kv_head=4, shared=True, seed=0, n_layer=2, E=8, D=32, V=61):
        super().__init__()
        torch.manual_seed(seed)
        self.E, self.H, self.G, self.shared = E, n_head, n_kv_head, shared
        self.embed = torch.nn.Embedding(V, D)
        self.layers = torch.nn.ModuleList()
        for _ in range(n_layer):
            layer = torch.nn.Module()
            layer.q_proj = torch.nn.Linear(D, n_head * E, bias=False)
            layer.k_proj = torch.nn.Linear(D, n_kv_head * E, bias=False)
            if shared:
                layer.rotary = Rotary(E)
            else:
                layer.rotary_q, layer.rotary_k = Rotary(E), Rotary(E)
            self.layers.append(layer)

    def forward(self, idx):
        h = self.embed(idx)
        B, T, _ = h.shape
        for layer in self.layers:
            q = layer.q_proj(h).view(B, T, self.H, self.E)
            k = layer.k_proj(h).view(B, T, self.G, self.E)
            q = (layer.rotary if self.shared else layer.rotary_q)(q)
            k = (layer.rotary if self.shared else layer.rotary_k)(k)
            a = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2), is_causal=True, enable_gqa=self.G != self.H
            )
            h = h + a.transpose(1, 2).flatten(2).repeat(1, 1, h.shape[-1] // (self.H * self.E))
        return h


def ids(seed=0, B=3, T=16):
    return torch.randint(1, 61, (B, T), generator=torch.Generator().manual_seed(seed))


def test_a_site_on_a_module_that_runs_twice_is_refused_not_summed():
    """Same head counts: q and k through one rotary would silently add up into one Gram matrix."""
    from rankscope.errors import RankscopeError

    probe = GramProbe(RotaryModel(4, 4), [Site("k", "layers.*.rotary")])
    with pytest.raises(RankscopeError) as e:
        probe.measure([ids()])
    msg = str(e.value)
    assert "\n" not in msg
    assert "site 'k' reads layers.0.rotary, which ran 2 times in one forward pass" in msg
    assert "(shapes (3, 16, 4, 8), (3, 16, 4, 8); so did 1 other module)" in msg  # layer 1 too
    assert "Site(..., call=i)" in msg and "transform" in msg
    assert all(not m._forward_hooks for m in probe.model.modules())  # hooks removed after the error


def test_a_module_that_runs_twice_with_other_head_counts_fails_clearly():
    """Different head counts (grouped-query keys) used to fail with a tensor-size error inside the hook."""
    from rankscope.errors import RankscopeError

    model = RotaryModel(4, 2)
    for probe in (
        GramProbe(model, [Site("k", "layers.*.rotary")]),
        GramProbe(model, [], AttentionStats(Site("q", "layers.*.rotary"), Site("k", "layers.*.rotary"))),
    ):
        with pytest.raises(
            RankscopeError, match=r"ran 2 times in one forward pass \(shapes \(3, 16, 4, 8\), \(3, 16, 2, 8\);"
        ):
            probe.measure([ids()])


@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
def test_an_explicit_call_reads_exactly_what_a_single_call_module_reads(heads):
    shared, single = RotaryModel(*heads, shared=True), RotaryModel(*heads, shared=False)
    batches = [ids(0), ids(1, B=2)]  # several forward passes: calls are counted per pass
    a = table(
        GramProbe(
            shared,
            [Site("q", "layers.*.rotary", call=0), Site("k", "layers.*.rotary", call=1)],
            AttentionStats(Site("q", "layers.*.rotary", call=0), Site("k", "layers.*.rotary", call=1)),
        ).measure(batches)
    )
    b = table(
        GramProbe(
            single,
            [Site("q", "layers.*.rotary_q"), Site("k", "layers.*.rotary_k")],
            AttentionStats(Site("q", "layers.*.rotary_q"), Site("k", "layers.*.rotary_k")),
        ).measure(batches)
    )
    assert a == b  # the same tensors, the same arithmetic: equal to the last bit
    assert {k[0] for k in a} == {"q", "k", "attn"}
    assert len([k for k in a if k[0] == "k"]) == 2 * heads[1] * len(METRICS)


def test_a_call_index_past_the_last_call_fails_clearly():
    from rankscope.errors import RankscopeError

    probe = GramProbe(RotaryModel(4, 2), [Site("k", "layers.*.rotary", call=2)])
    with pytest.raises(
        RankscopeError, match=r"reads call 2 \(0-based\) of layers.0.rotary, but it ran 2 times.*call=1 or less"
    ):
        probe.measure([ids()])
    with pytest.raises(ValueError, match="call must be None or a call index"):
        Site("k", "layers.*.rotary", call=-1)


def test_induction_scores_read_one_call_of_a_module_that_runs_twice():
    from rankscope.errors import RankscopeError
    from rankscope.measure.induction import InductionScores, induction_batch

    x = induction_batch(61, 3, 8, seed=1)
    shared, single = RotaryModel(4, 2, shared=True), RotaryModel(4, 2, shared=False)
    with pytest.raises(RankscopeError, match="induction q site 'q' reads layers.0.rotary, which ran 2 times"):
        InductionScores(shared, Site("q", "layers.*.rotary"), Site("k", "layers.*.rotary"), half_len=8).measure(x)
    a = InductionScores(shared, Site("q", "layers.*.rotary", call=0), Site("k", "layers.*.rotary", call=1), 8)
    b = InductionScores(single, Site("q", "layers.*.rotary_q"), Site("k", "layers.*.rotary_k"), 8)
    assert table(a.measure(x)) == table(b.measure(x))
