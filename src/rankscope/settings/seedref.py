"""The seed study's own settings, read from its code, so a run can say how it differs. Torch-free.

Sources (vukrosic/attention-keys-analysis): the 88M study at commit 772cf07 (`configs/llm_config.py`,
`models/layers.py`, `optimizers/muon.py`, `research/muon_production_20m.py`: the 20M-token run
behind the 16M-token headline); the 1.5B follow-up at its later head (`configs/llm_config_1b.py`,
`research/qk_norm_25m_study.py`, which trained 50M tokens). Settings that define an arm
(QK-Norm, the optimizer, QK-Clip) are not compared: arms vary them on purpose.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .flat import flatten

# What the seed's 88M and 1.5B runs share (its Muon, AdamW and init; no schedule).
_COMMON: dict[str, Any] = {
    "model.vocab_size": 49152,
    "model.max_seq_len": 2048,
    "model.rope_base": 10000.0,
    "model.norm_eps": 1.1920928955078125e-07,  # nn.RMSNorm's default: float32 machine epsilon
    "model.init_std": 0.02,
    "model.scaled_residual_init": False,
    "optim.muon_momentum": 0.95,
    "optim.muon_nesterov": True,
    "optim.muon_qkvo": "stacked",
    "optim.muon_ns": "polar_express",
    "optim.muon_ns_steps": 5,
    "optim.muon_weight_decay": 0.0,
    "optim.adamw_beta1": 0.9,
    "optim.adamw_beta2": 0.999,
    "optim.adamw_eps": 1e-8,
    "optim.adamw_weight_decay": 0.2,
    "optim.adamw_gain_weight_decay": 0.2,
    "optim.schedule": "constant",
    "optim.warmup_tokens": 0,
    "train.seq_len": 2048,
}

SEED_88M: dict[str, Any] = {
    **_COMMON,
    "model.n_layer": 22,
    "model.d_model": 512,
    "model.n_head": 8,
    "model.n_kv_head": 4,
    "model.head_dim": 64,
    "model.d_mlp": 2048,
    "optim.muon_lr": 0.012,
    "optim.adamw_lr": 0.006,
    "optim.grad_clip": 0.0,  # the 20M run did not clip
    "train.batch_size": 4,
    "train.grad_accum": 1,
    "train.eval_every": 819_200,  # probed every 100 steps
    "probe.batch_size": 4,  # the fixed probe batch: 4 validation sequences of 2048 tokens
}

SEED_1_5B: dict[str, Any] = {
    **_COMMON,
    "model.n_layer": 32,
    "model.d_model": 2048,
    "model.n_head": 16,
    "model.n_kv_head": 8,
    "model.head_dim": 128,
    "model.d_mlp": 8192,
    "optim.muon_lr": 0.012,
    "optim.adamw_lr": 0.003,
    "optim.grad_clip": 1.0,
    "train.batch_size": 32,
    "train.grad_accum": 4,  # 8 x 4 accumulated x 2048 = 65,536 tokens a step
    "train.eval_every": 7_864_320,  # probed every 120 steps
    "train.tokens": 50_000_000,
    "probe.batch_size": 8,
}

SEED_DATA = (
    "an English pretraining mix (70% FineWeb-Edu, 30% Cosmopedia v2 from the SmolLM corpus) "
    "with the SmolLM tokenizer (49,152 ids)"
)

# Where the seed's published figures come from, for reports that put numbers next to them.
SEED_FIGURES_NOTE = {
    "16M": "the 20M-token run: Muon lr 0.012, batch 4 x 2048, no gradient clipping",
    "25M": "a separate 25M-token run with Muon lr 0.024 and batch 2 x 2048 (read off its figure)",
    "1.5B": "the 1.5B follow-up: keys read before RoPE (site k_pre), 65,536 tokens a step, 50M tokens",
}


def reference_for(preset: str | None) -> tuple[str, dict[str, Any]]:
    """The seed run a preset restages: ('the seed's 1.5B follow-up', settings) for seed-1.5b,
    the 88M study for everything else."""
    if preset == "seed-1.5b":
        return "the seed's 1.5B follow-up", SEED_1_5B
    return "the seed's 88M study", SEED_88M


def differences(config: Mapping[str, Any], reference: Mapping[str, Any] = SEED_88M) -> list[tuple[str, Any, Any]]:
    """(key, this run's value, the seed's) for every compared setting that differs. `config` is a
    RunConfig dict, nested or flat; a key it lacks (a run from an older rankscope) counts as
    differing, with value None."""
    flat = flatten(config)
    out = []
    for key, seed_value in reference.items():
        value = flat.get(key)
        if isinstance(value, (list, tuple)):
            value = tuple(value)
        same = value == seed_value or (
            isinstance(value, float)
            and isinstance(seed_value, float)
            and abs(value - seed_value) <= 1e-12 * max(abs(seed_value), 1e-300)
        )
        if not same:
            out.append((key, value, seed_value))
    return out


def show_value(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower() if v is not None else "unset"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def differences_text(config: Mapping[str, Any], reference: Mapping[str, Any] = SEED_88M) -> str:
    """'model.n_layer 4 (seed 22), ...' or 'none'."""
    diffs = differences(config, reference)
    return ", ".join(f"{k} {show_value(v)} (seed {show_value(s)})" for k, v, s in diffs) or "none"
