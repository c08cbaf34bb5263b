"""The geometry of the update W_K receives, against the update recomputed independently."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _muon import LR, MHA, SMALL, random_grads, seed_polar_express
from _runs import config, shards

from rankscope.core.model import GPT
from rankscope.core.optim import build_optimizers
from rankscope.measure.update_geometry import UpdateGeometry, k_part
from rankscope.run.train import train
from rankscope.settings.config import OptimConfig
from rankscope.storage import store


def one_step(cfg_model, optim: OptimConfig):
    """One optimizer step on random gradients, measured; returns (rows, weights before, grads)."""
    torch.manual_seed(0)
    model = GPT(cfg_model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = random_grads(model, steps=1)[0]
    geometry = UpdateGeometry(model, cfg_model.head_dim, k_part(optim))
    opt = build_optimizers(model, optim)
    for n, p in model.named_parameters():
        p.grad = grads[n].clone() if n in grads else None
    geometry.before_step()
    opt.step()
    return geometry.measure(), before, grads


def value(rows, layer, head, metric):
    (v,) = [r["value"] for r in rows if (r["layer"], r["head"], r["metric"]) == (layer, head, metric)]
    return v


def pr_and_stable_rank(x: np.ndarray) -> tuple[float, float]:
    s = np.linalg.svd(x, compute_uv=False)
    return s.sum() ** 2 / (s**2).sum(), (s**2).sum() / s[0] ** 2


def test_stacked_update_geometry_is_the_k_rows_of_the_stacks_polar_factor():
    """No momentum: the step is -lr sqrt(3) times K's rows of the seed's iteration on the stacked
    gradient; its heads' PR and stable rank, K's energy share and the RMS ratio follow from it."""
    optim = OptimConfig(muon_lr=LR, muon_momentum=0.0, muon_nesterov=False)
    rows, before, grads = one_step(SMALL, optim)
    E, G = SMALL.head_dim, SMALL.n_kv_head
    for layer in range(SMALL.n_layer):
        names = [f"blocks.{layer}.attn.{m}_proj.weight" for m in "qkvo"]
        x = seed_polar_express(torch.cat([grads[n] for n in names])).double().numpy()
        step = LR * math.sqrt(3) * x
        q_rows = SMALL.n_head * E
        dk = step[q_rows : q_rows + G * E]
        for h in range(G):
            pr, sr = pr_and_stable_rank(dk[h * E : (h + 1) * E])
            assert value(rows, layer, h, "pr_sv") == pytest.approx(pr, rel=1e-4)
            assert value(rows, layer, h, "stable_rank") == pytest.approx(sr, rel=1e-4)
            w = before[names[1]][h * E : (h + 1) * E].double().numpy()
            rms = np.sqrt((dk[h * E : (h + 1) * E] ** 2).mean() / (w**2).mean())
            assert value(rows, layer, h, "rms_ratio") == pytest.approx(rms, rel=1e-4)
        share = (dk**2).sum() / (step**2).sum()
        assert value(rows, layer, -1, "k_share") == pytest.approx(share, rel=1e-4)
        assert value(rows, layer, -1, "block_share") == pytest.approx(share, rel=1e-4)  # the block is QKVO


def test_k_alone_moves_every_direction_and_its_block_is_itself():
    """K orthogonalized on its own: each head's rows of K's polar factor are (nearly) orthonormal,
    so the update's PR is close to head_dim; K is its whole block; with four blocks of the same
    shape, K's share of the layer's attention update is their shapes' share."""
    optim = OptimConfig(muon_lr=LR, muon_qkvo="k+qvo", muon_momentum=0.0, muon_nesterov=False)
    rows, _, _ = one_step(MHA, optim)
    E = MHA.head_dim
    for layer in range(MHA.n_layer):
        assert value(rows, layer, -1, "block_share") == pytest.approx(1.0)
        for h in range(MHA.n_kv_head):
            assert value(rows, layer, h, "pr_sv") > 0.9 * E  # Polar Express leaves s in about [0.7, 1.2]
    separate = OptimConfig(muon_lr=LR, muon_qkvo="separate", muon_momentum=0.0, muon_nesterov=False)
    rows, _, _ = one_step(MHA, separate)
    for layer in range(MHA.n_layer):
        assert value(rows, layer, -1, "k_share") == pytest.approx(0.25, abs=0.05)


def test_adamw_has_no_block_and_geometry_needs_a_snapshot():
    rows, _, _ = one_step(SMALL, OptimConfig(name="adamw"))
    metrics = {r["metric"] for r in rows}
    assert metrics == {"pr_sv", "stable_rank", "rms_ratio", "k_share"}
    geometry = UpdateGeometry(GPT(SMALL), SMALL.head_dim)
    assert geometry.measure() == []  # no step was snapshotted


def test_a_run_records_the_update_before_each_evaluation_and_trains_the_same(tmp_path):
    data = shards(tmp_path)
    extra = {"train.eval_schedule": "log", "train.eval_points": 3, "probe.functional_rank": "off"}
    on, off = tmp_path / "on", tmp_path / "off"
    train(config(data, **extra), on, progress=False)
    train(config(data, **extra, **{"probe.update_geometry": False}), off, progress=False)
    probes = store.read_table(on / "probes.csv")
    dwk = probes[probes["site"] == "dw_k"]
    evals = sorted(store.read_table(on / "scalars.csv")["step"].unique())
    assert sorted(dwk["step"].unique()) == evals[1:]  # every evaluation after the first step
    assert np.isfinite(dwk["value"]).all()
    same_rows = store.read_table(off / "probes.csv")
    assert (same_rows["site"] != "dw_k").all()
    a, b = store.read_table(on / "scalars.csv"), store.read_table(off / "scalars.csv")
    assert a["val_loss"].tolist() == b["val_loss"].tolist()  # measuring never changes training
