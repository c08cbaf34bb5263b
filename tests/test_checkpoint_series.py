"""A finished run keeps a log-spaced series of checkpoints (`train.checkpoint_series`), so it can
be probed over its history with `rankscope analyze RUN --series`: which steps, that pruning and
finishing never remove them, that an interrupted run resumed keeps the same ones, and that the
series analysis measures them and says how many there are and how to keep more."""

from __future__ import annotations

import pytest
from _runs import Killed, assert_same_run, config, final_values, kill_after_row, metric_rows, shards

from rankscope.cli import main as rankscope_main
from rankscope.run import checkpoint
from rankscope.run.cadence import run_cadence
from rankscope.run.train import train
from rankscope.settings.config import PRESETS, apply_overrides
from rankscope.storage import store


def log_spaced(total: int, n: int) -> set[int]:
    """Closed form: n steps evenly spaced in log(step) from 1 to total, rounded, duplicates merged."""
    return {min(total, round(total ** (i / (n - 1)))) for i in range(n)} if n > 1 else {total}


@pytest.mark.parametrize("n", [0, 1, 2, 3, 8, 24])
@pytest.mark.parametrize("tokens", ["1M", "8M", "25M"])
def test_the_series_is_log_spaced_and_among_the_saves(n, tokens):
    cfg = apply_overrides(PRESETS["tiny"], {"train.tokens": tokens, "train.checkpoint_series": n})
    cad = run_cadence(cfg)
    if n == 0:
        assert cad.series == frozenset()
        return
    assert cad.series == log_spaced(cad.total_steps, n) - {0}
    assert cad.total_steps in cad.series and cad.series <= cad.saves and 0 not in cad.saves


def test_the_default_keeps_a_series_and_the_seed_presets_keep_none():
    assert PRESETS["tiny"].train.checkpoint_series == 8
    assert sorted(run_cadence(PRESETS["tiny"]).series) == [1, 2, 5, 11, 23, 51, 112, 245]
    for big in ("seed-88m", "seed-1.5b"):  # gigabytes a checkpoint
        assert run_cadence(PRESETS[big]).series == frozenset()


def test_pruning_and_finishing_keep_the_series(tmp_path):
    folder = tmp_path / store.CHECKPOINTS
    folder.mkdir()
    for step in (1, 4, 5, 10, 15, 16):
        (folder / f"step-{step:09d}.pt").write_bytes(b"x")
        (folder / f"step-{step:09d}.rank1.pt").write_bytes(b"x")
    checkpoint._keep_newest(tmp_path, 2, frozenset({1, 4, 16}))
    assert checkpoint.steps(tmp_path) == [1, 4, 15, 16]
    checkpoint.finished(tmp_path, 2, frozenset({1, 4, 16}))
    assert checkpoint.steps(tmp_path) == [1, 4, 16]
    assert sorted(p.name for p in folder.iterdir() if "rank1" in p.name) == [
        f"step-{s:09d}.rank1.pt" for s in (1, 4, 16)
    ]


def test_a_finished_and_a_resumed_run_keep_the_same_series_and_analyze_measures_it(tmp_path, monkeypatch, capsys):
    data = shards(tmp_path)
    cfg = config(data, **{"train.checkpoint_series": 3})  # 16 steps: series 1, 4, 16; saves also 5, 10, 15
    assert sorted(run_cadence(cfg).series) == [1, 4, 16]
    whole = tmp_path / "whole"
    train(cfg, whole, progress=False, arm="a")
    assert checkpoint.steps(whole) == [1, 4, 16]

    killed = tmp_path / "killed"
    with monkeypatch.context() as m:
        kill_after_row(m, 12)
        with pytest.raises(Killed):
            train(cfg, killed, progress=False, arm="a")
    assert checkpoint.steps(killed) == [1, 4, 5, 10]  # the series so far, and the newest two
    train(cfg, killed, progress=False, arm="a")
    assert_same_run(killed, whole)  # same rows, checkpoints, weights, state

    out = tmp_path / "series"
    assert rankscope_main(["analyze", str(whole), "--series", "--out", str(out), "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "measured 3 checkpoints" in said
    assert "train.checkpoint_series" in said  # how to keep more
    assert sorted(set(store.read_table(out / "a" / "seed-0" / "scalars.csv")["step"])) == [1, 4, 16]
    # the report of the series speaks of checkpoints, not of seeds to add and an evaluation cadence
    assert rankscope_main(["report", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "**checkpoints measured:** 3 (steps 1, 4, 16;" in text and "train.checkpoint_series" in text
    assert "one training run's checkpoint series" in text
    assert "eval and probe every" not in text and "eval points found" not in text
    assert "Run more seeds" not in text


def test_keeping_a_series_changes_nothing_a_run_computes(tmp_path, whole):
    # `whole` is the shared uninterrupted run without a series (tests/_runs.py)
    run = tmp_path / "with-series"
    train(config(shards(tmp_path), **{"train.checkpoint_series": 8}), run, progress=False, arm="a")
    assert checkpoint.steps(run) == sorted(log_spaced(16, 8))
    assert metric_rows(run) == metric_rows(whole)
    assert final_values(run) == final_values(whole)
