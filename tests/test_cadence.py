"""A run's schedules from its config (`run_cadence`), against closed forms: evaluations, functional
rank, KV headroom and checkpoints for given token budgets; and ProbeLogger's cadence, which is the
same arithmetic (the first count at or after each multiple)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from rankscope.core.model import GPT, ModelConfig
from rankscope.integrations import ProbeLogger
from rankscope.run.cadence import functional_rank_steps, log_schedule, next_multiple, run_cadence, schedule
from rankscope.settings.config import RunConfig, apply_overrides
from rankscope.storage import store

# 4 sequences of 25 tokens: 100 tokens a step
SHAPE = {"train.batch_size": 4, "train.seq_len": 25, "train.grad_accum": 1}


def config(**settings) -> RunConfig:
    return apply_overrides(RunConfig(), {**SHAPE, **settings})


def multiples_closed_form(total: int, tps: int, every: int) -> list[int]:
    """Step 0, the last step, and each step s whose tokens (s-1)*tps < k*every <= s*tps pass a
    multiple k*every of the cadence: floor(s*tps/every) > floor((s-1)*tps/every)."""
    if not every:
        return sorted({0, total})
    return sorted({0, total} | {s for s in range(1, total) if s * tps // every > (s - 1) * tps // every})


def test_a_run_of_10k_tokens_evaluated_every_2500_and_saved_every_3000():
    c = run_cadence(config(**{"train.tokens": 10_000, "train.eval_every": 2_500, "train.checkpoint_every": 3_000}))
    assert (c.tokens_per_step, c.total_steps) == (100, 100)
    assert c.evals == {0, 25, 50, 75, 100}
    # never step 0: there is nothing to resume there; and the series kept for good (8 log-spaced steps)
    assert c.series == {1, 2, 4, 7, 14, 27, 52, 100}
    assert c.saves == {30, 60, 90, 100} | c.series
    assert c.kv_headroom == {100}  # the default probe.kv_headroom = "end"


def test_a_budget_that_is_not_a_whole_number_of_steps_rounds_up():
    # 1,050 tokens: 11 steps of 100 (1,100 tokens); every 300: the first step at or after 300, 600, 900
    cfg = config(**{"train.tokens": 1_050, "train.eval_every": 300, "train.checkpoint_every": 0})
    c = run_cadence(cfg)
    assert c.total_steps == math.ceil(1_050 / 100) == 11
    assert sorted(c.evals) == [0, 3, 6, 9, 11]
    assert c.saves == {11} | c.series  # checkpoint_every = 0: at the end only, beside the series
    assert run_cadence(apply_overrides(cfg, {"train.checkpoint_series": 0})).saves == {11}


def test_the_log_schedule_comes_from_the_config():
    c = run_cadence(config(**{"train.tokens": 1_600, "train.eval_schedule": "log", "train.eval_points": 4}))
    assert sorted(c.evals) == log_schedule(16, 4) == [0, 1, 3, 6, 16]


@pytest.mark.parametrize(
    "mode, want",
    [("off", set()), ("end", {100}), ("every", {0, 25, 50, 75, 100}), ("middle-end", {50, 100})],
)
def test_functional_rank_modes(mode, want):
    c = run_cadence(config(**{"train.tokens": 10_000, "train.eval_every": 2_500, "probe.functional_rank": mode}))
    assert c.functional_rank == want


def test_middle_end_takes_the_evaluation_nearest_the_middle_and_the_earlier_of_two():
    assert functional_rank_steps("middle-end", frozenset({0, 3, 6, 9, 10}), 10) == {6, 10}
    assert functional_rank_steps("middle-end", frozenset({0, 4, 6, 10}), 10) == {4, 10}  # 4 and 6 tie at 5


def test_the_end_measurements_follow_the_probe_settings():
    budget = {"train.tokens": 10_000, "train.eval_every": 2_500}
    off = run_cadence(config(**budget, **{"probe.kv_headroom": "off", "probe.functional_rank": "end"}))
    assert off.kv_headroom == set() and off.functional_rank == {100}
    unprobed = run_cadence(config(**budget, **{"probe.enabled": False, "probe.functional_rank": "every"}))
    assert unprobed.kv_headroom == unprobed.functional_rank == set()
    assert unprobed.evals == {0, 25, 50, 75, 100}  # evaluations go on without the probe


def test_schedule_is_the_first_step_at_or_after_each_multiple():
    rng = random.Random(0)
    for _ in range(500):
        total, tps, every = rng.randint(1, 60), rng.randint(1, 50), rng.choice([0, *range(1, 400)])
        assert schedule(total, tps, every) == multiples_closed_form(total, tps, every), (total, tps, every)


def test_next_multiple():
    assert [next_multiple(c, 5) for c in (0, 1, 4, 5, 9, 10)] == [5, 5, 5, 10, 10, 15]


@pytest.mark.parametrize("every_tokens", [250, 300, 100, 1_000])
def test_probe_logger_probes_at_a_runs_schedule(tmp_path, every_tokens):
    """A ProbeLogger called after each of 10 steps of 100 tokens (and at 0), then closed, probes at
    the steps a `rankscope run` of that budget evaluates at, every `every_tokens`."""
    V = 64
    cfg = ModelConfig(vocab_size=V, n_layer=1, d_model=32, n_head=2, n_kv_head=1, head_dim=16, d_mlp=64, max_seq_len=16)
    batch = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(7))
    logger = ProbeLogger(GPT(cfg), tmp_path, every_tokens=every_tokens, batch=batch, tensorboard=False)
    for step in range(11):
        logger.step(step * 100)
    logger.close()
    rows = store.read_table(tmp_path / "run" / "seed-0" / "scalars.csv")
    assert list(rows["step"]) == schedule(10, 100, every_tokens) == multiples_closed_form(10, 100, every_tokens)
