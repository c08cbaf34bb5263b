"""The progress bar of a training run, and how far a whole study has got.

A study trains its runs one after another, each with its own bar; `StudyProgress` is shared by
them (run_study makes one, `train` feeds it), so each bar names which run it is ("run 2/4") and
how long the rest of the study will take at the speed so far, evaluations and setup included.
The bar says what it is doing when it is not training ("evaluating…", "probing…", "saving a
checkpoint…"), and shows a loss only once one has been measured. Torch-free.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class StudyProgress:
    """The runs a study trains in this process, in order, and the tokens trained so far."""

    left: Sequence[int]  # tokens each run has left to train (its budget, less a checkpoint's)
    run: int = 0  # the run training now, counted from 1 (0: none yet)
    trained: int = 0  # tokens trained since the first run started
    started: float | None = None  # time.perf_counter() when the first run started
    clock: Callable[[], float] = field(default=time.perf_counter, repr=False)

    @property
    def runs(self) -> int:
        return len(self.left)

    def start_run(self, run: int) -> None:
        """Run number `run` (from 1) starts training; the clock starts with the first."""
        if self.started is None:
            self.started = self.clock()
        self.run = run

    def eta_s(self, this_run_left: int) -> float | None:
        """Seconds until the study is done: this run's tokens left and every later run's, at the
        rate so far (tokens trained / time since the first run started); None before any token."""
        if self.started is None or self.trained <= 0:
            return None
        elapsed = self.clock() - self.started
        if elapsed <= 0:
            return None
        return (this_run_left + sum(self.left[self.run :])) * elapsed / self.trained


def tokens_left(tokens: int, tokens_per_step: int, step: int) -> int:
    """Tokens a run of budget `tokens` trains from `step` on: whole steps, at least one (as
    `train` counts them)."""
    return max(0, max(1, -(-tokens // tokens_per_step)) - step) * tokens_per_step


def fmt_duration(seconds: float) -> str:
    """'42s', '12:05', '3:02:00' (as tqdm shows times)."""
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}" if m else f"{s}s"


def measured_text(train_loss: float, val_loss: float, key_pr: float) -> str:
    """'loss=3.412 val=3.501 pr=41.2', leaving out what has no value yet (no training loss before
    the first step, no key PR without probes)."""
    parts = [
        f"{name}={value:{spec}}"
        for name, value, spec in (("loss", train_loss, ".3f"), ("val", val_loss, ".3f"), ("pr", key_pr, ".1f"))
        if value is not None and math.isfinite(value)
    ]
    return " ".join(parts)


class RunBar:
    """A tqdm bar over one run's tokens: what was measured last, what is happening now (when not
    training) and, within a study, the time left for the whole study."""

    ETA_EVERY_S = 1.0  # the study's time left is worked out at most this often

    def __init__(self, total: int, initial: int, desc: str, study: StudyProgress | None = None):
        from tqdm.auto import tqdm

        self.study = study if study is not None and study.runs > 1 else None
        self.measured = ""
        self.phase_text = ""
        self.eta_text = ""
        self._eta_at = -math.inf
        self.bar = tqdm(total=total, initial=initial, unit="tok", unit_scale=True, dynamic_ncols=True, desc=desc)

    def postfix(self) -> str:
        return ", ".join(p for p in (self.measured, self.phase_text, self.eta_text) if p)

    def _show(self, refresh: bool) -> None:
        self.bar.set_postfix_str(self.postfix(), refresh=refresh)

    def phase(self, text: str) -> None:
        """Say what the run is doing now that is not training (shown at once)."""
        self.phase_text = text
        self._show(refresh=True)

    def show_measured(self, train_loss: float, val_loss: float, key_pr: float) -> None:
        """An evaluation's values, which also ends its phase."""
        self.measured = measured_text(train_loss, val_loss, key_pr)
        self.phase_text = ""
        self._show(refresh=False)

    def update(self, tokens: int) -> None:
        self.bar.update(tokens)
        if self.study is None:
            return
        self.study.trained += tokens
        now = self.study.clock()
        if now - self._eta_at >= self.ETA_EVERY_S:
            self._eta_at = now
            eta = self.study.eta_s(self.bar.total - self.bar.n)
            self.eta_text = f"study {fmt_duration(eta)} left" if eta is not None else ""
            self._show(refresh=False)

    def close(self) -> None:
        self.phase_text = ""
        self._show(refresh=False)
        self.bar.close()
