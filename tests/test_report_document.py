"""rankscope.report.document: report.md and report.html (files, relative links, sections, one
self-contained HTML page) and the paradox text, for hand-built studies (`_studies.make_study`),
for partial ones (runs stopped, running, diverged, without rows or probes) and for a realistic study
with every metric the trainer records; and the report package never imports torch."""

from __future__ import annotations

import dataclasses
import html.parser
import json
import re
import subprocess
import sys

import pytest
from _studies import TOKENS, add_run, assert_png, frames, make_realistic_study, make_study
from scipy import stats as sps

from rankscope.report import (
    correlation_table,
    head_layer_mean,
    load_study,
    paradox_table,
    paradox_text,
    write_report,
)
from rankscope.report.paradox import BETTER
from rankscope.report.plotstyle import safe_names
from rankscope.report.seedcompare import seed_reference
from rankscope.storage.store import RunStore, run_dir


class _StrictParser(html.parser.HTMLParser):
    """Fails on unbalanced tags: html.parser itself accepts anything."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.srcs += [v for k, v in attrs if k in ("src", "href")]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()


def test_write_report_files_links_and_html(tmp_path):
    arms = {"qk/learned muon": "qk", "none": "none"}  # '/' and ' ' are not file-name safe
    root = make_study(tmp_path / "s", arms, [0, 1])
    out = tmp_path / "out"
    path = write_report(root, out)
    assert path == out / "report.md"
    stems = safe_names(arms)
    assert stems["qk/learned muon"] == "qk_learned_muon"
    # an older study: no downstream, gains, functional rank -> none of those figures; key PR
    # against val loss is still drawn
    # the arms side by side in one figure of each kind
    expected = ["loss_pr.png", "contrasts.png", "layer_contrasts.png", "pr_vs_downstream.png", "diagnosis_arms.png"]
    expected += ["layer_pr_arms.png"]
    expected.append("pr_heatmap_arms.png")
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(expected)
    md = path.read_text()
    for name in expected:
        assert_png(out / "plots" / name)
        assert f"](plots/{name})" in md  # embedded with a relative link
    assert md.startswith("# demo")
    assert "hand-built test study" in md
    assert "`model.qk_norm=qk`" in md and "**preset:** `tiny`" in md and "**seeds:** 0, 1" in md
    assert "## Summary" in md
    assert (
        "Across 2 seeds at 400 tokens, **qk/learned muon** vs **none**: validation loss lower by 0.050 in every seed"
    ) in md
    assert "95% t-intervals over seeds" in md
    assert "unfinished" not in md and "diverged" not in md

    page = (out / "report.html").read_text()
    parser = _StrictParser()
    parser.feed(page)
    parser.close()
    assert not parser.stack, f"unclosed tags {parser.stack}"
    assert page.count('src="data:image/png;base64,') == len(expected)
    assert all(s.startswith("data:image/png;base64,") for s in parser.srcs)  # nothing external
    assert 'src="http' not in page and "<script" not in page and "<link" not in page
    # the same sections as the markdown
    md_heads = [ln.lstrip("#").strip() for ln in md.splitlines() if ln.startswith("## ")]
    html_heads = re.findall(r"<h2>(.*?)</h2>", page)
    assert html_heads == md_heads
    assert "<strong>qk/learned muon</strong>" in page


# --- partial results ------------------------------------------------------------------------------


def test_unfinished_run_lowers_n_at_end_but_counts_earlier(tmp_path):
    root = make_study(tmp_path / "s", {"qk": "qk", "none": "none"}, [0, 1], planned_seeds=[0, 1, 2])
    add_run(root, "none", "none", 2, tokens=TOKENS[:3], done=False)  # killed at 200
    scalars, probes, study = frames(root)
    table = paradox_table(scalars, probes, finished=study.finished)
    assert table.loc["val loss @ 400", ("none", "n")] == 2  # the finished seeds
    assert table.loc["val loss @ 200", ("none", "n")] == 3  # the killed seed reached 200
    assert table.loc["val loss @ 200", ("none", "mean")] == pytest.approx(5 - 0.2 + 0.05 + 0.02 * 1.0)
    assert table.loc["val loss @ 400", (BETTER, "arm")] == "qk"
    # without knowing which runs finished, END is the last point every run of the arm reached
    literal = paradox_table(scalars, probes)
    assert literal.loc["val loss @ end", ("none", "tokens")] == 200

    path = write_report(root)
    md = path.read_text()
    assert "`none` seed 2: **stopped** (last eval at 200 of 400 tokens; rerun its command to resume)" in md
    assert "`qk` seed 2: **not started**" in md
    assert "(n=2)" in md  # the END cell averages fewer seeds than its arm has, and says so

    # a run whose writer is alive (its lock file names this very process) is reported as running
    import os
    import socket

    from rankscope.storage.store import run_lock_path

    lock = run_lock_path(run_dir(root, "none", 2))
    lock.write_text(
        json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now", "what": "rankscope run"})
    )
    md = write_report(root).read_text()
    assert f"`none` seed 2: **running** (last eval at 200 of 400 tokens; pid {os.getpid()} on" in md
    assert "(4 finished, 1 still running: their points so far)" in md  # said once
    # a holder that is gone leaves the file behind: the run is stopped, not running
    lock.write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))
    assert "**stopped**" in write_report(root).read_text()


def test_an_arm_without_runs_yet_is_named_in_the_summary(tmp_path):
    root = make_study(tmp_path / "s", {"qk": "qk", "none": "none"}, [0, 1])
    study = json.loads((root / "study.json").read_text())
    study["arms"]["later"] = {"model.qk_norm": "none"}  # declared, no run folder yet (a shard still to come)
    (root / "study.json").write_text(json.dumps(study))
    md = write_report(root).read_text()
    summary = md.split("## Summary", 1)[1].split("\n## ", 1)[0]
    # the seed count is the arms that ran, not "up to 2 seeds" because one arm has none
    assert "This study ran 3 arms × 2 seeds (4 runs: 4 finished)" in summary
    assert "; not started yet: **later**." in summary
    assert "`later` seed 0: **not started**" in md


def test_diverged_run_is_listed_as_diverged_not_finished(tmp_path):
    root = make_study(tmp_path / "s", {"qk": "qk", "none": "none"}, [0, 1])
    add_run(root, "qk", "qk", 2, diverge_at=300)  # NaN loss at 300: done.json says diverged
    study = load_study(root)
    run = next(r for r in study.runs if (r.arm, r.seed) == ("qk", 2))
    assert run.status == "diverged" and not run.done and run.last_finite_tokens == 200
    assert ("qk", 2) not in study.finished and ("qk", 2) in study.diverged
    table = paradox_table(study.scalars, study.probes, arms=study.arms, finished=study.finished)
    assert table.loc["val loss @ 400", ("qk", "n")] == 2  # the diverged seed adds nothing at the end
    md = write_report(root).read_text()
    assert "`qk` seed 2: **diverged** (last finite eval at 200 of 400 tokens" in md
    assert "diverged at 300 tokens: val\\_loss is nan" in md
    assert "1 diverged" in md and "**qk** seed 2 after 200 tokens" in md
    html_text = (root / "report.html").read_text()
    assert "<strong>diverged</strong>" in html_text
    text = paradox_text(root)
    assert "5 runs, 4 finished, 1 diverged" in text and "diverged: qk/seed-2 after 200" in text
    assert "unfinished" not in text


def test_runs_without_probes_or_rows(tmp_path):
    root = make_study(tmp_path / "s", {"qk": "qk", "none": "none"}, [0], probes=False, done=False)
    RunStore(run_dir(root, "qk", 1)).close()  # a run that has written only its headers
    path = write_report(root)
    plots = sorted(p.name for p in (root / "plots").iterdir())
    # no probes: no per-layer bars, heatmaps, diagnosis; the contrast's val loss over training remains
    assert plots == ["contrasts.png", "loss_pr.png"]
    md = path.read_text()
    assert "| mean key PR" not in md
    assert "no eval point written yet" in md
    assert "val loss @ 400" in paradox_text(root)

    empty = make_study(tmp_path / "empty", {"qk": "qk"}, [])
    assert "No evaluation point written yet." in write_report(empty).read_text()
    assert "(no evaluation points yet)" in paradox_text(empty)
    assert (tmp_path / "empty" / "report.html").exists()


def test_single_eval_point(tmp_path):
    root = make_study(tmp_path / "s", {"qk": "qk", "none": "none"}, [0, 1], tokens=[100])
    md = write_report(root).read_text()
    assert "val loss @ 100" in md
    assert_png(root / "plots" / "loss_pr.png")
    assert "val loss @ 100" in paradox_text(root)


# --- a realistic study: every metric, log-spaced eval points, seed noise --------------------------


@pytest.mark.slow
def test_realistic_study_report(tmp_path):
    # the seed's preset: the report also sets its numbers next to the seed study's (DESIGN.md)
    root = make_realistic_study(
        tmp_path / "real",
        n_layer=4,
        n_head=2,
        head_dim=64,
        n_points=8,
        spectral_sites=("k",),
        rank_grid=(1, 4, 16, 64),
        preset="seed-88m",
    )
    # the demo's collapsed layers are 1 and 3 of 4: with 4 layers the median is still healthy
    path = write_report(root)
    names = sorted(p.name for p in (root / "plots").iterdir())
    figures = ("diagnosis_arms", "downstream", "functional_rank", "rank_sweep", "pr_vs_downstream", "loss_pr")
    for name in figures:
        assert f"{name}.png" in names
    for name in names:
        assert_png(root / "plots" / name)
    md = path.read_text()
    for label in ("OOD loss @ 100M", "ICL score @ 100M", "induction loss @ 100M", "mean induction score @ 100M"):
        assert label in md
    assert "**qk-norm** layers 1, 3" in md  # collapsed layers named in the summary
    # the collapsed-layer table: layer 1's key PR next to the other layers' median
    assert re.search(r"\| 1 \| \d+\.\d \(others \d+\.\d\) \|", md)
    assert "points within one run are not independent" in md
    assert "run ends" in md and "eval points" in md
    assert "log scale" in md or "logarithmic" in md
    assert "QK-Norm gain spread" in md
    # correlations computed by the report equal scipy's on the same points
    study = load_study(root)
    corr = correlation_table(study.scalars, study.probes, finished=study.finished)
    row = corr[(corr["key"] == "val_loss") & (corr["scope"] == "run ends")].iloc[0]
    assert row["n"] == 9 and row["runs"] == 9
    pr_end = head_layer_mean(study.probes)
    pr_end = pr_end[pr_end["tokens"] == pr_end["tokens"].max()].sort_values(["arm", "seed"])
    vl = study.scalars[study.scalars["tokens"] == study.scalars["tokens"].max()].sort_values(["arm", "seed"])
    assert row["pearson"] == pytest.approx(sps.pearsonr(pr_end["value"], vl["val_loss"]).statistic)
    html_page = (root / "report.html").read_text()
    assert html_page.count("data:image/png;base64,") == len(names)
    # the seed comparison: Muon + learned QK-Norm (qk-norm) vs Muon without (no-norm; qk-clip is excluded)
    assert "## Compared with the seed study" in md
    assert "| mean key PR @ 16M | 43.5 |" in md and "| ≈30 |" in md
    assert "At 16M and 25M tokens the key PR order of **qk-norm** and **no-norm** matches the seed's figure" in md
    assert "25M: a separate 25M-token run with Muon lr 0.024" in md  # the 25M figure's own settings
    # a QK-Clip arm (optim.qk_clip_tau > 0, no QK-Norm) is not the seed's plain arm, even when it is met first
    clip_first = dataclasses.replace(study, runs=sorted(study.runs, key=lambda r: r.arm != "qk-clip"))
    header, _, _ = seed_reference(clip_first, {})
    assert header == ["quantity", "seed: QK-Norm", "qk-norm", "seed: no QK-Norm", "no-norm"]
    # the setup says how the runs differ from the seed's 88M study, setting by setting
    assert "**differs from the seed's 88M study**" in md and "`model.n_layer` 4 (seed 22)" in md
    # a Muon arm not trained as the seed trained (Q, K, V, O separate) is not set next to its figures
    for rd in (root / "qk-norm").iterdir():
        cfg = json.loads((rd / "config.json").read_text())
        cfg["optim"]["muon_qkvo"] = "separate"
        (rd / "config.json").write_text(json.dumps(cfg))
    assert "## Compared with the seed study" not in write_report(root).read_text()


# --- the whole package ----------------------------------------------------------------------------


def test_report_never_imports_torch():
    # every module of the package, including those `rankscope analyze` borrows (its summary and heatmap)
    code = (
        "import importlib, pkgutil, sys, rankscope.report as r\n"
        "names = [m.name for m in pkgutil.iter_modules(r.__path__, 'rankscope.report.')]\n"
        "assert len(names) > 10, names\n"
        "for n in names: importlib.import_module(n)\n"
        "assert 'torch' not in sys.modules, 'report imported torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
