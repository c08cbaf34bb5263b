"""report.md for one or more study folders: setup, arms, run status, the paradox table and figures.

Works on whatever is on disk: runs still going or killed (their complete rows are used and the
run is listed as unfinished), arms with no runs yet, probes not yet written (figures that need
them are skipped), any number of arms, seeds and eval points.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .load import Run, StudyData, StudyDirs, load_study
from .plots import (
    Plot,
    arm_colors,
    plot_layer_pr,
    plot_loss_pr,
    plot_pr_heatmap,
    safe_names,
)
from .tables import (
    SITE_DESCRIPTIONS,
    choose_points,
    fmt_tokens,
    format_table,
    head_layer_mean,
    layer_means,
    loss_series,
    md_escape,
    metric_summary,
    paradox_table,
    quantity_name,
    seed_stats,
)

# --- figures --------------------------------------------------------------------------------------

def _head_dim(study: StudyData) -> int | None:
    """The head dimension every run shares (the most a head's PR can reach), or None."""
    dims = set()
    for r in study.runs:
        m = r.config.get("model") or {}
        hd = m.get("head_dim") or (m["d_model"] // m["n_head"] if m.get("d_model") and m.get("n_head") else None)
        if hd:
            dims.add(int(hd))
    return dims.pop() if len(dims) == 1 else None


def draw_plots(study: StudyData, plots_dir: Path, site: str = "k", metric: str = "pr_sv") -> list[Plot]:
    """Every figure the data allows, in report order."""
    arms, colors, stems = study.arms, arm_colors(study.arms), safe_names(study.arms)
    head_dim = _head_dim(study) if metric in ("pr_sv", "pr_eig", "erank", "stable_rank", "r90") else None
    quantity = quantity_name(site, metric)
    plots: list[Plot] = []

    loss = loss_series(study.scalars)
    pr = head_layer_mean(study.probes, site, metric)
    # the legend counts the seeds drawn, not runs that have written nothing yet
    drawn = pd.concat([loss[["arm", "seed"]], pr[["arm", "seed"]]]).drop_duplicates()
    seeds = drawn.groupby("arm")["seed"].nunique().to_dict()
    p = plot_loss_pr(seed_stats(loss), seed_stats(pr), arms, colors, plots_dir / "loss_pr.png",
                     head_dim=head_dim, quantity=quantity, site_text=SITE_DESCRIPTIONS.get(site, f"{site} site"),
                     seeds=seeds)
    if p:
        plots.append(p)

    lm = layer_means(study.probes, site, metric)
    if not len(lm):
        return plots
    # per-layer bars at each arm's END, the same point the paradox table reports
    _, ends = choose_points(pr, arms, study.finished)
    at_end = pd.concat([lm[(lm["arm"] == a) & (lm["tokens"] == t)] for a, t in ends.items()], ignore_index=True)
    bars = seed_stats(at_end, by=("arm", "layer", "tokens"))
    ymax = float(np.nanmax(bars["max"].to_numpy(float))) if len(bars) else 1.0
    ymax = max(ymax, head_dim or 0) * 1.1  # headroom for the value printed over each bar
    for a in arms:
        p = plot_layer_pr(bars[bars["arm"] == a], a, colors[a], plots_dir / f"layer_pr_{stems[a]}.png",
                          ymax=ymax, head_dim=head_dim, quantity=quantity)
        if p:
            plots.append(p)

    # heatmaps: mean over seeds per (layer, eval point), one colour scale for all arms
    grid = lm.groupby(["arm", "layer", "tokens"], as_index=False)["value"].mean()
    vmin, vmax = float(grid["value"].min()), float(grid["value"].max())
    if not vmax > vmin:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    for a in arms:
        p = plot_pr_heatmap(grid[grid["arm"] == a], a, plots_dir / f"pr_heatmap_{stems[a]}.png",
                            vmin=vmin, vmax=vmax, quantity=quantity, n_seeds=lm[lm["arm"] == a]["seed"].nunique())
        if p:
            plots.append(p)
    return plots


# --- markdown pieces --------------------------------------------------------------------------------

def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v)) if v else "(none)"
    if isinstance(v, str):
        return v if v else '""'
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 100_000:
        return f"{v:,}"
    return str(v)


def _config_split(runs: list[Run]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(settings shared by every run, {arm: settings that set it apart})."""
    flats = [(r.arm, _flat(r.config)) for r in runs if r.config]
    if not flats:
        return {}, {}
    keys = sorted({k for _, f in flats for k in f} - {"arm", "seed"})
    shared, varying = {}, []
    for k in keys:
        vals = {repr(f.get(k)) for _, f in flats}
        if len(vals) == 1:
            shared[k] = flats[0][1].get(k)
        else:
            varying.append(k)
    per_arm: dict[str, dict[str, Any]] = {}
    for arm, f in flats:
        per_arm.setdefault(arm, {}).update({k: f.get(k) for k in varying})
    return shared, per_arm


def _model_line(cfg: dict[str, Any]) -> str | None:
    m = cfg.get("model") or {}
    if not m:
        return None
    bits = []
    if "n_layer" in m:
        bits.append(f"{m['n_layer']} layers")
    if "d_model" in m:
        bits.append(f"d_model {m['d_model']}")
    if "n_head" in m:
        heads = f"{m['n_head']} query heads"
        if m.get("n_kv_head") and m["n_kv_head"] != m["n_head"]:
            heads += f" / {m['n_kv_head']} KV heads"
        bits.append(heads)
    if "head_dim" in m:
        bits.append(f"head dim {m['head_dim']}")
    if "d_mlp" in m:
        bits.append(f"MLP {m['d_mlp']}")
    if "vocab_size" in m:
        bits.append(f"vocab {m['vocab_size']}")
    if "max_seq_len" in m:
        bits.append(f"context {m['max_seq_len']}")
    return ", ".join(bits) if bits else None


def _setup_lines(study: StudyData) -> list[str]:
    meta = [s for s in study.studies if s]
    cfg = next((r.config for r in study.runs if r.config and r.done), None) or \
        next((r.config for r in study.runs if r.config), {})
    lines = []
    presets = sorted({str(s["preset"]) for s in meta if s.get("preset")})
    if presets:
        lines.append(f"- **preset:** {', '.join(f'`{p}`' for p in presets)}")
    budgets = sorted({int(s["tokens"]) for s in meta if s.get("tokens")} |
                     {r.target_tokens for r in study.runs if r.target_tokens})
    if budgets:
        lines.append(f"- **tokens per run:** {' / '.join(fmt_tokens(b) for b in budgets)}")
    seeds = study.seeds() or sorted({int(x) for s in meta for x in (s.get("seeds") or [])})
    if seeds:
        lines.append(f"- **seeds:** {', '.join(map(str, seeds))}")
    model = _model_line(cfg)
    if model:
        lines.append(f"- **model:** {model}")
    train = cfg.get("train") or {}
    if train.get("batch_size") and train.get("seq_len"):
        lines.append(f"- **batch:** {train['batch_size']} x {train['seq_len']} tokens"
                     + (f"; eval and probe every {fmt_tokens(train['eval_every'])} tokens"
                        if train.get("eval_every") else ""))
    data = cfg.get("data") or {}
    if data:
        path = data.get("path", "")
        lines.append(f"- **data:** {f'`{path}`' if path else 'the embedded corpus'}")
    probe = cfg.get("probe") or {}
    if probe.get("sites"):
        lines.append(f"- **probe sites:** {', '.join(f'`{s}`' for s in probe['sites'])}"
                     + (f" on a fixed batch of {probe['batch_size']} sequences" if probe.get("batch_size") else ""))
    return lines


def _arms_table(study: StudyData) -> list[str]:
    overrides: dict[str, dict[str, Any]] = {}
    for s in study.studies:
        for a, o in (s.get("arms") or {}).items():
            overrides.setdefault(str(a), dict(o or {}))
    _, varying = _config_split(study.runs)
    planned = sorted({int(x) for s in study.studies for x in (s.get("seeds") or [])})
    lines = ["| arm | settings | runs finished | tokens reached |", "| :--- | :--- | :--- | :--- |"]
    for a in study.arms:
        o = overrides.get(a) or varying.get(a) or {}
        text = ", ".join(f"`{k}={_value(v)}`" for k, v in sorted(o.items())) or "(base settings)"
        runs = [r for r in study.runs if r.arm == a]
        total = max(len(planned), len(runs))
        done = sum(r.done for r in runs)
        reached = sorted({r.last_tokens for r in runs if r.last_tokens is not None})
        where = ("–" if not reached else fmt_tokens(reached[0]) if len(reached) == 1
                 else f"{fmt_tokens(reached[0])} – {fmt_tokens(reached[-1])}")
        lines.append(f"| **{md_escape(a)}** | {text} | {done} of {total} | {where} |")
    return lines


def _unfinished_lines(study: StudyData) -> list[str]:
    lines = []
    for r in study.runs:
        if r.done:
            continue
        of = f" of {fmt_tokens(r.target_tokens)}" if r.target_tokens else ""
        where = (f"last eval at {fmt_tokens(r.last_tokens)}{of} tokens" if r.last_tokens is not None
                 else "no eval point written yet")
        lines.append(f"- `{r.arm}` seed {r.seed}: **unfinished** ({where}; still running, or stopped) — `{r.path}`")
    planned = sorted({int(x) for s in study.studies for x in (s.get("seeds") or [])})
    have = {(r.arm, r.seed) for r in study.runs}
    for s in study.studies:
        for a in (s.get("arms") or {}):
            for k in planned:
                if (str(a), k) not in have:
                    lines.append(f"- `{a}` seed {k}: **not started**")
                    have.add((str(a), k))
    return lines


def _summary_table(summary: pd.DataFrame, arms: list[str]) -> list[str]:
    if not len(summary):
        return []
    header = "| site | metric | " + " | ".join(md_escape(a) for a in arms) + " |"
    lines = [header, "| :--- | :--- " + "| ---: " * len(arms) + "|"]
    for (site, metric), row in summary.iterrows():
        cells = []
        vals = [row[(a, "mean")] for a in arms]
        finite = [abs(v) for v in vals if np.isfinite(v)]
        top = max(finite) if finite else 0
        d = 1 if top >= 10 else 2 if top >= 0.1 else 3
        for a in arms:
            m, sd, n = row[(a, "mean")], row[(a, "sd")], row[(a, "n")]
            if not n or not np.isfinite(m):
                cells.append("–")
                continue
            cells.append(f"{m:.{d}f}" + (f" ± {sd:.{d}f}" if n >= 2 and np.isfinite(sd) else ""))
        lines.append(f"| `{site}` | `{metric}` | " + " | ".join(cells) + " |")
    return lines


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def _title(study: StudyData) -> str:
    names = list(dict.fromkeys(str(s["name"]) for s in study.studies if s.get("name")))
    return " + ".join(names) if names else study.dirs[0].resolve().name


def render_markdown(study: StudyData, table: pd.DataFrame, plots: list[Plot], out_dir: Path,
                    site: str = "k", metric: str = "pr_sv") -> str:
    arms = study.arms
    quantity = quantity_name(site, metric)
    n_done = sum(r.done for r in study.runs)
    md = [f"# {_title(study)}", ""]
    for desc in dict.fromkeys(str(s["description"]).strip() for s in study.studies if s.get("description")):
        md += [desc, ""]
    sources = ", ".join(f"`{d}`" for d in study.dirs)
    md += [f"_rankscope report over {len(study.runs)} runs ({n_done} finished) from {sources}._", ""]

    md += ["## Setup", ""] + _setup_lines(study) + [""]
    md += ["## Arms", ""] + _arms_table(study) + [""]
    unfinished = _unfinished_lines(study)
    if unfinished:
        md += ["## Runs not finished", "",
               "Their complete rows are used; they drop out of a point they have not reached.", ""]
        md += unfinished + [""]
    if study.notes:
        md += ["## Notes", ""] + [f"- {n}" for n in study.notes] + [""]

    md += ["## The paradox table", ""]
    if len(table):
        md += [f"Validation loss and {quantity} (`{metric}` at site `{site}`: "
               f"{SITE_DESCRIPTIONS.get(site, site)}, averaged over heads, then layers) at the middle and "
               "at the end of training; mean over seeds. The middle is the eval point closest to half of "
               "the last point every arm reached; an arm's end is the last point all its finished runs "
               "reached. Arms at different token counts are not compared.", ""]
        md += [format_table(table, "markdown"), ""]
    else:
        md += ["No evaluation point written yet.", ""]

    sections = [("Loss and rank over training", lambda p: p.path.name == "loss_pr.png"),
                (f"{quantity[0].upper() + quantity[1:]} per layer at the end of training",
                 lambda p: p.path.name.startswith("layer_pr_")),
                (f"{quantity[0].upper() + quantity[1:]} per layer over training",
                 lambda p: p.path.name.startswith("pr_heatmap_"))]
    md += ["## Figures", ""]
    if not plots:
        md += ["No data to plot yet.", ""]
    for heading, pick in sections:
        chosen = [p for p in plots if pick(p)]
        if not chosen:
            continue
        md += [f"### {heading}", ""]
        for p in chosen:
            alt = p.path.stem.replace("_", " ")
            md += [f"![{alt}]({_rel(p.path, out_dir)})", "", f"*{p.caption}*", ""]

    summary = metric_summary(study.probes, arms=arms, finished=study.finished)
    if len(summary):
        md += ["## Every probe metric at the end of training", "",
               "Mean over heads, then layers (per-layer metrics: over layers), then seeds (± one sd), "
               "at each arm's end point.", ""]
        md += _summary_table(summary, arms) + [""]

    shared, _ = _config_split(study.runs)
    if shared:
        md += ["<details><summary>Settings shared by every run</summary>", "",
               "| setting | value |", "| :--- | :--- |"]
        md += [f"| `{k}` | `{_value(v)}` |" for k, v in shared.items()]
        md += ["", "</details>", ""]
    return "\n".join(md).rstrip() + "\n"


# --- public entry points ------------------------------------------------------------------------------

def _write_text(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: a reader never sees half a report."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(study_dirs: StudyDirs, out_dir: str | Path | None = None, *,
                 site: str = "k", metric: str = "pr_sv") -> Path:
    """Write ``out_dir/report.md`` and its figures under ``out_dir/plots/``; return the report's path.

    `study_dirs`: one study folder or several to merge. `out_dir` defaults to the first of them.
    `site`/`metric` choose the probe quantity of the table and figures (default: the seed's key PR).
    """
    study = load_study(study_dirs)
    out = Path(out_dir) if out_dir is not None else study.dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    table = paradox_table(study.scalars, study.probes, site, metric, arms=study.arms, finished=study.finished)
    plots = draw_plots(study, out / "plots", site, metric)
    path = out / "report.md"
    _write_text(path, render_markdown(study, table, plots, out, site, metric))
    return path


def paradox_text(study_dirs: StudyDirs, *, site: str = "k", metric: str = "pr_sv") -> str:
    """The paradox table as aligned plain text, for the terminal at the end of `rankscope run`."""
    study = load_study(study_dirs)
    table = paradox_table(study.scalars, study.probes, site, metric, arms=study.arms, finished=study.finished)
    n_done = sum(r.done for r in study.runs)
    head = f"{_title(study)}: {len(study.runs)} runs, {n_done} finished"
    lines = [head, "", format_table(table, "text")]
    open_runs = [f"{r.arm}/seed-{r.seed}" + (f" at {fmt_tokens(r.last_tokens)}" if r.last_tokens is not None else "")
                 for r in study.runs if not r.done]
    if open_runs:
        lines += ["", "unfinished: " + ", ".join(open_runs)]
    return "\n".join(lines)


__all__ = ["write_report", "paradox_text", "draw_plots", "render_markdown"]
