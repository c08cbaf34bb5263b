"""Tests for rankscope.data: shards, sampling, corpora, tokenizer cache, and load_data.

Everything runs on small generated corpora (the embedded-corpus pipeline runs against a fake
stdlib folder) so the file finishes in seconds; the real stdlib is only listed, never tokenized.
"""

from __future__ import annotations

import json
import os
import random
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import rankscope.data.cache as cache_mod
import rankscope.data.corpus as corpus_mod
from rankscope.data import (
    SHARD_MAGIC,
    BatchSampler,
    DataError,
    ShardWriter,
    TokenData,
    fixed_batches,
    load_data,
    read_shard,
    stdlib_corpus_files,
    write_shard,
)
from rankscope.data.cache import tail_split
from rankscope.data.format import PREPARE_FORMAT
from rankscope.data.tokenizer import EOT_TOKEN, split_text, train_tokenizer
from rankscope.errors import RankscopeError

WORDS = (
    "the of and to in is that for it as with was on be by this are from or an at which not have "
    "one all their has been data model train token layer head rank attention value query key norm"
).split()


@pytest.fixture(autouse=True)
def _no_home_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Any load_data call that forgets cache_dir lands in the test's folder, never in ~/.cache.
    monkeypatch.setenv("RANKSCOPE_CACHE", str(tmp_path / "default-cache"))


def _prose(rng: random.Random, n_lines: int) -> str:
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        lines.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ":", ","]))
    return "\n".join(lines) + "\n"


def _make_text_folder(root: Path, n_files: int = 40, seed: int = 0) -> dict[str, str]:
    """Write n_files small text files in nested folders; returns {relpath: text}."""
    rng = random.Random(seed)
    texts = {}
    for i in range(n_files):
        rel = f"part{i % 3}/doc{i:03d}.txt" if i % 2 else f"doc{i:03d}.md"
        text = _prose(rng, rng.randint(5, 30))
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
        texts[rel] = text
    return texts


def _split_docs(tokens: np.ndarray, eot_id: int) -> list[np.ndarray]:
    cuts = np.flatnonzero(np.asarray(tokens) == eot_id)
    return np.split(np.asarray(tokens), cuts)[:1] + [d[1:] for d in np.split(np.asarray(tokens), cuts)[1:]]


# --------------------------------------------------------------------------------------------
# shards


def test_shard_round_trip(tmp_path: Path) -> None:
    tokens = np.random.default_rng(0).integers(0, 65536, size=10_000).astype(np.int64)
    tokens[:2] = [0, 65535]
    path = tmp_path / "x.bin"
    write_shard(path, tokens)
    back = read_shard(path)
    assert isinstance(back, np.memmap)
    assert back.dtype == np.uint16 and back.ndim == 1
    np.testing.assert_array_equal(back, tokens)
    assert path.stat().st_size == 1024 + 2 * tokens.size
    header = np.fromfile(path, dtype="<i4", count=256)
    assert list(header[:3]) == [SHARD_MAGIC, 1, tokens.size] and not header[3:].any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]  # no temporary left behind


def test_empty_shard_round_trip(tmp_path: Path) -> None:
    write_shard(tmp_path / "e.bin", np.zeros(0, dtype=np.uint16))
    assert read_shard(tmp_path / "e.bin").shape == (0,)


def test_shard_writer_streams_and_aborts(tmp_path: Path) -> None:
    path = tmp_path / "s.bin"
    with ShardWriter(path) as w:
        w.write(np.arange(10))
        w.write(np.arange(10, 25, dtype=np.uint16))
    np.testing.assert_array_equal(read_shard(path), np.arange(25))
    with pytest.raises(RuntimeError):
        with ShardWriter(path) as w:
            w.write(np.arange(5))
            raise RuntimeError("killed")
    # the failed rewrite left the previous shard intact and no temporary behind
    np.testing.assert_array_equal(read_shard(path), np.arange(25))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin"]


def _good_shard(tmp_path: Path, n: int = 100) -> Path:
    path = tmp_path / "bad.bin"
    write_shard(path, np.arange(n))
    return path


def _patch_header(path: Path, index: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(4 * index)
        f.write(np.array([value], dtype="<i4").tobytes())


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


@pytest.mark.parametrize(
    "damage, phrase",
    [
        (lambda p: p.write_bytes(b"\x00" * 100), "shorter than the 1024-byte header"),
        (lambda p: _patch_header(p, 0, 123), "bad magic 123 (expected 20240520)"),
        (lambda p: _patch_header(p, 1, 7), "unsupported version 7"),
        (lambda p: _patch_header(p, 2, 101), "truncated"),
        (lambda p: os.truncate(p, p.stat().st_size - 2), "truncated"),
        (lambda p: _patch_header(p, 2, 99), "extra bytes"),
        (lambda p: _append(p, b"\x01"), "extra bytes"),
        (lambda p: _patch_header(p, 2, -5), "negative token count"),
    ],
    ids=["short", "magic", "version", "count-too-big", "truncated", "count-too-small", "trailing", "negative"],
)
def test_bad_shard_headers(tmp_path: Path, damage, phrase: str) -> None:
    path = _good_shard(tmp_path)
    damage(path)
    with pytest.raises(DataError) as e:
        read_shard(path)
    msg = str(e.value)
    assert str(path) in msg and phrase in msg and "\n" not in msg


def test_missing_shard(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        read_shard(tmp_path / "nope.bin")


def test_write_shard_rejects_ids_beyond_uint16(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not fit in uint16"):
        write_shard(tmp_path / "big.bin", np.array([1, 70_000], dtype=np.int32))
    with pytest.raises(DataError, match="negative token id"):
        write_shard(tmp_path / "neg.bin", np.array([1, -1]))
    with pytest.raises(DataError, match="integers"):
        write_shard(tmp_path / "f.bin", np.array([1.0, 2.0]))
    assert list(tmp_path.iterdir()) == []


def test_vocab_too_large_for_uint16(tmp_path: Path) -> None:
    _make_text_folder(tmp_path / "txt", n_files=4)
    with pytest.raises(DataError, match="uint16"):
        load_data(tmp_path / "txt", 70_000, cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(DataError, match="too small"):
        load_data(tmp_path / "txt", 100, cache_dir=tmp_path / "cache", progress=False)


def test_data_error_is_a_one_line_user_error() -> None:
    assert issubclass(DataError, ValueError) and issubclass(DataError, RankscopeError)


# --------------------------------------------------------------------------------------------
# sampling


def _ramp_shards() -> list[np.ndarray]:
    # Each token equals its global position, so a window's values reveal where it came from.
    return [np.arange(0, 3000, dtype=np.uint16), np.arange(3000, 3500, dtype=np.uint16)]


def test_sampler_is_a_pure_function_of_seed_and_step() -> None:
    a = BatchSampler(_ramp_shards(), batch_size=8, seq_len=16, seed=3)
    b = BatchSampler(_ramp_shards(), batch_size=8, seq_len=16, seed=3)
    for step in (0, 1, 17, 10_000):
        xa, ya = a.batch(step)
        xb, yb = b.batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    x0, _ = a.batch(0)
    assert torch.equal(a.batch(0)[0], x0)  # no hidden state: asking again gives the same batch
    assert not torch.equal(a.batch(1)[0], x0)
    assert not torch.equal(BatchSampler(_ramp_shards(), 8, 16, seed=4).batch(0)[0], x0)


def test_sampler_windows_are_contiguous_and_shifted() -> None:
    s = BatchSampler(_ramp_shards(), batch_size=32, seq_len=16, seed=0)
    for step in range(20):
        x, y = s.batch(step)
        assert x.dtype == torch.int64 and y.dtype == torch.int64
        assert x.shape == y.shape == (32, 16)
        assert x.is_contiguous() and y.is_contiguous()
        assert torch.equal(y[:, :-1], x[:, 1:])
        assert torch.equal(y[:, -1], x[:, -1] + 1)
        assert (torch.diff(x, dim=1) == 1).all()  # one contiguous run, never across shards
        starts = x[:, 0]
        assert not ((starts > 3000 - 17) & (starts < 3000)).any()
        assert (starts <= 3500 - 17).all()


def test_sampler_weights_shards_by_length() -> None:
    s = BatchSampler(_ramp_shards(), batch_size=64, seq_len=16, seed=1)
    firsts = torch.cat([s.batch(k)[0][:, 0] for k in range(50)])
    share_small = (firsts >= 3000).double().mean().item()
    expected = (500 - 16) / (3000 - 16 + 500 - 16)
    assert abs(share_small - expected) < 0.05


def test_sampler_joins_short_shards_and_rejects_too_little_data() -> None:
    short = [np.arange(i * 10, i * 10 + 10, dtype=np.uint16) for i in range(3)]
    x, y = BatchSampler(short, 4, 20, seed=0).batch(0)
    assert x.shape == (4, 20)
    with pytest.raises(DataError, match="fewer than seq_len"):
        BatchSampler(short, 4, 30, seed=0)
    with pytest.raises(ValueError):
        BatchSampler(short, 4, 8, seed=0).batch(-1)


def test_fixed_batches_are_deterministic_and_spread() -> None:
    shards = _ramp_shards()
    a = fixed_batches(shards, n_batches=4, batch_size=8, seq_len=16)
    b = fixed_batches(shards, n_batches=4, batch_size=8, seq_len=16)
    assert len(a) == 4
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == (8, 16) and xa.dtype == torch.int64
        assert torch.equal(ya[:, :-1], xa[:, 1:])
    starts = torch.cat([x[:, 0] for x, _ in a]).sort().values
    assert starts[0] == 0
    assert len(set(starts.tolist())) == 32
    assert (torch.diff(starts) >= 17).all()  # enough data: windows do not overlap
    assert (starts >= 3000).any()  # the second shard is covered too
    # round-robin: every batch reaches across the data, not one slice of it
    assert all(x[:, 0].max() - x[:, 0].min() > 2000 for x, _ in a)


def test_fixed_batches_overlap_when_short_and_fail_when_too_short() -> None:
    tiny = [np.arange(20, dtype=np.uint16)]
    batches = fixed_batches(tiny, n_batches=4, batch_size=4, seq_len=8)
    assert len(batches) == 4 and all(x.shape == (4, 8) for x, _ in batches)
    with pytest.raises(DataError, match="fewer than seq_len"):
        fixed_batches(tiny, 1, 1, seq_len=20)


# --------------------------------------------------------------------------------------------
# tokenizer


def test_split_text_pieces_encode_exactly_like_the_whole() -> None:
    rng = random.Random(1)
    text = _prose(rng, 200) + "  indented\n\n\n   lines\tand \u3000wide\u00a0spaces 日本語 テキスト\n" * 20
    tok = train_tokenizer([text], 400)
    whole = tok.encode(text).ids
    for max_chars in (7, 64, 1000):
        pieces = split_text(text, max_chars)
        assert "".join(pieces) == text and len(pieces) > 1
        assert [i for p in pieces for i in tok.encode(p).ids] == whole


def test_tokenizer_layout() -> None:
    tok = train_tokenizer([_prose(random.Random(2), 100)], 300)
    assert tok.token_to_id(EOT_TOKEN) == 0
    assert tok.get_vocab_size() <= 300
    text = "Héllo wörld\n\tx = 1  # ✓\n"
    assert tok.decode(tok.encode(text).ids) == text  # byte-level: any text round-trips


# --------------------------------------------------------------------------------------------
# user text and the cache


def test_text_folder_end_to_end(tmp_path: Path) -> None:
    data = tmp_path / "corpus"
    texts = _make_text_folder(data, n_files=60)
    (data / "blob.txt").write_bytes(b"\xff\xfe\x00binary\x80")  # not UTF-8: skipped
    (data / "image.png").write_bytes(b"\x89PNG")  # not a text extension: skipped
    (data / ".git").mkdir()
    (data / ".git" / "HEAD").write_text("ref: refs/heads/main\n")  # hidden: skipped
    (data / "README").write_text("No extension is fine.\n")
    texts["README"] = "No extension is fine.\n"

    val_rel = sorted(r for r in texts if zlib.crc32(r.encode()) % 100 < 5)
    train_rel = sorted(r for r in texts if r not in val_rel)
    assert val_rel, "fixture should put at least one file in validation"

    d = load_data(data, 300, cache_dir=tmp_path / "cache", progress=False)
    assert isinstance(d, TokenData)
    assert d.vocab_size == 300 and d.eot_id == 0 and d.ood is None and d.tokenizer is not None
    assert len(d.train) == len(d.val) == 1
    assert d.train_tokens > 0 and d.val_tokens > 0
    assert int(max(d.train[0].max(), d.val[0].max())) < 300
    assert f"{len(train_rel)} train files" in d.source and "\n" not in d.source

    # documents come back in sorted order, separated by <|endoftext|>, decoding to the exact text
    for arr, rels in ((d.train[0], train_rel), (d.val[0], val_rel)):
        docs = _split_docs(arr, d.eot_id)
        assert [d.tokenizer.decode(doc.tolist()) for doc in docs] == [texts[r] for r in rels]

    x, y = BatchSampler(d.train, 4, 32, seed=0).batch(0)
    assert x.shape == (4, 32)


def test_literal_eot_text_is_not_a_separator(tmp_path: Path) -> None:
    data = tmp_path / "c"
    data.mkdir()
    text = f"before {EOT_TOKEN} after\n" * 50
    (data / "a.txt").write_text(text)
    d = load_data(data, 300, cache_dir=tmp_path / "cache", progress=False)
    stream = np.concatenate([d.train[0], d.val[0]])
    assert not (stream == 0).any()  # one document: no separator anywhere
    assert EOT_TOKEN in d.tokenizer.decode(d.train[0].tolist())


def test_single_text_file_holds_out_tail(tmp_path: Path) -> None:
    f = tmp_path / "book.txt"
    text = _prose(random.Random(5), 400)
    f.write_text(text)
    d = load_data(f, 300, cache_dir=tmp_path / "cache", progress=False)
    assert "last 5%" in d.source
    n_train, n_val = d.train_tokens, d.val_tokens
    assert 0.03 < n_val / (n_train + n_val) < 0.07
    # the two halves together are the whole file
    assert d.tokenizer.decode(np.concatenate([d.train[0], d.val[0]]).tolist()) == text


def test_tail_split_snaps_to_document_boundary() -> None:
    tokens = np.ones(1000, dtype=np.uint16)
    tokens[940] = 0
    assert tail_split(tokens, 5, 0) == (940, 941)
    assert tail_split(np.ones(1000, dtype=np.uint16), 5, 0) == (950, 950)


def test_cache_hit_does_not_rebuild(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "corpus"
    _make_text_folder(data, n_files=10)
    cache = tmp_path / "cache"
    first = load_data(data, 300, cache_dir=cache, progress=False)
    (folder,) = [p for p in cache.iterdir()]
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def no_training(*args, **kwargs):
        raise AssertionError("tokenizer retrained on a cache hit")

    monkeypatch.setattr(cache_mod, "train_tokenizer", no_training)
    second = load_data(data, 300, cache_dir=cache, progress=False)
    assert [p for p in cache.iterdir()] == [folder]
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    np.testing.assert_array_equal(first.train[0], second.train[0])
    assert first.source == second.source

    # any content change is a different corpus: a new folder is built
    monkeypatch.undo()
    (data / "doc000.md").write_text("changed\n")
    load_data(data, 300, cache_dir=cache, progress=False)
    assert len([p for p in cache.iterdir()]) == 2
    # and so is a different vocabulary size
    load_data(data, 320, cache_dir=cache, progress=False)
    assert len([p for p in cache.iterdir()]) == 3


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _make_text_folder(tmp_path / "corpus", n_files=4)
    monkeypatch.setenv("RANKSCOPE_CACHE", str(tmp_path / "envcache"))
    load_data(tmp_path / "corpus", 300, progress=False)
    assert len(list((tmp_path / "envcache").iterdir())) == 1


def test_killed_build_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _make_text_folder(tmp_path / "corpus", n_files=6)
    cache = tmp_path / "cache"

    def dies(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_mod, "encode_documents", dies)
    with pytest.raises(KeyboardInterrupt):
        load_data(tmp_path / "corpus", 300, cache_dir=cache, progress=False)
    assert list(cache.iterdir()) == []
    monkeypatch.undo()
    d = load_data(tmp_path / "corpus", 300, cache_dir=cache, progress=False)
    assert d.train_tokens > 0


def test_damaged_cache_is_rebuilt(tmp_path: Path) -> None:
    _make_text_folder(tmp_path / "corpus", n_files=6)
    cache = tmp_path / "cache"
    first = load_data(tmp_path / "corpus", 300, cache_dir=cache, progress=False)
    expected = np.array(first.train[0])
    del first
    (folder,) = list(cache.iterdir())
    os.truncate(folder / "train.bin", 1000)
    d = load_data(tmp_path / "corpus", 300, cache_dir=cache, progress=False)
    np.testing.assert_array_equal(d.train[0], expected)
    assert [p.name for p in cache.iterdir()] == [folder.name]


# --------------------------------------------------------------------------------------------
# .bin shards as input


def test_bin_folder_splits_by_name(tmp_path: Path) -> None:
    data = tmp_path / "shards"
    data.mkdir()
    rng = np.random.default_rng(0)
    parts = {
        name: rng.integers(0, 500, size=2000)
        for name in ("fineweb_train_000001.bin", "fineweb_train_000002.bin", "fineweb_val_000000.bin")
    }
    for name, toks in parts.items():
        write_shard(data / name, toks)
    d = load_data(data, 512, cache_dir=tmp_path / "cache", progress=False)
    assert d.tokenizer is None and d.eot_id is None and d.ood is None and d.vocab_size == 512
    assert len(d.train) == 2 and len(d.val) == 1
    np.testing.assert_array_equal(d.train[0], parts["fineweb_train_000001.bin"])
    np.testing.assert_array_equal(d.train[1], parts["fineweb_train_000002.bin"])
    np.testing.assert_array_equal(d.val[0], parts["fineweb_val_000000.bin"])
    assert all(isinstance(a, np.memmap) for a in d.train + d.val)
    assert not (tmp_path / "cache").exists()  # nothing to cache for pre-tokenized data


def test_bin_file_holds_out_tail(tmp_path: Path) -> None:
    write_shard(tmp_path / "one.bin", np.arange(1000) % 256)
    d = load_data(tmp_path / "one.bin", 256, progress=False)
    assert d.train_tokens == 950 and d.val_tokens == 50
    np.testing.assert_array_equal(np.concatenate([d.train[0], d.val[0]]), np.arange(1000) % 256)
    assert isinstance(d.val[0], np.memmap)  # a view, not a copy


def test_bin_folder_without_val_holds_out_tail_of_last_shard(tmp_path: Path) -> None:
    write_shard(tmp_path / "a.bin", np.arange(400))
    write_shard(tmp_path / "b.bin", np.arange(400, 800))
    d = load_data(tmp_path, 1024, progress=False)
    assert [len(a) for a in d.train] == [400, 380] and [len(a) for a in d.val] == [20]
    assert d.val[0][0] == 780


@pytest.mark.parametrize("max_id, suggested", [(1000, 1024), (1023, 1024), (1024, 1088)])
def test_token_ids_beyond_vocab(tmp_path: Path, max_id: int, suggested: int) -> None:
    toks = np.arange(100)
    toks[7] = max_id
    write_shard(tmp_path / "train.bin", toks)
    write_shard(tmp_path / "val.bin", np.arange(50))
    with pytest.raises(DataError) as e:
        load_data(tmp_path, 512, progress=False)
    msg = str(e.value)
    assert f"at least {suggested}" in msg and "train.bin" in msg and str(max_id) in msg


# --------------------------------------------------------------------------------------------
# bad paths


def test_missing_and_empty_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_data(tmp_path / "nowhere", 300, cache_dir=tmp_path / "cache", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        load_data(tmp_path / "empty", 300, cache_dir=tmp_path / "cache", progress=False)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_bytes(b"\x89PNG\r\n")
    (junk / "b.txt").write_bytes(b"\xff\xfe\xfd")
    (junk / "c.txt").write_text("")
    with pytest.raises(DataError, match="no usable text files"):
        load_data(junk, 300, cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(DataError, match="not UTF-8"):
        load_data(junk / "b.txt", 300, cache_dir=tmp_path / "cache", progress=False)


# --------------------------------------------------------------------------------------------
# the embedded corpus


EXCLUDED = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "pydoc_data"}


def test_embedded_corpus_listing() -> None:
    train, val, ood = stdlib_corpus_files()
    root = corpus_mod.stdlib_root()
    assert (train, val, ood) == stdlib_corpus_files()  # deterministic
    assert len(train) > 100
    for files in (train, val):
        rels = [p.relative_to(root).as_posix() for p in files]
        assert rels == sorted(rels)
        for rel in rels:
            dirs = rel.split("/")[:-1]
            assert not any(d in EXCLUDED or d.startswith("test") for d in dirs), rel
            assert rel.endswith(".py")
    assert not set(train) & set(val)
    share = len(val) / (len(train) + len(val))
    assert 0.02 < share < 0.10
    assert ood and all(isinstance(doc, str) and doc.strip() for doc in ood)
    assert any("assert" in doc for doc in ood)

    all_train, no_val, _ = stdlib_corpus_files(val_percent=0)
    assert no_val == [] and all_train == sorted(train + val, key=lambda p: p.relative_to(root).as_posix())


def _fake_stdlib(root: Path) -> None:
    rng = random.Random(7)
    for i in range(30):
        (root / f"mod{i:02d}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" + "# " + _prose(rng, 5))
    for skipped in ("test", "tests", "site-packages", "__pycache__", "testing_tools", "pkg/idle_test"):
        (root / skipped).mkdir(parents=True)
        (root / skipped / "skip_me.py").write_text("SKIPPED = True\n")
    (root / "pkg" / "inner.py").write_text("INNER = 1\n")
    (root / "pydoc_data").mkdir()
    (root / "pydoc_data" / "topics.py").write_text(
        "# Autogenerated\ntopics = {'zeta': 'Zeta prose.\\n',\n 'alpha': 'Alpha ' 'prose.\\n'}\n"
    )


def test_embedded_pipeline_on_a_fake_stdlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "stdlib"
    root.mkdir()
    _fake_stdlib(root)
    monkeypatch.setattr(corpus_mod, "stdlib_root", lambda: root)
    train, val, ood = stdlib_corpus_files()
    rels = sorted(p.relative_to(root).as_posix() for p in train + val)
    assert rels == sorted([f"mod{i:02d}.py" for i in range(30)] + ["pkg/inner.py"])
    assert ood == ["Alpha prose.\n", "Zeta prose.\n"]  # sorted by topic name

    d = load_data("python-stdlib", 300, cache_dir=tmp_path / "cache", progress=False)
    assert d.ood is not None and len(d.ood) == 1
    assert d.tokenizer.decode(d.ood[0].tolist()) == "Alpha prose.\nZeta prose.\n"
    assert (d.ood[0] == 0).sum() == 1  # two documents, one separator
    assert d.source.startswith("python-stdlib: ") and "train / " in d.source
    assert d.train_tokens > 0 and d.val_tokens > 0


# --------------------------------------------------------------------------------------------
# the built-in corpora: sotu (English, the default) and python-stdlib


def test_builtin_corpora_names_agree_and_describe_themselves() -> None:
    from rankscope.data import corpora
    from rankscope.settings.vocab import BUILTIN_CORPORA

    assert BUILTIN_CORPORA == tuple(corpora.CORPORA) and BUILTIN_CORPORA[0] == corpora.DEFAULT_CORPUS
    described = dict(corpora.describe_corpora())
    assert set(described) == set(BUILTIN_CORPORA)
    assert "[default]" in described["sotu"] and "249 documents" in described["sotu"]


def test_sotu_split_is_by_document_and_deterministic() -> None:
    from rankscope.data import corpora

    train, val = corpora.sotu_files(5)
    assert (train, val) == corpora.sotu_files(5)
    names = [f.relpath for f in train + val]
    assert len(names) == 249 and all(n.endswith(".txt") for n in names)
    assert [f.relpath for f in train] == sorted(f.relpath for f in train)
    assert not {f.relpath for f in train} & {f.relpath for f in val}
    assert 0.02 < len(val) / len(names) < 0.10
    # the rule is the shared crc32 rule on the file name, so any machine splits the same way
    assert all(corpus_mod.is_val(f.relpath, 5) for f in val)
    plan = corpora.CORPORA["sotu"].plan(5)
    # its OOD set is code: exactly the stdlib files python-stdlib holds out for validation
    _, stdlib_val, _ = corpus_mod.stdlib_source_files(5)
    assert plan.ood_files == stdlib_val and plan.kind == "sotu"
    assert "Congress" in plan.read(train[0]) or "Congress" in plan.read(train[1])


def test_sotu_pipeline_on_a_fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rankscope.data import corpora

    speeches, stdlib = tmp_path / "speeches", tmp_path / "stdlib"
    speeches.mkdir()
    stdlib.mkdir()
    _fake_stdlib(stdlib)
    rng = random.Random(3)
    for year in range(1900, 1940):
        (speeches / f"{year}-Someone-1.txt").write_text(_prose(rng, 30))
    monkeypatch.setattr(corpora, "sotu_root", lambda: speeches)
    monkeypatch.setattr(corpus_mod, "stdlib_root", lambda: stdlib)
    d = load_data(None, 300, cache_dir=tmp_path / "cache", progress=False)
    assert d.source.startswith("sotu: English prose") and "train / " in d.source and "OOD: Python source" in d.source
    assert d.train_tokens > 0 and d.val_tokens > 0 and d.ood is not None
    # None and "sotu" are one corpus and one cache folder; python-stdlib is another
    again = load_data("sotu", 300, cache_dir=tmp_path / "cache", progress=False)
    np.testing.assert_array_equal(d.train[0], again.train[0])
    load_data("python-stdlib", 300, cache_dir=tmp_path / "cache", progress=False)
    folders = sorted(p.name.split("-v")[0] for p in (tmp_path / "cache").iterdir())
    assert folders == ["sotu", "stdlib"]
    # the OOD text is the fake stdlib's held-out Python, tokenized with the English tokenizer
    ood_text = d.tokenizer.decode(d.ood[0].tolist())
    held_out = [p for p in sorted(stdlib.glob("*.py")) if corpus_mod.is_val(p.name, 5)]
    assert held_out and all(p.read_text() in ood_text for p in held_out)


# --------------------------------------------------------------------------------------------
# token shards size the vocabulary


def test_shard_vocab_size_from_ids_or_the_prepared_meta(tmp_path: Path) -> None:
    from rankscope.data.loader import shard_vocab_size

    gpt2 = tmp_path / "fineweb"
    gpt2.mkdir()
    write_shard(gpt2 / "fineweb_train_000001.bin", np.array([1, 50256, 7] * 10))
    write_shard(gpt2 / "fineweb_val_000000.bin", np.array([3, 4, 5] * 10))
    n, how = shard_vocab_size(gpt2)
    assert n == 50304 and "largest id 50256" in how  # modded-nanogpt's padding of GPT-2's 50257
    assert shard_vocab_size(gpt2 / "fineweb_val_000000.bin")[0] == 64
    for not_shards in (None, "", "sotu", "python-stdlib"):
        assert shard_vocab_size(not_shards) is None
    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_text("hello")
    assert shard_vocab_size(text) is None
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    write_shard(prepared / "train.bin", np.array([1, 2, 3]))
    (prepared / "meta.json").write_text(json.dumps({"format": PREPARE_FORMAT, "model_vocab_size": 1024}))
    assert shard_vocab_size(prepared) == (1024, "model.vocab_size 1024 from the prepared folder's meta.json")


def test_a_study_on_shards_sizes_the_vocabulary_unless_set(tmp_path: Path) -> None:
    from rankscope.run.studies import study_from_dict
    from rankscope.run.study import vocab_from_data

    write_shard(tmp_path / "train.bin", np.array([0, 5000, 1] * 20))
    arms = {"a": {"model": {"qk_norm": "none"}}, "b": {"model": {"qk_norm": "learned"}}}
    study = study_from_dict({"arms": arms})
    over, note = vocab_from_data(study, {"data.path": str(tmp_path)})
    assert over == {"data.path": str(tmp_path), "model.vocab_size": 5056} and "largest id 5000" in note
    # set anywhere explicitly: left as set (too small is then load_data's error, tested above)
    explicit = ({"settings": {"model": {"vocab_size": 512}}}, {"arms": {**arms, "b": {"model": {"vocab_size": 512}}}})
    for where in explicit:
        s = study_from_dict({"arms": arms, **where})
        assert vocab_from_data(s, {"data.path": str(tmp_path)}) == ({"data.path": str(tmp_path)}, None)
    assert vocab_from_data(study, {"data.path": str(tmp_path), "model.vocab_size": 8000})[1] is None
    # a built-in corpus trains its own tokenizer: nothing to size
    assert vocab_from_data(study, {}) == ({}, None)


def test_rankscope_run_trains_on_gpt2_style_shards_with_no_set(tmp_path: Path, capsys) -> None:
    """modded-nanogpt's shard folders train as they are: the vocabulary comes from the ids."""
    from rankscope.cli import main

    rng = np.random.default_rng(0)
    shards = tmp_path / "fineweb10B"
    shards.mkdir()
    for name, n in (("fineweb_train_000001.bin", 20000), ("fineweb_val_000000.bin", 4000)):
        ids = rng.integers(0, 600, n)
        ids[::997] = 4999  # a rare high id, as GPT-2's vocabulary has
        write_shard(shards / name, ids)
    study = tmp_path / "s.toml"
    study.write_text(
        'tokens = "1024"\nprobe_every = "1024"\n[settings]\nmodel.n_layer = 1\nmodel.d_model = 32\n'
        "model.n_head = 1\nmodel.n_kv_head = 1\nmodel.head_dim = 32\nmodel.d_mlp = 64\n"
        "train.batch_size = 2\ntrain.seq_len = 32\n"
        'train.eval_batches = 1\nprobe.batch_size = 2\nprobe.downstream = false\n[arms.a]\nmodel.qk_norm = "none"\n'
    )
    out = tmp_path / "out"
    assert main(["run", str(study), "--data", str(shards), "--out", str(out), "--no-progress", "--no-report"]) == 0
    err = capsys.readouterr().err
    assert "model.vocab_size 5056 from the shards (largest id 4999" in err
    cfg = json.loads((out / "a" / "seed-0" / "config.json").read_text())
    assert cfg["model"]["vocab_size"] == 5056
