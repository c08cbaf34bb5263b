"""Schedules of evaluation points, and a QK-Clip run end to end."""

import math
from dataclasses import replace

from _runs import config, shards

from rankscope.run.cadence import eval_steps, log_schedule, schedule
from rankscope.run.studies import BUILTIN
from rankscope.run.study import resolve
from rankscope.run.train import train
from rankscope.storage import store


def test_linear_schedule():
    assert schedule(10, 100, 300) == [0, 3, 6, 9, 10]
    assert schedule(10, 100, 250) == [0, 3, 5, 8, 10]  # first step at or after each multiple
    assert schedule(10, 100, 0) == [0, 10]
    assert schedule(1, 100, 50) == [0, 1]


def test_log_schedule_is_dense_early_and_sparse_late():
    steps = log_schedule(100_000, 11)
    assert steps[0] == 0 and steps[-1] == 100_000
    assert steps == sorted(set(steps)) and len(steps) == 12
    gaps = [b - a for a, b in zip(steps[1:], steps[2:])]
    assert gaps == sorted(gaps)  # spacing grows
    ratios = [b / a for a, b in zip(steps[1:], steps[2:])]
    assert all(math.isclose(r, 10**0.5, rel_tol=0.2) for r in ratios)  # 5 decades in 10 steps
    assert eval_steps(100_000, 1, 0, "log", 11) == steps
    assert log_schedule(3, 24) == [0, 1, 2, 3]  # short runs: every step, no duplicates


def test_built_in_studies_resolve():
    for name in ("qk-muon", "qk-4way", "gamma", "clip", "norm-variants", "muon-grouping"):
        runs = resolve(BUILTIN[name], {})
        assert len(runs) == len(BUILTIN[name].arms)
        for preset_name in ("tiny", "seed-88m", "seed-1.5b"):  # every preset trains as the seed
            for _, c in resolve(replace(BUILTIN[name], preset=preset_name), {}):
                assert c.optim.muon_ns == "polar_express"
                assert c.optim.muon_qkvo == "stacked" or name == "muon-grouping"
    grouping = {(c.model.qk_norm, c.optim.muon_qkvo) for _, c in resolve(BUILTIN["muon-grouping"], {})}
    assert grouping == {(q, g) for q in ("learned", "none") for g in ("stacked", "separate", "per_head")}
    gamma = resolve(replace(BUILTIN["gamma"], preset="seed-1.5b"), {})
    assert all("k_pre" in c.probe.sites for _, c in gamma)  # where the 1.5B study read its keys
    clip = dict(resolve(BUILTIN["clip"], {}))
    assert clip["qk-clip"].optim.qk_clip_tau == 15.0 and clip["qk-clip"].model.qk_norm == "none"
    assert {c.model.qk_norm for _, c in resolve(BUILTIN["norm-variants"], {})} == {
        "learned",
        "frozen",
        "parameter_free",
        "none",
    }


def test_qk_clip_run_bounds_training_logits(tmp_path):
    data = shards(tmp_path)
    cfg = config(
        data,
        **{"model.qk_norm": "none", "optim.qk_clip_tau": 2.0, "train.eval_schedule": "log", "train.eval_points": 4},
    )
    summary = train(cfg, tmp_path / "run", progress=False, arm="clip")
    assert summary["status"] == "done"
    rows = store.read_table(tmp_path / "run" / "scalars.csv")
    assert list(rows["step"]) == log_schedule(16, 4)
    probes = store.read_table(tmp_path / "run" / "probes.csv")
    final = probes[(probes.metric == "max_logit") & (probes.step == 16)]["value"]
    # the clip acts on training batches; on the validation batch the logits stay near tau
    assert final.max() < 2.0 * 1.5
