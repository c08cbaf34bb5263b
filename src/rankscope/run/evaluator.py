"""Rank 0's evaluations of a training run: the validation, out-of-distribution and induction losses,
the in-context learning score, the probe's rank metrics and attention statistics, the update
geometry, and at the evaluations the run's cadence names, the functional rank and the KV headroom.
Each evaluation appends one row to scalars.csv and its measurements to probes.csv, and sends a
summary to the run's sinks (`train.log`).
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import torch

from ..measure.functional_rank import functional_rank
from ..measure.headroom import kv_headroom
from ..measure.icl import loss_and_icl
from ..measure.induction import gpt_induction_scores
from ..measure.probe import gpt_probe
from ..measure.update_geometry import UpdateGeometry, k_part
from ..measure.weight_spectra import weight_spectra
from ..storage.store import RunStore, naming
from .build import RunSetup
from .progress import RunBar
from .resume import Timers
from .sinks import evaluation_summary, open_sinks


class Evaluator:
    """Evaluates the run of `setup` on rank 0 and keeps its tables.

    Made before the run resumes (the probes attach to the model); `open` the run folder's tables
    and sinks once the folder is started, `evaluate` at each step of the evaluation schedule, and
    `close` at the end (or, quietly, on the way out of a failed run)."""

    def __init__(self, setup: RunSetup):
        cfg = setup.cfg
        self.cfg, self.arm, self.out_dir = cfg, setup.arm, setup.out_dir
        self.model, self.autocast = setup.learner.model, setup.learner.autocast
        self.tokens_per_step = setup.cadence.tokens_per_step
        self.batches = setup.fixed
        self.downstream = cfg.probe.enabled and cfg.probe.downstream
        self.evals = setup.cadence.evals
        self.functional_rank_steps = setup.cadence.functional_rank
        self.kv_headroom_steps = setup.cadence.kv_headroom
        self.probe = self.geometry = self.induction = None
        if cfg.probe.enabled:
            self.probe = gpt_probe(self.model, cfg.probe.sites, attention=cfg.probe.attention)
            if cfg.probe.update_geometry:  # the update W_K receives in the step before each evaluation
                self.geometry = UpdateGeometry(self.model, cfg.model.head_dim, k_part(cfg.optim))
        if self.downstream:  # the induction batch's scores (repeated random tokens)
            self.induction = gpt_induction_scores(self.model, cfg.train.seq_len // 2)
        self.store: RunStore | None = None
        self.sinks: list[Any] = []

    def open(self) -> None:
        """Append to the tables of the run folder (once it is started), and stream a summary of
        each evaluation to the sinks `train.log` names (the tables are the record)."""
        self.store = RunStore(self.out_dir)
        self.sinks = open_sinks(self.cfg.train.log, self.out_dir) if self.cfg.train.log else []

    def watching(self, step: int) -> UpdateGeometry | None:
        """The update geometry to snapshot before the optimizer update of `step`, when the
        evaluation right after it measures that update; else None."""
        return self.geometry if step + 1 in self.evals else None

    @torch.no_grad()
    def mean_loss(self, batches: list) -> float:
        """The model's mean loss over `batches` (NaN when there are none)."""
        with self.autocast():
            losses = [self.model(x, y) for x, y in batches]
        return torch.stack(losses).mean().item() if losses else float("nan")

    def evaluate(
        self,
        step: int,
        train_loss: float,
        grad_norm: float,
        scale: float,
        elapsed: float,
        timers: Timers,
        bar: RunBar | None = None,
    ) -> dict[str, Any]:
        """Evaluate the model after `step` optimizer steps, write its rows, and return its scalars
        row with the mean key participation ratio (`key_pr`, NaN without a key probe) added.
        `train_loss`, `grad_norm`: the means since the last evaluation; `scale`: the learning-rate
        scale of the last step; `elapsed`: the run's seconds so far. The seconds spent probing and
        evaluating are added to `timers`; `bar` shows the probing phase."""
        t0 = time.perf_counter()
        model, batches = self.model, self.batches
        base = dict(arm=self.arm, seed=self.cfg.seed, step=step, tokens=step * self.tokens_per_step)
        model.eval()
        with torch.no_grad(), self.autocast():
            # validation loss and the in-context learning score from the same forward passes
            if self.downstream:
                val_loss, icl = loss_and_icl(model, batches.val)
            else:
                val_loss, icl = self.mean_loss(batches.val), ""
            row = dict(
                base,
                train_loss=train_loss,
                val_loss=val_loss,
                icl_score=icl,
                ood_loss=self.mean_loss(batches.ood) if batches.ood else "",
                lr_scale=scale,
                grad_norm=grad_norm,
            )
            probe_rows: list[dict[str, Any]] = []
            extra: list[dict[str, Any]] = []
            healthy = math.isfinite(val_loss)  # a diverged model has no geometry left to measure
            if bar is not None and healthy and (self.probe is not None or self.induction is not None):
                bar.phase("probing…")
            if self.probe is not None and healthy:
                tp = time.perf_counter()
                probe_rows = self.probe.measure([batches.probe[0]])
                timers.probe_s += time.perf_counter() - tp
            if self.induction is not None and healthy:
                row["induction_loss"], extra = self.induction.measure_with_loss(batches.induction)
                extra += weight_spectra(model)
            if self.geometry is not None and healthy:
                extra += self.geometry.measure()
            elif self.geometry is not None:  # a diverged step has no geometry: forget its snapshot
                self.geometry.discard()
            if step in self.functional_rank_steps and healthy:  # the dimensions the model uses (costly)
                extra += functional_rank(model, *batches.probe)
            if step in self.kv_headroom_steps and healthy:
                extra += kv_headroom(model, *batches.probe, tol=self.cfg.probe.kv_tolerance)  # keys per kv head
        if probe_rows or extra:
            with naming(self.store.probes.path):
                self.store.probes.append(dict(base, **r) for r in probe_rows + extra)
        model.train()
        timers.eval_s += time.perf_counter() - t0
        row.update(elapsed_s=elapsed + time.perf_counter() - t0, probe_s=timers.probe_s, eval_s=timers.eval_s)
        with naming(self.store.scalars.path):
            self.store.scalars.append([row])
        for sink in self.sinks:
            sink.log(evaluation_summary(row, probe_rows), step, step * self.tokens_per_step)
        key = [r["value"] for r in probe_rows if r["site"] == "k" and r["metric"] == "pr_sv"]
        row["key_pr"] = sum(key) / len(key) if key else float("nan")
        return row

    def close(self, quiet: bool = False) -> None:
        """Close both tables and every sink, even when one fails (a full disk fails the flush in
        close() again). `quiet`: another exception is already on its way out, so none is raised
        here and a sink's failure is dropped (what it logged is flushed already); else the first
        table's failure, then a sink's, is raised."""
        if self.store is None:
            return
        error = None
        for table in (self.store.scalars, self.store.probes):
            try:
                with naming(table.path):
                    table.close()
            except OSError as e:
                error = error or e
        if error is not None and not quiet:
            raise error
        for sink in self.sinks:
            if quiet:
                with contextlib.suppress(Exception):
                    sink.close()
            else:
                sink.close()
