"""Muon divided across processes (gloo on CPU): after several steps every rank's parameters equal
one process's, bit for bit, for the seed's stack, a partition and per-head blocks, with one
collective a step; and train() under DDP sends no buffers before its forwards."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _runs import SETTINGS, shards

from rankscope.core.model import GPT, ModelConfig
from rankscope.core.optim import build_optimizers
from rankscope.run import dist as rdist
from rankscope.settings.config import OptimConfig, RunConfig, apply_overrides

# GQA (4 query heads, 2 kv heads): per_head has 2 layers x 4 heads of blocks to share out
SMALL = ModelConfig(vocab_size=64, n_layer=2, d_model=32, n_head=4, n_kv_head=2, head_dim=8, d_mlp=64, max_seq_len=16)
STEPS = 4
# the collectives torch.distributed offers, counted wherever the code under test calls one
COLLECTIVES = (
    "broadcast",
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "scatter",
    "gather",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
    "_broadcast_coalesced",  # what DDP sends buffers (and its first parameters) with
)


def count_collectives(calls: list[str]) -> None:
    """Wrap torch.distributed's collectives (in this process) so that each call appends its name."""
    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue

        def counted(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        setattr(dist, name, counted)


def muon_steps(partition: str, rank: int = 0, world: int = 1, calls: list[str] | None = None) -> tuple[dict, list]:
    """STEPS Muon steps on SMALL with the same gradients on every rank (as after DDP's all-reduce),
    new ones each step; returns (state dict, the collectives of each step)."""
    torch.manual_seed(0)
    model = GPT(SMALL)
    opt = build_optimizers(model, OptimConfig(muon_qkvo=partition, muon_weight_decay=0.1), rank=rank, world_size=world)
    per_step = []
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(step)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        before = len(calls) if calls is not None else 0
        opt.step()
        opt.zero_grad()
        per_step.append(calls[before:] if calls is not None else [])
    return model.state_dict(), per_step


def _muon_worker(rank: int, world: int, init: str, out: str, partition: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    calls: list[str] = []
    count_collectives(calls)
    state, per_step = muon_steps(partition, rank, world, calls)
    torch.save({"model": state, "collectives": per_step}, f"{out}.rank{rank}")
    rdist.shutdown()  # leaves together: a rank that tears gloo down first can abort its peer


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("partition", ["stacked", "qk+vo", "per_head"])
def test_sharded_muon_steps_equal_one_process_with_one_collective_a_step(tmp_path, world, partition):
    """Each rank orthogonalizes its own blocks with the arithmetic one process uses for them; the
    exchange only moves bits, so every rank ends with exactly one process's parameters."""
    out = tmp_path / "state"
    mp.spawn(_muon_worker, args=(world, f"file://{tmp_path / 'rdzv'}", str(out), partition), nprocs=world)
    alone, _ = muon_steps(partition)
    for rank in range(world):
        got = torch.load(f"{out}.rank{rank}", weights_only=True)
        for name, value in alone.items():
            assert torch.equal(got["model"][name], value), f"rank {rank}: {name}"
        for step, calls in enumerate(got["collectives"]):
            assert len(calls) == 1, f"rank {rank} step {step}: {calls}"
    # the comparison can fail: without the exchange, a rank's matrices owned by others stay behind
    assert not all(torch.equal(v, GPT(SMALL).state_dict()[k]) for k, v in alone.items())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_worker(rank: int, world: int, port: int, data: str, run: str, out: str) -> None:
    """train() as torchrun starts it, counting the collectives between two optimizer steps."""
    import rankscope.run.train as rtrain

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    calls: list[str] = []
    count_collectives(calls)
    marks: list[int] = []
    step = rtrain.optimizer_step

    def marked(*args, **kwargs):
        marks.append(len(calls))
        return step(*args, **kwargs)

    rtrain.optimizer_step = marked
    cfg = apply_overrides(
        RunConfig(),
        {
            **SETTINGS,
            "data.path": data,
            "train.tokens": 4 * 128,
            "train.eval_every": 4 * 128,
            "train.checkpoint_every": 0,
            "train.grad_accum": 2,
            "model.qk_norm": "none",
            "optim.qk_clip_tau": 1.0,  # QK-Clip on: every attention layer tracks its max_logit buffer
        },
    )
    rtrain.train(cfg, run, progress=False)
    # what each step between the first optimizer step and the last sent (forward, backward, step)
    torch.save([calls[a:b] for a, b in zip(marks, marks[1:])], f"{out}.rank{rank}")
    rdist.shutdown()


@pytest.mark.slow
def test_ddp_sends_no_buffers_before_its_forwards(tmp_path):
    """The RoPE tables are constants and max_logit is all-reduced after the step, so DDP's buffer
    broadcast before each forward (one per micro-batch) would only cost time."""
    data = shards(tmp_path)
    out = tmp_path / "calls"
    mp.spawn(_train_worker, args=(2, _free_port(), str(data), str(tmp_path / "run"), str(out)), nprocs=2)
    for rank in range(2):
        steps = torch.load(f"{out}.rank{rank}", weights_only=True)
        assert len(steps) == 3
        for calls in steps:
            assert "_broadcast_coalesced" not in calls and "broadcast" not in calls, calls
            # besides: all-reduces of the QK-Clip maxima and of the stop agreement (DDP's gradient
            # all-reduce is a C++ hook, not seen here)
            assert sum(c.startswith("all_gather") for c in calls) == 1, calls
