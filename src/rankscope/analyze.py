"""`rankscope analyze PATH`: the attention geometry of one trained model, from a checkpoint or a
Hugging Face model folder, without training anything.

PATH is one of

- a rankscope run folder (`<study>/<arm>/seed-<k>`): its newest checkpoint,
- a rankscope checkpoint file (`<run>/checkpoints/step-*.pt`), read with `weights_only=True`,
- a local Hugging Face model folder (config.json with a `model_type`, weights, and normally the
  tokenizer), loaded with `from_pretrained(PATH, local_files_only=True)`.

The probe batch: for a rankscope run, by default exactly the run's own probe batch (its validation
split, `probe.batch_size` x `train.seq_len`, `fixed_batches`), so the numbers agree with the run's
probes.csv at that step; for a Hugging Face model, the embedded corpus's validation files (this
Python's standard library) tokenized with the model's own tokenizer. `--data` takes text files
(tokenized with the model's tokenizer: the run's BPE, or the folder's tokenizer) or `.bin` token
shards.

Written to `--out` (default: `<run>/analyze/step-<s>/` for a rankscope run, `<PATH>-analyze/` beside
a Hugging Face folder, or `./rankscope-analyze/<name>/` when that place is not writable):
probes.csv (the tidy table, `store.PROBE_COLUMNS`), key_pr_heatmap.png (layer x head,
`report.layer_plots`), summary.md (also printed, `report.model_summary`), analyze.json (what was
measured, on what, and with which code and machine: `provenance.environment`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import RankscopeError
from .units import fmt_count
from .vocab import PROBE_SITES

if TYPE_CHECKING:
    import pandas as pd

HEATMAP, SUMMARY, TABLE, INFO = "key_pr_heatmap.png", "summary.md", "probes.csv", "analyze.json"


@dataclass
class AnalyzeResult:
    """What `analyze` measured and wrote."""

    table: pd.DataFrame      # layer, head, site, metric, value
    out: Path
    summary: str             # markdown
    heatmap: Path
    info: dict[str, Any]


@dataclass
class _Model:
    kind: str                # "rankscope" | "hf"
    name: str
    model: Any
    batch: Callable[[str | None, int | None, int | None], tuple[Any, str]]  # (data, bs, T) -> (ids, description)
    default_out: Path
    step: int | None = None
    tokens: int | None = None
    seed: int | None = None
    source: str = ""


# --- loading ------------------------------------------------------------------------------------

def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _load(path: Path) -> _Model:
    from . import checkpoint

    if not path.exists():
        raise RankscopeError(f"{path}: no such file or folder")
    if path.is_file():
        run = path.parent.parent if path.parent.name == checkpoint.FOLDER else path.parent
        return _load_rankscope(run, path)
    if checkpoint.steps(path):
        return _load_rankscope(path, None)
    config = path / "config.json"
    if config.is_file():
        try:
            raw = json.loads(config.read_text())
        except (OSError, ValueError) as e:
            raise RankscopeError(f"{config}: not readable JSON ({_first_line(e)})") from None
        if isinstance(raw, dict) and "model_type" in raw:
            return _load_hf(path)
        if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
            raise RankscopeError(f"{path} is a rankscope run folder without checkpoints "
                                 f"(they are written every train.checkpoint_every tokens and at the end)")
    if any(path.glob("*/seed-*/config.json")):
        raise RankscopeError(f"{path} is a study folder; analyze one of its runs, e.g. "
                             f"{next(path.glob('*/seed-*')).as_posix()}")
    raise RankscopeError(f"{path} is neither a rankscope run folder (checkpoints/step-*.pt) nor a "
                         f"Hugging Face model folder (config.json with a model_type)")


def _load_rankscope(run: Path, ckpt: Path | None) -> _Model:
    import torch

    from . import checkpoint
    from .config import RunConfig, from_dict
    from .model import GPT
    from .store import read_json

    where = ckpt or run
    config = run / "config.json"
    if not config.is_file():
        raise RankscopeError(f"{where}: no config.json in the run folder {run}, so the model cannot be rebuilt")
    try:
        raw = read_json(config)
    except (OSError, ValueError) as e:
        raise RankscopeError(f"{config}: not readable JSON ({_first_line(e)})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise RankscopeError(f"{config} is not a rankscope run config (no model section)")
    names = {f.name for f in dataclasses.fields(RunConfig)}  # the rest is bookkeeping (arm, counts, ...)
    try:
        cfg = from_dict({k: v for k, v in raw.items() if k in names})
    except RankscopeError as e:
        raise RankscopeError(f"{config}: {e}") from None

    if ckpt is None:
        state = checkpoint.load(run)  # the newest; raises RankscopeError when unreadable
    else:
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
        except Exception as e:  # refused unpickling, truncated or foreign file
            raise RankscopeError(f"cannot read checkpoint {ckpt}: {_first_line(e)}") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise RankscopeError(f"{where} is not a rankscope checkpoint (no model state in it)")
    model = GPT(cfg.model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise RankscopeError(f"{where}: the weights do not fit the run's config.json "
                             f"({_first_line(e)})") from None
    step = state.get("step")
    tokens = state.get("tokens")
    arm = str(raw.get("arm") or run.parent.name)

    def batch(data: str | None, batch_size: int | None, seq_len: int | None) -> tuple[Any, str]:
        return _rankscope_batch(cfg, data, batch_size, seq_len)

    step_name = f"step-{int(step)}" if step is not None else "latest"
    return _Model("rankscope", f"{arm}/{run.name}", model, batch, run / "analyze" / step_name,
                  step=None if step is None else int(step), tokens=None if tokens is None else int(tokens),
                  seed=cfg.seed, source=str(where))


def _is_shards(p: Path) -> bool:
    from .data.loader import SHARD_SUFFIX

    if p.is_file():
        return p.suffix.lower() == SHARD_SUFFIX
    return p.is_dir() and any(q.suffix.lower() == SHARD_SUFFIX for q in p.iterdir())


def _text_documents(p: Path) -> list[str]:
    from .data import corpus

    files = corpus.text_source_files(p)
    if not files:
        raise RankscopeError(f"--data {p}: no UTF-8 text files in it")
    return [corpus.read_document(f.path) for f in files]


def _shard_batch(p: Path, vocab_size: int | None, batch_size: int, seq_len: int) -> tuple[Any, str]:
    """Windows of token shards given with --data: the files whose name says `val` when there are
    any (a training folder's held-out part), else every file; evenly spaced as `fixed_batches` does."""
    from .data import fixed_batches, read_shard
    from .data.loader import SHARD_SUFFIX

    files = [p] if p.is_file() else sorted(q for q in p.iterdir() if q.suffix.lower() == SHARD_SUFFIX and q.is_file())
    val = [q for q in files if "val" in q.name]
    chosen = val or files
    arrays = [read_shard(q) for q in chosen]
    top = max((int(a.max()) for a in arrays if a.size), default=-1)
    if vocab_size is not None and top >= vocab_size:
        raise RankscopeError(f"--data {p}: token id {top} is outside the model's vocabulary of {vocab_size}")
    x = fixed_batches(arrays, 1, batch_size, seq_len)[0][0]
    what = "validation shards" if val else "shards"
    return x, f"{what} {p} ({len(chosen)} file{'s' if len(chosen) != 1 else ''})"


def _rankscope_batch(cfg: Any, data: str | None, batch_size: int | None, seq_len: int | None) -> tuple[Any, str]:
    from .attach import token_batches
    from .data import fixed_batches, load_data

    bs = batch_size or cfg.probe.batch_size
    T = seq_len or cfg.train.seq_len
    if T > cfg.model.max_seq_len:
        raise RankscopeError(f"--seq-len {T} exceeds the model's max_seq_len {cfg.model.max_seq_len}")
    if data is not None and _is_shards(Path(data)):
        return _shard_batch(Path(data), cfg.model.vocab_size, bs, T)
    own = load_data(cfg.data.path or None, cfg.model.vocab_size)  # the run's data and tokenizer
    if data is None:
        same = bs == cfg.probe.batch_size and T == cfg.train.seq_len
        x = fixed_batches(own.val, 1, bs, T)[0][0]
        return x, f"validation split of {own.source}" + (" (the run's own probe batch)" if same else "")
    if own.tokenizer is None:
        raise RankscopeError("the run was trained on token shards, so it has no tokenizer for text; "
                             "pass --data with .bin token shards")
    docs = _text_documents(Path(data))
    return token_batches(docs, own.tokenizer, T, bs), f"text {data} (the run's tokenizer)"


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model", "merges.txt")


def _load_hf(path: Path) -> _Model:
    try:
        import transformers
    except ImportError:
        raise RankscopeError("analyzing a Hugging Face model needs transformers: pip install 'rankscope[hf]'") from None
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # loading reports are noise here; failures still raise
    transformers.utils.logging.disable_progress_bar()
    try:
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        except Exception as e:
            raise RankscopeError(f"cannot load the Hugging Face model in {path}: {_first_line(e)}") from None
        tokenizer = None  # shards can still be analyzed; text needs it (said when it is needed)
        # only the folder's own tokenizer: transformers may otherwise build a default one that
        # does not match the model's ids
        if any((path / f).exists() for f in _TOKENIZER_FILES):
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            except Exception as e:
                raise RankscopeError(f"cannot load the tokenizer in {path}: {_first_line(e)}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    step = tokens = None
    state = path / "trainer_state.json"  # a Trainer checkpoint folder says where training was
    if state.is_file():
        try:
            s = json.loads(state.read_text())
            step = int(s["global_step"]) if s.get("global_step") is not None else None
            tokens = int(s["num_input_tokens_seen"]) if s.get("num_input_tokens_seen") else None
        except (OSError, ValueError, TypeError):
            pass
    config = model.config
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    vocab = getattr(config, "vocab_size", None)

    def batch(data: str | None, batch_size: int | None, seq_len: int | None) -> tuple[Any, str]:
        from .attach import token_batches
        from .data import corpus

        bs = batch_size or 8
        T = seq_len or min(256, max_pos or 256)
        if max_pos and T > max_pos:
            raise RankscopeError(f"--seq-len {T} exceeds the model's {max_pos} positions")
        if data is not None and _is_shards(Path(data)):
            return _shard_batch(Path(data), vocab, bs, T)
        if tokenizer is None:
            raise RankscopeError(f"{path} has no tokenizer; save it with the model, or pass --data with .bin "
                                 "token shards")
        if data is None:
            _, val, _ = corpus.embedded_corpus_files()
            docs = [corpus.read_document(p, python_source=True) for p in val]
            desc = f"python stdlib {corpus.python_version()} validation files ({len(val)} files), the model's tokenizer"
        else:
            docs = _text_documents(Path(data))
            desc = f"text {data}, the model's tokenizer"
        return token_batches(docs, tokenizer, T, bs), desc

    return _Model("hf", path.resolve().name, model, batch, path.parent / f"{path.name}-analyze",
                  step=step, tokens=tokens, source=str(path))


# --- writing ------------------------------------------------------------------------------------

def _writable(out: Path) -> bool:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(out, os.W_OK)


# --- the command ---------------------------------------------------------------------------------

def analyze(path: str | Path, *, data: str | Path | None = None, out: str | Path | None = None,
            batch_size: int | None = None, seq_len: int | None = None, sites: tuple[str, ...] = ("k",),
            device: str = "auto") -> AnalyzeResult:
    """Load the model at `path`, probe it on one batch, write the table, heatmap and summary."""
    import torch

    from .attach import Probe
    from .fsio import write_text
    from .provenance import environment, now
    from .report.layer_plots import plot_head_heatmap
    from .report.model_summary import key_pr_grid, key_pr_summary, keys_word
    from .store import PROBE_COLUMNS, TableWriter, write_json

    for s in sites:
        if s not in PROBE_SITES:
            raise RankscopeError(f"unknown site {s!r} (choose from {', '.join(PROBE_SITES)})")
    for label, v in (("--batch-size", batch_size), ("--seq-len", seq_len)):
        if v is not None and v < 1:
            raise RankscopeError(f"{label} must be positive, got {v}")
    if data is not None and not Path(data).exists():
        raise RankscopeError(f"--data: no such file or folder: {data}")
    path = Path(path)
    loaded = _load(path)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = loaded.model.to(device)
    except (RuntimeError, AssertionError) as e:
        raise RankscopeError(f"cannot move the model to {device}: {_first_line(e)}") from None
    ids, data_desc = loaded.batch(str(data) if data is not None else None, batch_size, seq_len)

    probe = Probe(model, ["k"] + [s for s in sites if s != "k"])
    table = probe.measure(ids)
    att = probe.attachment
    assert att is not None  # both kinds of model are recognised (the site names were found)

    if out is not None:
        out_dir = Path(out)
        if not _writable(out_dir):
            raise RankscopeError(f"--out {out_dir}: cannot write there")
    else:
        out_dir = loaded.default_out
        if not _writable(out_dir):
            out_dir = Path("rankscope-analyze") / loaded.name.replace("/", "-")
            if not _writable(out_dir):
                raise RankscopeError(f"cannot write next to {path} nor to {out_dir}; pass --out DIR")

    base = {"arm": loaded.name, "seed": loaded.seed if loaded.seed is not None else "",
            "step": loaded.step if loaded.step is not None else "",
            "tokens": loaded.tokens if loaded.tokens is not None else ""}
    (out_dir / TABLE).unlink(missing_ok=True)  # a rerun replaces the table rather than adding to it
    writer = TableWriter(out_dir / TABLE, PROBE_COLUMNS)
    writer.append({**base, **r} for r in table.to_dict("records"))
    writer.close()

    shape = (int(ids.shape[0]), int(ids.shape[1]))
    where = ", ".join(x for x in (f"step {loaded.step}" if loaded.step is not None else "",
                                  f"{fmt_count(loaded.tokens)} tokens" if loaded.tokens else "") if x)
    grid = key_pr_grid(table)
    heatmap = plot_head_heatmap(grid, out_dir / HEATMAP, title=f"{loaded.name}: key participation ratio per head",
                           subtitle=f"{att.describe()}" + (f"; {where}" if where else "")
                           + f"\nprobe batch {shape[0]} x {shape[1]} tokens", head_dim=att.head_dim,
                           grouped=att.n_kv_head != att.n_head)
    summary = key_pr_summary(table, name=loaded.name, describe=att.describe(), data=data_desc, shape=shape,
                             head_dim=att.head_dim, step=loaded.step, tokens=loaded.tokens, notes=probe.notes,
                             keys=keys_word(att.qk_norm, att.rotary))
    write_text(out_dir / SUMMARY, summary)
    info = {"path": str(path.resolve()), "kind": loaded.kind, "name": loaded.name, "step": loaded.step,
            "tokens": loaded.tokens, "model": att.config(), "data": data_desc, "batch": list(shape),
            "sites": probe.sites, **environment(torch.device(device)), "written": now()}
    write_json(out_dir / INFO, info)
    return AnalyzeResult(table, out_dir, summary, heatmap, info)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `rankscope analyze` arguments."""
    parser.add_argument("path", help="a rankscope run folder or checkpoint file, or a local Hugging Face model folder")
    parser.add_argument("--data", help="text file/folder (tokenized with the model's tokenizer) or .bin token "
                                       "shards (default: the run's validation data; the embedded corpus for "
                                       "Hugging Face models)")
    parser.add_argument("--out", help="output folder (default: <run>/analyze/step-<s>, or <PATH>-analyze beside "
                                      "a Hugging Face folder)")
    parser.add_argument("--batch-size", type=int, help="sequences in the probe batch (default: the run's "
                                                       "probe.batch_size; 8 for Hugging Face models)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: the run's train.seq_len; "
                                                    "256 for Hugging Face models)")
    parser.add_argument("--sites", default="k", help="comma-separated sites to measure besides k: "
                                                     f"{', '.join(PROBE_SITES)} (default: k)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")


def run(args: argparse.Namespace) -> int:
    """`rankscope analyze`: print the summary and where everything went."""
    sites = tuple(s.strip() for s in str(args.sites).split(",") if s.strip())
    result = analyze(args.path, data=args.data, out=args.out, batch_size=args.batch_size,
                     seq_len=args.seq_len, sites=sites or ("k",), device=args.device)
    print(result.summary)
    print(f"table:   {result.out / TABLE}\nheatmap: {result.heatmap}\nsummary: {result.out / SUMMARY}")
    return 0


__all__ = ["AnalyzeResult", "analyze", "add_arguments", "run"]
