"""`rankscope analyze`'s KV-cache headroom: measure a finished model on the probe batch, write
kv_headroom.csv and kv_headroom.png beside probes.csv, and say what was found (or why nothing was
measured) in summary.md's "KV-cache headroom" section. The measurement is `rankscope.measure.headroom`'s
(rankscope's GPT) and `rankscope.attach.headroom`'s (any other model with a key cache and a loss).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..attach.headroom import kv_sites, max_passes, model_kv_headroom
from ..measure.functional_rank import rank_ladder
from ..measure.headroom import kv_headroom

Row = dict[str, Any]
HEADROOM_TABLE = "kv_headroom.csv"  # written by `rankscope analyze` beside probes.csv

AUTO_BUDGET_S = 300.0  # `rankscope analyze --kv-headroom auto` measures a foreign model when it fits this


def _timed_loss(att: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    """Seconds of one loss pass of the attached model (its device synchronised)."""
    import time

    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        sync()
        t0 = time.perf_counter()
        att.loss(x, y)
        sync()
    return time.perf_counter() - t0


def write_headroom(
    model: nn.Module,
    ids: torch.Tensor,
    out_dir: Path,
    base: Row,
    tol: float = 0.01,
    *,
    progress: bool = False,
    mode: str = "on",
) -> tuple[str, Path | None]:
    """`rankscope analyze`: measure the KV headroom of `model` on the probe batch `ids` (B, T)
    (inputs ids[:, :-1], targets ids[:, 1:]; bf16 autocast on CUDA as the trainer's evaluation):
    `kv_headroom` for rankscope's GPT, `model_kv_headroom` for any other model with a key cache and
    a loss (with a progress bar on stderr when `progress`). Writes out_dir/kv_headroom.csv (the
    probe table's columns, `base` filling arm, seed, step, tokens) and out_dir/kv_headroom.png, and
    returns summary.md's "KV-cache headroom" section and the figure's path; for a model whose keys
    cannot be replaced, a section saying so and None. mode "auto": a model other than rankscope's
    is measured only when one loss pass, timed here, times `max_passes` fits in AUTO_BUDGET_S; else
    the section says how long it would take and how to ask for it."""
    import sys

    import pandas as pd
    from tqdm.auto import tqdm

    from ..attach import detect
    from ..core.model import GPT
    from ..report.kv_headroom import PLOT, analyze_markdown, headroom_frame, headroom_table, plot_kv_headroom
    from ..report.plotstyle import arm_colors
    from ..storage.store import PROBE_COLUMNS, TableWriter

    att = detect(model)
    if not isinstance(model, GPT) and not kv_sites(att):
        why = "it has no language-model head" if att.loss is None else "rankscope cannot replace its cached keys"
        return f"\n## KV-cache headroom\n\nNot measured for this {att.family} model: {why}.\n", None
    ids = ids.to(next(model.parameters()).device)
    x, y, dev = ids[:, :-1], ids[:, 1:], ids.device
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        if mode == "auto" and not isinstance(model, GPT):
            passes = max_passes(att, len(rank_ladder(att.head_dim)))
            estimate = passes * _timed_loss(att, x, y)
            if estimate > AUTO_BUDGET_S:
                from ..run.progress import fmt_duration

                return (
                    f"\n## KV-cache headroom\n\nNot measured: on this device it would take about "
                    f"{fmt_duration(estimate)} (up to {passes} forward "
                    f"passes); `--kv-headroom on` measures it.\n",
                    None,
                )
        if isinstance(model, GPT):
            rows = kv_headroom(model, x, y, tol=tol)
        else:
            with tqdm(desc="KV headroom", unit="pass", file=sys.stderr, disable=not progress, leave=False) as bar:

                def tick(done: int, total: int) -> None:
                    bar.total = total
                    bar.update(done - bar.n)

                rows = model_kv_headroom(model, x, y, tol=tol, attachment=att, progress=tick)
    out_dir = Path(out_dir)
    path = out_dir / HEADROOM_TABLE
    path.unlink(missing_ok=True)  # a rerun replaces the table
    writer = TableWriter(path, PROBE_COLUMNS)
    writer.append({**base, **r} for r in rows)
    writer.close()
    arm = str(base["arm"])
    frame = headroom_frame(pd.DataFrame([{**base, "arm": arm, "seed": 0, "tokens": 0, **r} for r in rows]))
    plot = plot_kv_headroom(frame, [arm], arm_colors([arm]), out_dir / PLOT, head_dim=att.head_dim, tol=tol)
    section = analyze_markdown(headroom_table(frame, att.head_dim), tol)
    if plot is not None:
        section += f"\n{plot.caption} ({PLOT})\n"
    return section, plot.path if plot is not None else None
