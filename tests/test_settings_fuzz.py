"""Property-based: any key, any type, any value through the paths the command line takes (--set,
study files, --tokens, --seeds, --shard) ends in a valid config or in one line of ConfigError,
never in another exception. Derandomized, so CI sees the same examples on every run."""

from __future__ import annotations

import contextlib
import datetime
import io
import tempfile
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rankscope.errors import ConfigError
from rankscope.run.studies import study_from_dict
from rankscope.run.study import parse_shard, resolve
from rankscope.settings.config import PRESETS, RunConfig, apply_overrides, from_dict, known_keys, parse_set, validate

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

KEYS = known_keys()
# Strings that parse as numbers of the wrong size or kind, lists, choices, paths and plain junk.
TRICKY = [
    "nan", "-nan", "inf", "-inf", "1e400", "-1e400", "1e15", "1e29", "1e-400", "-1", "-0", "0", "0.0", "1.5",
    "2M", "1.5k", "819.2K", "4_096", "99999999999999999999999", "9" * 5000, "18446744073709551616",
    "9223372036854775807", "", " ", "true", "off", "maybe", "k,k", "k,q_pre", "k,,q", ",", "z", "cuda:0",
    "cuda:99999", "tpu", "a\x00b", "\n", "learned", "none", "adamw", "log", "0x10", "1/2", "[1]",
]  # fmt: skip

scalars = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30, 10**400]),
    st.floats(),  # nan and both infinities included
    st.sampled_from([0.0, -0.0, 0.5, 1.0, 1.5, 1e-300, 1e300]),
    st.booleans(),
    st.sampled_from(TRICKY),
    st.text(max_size=12),
)
# What TOML can hold: scalars, dates, lists and tables (nested a little).
toml_values = st.recursive(
    st.one_of(scalars, st.just(datetime.date(2024, 1, 1))),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
keys = st.one_of(
    st.sampled_from(KEYS),
    st.sampled_from(["model", "optim", "train", "probe", "data", "seed.x", "model.", ".", "", "model..qk_norm"]),
    st.builds(lambda k, s: k + s, st.sampled_from(KEYS), st.sampled_from([".x", "x", "_", " "])),
    st.text(max_size=16),
)
text_items = st.one_of(
    st.builds(
        lambda k, v: f"{k}={v}", keys, st.one_of(st.sampled_from(TRICKY), st.text(max_size=12), scalars.map(str))
    ),
    st.text(max_size=20),
)


def one_line(e: ConfigError) -> None:
    text = str(e)
    assert text and "\n" not in text, text


@FUZZ
@given(st.sampled_from(sorted(PRESETS)), st.lists(text_items, max_size=4))
def test_set_flags_give_a_valid_config_or_one_line(preset, items):
    try:
        cfg = apply_overrides(PRESETS[preset], parse_set(items))
    except ConfigError as e:
        one_line(e)
        return
    validate(cfg)  # what came through holds every rule, and survives the trip through config.json
    assert from_dict(cfg.to_dict()) == cfg


@FUZZ
@given(st.dictionaries(keys, toml_values, max_size=4))
def test_study_file_settings_give_a_valid_config_or_one_line(overrides):
    try:
        cfg = apply_overrides(RunConfig(), overrides)
    except ConfigError as e:
        one_line(e)
        return
    validate(cfg)


top_keys = st.sampled_from(
    ["name", "description", "preset", "tokens", "eval_every", "probe_every", "seeds", "settings", "arms"]
)
arm_names = st.one_of(
    st.sampled_from(["a", "qk-norm", "b.c", "x+y", "_a", "a b", "a\n", "..", ""]), st.text(max_size=6)
)
arm_tables = st.dictionaries(arm_names, st.dictionaries(keys, toml_values, max_size=2) | toml_values, max_size=3)
study_values = st.one_of(
    toml_values,
    st.lists(st.one_of(st.integers(min_value=-3, max_value=3), st.sampled_from([2**63 - 1, 2**63, 2**64])), max_size=5),
    arm_tables,
    st.dictionaries(keys, toml_values, max_size=3),
    st.sampled_from(["tiny", "seed-88m", "huge", "2M", "1e400", "-5", "../x", "a/b", ".", "ok"]),
)


@FUZZ
@given(
    st.dictionaries(st.one_of(top_keys, st.text(max_size=8)), study_values, max_size=6),
    st.one_of(st.none(), arm_tables.filter(bool)),
)
def test_study_dicts_give_a_study_or_one_line(raw, arms):
    if arms is not None:
        raw = {**raw, "arms": arms}
    try:
        # the file's structure is checked as it is read, its settings when it is resolved
        runs = resolve(study_from_dict(raw, default_name="fuzz", where="fuzz.toml", say=lambda line: None), {})
    except ConfigError as e:
        one_line(e)
        return
    for _, cfg in runs:
        validate(cfg)


@FUZZ
@given(st.one_of(st.sampled_from(["0/1", "3/8", "8/8", "-1/4", "1", "1/0", "0/" + "9" * 5000, " 1 / 2 "]), st.text()))
def test_shard_gives_a_slice_or_one_line(text):
    try:
        i, n = parse_shard(text)
    except ConfigError as e:
        one_line(e)
        return
    assert 0 <= i < n


flag_values = st.one_of(st.sampled_from(TRICKY), st.text(max_size=10), scalars.map(str))
seed_values = st.one_of(st.integers(min_value=-5, max_value=5), st.sampled_from([2**63 - 1, 2**63, 10**23]))


@FUZZ
@given(
    tokens=st.one_of(st.none(), flag_values),
    seeds=st.one_of(st.none(), st.lists(seed_values.map(str) | st.sampled_from(["x", "1.5"]), min_size=1, max_size=4)),
    shard=st.one_of(st.none(), flag_values, st.sampled_from(["0/1", "1/2", "3/5", "7/9"])),
    sets=st.lists(text_items, max_size=2),
    preset=st.one_of(st.none(), st.sampled_from(["tiny", "seed-88m", "huge", ""])),
)
def test_run_flags_end_in_exit_0_or_2_with_one_line(tokens, seeds, shard, sets, preset):
    """`rankscope run` itself, up to where the study would start (run_study is replaced): every
    flag is checked by then, and a bad one is exit 2 with one line (argparse's own usage errors,
    such as --seeds x, exit 2 as well)."""
    args = ["run", "--no-progress", "--no-report"]
    if tokens is not None:
        args.append(f"--tokens={tokens}")
    if seeds is not None:
        args += ["--seeds", *seeds]
    if shard is not None:
        args.append(f"--shard={shard}")
    if preset is not None:
        args.append(f"--preset={preset}")
    for item in sets:
        args += ["--set", item]
    from rankscope.cli import main

    err = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp, mock.patch("rankscope.run.study.run_study", return_value=[]) as run:
        args.append(f"--out={tmp}/out")
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(args)
            except SystemExit as e:  # argparse: a value its type= refuses, or an option-like value
                code = e.code
    assert code in (0, 2), (code, err.getvalue())
    if code == 2 and err.getvalue().startswith("rankscope: error:"):
        assert len(err.getvalue().strip().splitlines()) == 1, err.getvalue()
    if run.called:  # only with flags that all passed their checks
        assert code == 0


SPECIAL = [0, 1, -1, 2**63 - 1, 2**63, 2**64, 10**30, 10**400, 10**5000, 0.5, 1.5, -0.0, 1e300, True, False, None]
SPECIAL += [float("nan"), float("inf"), float("-inf"), [], ["k", "k"], [1], {"a": 1}, datetime.date(2024, 1, 1)]


def test_every_setting_with_every_tricky_value():
    """The whole cross product, not a sample: each known key with each tricky string (as --set
    gives it) and each tricky TOML value."""
    for key in KEYS:
        for value in TRICKY + SPECIAL:
            try:
                validate(apply_overrides(RunConfig(), {key: value}))
            except ConfigError as e:
                one_line(e)


# Study files as text: the structure a hand-written or generated file can have, however hostile:
# values nested far past Python's recursion limit, integer literals past its 4,300-digit limit,
# long strings, many keys, tables declared twice, arrays of tables, bytes that are not UTF-8.
def nested(depth: int, open_: str, close: str, leaf: str = "1") -> str:
    return open_ * depth + leaf + close * depth


toml_value_text = st.one_of(
    st.builds(nested, st.integers(0, 6000), st.just("["), st.just("]")),
    st.builds(lambda d: "{a = " * d + "1" + "}" * d, st.integers(0, 3000)),
    st.builds(lambda n: "9" * n, st.integers(1, 12000)),
    st.builds(lambda n: "-" + "1_" * n + "1", st.integers(1, 3000)),
    st.builds(lambda n, c: '"' + c * n + '"', st.integers(0, 20000), st.sampled_from(["a", "\\u00e9", "\\\\", " "])),
    st.sampled_from(
        ["1e400", "nan", "-inf", "0x7fffffffffffffff", "0o777", "2024-01-01T00:00:00Z", "true", "[]", "{}"]
    ),
    st.builds(
        lambda xs: "[" + ", ".join(xs) + "]", st.lists(st.sampled_from(["1", '"k"', "1.5", "true"]), max_size=50)
    ),
    st.text(max_size=30),
)
toml_lines = st.one_of(
    st.builds(
        lambda k, v: f"{k} = {v}", st.one_of(top_keys, st.sampled_from(KEYS), st.text(max_size=8)), toml_value_text
    ),
    st.builds(lambda k, v: f'"{k}" = {v}', st.sampled_from(KEYS), toml_value_text),
    st.sampled_from(["[settings]", "[arms.a]", "[arms.b]", "[arms]", "[[arms]]", "[arms.a.model]", "[settings.model]"]),
    st.builds(lambda n: "\n".join(f"k{i} = {i}" for i in range(n)), st.integers(0, 3000)),
    st.text(max_size=40),
)


@FUZZ
@given(st.lists(toml_lines, max_size=8), st.booleans())
def test_study_files_of_any_structure_give_a_study_or_one_line(lines, latin1):
    """Whatever a study file holds, reading and resolving it ends in runs or in one line."""
    from rankscope.run.studies import read_study

    text = "\n".join(lines) + "\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/fuzz.toml"
        with open(path, "wb") as f:
            f.write(text.encode("latin-1", "replace") + (b"\xff\xfe" if latin1 else b""))
        try:
            runs = resolve(read_study(path, say=lambda line: None), {})
        except ConfigError as e:
            one_line(e)
            return
    for _, cfg in runs:
        validate(cfg)
