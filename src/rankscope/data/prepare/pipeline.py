"""The pipeline: one prepare call from its arguments to a finished output folder.

The steps, in order (each labelled in :func:`prepare_output`):

1. check the arguments;
2. list the sources and resolve the tokenizer spec (names and stats only), and record the
   arguments the output is made with;
3. return an output already finished with those arguments as it is (refuse other arguments);
4. check the sources; for a new output, get the tokenizer before creating anything;
5. under the folder's lock: start the state, or take up the recorded one;
6. save the output's tokenizer, or reuse the saved copy when resuming;
7. stream the tokens into shards, from the last intact shard on;
8. write ``meta.json``, and drop the state file.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from ...settings.units import fmt_count
from ...storage.fsio import write_json, write_text
from ..errors import DataError
from ..format import MAX_SHARD_TOKENS, MAX_VOCAB, META_FILE, PREPARE_FORMAT, SHARD_FORMAT, STATE_FILE, TOKENIZER_FILE
from ..messages import log
from ..shards import padded_vocab_size
from . import outdir
from .encode import EncoderSpec, encoded
from .reader import Pos, read_units
from .sink import ShardSink
from .sources import HUB_PREFIX, Source, check_sources, discover, source_sha256
from .tokenizer_spec import (
    TokenizerInfo,
    TokenizerSpec,
    describe_tokenizer,
    get_tokenizer,
    resolve_tokenizer,
    sha256_text,
    tokenizer_from_json,
)

DEFAULT_SHARD_TOKENS = 100_000_000  # FineWeb's shard size in modded-nanogpt
DEFAULT_VAL_TOKENS = 10_000_000


def prepare(
    src: str | os.PathLike,
    tokenizer: str | os.PathLike | Tokenizer,
    out_dir: str | os.PathLike,
    *,
    text_field: str = "text",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    val_tokens: int = DEFAULT_VAL_TOKENS,
    workers: int = 1,
    eot_id: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize ``src`` into modded-nanogpt shards in ``out_dir`` and return its ``meta.json``.

    ``src``: a text/JSONL/Parquet/Arrow file, a folder of them (searched recursively, sorted), a
    ``save_to_disk`` dataset folder, or ``hf://datasets/NAME[/CONFIG][:SPLIT]`` (needs the
    ``hub`` extra and a network). ``tokenizer``: a ``tokenizer.json``, a folder holding one, a hub
    name, ``train:VOCAB`` (a byte-level BPE trained on ``src``) or a ``tokenizers.Tokenizer``.
    Each document is preceded by the end-of-text id: ``eot_id`` if given, else the tokenizer's
    ``<|endoftext|>``, else its end-of-sequence special token.

    The first ``val_tokens`` tokens (at most a tenth of the total) go to ``val_*.bin``, the rest
    to ``train_*.bin`` shards of ``shard_tokens`` tokens; ``max_tokens`` stops early. The output
    does not depend on ``workers`` (processes tokenizing batches in parallel; with 1, the
    tokenizer's own threads use every core). Workers are started with ``spawn``, so a script
    that calls this with ``workers > 1`` needs the usual ``if __name__ == "__main__":`` guard.
    An interrupted call resumes when repeated with the same arguments; a finished output is
    returned as is. Bad input raises :class:`DataError` with one line naming the problem.
    """
    meta, _ = prepare_output(
        src,
        tokenizer,
        out_dir,
        text_field=text_field,
        shard_tokens=shard_tokens,
        val_tokens=val_tokens,
        workers=workers,
        eot_id=eot_id,
        max_tokens=max_tokens,
        progress=progress,
    )
    return meta


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        bound = f" and <= {maximum}" if maximum is not None else ""
        raise DataError(f"{name} must be an integer >= {minimum}{bound}, got {value!r}")
    return int(value)


def prepare_output(
    src: str | os.PathLike,
    tokenizer: str | os.PathLike | Tokenizer,
    out_dir: str | os.PathLike,
    *,
    text_field: str,
    shard_tokens: int,
    val_tokens: int,
    workers: int,
    eot_id: int | None,
    max_tokens: int | None,
    progress: bool,
) -> tuple[dict[str, Any], bool]:
    """:func:`prepare`, also saying whether the output was already complete (nothing done)."""
    t_start = time.perf_counter()

    # 1. The arguments.
    shard_tokens = _check_int("shard_tokens", shard_tokens, 1, MAX_SHARD_TOKENS)
    val_tokens = _check_int("val_tokens", val_tokens, 0)
    workers = _check_int("workers", workers, 1)
    if eot_id is not None:
        eot_id = _check_int("eot_id", eot_id, 0, MAX_VOCAB - 1)
    if max_tokens is not None:
        max_tokens = _check_int("max_tokens", max_tokens, 2)
    if not isinstance(text_field, str) or not text_field:
        raise DataError(f"text_field must be a non-empty string, got {text_field!r}")

    # 2. What is asked for, from names and stats alone, and the record of it.
    src_text = os.fspath(src)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a folder")
    candidates = discover(src_text, exclude=out.resolve())
    source_label = src_text if src_text.startswith(HUB_PREFIX) else str(Path(src_text).expanduser().resolve())
    tok_spec = resolve_tokenizer(tokenizer)
    args = {
        "format": PREPARE_FORMAT,
        "source": source_label,
        "source_sha256": source_sha256(candidates),
        "tokenizer": tok_spec.recorded,
        "tokenizer_sha256": tok_spec.sha256,
        "text_field": text_field,
        "shard_tokens": shard_tokens,
        "val_tokens": val_tokens,
        "max_tokens": max_tokens,
        "eot_id": eot_id,
    }

    # 3. Already done? Decided before any source is read.
    meta_path, state_path = out / META_FILE, out / STATE_FILE
    done = outdir.finished_meta(out, args, progress)
    if done is not None:
        return done, True
    if state_path.is_file():
        outdir.check_resumable(out, outdir.read_json(state_path), args)  # refuse before reading any source

    # 4. The sources, looked into; for a new output, the tokenizer.
    sources, skipped = check_sources(src_text, candidates, text_field)
    if skipped:
        log(progress, f"skipping {len(skipped)} file(s) that are not UTF-8 text, e.g. {skipped[0]}")
    fresh: TokenizerInfo | None = None
    if not (meta_path.is_file() or state_path.is_file()):
        # A new output: get the tokenizer right (train, load or fetch it, check its vocabulary
        # and separator) before creating anything, so a mistake leaves no folder behind that
        # would then refuse the corrected command.
        outdir.check_empty(out)
        fresh = get_tokenizer(tok_spec, sources, text_field, eot_id, progress)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None

    with outdir.locked(out):
        # 5. The state: the recorded one, or a new one.
        done = outdir.finished_meta(out, args, progress)  # finished by another process meanwhile?
        if done is not None:
            return done, True
        state = outdir.read_json(state_path)
        if state is not None:
            outdir.check_resumable(out, state, args)
        else:
            outdir.check_empty(out)
            state = {"args": args, "tokenizer": None, "val_tokens": None, "shards": [], "finished": False}
        outdir.remove_temp_files(out)  # those of a killed run (we hold the lock)

        # 6. The tokenizer.
        info = _output_tokenizer(out, state, state_path, fresh, tok_spec, sources, text_field, eot_id, progress)
        resumed = bool(state["shards"])

        # 7. The tokens.
        _write_shards(
            out,
            state,
            state_path,
            sources,
            info,
            text_field=text_field,
            shard_tokens=shard_tokens,
            val_tokens=val_tokens,
            workers=workers,
            max_tokens=max_tokens,
            progress=progress,
        )

        # 8. meta.json.
        meta = _summary(state, sources, info, text_field=text_field, shard_tokens=shard_tokens, max_tokens=max_tokens)
        meta["skipped_files"] = {"count": len(skipped), "first": skipped[:10]}
        meta["args"] = args
        meta["run"] = {
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - t_start, 2),
            "resumed": resumed,
            "workers": workers,
        }
        meta["complete"] = True  # the last key of the last file written
        write_json(meta_path, meta)
        state_path.unlink(missing_ok=True)
        return meta, False


def _output_tokenizer(
    out: Path,
    state: dict[str, Any],
    state_path: Path,
    fresh: TokenizerInfo | None,
    spec: TokenizerSpec,
    sources: list[Source],
    text_field: str,
    eot_id: int | None,
    progress: bool,
) -> TokenizerInfo:
    """The output's tokenizer: its saved copy when resuming (no re-training, no network).

    For a new output ``fresh`` is the tokenizer already built; it is saved and recorded here,
    together with the first state, before any shard is written.
    """
    recorded = state.get("tokenizer")
    saved = out / TOKENIZER_FILE
    if recorded is not None:
        try:
            text = saved.read_text(encoding="utf-8")
        except OSError:
            text = None
        if text is not None and sha256_text(text) == recorded["sha256"]:
            tok = tokenizer_from_json(text, str(saved))
            return describe_tokenizer(tok, text, eot_id, recorded.get("config_eos"), spec.where)
        # The saved copy is gone or altered: whatever was tokenized with it cannot be trusted.
        log(progress, f"{saved} is missing or changed; starting {out} over")
        state["shards"], state["val_tokens"], state["tokenizer"] = [], None, None
    info = fresh or get_tokenizer(spec, sources, text_field, eot_id, progress)
    write_text(saved, info.json)
    state["tokenizer"] = {"sha256": info.sha256, "config_eos": info.config_eos}
    outdir.save_state(state_path, state)
    return info


def _write_shards(
    out: Path,
    state: dict[str, Any],
    state_path: Path,
    sources: list[Source],
    info: TokenizerInfo,
    *,
    text_field: str,
    shard_tokens: int,
    val_tokens: int,
    workers: int,
    max_tokens: int | None,
    progress: bool,
) -> None:
    """Tokenize the sources into shards, from where the last intact recorded shard ends."""
    good = outdir.verified_shards(out, state["shards"], progress)
    if len(good) < len(state["shards"]):
        state["shards"], state["finished"] = good, False
    if not state["shards"]:
        state["val_tokens"], state["finished"] = None, False
    if state.get("finished"):
        return  # every token is written; only meta.json was missing

    last = state["shards"][-1]["resume"] if state["shards"] else None
    if last:
        log(progress, f"resuming {out} after {len(state['shards'])} shard(s), {fmt_count(last['tokens'])} tokens")
    pos: Pos = tuple(last["pos"]) if last else (0, 0)  # type: ignore[assignment]
    skip = last["skip"] if last else 0  # tokens of the batch at `pos` that are already written
    progress_before = last["progress"] if last else 0
    by_tokens = any(s.kind == "hub" for s in sources)  # a stream has no known size: count tokens, not bytes
    bar = tqdm(
        total=(max_tokens if by_tokens else sum(s.progress_size for s in sources)) or None,
        initial=(last["tokens"] if last else 0) if by_tokens else progress_before,
        unit="tok" if by_tokens else "B",
        unit_scale=True,
        desc="prepare",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
        # In a log file a redrawn bar is one line per update: keep those rare.
        mininterval=0.5 if sys.stderr.isatty() else 30.0,
    )
    sink = ShardSink(out, state, state_path, shard_tokens, val_tokens)
    spec = EncoderSpec(info.json, info.eot_id, info.splittable, text_field)
    batches = encoded(read_units(sources, pos, text_field, info.splittable), progress_before, spec, workers)
    taken = sink.written  # tokens taken from the stream so far
    truncated = False
    try:
        for batch, tokens, doc_starts in batches:
            t0 = taken - skip  # stream offset of this batch's first token
            if skip:
                # Tokens a previous run already wrote. They may span several batches when
                # this run cuts batches smaller (another --workers), hence the carry-over.
                n = min(skip, tokens.shape[0])
                tokens, doc_starts = tokens[n:], doc_starts[doc_starts >= n] - n
                skip -= n
            if max_tokens is not None and taken + tokens.shape[0] >= max_tokens:
                keep = max_tokens - taken
                tokens, doc_starts = tokens[:keep], doc_starts[doc_starts < keep]
                truncated = True
            taken += tokens.shape[0]
            bar.update(tokens.shape[0] if by_tokens else batch.progress)
            bar.set_postfix_str(f"{fmt_count(taken)} tokens", refresh=False)
            sink.write(batch, t0, tokens, doc_starts)
            if truncated:
                break
        sink.finish()
        if sink.written == 0:
            raise DataError(f"{state['args']['source']} has no non-empty documents")
    except BaseException:
        sink.abort()
        raise
    finally:
        batches.close()  # stops the pool now, not whenever the generator is collected
        bar.close()
    state["truncated"] = truncated
    state["finished"] = True
    outdir.save_state(state_path, state)


def _summary(
    state: dict[str, Any],
    sources: list[Source],
    info: TokenizerInfo,
    *,
    text_field: str,
    shard_tokens: int,
    max_tokens: int | None,
) -> dict[str, Any]:
    """What meta.json says of the finished shards (the call's own record is added after)."""
    shards = state["shards"]
    counts = {split: sum(s["tokens"] for s in shards if s["split"] == split) for split in ("train", "val")}
    docs = {split: sum(s["documents"] for s in shards if s["split"] == split) for split in ("train", "val")}
    if counts["train"] == 0:
        raise DataError(f"{state['args']['source']}: too few tokens to train on after holding out validation")
    kinds: dict[str, int] = {}
    for s in sources:
        kinds[s.kind] = kinds.get(s.kind, 0) + 1
    return {
        "format": PREPARE_FORMAT,
        "shard_format": SHARD_FORMAT,
        "source": state["args"]["source"],
        "source_files": kinds,
        "text_field": text_field,
        "tokenizer": state["args"]["tokenizer"],
        "tokenizer_file": TOKENIZER_FILE,
        "tokenizer_sha256": info.sha256,
        "vocab_size": info.vocab_size,
        # The model's embedding must cover every id; a multiple of 64 is friendlier to kernels.
        "model_vocab_size": padded_vocab_size(info.vocab_size - 1),
        "eot_id": info.eot_id,
        "eot_token": info.eot_token,
        "shard_tokens": shard_tokens,
        "val_tokens": state["val_tokens"],
        "max_tokens": max_tokens,
        "truncated": bool(state.get("truncated")),
        "tokens": {**counts, "total": counts["train"] + counts["val"]},
        "documents": {**docs, "total": docs["train"] + docs["val"]},
        "shards": [{k: s[k] for k in ("name", "split", "tokens", "documents")} for s in shards],
    }
