"""What a report says about the study itself, as blocks: its setup, how its runs differ from the
seed run their preset restages, its arms, the runs that did not finish, and the settings every run
shares. Read from the runs' configs and study.json; no statistics.
"""

from __future__ import annotations

from typing import Any

from ..settings.config import TrainConfig
from ..settings.flat import flatten
from ..settings.seedref import SEED_DATA, differences, reference_for, show_value
from ..settings.units import fmt_count
from .blocks import Table, code, md_escape
from .load import Run, StudyData

# How a rankscope run keeps more checkpoints for `rankscope analyze --series` (said by the command
# and by the report of a series)
KEEP_MORE_CHECKPOINTS = (
    "a rankscope run keeps its checkpoints at train.checkpoint_series log-spaced steps "
    f"(default {TrainConfig().checkpoint_series}) and its newest train.keep_checkpoints"
)


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
    flats = [(r.arm, flatten(r.config)) for r in runs if r.config]
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


def setup_items(study: StudyData) -> list[str]:
    meta = [s for s in study.studies if s]
    cfg = next((r.config for r in study.runs if r.config and r.done), None) or next(
        (r.config for r in study.runs if r.config), {}
    )
    lines = []
    presets = sorted({str(s["preset"]) for s in meta if s.get("preset")})
    if presets:
        lines.append(f"**preset:** {', '.join(code(p) for p in presets)}")
    budgets = sorted(
        {int(s["tokens"]) for s in meta if s.get("tokens")} | {r.target_tokens for r in study.runs if r.target_tokens}
    )
    if budgets:
        lines.append(f"**tokens per run:** {' / '.join(fmt_count(b) for b in budgets)}")
    seeds = study.seeds() or sorted({int(x) for s in meta for x in (s.get("seeds") or [])})
    if seeds:
        lines.append(f"**seeds:** {', '.join(map(str, seeds))}")
    model = _model_line(cfg)
    if model:
        lines.append(f"**model:** {model}")
    train = cfg.get("train") or {}
    points = sorted(set(study.scalars["tokens"].tolist())) if len(study.scalars) else []
    if study.is_series:  # points are checkpoints, not the run's evaluations
        lines += _checkpoint_items(study, points)
    elif train.get("batch_size") and train.get("seq_len"):
        if train.get("eval_schedule") == "log":
            when = f"; eval and probe at {train.get('eval_points', '?')} log-spaced points (and token 0)"
        elif train.get("eval_every"):
            when = f"; eval and probe every {fmt_count(train['eval_every'])} tokens"
        else:
            when = ""
        lines.append(f"**batch:** {train['batch_size']} x {train['seq_len']} tokens{when}")
    if points and not study.is_series:
        lines.append(
            f"**eval points found:** {len(points)}, from {fmt_count(points[0])} to {fmt_count(points[-1])} tokens"
        )
    data = cfg.get("data") or {}
    if cfg.get("data_source"):  # the line the run printed: corpus, documents, token counts
        lines.append(f"**data:** {md_escape(str(cfg['data_source']))}")
    elif data:
        path = data.get("path", "")
        lines.append(f"**data:** {code(path) if path else 'the default corpus'}")
    lines += _seed_difference_items(study)
    probe = cfg.get("probe") or {}
    if probe.get("sites"):
        lines.append(
            f"**probe sites:** {', '.join(code(s) for s in probe['sites'])}"
            + (f" on a fixed batch of {probe['batch_size']} sequences" if probe.get("batch_size") else "")
        )
    return lines


def _checkpoint_items(study: StudyData, points: list[int]) -> list[str]:
    """The checkpoints a series measured (steps and tokens), and how a run keeps more."""
    steps = sorted(set(study.scalars["step"].tolist())) if len(study.scalars) else []
    if not steps:
        return []
    shown = ", ".join(f"{s:,}" for s in steps) if len(steps) <= 12 else f"{steps[0]:,} to {steps[-1]:,}"
    return [
        f"**checkpoints measured:** {len(steps)} (steps {shown}; {fmt_count(points[0])} to "
        f"{fmt_count(points[-1])} tokens), each on one fixed batch; val loss is the next-token loss on that "
        f"batch. For more, {KEEP_MORE_CHECKPOINTS}"
    ]


def _seed_difference_items(study: StudyData) -> list[str]:
    """How the runs differ from the seed run their preset restages (seedref): what every run
    shares, then what only some arms change."""
    presets = [str(s["preset"]) for s in study.studies if s.get("preset")]
    seed_run, reference = reference_for(presets[0] if presets else None)
    per_arm: dict[str, set] = {}
    for r in study.runs:
        if r.config:
            diffs = {(k, show_value(v), show_value(s)) for k, v, s in differences(r.config, reference)}
            per_arm[r.arm] = per_arm[r.arm] & diffs if r.arm in per_arm else diffs
    if not per_arm:
        return []
    common = set.intersection(*per_arm.values())
    order = {k: i for i, k in enumerate(reference)}

    def words(items: set) -> str:
        ordered = sorted(items, key=lambda d: order[d[0]])
        known = [f"{code(k)} {v} (seed {s})" for k, v, s in ordered if v != "unset"]
        unset = [code(k) for k, v, _ in ordered if v == "unset"]
        unrecorded = [f"not recorded by the rankscope that ran them: {', '.join(unset)}"] if unset else []
        return ", ".join(known + unrecorded)

    lines = [
        f"**differs from {seed_run}** (read from its code; arms' QK-Norm and optimizer aside): "
        + (words(common) if common else "in nothing else")
        + f"; the seed trained on {SEED_DATA}"
    ]
    extra = {arm: d - common for arm, d in per_arm.items() if d - common}
    if extra:
        lines.append(
            "**arms that differ from it further:** "
            + "; ".join(f"{md_escape(arm)}: {words(d)}" for arm, d in extra.items())
        )
    return lines


def arms_table(study: StudyData) -> Table:
    overrides: dict[str, dict[str, Any]] = {}
    for s in study.studies:
        for a, o in (s.get("arms") or {}).items():
            overrides.setdefault(str(a), dict(o or {}))
    _, varying = _config_split(study.runs)
    planned = sorted({int(x) for s in study.studies for x in (s.get("seeds") or [])})
    rows = []
    for a in study.arms:
        o = overrides.get(a) or varying.get(a) or {}
        text = ", ".join(code(f"{k}={_value(v)}") for k, v in sorted(o.items())) or "(base settings)"
        runs = [r for r in study.runs if r.arm == a]
        total = max(len(planned), len(runs))
        done = sum(r.done for r in runs)
        div = sum(r.diverged for r in runs)
        reached = sorted({r.last_tokens for r in runs if r.last_tokens is not None})
        where = (
            "–"
            if not reached
            else fmt_count(reached[0])
            if len(reached) == 1
            else f"{fmt_count(reached[0])} – {fmt_count(reached[-1])}"
        )
        status = f"{done} of {total}" + (f" ({div} diverged)" if div else "")
        rows.append([f"**{md_escape(a)}**", text, status, where])
    return Table(["arm", "settings", "runs finished", "tokens reached"], rows)


def status_items(study: StudyData) -> list[str]:
    """Diverged runs first (they need attention), then runs still going or stopped, then planned
    runs that never started."""
    items = []
    for r in study.runs:
        if not r.diverged:
            continue
        of = f" of {fmt_count(r.target_tokens)}" if r.target_tokens else ""
        where = (
            f"last finite eval at {fmt_count(r.last_finite_tokens)}{of} tokens"
            if r.last_finite_tokens is not None
            else "no finite eval point"
        )
        why = f"; {md_escape(r.message)}" if r.message else ""
        items.append(f"{code(r.arm)} seed {r.seed}: **diverged** ({where}{why}) — {code(r.path)}")
    for r in study.runs:
        if r.done or r.diverged:
            continue
        of = f" of {fmt_count(r.target_tokens)}" if r.target_tokens else ""
        where = (
            f"last eval at {fmt_count(r.last_tokens)}{of} tokens"
            if r.last_tokens is not None
            else "no eval point written yet"
        )
        if r.running:
            items.append(f"{code(r.arm)} seed {r.seed}: **running** ({where}; {md_escape(r.running)}) — {code(r.path)}")
        else:
            items.append(
                f"{code(r.arm)} seed {r.seed}: **stopped** ({where}; rerun its command to resume) — {code(r.path)}"
            )
    planned = sorted({int(x) for s in study.studies for x in (s.get("seeds") or [])})
    have = {(r.arm, r.seed) for r in study.runs}
    for s in study.studies:
        for a in s.get("arms") or {}:
            for k in planned:
                if (str(a), k) not in have:
                    items.append(f"{code(a)} seed {k}: **not started**")
                    have.add((str(a), k))
    return items


def shared_settings_table(study: StudyData) -> Table | None:
    """The settings every run shares, one row each; None when there are none."""
    shared, _ = _config_split(study.runs)
    if not shared:
        return None
    return Table(["setting", "value"], [[code(k), code(_value(v))] for k, v in shared.items()])


__all__ = ["setup_items", "arms_table", "status_items", "shared_settings_table"]
