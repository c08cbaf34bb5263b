"""The memory estimate against what a step really keeps, what a process really peaks at, and the
seed's own figures; a run that cannot fit is stopped with one line naming the setting."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from _runs import shards

from rankscope.core.model import GPT
from rankscope.errors import ConfigError
from rankscope.run.estimate import check_memory, layer_floats, memory, param_counts, seconds
from rankscope.settings.config import PRESETS, RunConfig, apply_overrides

TINY = PRESETS["tiny"]


def saved_floats_per_token(cfg: RunConfig, checkpointing: bool) -> float:
    """Floats a training forward keeps for backward per token, measured with saved-tensor hooks
    (each storage once, parameters and buffers left out) as the difference of two batch sizes,
    so what does not grow with the batch drops out."""

    def saved(rows: int) -> int:
        model = GPT(cfg.model)
        model.reset_parameters(0)
        model.activation_checkpointing = checkpointing
        own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in own:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        x = torch.randint(0, cfg.model.vocab_size, (rows, 64))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, x)
        return sum(seen.values())

    return (saved(4) - saved(2)) / (2 * 64) / 4


SHAPES = {
    "tiny": TINY.model,
    "no-qk-norm": dataclasses.replace(TINY.model, qk_norm="none"),
    "gqa": dataclasses.replace(TINY.model, n_head=4, n_kv_head=1),
    "narrow-heads": dataclasses.replace(TINY.model, n_head=2, n_kv_head=2, qk_norm="parameter_free"),
    "wide-mlp": dataclasses.replace(TINY.model, d_mlp=1536, n_layer=2),
}


@pytest.mark.parametrize("name", SHAPES)
def test_the_activation_formula_is_what_a_training_step_keeps(name):
    cfg = dataclasses.replace(TINY, model=SHAPES[name])
    m = cfg.model
    head = 2 * m.d_model + 3
    assert saved_floats_per_token(cfg, False) == pytest.approx(m.n_layer * layer_floats(cfg) + head, rel=0.01)
    # with checkpointing a layer keeps only its input
    assert saved_floats_per_token(cfg, True) == pytest.approx(m.n_layer * m.d_model + head, rel=0.01)


def test_parameters_are_counted_exactly_and_the_seed_figures_hold():
    model = GPT(TINY.model)
    assert param_counts(TINY)["total"] == model.num_params()
    seed = param_counts(PRESETS["seed-88m"])["total"]
    assert seed == 88_630_528  # the seed's own count; 0.35 GB of float32 weights
    assert memory(PRESETS["seed-88m"], "cuda").params * 4 == pytest.approx(0.35e9, rel=0.02)
    # the 1.5B follow-up with activation checkpointing: 35-45 GB of GPU memory under either optimizer
    for name in ("muon", "adamw"):
        cfg = apply_overrides(PRESETS["seed-1.5b"], {"optim.name": name})
        assert 35e9 <= memory(cfg, "cuda").peak <= 45e9, name
    # without checkpointing its micro-batch's activations about double the peak
    cfg = apply_overrides(PRESETS["seed-1.5b"], {"train.activation_checkpointing": "false"})
    assert memory(cfg, "cuda").peak > 1.7 * memory(PRESETS["seed-1.5b"], "cuda").peak


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"train.batch_size": "1048576"}, "train.batch_size"),
        ({"probe.batch_size": "1048576"}, "probe.batch_size"),
        (
            {"model.n_layer": "1024", "model.d_model": "16384", "model.n_head": "256", "model.n_kv_head": "256"},
            "model's size",
        ),
    ],
)
def test_a_run_that_cannot_fit_is_stopped_naming_the_setting(override, named):
    cfg = apply_overrides(TINY, override)
    with pytest.raises(ConfigError) as e:
        check_memory(cfg, torch.device("cpu"), what="arm a seed 0")
    text = str(e.value)
    assert "\n" not in text and named in text and text.startswith("arm a seed 0: a run needs about ")


def test_the_default_run_fits_and_its_time_scales_with_its_tokens():
    est, free = check_memory(TINY, torch.device("cpu"))
    assert free is None or est.peak < free
    one = seconds(TINY, 150e9)
    four = seconds(apply_overrides(TINY, {"train.tokens": "4M"}), 150e9)
    assert 3.5 < four / one < 4.5  # evaluations every 100K tokens come with the tokens
    assert seconds(TINY, 300e9) == pytest.approx(one / 2)


RSS_SCRIPT = """
import json, sys, tempfile
import torch
from rankscope.data import load_data
from rankscope.run.estimate import memory
from rankscope.run.train import train
from rankscope.settings.config import PRESETS, apply_overrides

cfg = apply_overrides(PRESETS[sys.argv[1]], json.loads(sys.argv[2]))
data = load_data(sys.argv[3], cfg.model.vocab_size, progress=False)
torch.set_num_threads(1)
base = int(open("/proc/self/statm").read().split()[1]) * 4096
with tempfile.TemporaryDirectory() as d:
    peak = train(cfg, d, data, progress=False)["peak_memory_bytes"]
print(json.dumps({"measured": peak - base, "estimate": memory(cfg).peak}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the process's peak is read from /proc")
@pytest.mark.parametrize(
    ("preset", "override"),
    [
        ("tiny", {}),
        ("tiny", {"model.d_model": "384", "model.n_head": "6", "model.n_kv_head": "6", "model.d_mlp": "1536"}),
        ("deep", {"probe.batch_size": "64"}),
    ],
    ids=["tiny", "wide", "deep-probe"],
)
@pytest.mark.slow
def test_the_estimate_is_within_a_factor_of_two_of_the_measured_peak(preset, override, tmp_path):
    """The process's peak resident memory over a short run (training steps, evaluations, the
    probe) above what it held before, in a fresh process so nothing earlier counts."""
    # the end-of-run KV headroom and functional rank are hundreds of forward passes: minutes here
    settings = {"train.tokens": "8192", "train.eval_every": "4096", "train.compile": "off", **override}
    settings.update({"probe.kv_headroom": "off", "probe.functional_rank": "off"})
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, preset, json.dumps(settings), str(shards(tmp_path))],
        capture_output=True,
        text=True,
        check=True,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0.5 <= r["estimate"] / r["measured"] <= 2.0, r


@pytest.mark.parametrize("setting", ["train.batch_size=1048576", "probe.batch_size=1048576"])
def test_rankscope_run_refuses_an_impossible_batch_before_writing_anything(tmp_path, setting):
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "rankscope", "run", "--set", setting, "--set", "probe.downstream=false"]
        + ["--data", str(shards(tmp_path)), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert "a run needs about" in lines[0] and setting.split("=")[0] in lines[0]
    assert not out.exists()


@pytest.mark.slow
def test_a_study_says_its_memory_and_time_at_start(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "rankscope", "run", "--tokens", "4096", "--no-progress", "--no-report"]
        + ["--set", "probe.downstream=false", "--set", "probe.kv_headroom=off"]
        + ["--data", str(shards(tmp_path)), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "rankscope: memory: about " in r.stderr and "available)" in r.stderr
    assert "rankscope: time: about " in r.stderr and "for 2 runs from the start" in r.stderr


def test_a_busy_machine_is_named_with_the_threads_to_set(monkeypatch):
    import os

    from rankscope.run.estimate import busy_line

    runs = [("a", TINY)]
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.1, 3.0, 2.0))
    (line,) = busy_line(runs)
    assert "load 3.1 on 2 CPUs" in line and "train.threads=N with N = 2 / processes" in line
    assert busy_line([("a", apply_overrides(TINY, {"train.threads": "1"}))]) == []  # threads chosen: quiet
    monkeypatch.setattr(os, "getloadavg", lambda: (0.4, 0.5, 0.5))
    assert busy_line(runs) == []
