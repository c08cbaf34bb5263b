"""Many processes and many machines: DDP on CPU (gloo) equals one process; study slices; gradient
accumulation and activation checkpointing leave the numbers unchanged."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_resume import SETTINGS, shards

from rankscope import store
from rankscope.cli import main
from rankscope.config import RunConfig, apply_overrides
from rankscope.errors import ConfigError
from rankscope.model import GPT
from rankscope.study import BUILTIN, parse_shard, resolve, shard_runs

STUDY = "\n".join(
    f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in {**SETTINGS, "train.checkpoint_every": 0}.items()
)


def study_file(tmp: Path, arms: str) -> Path:
    p = tmp / "s.toml"
    p.write_text(f"seeds = [0]\n[settings]\n{STUDY}\n\n{arms}")
    return p


def test_two_processes_match_one(tmp_path):
    data = shards(tmp_path)
    study = study_file(
        tmp_path,
        '[arms.muon]\nmodel.qk_norm = "learned"\n[arms.adamw]\noptim.name = "adamw"\n'
        '[arms.muon-ns]\noptim.muon_qkvo = "separate"\noptim.muon_ns = "newton_schulz"\n',
    )
    args = ["run", str(study), "--data", str(data), "--no-progress", "--no-report"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "rankscope",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one_s, two_s = (store.load_scalars(tmp_path / d).sort_values(["arm", "step"]) for d in ("one", "two"))
    assert len(one_s) == len(two_s) == 3 * 9
    # Only the order of the gradient sums differs. Muon orthogonalizes in bfloat16, which makes
    # those 1e-7 differences larger: torch's Newton-Schulz keeps them near 1e-4; the seed's Polar
    # Express, whose first step multiplies by 8.16, lets a flipped rounding grow step by step to
    # ~2e-3 over 16 steps (measured), so that arm gets a looser tolerance. The ownership exchange
    # itself is bitwise exact (test_sharded_muon_step_equals_the_single_process_step).
    for arm, rtol in (("adamw", 1e-5), ("muon-ns", 2e-4), ("muon", 1e-2)):
        for col in ("train_loss", "val_loss", "grad_norm"):
            a = one_s[one_s.arm == arm][col].to_numpy(float)
            b = two_s[two_s.arm == arm][col].to_numpy(float)
            np.testing.assert_allclose(b[~np.isnan(a)], a[~np.isnan(a)], rtol=rtol, err_msg=f"{arm} {col}")
        v = one_s[one_s.arm == arm]["val_loss"].to_numpy()
        assert v[-1] < v[0] - 0.5  # it really trained
    one_p, two_p = (
        store.load_probes(tmp_path / d).sort_values(["arm", "step", "site", "layer", "head", "metric"])
        for d in ("one", "two")
    )
    assert len(one_p) == len(two_p)
    # the probe's numbers follow the weights: AdamW's (integer counts such as r90 included) within
    # 5e-3; Newton-Schulz Muon's within 2e-2 (r90, a threshold count, may move by one); the Polar
    # Express arm's weights drift by up to 1e-2 (above), so its rows are not compared
    for arm, rtol, skip in (("adamw", 5e-3, ()), ("muon-ns", 2e-2, ("r90",))):
        rows = (one_p.arm == arm).to_numpy() & ~one_p.metric.isin(skip).to_numpy()
        np.testing.assert_allclose(
            two_p["value"].to_numpy()[rows], one_p["value"].to_numpy()[rows], rtol=rtol, atol=1e-4, err_msg=arm
        )
    prov = store.read_json(tmp_path / "two" / "muon" / "seed-0" / "provenance.json")
    assert prov["world_size"] == 2
    assert not (tmp_path / "two" / "muon" / "seed-1").exists()


def test_shards_cover_every_run_exactly_once():
    runs = resolve(BUILTIN["qk-4way"], {}, seeds=(0, 1, 2))
    assert len(runs) == 12
    for n in (1, 2, 5, 12, 20):
        slices = [shard_runs(runs, i, n) for i in range(n)]
        flat = [(a, c.seed) for s in slices for a, c in s]
        assert sorted(flat) == sorted((a, c.seed) for a, c in runs) and len(set(flat)) == len(flat)
    assert parse_shard("3/8") == (3, 8)
    for bad in ("8/8", "-1/4", "a/b", "1"):
        with pytest.raises(ConfigError):
            parse_shard(bad)


def test_sharded_study_in_two_folders_merges_in_the_report(tmp_path, capsys):
    data = shards(tmp_path)
    study = study_file(tmp_path, '[arms.a]\nmodel.qk_norm = "learned"\n[arms.b]\nmodel.qk_norm = "none"\n')
    for i in range(2):
        assert (
            main(
                [
                    "run",
                    str(study),
                    "--data",
                    str(data),
                    "--out",
                    str(tmp_path / f"part{i}"),
                    "--seeds",
                    "0",
                    "1",
                    "--shard",
                    f"{i}/2",
                    "--no-progress",
                    "--no-report",
                    "--set",
                    "train.tokens=512",
                ]
            )
            == 0
        )
    parts = [sorted((r.parent.name, r.name) for r in store.run_dirs(tmp_path / f"part{i}")) for i in range(2)]
    assert len(parts[0]) == len(parts[1]) == 2 and not set(parts[0]) & set(parts[1])
    assert main(["report", str(tmp_path / "part0"), str(tmp_path / "part1"), "--out", str(tmp_path / "merged")]) == 0
    out = capsys.readouterr().out
    assert "a (n=2)" in out and "b (n=2)" in out
    assert (tmp_path / "merged" / "report.md").exists()


def test_gradient_accumulation_and_activation_checkpointing_keep_the_numbers(tmp_path):
    data = shards(tmp_path)
    # torch's Newton-Schulz Muon: it keeps float32 summation-order differences at their size, where
    # Polar Express's steep first step can grow one flipped bfloat16 rounding (see above)
    base = {
        **SETTINGS,
        "data.path": str(data),
        "train.tokens": 6 * 128,
        "train.eval_every": 3 * 128,
        "train.checkpoint_every": 0,
        "optim.muon_qkvo": "separate",
        "optim.muon_ns": "newton_schulz",
    }
    from rankscope.train import train

    results = {}
    for name, extra in {
        "plain": {},
        "accum": {"train.grad_accum": 2},
        "ckpt": {"train.activation_checkpointing": True},
    }.items():
        train(apply_overrides(RunConfig(), {**base, **extra}), tmp_path / name, progress=False)
        results[name] = store.read_table(tmp_path / name / "scalars.csv")
    for name in ("accum", "ckpt"):
        for col in ("train_loss", "val_loss", "grad_norm"):
            np.testing.assert_allclose(
                results[name][col].to_numpy(float)[1:],
                results["plain"][col].to_numpy(float)[1:],
                rtol=1e-4,
                err_msg=f"{name} {col}",
            )  # float32 sum order


def test_activation_checkpointing_gradients_equal():
    cfg = apply_overrides(RunConfig(), SETTINGS).model
    a, b = GPT(cfg), GPT(cfg)
    b.load_state_dict(a.state_dict())
    b.activation_checkpointing = True
    x = torch.randint(0, 256, (2, 16))
    a(x, x).backward()
    b(x, x).backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None:
            assert torch.allclose(pa.grad, pb.grad, atol=1e-6), n


def _sharded_muon_worker(rank: int, world: int, init: str, out: str, grouping: str) -> None:
    import torch.distributed as dist

    from rankscope.config import OptimConfig
    from rankscope.optim import build_optimizers

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    cfg = apply_overrides(RunConfig(), SETTINGS).model
    model = GPT(cfg)
    for p in model.parameters():  # the same gradients on every rank, as after DDP's all-reduce
        p.grad = torch.randn_like(p) if p.requires_grad else None
    opt = build_optimizers(model, OptimConfig(muon_qkvo=grouping), rank=rank, world_size=world)
    opt.step()
    if rank == 0:
        torch.save(model.state_dict(), out)
    dist.destroy_process_group()


@pytest.mark.parametrize("grouping", ["stacked", "separate", "per_head"])
def test_sharded_muon_step_equals_the_single_process_step(tmp_path, grouping):
    """Each rank orthogonalizes its share (a stacked layer is owned whole), then they exchange: the
    result is bitwise the same as one process updating every matrix."""
    import torch.multiprocessing as mp

    from rankscope.config import OptimConfig
    from rankscope.optim import build_optimizers

    mp.spawn(
        _sharded_muon_worker, args=(2, f"file://{tmp_path / 'rdzv'}", str(tmp_path / "sharded.pt"), grouping), nprocs=2
    )
    torch.manual_seed(0)
    cfg = apply_overrides(RunConfig(), SETTINGS).model
    model = GPT(cfg)
    for p in model.parameters():
        p.grad = torch.randn_like(p) if p.requires_grad else None
    build_optimizers(model, OptimConfig(muon_qkvo=grouping)).step()
    sharded = torch.load(tmp_path / "sharded.pt", weights_only=True)
    for name, value in model.state_dict().items():
        assert torch.equal(sharded[name], value), name
