"""What `rankscope analyze` reads: one trained model (a rankscope run folder or checkpoint file, or
a local Hugging Face model folder) and the batch of tokens to probe it on.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RankscopeError, first_line


@dataclass
class LoadedModel:
    """A model ready to probe, what it is, and how to build its probe batch."""

    kind: str  # "rankscope" | "hf"
    name: str
    model: Any
    batch: Callable[[str | None, int | None, int | None], tuple[Any, str]]  # (data, bs, T) -> (ids, description)
    default_out: Path
    step: int | None = None
    tokens: int | None = None
    seed: int | None = None
    source: str = ""
    config: Any = None  # a rankscope run's RunConfig (None for Hugging Face models)
    vocab_size: int | None = None  # rows of the input embedding: checkpoints of one series must agree


def load_model(path: Path) -> LoadedModel:
    from ..run import checkpoint
    from ..storage.store import CHECKPOINTS, CONFIG

    if not path.exists():
        raise RankscopeError(f"{path}: no such file or folder")
    if path.is_file():
        run = path.parent.parent if path.parent.name == CHECKPOINTS else path.parent
        return _load_rankscope(run, path)
    if checkpoint.steps(path):
        return _load_rankscope(path, None)
    config = path / CONFIG
    if config.is_file():
        try:
            raw = json.loads(config.read_text())
        except (OSError, ValueError) as e:
            raise RankscopeError(f"{config}: not readable JSON ({first_line(e)})") from None
        if isinstance(raw, dict) and "model_type" in raw:
            return _load_hf(path)
        if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
            raise RankscopeError(
                f"{path} is a rankscope run folder without checkpoints "
                f"(they are written every train.checkpoint_every tokens and at the end)"
            )
    if any(path.glob(f"*/seed-*/{CONFIG}")):
        raise RankscopeError(
            f"{path} is a study folder; analyze one of its runs, e.g. {next(path.glob('*/seed-*')).as_posix()}"
        )
    raise RankscopeError(
        f"{path} is neither a rankscope run folder (checkpoints/step-*.pt) nor a "
        f"Hugging Face model folder (config.json with a model_type)"
    )


def load_checkpoint(run: Path, ckpt: Path) -> LoadedModel:
    """One checkpoint file of the rankscope run folder `run`."""
    return _load_rankscope(run, ckpt)


def load_revision(repo: str, revision: str) -> LoadedModel:
    """One revision of a Hugging Face hub repository (needs the network, and transformers)."""
    return _load_hf(Path(repo), revision)


def _load_rankscope(run: Path, ckpt: Path | None) -> LoadedModel:
    import torch

    from ..core.model import GPT
    from ..run import checkpoint
    from ..settings.config import RunConfig, from_dict
    from ..storage.store import CONFIG, read_json

    where = ckpt or run
    config = run / CONFIG
    if not config.is_file():
        raise RankscopeError(f"{where}: no config.json in the run folder {run}, so the model cannot be rebuilt")
    try:
        raw = read_json(config)
    except (OSError, ValueError) as e:
        raise RankscopeError(f"{config}: not readable JSON ({first_line(e)})") from None
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
            raise RankscopeError(f"cannot read checkpoint {ckpt}: {first_line(e)}") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise RankscopeError(f"{where} is not a rankscope checkpoint (no model state in it)")
    model = GPT(cfg.model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise RankscopeError(f"{where}: the weights do not fit the run's config.json ({first_line(e)})") from None
    step = state.get("step")
    tokens = state.get("tokens")
    arm = str(raw.get("arm") or run.parent.name)

    def batch(data: str | None, batch_size: int | None, seq_len: int | None) -> tuple[Any, str]:
        return _rankscope_batch(cfg, data, batch_size, seq_len)

    step_name = f"step-{int(step)}" if step is not None else "latest"
    return LoadedModel(
        "rankscope",
        f"{arm}/{run.name}",
        model,
        batch,
        run / "analyze" / step_name,
        step=None if step is None else int(step),
        tokens=None if tokens is None else int(tokens),
        seed=cfg.seed,
        source=str(where),
        config=cfg,
        vocab_size=cfg.model.vocab_size,
    )


def _is_shards(p: Path) -> bool:
    from ..data.loader import SHARD_SUFFIX

    if p.is_file():
        return p.suffix.lower() == SHARD_SUFFIX
    return p.is_dir() and any(q.suffix.lower() == SHARD_SUFFIX for q in p.iterdir())


def _text_documents(p: Path) -> list[str]:
    from ..data import corpus

    files = corpus.text_source_files(p)
    if not files:
        raise RankscopeError(f"--data {p}: no UTF-8 text files in it")
    return [corpus.read_document(f.path) for f in files]


def _shard_batch(p: Path, vocab_size: int | None, batch_size: int, seq_len: int) -> tuple[Any, str]:
    """Windows of token shards given with --data: the files whose name says `val` when there are
    any (a training folder's held-out part), else every file; evenly spaced as `fixed_batches` does."""
    from ..data import fixed_batches, read_shard
    from ..data.loader import SHARD_SUFFIX

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
    from ..attach import token_batches
    from ..data import fixed_batches, load_data

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
        raise RankscopeError(
            "the run was trained on token shards, so it has no tokenizer for text; pass --data with .bin token shards"
        )
    docs = _text_documents(Path(data))
    return token_batches(docs, own.tokenizer, T, bs), f"text {data} (the run's tokenizer)"


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "merges.txt",
)


def _load_hf(path: Path, revision: str | None = None) -> LoadedModel:
    """A local Hugging Face folder; or, given `revision`, `path` names a hub repository (`org/name`)
    and that revision (branch, tag or commit) is downloaded (needs the network)."""
    hub = revision is not None
    where = f"{path.as_posix()}@{revision}" if hub else str(path)
    fetch: dict[str, Any] = {"revision": revision} if hub else {"local_files_only": True}
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
            model = transformers.AutoModelForCausalLM.from_pretrained(path.as_posix() if hub else path, **fetch)
        except Exception as e:
            raise RankscopeError(f"cannot load the Hugging Face model in {where}: {first_line(e)}") from None
        tokenizer = None  # shards can still be analyzed; text needs it (said when it is needed)
        # only the folder's own tokenizer: transformers may otherwise build a default one that
        # does not match the model's ids
        if hub:
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(path.as_posix(), **fetch)
            except Exception:
                tokenizer = None
        elif any((path / f).exists() for f in _TOKENIZER_FILES):
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            except Exception as e:
                raise RankscopeError(f"cannot load the tokenizer in {path}: {first_line(e)}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    step = tokens = None
    state = path / "trainer_state.json"  # a Trainer checkpoint folder says where training was
    if not hub and state.is_file():
        try:
            s = json.loads(state.read_text())
            step = int(s["global_step"]) if s.get("global_step") is not None else None
            tokens = int(s["num_input_tokens_seen"]) if s.get("num_input_tokens_seen") else None
        except (OSError, ValueError, TypeError):
            pass
    config = model.config
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    vocab = getattr(config, "vocab_size", None)
    try:
        rows = int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, NotImplementedError, TypeError):
        rows = vocab

    def batch(data: str | None, batch_size: int | None, seq_len: int | None) -> tuple[Any, str]:
        from ..attach import token_batches
        from ..data import corpora

        bs = batch_size or 8
        T = seq_len or min(256, max_pos or 256)
        if max_pos and T > max_pos:
            raise RankscopeError(f"--seq-len {T} exceeds the model's {max_pos} positions")
        if data is not None and _is_shards(Path(data)):
            return _shard_batch(Path(data), vocab, bs, T)
        if tokenizer is None:
            raise RankscopeError(
                f"{where} has no tokenizer; save it with the model, or pass --data with .bin token shards"
            )
        if data is None:
            docs, what = corpora.validation_documents()
            desc = f"{what}, the model's tokenizer"
        else:
            docs = _text_documents(Path(data))
            desc = f"text {data}, the model's tokenizer"
        return token_batches(docs, tokenizer, T, bs), desc

    return LoadedModel(
        "hf",
        f"{path.name}@{revision}" if hub else path.resolve().name,
        model,
        batch,
        Path("rankscope-analyze") / path.name if hub else path.parent / f"{path.name}-analyze",
        step=step,
        tokens=tokens,
        source=where,
        vocab_size=rows,
    )
