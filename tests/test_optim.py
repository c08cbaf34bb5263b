"""Optimizer groups by role: coverage, Muon only on 2D hidden matrices; schedules in closed form."""

import math
from dataclasses import replace

import pytest
import torch

from rankscope.core.model import GPT, ModelConfig
from rankscope.core.optim import BlockMuon, _balanced_owners, build_optimizers, lr_scale
from rankscope.settings.config import OptimConfig

SMALL = ModelConfig(vocab_size=64, n_layer=3, d_model=32, n_head=4, n_kv_head=2, head_dim=8, d_mlp=64, max_seq_len=16)


@pytest.mark.parametrize("qk_norm", ["learned", "frozen", "parameter_free", "none"])
@pytest.mark.parametrize("name", ["muon", "adamw"])
def test_every_trainable_parameter_in_exactly_one_group(qk_norm, name):
    model = GPT(replace(SMALL, qk_norm=qk_norm))
    built = build_optimizers(model, OptimConfig(name=name))
    opts, counts = built.optimizers, built.counts
    grouped = [p for o in opts for g in o.param_groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len({id(p) for p in grouped}) == len(trainable)
    assert sum(counts.values()) == sum(p.numel() for p in trainable)
    # per layer: q, k, v, o, up, down
    assert counts["matrix"] == sum(p.numel() for b in model.blocks for p in b.parameters() if p.ndim == 2)
    assert counts["embedding"] == 64 * 32
    n_gains = 2 * 3 + 1 + (6 if qk_norm == "learned" else 0)
    assert sum(1 for o in opts for g in o.param_groups if g["role"] == "gain" for _ in g["params"]) == n_gains
    muon = [o for o in opts if isinstance(o, (torch.optim.Muon, BlockMuon))]
    if name == "muon":
        assert len(muon) == 1
        groups = muon[0].param_groups
        assert all(p.ndim == 2 for g in groups for p in g["params"])
        assert sum(len(g["params"]) for g in groups) == 6 * 3
        # the seed's grouping by default: per layer one stacked Q, K, V, O group, then up and down
        assert [g["layout"] for g in groups] == ["stack", "each", "each"] * 3
        assert [len(g["params"]) for g in groups] == [4, 1, 1] * 3
        assert groups[0]["params"] == list(model.attention_matrices()[0])
    else:
        assert not muon


def test_seed_defaults():
    """The seed's 20M-token study (research/muon_production_20m.py, configs/llm_config.py at 772cf07)."""
    c = OptimConfig()
    assert (c.muon_lr, c.muon_momentum, c.muon_nesterov, c.muon_ns_steps) == (0.012, 0.95, True, 5)
    assert (c.muon_qkvo, c.muon_ns, c.muon_weight_decay) == ("stacked", "polar_express", 0.0)
    assert (c.adamw_lr, c.adamw_beta1, c.adamw_beta2, c.adamw_eps) == (0.006, 0.9, 0.999, 1e-8)
    assert (c.adamw_weight_decay, c.adamw_gain_weight_decay) == (0.2, 0.2)
    assert (c.grad_clip, c.schedule, c.warmup_tokens) == (0.0, "constant", 0)


def test_schedules_closed_form():
    c = OptimConfig(schedule="cosine", warmup_tokens=100, min_lr_ratio=0.1)
    assert lr_scale(0, 1100, c) == pytest.approx(1 / 100)
    assert lr_scale(99, 1100, c) == pytest.approx(1.0)
    assert lr_scale(100, 1100, c) == pytest.approx(1.0)
    assert lr_scale(600, 1100, c) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos(pi/2) = 0
    assert lr_scale(1100, 1100, c) == pytest.approx(0.1)
    lin = replace(c, schedule="linear")
    assert lr_scale(350, 1100, lin) == pytest.approx(0.1 + 0.9 * 0.75)
    assert lr_scale(10**6, 1100, OptimConfig()) == 1.0  # the seed's constant LR


def test_set_lr_scales_every_group_from_its_base():
    built = build_optimizers(GPT(SMALL), OptimConfig())
    built.set_lr(0.5)
    opts = built.optimizers
    for o in opts:
        for g in o.param_groups:
            assert g["lr"] == pytest.approx(0.5 * g["initial_lr"])
    muon = next(o for o in opts if isinstance(o, BlockMuon))
    assert muon.param_groups[0]["lr"] == pytest.approx(0.006)


def test_frozen_gain_never_changes():
    model = GPT(replace(SMALL, qk_norm="frozen"))
    opts = build_optimizers(model, OptimConfig())
    x = torch.randint(0, 64, (2, 8))
    for _ in range(3):
        model(x, x).backward()
        opts.step()
        opts.zero_grad()
    assert torch.equal(model.blocks[0].attn.k_norm.weight, torch.ones(8))
    assert not math.isnan(model(x, x).item())


def test_muon_shards_partition_the_matrices_and_balance_them():
    model = GPT(SMALL)
    matrices = [p for _, p in model.param_roles()["matrix"]]
    for world in (1, 2, 3, 5):
        owners = _balanced_owners([p.numel() for p in matrices], world)
        assert len(owners) == len(matrices) and set(owners) <= set(range(world))
        load = [sum(p.numel() for p, o in zip(matrices, owners) if o == r) for r in range(world)]
        assert max(load) - min(load) <= max(p.numel() for p in matrices)  # greedy bound
    # every rank builds the same partition; rank r's Muon holds exactly its share, and a stacked
    # layer's Q, K, V and O always belong to one rank together
    for grouping in ("stacked", "separate", "per_head"):
        shares = []
        for rank in range(3):
            built = build_optimizers(model, OptimConfig(muon_qkvo=grouping), rank=rank, world_size=3)
            muon = [o for o in built.optimizers if isinstance(o, (torch.optim.Muon, BlockMuon))]
            shares.append({id(p) for o in muon for g in o.param_groups for p in g["params"]})
            assert built.world_size == 3
            assert {id(p) for ps in built.shards for p in ps} == {id(p) for p in matrices}
        assert set().union(*shares) == {id(p) for p in matrices}
        assert sum(len(s) for s in shares) == len(matrices)
        for qkvo in model.attention_matrices():
            owners = {r for r, share in enumerate(shares) for p in qkvo if id(p) in share}
            assert len(owners) == 1 or grouping != "stacked"


def test_optimizer_state_round_trips():
    model = GPT(SMALL)
    built = build_optimizers(model, OptimConfig())
    x = torch.randint(0, 64, (2, 8))
    model(x, x).backward()
    built.step()
    other = build_optimizers(model, OptimConfig())
    other.load_state_dict(built.state_dict())
    a, b = built.state_dict(), other.state_dict()
    for sa, sb in zip(a["optimizers"], b["optimizers"]):
        for k in sa["state"]:
            for name, v in sa["state"][k].items():
                assert torch.equal(v, sb["state"][k][name])
    with pytest.raises(ValueError, match="processes"):
        other.load_state_dict(dict(a, world_size=2))
