"""FINDINGS.md's figures and tables, second edition, from the study folders (read-only).

    python studies/findings.py ../rankscope-studies [--out docs/findings]

reads whichever of these folders exist under the given root and prints markdown tables for FINDINGS:

  seed-steps-16m   the seed's 16M headline at its step count (1,953 steps, lr 0.012)
  seed-steps-25m   the seed's 25M figure at its step count and learning rate (6,104 steps, lr 0.024)
  muon-partitions  which partner of K in the stacked Muon narrows the keys (no QK-Norm, 1M tokens)
  depth            the seed's comparison on the 16-layer deep preset (2M tokens)

and draws `trajectory.png` (QK-Norm − none in mean key PR against optimizer steps, with 95% paired
intervals and the seed's two points marked) and `memorization.png` (train and validation loss
against steps, with the passes over the training data). Unfinished runs count up to the last
point they reached, as in `rankscope report`.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from rankscope.report.format import bare_p, fmt_mean_ci, seeds_text
from rankscope.report.layer_contrasts import layer_contrast, layer_contrasts
from rankscope.report.load import StudyData, load_study
from rankscope.report.plotstyle import new_figure, reference_line, save, style_axes
from rankscope.report.series import choose_points, layer_means, quantity_series, seed_stats
from rankscope.report.stats import correlate
from rankscope.report.trajectory import contrast_trajectory

# The seed's published single-seed figures (DESIGN.md): QK-Norm minus none in mean key PR, at its
# optimizer steps. 16M tokens: 43.5 - 46.8 after 1,953 steps of 8,192 tokens (lr 0.012); 25M:
# about 30 - 51 (read off a figure) after 6,104 steps of 4,096 tokens (lr 0.024).
SEED_POINTS = ((1953, 43.5 - 46.8, "seed 16M, lr 0.012"), (6104, 30.0 - 51.0, "seed 25M, lr 0.024 (≈)"))
KEY_PR, UPDATE_PR = "k:pr_sv", "dw_k:pr_sv"


def tokens_per_step(study: StudyData) -> int:
    values = {int(r.config["tokens_per_step"]) for r in study.runs if r.config.get("tokens_per_step")}
    if len(values) != 1:
        raise SystemExit(f"findings: runs of {study.dirs[0]} disagree on tokens per step: {sorted(values)}")
    return values.pop()


def train_tokens(study: StudyData) -> float | None:
    """Training tokens in the corpus, from the runs' data description ("..., 16M tokens)"), for passes."""
    for r in study.runs:
        m = re.search(r"([\d.]+)M (?:train )?tokens", str(r.config.get("data_source", "")))
        if m:
            return float(m.group(1)) * 1e6
    return None


def trajectory_table(study: StudyData, treatment: str, control: str, quantity: str) -> pd.DataFrame:
    s = quantity_series(study.scalars, study.probes, quantity)
    x = contrast_trajectory(s, treatment, control)
    x["steps"] = x["tokens"] // tokens_per_step(study)
    return x


def fmt_row(mean: float, lo: float, hi: float, n: int, d: int = 1) -> str:
    return fmt_mean_ci(mean, lo, hi, n, d) if math.isfinite(mean) else "–"


def print_trajectory(name: str, study: StudyData, treatment: str, control: str) -> pd.DataFrame:
    tps, corpus = tokens_per_step(study), train_tokens(study)
    pr = trajectory_table(study, treatment, control, KEY_PR)
    loss = trajectory_table(study, treatment, control, "val_loss")
    arms = seed_stats(quantity_series(study.scalars, study.probes, KEY_PR))
    print(f"\n### {name}: {treatment} − {control}, mean key PR and val loss at every probe point\n")
    if not len(pr):
        print("(no probe point reached by both arms yet)")
        return pr
    print("| steps | tokens | passes | key PR " + treatment + " | key PR " + control + " | Δ key PR | Δ val loss |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for _, r in pr.iterrows():
        t = int(r["tokens"])
        cells = []
        for arm in (treatment, control):
            a = arms[(arms["arm"] == arm) & (arms["tokens"] == t)]
            cells.append(fmt_row(*a[["mean", "lo", "hi", "n"]].iloc[0]) if len(a) else "–")
        lr = loss[loss["tokens"] == t]
        dl = fmt_row(*lr[["mean", "lo", "hi", "n"]].iloc[0], d=3) if len(lr) else "–"
        passes = f"{t / corpus:.2f}" if corpus else "–"
        dpr = fmt_row(r["mean"], r["lo"], r["hi"], int(r["n"]))
        print(f"| {t // tps:,} | {t / 1e6:.3g}M | {passes} | {cells[0]} | {cells[1]} | {dpr} | {dl} |")
    return pr


def print_layers(name: str, study: StudyData, treatment: str, control: str) -> None:
    """Per layer at the arms' common end, seed by seed (`report.layer_contrasts`): key PR of each arm
    and their difference, with Holm's adjustment over layers; at the same point, the same difference
    in the W_K-update PR and in K's share of the attention update (the mechanism of section 7), where
    recorded; then how the key-PR and update-PR gaps go together over the layer-seeds at each point."""
    lms = {q: layer_means(study.probes, *q) for q in (("k", "pr_sv"), ("dw_k", "pr_sv"), ("dw_k", "k_share"))}
    _, ends = choose_points(quantity_series(study.scalars, study.probes, KEY_PR), study.arms, study.finished)
    found = layer_contrasts(lms[("k", "pr_sv")], [(treatment, control)], ends)
    if not found:
        return
    key = found[0]
    beside = {q: layer_contrast(lms[q], treatment, control, key.tokens).rows.set_index("layer") for q in GAP_COLUMNS}
    print(f"\n### {name}: {treatment} − {control} per layer at {key.tokens / 1e6:.3g}M tokens ({seeds_text(key.n)})\n")
    header = [f"key PR {treatment}", f"key PR {control}", "Δ key PR", "p (Holm)", "Δ W_K-update PR", "Δ K's share"]
    print("| layer | " + " | ".join(header) + " |")
    print("| ---: |" + " ---: |" * len(header))
    for _, r in key.rows.iterrows():
        cells = [f"{r['treatment']:.1f}", f"{r['control']:.1f}", fmt_row(r["mean"], r["lo"], r["hi"], int(r["n"]))]
        cells.append(bare_p(r["p_holm"]))
        for q, d in GAP_COLUMNS.items():
            rows = beside[q]
            hit = rows.loc[r["layer"]] if r["layer"] in rows.index else None
            cells.append(fmt_row(hit["mean"], hit["lo"], hit["hi"], int(hit["n"]), d=d) if hit is not None else "–")
        print(f"| {int(r['layer'])} | " + " | ".join(cells) + " |")
    named = key.beyond_noise()
    print(f"\nLayers beyond seed noise after Holm's adjustment: {', '.join(map(str, named)) or 'none'}.")
    print("\nΔ key PR against Δ W_K-update PR over the layer-seeds (Pearson r [95% CI], Spearman ρ), by step:\n")
    tps = tokens_per_step(study)
    gaps = [per_run_gaps(lms[q], treatment, control) for q in (("k", "pr_sv"), ("dw_k", "pr_sv"))]
    both = pd.concat(gaps, axis=1).dropna()
    for t, at in both.groupby(level="tokens"):
        if len(at) >= 3:
            c = correlate(at.iloc[:, 0], at.iloc[:, 1])
            ci = f"[{c.pearson_lo:.2f}, {c.pearson_hi:.2f}]" if math.isfinite(c.pearson_lo) else ""
            print(f"- step {int(t) // tps:,} ({len(at)}): r = {c.pearson:.2f} {ci}, ρ = {c.spearman:.2f}")


# the update's columns beside key PR in the per-layer tables, with their decimals
GAP_COLUMNS = {("dw_k", "pr_sv"): 1, ("dw_k", "k_share"): 3}


def per_run_gaps(layers: pd.DataFrame, treatment: str, control: str) -> pd.Series:
    """`treatment − control` per (tokens, seed, layer), from `series.layer_means` rows."""
    at = layers.pivot_table(index=["tokens", "seed", "layer"], columns="arm", values="value")
    if treatment not in at or control not in at:
        return pd.Series(dtype=float)
    return at[treatment] - at[control]


def print_partitions(study: StudyData) -> None:
    """Each partition's key PR, W_K-update PR and K's share of the attention update at the end,
    and the update PR averaged over training (every probe point after the first step)."""
    arms = study.arms
    series = {
        q: quantity_series(study.scalars, study.probes, q)
        for q in (KEY_PR, UPDATE_PR, "dw_k:k_share", "dw_k:rms_ratio", "w_k:stable_rank", "val_loss")
    }
    print("\n### muon-partitions: at 1M tokens (each arm's last point)\n")
    header = [
        "partition",
        "key PR",
        "val loss",
        "W_K stable rank",
        "W_K-update PR",
        "K's QKVO share",
        "update RMS / W_K RMS",
    ]
    header.append("update PR over training")
    print("| " + " | ".join(header) + " |")
    print("| --- |" + " ---: |" * (len(header) - 1))
    for a in arms:
        cells = []
        for q, d in (
            (KEY_PR, 1),
            ("val_loss", 3),
            ("w_k:stable_rank", 1),
            (UPDATE_PR, 1),
            ("dw_k:k_share", 3),
            ("dw_k:rms_ratio", 4),
        ):
            s = series[q][series[q]["arm"] == a]
            if not len(s):
                cells.append("–")
                continue
            st = seed_stats(s[s["tokens"] == s["tokens"].max()], by=("arm",))
            cells.append(fmt_row(*st[["mean", "lo", "hi", "n"]].iloc[0], d=d))
        s = series[UPDATE_PR][series[UPDATE_PR]["arm"] == a]
        per_seed = s.groupby("seed", as_index=False)["value"].mean().assign(arm=a)
        st = seed_stats(per_seed, by=("arm",))
        cells.append(fmt_row(*st[["mean", "lo", "hi", "n"]].iloc[0]) if len(st) else "–")
        print(f"| {a} | " + " | ".join(cells) + " |")
    print("\nContrasts at the end (seed by seed):\n")
    for t, c in study.contrasts:
        for q, d in ((KEY_PR, 1), (UPDATE_PR, 1), ("val_loss", 3)):
            x = contrast_trajectory(series[q], t, c)
            if len(x):
                r = x.iloc[-1]
                print(f"- {q} {t} − {c}: {fmt_row(r['mean'], r['lo'], r['hi'], int(r['n']), d)}, p = {r['p']:.2g}")


def plot_trajectory(trajectories: list[tuple[str, pd.DataFrame]], path: Path) -> None:
    fig = new_figure(7.5, 4.2)
    ax = fig.subplots()
    for i, (label, x) in enumerate(trajectories):
        x = x[x["steps"] > 0]
        c = f"C{i}"
        ax.plot(x["steps"], x["mean"], color=c, marker="o", ms=3, lw=1.5, label=label)
        ok = np.isfinite(x["lo"].to_numpy(float))
        if ok.any():
            ax.fill_between(x["steps"][ok], x["lo"][ok], x["hi"][ok], color=c, alpha=0.18, lw=0)
    for steps, gap, label in SEED_POINTS:
        ax.scatter([steps], [gap], marker="*", s=140, color="black", zorder=5)
        ax.annotate(label, (steps, gap), xytext=(-6, -4), textcoords="offset points", ha="right", va="top", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("optimizer steps (log scale)")
    ax.set_ylabel("QK-Norm − none, mean key PR (dimensions)")
    style_axes(ax)
    ax.legend(fontsize=8, frameon=False, loc="lower left")
    reference_line(ax, 0.0, "0")
    save(fig, path)


def plot_memorization(studies: list[tuple[str, StudyData]], path: Path) -> None:
    fig = new_figure(5.2 * len(studies), 3.8)
    axes = fig.subplots(1, len(studies), squeeze=False)[0]
    for ax, (name, study) in zip(axes, studies):
        tps, corpus = tokens_per_step(study), train_tokens(study)
        for i, arm in enumerate(study.arms):
            for col, ls in (("train_loss", "--"), ("val_loss", "-")):
                st = seed_stats(quantity_series(study.scalars, study.probes, col))
                st = st[(st["arm"] == arm) & (st["tokens"] > 0)]
                if not len(st):  # an arm not started yet
                    continue
                ax.plot(st["tokens"] / tps, st["mean"], ls=ls, color=f"C{i}", lw=1.3, label=f"{arm} {col[:-5]}")
        ax.set_xscale("log")
        ax.set_xlabel("optimizer steps (log scale)")
        ax.set_ylabel("loss (nats / token)")
        title = name + (f": {study.scalars['tokens'].max() / corpus:.2f} passes at the end" if corpus else "")
        ax.set_title(title, fontsize=10)
        style_axes(ax)
        ax.legend(fontsize=7, frameon=False)
    save(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="the folder holding the study folders")
    p.add_argument("--out", type=Path, default=Path("docs/findings"), help="where the figures go")
    args = p.parse_args(argv)
    found = {n: args.root / n for n in ("seed-steps-16m", "seed-steps-25m", "muon-partitions", "depth")}
    studies = {n: load_study(d) for n, d in found.items() if (d / "study.json").exists()}
    if not studies:
        print(f"findings: no study folder under {args.root}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    trajectories = []
    for name in ("seed-steps-16m", "seed-steps-25m"):
        if name in studies:
            x = print_trajectory(name, studies[name], "qk-norm", "no-norm")
            n = int(x["n"].max()) if len(x) else 0
            trajectories.append((f"{name} (tiny, {n} seed{'s' if n != 1 else ''})", x))
    if trajectories:
        plot_trajectory(trajectories, args.out / "trajectory.png")
        plot_memorization(
            [(n, studies[n]) for n in ("seed-steps-16m", "seed-steps-25m") if n in studies],
            args.out / "memorization.png",
        )
    if "seed-steps-25m" in studies and "qk-norm-adamw" in studies["seed-steps-25m"].arms:
        print_trajectory("seed-steps-25m", studies["seed-steps-25m"], "qk-norm-adamw", "qk-norm")
    for name in ("seed-steps-16m", "seed-steps-25m", "depth"):
        if name in studies:
            print_layers(name, studies[name], "qk-norm", "no-norm")
    if "depth" in studies:
        print_trajectory("depth", studies["depth"], "qk-norm", "no-norm")
    if "muon-partitions" in studies:
        print_partitions(studies["muon-partitions"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
