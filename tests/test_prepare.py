"""Tests for ``rankscope data prepare`` (rankscope.data.prepare).

Every test builds its own small sources (text, JSONL, Parquet, a fake ``save_to_disk`` folder)
and a 300-token byte-level BPE, then checks the shards decode back to the documents in order,
that the layout is what ``load_data`` expects, and that workers, interruption and re-runs never
change a byte of the output. Nothing touches the network.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from tokenizers import Tokenizer, models  # noqa: E402

import rankscope.data.prepare as prep  # noqa: E402
from rankscope.data import BatchSampler, DataError, load_data, read_shard  # noqa: E402
from rankscope.data.prepare import encode, outdir, prepare, reader, tokenizer_spec  # noqa: E402
from rankscope.data.tokenizer import EOT_TOKEN, train_tokenizer  # noqa: E402
from rankscope.storage.locks import FileLock, LockHeld  # noqa: E402

WORDS = (
    "the of and to in is that for it as with was on be by this are from or an at which not have "
    "one all data model train token layer head rank attention value query key norm café naïve 数据 🙂"
).split()


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No test may write to ~/.cache or reach the hub.
    monkeypatch.setenv("RANKSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _doc(rng: random.Random, n_lines: int) -> str:
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 12))]
        lines.append(" ".join(words) + rng.choice([".", "!", "?", ":", ","]))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def docs() -> list[str]:
    rng = random.Random(0)
    out = [_doc(rng, rng.randint(2, 30)) for _ in range(60)]
    # A literal separator string in a document is text, not a boundary.
    out[3] = f"before {EOT_TOKEN} after\n" + out[3]
    # Leading whitespace and no final newline survive the round trip.
    out[7] = "   indented start" + out[7].rstrip("\n")
    return out


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory: pytest.TempPathFactory, docs: list[str]) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(docs, 300).save(str(path))
    return path


def _write_text_folder(root: Path, docs: list[str]) -> Path:
    for i, d in enumerate(docs):
        # Nested folders whose sorted relative paths follow the document order.
        p = root / f"part{i // 20}" / f"doc{i:03d}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(d, encoding="utf-8")
    return root


def _write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    lines = []
    for i, d in enumerate(docs):
        lines.append(json.dumps({"id": i, field: d, "meta": {"n": len(d)}}))
        if i == 2:
            lines.append("")  # blank lines are ignored
            lines.append(json.dumps({"id": -1, field: None}))  # null text is not a document
    data = ("\n".join(lines) + "\n").encode("utf-8")
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def _write_parquet(path: Path, docs: list[str], field: str = "text") -> Path:
    table = pa.table({"id": list(range(len(docs))), field: docs})
    pq.write_table(table, path, row_group_size=7)  # several row groups
    return path


def _write_hf_folder(folder: Path, docs: list[str]) -> Path:
    """What ``Dataset.save_to_disk`` writes: Arrow IPC streams plus dataset_info.json/state.json."""
    folder.mkdir(parents=True)
    half = len(docs) // 2
    names = ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    for name, part in zip(names, (docs[:half], docs[half:])):
        table = pa.table({"text": part, "id": list(range(len(part)))})
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=5):
                writer.write_batch(batch)
    (folder / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names], "_split": "train"}))
    return folder


def _stream(out: Path) -> np.ndarray:
    meta = json.loads((out / "meta.json").read_text())
    return np.concatenate([np.asarray(read_shard(out / s["name"])) for s in meta["shards"]])


def _decoded_docs(out: Path) -> list[str]:
    meta = json.loads((out / "meta.json").read_text())
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tokens = _stream(out)
    eot = meta["eot_id"]
    assert tokens[0] == eot  # every document, the first included, is preceded by EOT
    starts = list(np.flatnonzero(tokens == eot)) + [len(tokens)]
    return [tok.decode(tokens[a + 1 : b].tolist(), skip_special_tokens=False) for a, b in zip(starts, starts[1:])]


def _files(out: Path) -> dict[str, bytes]:
    """Every output file's bytes; meta.json without its 'run' record (timings, worker count)."""
    files = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "meta.json"}
    meta = json.loads((out / "meta.json").read_text())
    meta.pop("run")
    files["meta.json"] = json.dumps(meta, sort_keys=True).encode()
    return files


def _mixed_source(root: Path, docs: list[str]) -> tuple[Path, list[str]]:
    """A folder with every kind of local source; returns it and its documents in stream order."""
    root.mkdir()
    _write_text_folder(root / "a_text", docs[:15])
    _write_jsonl(root / "b.jsonl", docs[15:25])
    _write_jsonl(root / "c.jsonl.gz", docs[25:35])
    _write_parquet(root / "d.parquet", docs[35:48])
    _write_hf_folder(root / "e_hf", docs[48:])
    return root, docs


# ------------------------------------------------------------------------------------------
# Sources round trip


def test_text_folder_round_trip_and_layout(tmp_path: Path, docs: list[str], tok_path: Path) -> None:
    src = _write_text_folder(tmp_path / "src", docs)
    meta = prepare(src, tok_path, tmp_path / "out", shard_tokens=700, val_tokens=300, progress=False)
    out = tmp_path / "out"
    assert _decoded_docs(out) == docs
    assert meta["complete"] is True and meta["eot_id"] == 0 and meta["eot_token"] == EOT_TOKEN
    assert meta["vocab_size"] == 300 and meta["model_vocab_size"] == 320
    assert meta["documents"]["total"] == len(docs)
    assert (out / "tokenizer.json").read_bytes() == tok_path.read_bytes()
    assert not (out / prep.STATE_FILE).exists()
    # val = the first 300 tokens; train shards of exactly 700 tokens, the last one shorter.
    val = [s for s in meta["shards"] if s["split"] == "val"]
    train = [s for s in meta["shards"] if s["split"] == "train"]
    assert [s["name"] for s in val] == ["val_000000.bin"] and val[0]["tokens"] == 300
    assert [s["name"] for s in train] == [f"train_{i:06d}.bin" for i in range(len(train))]
    assert all(s["tokens"] == 700 for s in train[:-1]) and 0 < train[-1]["tokens"] <= 700
    assert meta["tokens"]["total"] == len(_stream(out)) == sum(s["tokens"] for s in meta["shards"])
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [s["name"] for s in meta["shards"]] + ["tokenizer.json", "meta.json"]
    )


def test_val_larger_than_a_shard_is_split(tmp_path: Path, docs: list[str], tok_path: Path) -> None:
    src = _write_text_folder(tmp_path / "src", docs)
    meta = prepare(src, tok_path, tmp_path / "out", shard_tokens=250, val_tokens=600, progress=False)
    assert [(s["name"], s["tokens"]) for s in meta["shards"][:3]] == [
        ("val_000000.bin", 250),
        ("val_000001.bin", 250),
        ("val_000002.bin", 100),
    ]
    assert _decoded_docs(tmp_path / "out") == docs


def test_jsonl_and_gzip(tmp_path: Path, docs: list[str], tok_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _write_jsonl(src / "a.jsonl", docs[:30], field="content")
    _write_jsonl(src / "b.jsonl.gz", docs[30:], field="content")
    meta = prepare(
        src, tok_path, tmp_path / "out", text_field="content", shard_tokens=500, val_tokens=100, progress=False
    )
    assert _decoded_docs(tmp_path / "out") == docs
    assert meta["source_files"] == {"jsonl": 2}


def test_parquet(tmp_path: Path, docs: list[str], tok_path: Path) -> None:
    path = _write_parquet(tmp_path / "docs.parquet", docs)
    meta = prepare(path, tok_path, tmp_path / "out", shard_tokens=500, val_tokens=100, progress=False)
    assert _decoded_docs(tmp_path / "out") == docs
    assert meta["source_files"] == {"parquet": 1}


def test_hf_save_to_disk_folder(tmp_path: Path, docs: list[str], tok_path: Path) -> None:
    folder = _write_hf_folder(tmp_path / "ds", docs)
    meta = prepare(folder, tok_path, tmp_path / "out", shard_tokens=500, val_tokens=100, progress=False)
    # The dataset's own JSON files are metadata, never documents.
    assert _decoded_docs(tmp_path / "out") == docs
    assert meta["source_files"] == {"arrow": 2}


def test_mixed_folder_in_sorted_order(tmp_path: Path, docs: list[str], tok_path: Path) -> None:
    src, expected = _mixed_source(tmp_path / "src", docs)
    prepare(src, tok_path, tmp_path / "out", shard_tokens=500, val_tokens=100, progress=False)
    assert _decoded_docs(tmp_path / "out") == expected


def test_load_data_and_sampler(tmp_path: Path, docs: list[str], tok_path: Path) -> None:
    src = _write_text_folder(tmp_path / "src", docs)
    meta = prepare(src, tok_path, tmp_path / "out", shard_tokens=700, val_tokens=300, progress=False)
    data = load_data(tmp_path / "out", meta["vocab_size"], progress=False)
    assert data.train_tokens == meta["tokens"]["train"] and data.val_tokens == meta["tokens"]["val"]
    assert len(data.train) == sum(s["split"] == "train" for s in meta["shards"])
    assert data.eot_id == 0 and data.tokenizer is not None
    x, y = BatchSampler(data.train, batch_size=4, seq_len=32, seed=0).batch(0)
    assert x.shape == (4, 32) and bool((x[:, 1:] == y[:, :-1]).all())
    assert int(x.max()) < meta["vocab_size"]


def test_load_data_refuses_an_unfinished_prepare(
    tmp_path: Path, docs: list[str], tok_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _write_text_folder(tmp_path / "src", docs)
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(_Killed):
        prepare(src, tok_path, tmp_path / "out", shard_tokens=700, val_tokens=300, progress=False)
    with pytest.raises(DataError, match="unfinished"):
        load_data(tmp_path / "out", 300, progress=False)


# ------------------------------------------------------------------------------------------
# Determinism: workers, resume, re-runs


def test_workers_give_identical_output(tmp_path: Path, docs: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    src, _ = _mixed_source(tmp_path / "src", docs)
    # Small batches so the two workers really share the work.
    monkeypatch.setattr(encode, "TASK_BYTES", 2048)
    kwargs: dict[str, Any] = dict(shard_tokens=600, val_tokens=200, progress=False)
    one = prepare(src, "train:300", tmp_path / "w1", workers=1, **kwargs)
    two = prepare(src, "train:300", tmp_path / "w2", workers=2, **kwargs)
    assert _files(tmp_path / "w1") == _files(tmp_path / "w2")
    assert one["run"]["workers"] == 1 and two["run"]["workers"] == 2


def test_block_reading_is_exact(
    tmp_path: Path, docs: list[str], tok_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One long document: read in whole it is one string; in 1 KiB blocks it is cut at safe points.
    src = tmp_path / "big.txt"
    src.write_text("".join(docs), encoding="utf-8")
    prepare(src, tok_path, tmp_path / "whole", shard_tokens=500, val_tokens=100, progress=False)
    monkeypatch.setattr(reader, "TEXT_BLOCK_BYTES", 1024)
    monkeypatch.setattr(encode, "PIECE_CHARS", 300)
    prepare(src, tok_path, tmp_path / "blocks", shard_tokens=500, val_tokens=100, progress=False)
    assert _files(tmp_path / "whole") == _files(tmp_path / "blocks")
    assert _decoded_docs(tmp_path / "blocks") == ["".join(docs)]


class _Killed(Exception):
    pass


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, n_shards: int, *, before_record: bool = False) -> None:
    """Make the next prepare die when its n-th shard is done (after or before the state says so)."""
    save = outdir.save_state

    def dying(path: Path, state: dict[str, Any]) -> None:
        if len(state["shards"]) == n_shards and before_record:
            raise _Killed  # the shard file is in place, the state does not list it yet
        save(path, state)
        if len(state["shards"]) == n_shards:
            raise _Killed

    monkeypatch.setattr(outdir, "save_state", dying)


@pytest.mark.parametrize(
    ("how", "kill_at"),
    [
        ("after-state", 4),
        ("after-state", 21),
        ("after-state", 33),
        ("after-state", 50),
        ("before-state", 4),
        ("before-state", 40),
        ("corrupt-shard", 4),
        ("smaller-batches", 9),
        ("two-workers", 27),
    ],
)
def test_resume_matches_an_uninterrupted_run(
    tmp_path: Path, docs: list[str], tok_path: Path, monkeypatch: pytest.MonkeyPatch, how: str, kill_at: int
) -> None:
    # Kill points land in text, JSONL, gzipped JSONL, Parquet and Arrow sources (54 shards in all).
    src, _ = _mixed_source(tmp_path / "src", docs)
    # Small blocks and batches put the resume points in the middle of text, JSONL and Parquet files.
    monkeypatch.setattr(reader, "TEXT_BLOCK_BYTES", 512)
    monkeypatch.setattr(reader, "JSONL_CHUNK_BYTES", 512)
    monkeypatch.setattr(reader, "UNIT_ROWS", 3)
    monkeypatch.setattr(encode, "BATCH_BYTES", 1024)
    monkeypatch.setattr(encode, "TASK_BYTES", 1024)
    kwargs: dict[str, Any] = dict(shard_tokens=400, val_tokens=150, progress=False)
    ref = prepare(src, tok_path, tmp_path / "ref", **kwargs)
    assert len(ref["shards"]) > 50

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_after(m, kill_at, before_record=how == "before-state")
        with pytest.raises(_Killed):
            prepare(src, tok_path, out, **kwargs)
    assert (out / prep.STATE_FILE).exists() and not (out / "meta.json").exists()
    if how == "corrupt-shard":
        shard = out / "train_000002.bin"  # the last one the state lists
        shard.write_bytes(shard.read_bytes()[:-10])  # a torn file: redone from the one before
    if how == "smaller-batches":
        # The resumed run groups documents differently; it must still skip exactly what was written.
        monkeypatch.setattr(encode, "BATCH_BYTES", 128)
    if how == "two-workers":
        kwargs["workers"] = 2

    # Count what the second run tokenizes: it must not start over.
    calls = []
    call = encode.Encoder.__call__
    monkeypatch.setattr(encode.Encoder, "__call__", lambda self, p: calls.append(1) or call(self, p))
    meta = prepare(src, tok_path, out, **kwargs)
    assert meta["run"]["resumed"] is True
    assert _files(out) == _files(tmp_path / "ref")
    if how != "two-workers":  # pool workers count in their own processes
        full = []
        monkeypatch.setattr(encode.Encoder, "__call__", lambda self, p: full.append(1) or call(self, p))
        prepare(src, tok_path, tmp_path / "ref2", **kwargs)
        assert len(calls) < len(full)


def test_resume_with_a_trained_tokenizer_reuses_it(
    tmp_path: Path, docs: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _write_text_folder(tmp_path / "src", docs)
    kwargs: dict[str, Any] = dict(shard_tokens=500, val_tokens=100, progress=False)
    with monkeypatch.context() as m:
        _interrupt_after(m, 2)
        with pytest.raises(_Killed):
            prepare(src, "train:300", tmp_path / "out", **kwargs)
    trained = []
    monkeypatch.setattr(tokenizer_spec, "train_tokenizer", lambda *a, **k: trained.append(1))
    prepare(src, "train:300", tmp_path / "out", **kwargs)
    assert trained == []  # the saved tokenizer.json is used, not a new one
    assert _decoded_docs(tmp_path / "out") == docs


def test_complete_output_rerun_is_a_noop(
    tmp_path: Path, docs: list[str], tok_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _write_text_folder(tmp_path / "src", docs)
    parser = argparse.ArgumentParser()
    prep.add_arguments(parser)
    argv = [
        str(src),
        "--tokenizer",
        str(tok_path),
        "--out",
        str(tmp_path / "out"),
        "--shard-tokens",
        "1k",
        "--val-tokens",
        "200",
        "--no-progress",
    ]
    assert prep.run(parser.parse_args(argv)) == 0
    first = capsys.readouterr().out
    assert first.count("\n") == 1 and "train with --data" in first and "model.vocab_size=320" in first
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}

    assert prep.run(parser.parse_args(argv)) == 0
    second = capsys.readouterr().out
    assert "already complete" in second and second.count("\n") == 1
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == stamps


def test_changed_arguments_are_refused(
    tmp_path: Path, docs: list[str], tok_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _write_text_folder(tmp_path / "src", docs)
    kwargs: dict[str, Any] = dict(shard_tokens=500, val_tokens=100, progress=False)
    prepare(src, tok_path, tmp_path / "done", **kwargs)
    with pytest.raises(DataError, match=r"--shard-tokens 500 \(now 600\)"):
        prepare(src, tok_path, tmp_path / "done", shard_tokens=600, val_tokens=100, progress=False)

    with monkeypatch.context() as m:
        _interrupt_after(m, 2)
        with pytest.raises(_Killed):
            prepare(src, tok_path, tmp_path / "half", **kwargs)
    with pytest.raises(DataError, match="unfinished prepare with different arguments: --val-tokens"):
        prepare(src, tok_path, tmp_path / "half", shard_tokens=500, val_tokens=50, progress=False)
    # A source file edited since: the finished shards no longer describe it.
    (src / "part0" / "doc000.txt").write_text("changed\n")
    with pytest.raises(DataError, match="source files"):
        prepare(src, tok_path, tmp_path / "half", **kwargs)


# ------------------------------------------------------------------------------------------
# Options


def test_max_tokens_and_small_input_val_share(tmp_path: Path, docs: list[str], tok_path: Path) -> None:
    src = _write_text_folder(tmp_path / "src", docs)
    full = prepare(src, tok_path, tmp_path / "full", shard_tokens=10**6, progress=False)
    total = full["tokens"]["total"]
    # The default 10M validation tokens are capped at a tenth of a small input.
    assert full["val_tokens"] == full["tokens"]["val"] == total // 10
    meta = prepare(src, tok_path, tmp_path / "cut", shard_tokens=300, val_tokens=50, max_tokens=1234, progress=False)
    assert meta["tokens"]["total"] == 1234 and meta["truncated"] is True
    assert np.array_equal(_stream(tmp_path / "cut"), _stream(tmp_path / "full")[:1234])


def test_eot_from_eos_token_or_option(tmp_path: Path, docs: list[str]) -> None:
    # A tokenizer without <|endoftext|>: its </s> special token separates documents ...
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", "</s>", "a", "b"])}, unk_token="[UNK]"))
    tok.add_special_tokens(["</s>"])
    from tokenizers import pre_tokenizers

    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    src = tmp_path / "ab.txt"
    src.write_text("a b a b b a\n" * 20)
    meta = prepare(src, tok, tmp_path / "eos", shard_tokens=50, val_tokens=0, progress=False)
    assert (meta["eot_id"], meta["eot_token"]) == (1, "</s>")
    # ... and --eot-id overrides it.
    meta = prepare(src, tok, tmp_path / "opt", shard_tokens=50, val_tokens=0, eot_id=3, progress=False)
    assert meta["eot_id"] == 3 and _stream(tmp_path / "opt")[0] == 3
    # With no separator at all, the error says to pass --eot-id.
    plain = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    with pytest.raises(DataError, match="--eot-id"):
        prepare(src, plain, tmp_path / "none", progress=False)


# ------------------------------------------------------------------------------------------
# Bad input: one clear line each


def _one_line_error(excinfo: pytest.ExceptionInfo[DataError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


def test_bad_inputs(tmp_path: Path, docs: list[str], tok_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(DataError) as e:
        prepare(tmp_path / "nope", tok_path, out, progress=False)
    assert "does not exist" in _one_line_error(e)

    jsonl = _write_jsonl(tmp_path / "x.jsonl", docs[:5], field="body")
    with pytest.raises(DataError) as e:
        prepare(jsonl, tok_path, out, progress=False)
    assert "no field 'text'" in _one_line_error(e) and "body" in str(e.value)

    parquet = _write_parquet(tmp_path / "x.parquet", docs[:5], field="body")
    with pytest.raises(DataError) as e:
        prepare(parquet, tok_path, out, progress=False)
    assert "no column 'text'" in _one_line_error(e) and "--text-field" in str(e.value)
    ints = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), ints)
    with pytest.raises(DataError, match="not text"):
        prepare(ints, tok_path, out, progress=False)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(DataError) as e:
        prepare(empty, tok_path, tmp_path / "out-empty", progress=False)
    assert "no non-empty documents" in _one_line_error(e)

    dict_folder = tmp_path / "dd"
    _write_hf_folder(dict_folder / "train", docs[:4])
    (dict_folder / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    with pytest.raises(DataError, match="DatasetDict"):
        prepare(dict_folder, tok_path, out, progress=False)
    # None of the failures above left anything behind.
    assert not out.exists() or not any(out.iterdir())


def test_files_that_are_not_text_are_skipped_in_folders(tmp_path: Path, docs: list[str], tok_path: Path) -> None:
    src = _write_text_folder(tmp_path / "src", docs[:6])
    (src / "part0" / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (src / "part0" / "blob.md").write_bytes(b"abc\x00def")
    (src / "part0" / "image.png").write_bytes(b"\x89PNG")  # not a text extension: never looked at
    meta = prepare(src, tok_path, tmp_path / "out", shard_tokens=300, val_tokens=30, progress=False)
    assert _decoded_docs(tmp_path / "out") == docs[:6]
    assert meta["skipped_files"] == {"count": 2, "first": ["part0/blob.md", "part0/latin1.txt"]}
    # Named on its own, the same file is an error rather than silently nothing.
    with pytest.raises(DataError) as e:
        prepare(src / "part0" / "latin1.txt", tok_path, tmp_path / "out2", progress=False)
    assert "not UTF-8 text" in _one_line_error(e)


def test_bad_tokenizers(tmp_path: Path, docs: list[str], tok_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _write_text_folder(tmp_path / "src", docs[:5])
    big = Tokenizer(models.WordLevel({f"w{i}": i for i in range(70_000)} | {"[UNK]": 70_000}, unk_token="[UNK]"))
    with pytest.raises(DataError) as e:
        prepare(src, big, tmp_path / "big", progress=False)
    assert "uint16" in _one_line_error(e)
    with pytest.raises(DataError, match="too large"):
        prepare(src, "train:70000", tmp_path / "big2", progress=False)

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as e:
        prepare(src, "HuggingFaceTB/SmolLM-135M", tmp_path / "hub", progress=False)
    assert "could not fetch tokenizer HuggingFaceTB/SmolLM-135M from the hub (offline?)" in _one_line_error(e)

    with pytest.raises(DataError, match="no such file"):
        prepare(src, tmp_path / "missing.json", tmp_path / "m", progress=False)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        prepare(src, bad, tmp_path / "b", progress=False)


def test_hub_stream_without_the_extra(tmp_path: Path, tok_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError) as e:
        prepare(
            "hf://datasets/HuggingFaceFW/fineweb-edu/sample-10BT:train",
            tok_path,
            tmp_path / "out",
            max_tokens=1000,
            progress=False,
        )
    assert "pip install 'rankscope[hub]'" in _one_line_error(e)
    assert not (tmp_path / "out").exists()


class _FakeStream:
    """What ``datasets.load_dataset(..., streaming=True)`` returns, as far as prepare uses it."""

    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows

    def skip(self, n: int) -> _FakeStream:
        return _FakeStream(self.rows[n:])

    def __iter__(self) -> Any:
        return iter(self.rows)


def _fake_datasets(monkeypatch: pytest.MonkeyPatch, load: Any) -> None:
    fake = types.ModuleType("datasets")
    fake.load_dataset = load  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)


def test_hub_stream_offline_is_one_clear_line(tmp_path: Path, tok_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("Couldn't reach 'org/name' on the Hub (LocalEntryNotFoundError)\nmore detail")

    _fake_datasets(monkeypatch, offline)
    with pytest.raises(DataError) as e:
        prepare("hf://datasets/org/name", tok_path, tmp_path / "out", max_tokens=1000, progress=False)
    assert "could not stream hf://datasets/org/name from the hub (offline?)" in _one_line_error(e)


def test_hub_stream_reads_resumes_and_stops(
    tmp_path: Path, docs: list[str], tok_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The streaming code path, run against a stand-in for the datasets library (no network).
    calls: list[tuple] = []

    def load_dataset(name: str, config: str | None, *, split: str, streaming: bool) -> _FakeStream:
        calls.append((name, config, split, streaming))
        return _FakeStream([{"id": i, "text": d} for i, d in enumerate(docs)])

    _fake_datasets(monkeypatch, load_dataset)
    monkeypatch.setattr(reader, "UNIT_ROWS", 4)
    monkeypatch.setattr(encode, "BATCH_BYTES", 1024)
    kwargs: dict[str, Any] = dict(shard_tokens=400, val_tokens=100, max_tokens=6000, progress=False)
    src = "hf://datasets/org/name/cfg:validation"
    meta = prepare(src, tok_path, tmp_path / "hub", **kwargs)
    assert calls[0] == ("org/name", "cfg", "validation", True)
    assert meta["tokens"]["total"] == 6000 and meta["truncated"] is True
    local = _write_text_folder(tmp_path / "src", docs)
    prepare(local, tok_path, tmp_path / "local", shard_tokens=10**6, val_tokens=0, progress=False)
    assert np.array_equal(_stream(tmp_path / "hub"), _stream(tmp_path / "local")[:6000])

    with monkeypatch.context() as m:
        _interrupt_after(m, 6)
        with pytest.raises(_Killed):
            prepare(src, tok_path, tmp_path / "resumed", **kwargs)
    prepare(src, tok_path, tmp_path / "resumed", **kwargs)
    assert _files(tmp_path / "resumed") == _files(tmp_path / "hub")


def test_out_folder_must_be_new_or_ours(tmp_path: Path, docs: list[str], tok_path: Path) -> None:
    src = _write_text_folder(tmp_path / "src", docs[:5])
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        prepare(src, tok_path, out, progress=False)
    # An output folder inside SRC is never read back as a source on a re-run.
    inner = src / "prepared"
    meta = prepare(src, tok_path, inner, shard_tokens=300, val_tokens=30, progress=False)
    assert prepare(src, tok_path, inner, shard_tokens=300, val_tokens=30, progress=False) == meta


def test_prepare_lock_names_its_holder(tmp_path: Path, docs: list[str], tok_path: Path) -> None:
    src = _write_text_folder(tmp_path / "src", docs[:10])
    kwargs: dict[str, Any] = dict(shard_tokens=300, val_tokens=30, progress=False)
    ref = prepare(src, tok_path, tmp_path / "ref", **kwargs)
    out = tmp_path / "out"
    out.mkdir()
    # the lock held here, as by another prepare (flock refuses a second descriptor in one process too)
    with FileLock(out / outdir.LOCK_FILE, "rankscope data prepare"):
        with pytest.raises(DataError) as e:
            prepare(src, tok_path, out, **kwargs)
    assert str(e.value).startswith(
        f"another process is writing to {out}: pid {os.getpid()} on {socket.gethostname()} since "
    ) and str(e.value).endswith(" UTC (rankscope data prepare); wait for it or use another --out")
    assert not any(out.iterdir())  # refused before writing anything; the lock file went with the lock
    assert prepare(src, tok_path, out, **kwargs)["shards"] == ref["shards"]
    assert _files(out) == _files(tmp_path / "ref")  # no lock file left in a finished output


def test_prepare_killed_with_sigkill_leaves_no_lock(tmp_path: Path, docs: list[str], tok_path: Path) -> None:
    src = _write_text_folder(tmp_path / "src", docs)
    kwargs: dict[str, Any] = dict(shard_tokens=300, val_tokens=30, progress=False)
    prepare(src, tok_path, tmp_path / "ref", **kwargs)
    out = tmp_path / "out"
    # a prepare that stops for good once it has recorded two shards, still holding its lock
    child = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from rankscope.data.prepare import outdir, prepare
        save = outdir.save_state
        def save_then_wait(path, state):
            save(path, state)
            if len(state["shards"]) == 2:
                print("saved", flush=True)
                sys.stdin.readline()  # until killed
        outdir.save_state = save_then_wait
        prepare(Path({str(src)!r}), Path({str(tok_path)!r}), Path({str(out)!r}), **{kwargs!r})
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "saved", proc.stderr.read()
        with pytest.raises(LockHeld) as e:  # held by the child, which says so
            FileLock(out / outdir.LOCK_FILE, "test").acquire()
        assert (e.value.holder.pid, e.value.holder.what) == (proc.pid, "rankscope data prepare")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (out / outdir.LOCK_FILE).exists()  # left behind by the kill, but no longer locked
    meta = prepare(src, tok_path, out, **kwargs)
    assert meta["run"]["resumed"] is True
    assert _files(out) == _files(tmp_path / "ref")
