"""report.layer_contrasts: a contrast in each layer, against scipy's paired t and Holm's adjustment
written out here; the common end of two arms; the words; and the report's section and figure."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from _studies import N_LAYER, assert_png, make_realistic_study, make_study, pr, write_run
from scipy import stats as sps

from rankscope.report import load_study, write_report
from rankscope.report.analysis import compute_numbers
from rankscope.report.layer_contrasts import (
    common_end,
    describe,
    layer_contrast,
    layer_contrasts,
    layer_list,
    summary_sentence,
)
from rankscope.report.series import layer_means
from rankscope.report.stats import PAIRED, PAIRED_CONSTANT, SINGLE, WELCH
from rankscope.storage.store import write_record

SEEDS, LAYERS, END = (0, 1, 2, 3), 6, 5000
SHIFT = {2: -8.0, 4: 0.6}  # layer 2: a large shift in every seed; layer 4: a small one lost in noise


def layers_frame(seeds=SEEDS, tokens=(1000, END), rng_seed=0) -> pd.DataFrame:
    """Per-layer values of arms a and b: b's value plus SHIFT[layer] and noise for a."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for t in tokens:
        for s in seeds:
            for layer in range(LAYERS):
                base = 40 + 2 * layer + s + rng.normal()
                rows.append(("b", s, t, layer, base))
                rows.append(("a", s, t, layer, base + SHIFT.get(layer, 0.0) + rng.normal()))
    return pd.DataFrame(rows, columns=["arm", "seed", "tokens", "layer", "value"])


def holm_by_hand(p: list[float]) -> list[float]:
    """Holm (1979) step-down: sort, multiply the i-th smallest by m − i, carry the maximum forward."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def test_each_layer_is_the_paired_t_over_seeds_and_holm_over_layers():
    f = layers_frame()
    c = layer_contrast(f, "a", "b", END)
    assert c.rows["layer"].tolist() == list(range(LAYERS))
    ps = []
    for _, row in c.rows.iterrows():
        at = f[(f["tokens"] == END) & (f["layer"] == row["layer"])].pivot(index="seed", columns="arm", values="value")
        d = (at["a"] - at["b"]).to_numpy()
        half = sps.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
        assert row["mean"] == pytest.approx(d.mean())
        assert (row["lo"], row["hi"]) == pytest.approx((d.mean() - half, d.mean() + half))
        assert row["p"] == pytest.approx(sps.ttest_rel(at["a"], at["b"]).pvalue)
        assert (row["treatment"], row["control"]) == pytest.approx((at["a"].mean(), at["b"].mean()))
        assert row["n"] == len(SEEDS) and row["test"] == PAIRED
        ps.append(sps.ttest_rel(at["a"], at["b"]).pvalue)
    assert c.rows["p_holm"].tolist() == pytest.approx(holm_by_hand(ps))
    # the large shift survives the adjustment over six layers; nothing else does
    assert c.beyond_noise() == [2]
    assert c.tokens == END and c.n == len(SEEDS)


def test_the_common_end_is_the_last_point_both_arms_reached():
    f = layers_frame(tokens=(1000, 3000, END))
    assert common_end(f, "a", "b", {"a": END, "b": END}) == END
    # b stopped at 3000: the arms are compared there, not at a's end
    assert common_end(f, "a", "b", {"a": END, "b": 3000}) == 3000
    # different eval schedules: the last point both have, at or before both ends
    g = f[~((f["arm"] == "b") & (f["tokens"] == END))]
    assert common_end(g, "a", "b", {"a": END, "b": END}) == 3000
    assert common_end(f, "a", "c", {"a": END, "b": END}) is None
    assert common_end(f[f["tokens"] == END], "a", "b", {"a": 1000, "b": 1000}) is None
    got = layer_contrasts(f, [("a", "b"), ("a", "missing")], {"a": END, "b": 3000})
    assert [(c.treatment, c.control, c.tokens) for c in got] == [("a", "b", 3000)]


def test_unshared_seeds_fall_back_to_welch_and_one_seed_gives_no_interval():
    f = layers_frame()
    unpaired = f[((f["arm"] == "a") & f["seed"].isin((0, 1))) | ((f["arm"] == "b") & f["seed"].isin((2, 3)))]
    c = layer_contrast(unpaired, "a", "b", END)
    assert set(c.rows["test"]) == {WELCH}
    for _, row in c.rows.iterrows():
        at = unpaired[(unpaired["tokens"] == END) & (unpaired["layer"] == row["layer"])]
        va, vb = (at.loc[at["arm"] == x, "value"].to_numpy() for x in ("a", "b"))
        assert row["mean"] == pytest.approx(va.mean() - vb.mean())
        assert row["p"] == pytest.approx(sps.ttest_ind(va, vb, equal_var=False).pvalue)
        # the arms' means over all their seeds, as the difference uses them
        assert (row["treatment"], row["control"]) == pytest.approx((va.mean(), vb.mean()))

    # a run still going: one seed shared, a second in one arm only. The difference is that seed's,
    # and so are the arms' values beside it (treatment − control reads as the difference shown)
    partial = f[(f["arm"] == "a") & f["seed"].isin((0, 1)) | (f["arm"] == "b") & (f["seed"] == 0)]
    c = layer_contrast(partial, "a", "b", END)
    assert set(c.rows["test"]) == {SINGLE}
    assert (c.rows["treatment"] - c.rows["control"]).tolist() == pytest.approx(c.rows["mean"].tolist())
    seed0 = partial[(partial["tokens"] == END) & (partial["seed"] == 0)]
    seed0 = seed0.pivot(index="layer", columns="arm", values="value")
    assert c.rows["mean"].tolist() == pytest.approx((seed0["a"] - seed0["b"]).tolist())

    one = layer_contrast(f[f["seed"] == 0], "a", "b", END)
    assert set(one.rows["test"]) == {SINGLE} and one.rows["lo"].isna().all() and one.beyond_noise() == []
    assert "one seed: no layer can be told from seed noise" in describe(one, "key PR", 1)


def test_the_words_name_the_extremes_and_the_layers_beyond_noise():
    c = layer_contrast(layers_frame(), "a", "b", END)
    text = describe(c, "key PR", 1)
    top = int(c.rows.loc[c.rows["mean"].idxmax(), "layer"])
    assert text.startswith("Key PR, a − b at 5k tokens (4 seeds): from −7.2 [")
    assert "] in layer 2 to " in text and f"] in layer {top};" in text
    assert "beyond seed noise after Holm's adjustment over 6 layers: layer 2." in text
    assert (layer_list([3]), layer_list([1, 3]), layer_list([0, 2, 3])) == (
        "layer 3",
        "layers 1 and 3",
        "layers 0, 2 and 3",
    )
    f = layers_frame()
    f.loc[f["arm"] == "a", "value"] = f.loc[f["arm"] == "b", "value"].to_numpy()  # no difference anywhere
    none = describe(layer_contrast(f, "a", "b", END), "key PR", 1)
    assert set(layer_contrast(f, "a", "b", END).rows["test"]) == {PAIRED_CONSTANT}
    assert "no layer stands out from seed noise" in none


def test_the_report_has_the_section_and_its_figure(tmp_path):
    # _studies.pr: qk is 10 below none in every layer, head and seed: a constant paired shift
    root = make_study(tmp_path / "s", {"qk": "qk", "none": "none"}, [0, 1])
    out = tmp_path / "out"
    text = write_report(root, out).read_text()
    section = text.split("## The contrasts layer by layer", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == N_LAYER
    for line in rows:
        assert "−10.0 (same in every seed)" in line
    assert "plots/layer_contrasts.png" in section
    assert_png(out / "plots" / "layer_contrasts.png")


def test_the_realistic_study_finds_its_collapsed_layers(tmp_path):
    # make_realistic_study: QK-Norm's layers 1 and 3 collapse, in every seed
    root = make_realistic_study(tmp_path / "s", n_points=6)
    numbers = compute_numbers(load_study(root))
    by = {(c.treatment, c.control): c for c in numbers.layer_contrasts}
    qk = next(c for (t, k), c in by.items() if "qk-norm" in (t, k) and "no-norm" in (t, k))
    sign = 1 if qk.treatment == "qk-norm" else -1  # qk-norm − no-norm in each layer
    gaps = dict(zip(qk.rows["layer"], sign * qk.rows["mean"]))
    others = [v for k, v in gaps.items() if k not in (1, 3)]
    assert max(gaps[1], gaps[3]) < min(others)
    assert {1, 3} <= set(qk.beyond_noise())


def test_the_summary_names_the_layers_beyond_noise_or_none():
    c = layer_contrast(layers_frame(), "a", "b", END)
    line = summary_sentence([c], "key PR")
    mean2 = c.rows.loc[c.rows["layer"] == 2, "mean"].iloc[0]
    assert line.endswith(f"stands out from seed noise: **a** − **b** in layer 2 (−{abs(mean2):.1f}).")
    f = layers_frame()
    f.loc[f["layer"] == 2, "value"] = f.loc[f["layer"] == 1, "value"].to_numpy()  # layer 2's shift gone
    quiet = layer_contrast(f, "a", "b", END)
    assert quiet.beyond_noise() == []
    both = summary_sentence([c, quiet], "key PR")
    assert both.endswith("**a** − **b** in layer 2 (−7.2); **a** − **b** in no layer of 6.")
    # one seed: nothing can be judged, so the summary says nothing about layers
    assert summary_sentence([layer_contrast(layers_frame(seeds=(0,)), "a", "b", END)], "key PR") is None
    assert summary_sentence([], "key PR") is None


def test_the_report_sets_the_update_pr_beside_each_layer(tmp_path):
    """Where the runs record the W_K-update PR, each layer's row carries its contrast as well: its own
    paired t over seeds at the key-PR contrast's point (here: the update 5 dimensions narrower in layer
    1 under "qk", plus seed noise; key PR as in `_studies.pr`)."""
    rng = np.random.default_rng(1)
    root = tmp_path / "s"
    root.mkdir()
    write_record(root / "study.json", {"name": "u", "arms": {"qk": {}, "none": {}}, "contrasts": [["qk", "none"]]})
    config = {"model": {"n_layer": 2, "n_head": 2, "head_dim": 8, "d_model": 16}, "train": {"tokens": 400}}
    for arm in ("qk", "none"):
        for seed in (0, 1, 2):
            points = []
            for t in (0, 200, 400):
                rows = [(la, h, "k", "pr_sv", pr(arm, seed, la, h, t)) for la in range(2) for h in range(2)]
                shift = -5.0 if arm == "qk" and t == 400 else 0.0
                update = [30 + seed + shift * la + rng.normal() for la in range(2) for _ in range(2)]
                rows += [(i // 2, i % 2, "dw_k", "pr_sv", v) for i, v in enumerate(update)]
                points.append((t, 5.0 - t / 1000, rows))
            write_run(root, arm, seed, {**config, "arm": arm, "seed": seed}, points, summary={"tokens": 400})
    study = load_study(root)
    numbers = compute_numbers(study)
    (key,), (upd,) = numbers.layer_contrasts, numbers.update_layer_contrasts
    assert (upd.treatment, upd.control, upd.tokens) == (key.treatment, key.control, key.tokens) == ("qk", "none", 400)
    direct = layer_means(study.probes, "dw_k", "pr_sv")
    for _, row in upd.rows.iterrows():
        at = direct[(direct["tokens"] == 400) & (direct["layer"] == row["layer"])]
        at = at.pivot(index="seed", columns="arm", values="value")
        assert row["mean"] == pytest.approx((at["qk"] - at["none"]).mean())
        assert row["p"] == pytest.approx(sps.ttest_rel(at["qk"], at["none"]).pvalue)
    assert upd.rows.loc[upd.rows["layer"] == 1, "mean"].iloc[0] == pytest.approx(-5.0, abs=2.5)
    text = write_report(root, tmp_path / "out").read_text()
    section = text.split("## The contrasts layer by layer", 1)[1].split("\n## ", 1)[0]
    assert "| Δ W_K-update PR [95% CI] |" in section
    assert "The last column is the same difference in W_K-update PR" in section
