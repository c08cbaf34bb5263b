"""When things recur in a run: the steps of evaluations, probes, the end-of-run measurements and
checkpoints. `run_cadence(cfg)` gives every schedule of one run from its config; the functions
under it are the arithmetic, shared with `ProbeLogger` (`next_multiple`). Pure functions of the
step counts; torch-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


def next_multiple(count: int, every: int) -> int:
    """The first multiple of `every` above `count`: when something that recurs every `every`
    (tokens or steps) is next due, once it was due at `count`."""
    return (count // every + 1) * every


def schedule(total_steps: int, tokens_per_step: int, every_tokens: int) -> list[int]:
    """Steps (0..total_steps) at which something recurs every `every_tokens`: the first step at or
    after each multiple, plus step 0 and the last step. every_tokens == 0: only the ends."""
    steps = {0, total_steps}
    if every_tokens:
        due = next_multiple(0, every_tokens)
        while due < total_steps * tokens_per_step:
            steps.add(math.ceil(due / tokens_per_step))
            due = next_multiple(due, every_tokens)
    return sorted(steps)


def log_schedule(total_steps: int, points: int) -> list[int]:
    """Step 0, the last step, and `points` steps spaced evenly in log(step): dense early, where the
    geometry moves fast, sparse late, so a 100M-token run costs few evaluations."""
    steps = {0, total_steps}
    if total_steps > 1 and points > 1:
        ratio = total_steps ** (1 / (points - 1))
        steps |= {min(total_steps, round(ratio**i)) for i in range(points)}
    return sorted(steps)


def eval_steps(
    total_steps: int, tokens_per_step: int, every_tokens: int, kind: str = "linear", points: int = 24
) -> list[int]:
    """The steps at which to evaluate and probe."""
    if kind == "log":
        return log_schedule(total_steps, points)
    return schedule(total_steps, tokens_per_step, every_tokens)


def functional_rank_steps(mode: str, evals: frozenset[int], total_steps: int) -> frozenset[int]:
    """The evaluations that also measure the functional rank (costly, so not every one, by
    `probe.functional_rank`): off; end = the last step; every = each evaluation; middle-end = the
    last and the evaluation nearest the middle of the run (the earlier of two as near)."""
    if mode == "off":
        return frozenset()
    if mode == "end":
        return frozenset({total_steps})
    if mode == "every":
        return evals
    if mode == "middle-end":
        return frozenset({total_steps, min(evals, key=lambda s: (abs(s - total_steps / 2), s))})
    raise ValueError(f"unknown probe.functional_rank mode {mode!r}")


@dataclass(frozen=True)
class Cadence:
    """Every schedule of one run, in optimizer steps: step s is the point after s optimizer steps
    (0: the initial model; `total_steps`: the end)."""

    tokens_per_step: int
    total_steps: int
    evals: frozenset[int]  # evaluations (and probes)
    functional_rank: frozenset[int]  # evaluations that also measure the functional rank
    kv_headroom: frozenset[int]  # evaluations that also measure the KV headroom
    saves: frozenset[int]  # checkpoints (besides the one a signal asks for)
    series: frozenset[int] = frozenset()  # the checkpoints among `saves` kept for good (`train.checkpoint_series`)


def run_cadence(cfg: Any) -> Cadence:
    """The schedules of a run of `cfg` (a `RunConfig`): `train.tokens` in steps of `batch_size` x
    `seq_len` tokens, evaluated by `train.eval_schedule`, measuring the functional rank by
    `probe.functional_rank` and the KV headroom at the end (`probe.kv_headroom = "end"`) when the
    probe is on, and checkpointed every `train.checkpoint_every` tokens and at the
    `train.checkpoint_series` log-spaced steps kept for good (not at step 0: nothing to resume
    there)."""
    tc = cfg.train
    tokens_per_step = tc.batch_size * tc.seq_len
    total = max(1, math.ceil(tc.tokens / tokens_per_step))
    evals = frozenset(eval_steps(total, tokens_per_step, tc.eval_every, tc.eval_schedule, tc.eval_points))
    probed = cfg.probe.enabled
    series = frozenset(log_schedule(total, tc.checkpoint_series) if tc.checkpoint_series else ()) - {0}
    return Cadence(
        tokens_per_step=tokens_per_step,
        total_steps=total,
        evals=evals,
        functional_rank=functional_rank_steps(cfg.probe.functional_rank, evals, total) if probed else frozenset(),
        kv_headroom=frozenset({total}) if probed and cfg.probe.kv_headroom == "end" else frozenset(),
        saves=(frozenset(schedule(total, tokens_per_step, tc.checkpoint_every)) | series) - {0},
        series=series,
    )
