"""Contrasts: the pairs of arms a study exists to compare, declared or derived, and the report
leading with them; the statistics that must agree across the report's tables."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _studies import make_realistic_study, make_study
from scipy import stats as sps

from rankscope.errors import ConfigError
from rankscope.report import load_study
from rankscope.report.analysis import compute_numbers
from rankscope.report.compare import pairwise_comparisons
from rankscope.report.paradox import BETTER, format_table, paradox_table
from rankscope.report.quantities import VAL_LOSS
from rankscope.report.series import quantity_series
from rankscope.report.stats import within_groups
from rankscope.report.summary import summary_paragraphs
from rankscope.run.studies import BUILTIN, study_from_dict
from rankscope.settings.contrasts import check, derive
from rankscope.storage.store import read_json, write_record

FOUR = {
    "qk-norm-muon": {"model.qk_norm": "learned", "optim.name": "muon"},
    "no-norm-muon": {"model.qk_norm": "none", "optim.name": "muon"},
    "qk-norm-adamw": {"model.qk_norm": "learned", "optim.name": "adamw"},
    "no-norm-adamw": {"model.qk_norm": "none", "optim.name": "adamw"},
}


def test_derived_contrasts_pair_arms_that_differ_in_one_setting_with_off_as_control():
    assert derive(FOUR) == [
        ("qk-norm-muon", "no-norm-muon"),  # switching a feature off: first
        ("qk-norm-adamw", "no-norm-adamw"),
        ("qk-norm-adamw", "qk-norm-muon"),  # neither level is "off": the earlier arm is the control
        ("no-norm-adamw", "no-norm-muon"),
    ]
    # declared order decides nothing when one side is off: the off arm is the control either way
    assert derive({"no-norm": {"model.qk_norm": "none"}, "qk": {"model.qk_norm": "learned"}}) == [("qk", "no-norm")]
    # arms differing in two settings at once: each against the first
    two = {"a": {"x.p": 1, "x.q": 1}, "b": {"x.p": 2, "x.q": 2}, "c": {"x.p": 3, "x.q": 3}}
    assert derive({k: {f"model.{s[2:]}": v for s, v in d.items()} for k, d in two.items()}) == [("b", "a"), ("c", "a")]
    # whole run configs: bookkeeping outside the settings sections (seed, n_params) does not count
    runs = {
        "qk": {"seed": 0, "n_params": 10, "model": {"qk_norm": "learned"}},
        "none": {"seed": 0, "n_params": 9, "model": {"qk_norm": "none"}},
    }
    assert derive(runs) == [("qk", "none")]


@pytest.mark.parametrize(
    "raw, message",
    [
        ("qk", "must be a list"),
        ([], "must be a list"),
        ([["qk"]], "two arm names"),
        ([["qk", 3]], "two arm names"),
        ([["qk", "nope"]], "which the study does not have"),
        ([["qk", "qk"]], "with itself"),
        ([["qk", "none"], ["none", "qk"]], "listed twice"),
    ],
)
def test_declared_contrasts_are_checked(raw, message):
    with pytest.raises(ConfigError, match=message):
        check(raw, ["qk", "none"], "s.toml")


def test_a_study_file_declares_contrasts_and_the_builtins_ask_their_question():
    raw = {"arms": {"b": {"model": {"qk_norm": "none"}}, "a": {"model": {"qk_norm": "learned"}}}}
    assert study_from_dict(raw).contrasts == [("a", "b")]
    assert study_from_dict({**raw, "contrasts": [["b", "a"]]}).contrasts == [("b", "a")]
    with pytest.raises(ConfigError, match="does not have"):
        study_from_dict({**raw, "contrasts": [["a", "c"]]}, where="x.toml")
    # qk-4way exists to compare QK-Norm on vs off under one optimizer, not across optimizers
    assert BUILTIN["qk-4way"].contrasts == [("qk-norm-muon", "no-norm-muon"), ("qk-norm-adamw", "no-norm-adamw")]
    for study in BUILTIN.values():
        for pair in study.contrasts:
            assert set(pair) <= set(study.arms), (study.name, pair)


def _four_arm_study(root, declared: bool):
    """Four arms on disk with the qk-4way names; `declared`: study.json carries the declared order
    and contrasts, as rankscope run now writes it (else an older folder: sorted arms only)."""
    fams = {"qk-norm-muon": "qk", "no-norm-muon": "none", "qk-norm-adamw": "frozen", "no-norm-adamw": "none"}
    root = make_study(root, fams, [0, 1, 2])
    study = read_json(root / "study.json")
    study["arms"] = FOUR
    if declared:
        study["arm_order"] = list(FOUR)
        study["contrasts"] = [list(c) for c in BUILTIN["qk-4way"].contrasts]
    write_record(root / "study.json", study)
    for arm, settings in FOUR.items():  # the configs say what each arm is, as a real run's do
        for seed in (0, 1, 2):
            cfg_path = root / arm / f"seed-{seed}" / "config.json"
            cfg = read_json(cfg_path)
            cfg["model"]["qk_norm"], cfg["optim"]["name"] = settings["model.qk_norm"], settings["optim.name"]
            write_record(cfg_path, cfg)
    return root


def test_the_report_leads_with_the_declared_contrasts(tmp_path):
    root = _four_arm_study(tmp_path / "s", declared=True)
    study = load_study(root)
    assert study.arms == list(FOUR)  # declared order, not alphabetical
    assert study.contrasts == BUILTIN["qk-4way"].contrasts
    numbers = compute_numbers(study)
    table = numbers.table
    diffs = table.attrs["diffs"]["val loss @ 400"]
    assert [(d.a, d.b) for d in diffs] == BUILTIN["qk-4way"].contrasts
    # treatment minus control, seed by seed: qk family minus none family is -0.05 exactly
    assert diffs[0].mean == pytest.approx(-0.05)
    paragraphs = summary_paragraphs(study, table, numbers.correlations, numbers.diagnoses)
    pair_lines = [p for p in paragraphs if " vs " in p]
    assert "**qk-norm-muon** vs **no-norm-muon**" in pair_lines[0]
    assert "**qk-norm-adamw** vs **no-norm-adamw**" in pair_lines[1]
    assert not any("adamw** vs **no-norm-muon" in p or "muon** vs **no-norm-adamw" in p for p in paragraphs)
    text = format_table(table, "text")
    assert "the study's contrasts, qk-norm-muon − no-norm-muon; qk-norm-adamw − no-norm-adamw" in text


def test_an_older_study_folder_derives_its_contrasts_from_the_run_configs(tmp_path):
    root = _four_arm_study(tmp_path / "s", declared=False)
    study = load_study(root)
    assert study.arms == sorted(FOUR)  # all an older study.json can say
    assert set(study.contrasts[:2]) == {("qk-norm-muon", "no-norm-muon"), ("qk-norm-adamw", "no-norm-adamw")}
    assert set(study.contrasts) == {
        ("qk-norm-muon", "no-norm-muon"),
        ("qk-norm-adamw", "no-norm-adamw"),
        ("no-norm-muon", "no-norm-adamw"),  # optimizer pairs: neither is "off", the earlier is control
        ("qk-norm-muon", "qk-norm-adamw"),
    }


def test_the_best_arm_is_marked_only_where_the_all_pairs_table_agrees(tmp_path):
    """With k arms, the paradox table's "beyond seed noise" mark and the all-pairs table's
    Holm-adjusted p speak of the same comparison (best vs runner-up) and must not disagree."""
    root = make_study(tmp_path / "s", {"a": "qk", "b": "none", "c": "frozen"}, [0, 1, 2, 3])
    study = load_study(root)
    scalars = study.scalars.copy()
    end = scalars["tokens"] == 400
    a = np.array([3.0, 3.01, 2.99, 3.0])
    b = a + np.array([0.05, 0.02, 0.08, 0.05])  # b - a: paired p about 0.027, the smallest of three
    c = b + np.array([0.2, -0.15, 0.3, -0.05])  # worse on average, noisy: large p against both

    def set_losses(values):
        for arm, v in values.items():
            m = end & (scalars["arm"] == arm)
            scalars.loc[m, "val_loss"] = v[scalars.loc[m, "seed"].to_numpy()]

    set_losses({"a": a, "b": b, "c": c})
    table = paradox_table(scalars, study.probes, arms=study.arms, downstream=False)
    pairs = pairwise_comparisons([(VAL_LOSS, quantity_series(scalars, study.probes, VAL_LOSS))], study.arms)
    ab = pairs[((pairs["a"] == "a") & (pairs["b"] == "b")) | ((pairs["a"] == "b") & (pairs["b"] == "a"))].iloc[0]
    assert ab["p"] < 0.05 < ab["p_holm"]  # the case where an unadjusted mark would contradict the table
    row = table.loc["val loss @ 400"]
    assert row[(BETTER, "arm")] == "a" and row[(BETTER, "p")] == pytest.approx(ab["p"])
    assert not row[(BETTER, "resolved")]
    # a lead that survives the adjustment is still marked
    set_losses({"a": a, "b": a + 0.1 + np.array([0, 0.001, 0.002, 0.0]), "c": a + 0.5})
    table = paradox_table(scalars, study.probes, arms=study.arms, downstream=False)
    assert table.loc["val loss @ 400", (BETTER, "resolved")]


def test_within_arm_correlation_matches_regression_on_arm_indicators():
    """The pooled within-group r is the partial correlation given the group indicators: the r of
    the residuals of x and y regressed on them, tested with n - k - 1 degrees of freedom."""
    rng = np.random.default_rng(0)
    groups = ["a"] * 5 + ["b"] * 5 + ["c"] * 4
    shift = {"a": 0.0, "b": 10.0, "c": -7.0}
    x = np.array([shift[g] + rng.normal() for g in groups])
    y = np.array([2 * shift[g] + 0.6 * xi - 0.6 * shift[g] + rng.normal() for g, xi in zip(groups, x)])
    dummies = np.array([[g == lab for lab in "abc"] for g in groups], dtype=float)

    def residual(v):
        beta, *_ = np.linalg.lstsq(dummies, v, rcond=None)
        return v - dummies @ beta

    rx, ry = residual(x), residual(y)
    r = float(np.corrcoef(rx, ry)[0, 1])
    df = len(x) - 3 - 1
    p = 2 * sps.t.sf(abs(r) * math.sqrt(df / (1 - r * r)), df)
    c = within_groups(x, y, groups)
    assert c.n == len(x) and c.pearson == pytest.approx(r, abs=1e-12) and c.pearson_p == pytest.approx(p, rel=1e-9)
    assert c.pearson_lo < r < c.pearson_hi

    # two clusters and no relation inside them: r across runs near 1, within arms nothing
    g2 = ["m"] * 6 + ["n"] * 6
    x2 = np.r_[rng.normal(0, 1, 6), rng.normal(50, 1, 6)]
    y2 = np.r_[rng.normal(0, 1, 6), rng.normal(50, 1, 6)]
    assert np.corrcoef(x2, y2)[0, 1] > 0.99
    w = within_groups(x2, y2, g2)
    assert abs(w.pearson) < 0.9 and w.pearson_p > 0.01
    # a group of one point is dropped; too few degrees of freedom give NaN, not a number
    assert math.isnan(within_groups([1, 2, 3], [1, 2, 4], ["a", "a", "b"]).pearson)


def test_the_summary_says_when_a_correlation_is_only_the_arms_apart():
    import pandas as pd

    from rankscope.report.summary import _correlation_sentence

    def row(scope, r, p):
        return {"quantity": "OOD loss", "key": "ood_loss", "scope": scope, "n": 12, "runs": 12, "arms": 2,
                "pearson": r, "pearson_lo": r - 0.05, "pearson_hi": min(1.0, r + 0.05), "pearson_p": p,
                "spearman": r, "spearman_p": p}  # fmt: skip

    apart = pd.DataFrame([row("run ends", -0.97, 1e-6), row("within arms", 0.1, 0.8)])
    s = _correlation_sentence(apart)
    assert "r = −0.97" in s and "within arms only r = 0.10, p = 0.80" in s and "difference between the arms" in s
    together = pd.DataFrame([row("run ends", -0.97, 1e-6), row("within arms", -0.8, 0.01)])
    assert "holds among seeds too" in _correlation_sentence(together)
    unsure = pd.DataFrame([row("run ends", -0.97, 1e-6), row("within arms", -0.87, 0.053)])
    assert "too few runs to tell" in _correlation_sentence(unsure)


def test_measures_at_chance_are_said_to_be_and_not_compared(tmp_path):
    """A measure that has not left its chance level (induction loss at ln V) is named in words and
    kept out of the contrasts' downstream sentences; functional rank at 1 in every layer too."""
    from rankscope.report.quantities import chance_level
    from rankscope.report.summary import chance_sentences

    study = load_study(make_realistic_study(tmp_path / "s", seeds=(0, 1, 2), n_layer=2, n_head=2, n_points=6))
    numbers = compute_numbers(study)
    assert chance_sentences(numbers) == ([], set())  # the synthetic study learned everything
    ln_v = chance_level("induction_loss", study).value
    assert ln_v == pytest.approx(math.log(study.runs[0].config["model"]["vocab_size"]))
    rng = np.random.default_rng(1)
    s = study.scalars
    s["induction_loss"] = ln_v + rng.normal(0, 0.01, len(s)) + 0.5  # above chance: no better than chance
    p = study.probes
    p.loc[p["metric"] == "functional_rank", "value"] = 1.0
    numbers = compute_numbers(study)
    lines, everywhere = chance_sentences(numbers)
    assert everywhere == {"induction_loss"}
    # above chance by 0.5 nats: worse than chance, and what that means
    assert lines[0].startswith(
        "Not yet past chance at the end: induction loss worse than chance in every arm (chance: ln "
    )
    assert "the model predicts its own corpus's tokens on the repeated random tokens" in lines[0]
    assert lines[1].startswith("Functional rank is at its floor, 1, in every layer of every arm")
    paragraphs = summary_paragraphs(
        study, numbers.table, numbers.correlations, numbers.diagnoses, chance_lines=lines, at_chance=everywhere
    )
    downstream = [q for q in paragraphs if q.startswith("Downstream at")]
    assert downstream and not any("induction loss" in q for q in downstream)
    assert lines[0] in paragraphs and lines[1] in paragraphs
