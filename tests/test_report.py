"""rankscope.report against hand-built study folders whose answers are known in closed form.

The synthetic values:
    val loss(arm, seed, t) = 5 - t/1000 + LOSS_OFFSET[arm] + 0.02 * seed
    PR(arm, seed, layer, head, t) = PR_BASE[arm] + 2 * layer + head + seed - t/100
so with 2 layers x 2 heads the mean over heads then layers is PR_BASE + 1 + 0.5 + seed - t/100.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rankscope.report import (
    format_table,
    head_layer_mean,
    load_study,
    paradox_table,
    paradox_text,
    write_report,
)
from rankscope.report.plots import safe_names
from rankscope.report.tables import BETTER, fmt_tokens, t975, welch_ci95
from rankscope.store import RunStore, run_dir, write_json

LOSS_OFFSET = {"qk": 0.0, "none": 0.05, "frozen": 0.03}
PR_BASE = {"qk": 10.0, "none": 20.0, "frozen": 15.0}
TOKENS = [0, 100, 200, 300, 400]
N_LAYER, N_HEAD, HEAD_DIM = 2, 2, 8
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def loss(arm: str, seed: int, t: int) -> float:
    return 5 - t / 1000 + LOSS_OFFSET[arm] + 0.02 * seed


def pr(arm: str, seed: int, layer: int, head: int, t: int) -> float:
    return PR_BASE[arm] + 2 * layer + head + seed - t / 100


def make_study(root: Path, arms: dict[str, str], seeds: list[int], *, tokens=TOKENS, done=True,
               probes=True, name="demo", planned_seeds: list[int] | None = None) -> Path:
    """A study folder; `arms` maps the arm name written on disk to its value family in LOSS/PR."""
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "study.json", {
        "name": name, "preset": "tiny", "tokens": 400, "seeds": planned_seeds or seeds,
        "arms": {a: {"model.qk_norm": fam} for a, fam in arms.items()},
        "description": "hand-built test study"})
    for arm, fam in arms.items():
        for seed in seeds:
            add_run(root, arm, fam, seed, tokens=tokens, done=done, probes=probes)
    return root


def add_run(root: Path, arm: str, fam: str, seed: int, *, tokens=TOKENS, done=True, probes=True) -> Path:
    rd = run_dir(root, arm, seed)
    store = RunStore(rd)
    write_json(rd / "config.json", {
        "arm": arm, "seed": seed,
        "model": {"n_layer": N_LAYER, "n_head": N_HEAD, "n_kv_head": N_HEAD, "head_dim": HEAD_DIM,
                  "d_model": 16, "qk_norm": fam, "vocab_size": 64},
        "optim": {"name": "muon"}, "train": {"tokens": 400, "batch_size": 2, "seq_len": 8},
        "probe": {"sites": ["k"]}})
    for i, t in enumerate(tokens):
        store.scalars.append([{"arm": arm, "seed": seed, "step": i, "tokens": t, "train_loss": loss(fam, seed, t),
                               "val_loss": loss(fam, seed, t), "ood_loss": "", "lr_scale": 1.0,
                               "grad_norm": 1.0, "elapsed_s": float(i), "probe_s": 0.0}])
        if probes:
            store.probes.append([{"arm": arm, "seed": seed, "step": i, "tokens": t, "layer": layer, "head": head,
                                  "site": "k", "metric": "pr_sv", "value": pr(fam, seed, layer, head, t)}
                                 for layer in range(N_LAYER) for head in range(N_HEAD)])
    if done:
        store.finish({"tokens": tokens[-1]})
    else:
        store.close()
    return rd


def frames(study: Path):
    s = load_study(study)
    return s.scalars, s.probes, s


# --- the paradox table -------------------------------------------------------------------------


def test_paradox_table_points_means_and_verdict(tmp_path):
    scalars, probes, _ = frames(make_study(tmp_path / "s", {"qk": "qk", "none": "none"}, [0, 1]))
    table = paradox_table(scalars, probes)

    # END = 400 (last point), MIDDLE = the point closest to 400 / 2 = 200
    assert list(table.index) == ["val loss @ 200", "mean key PR @ 200", "val loss @ 400", "mean key PR @ 400"]
    seed_mean = 0.5  # mean of seeds 0 and 1
    for t in (200, 400):
        assert table.loc[f"val loss @ {t}", ("qk", "mean")] == pytest.approx(5 - t / 1000 + 0.02 * seed_mean)
        assert table.loc[f"val loss @ {t}", ("none", "mean")] == pytest.approx(5 - t / 1000 + 0.05 + 0.02 * seed_mean)
        # heads 0,1 -> +0.5; layers 0,1 -> +1.0 (2 * mean layer); seeds -> +0.5
        assert table.loc[f"mean key PR @ {t}", ("qk", "mean")] == pytest.approx(10 + 1 + 0.5 + seed_mean - t / 100)
        assert table.loc[f"mean key PR @ {t}", ("none", "mean")] == pytest.approx(20 + 1 + 0.5 + seed_mean - t / 100)
        assert table.loc[f"val loss @ {t}", ("qk", "tokens")] == t

    # lower loss wins, higher PR wins
    assert table.loc["val loss @ 400", (BETTER, "arm")] == "qk"
    assert table.loc["mean key PR @ 400", (BETTER, "arm")] == "none"
    assert table.loc["val loss @ 400", (BETTER, "margin")] == pytest.approx(0.05)
    assert table.loc["mean key PR @ 400", (BETTER, "margin")] == pytest.approx(10.0)
    # two seeds: sd over seeds of 0.02 * seed, and n
    sd = np.std([0.0, 0.02], ddof=1)
    assert table.loc["val loss @ 400", ("qk", "sd")] == pytest.approx(sd)
    assert (table.xs("n", axis=1, level=1) == 2).all().all()
    # Welch 95% CI of the margin: equal sds, n = 2 each -> df = 2, t = 4.303
    assert table.loc["val loss @ 400", (BETTER, "ci95")] == pytest.approx(4.303 * math.sqrt(sd**2), rel=1e-3)


def test_single_seed_has_no_sd_column(tmp_path):
    scalars, probes, _ = frames(make_study(tmp_path / "s", {"qk": "qk", "none": "none"}, [0]))
    table = paradox_table(scalars, probes)
    assert ("qk", "sd") not in table.columns and (BETTER, "ci95") not in table.columns
    text = format_table(table, "text")
    assert "±" not in text.splitlines()[2]


def test_middle_point_is_closest_to_half_of_the_shared_end(tmp_path):
    # eval points 0, 150, 300, 450, 600; one arm stops at 450, so MIDDLE is the point closest to
    # 450 / 2 = 225: a tie between 150 and 300, which goes to the later point
    toks = [0, 150, 300, 450, 600]
    root = make_study(tmp_path / "s", {"qk": "qk"}, [0], tokens=toks)
    add_run(root, "none", "none", 0, tokens=toks[:4], done=False)
    scalars, probes, study = frames(root)
    table = paradox_table(scalars, probes, finished=study.finished)
    assert table.loc["val loss @ 300", ("qk", "tokens")] == 300
    # END differs between arms (600 vs 450): labelled "@ end", no verdict
    assert table.loc["val loss @ end", ("qk", "tokens")] == 600
    assert table.loc["val loss @ end", ("none", "tokens")] == 450
    assert pd.isna(table.loc["val loss @ end", (BETTER, "arm")])
    assert "not comparable" in format_table(table, "text")


def test_mean_over_heads_then_layers(tmp_path):
    rows = []
    # layer 0: heads 10, 20 -> 15; layer 1: head 0 = 60, head 1 undefined -> 60; mean 37.5 (a grand mean gives 30)
    for head, v in [(0, 10.0), (1, 20.0)]:
        rows.append({"layer": 0, "head": head, "value": v})
    rows += [{"layer": 1, "head": 0, "value": 60.0}, {"layer": 1, "head": 1, "value": float("nan")}]
    probes = pd.DataFrame([{"arm": "a", "seed": 0, "step": 1, "tokens": 100, "site": "k", "metric": "pr_sv", **r}
                           for r in rows])
    # a torn write at tokens=200: only layer 0 made it to disk -> that point is dropped, not half-averaged
    probes = pd.concat([probes, pd.DataFrame([{"arm": "a", "seed": 0, "step": 2, "tokens": 200, "site": "k",
                                               "metric": "pr_sv", "layer": 0, "head": h, "value": 1.0}
                                              for h in (0, 1)])], ignore_index=True)
    out = head_layer_mean(probes)
    assert out["tokens"].tolist() == [100]
    assert out["value"].iloc[0] == pytest.approx(37.5)


# --- partial results ---------------------------------------------------------------------------


def test_unfinished_run_lowers_n_at_end_but_counts_earlier(tmp_path):
    root = make_study(tmp_path / "s", {"qk": "qk", "none": "none"}, [0, 1], planned_seeds=[0, 1, 2])
    add_run(root, "none", "none", 2, tokens=TOKENS[:3], done=False)  # killed at 200
    scalars, probes, study = frames(root)
    table = paradox_table(scalars, probes, finished=study.finished)
    assert table.loc["val loss @ 400", ("none", "n")] == 2        # the finished seeds
    assert table.loc["val loss @ 200", ("none", "n")] == 3        # the killed seed reached 200
    assert table.loc["val loss @ 200", ("none", "mean")] == pytest.approx(5 - 0.2 + 0.05 + 0.02 * 1.0)
    assert table.loc["val loss @ 400", (BETTER, "arm")] == "qk"
    # without knowing which runs finished, END is the last point every run of the arm reached
    literal = paradox_table(scalars, probes)
    assert literal.loc["val loss @ end", ("none", "tokens")] == 200

    path = write_report(root)
    md = path.read_text()
    assert "`none` seed 2: **unfinished** (last eval at 200 of 400 tokens" in md
    assert "`qk` seed 2: **not started**" in md
    assert "(n=2)" in md  # the END cell averages fewer seeds than its arm has, and says so


def test_runs_without_probes_or_rows(tmp_path):
    root = make_study(tmp_path / "s", {"qk": "qk", "none": "none"}, [0], probes=False, done=False)
    RunStore(run_dir(root, "qk", 1)).close()  # a run that has written only its headers
    path = write_report(root)
    plots = sorted(p.name for p in (root / "plots").iterdir())
    assert plots == ["loss_pr.png"]  # no probes: no per-layer bars, no heatmaps
    md = path.read_text()
    assert "| mean key PR" not in md
    assert "no eval point written yet" in md
    assert "val loss @ 400" in paradox_text(root)

    empty = make_study(tmp_path / "empty", {"qk": "qk"}, [])
    assert "No evaluation point written yet." in write_report(empty).read_text()
    assert "(no evaluation points yet)" in paradox_text(empty)


# --- the report and its figures ----------------------------------------------------------------


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5_000, f"{path} is suspiciously small"


def test_write_report_files_and_links(tmp_path):
    arms = {"qk/learned muon": "qk", "none": "none"}  # '/' and ' ' are not file-name safe
    root = make_study(tmp_path / "s", arms, [0, 1])
    out = tmp_path / "out"
    path = write_report(root, out)
    assert path == out / "report.md"
    stems = safe_names(arms)
    assert stems["qk/learned muon"] == "qk_learned_muon"
    expected = ["loss_pr.png"] + [f"{kind}_{stems[a]}.png" for kind in ("layer_pr", "pr_heatmap") for a in arms]
    for name in expected:
        _assert_png(out / "plots" / name)
        assert f"](plots/{name})" in path.read_text()  # embedded with a relative link
    md = path.read_text()
    assert md.startswith("# demo")
    assert "hand-built test study" in md
    assert "`model.qk_norm=qk`" in md and "**preset:** `tiny`" in md and "**seeds:** 0, 1" in md
    assert "| val loss @ 400 |" in md and "✅ **4.810 ± 0.014**" in md
    assert "unfinished" not in md


def test_multiple_study_folders_merge(tmp_path):
    a = make_study(tmp_path / "a", {"qk": "qk", "none": "none"}, [0])
    b = make_study(tmp_path / "b", {"qk": "qk", "none": "none"}, [1])
    study = load_study([a, b])
    assert study.seeds() == [0, 1]
    table = paradox_table(study.scalars, study.probes, finished=study.finished)
    assert table.loc["val loss @ 400", ("qk", "n")] == 2
    assert table.loc["val loss @ 400", ("qk", "mean")] == pytest.approx(5 - 0.4 + 0.01)
    # the same run in two folders: the finished copy wins, and the choice is noted
    add_run(tmp_path / "b", "qk", "qk", 0, tokens=TOKENS[:2], done=False)
    study = load_study([a, b])
    assert len(study.runs) == 4 and any("found twice" in n for n in study.notes)
    assert next(r for r in study.runs if (r.arm, r.seed) == ("qk", 0)).done


def test_three_arms_two_seeds(tmp_path):
    arms = {"qk": "qk", "frozen": "frozen", "none": "none"}
    root = make_study(tmp_path / "s", arms, [0, 1])
    scalars, probes, study = frames(root)
    table = paradox_table(scalars, probes, arms=study.arms)
    # study.json is written with sorted keys, so the study's arm order is alphabetical
    assert study.arms == ["frozen", "none", "qk"]
    assert [a for a in dict.fromkeys(table.columns.get_level_values(0)) if a != BETTER] == study.arms
    assert table.loc["val loss @ 400", (BETTER, "arm")] == "qk"
    assert table.loc["val loss @ 400", (BETTER, "margin")] == pytest.approx(0.03)   # qk vs frozen
    assert table.loc["mean key PR @ 400", (BETTER, "arm")] == "none"
    assert table.loc["mean key PR @ 400", (BETTER, "margin")] == pytest.approx(5.0)  # none vs frozen

    text = paradox_text(root)
    row = next(line for line in text.splitlines() if line.startswith("val loss @ 400"))
    cells = row.split("  ")
    marked = [c.strip() for c in cells if c.strip().endswith("*")]
    assert marked == [f"{5 - 0.4 + 0.01:.3f} ± {np.std([0, 0.02], ddof=1):.3f} *"]  # qk's cell, the last arm
    md = format_table(table, "markdown")
    assert md.count("✅") == 4 + 1  # one per row, plus the legend
    path = write_report(root)
    for a in arms:
        _assert_png(root / "plots" / f"layer_pr_{a}.png")
        _assert_png(root / "plots" / f"pr_heatmap_{a}.png")
    assert path.exists()


# --- helpers ---------------------------------------------------------------------------------


def test_fmt_tokens():
    assert [fmt_tokens(t) for t in (0, 50_000, 500_000, 1_000_000, 16_384_000, 25_000_000, 1.5e9)] == \
        ["0", "50k", "0.5M", "1M", "16.4M", "25M", "1.5B"]


def test_t_quantiles_and_welch():
    assert t975(2) == pytest.approx(4.303)
    assert t975(10) == pytest.approx(2.228)
    assert 2.776 > t975(4.5) > 2.571
    assert t975(1e6) == pytest.approx(1.96, abs=1e-3)
    assert t975(60) == pytest.approx(2.000, abs=2e-3)
    assert math.isnan(welch_ci95(1.0, 1, 1.0, 3))
    assert welch_ci95(0.0, 3, 0.0, 3) == 0.0


def test_report_never_imports_torch():
    code = "import sys, rankscope.report; assert 'torch' not in sys.modules, 'report imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
