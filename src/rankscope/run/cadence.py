"""When things recur in a run: the steps of evaluations, probes and checkpoints. Pure functions of
the step counts; torch-free.
"""

from __future__ import annotations

import math


def schedule(total_steps: int, tokens_per_step: int, every_tokens: int) -> list[int]:
    """Steps (0..total_steps) at which something recurs every `every_tokens`: the first step at or
    after each multiple, plus step 0 and the last step. every_tokens == 0: only the ends."""
    steps = {0, total_steps}
    k = 1
    while every_tokens and k * every_tokens < total_steps * tokens_per_step:
        steps.add(math.ceil(k * every_tokens / tokens_per_step))
        k += 1
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
