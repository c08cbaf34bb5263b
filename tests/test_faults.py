"""A full disk during a run: the OSError names the file, no half-written checkpoint stays behind,
the rows written before it survive (a torn last line is dropped), and a rerun once there is room
finishes bitwise as an uninterrupted run.

The disk fills up underneath Python's buffered files, as a real one does: the raw write fails, so
the buffer keeps its bytes and closing the file fails again."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import pytest
from _runs import assert_same_run, config, final_values, shards

from rankscope.run import checkpoint
from rankscope.run.train import train
from rankscope.storage import fsio, store


class FullDisk(io.FileIO):
    """A file on a disk with `room` bytes left: a write that does not fit writes what fits, then
    fails with ENOSPC, and so does every write after it."""

    def __init__(self, path, mode, room: int):
        super().__init__(path, mode)
        self.room = room

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self.room:
            if self.room:
                super().write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return super().write(data)


def fill_disk_at(monkeypatch, name: str, room: int) -> None:
    """The atomic write of the file `name` (through fsio) finds only `room` bytes free."""
    real = fsio.open_temp

    def open_temp(path, binary=True):
        tmp, f = real(path, binary)
        if Path(path).name != name:
            return tmp, f
        f.close()
        raw = io.BufferedWriter(FullDisk(tmp, "w", room))
        return tmp, raw if binary else io.TextIOWrapper(raw, encoding="utf-8", newline="")

    monkeypatch.setattr(fsio, "open_temp", open_temp)


@pytest.mark.parametrize("room", [0, 100_000])  # full before the checkpoint's first byte / mid-way
def test_full_disk_during_a_checkpoint_write(tmp_path, whole, monkeypatch, room):
    run = tmp_path / "run"
    cfg = config(shards(tmp_path))
    target = run / store.CHECKPOINTS / "step-000000010.pt"
    with monkeypatch.context() as m:
        fill_disk_at(m, target.name, room)
        with pytest.raises(OSError) as e:
            train(cfg, run, progress=False, arm="a")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    assert str(target) in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in target.parent.iterdir()) == ["step-000000005.pt"]  # no .tmp left
    assert store.read_table(run / "scalars.csv")["step"].max() == 10  # the rows before it survive

    train(cfg, run, progress=False, arm="a")  # space freed: resumes from step 5
    assert_same_run(run, whole)


@pytest.mark.parametrize("table", ["scalars.csv", "probes.csv"])
def test_full_disk_during_a_row_append(tmp_path, whole, monkeypatch, table):
    run = tmp_path / "run"
    cfg = config(shards(tmp_path))
    real_open = open

    def open_table(path, mode="r", newline=None, **kw):  # TableWriter's appending open()
        if Path(path).name != table:
            return real_open(path, mode, newline=newline, **kw)
        raw = io.BufferedWriter(FullDisk(path, "a", room=10**9))
        f = io.TextIOWrapper(raw, encoding="utf-8", newline=newline)
        append = f.write

        def write(text):  # the disk fills up halfway through the rows of step 12
            if "\na,0,12," in "\n" + text:
                raw.raw.room = len(text.encode()) // 2
            return append(text)

        f.write = write
        return f

    with monkeypatch.context() as m:
        m.setattr(store, "open", open_table, raising=False)
        with pytest.raises(OSError) as e:
            train(cfg, run, progress=False, arm="a")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(run / table)
    data = (run / table).read_bytes()
    assert not data.endswith(b"\n") and b"\na,0,12," in data  # a torn last line ...
    assert store.read_table(run / table)["step"].max() in (10, 12)  # ... that the loaders drop
    assert checkpoint.steps(run) == [5, 10]

    train(cfg, run, progress=False, arm="a")  # resumes from step 10 past the torn line
    assert_same_run(run, whole)


def test_full_disk_writing_done_json(tmp_path, whole, monkeypatch):
    run = tmp_path / "run"
    cfg = config(shards(tmp_path))
    with monkeypatch.context() as m:
        fill_disk_at(m, store.DONE, 0)
        with pytest.raises(OSError) as e:
            train(cfg, run, progress=False, arm="a")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(run / store.DONE)
    assert not store.is_done(run) and checkpoint.steps(run) == [15, 16]

    train(cfg, run, progress=False, arm="a")  # resumed at its last step: done.json as if never stopped
    assert final_values(run) == final_values(whole)
    assert_same_run(run, whole)
