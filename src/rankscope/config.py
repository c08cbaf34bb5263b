"""Typed run configuration: small frozen dataclasses, named presets, and `a.b=value` overrides.

Every default already makes a working run (the `tiny` CPU preset). Overrides name a field by its
dotted path (`model.qk_norm=none`, `optim.muon_lr=0.024`); unknown keys and wrong types are
rejected with one clear line (nanoGPT's configurator idea, litgpt's typed Config).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from .errors import ConfigError
from .units import parse_count
from .vocab import ProbeSite

# Settings with a fixed set of values are typed with them: a wrong value is caught where it is
# parsed, and the message lists the choices.
QKNorm = Literal["learned", "frozen", "parameter_free", "none"]  # a gain that trains / stays 1 / none; no QK-Norm


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 4096
    n_layer: int = 4
    d_model: int = 192
    n_head: int = 3
    n_kv_head: int = 3
    head_dim: int = 64
    d_mlp: int = 768
    max_seq_len: int = 256
    rope_base: float = 10000.0
    qk_norm: QKNorm = "learned"
    norm_eps: float = 1.1920928955078125e-07  # float32 machine epsilon: nn.RMSNorm's default, as the seed
    init_std: float = 0.02  # every matrix and the embedding ~ N(0, init_std²), as the seed
    scaled_residual_init: bool = False  # GPT-2's std / sqrt(2 n_layer) on O and the MLP's down; the seed: no


@dataclass(frozen=True)
class OptimConfig:
    # Every default is the seed's 88M/20M-token study (its code at 772cf07), unless a comment says not.
    name: Literal["muon", "adamw"] = "muon"
    # Muon on the 2D hidden matrices
    muon_lr: float = 0.012
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_qkvo: Literal["stacked", "separate", "per_head"] = "stacked"  # stacked: the seed's one QKVO matrix a layer
    muon_ns: Literal["polar_express", "newton_schulz"] = "polar_express"  # the seed's | torch.optim.Muon's
    muon_ns_steps: int = 5  # at most 5 for polar_express (it has five coefficient triples)
    muon_weight_decay: float = 0.0
    # AdamW on embeddings and gains (and on everything when name == "adamw"); torch's betas
    adamw_lr: float = 0.006
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999
    adamw_eps: float = 1e-8
    adamw_weight_decay: float = 0.2
    adamw_gain_weight_decay: float = 0.2  # on norm gains, QK-Norm's included (the seed decays every AdamW parameter)
    # AdamW's learning rate for the hidden matrices when name == "adamw"
    adamw_matrix_lr: float = 0.006
    grad_clip: float = 0.0  # max global grad norm; 0 = off (the seed's 20M study did not clip)
    schedule: Literal["constant", "cosine", "linear"] = "constant"  # cosine, linear: decay after warmup
    warmup_tokens: int = 0
    min_lr_ratio: float = 0.0  # floor of the decay, as a fraction of the peak
    qk_clip_tau: float = 0.0  # QK-Clip threshold on each head's max attention logit; 0 = off


@dataclass(frozen=True)
class TrainConfig:
    tokens: int = 1_000_000  # token budget
    batch_size: int = 32  # sequences per step
    seq_len: int = 128
    eval_every: int = 100_000  # tokens between evaluations and probes (and at token 0 and the end)
    eval_batches: int = 2  # fixed validation batches per evaluation
    eval_schedule: Literal["linear", "log"] = "linear"  # linear: every eval_every tokens; log: eval_points log-spaced
    eval_points: int = 24  # evaluation points of the log schedule (plus token 0)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # CPU threads for torch; 0 = torch's default
    compile: Literal["auto", "on", "off"] = "auto"  # torch.compile: auto = on for CUDA
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size is the global batch)
    activation_checkpointing: bool = False  # recompute each block in backward to save memory
    checkpoint_every: int = 250_000  # tokens between checkpoints (and one at the end); 0 = only at the end
    keep_checkpoints: int = 2  # most recent checkpoints kept


@dataclass(frozen=True)
class ProbeConfig:
    sites: tuple[ProbeSite, ...] = ("k",)
    batch_size: int = 16  # sequences in the fixed probe batch (seq_len tokens each)
    attention: bool = True  # per-head attention entropy and max logit
    enabled: bool = True
    downstream: bool = True  # ICL score, induction loss and head scores, W_Q/W_K spectra
    induction_batch: int = 8  # sequences of repeated random tokens for the induction eval
    functional_rank: Literal["off", "end", "middle-end", "every"] = (
        "end"  # every: each evaluation (~2.5% of a tiny run each)
    )


@dataclass(frozen=True)
class DataConfig:
    path: str = ""  # "" = the embedded corpus (this Python's standard library)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, RunConfig] = {
    # The CPU default: 64-dim heads so PR is on the seed's 0..64 scale, small enough for ~1M tokens
    # per arm in a few minutes on two cores.
    "tiny": RunConfig(),
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


def _coerce(key: str, typ: Any, value: Any) -> Any:
    """Turn a TOML value or a command-line string into the field's type, or fail clearly."""
    origin = typing.get_origin(typ)
    from_text = isinstance(value, str)
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if from_text and value.lower() in ("true", "1", "yes", "on"):
                return True
            if from_text and value.lower() in ("false", "0", "no", "off"):
                return False
        elif typ is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value == int(value):
                return int(value)
            if from_text:
                return parse_count(value)
        elif typ is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if from_text:
                return float(value)
        elif typ is str:
            if isinstance(value, str):
                return value
        elif origin is Literal:
            choices = typing.get_args(typ)
            if value in choices:
                return value
            raise ConfigError(f"{key} must be {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}")
        elif origin is tuple:
            (inner, _) = typing.get_args(typ)
            items = value.split(",") if from_text else value
            if isinstance(items, (list, tuple)):
                return tuple(_coerce(key, inner, v.strip() if isinstance(v, str) else v) for v in items if v != "")
    except ConfigError:
        raise
    except ValueError:
        pass
    name = getattr(typ, "__name__", str(typ))
    raise ConfigError(f"{key}: expected {name}, got {value!r}")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


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
    """Return cfg with dotted-key overrides applied; values typed from the field, unknown keys rejected."""
    for key, value in overrides.items():
        cfg = _set(cfg, key.split("."), value, key)
    validate(cfg)
    return cfg


def _set(obj: Any, path: list[str], value: Any, key: str) -> Any:
    names = {f.name for f in fields(obj)}
    if path[0] not in names:
        hint = ", ".join(known_keys(obj)) if dataclasses.is_dataclass(obj) else ""
        raise ConfigError(f"unknown setting {key!r} (known: {hint})")
    current = getattr(obj, path[0])
    if len(path) == 1:
        if dataclasses.is_dataclass(current):
            raise ConfigError(f"{key!r} is a section; set one of its fields, e.g. {key}.{fields(current)[0].name}=...")
        return replace(obj, **{path[0]: _coerce(key, _field_types(type(obj))[path[0]], value)})
    if not dataclasses.is_dataclass(current):
        raise ConfigError(f"unknown setting {key!r}: {'.'.join(path[:1])} has no fields")
    return replace(obj, **{path[0]: _set(current, path[1:], value, key)})


def parse_set(items: list[str]) -> dict[str, str]:
    """['a.b=1', 'c=x'] -> {'a.b': '1', 'c': 'x'}"""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _check_choices(obj: Any, prefix: str = "") -> None:
    """Every Literal-typed field (or tuple of them) holds one of its values, also in a config
    built in code rather than parsed."""
    for name, typ in _field_types(type(obj)).items():
        value, key = getattr(obj, name), prefix + name
        if dataclasses.is_dataclass(value):
            _check_choices(value, key + ".")
        elif typing.get_origin(typ) is Literal:
            _coerce(key, typ, value)
        elif typing.get_origin(typ) is tuple and typing.get_origin(typing.get_args(typ)[0]) is Literal:
            _coerce(key, typ, tuple(value))


def validate(cfg: RunConfig) -> None:
    """The values of typed choices, then the cross-field checks that a type alone cannot express."""
    _check_choices(cfg)
    m, o, t, p = cfg.model, cfg.optim, cfg.train, cfg.probe
    checks = [
        (
            m.n_head % max(m.n_kv_head, 1) == 0 and m.n_kv_head >= 1,
            f"model.n_head ({m.n_head}) must be a multiple of model.n_kv_head ({m.n_kv_head})",
        ),
        (m.head_dim % 2 == 0, f"model.head_dim must be even for RoPE, got {m.head_dim}"),
        (min(m.n_layer, m.d_model, m.n_head, m.head_dim, m.d_mlp, m.vocab_size) > 0, "model sizes must be positive"),
        (t.seq_len <= m.max_seq_len, f"train.seq_len ({t.seq_len}) exceeds model.max_seq_len ({m.max_seq_len})"),
        (
            1 <= o.muon_ns_steps <= (5 if o.muon_ns == "polar_express" else 99),
            f"optim.muon_ns_steps must be 1..5 for polar_express (five coefficient triples) and 1..99 otherwise, "
            f"got {o.muon_ns_steps}",
        ),
        (
            o.name != "muon" or o.muon_qkvo != "stacked" or m.n_head * m.head_dim == m.d_model,
            f"optim.muon_qkvo=stacked stacks O's weight under Q, K and V by rows, which needs model.n_head x "
            f"model.head_dim ({m.n_head} x {m.head_dim}) = model.d_model ({m.d_model}); use separate or per_head",
        ),
        (
            t.tokens > 0 and t.batch_size > 0 and t.seq_len > 0 and t.eval_every > 0 and t.eval_batches > 0,
            "train.tokens, batch_size, seq_len, eval_every and eval_batches must be positive",
        ),
        (p.batch_size > 0, "probe.batch_size must be positive"),
        (p.induction_batch > 0, "probe.induction_batch must be positive"),
        (t.eval_points >= 1, "train.eval_points must be positive"),
        (o.qk_clip_tau >= 0, "optim.qk_clip_tau must be >= 0"),
        (
            t.grad_accum >= 1 and t.batch_size % t.grad_accum == 0,
            f"train.batch_size ({t.batch_size}) must be a multiple of train.grad_accum ({t.grad_accum})",
        ),
        (
            t.checkpoint_every >= 0 and t.keep_checkpoints >= 1,
            "train.checkpoint_every must be >= 0 and train.keep_checkpoints >= 1",
        ),
        (
            re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", t.device) is not None,
            f"train.device must be auto, cpu, cuda or cuda:N, got {t.device!r}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def from_dict(d: Mapping[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from `to_dict()` output (for checkpoints and finished-run checks)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = value

    walk("", d)
    return apply_overrides(RunConfig(), flat)
