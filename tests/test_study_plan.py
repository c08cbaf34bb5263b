"""A study file's `eval_every` and its old name `probe_every`, and a study resolved once: the plan
that `rankscope run` counts its runs from is the one it runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from rankscope.cli import main
from rankscope.errors import ConfigError
from rankscope.run.studies import read_study, study_from_dict
from rankscope.run.study import plan_study
from rankscope.storage import store

ARMS = {"a": {"model": {"qk_norm": "learned"}}, "b": {"model": {"qk_norm": "none"}}}
NOTE = "rankscope: s.toml: probe_every is the old name of eval_every; read as eval_every"
STUDIES = Path(__file__).resolve().parents[1] / "studies"


def read(raw: dict) -> tuple[object, list[str]]:
    said: list[str] = []
    return study_from_dict({**raw, "arms": ARMS}, where="s.toml", say=said.append), said


def test_eval_every_sets_train_eval_every_and_says_nothing():
    study, said = read({"eval_every": "2K"})
    assert study.settings == {"train.eval_every": 2000} and said == []


def test_probe_every_is_read_as_eval_every_and_said_once():
    old, said = read({"probe_every": "2K"})
    new, _ = read({"eval_every": "2K"})
    assert old == new and said == [NOTE]
    assert [c for _, c in plan_study(old).runs] == [c for _, c in plan_study(new).runs]


def test_both_names_at_once_is_one_line():
    with pytest.raises(ConfigError) as e:
        read({"eval_every": "2K", "probe_every": "2K"})
    assert str(e.value) == "s.toml: probe_every is the old name of eval_every; give only eval_every"


@pytest.mark.parametrize("key", ["eval_every", "probe_every"])
def test_a_bad_value_names_the_key_as_written(key):
    with pytest.raises(ConfigError, match=f"^s.toml: {key} must be an integer from 1 to"):
        read({key: "lots"})


def test_unknown_keys_list_the_new_name():
    with pytest.raises(ConfigError, match=r"known: arms, contrasts, description, eval_every, name, preset, seeds"):
        read({"probe_evry": "2K"})


def test_the_committed_study_files_use_the_new_name():
    for path in sorted(STUDIES.glob("*.toml")):
        said: list[str] = []
        read_study(str(path), say=said.append)
        assert said == [], path


def write(path: Path, text: str) -> Path:
    path.write_text(f'{text}\nseeds = [0, 1]\n[arms.a]\nmodel.qk_norm = "learned"\n[arms.b]\nmodel.qk_norm = "none"\n')
    return path


def test_the_command_line_says_the_old_name_once_and_refuses_both(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("rankscope.run.study.run_study", lambda *a, **k: [])
    write(tmp_path / "s.toml", 'probe_every = "2K"')
    assert main(["run", "s.toml", "--out", "o", "--no-report", "--no-progress"]) == 0
    assert capsys.readouterr().err.strip() == NOTE
    write(tmp_path / "s.toml", 'probe_every = "2K"\neval_every = "2K"')
    assert main(["run", "s.toml", "--out", "o", "--no-report", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (
        "rankscope: error: s.toml: probe_every is the old name of eval_every; give only eval_every"
    )


def test_rankscope_run_resolves_each_run_once(tmp_path, capsys, monkeypatch):
    """Reading the study, counting its runs and running them share one plan: each (arm, seed)'s
    settings are applied once in the whole command (here every run finished before, so the
    command reaches the end of run_study without training)."""
    study, out = write(tmp_path / "s.toml", 'eval_every = "2K"'), tmp_path / "out"
    for arm, cfg in plan_study(read_study(str(study))).runs:
        rd = store.run_dir(out, arm, cfg.seed)
        rd.mkdir(parents=True)
        store.write_record(rd / store.CONFIG, cfg.to_dict())
        store.write_record(rd / store.DONE, {"status": "done"})
    import rankscope.run.study as study_module

    calls = []
    real = study_module.apply_overrides
    monkeypatch.setattr(study_module, "apply_overrides", lambda *a: calls.append(1) or real(*a))
    assert main(["run", str(study), "--out", str(out), "--no-report", "--no-progress"]) == 0
    assert len(calls) == 4  # 2 arms x 2 seeds
    assert "4 of 4 runs already finished" in capsys.readouterr().err


def test_an_empty_shard_counts_the_plans_runs(tmp_path, capsys):
    study = write(tmp_path / "s.toml", 'eval_every = "2K"')
    assert main(["run", str(study), "--shard", "5/6", "--out", str(tmp_path / "o")]) == 0
    assert capsys.readouterr().err.strip() == (
        "rankscope: --shard 5/6 holds no run: study s has 4 run(s) (2 seed(s) x 2 arm(s)), so only slices "
        "0..3 have work; nothing to do"
    )
