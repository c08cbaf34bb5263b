"""Two settings crossed: the grid is found from the runs' configs, and every effect equals the
seed-by-seed arithmetic with scipy's t-interval."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _studies import write_run
from scipy import stats as sps

from rankscope.report import write_report
from rankscope.report.analysis import compute_numbers
from rankscope.report.factorial import find_grid
from rankscope.report.load import load_study
from rankscope.storage.store import write_record

QK = ("learned", "none")
GROUPING = ("stacked", "separate", "per_head")
SEEDS = (0, 1, 2, 3)
TOKENS = (0, 100, 200)


def pr(qk: str, grouping: str, seed: int) -> float:
    """Key PR at the end: QK-Norm costs 10, stacking costs 3, and both together 4 more; seed noise
    shared by every arm (so pairing removes it) plus a small arm-and-seed term (so intervals have
    width)."""
    learned, stacked = qk == "learned", grouping == "stacked"
    own = 0.1 * ((7 * seed + 3 * QK.index(qk) + GROUPING.index(grouping)) % 5)
    return 50 - 10 * learned - 3 * stacked - 4 * (learned and stacked) + 2 * seed + own


def loss(qk: str, grouping: str, seed: int) -> float:
    return 4.0 - 0.02 * (qk == "learned") + 0.01 * seed


def make(root: Path) -> Path:
    arms = {f"{'qk-norm' if q == 'learned' else 'no-norm'}.{g}": (q, g) for q in QK for g in GROUPING}
    write_record(
        root / "study.json",
        {
            "name": "grid",
            "preset": "tiny",
            "seeds": list(SEEDS),
            "arms": {a: {"model.qk_norm": q, "optim.muon_qkvo": g} for a, (q, g) in arms.items()},
        },
    )
    for arm, (q, g) in arms.items():
        for seed in SEEDS:
            config = {
                "arm": arm,
                "seed": seed,
                "n_params": 100 + (q == "learned"),  # differs, but is no setting
                "model": {"n_layer": 1, "n_head": 1, "head_dim": 64, "d_model": 64, "qk_norm": q},
                "optim": {"name": "muon", "muon_qkvo": g, "muon_lr": 0.012},
                "train": {"tokens": TOKENS[-1], "batch_size": 1, "seq_len": 100},
                "probe": {"sites": ["k"]},
            }
            points = []
            for t in TOKENS:
                f = t / TOKENS[-1]
                probes = [(0, 0, "k", "pr_sv", 64 - (64 - pr(q, g, seed)) * f)]
                if t == TOKENS[-1]:  # functional rank at the end only, per layer (head -1)
                    probes.append((0, -1, "k", "functional_rank", 8 + 2 * (q == "learned") + seed))
                points.append((t, loss(q, g, seed) + (1 - f), probes))
            write_run(root, arm, seed, config, points, summary={"status": "done"})
    return root


def t_interval(d: list[float]) -> tuple[float, float, float]:
    d = np.asarray(d)
    lo, hi = sps.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=sps.sem(d))
    return d.mean(), lo, hi


def test_effects_equal_seed_by_seed_arithmetic(tmp_path):
    an = compute_numbers(load_study(make(tmp_path)))
    assert an.grid is not None
    assert (an.grid.a.key, an.grid.a.levels) == ("model.qk_norm", ("none", "learned"))  # "off" is the reference
    assert an.grid.b.key == "optim.muon_qkvo" and an.grid.b.levels[0] == "stacked"  # the seed's own
    fx = an.effects[an.effects["key"] == "k:pr_sv"]

    def row(kind, factor, level, at):
        r = fx[(fx["kind"] == kind) & (fx["factor"] == factor) & (fx["level"] == level) & (fx["at"] == at)]
        assert len(r) == 1
        return r.iloc[0]

    for g in GROUPING:  # QK-Norm's simple effect at each grouping
        want = t_interval([pr("learned", g, s) - pr("none", g, s) for s in SEEDS])
        got = row("simple", "model.qk_norm", "learned", g)
        assert (got["mean"], got["lo"], got["hi"]) == pytest.approx(want)
        assert got["n"] == len(SEEDS)
    # main effect of QK-Norm: the mean over groupings of the per-seed differences
    want = t_interval([np.mean([pr("learned", g, s) - pr("none", g, s) for g in GROUPING]) for s in SEEDS])
    got = row("main", "model.qk_norm", "learned", "")
    assert (got["mean"], got["lo"], got["hi"]) == pytest.approx(want)
    assert got["mean"] == pytest.approx(-10 - 4 / 3, abs=0.2)
    # the interaction: QK-Norm's gap with separate minus its gap with stacked = the 4 stacking adds
    want = t_interval(
        [
            (pr("learned", "separate", s) - pr("none", "separate", s))
            - (pr("learned", "stacked", s) - pr("none", "stacked", s))
            for s in SEEDS
        ]
    )
    got = row("interaction", "model.qk_norm", "learned", "separate vs stacked")
    assert (got["mean"], got["lo"], got["hi"]) == pytest.approx(want)
    assert got["mean"] == pytest.approx(4, abs=0.5) and got["resolved"]
    # the grouping's own effect without QK-Norm
    want = t_interval([pr("none", "separate", s) - pr("none", "stacked", s) for s in SEEDS])
    got = row("simple", "optim.muon_qkvo", "separate", "none")
    assert (got["mean"], got["lo"], got["hi"]) == pytest.approx(want)
    # validation loss: QK-Norm lowers it by exactly 0.02 in every seed and grouping
    loss_fx = an.effects[
        (an.effects["key"] == "val_loss") & (an.effects.kind == "simple") & (an.effects.factor == "model.qk_norm")
    ]
    assert loss_fx["mean"].to_numpy() == pytest.approx([-0.02] * 3)
    # functional rank, measured at the end only: QK-Norm adds exactly 2 dimensions in every seed
    fr = an.effects[
        (an.effects["key"] == "k:functional_rank")
        & (an.effects.kind == "main")
        & (an.effects.factor == "model.qk_norm")
    ]
    assert fr["mean"].to_numpy() == pytest.approx([2.0]) and fr["n"].to_numpy()[0] == len(SEEDS)


def test_report_has_the_crossed_section_and_words(tmp_path):
    md = write_report(make(tmp_path)).read_text()
    assert "## Two settings crossed" in md
    assert "interaction: (model.qk_norm: learned − none) at optim.muon_qkvo = separate minus at stacked" in md
    assert "From optim.muon_qkvo = stacked to separate that effect changes by 4.0 [" in md
    assert "beyond seed noise" in md
    # seed-by-seed comparisons are the contrasts derived from the settings: pairs that differ in one
    # setting, QK-Norm's "none" as the control, never a pair that differs in both
    # (9 of the 15 pairs: the 6 that differ in both settings are only in the table of every pair)
    assert "the study's 9 contrasts" in md and "| qk-norm.stacked − no-norm.stacked |" in md


def test_no_grid_when_arms_do_not_cross_two_settings():
    base = {"model": {"qk_norm": "learned"}, "optim": {"name": "muon"}}
    two = {"a": base, "b": {"model": {"qk_norm": "none"}, "optim": {"name": "muon"}}}
    assert find_grid(two, ["a", "b"]) is None  # one setting
    cross = {
        f"{q}.{o}": {"model": {"qk_norm": q}, "optim": {"name": o}}
        for q in ("learned", "none")
        for o in ("muon", "adamw")
    }
    grid = find_grid(cross, list(cross))
    assert grid is not None and grid.a.levels == ("none", "learned") and grid.b.levels == ("muon", "adamw")
    del cross["none.adamw"]  # an incomplete grid is not read as one
    assert find_grid(cross, list(cross)) is None


def test_crossed_arms_get_a_hue_per_first_setting_and_a_shade_per_second():
    import matplotlib

    from rankscope.report.plotstyle import arm_colors

    grid = {f"{a}.{b}": (i, j) for i, a in enumerate(("none", "learned")) for j, b in enumerate(GROUPING)}
    colors = arm_colors(list(grid), grid, (2, 3))
    assert colors["none.stacked"] == matplotlib.colormaps["Blues"](0.95)
    assert colors["learned.per_head"] == matplotlib.colormaps["Oranges"](0.55)
    assert len(set(colors.values())) == 6
    assert arm_colors(["a", "b"]) == arm_colors(["a", "b"], None)  # no grid: the study's palette
