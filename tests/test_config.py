"""Typed overrides: values coerced from the field's type; unknown keys and wrong types rejected."""

import pytest

from rankscope.config import PRESETS, RunConfig, apply_overrides, from_dict, parse_count, parse_set, preset
from rankscope.errors import ConfigError


def test_overrides_are_typed():
    cfg = apply_overrides(
        RunConfig(),
        {
            "model.qk_norm": "none",
            "optim.muon_lr": "0.024",
            "train.tokens": "2M",
            "optim.muon_nesterov": "false",
            "probe.sites": "k,q_pre",
            "seed": 3,
        },
    )
    assert cfg.model.qk_norm == "none" and cfg.optim.muon_lr == 0.024 and cfg.train.tokens == 2_000_000
    assert cfg.optim.muon_nesterov is False and cfg.probe.sites == ("k", "q_pre") and cfg.seed == 3
    assert RunConfig().model.qk_norm == "learned"  # frozen dataclasses: the default is untouched


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("model.nope", "1", "unknown setting 'model.nope'"),
        ("nope", "1", "unknown setting 'nope'"),
        ("model", "1", "is a section"),
        ("train.tokens", "lots", "train.tokens: expected int"),
        ("train.tokens", 1.5, "train.tokens: expected int"),
        ("optim.muon_lr", "fast", "optim.muon_lr: expected float"),
        ("optim.muon_lr", True, "optim.muon_lr: expected float"),
        ("optim.muon_nesterov", "maybe", "expected bool"),
        ("model.qk_norm", 3, "model.qk_norm must be learned, frozen, parameter_free or none, got 3"),
        ("model.qk_norm", "sometimes", "model.qk_norm must be"),
        ("optim.name", "sgd", "optim.name must be"),
        ("probe.sites", "k,z", "probe.sites must be"),
        ("model.n_kv_head", "2", "multiple of model.n_kv_head"),
        ("train.seq_len", "4096", "exceeds model.max_seq_len"),
    ],
)
def test_bad_overrides_rejected_with_one_clear_line(key, value, needle):
    with pytest.raises(ConfigError) as e:
        apply_overrides(RunConfig(), {key: value})
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_parse_count_and_set():
    assert parse_count("25M") == 25_000_000 and parse_count("1.5e6") == 1_500_000 and parse_count("4_096") == 4096
    assert parse_count("819.2K") == 819_200
    for bad in ("1.5", "M", "-3", "ten"):
        with pytest.raises(ValueError):
            parse_count(bad)
    assert parse_set(["a.b=1", "c= x=y"]) == {"a.b": "1", "c": "x=y"}
    with pytest.raises(ConfigError):
        parse_set(["novalue"])


def test_presets_round_trip_through_dicts():
    for name, cfg in PRESETS.items():
        assert from_dict(cfg.to_dict()) == cfg, name
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")


def test_seed_presets_are_the_seeds_runs():
    """Every setting read from the seed's code (seedref) holds in the presets that restage it."""
    from rankscope.seedref import SEED_1_5B, SEED_88M, differences

    assert differences(preset("seed-88m").to_dict(), SEED_88M) == []
    assert differences(preset("seed-1.5b").to_dict(), SEED_1_5B) == []
    c = preset("seed-1.5b")
    assert c.train.batch_size * c.train.seq_len == 65_536 and c.train.batch_size // c.train.grad_accum == 8
    assert "k_pre" in c.probe.sites  # the 1.5B figures read keys before RoPE
    # tiny is the seed's training at CPU size: only sizes, batch and schedule differ
    diffs = {k for k, _, _ in differences(preset("tiny").to_dict(), SEED_88M)}
    assert diffs == {
        "model.vocab_size",
        "model.max_seq_len",
        "model.n_layer",
        "model.d_model",
        "model.n_head",
        "model.n_kv_head",
        "model.d_mlp",
        "train.batch_size",
        "train.seq_len",
        "train.eval_every",
        "probe.batch_size",
    }
    # a changed setting is named with both values; a key an older run lacks counts as differing
    from rankscope.seedref import differences_text

    text = differences_text(apply_overrides(preset("seed-88m"), {"optim.muon_qkvo": "separate"}).to_dict())
    assert text == "optim.muon_qkvo separate (seed stacked)"
    old = preset("seed-88m").to_dict()
    del old["optim"]["muon_ns"]
    assert differences(old) == [("optim.muon_ns", None, "polar_express")]
