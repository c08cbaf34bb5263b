"""Typed overrides: values coerced from the field's type; unknown keys and wrong types rejected."""

import pytest

from rankscope.errors import ConfigError
from rankscope.settings.config import PRESETS, RunConfig, apply_overrides, from_dict, parse_set, preset
from rankscope.settings.units import parse_count


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


TOKENS = "train.tokens must be an integer from 1 to 2^63 - 1 (a token count such as 2M)"


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("model.nope", "1", "unknown setting 'model.nope'"),
        ("nope", "1", "unknown setting 'nope'"),
        ("model", "1", "is a section"),
        (
            "train.tokens",
            "lots",
            TOKENS + ", got 'lots'",
        ),
        ("train.tokens", 1.5, "train.tokens must be an integer from 1 to 2^63 - 1"),
        ("optim.muon_lr", "fast", "optim.muon_lr must be a finite number >= 0, got 'fast'"),
        ("optim.muon_lr", True, "optim.muon_lr must be a finite number >= 0, got True"),
        ("optim.muon_nesterov", "maybe", "optim.muon_nesterov must be true or false, got 'maybe'"),
        ("model.qk_norm", 3, "model.qk_norm must be learned, frozen, parameter_free or none, got 3"),
        ("model.qk_norm", "sometimes", "model.qk_norm must be"),
        ("optim.name", "sgd", "optim.name must be"),
        ("probe.sites", "k,z", "probe.sites must be"),
        ("model.n_kv_head", "2", "multiple of model.n_kv_head"),
        ("train.seq_len", "4096", "exceeds model.max_seq_len"),
        # values of the right type out of range: each names the key, the value and what is allowed
        ("seed", "-1", "seed must be an integer from 0 to 2^63 - 1, got '-1'"),
        ("seed", 2**63, "seed must be an integer from 0 to 2^63 - 1, got 9223372036854775808"),
        ("seed", "99999999999999999999999", "seed must be an integer from 0 to 2^63 - 1"),
        ("optim.muon_lr", "-0.1", "optim.muon_lr must be a finite number >= 0, got '-0.1'"),
        ("optim.adamw_lr", -1, "optim.adamw_lr must be a finite number >= 0, got -1"),
        ("optim.adamw_beta1", "1.5", "optim.adamw_beta1 must be a number >= 0 and < 1, got '1.5'"),
        ("optim.adamw_beta2", 1.0, "optim.adamw_beta2 must be a number >= 0 and < 1"),
        ("optim.muon_momentum", "nan", "optim.muon_momentum must be a number >= 0 and < 1, got 'nan'"),
        ("optim.adamw_eps", "-1e-8", "optim.adamw_eps must be a number > 0 and <= 1"),
        ("optim.adamw_eps", 0, "optim.adamw_eps must be a number > 0 and <= 1"),
        ("optim.grad_clip", "-1", "optim.grad_clip must be a finite number >= 0"),
        ("optim.grad_clip", "inf", "optim.grad_clip must be a finite number >= 0, got 'inf'"),
        ("optim.min_lr_ratio", 2, "optim.min_lr_ratio must be a number >= 0 and <= 1"),
        ("optim.qk_clip_tau", -15, "optim.qk_clip_tau must be a finite number >= 0"),
        ("optim.muon_ns_steps", 0, "optim.muon_ns_steps must be an integer from 1 to 99"),
        ("optim.warmup_tokens", -5, "optim.warmup_tokens must be an integer from 0 to 2^63 - 1"),
        ("model.init_std", "-1", "model.init_std must be a number > 0 and <= 1, got '-1'"),
        ("model.norm_eps", 0.0, "model.norm_eps must be a number > 0 and <= 1"),
        ("model.rope_base", "1e400", "model.rope_base must be a finite number > 1, got '1e400'"),
        ("model.rope_base", 10**400, "model.rope_base must be a finite number > 1, got an integer of 401 digits"),
        ("model.vocab_size", 70000, "model.vocab_size must be an integer from 2 to 65,536 (token shards store"),
        ("model.n_layer", 0, "model.n_layer must be an integer from 1 to 1,024, got 0"),
        ("model.head_dim", "63", "model.head_dim must be even for RoPE"),
        (
            "train.tokens",
            "1e400",
            TOKENS + ", got '1e400'",
        ),
        ("train.tokens", "0", "train.tokens must be an integer from 1"),
        ("train.tokens", 2**64, "train.tokens must be an integer from 1 to 2^63 - 1"),
        ("train.tokens", "9" * 5000, "train.tokens must be an integer from 1 to 2^63 - 1"),
        ("train.tokens", float("inf"), TOKENS + ", got inf"),
        ("train.tokens", 2**63 - 1, "past the 64-bit token counters"),
        ("train.eval_every", 0, "train.eval_every must be an integer from 1"),
        ("train.threads", -2, "train.threads must be an integer from 0 to 4,096"),
        ("train.keep_checkpoints", 0, "train.keep_checkpoints must be an integer from 1"),
        ("train.checkpoint_every", -1, "train.checkpoint_every must be an integer from 0"),
        ("train.eval_points", 10**6, "train.eval_points must be an integer from 1 to 100,000"),
        ("train.device", "tpu", "train.device must be auto, cpu, mps, cuda or cuda:N, got 'tpu'"),
        ("train.seq_len", "2", "the induction evaluation (probe.downstream) repeats"),
        ("probe.sites", "k,q,k", "probe.sites lists k twice"),
        ("probe.sites", 3, "probe.sites must be a comma-separated list, got 3"),
        ("probe.batch_size", 0, "probe.batch_size must be an integer from 1"),
        ("data.path", "a\x00b", "data.path must be a built-in corpus name or a file or folder path"),
    ],
)
def test_bad_overrides_rejected_with_one_clear_line(key, value, needle):
    with pytest.raises(ConfigError) as e:
        apply_overrides(RunConfig(), {key: value})
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_budget_whose_schedule_would_not_fit_in_memory_is_refused_naming_both_settings():
    with pytest.raises(ConfigError) as e:
        apply_overrides(RunConfig(), {"train.tokens": "1e15"})
    assert str(e.value) == (
        "train.tokens (1,000,000,000,000,000) / train.eval_every (100,000) makes 10,000,000,000 evaluations, "
        "more than 100,000: raise train.eval_every to at least 10,000,000,000 or set train.eval_schedule=log"
    )
    with pytest.raises(ConfigError, match="train.checkpoint_every"):
        apply_overrides(RunConfig(), {"train.tokens": "1e15", "train.eval_schedule": "log"})
    # raising both cadences (or checkpointing only at the end) makes it a valid, if long, run
    cfg = apply_overrides(
        RunConfig(), {"train.tokens": "1e15", "train.eval_every": "1e11", "train.checkpoint_every": 0}
    )
    assert cfg.train.tokens == 10**15
    # the log schedule lists eval_points steps whatever the budget
    assert apply_overrides(
        RunConfig(), {"train.tokens": 10**18, "train.eval_schedule": "log", "train.checkpoint_every": 0}
    )


def test_edges_of_each_range_are_accepted():
    cfg = apply_overrides(
        RunConfig(),
        {
            "seed": 2**63 - 1,
            "optim.adamw_beta1": 0,
            "optim.adamw_beta2": "0.999999",
            "optim.muon_lr": 0,
            "optim.min_lr_ratio": 1,
            "model.vocab_size": 65536,
            "train.tokens": "4_096",
            "train.threads": " 2 ",
            "optim.muon_nesterov": " off",
        },
    )
    assert cfg.seed == 2**63 - 1 and cfg.optim.adamw_beta1 == 0.0 and cfg.train.tokens == 4096
    assert cfg.train.threads == 2 and cfg.optim.muon_nesterov is False
    # a seed is taken exactly, never through a float
    assert apply_overrides(RunConfig(), {"seed": "9007199254740993"}).seed == 9007199254740993


def test_every_setting_declares_what_it_accepts():
    """A choice set (Literal, bool) or a rule (Range, Match, Distinct) on every field, so no value
    of the right type reaches a run unchecked."""
    import typing

    from rankscope.settings.config import field_type, known_keys
    from rankscope.settings.rules import Distinct, Match, Range

    for key in known_keys():
        typ = field_type(key)
        if typ is bool or typing.get_origin(typ) is typing.Literal:
            continue
        assert typing.get_origin(typ) is typing.Annotated, key
        base, *rules = typing.get_args(typ)
        kinds = {int: Range, float: Range, str: Match}
        want = kinds.get(base, Distinct)
        assert any(isinstance(r, want) for r in rules), key


def test_max_vocab_is_the_shard_format_s():
    from rankscope.data.format import MAX_VOCAB as SHARD_MAX
    from rankscope.settings.config import MAX_VOCAB

    assert MAX_VOCAB == SHARD_MAX


def test_config_in_code_is_checked_too_and_config_needs_no_torch():
    import subprocess
    import sys

    from rankscope.settings.config import OptimConfig, validate

    with pytest.raises(ConfigError, match="optim.adamw_beta1 must be a number >= 0 and < 1, got 1.5"):
        validate(RunConfig(optim=OptimConfig(adamw_beta1=1.5)))
    code = "import sys, rankscope.settings.config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_setting_value_names_the_flag():
    from rankscope.settings.config import setting_value

    assert setting_value("--tokens", "train.tokens", "2M") == 2_000_000
    for bad, needle in (("abc", "got 'abc'"), ("0", "got '0'"), ("-5", "got '-5'"), ("1e400", "got '1e400'")):
        with pytest.raises(ConfigError) as e:
            setting_value("--tokens", "train.tokens", bad)
        assert str(e.value).startswith("--tokens must be an integer from 1 to 2^63 - 1") and needle in str(e.value)


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
    from rankscope.settings.seedref import SEED_1_5B, SEED_88M, differences

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
    from rankscope.settings.seedref import differences_text

    text = differences_text(apply_overrides(preset("seed-88m"), {"optim.muon_qkvo": "separate"}).to_dict())
    assert text == "optim.muon_qkvo separate (seed stacked)"
    old = preset("seed-88m").to_dict()
    del old["optim"]["muon_ns"]
    assert differences(old) == [("optim.muon_ns", None, "polar_express")]
