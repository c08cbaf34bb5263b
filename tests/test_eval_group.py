"""Evaluation forwards run several validation batches at once (issue 20: one eager forward of a small
model on a GPU is launch-bound): how many, that the grouped batches are the same rows, that the loss
and the in-context learning score are the per-batch ones, and that grouping never raises a run's
peak memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rankscope.core.model import GPT
from rankscope.data import TokenData, fixed_batches
from rankscope.measure.icl import loss_and_icl
from rankscope.run.build import fixed_eval_batches
from rankscope.run.estimate import EVAL_FORWARD_TOKENS, eval_group, memory
from rankscope.settings.config import PRESETS, RunConfig, apply_overrides


def cfg_with(base: str = "tiny", **settings) -> RunConfig:
    return apply_overrides(PRESETS[base], settings)


def test_the_seed_presets_group_as_the_gpu_model_assumes():
    # seed-88m: 20 batches of 4 x 2048 = 8,192 tokens, four at a time = 32,768 tokens a forward
    assert eval_group(PRESETS["seed-88m"]) == 4
    assert eval_group(PRESETS["seed-88m"], world_size=8) == 4  # 22 layers keep far more than 32K tokens
    # seed-1.5b: one batch of 65,536 tokens is over the cap already
    assert eval_group(PRESETS["seed-1.5b"]) == 1


@pytest.mark.parametrize("n", [1, 2, 3, 6, 7, 12, 20, 60])
@pytest.mark.parametrize("rows", [1, 4, 32])
def test_the_group_divides_the_batches_and_fits_the_token_cap(n, rows):
    cfg = cfg_with(**{"train.eval_batches": n, "train.batch_size": rows, "train.seq_len": 128})
    g = eval_group(cfg)
    assert n % g == 0
    assert g == 1 or g * rows * 128 <= EVAL_FORWARD_TOKENS
    # a group that fits stays a group when the batches are fewer (only the divisors change)
    assert eval_group(apply_overrides(cfg, {"train.eval_batches": g})) == g


def test_the_group_is_as_large_as_fits():
    # tiny, 64 rows of 128 tokens (8,192): 12 batches fit 4 at a time under 32,768 tokens, and a
    # step of 4 layers x 8,192 tokens holds far more than one layer of 32,768
    cfg = cfg_with(**{"train.eval_batches": 12, "train.batch_size": 64, "train.seq_len": 128})
    assert eval_group(cfg) == 4
    # 7 is prime and 7 x 8,192 > 32,768: one batch a forward
    assert eval_group(apply_overrides(cfg, {"train.eval_batches": 7})) == 1


def test_a_smaller_training_step_means_a_smaller_group():
    cfg = cfg_with(**{"train.eval_batches": 8, "train.batch_size": 8, "train.seq_len": 128})
    groups = [eval_group(apply_overrides(cfg, {"train.grad_accum": a})) for a in (1, 2, 4, 8)]
    # grad_accum a keeps 8/a rows of activations a step: fewer batches fit under it
    assert groups == sorted(groups, reverse=True) and groups[0] > groups[-1]
    for a in (1, 2, 4, 8):
        est = memory(apply_overrides(cfg, {"train.grad_accum": a}))
        assert est.eval_group == 1 or est.evaluation <= est.train


def token_data(rng: np.random.Generator, vocab: int = 256) -> TokenData:
    val = rng.integers(0, vocab, 9000).astype(np.uint16)
    ood = rng.integers(0, vocab, 7000).astype(np.uint16)
    return TokenData(train=[val], val=[val], ood=[ood], vocab_size=vocab, tokenizer=None, source="test", eot_id=None)


def test_grouped_batches_are_the_same_rows_in_the_same_order():
    data = token_data(np.random.default_rng(0))
    cfg = cfg_with(**{"train.eval_batches": 6, "train.batch_size": 4, "train.seq_len": 32, "probe.enabled": False})
    g = eval_group(cfg)
    assert g > 1  # the case under test: several batches a forward
    fixed = fixed_eval_batches(cfg, data, torch.device("cpu"))
    for grouped, shards in ((fixed.val, data.val), (fixed.ood, data.ood)):
        single = fixed_batches(shards, 6, 4, 32)
        assert len(grouped) == 6 // g and all(x.shape == (4 * g, 32) for x, _ in grouped)
        for part in (0, 1):  # inputs, targets
            assert torch.equal(torch.cat([b[part] for b in grouped]), torch.cat([b[part] for b in single]))


def test_grouped_forwards_give_the_per_batch_loss_and_icl_score():
    torch.manual_seed(0)
    cfg = cfg_with(
        **{"model.vocab_size": 256, "model.n_layer": 2, "model.d_model": 64, "model.d_mlp": 128, "model.n_head": 2}
        | {"model.n_kv_head": 1, "model.head_dim": 32, "model.max_seq_len": 64, "train.seq_len": 64}
    )
    model = GPT(cfg.model).eval()
    model.reset_parameters(0)
    rng = torch.Generator().manual_seed(1)
    single = [
        (torch.randint(0, 256, (4, 64), generator=rng), torch.randint(0, 256, (4, 64), generator=rng)) for _ in range(6)
    ]
    for g in (2, 3, 6):
        grouped = [
            (torch.cat([x for x, _ in single[i : i + g]]), torch.cat([y for _, y in single[i : i + g]]))
            for i in range(0, 6, g)
        ]
        with torch.no_grad():
            loss_1, icl_1 = loss_and_icl(model, single)
            loss_g, icl_g = loss_and_icl(model, grouped)
            mean_1 = torch.stack([model(x, y) for x, y in single]).mean().item()
            mean_g = torch.stack([model(x, y) for x, y in grouped]).mean().item()
        assert loss_g == pytest.approx(loss_1, rel=1e-6)
        assert icl_g == pytest.approx(icl_1, abs=1e-5)
        assert mean_g == pytest.approx(mean_1, rel=1e-6) and mean_1 == pytest.approx(loss_1, rel=1e-6)


@pytest.mark.parametrize("name", ["tiny", "deep", "seed-88m", "seed-1.5b"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_grouping_never_raises_the_peak_above_a_training_step(name, device):
    cfg = PRESETS[name]
    one = apply_overrides(cfg, {"train.eval_batches": 1})  # one batch a forward, as before grouping
    for world in (1, 2, 8):
        est = memory(cfg, device, world)
        # under many processes rank 0 evaluates a whole global batch, which can exceed a rank's step
        assert est.evaluation <= max(est.train, memory(one, device, world).evaluation)
        if est.eval_group > 1:
            assert est.evaluation <= est.train
