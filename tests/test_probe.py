"""Probes: rows equal a direct computation from captured activations; the model is unchanged."""

import math
from dataclasses import replace

import pytest
import torch

from rankscope.metrics import METRICS, effective_rank, participation_ratio, r90, stable_rank
from rankscope.model import GPT, ModelConfig
from rankscope.probe import LAYER_WIDE, AttentionStats, GramProbe, Site, gain_stats, gpt_probe, gpt_sites

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
        for metric, f in direct.items():
            expected = f(per_head)
            for head in range(per_head.shape[0]):
                assert rows[(site, layer, head, metric)] == pytest.approx(expected[head].item(), rel=1e-4, abs=1e-6)
    assert len([k for k in rows if k[3] in METRICS]) == sum(
        (2 if s in ("k_pre", "k", "v") else 4) for s in sites
    ) * 3 * len(METRICS)


def test_batches_accumulate_like_one_concatenated_batch():
    model, x = model_and_batch()
    probe = gpt_probe(model, ["k"], attention=True)
    split = table(probe.measure([x[:1], x[1:]]))
    whole = table(probe.measure([x]))
    assert split.keys() == whole.keys()
    for k in whole:
        assert split[k] == pytest.approx(whole[k], rel=1e-4, abs=1e-6), k


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

    x = torch.randn(2, 3, 10, 4, 8)
    results = []
    for layout in ("BTHE", "BHTE", "BTC"):
        probe = GramProbe(Wrapper(layout), [Site("k", "layers.*", layout, head_dim=8)])
        results.append(table(probe.measure([x], forward=probe.model)))
    assert results[0].keys() == results[1].keys() == results[2].keys()
    for k in results[0]:
        assert results[0][k] == pytest.approx(results[1][k], rel=1e-6) == pytest.approx(results[2][k], rel=1e-6)


def test_bad_pattern_fails_at_construction():
    model, _ = model_and_batch()
    with pytest.raises(ValueError, match="no module matches"):
        GramProbe(model, [Site("k", "blocks.*.nothing")])
