"""`rankscope analyze PATH`: the attention geometry of one trained model, from a checkpoint or a
Hugging Face model folder, without training anything.

PATH is one of

- a rankscope run folder (`<study>/<arm>/seed-<k>`): its newest checkpoint,
- a rankscope checkpoint file (`<run>/checkpoints/step-*.pt`), read with `weights_only=True`,
- a local Hugging Face model folder (config.json with a `model_type`, weights, and normally the
  tokenizer), loaded with `from_pretrained(PATH, local_files_only=True)`.

The probe batch: for a rankscope run, by default exactly the run's own probe batch (its validation
split, `probe.batch_size` x `train.seq_len`, `fixed_batches`), so the numbers agree with the run's
probes.csv at that step; for a Hugging Face model, the default corpus's validation documents (English
prose, `rankscope.data.corpora`) tokenized with the model's own tokenizer. `--data` takes text files
(tokenized with the model's tokenizer: the run's BPE, or the folder's tokenizer) or `.bin` token
shards.

Written to `--out` (default: `<run>/analyze/step-<s>/` for a rankscope run, `<PATH>-analyze/` beside
a Hugging Face folder, or `./rankscope-analyze/<name>/` when that place is not writable):
probes.csv (the tidy table, `store.PROBE_COLUMNS`), key_pr_heatmap.png (layer x head,
`report.layer_plots`), summary.md (also printed, `report.model_summary`), kv_headroom.csv and
kv_headroom.png (the key rank each kv head needs at 1% loss, `headroom.write_headroom`; with
--kv-headroom auto|on|off), analyze.json (what was measured, on what, and with which code and
machine: `provenance.environment`).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RankscopeError
from ..settings.units import fmt_count
from ..settings.vocab import PROBE_SITES
from ..storage.store import PROBES
from .inputs import first_line, load_model

if TYPE_CHECKING:
    import pandas as pd

HEATMAP, SUMMARY, INFO = "key_pr_heatmap.png", "summary.md", "analyze.json"
TABLE = PROBES  # the same table as a run's, read by the same loader
# headroom.HEADROOM_TABLE and report.kv_headroom.PLOT (this module imports neither at import time)
HEADROOM, HEADROOM_PLOT = "kv_headroom.csv", "kv_headroom.png"


@dataclass
class AnalyzeResult:
    """What `analyze` measured and wrote."""

    table: pd.DataFrame  # layer, head, site, metric, value
    out: Path
    summary: str  # markdown
    heatmap: Path
    info: dict[str, Any]
    kv_plot: Path | None = None  # kv_headroom.png, when measured


# --- loading ------------------------------------------------------------------------------------


# --- writing ------------------------------------------------------------------------------------


def _writable(out: Path) -> bool:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(out, os.W_OK)


# --- the command ---------------------------------------------------------------------------------


def analyze(
    path: str | Path,
    *,
    data: str | Path | None = None,
    out: str | Path | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    sites: tuple[str, ...] = ("k",),
    device: str = "auto",
    kv_headroom: str = "auto",
    progress: bool = False,
) -> AnalyzeResult:
    """Load the model at `path`, probe it on one batch, write the table, heatmap and summary, and
    the KV-cache headroom table and figure (`headroom.write_headroom`): kv_headroom "on", "off", or
    "auto" (rankscope models always; others when it takes at most about five minutes here); a
    progress bar on stderr with `progress`."""
    import torch

    from ..attach import Probe
    from ..report.heatmaps import plot_head_heatmap
    from ..report.model_summary import key_pr_grid, key_pr_summary, keys_word
    from ..storage.fsio import write_text
    from ..storage.provenance import environment, now
    from ..storage.store import PROBE_COLUMNS, TableWriter, write_record

    for s in sites:
        if s not in PROBE_SITES:
            raise RankscopeError(f"unknown site {s!r} (choose from {', '.join(PROBE_SITES)})")
    for label, v in (("--batch-size", batch_size), ("--seq-len", seq_len)):
        if v is not None and v < 1:
            raise RankscopeError(f"{label} must be positive, got {v}")
    if kv_headroom not in ("on", "off", "auto"):
        raise RankscopeError(f"--kv-headroom must be on, off or auto, got {kv_headroom!r}")
    if data is not None and not Path(data).exists():
        raise RankscopeError(f"--data: no such file or folder: {data}")
    path = Path(path)
    loaded = load_model(path)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = loaded.model.to(device)
    except (RuntimeError, AssertionError) as e:
        raise RankscopeError(f"cannot move the model to {device}: {first_line(e)}") from None
    ids, data_desc = loaded.batch(str(data) if data is not None else None, batch_size, seq_len)

    probe = Probe(model, ["k"] + [s for s in sites if s != "k"])
    table = probe.measure(ids)
    att = probe.attachment
    assert att is not None  # both kinds of model are recognised (the site names were found)

    if out is not None:
        out_dir = Path(out)
        if not _writable(out_dir):
            raise RankscopeError(f"--out {out_dir}: cannot write there")
    else:
        out_dir = loaded.default_out
        if not _writable(out_dir):
            out_dir = Path("rankscope-analyze") / loaded.name.replace("/", "-")
            if not _writable(out_dir):
                raise RankscopeError(f"cannot write next to {path} nor to {out_dir}; pass --out DIR")

    base = {
        "arm": loaded.name,
        "seed": loaded.seed if loaded.seed is not None else "",
        "step": loaded.step if loaded.step is not None else "",
        "tokens": loaded.tokens if loaded.tokens is not None else "",
    }
    (out_dir / TABLE).unlink(missing_ok=True)  # a rerun replaces the table rather than adding to it
    writer = TableWriter(out_dir / TABLE, PROBE_COLUMNS)
    writer.append({**base, **r} for r in table.to_dict("records"))
    writer.close()

    shape = (int(ids.shape[0]), int(ids.shape[1]))
    where = ", ".join(
        x
        for x in (
            f"step {loaded.step}" if loaded.step is not None else "",
            f"{fmt_count(loaded.tokens)} tokens" if loaded.tokens else "",
        )
        if x
    )
    grid = key_pr_grid(table)
    heatmap = plot_head_heatmap(
        grid,
        out_dir / HEATMAP,
        title=f"{loaded.name}: key participation ratio per head",
        subtitle=f"{att.describe()}"
        + (f"; {where}" if where else "")
        + f"\nprobe batch {shape[0]} x {shape[1]} tokens",
        head_dim=att.head_dim,
        grouped=att.n_kv_head != att.n_head,
    )
    summary = key_pr_summary(
        table,
        name=loaded.name,
        describe=att.describe(),
        data=data_desc,
        shape=shape,
        head_dim=att.head_dim,
        step=loaded.step,
        tokens=loaded.tokens,
        notes=probe.notes,
        keys=keys_word(att.qk_norm, att.rotary),
    )
    kv_plot = None
    for stale in (HEADROOM, HEADROOM_PLOT):  # a rerun replaces the headroom, or drops it
        (out_dir / stale).unlink(missing_ok=True)
    if kv_headroom != "off":  # per kv head: the key rank at 1% loss (kv_headroom.csv, kv_headroom.png)
        from .headroom import write_headroom

        section, kv_plot = write_headroom(model, ids, out_dir, base, progress=progress, mode=kv_headroom)
        summary += section
    write_text(out_dir / SUMMARY, summary)
    info = {
        "path": str(path.resolve()),
        "kind": loaded.kind,
        "name": loaded.name,
        "step": loaded.step,
        "tokens": loaded.tokens,
        "model": att.config(),
        "data": data_desc,
        "batch": list(shape),
        "sites": probe.sites,
        **environment(torch.device(device)),
        "written": now(),
    }
    write_record(out_dir / INFO, info)
    return AnalyzeResult(table, out_dir, summary, heatmap, info, kv_plot)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `rankscope analyze` arguments."""
    parser.add_argument("path", help="a rankscope run folder or checkpoint file, or a local Hugging Face model folder")
    parser.add_argument(
        "--data",
        help="text file/folder (tokenized with the model's tokenizer) or .bin token "
        "shards (default: the run's validation data; the default corpus's validation documents for "
        "Hugging Face models)",
    )
    parser.add_argument(
        "--out", help="output folder (default: <run>/analyze/step-<s>, or <PATH>-analyze beside a Hugging Face folder)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help="sequences in the probe batch (default: the run's probe.batch_size; 8 for Hugging Face models)",
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        help="tokens per sequence (default: the run's train.seq_len; 256 for Hugging Face models)",
    )
    parser.add_argument(
        "--sites",
        default="k",
        help=f"comma-separated sites to measure besides k: {', '.join(PROBE_SITES)} (default: k)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument(
        "--kv-headroom",
        choices=("auto", "on", "off"),
        default="auto",
        help="the KV-cache headroom: per kv head, the key rank that keeps the loss within 1%% (a few forward passes "
        "per kv head and layer); auto: always for rankscope models, for others when it takes at most about 5 "
        "minutes on this device (default: auto)",
    )
    add_series_arguments(parser)


def add_series_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of a checkpoint series (`rankscope.analyze.series`)."""
    group = parser.add_argument_group("checkpoint series (written as a study folder for rankscope report)")
    group.add_argument(
        "--series",
        action="store_true",
        help="probe every checkpoint of PATH on one fixed batch: a rankscope run folder's checkpoints, or a folder "
        "of Hugging Face checkpoint folders (step1000/, checkpoint-500/...; also found without --series)",
    )
    group.add_argument(
        "--hub-revisions",
        action="store_true",
        help="PATH is a Hugging Face hub repository (org/name): probe its step branches (step1000, "
        "step1000-tokens4B...); needs the network and rankscope[hub]",
    )
    group.add_argument("--steps", metavar="S,S,...", help="only these steps")
    group.add_argument("--max-checkpoints", type=int, metavar="N", help="at most N checkpoints, evenly spaced")
    group.add_argument(
        "--tokens-per-step",
        type=int,
        metavar="N",
        help="tokens per step for checkpoints that do not say (default: the step stands in for tokens)",
    )
    group.add_argument(
        "--name", help="the series' arm name in the study folder (default: the run's arm or folder name)"
    )
    group.add_argument(
        "--no-progress", action="store_true", help="no progress bar (over the checkpoints, or the KV headroom's passes)"
    )


def _is_series(args: argparse.Namespace) -> bool:
    """Asked for, or PATH is a folder of Hugging Face checkpoint folders (which one model is not)."""
    if getattr(args, "series", False) or getattr(args, "hub_revisions", False):
        return True
    if getattr(args, "steps", None) or getattr(args, "max_checkpoints", None) is not None:
        return True  # choosing checkpoints asks for a series
    from .checkpoints import is_checkpoint_folder

    return is_checkpoint_folder(Path(args.path))


def run(args: argparse.Namespace) -> int:
    """`rankscope analyze`: print the summary and where everything went."""
    sites = tuple(s.strip() for s in str(args.sites).split(",") if s.strip())
    if _is_series(args):
        from . import series as analyze_series

        return analyze_series.run(args, sites or ("k",))
    result = analyze(
        args.path,
        data=args.data,
        out=args.out,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        sites=sites or ("k",),
        device=args.device,
        kv_headroom=args.kv_headroom,
        progress=not args.no_progress,
    )
    print(result.summary)
    print(f"table:   {result.out / TABLE}\nheatmap: {result.heatmap}\nsummary: {result.out / SUMMARY}")
    if result.kv_plot is not None:
        print(f"kv headroom: {result.out / HEADROOM} and {result.kv_plot}")
    return 0


__all__ = ["AnalyzeResult", "analyze", "add_arguments", "run"]
