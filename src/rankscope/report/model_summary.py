"""The summary `rankscope analyze` writes for one model at one point: where its keys are most and
least collapsed, layer by layer and head by head, in markdown (also printed). Torch-free, like the
rest of `report/`; the command itself is `rankscope.analyze`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..settings.units import fmt_count

TOP = 3  # layers and heads listed as most and least collapsed


def key_pr_grid(table: pd.DataFrame, metric: str = "pr_sv") -> pd.DataFrame:
    """Layers (rows) x key heads (columns) of the key PR."""
    k = table[(table["site"] == "k") & (table["metric"] == metric)]
    return k.pivot_table(index="layer", columns="head", values="value", aggfunc="mean").sort_index()


def keys_word(qk_norm: bool, rotary: str) -> str:
    """What the key site holds for this model, in words."""
    steps = (["QK-Norm"] if qk_norm else []) + (["RoPE"] if rotary not in ("none", "unknown") else [])
    return "the keys" + (f" after {' and '.join(steps)}" if steps else "") + ", as the attention scores see them"


def key_pr_summary(
    table: pd.DataFrame,
    *,
    name: str,
    describe: str,
    data: str,
    shape: tuple[int, int],
    head_dim: int,
    step: int | None,
    tokens: int | None,
    notes: tuple[str, ...] = (),
    keys: str = "the keys",
) -> str:
    """The markdown summary: where keys are most and least collapsed, and each layer's mean."""
    grid = key_pr_grid(table)
    where = ", ".join(
        x for x in (f"step {step}" if step is not None else "", f"{fmt_count(tokens)} tokens" if tokens else "") if x
    )
    lines = [
        f"# rankscope analyze: {name}",
        "",
        f"{describe}" + (f"; {where}" if where else "") + ".",
        f"Probe batch: {shape[0]} x {shape[1]} tokens from {data}.",
        "",
    ]
    lines += [f"Note: {n}" for n in notes] + ([""] if notes else [])
    if grid.empty:
        return "\n".join(lines + ["No key rows were measured."]) + "\n"
    heads = grid.stack().rename("value").reset_index().sort_values(["value", "layer", "head"])
    layer_mean = grid.mean(axis=1)
    overall = float(np.nanmean(grid.to_numpy(float)))
    n = max(1, min(TOP, len(layer_mean) // 2))  # the two lists never share an entry
    k = max(1, min(TOP, len(heads) // 2))

    def fmt_layers(s: pd.Series) -> str:
        return ", ".join(f"layer {int(i)} ({v:.1f})" for i, v in s.items())

    def fmt_heads(d: pd.DataFrame) -> str:
        return ", ".join(f"layer {int(r.layer)} head {int(r.head)} ({r.value:.1f})" for r in d.itertuples())

    lines += [
        f"Key participation ratio (pr_sv of {keys}; 1 = one direction, {head_dim} = all {head_dim}): "
        f"mean {overall:.2f} over {grid.size} key heads.",
        "",
        f"- Most collapsed layers (lowest mean key PR): {fmt_layers(layer_mean.sort_values().head(n))}",
        "- Least collapsed layers (highest mean key PR): "
        f"{fmt_layers(layer_mean.sort_values(ascending=False).head(n))}",
        f"- Most collapsed heads: {fmt_heads(heads.head(k))}",
        f"- Least collapsed heads: {fmt_heads(heads.iloc[::-1].head(k))}",
        "",
    ]
    ent = table[(table["site"] == "attn") & (table["metric"] == "entropy")].groupby("layer")["value"].mean()
    header = "| layer | mean key PR | lowest head | highest head |" + (
        " attention entropy (nats) |" if len(ent) else ""
    )
    lines += [header, "|" + "---|" * (4 + bool(len(ent)))]
    for layer, row in grid.iterrows():
        cells = [
            str(int(layer)),
            f"{row.mean():.2f}",
            f"{row.min():.2f} (head {int(row.idxmin())})",
            f"{row.max():.2f} (head {int(row.idxmax())})",
        ]
        if len(ent):
            cells.append(f"{ent.get(layer, float('nan')):.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["TOP", "key_pr_grid", "keys_word", "key_pr_summary"]
