"""`rankscope bench`: the CPU it names, the step split into forward, backward and optimizer, and
the evaluation share, on a small real run."""

from __future__ import annotations

import pytest
import torch

from rankscope.run.bench import format_result, run_bench, step_parts
from rankscope.settings.config import apply_overrides, preset
from rankscope.storage.provenance import cpu_info, describe_cpu

SMALL = {
    "model.n_layer": "1",
    "model.d_model": "64",
    "model.n_head": "1",
    "model.n_kv_head": "1",
    "model.d_mlp": "128",
    "train.batch_size": "2",
    "train.seq_len": "32",
    "probe.batch_size": "2",
    "probe.induction_batch": "2",
}


def test_cpu_info_names_the_cpu_and_what_torch_dispatches_to():
    c = cpu_info()
    assert c["name"] and c["threads"] == torch.get_num_threads()
    assert c["kernels"] == torch.backends.cpu.get_cpu_capability()
    assert set(c["isa"]) <= {"AVX-512", "AVX-512 BF16", "AMX-BF16", "AVX2"}
    assert c["amx"] == ("AMX-BF16" in c["isa"])
    text = describe_cpu({**c, "isa": ["AVX-512"], "amx": False, "threads": 2})
    assert text.startswith(c["name"]) and "AVX-512, no AMX" in text and text.endswith("2 threads")


def test_step_parts_time_forward_backward_and_optimizer_and_leave_no_grads():
    cfg = apply_overrides(preset("tiny"), SMALL)
    parts = step_parts(cfg, torch.device("cpu"), steps=2, warmup=1)
    assert list(parts) == ["forward", "backward", "optimizer"]
    assert all(v > 0 for v in parts.values())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_small_bench_reports_the_split_and_the_evaluation_share(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKSCOPE_CACHE", str(tmp_path / "cache"))
    r = run_bench("tiny", 8 * 64, {**SMALL, "data.path": "python-stdlib"}, progress=False)
    assert r["tokens_per_s"] > 0 and 0 < r["mfu_matmul"] < 1.5
    assert 0 < r["eval_share"] < 1 and r["full_evals"] == 11  # 1M tokens, every 100k, and token 0
    assert r["eval_ms"] > 0 and r["end_eval_ms"] >= 0
    text = format_result(r)
    for words in ("CPU", "one step, timed apart", "forward", "backward", "optimizer", "one evaluation", "evaluation"):
        assert words in text
    assert f"{sum(r['step_parts_s'].values()) * 1e3:.0f} ms" in text
