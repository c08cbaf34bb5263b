"""The one atomic write: the target is the old file or the new one, never half; nothing is left behind."""

from __future__ import annotations

import json

import pytest

from rankscope.storage import fsio


def leftovers(folder):
    return [p.name for p in folder.iterdir() if fsio.TEMP_NAME.match(p.name)]


def test_writes_text_json_and_bytes(tmp_path):
    fsio.write_text(tmp_path / "a.md", "é\n")
    fsio.write_json(tmp_path / "b.json", {"z": 1, "a": [1, 2]}, sort_keys=True)
    fsio.write_bytes(tmp_path / "c.bin", b"\x00\x01")
    assert (tmp_path / "a.md").read_text(encoding="utf-8") == "é\n"
    assert (tmp_path / "b.json").read_text().startswith('{\n  "a"') and json.loads((tmp_path / "b.json").read_text())[
        "z"
    ] == 1
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01"
    assert leftovers(tmp_path) == []


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "t.json"
    fsio.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with fsio.atomic_open(target, binary=False) as f:
            f.write('{"v": 2')
            raise RuntimeError("killed mid-write")
    with pytest.raises(TypeError):
        fsio.write_json(target, {"v": object()})  # not serialisable: fails before anything is written
    assert json.loads(target.read_text()) == {"v": 1}
    assert leftovers(tmp_path) == []


def test_temporary_names_are_unique_and_recognised(tmp_path):
    names = {fsio.temp_name(tmp_path / "study.json").name for _ in range(100)}
    assert len(names) == 100  # two writers of one target never share a temporary file
    assert all(fsio.TEMP_NAME.match(n) for n in names)
    assert not fsio.TEMP_NAME.match("study.json")


def test_a_missing_folder_is_an_error_not_a_stray_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        fsio.write_text(tmp_path / "nope" / "x.txt", "x")
    assert list(tmp_path.iterdir()) == []
