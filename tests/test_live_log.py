"""`rankscope run --log`: each evaluation streams to TensorBoard and W&B (offline) while a run trains."""

from __future__ import annotations

import pytest
from _runs import SETTINGS, shards

from rankscope.cli import main
from rankscope.storage import store


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_run_streams_every_evaluation_to_tensorboard_and_offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is rankscope's default: nothing leaves
    data = shards(tmp_path)
    sets = [x for k, v in SETTINGS.items() for x in ("--set", f"{k}={v}")]
    args = ["run", "--data", str(data), "--out", str(tmp_path / "s"), "--no-progress", "--no-report", *sets]
    assert main(args + ["--log", "tensorboard,wandb"]) == 0
    for run in store.run_dirs(tmp_path / "s"):
        scalars = store.read_table(run / "scalars.csv")
        logged = _scalars(run / "tensorboard")
        # one point per evaluation, at its token count, equal to the table's value
        assert [t for t, _ in logged["rankscope/val_loss"]] == scalars["tokens"].tolist()
        assert [v for _, v in logged["rankscope/val_loss"]] == pytest.approx(scalars["val_loss"].tolist(), rel=1e-6)
        assert "rankscope/k_pr/mean" in logged and "rankscope/k_pr/layer_00" in logged
        assert list((run / "wandb").glob("offline-run-*/*.wandb"))
    # the sinks do not change what a run is: the same study without --log skips every finished run
    assert main(args) == 0


def test_an_unknown_sink_is_one_line(tmp_path, capsys):
    assert main(["run", "--log", "mlflow", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--log" in err[0] and "tensorboard" in err[0]
