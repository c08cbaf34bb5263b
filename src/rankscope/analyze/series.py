"""`rankscope analyze PATH --series`: probe every checkpoint of one training run on one fixed batch
and write the rows as a study folder that `rankscope report` reads unchanged.

PATH is a rankscope run folder (each `checkpoints/step-*.pt`), a folder of Hugging Face checkpoint
folders (`step1000/`, `checkpoint-500/`, ...: the step from trainer_state.json or the folder's name;
found without --series too), or, with `--hub-revisions`, a hub repository whose branches name steps
(Pythia's `step1000`, OLMo's `step1000-tokens4B`). `--steps` and `--max-checkpoints` pick some
(`checkpoints.py` finds and picks them).

One batch for all: built once from the first checkpoint (its data and tokenizer); checkpoints that
disagree on the vocabulary size are refused before anything is written. The output is
`<out>/<name>/seed-<k>/` in the store's format (`rankscope.storage.store`): config.json, scalars.csv (a row
per checkpoint: step, tokens, `val_loss` = next-token loss on the fixed batch, and for rankscope
models the induction loss), probes.csv (the probe's rows per checkpoint, plus per-head induction
and previous-token scores for rankscope models, as training logs them), series.json (what was
measured and on which batch), done.json; and `<out>/study.json`. A rerun measures only the
checkpoints whose step is not in the tables yet (a checkpoint half written by a killed run is
dropped and measured again); a rerun with another batch is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RankscopeError
from ..report.study_setup import KEEP_MORE_CHECKPOINTS
from ..storage.store import CONFIG, SERIES_KIND, STUDY, read_record
from .checkpoints import check_vocab, find_series, is_run_folder, select
from .inputs import LoadedModel, first_line

SERIES = "series.json"


@dataclass
class SeriesResult:
    """What `analyze_series` measured and where it went."""

    out: Path  # the study folder (`rankscope report OUT`)
    run: Path  # its run folder
    measured: list[int]  # steps measured now
    skipped: list[int]  # steps already in the tables
    found: list[int] = dataclasses.field(default_factory=list)  # steps of every checkpoint PATH holds
    rankscope_run: bool = False  # PATH is a rankscope run folder


def _fingerprint(ids: Any) -> str:
    return hashlib.sha256(ids.cpu().numpy().astype("int64").tobytes()).hexdigest()[:16]


def _loss(model: Any, ids: Any) -> float:
    """Mean next-token cross-entropy on the fixed batch (one extra forward pass)."""
    import torch

    from ..measure.icl import token_losses

    with torch.no_grad():
        out = model(ids)
        logits = getattr(out, "logits", out)
        return float(token_losses(logits[:, :-1], ids[:, 1:]).mean())


def _induction(loaded: LoadedModel, device: Any) -> tuple[Any, int] | None:
    """The repeated-random-token batch and half length a rankscope run logs its induction scores
    with (`train`: probe.downstream, train.seq_len / 2, the data's vocabulary, seed 0); None when
    the run does not measure them or this is not a rankscope model."""
    cfg = loaded.config
    if cfg is None or not (cfg.probe.enabled and cfg.probe.downstream):
        return None
    from ..data import load_data
    from ..measure.induction import induction_batch

    half = cfg.train.seq_len // 2
    try:
        vocab = load_data(cfg.data.path or None, cfg.model.vocab_size).vocab_size
        return induction_batch(vocab, cfg.probe.induction_batch, half, seed=0).to(device), half
    except (ValueError, OSError, RankscopeError):
        return None


def _measured_steps(run: Path) -> set[int]:
    """Steps present in both tables; rows of any other step (a checkpoint a killed run left half
    written) are dropped from the tables so that it is measured again."""
    from ..storage import fsio, store

    tables = {n: run / n for n in (store.SCALARS, store.PROBES)}
    there = [p.exists() for p in tables.values()]
    if not any(there):
        return set()
    if not all(there):
        raise RankscopeError(f"{run} holds only one of {' and '.join(tables)}; remove the folder to measure again")
    steps = {n: store.read_table(p) for n, p in tables.items()}
    have = [set(df["step"].astype(int)) if len(df) else set() for df in steps.values()]
    keep = have[0] & have[1]
    for path, df in zip(tables.values(), steps.values()):
        if len(df) and not set(df["step"].astype(int)) <= keep:
            text = path.read_text()
            lines = text[: text.rfind("\n") + 1].splitlines(keepends=True)
            col = lines[0].rstrip("\n").split(",").index("step")
            kept = [lines[0]] + [ln for ln in lines[1:] if int(ln.split(",")[col]) in keep]
            fsio.write_bytes(path, "".join(kept).encode())
    return keep


def _study_json(out: Path, name: str, seed: int) -> None:
    from ..storage.store import read_json, write_record

    study = read_json(out / STUDY) if (out / STUDY).exists() else {}
    order = [a for a in study.get("arm_order") or [] if a != name] + [name]
    write_record(
        out / STUDY,
        {
            **study,
            "name": study.get("name") or out.name,
            "description": "checkpoint series measured by rankscope analyze --series",
            "kind": SERIES_KIND,  # the report speaks of checkpoints, not of seeds and evaluations
            "arms": {**(study.get("arms") or {}), name: {}},
            "arm_order": order,
            "seeds": sorted({*study.get("seeds", []), seed}),
        },
    )


def analyze_series(
    path: str | Path,
    *,
    hub: bool = False,
    out: str | Path | None = None,
    name: str | None = None,
    data: str | Path | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    sites: tuple[str, ...] = ("k",),
    device: str = "auto",
    steps: Sequence[int] | None = None,
    max_checkpoints: int | None = None,
    tokens_per_step: int | None = None,
    progress: bool = True,
) -> SeriesResult:
    """Probe the checkpoints of `path` (see the module's docstring) not measured yet into the study folder."""
    import torch
    from tqdm.auto import tqdm

    from ..attach import Probe
    from ..settings.vocab import PROBE_SITES
    from ..storage.provenance import environment, now
    from ..storage.store import (
        DONE,
        PROBE_COLUMNS,
        PROBES,
        SCALAR_COLUMNS,
        SCALARS,
        TableWriter,
        read_json,
        write_record,
        write_start,
    )

    for s in sites:
        if s not in PROBE_SITES:
            raise RankscopeError(f"unknown site {s!r} (choose from {', '.join(PROBE_SITES)})")
    if data is not None and not Path(data).exists():
        raise RankscopeError(f"--data: no such file or folder: {data}")
    found, default_name, seed, default_out = find_series(str(path), hub)
    checkpoints = select(found, steps, max_checkpoints)
    check_vocab(checkpoints)  # before anything is written
    name = (name or default_name).replace("/", "-")
    study = Path(out) if out is not None else default_out
    run = study / name / f"seed-{seed}"
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RankscopeError(f"cannot write to {run}: {first_line(e)}; pass --out DIR") from None
    done = _measured_steps(run)
    todo = [c for c in checkpoints if c.step not in done]
    skipped = [c.step for c in checkpoints if c.step in done]
    own = not hub and is_run_folder(Path(path))
    found_steps = sorted(c.step for c in found)
    if not todo:
        return SeriesResult(study, run, [], skipped, found_steps, own)

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    first = checkpoints[0].load()  # the batch comes from the first checkpoint, measured or not
    ids, data_desc = first.batch(str(data) if data is not None else None, batch_size, seq_len)
    ids = ids.to(device)
    fingerprint = _fingerprint(ids)
    old = read_json(run / SERIES) if (run / SERIES).exists() else {}
    if old.get("batch_sha256") not in (None, fingerprint):
        raise RankscopeError(
            f"{run} holds rows measured on another batch ({old.get('data')}, {old.get('batch')}); "
            f"use the same --data/--batch-size/--seq-len, or another --out or --name"
        )
    induction = _induction(first, device)
    vocab, label0 = first.vocab_size, checkpoints[0].label
    att = Probe(first.model, ["k"]).attachment
    assert att is not None
    if first.config is not None:
        config = {**read_record(Path(first.source).parent.parent / CONFIG), "arm": name, "seed": seed}
        measured_sites = ["k"] + [s for s in sites if s != "k"]  # what this series measured, on which batch
        config["probe"] = {**(config.get("probe") or {}), "sites": measured_sites, "batch_size": int(ids.shape[0])}
    else:
        config = {"arm": name, "seed": seed, "model": {**att.config(), "vocab_size": first.vocab_size}}
    config["source"] = str(path)
    provenance = {**environment(torch.device(device)), "arm": name, "seed": seed, "started": now()}
    write_start(run, config, provenance)
    write_record(
        run / SERIES,
        {
            "source": str(path),
            "kind": first.kind,
            "data": data_desc,
            "batch": [int(ids.shape[0]), int(ids.shape[1])],
            "batch_sha256": fingerprint,
            "val_loss": "mean next-token loss on the fixed probe batch",
            "tokens": "from the checkpoints" if first.kind == "rankscope" or tokens_per_step else "see tokens_note",
            "tokens_note": "where a checkpoint does not say, tokens = step x --tokens-per-step (else the step)",
            "model": att.config(),
            **environment(torch.device(device)),
            "written": now(),
        },
    )
    (run / DONE).unlink(missing_ok=True)  # not done while measuring
    _study_json(study, name, seed)

    scalars, probes = TableWriter(run / SCALARS, SCALAR_COLUMNS), TableWriter(run / PROBES, PROBE_COLUMNS)
    reuse = first if checkpoints[0] in todo else None  # loaded already; the others one at a time
    del first, att
    measured = []
    try:
        bar = tqdm(todo, desc=name, unit="ckpt", file=sys.stderr, disable=not progress, dynamic_ncols=True)
        for c in bar:
            bar.set_postfix_str(c.label)
            loaded, reuse = (reuse, None) if reuse is not None and c is checkpoints[0] else (c.load(), reuse)
            if loaded.vocab_size != vocab:
                raise RankscopeError(
                    f"the checkpoints do not share one tokenizer: {label0} has a vocabulary of "
                    f"{vocab}, {c.label} of {loaded.vocab_size}; a series is measured on one batch"
                )
            try:
                model = loaded.model.to(device)
            except (RuntimeError, AssertionError) as e:
                raise RankscopeError(f"cannot move {c.label} to {device}: {first_line(e)}") from None
            table = Probe(model, ["k"] + [s for s in sites if s != "k"]).measure(ids)
            tokens = loaded.tokens if loaded.tokens is not None else c.tokens
            if tokens is None:
                tokens = c.step * (tokens_per_step or 1)
            row: dict[str, Any] = {"arm": name, "seed": seed, "step": c.step, "tokens": tokens}
            rows = table.to_dict("records")
            row["val_loss"] = _loss(model, ids)
            if induction is not None:
                from ..measure.induction import gpt_induction_scores

                row["induction_loss"], extra = gpt_induction_scores(model, induction[1]).measure_with_loss(induction[0])
                rows += extra
            probes.append({**row, **r} for r in rows)  # the probe rows first: a step counts once in both
            scalars.append([row])
            measured.append(c.step)
            del loaded, model  # one model in memory at a time
    finally:
        scalars.close()
        probes.close()
    write_record(run / DONE, {"status": "done", "kind": "analyze-series", "checkpoints": len(done) + len(measured)})
    return SeriesResult(study, run, measured, skipped, found_steps, own)


def _ints(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise RankscopeError(f"--steps takes comma-separated step numbers, got {text!r}") from None


def run(args: argparse.Namespace, sites: tuple[str, ...]) -> int:
    """`rankscope analyze PATH --series`: measure, then say where the study folder is."""
    result = analyze_series(
        args.path,
        hub=bool(args.hub_revisions),
        out=args.out,
        name=args.name,
        data=args.data,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        sites=sites,
        device=args.device,
        steps=_ints(args.steps),
        max_checkpoints=args.max_checkpoints,
        tokens_per_step=args.tokens_per_step,
        progress=not args.no_progress,
    )
    n, k = len(result.measured), len(result.skipped)
    print(f"measured {n} checkpoint{'s' if n != 1 else ''}" + (f" ({k} measured before)" if k else ""))
    if result.rankscope_run:  # how many the run kept, and how a run keeps more
        kept = result.found
        steps = ", ".join(map(str, kept)) if len(kept) <= 12 else f"{kept[0]} to {kept[-1]}"
        plural = "s" if len(kept) != 1 else ""
        print(f"the run kept {len(kept)} checkpoint{plural} (steps {steps}); {KEEP_MORE_CHECKPOINTS}")
    print(f"series:  {result.run}\nreport:  rankscope report {result.out}")
    return 0


__all__ = ["SeriesResult", "analyze_series", "run"]
