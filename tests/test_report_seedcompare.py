"""rankscope.report.seedcompare: which arms are the seed's, and a seed-1.5b study set next to the
1.5B follow-up's figures (`_studies.make_realistic_study`)."""

from __future__ import annotations

import pytest
from _studies import make_realistic_study

from rankscope.report import write_report
from rankscope.report.seedcompare import arm_kind


@pytest.mark.slow
def test_seed_1_5b_reference_reads_keys_before_rope(tmp_path):
    """The 1.5B follow-up's figures are set next to a seed-1.5b study on site k_pre, its own."""
    root = make_realistic_study(
        tmp_path / "big",
        n_layer=2,
        n_head=2,
        head_dim=64,
        n_points=6,
        spectral_sites=("k", "k_pre"),
        rank_grid=(1, 64),
        preset="seed-1.5b",
    )
    md = write_report(root).read_text()
    assert "| mean key PR before RoPE @ 50M | 65.7 |" in md and "| 63.3 |" in md
    assert "50M: the 1.5B follow-up: keys read before RoPE (site k_pre)" in md
    assert "mean key PR @ 16M" not in md  # the 88M figures belong to the 88M preset
    assert "**differs from the seed's 1.5B follow-up**" in md


def test_seeds_plain_arm_is_muon_without_qk_norm_or_qk_clip():
    seeds_muon = {"name": "muon", "muon_qkvo": "stacked", "muon_ns": "polar_express"}
    assert arm_kind({"model": {"qk_norm": "none"}, "optim": seeds_muon}) == "none"
    assert arm_kind({"model": {"qk_norm": "learned"}, "optim": seeds_muon}) == "qk"
    assert arm_kind({"model": {"qk_norm": "frozen"}, "optim": seeds_muon}) == "frozen"
    # QK-Clip lives in the optimizer settings (optim.qk_clip_tau); an arm with it is not the seed's plain arm
    assert arm_kind({"model": {"qk_norm": "none"}, "optim": {**seeds_muon, "qk_clip_tau": 100.0}}) is None
    assert arm_kind({"model": {"qk_norm": "none"}, "optim": {**seeds_muon, "qk_clip_tau": 0.0}}) == "none"
    assert arm_kind({"model": {"qk_norm": "none"}, "optim": {**seeds_muon, "muon_qkvo": "separate"}}) is None
    assert arm_kind({"model": {"qk_norm": "none"}, "optim": {"name": "adamw"}}) is None
