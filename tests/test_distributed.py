"""Many processes and many machines: DDP on CPU (gloo) equals one process; study slices; gradient
accumulation and activation checkpointing leave the numbers unchanged."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _runs import SETTINGS, shards

from rankscope.cli import main
from rankscope.core.model import GPT
from rankscope.errors import ConfigError
from rankscope.run import dist as rdist
from rankscope.run.studies import BUILTIN
from rankscope.run.study import parse_shard, resolve, shard_runs
from rankscope.settings.config import RunConfig, apply_overrides
from rankscope.storage import store

STUDY = "\n".join(
    f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in {**SETTINGS, "train.checkpoint_every": 0}.items()
)


def study_file(tmp: Path, arms: str) -> Path:
    p = tmp / "s.toml"
    p.write_text(f"seeds = [0]\n[settings]\n{STUDY}\n\n{arms}")
    return p


# --- what one process and two may differ by -------------------------------------------------------
#
# Both runs add the same numbers in another order (DDP averages two half-batch gradients where one
# process sums the whole batch), and training carries the round-off forward. EPS bounds, per arm,
# the relative divergence of any weight matrix (||dW|| / ||W||) after the 16 steps; every value's
# tolerance below is EPS propagated through what that value is, not a fit to one machine's runs.
# (Measured on this test's 2-core machine over six seeds: weights apart by at most 3e-6, 2e-3 and
# 2e-3 in the three arms, every probe value within a quarter of its tolerance, r90 within one.)
U32, U16 = 2.0**-24, 2.0**-8  # unit round-off of float32 (24 significant bits) and bfloat16 (8)
EPS = {
    # float32 throughout. A gradient summed in another order is off by about sqrt(n) U32 c relative
    # (n = 128 tokens a step; c <= 100, the cancellation sum|g_i| / |sum g_i|), and AdamW steps of
    # lr 0.006 on weights of scale 0.02 carry it into the weights, step after step: 16 x 0.3 x
    # sqrt(128) x U32 x 100 = 3e-4. More where a coordinate's gradient cancels to round-off: AdamW
    # divides by its RMS, so the round-off's sign picks its step. Budget 1e-3 (a 2-core machine
    # showed an attention score 0.9% apart, which needs weights about 5e-4 apart; see below).
    "adamw": 1e-3,
    # Muon orthogonalizes in bfloat16: once a rounding flips, the update is off by U16 relative,
    # once at the cast in and once at the result; Newton-Schulz's iterations pull errors back
    # toward the orthogonal factor rather than growing them
    "muon-ns": 2 * U16,
    # the seed's Polar Express multiplies by 8.16 in its first step (optim.POLAR_EXPRESS), so a
    # flipped rounding grows to 8.16 U16 before the later steps contract it
    "muon": 8.16 * U16,
}
PROBE_ROWS, HEAD_DIM, SEQ_LEN = 2 * 32, 32, 32  # probe.batch_size x train.seq_len; _runs.SETTINGS
# A direction the activations barely use has a singular value sqrt(lambda) whose eigenvalue lambda
# is known only to +-sqrt(n) U32 lambda_max (a float32 Gram matrix summed over n rows), so its
# singular value only to +-F s_max, whatever the weights: the floor of the values made of sqrt(lambda).
F = math.sqrt(math.sqrt(PROBE_ROWS) * U32)  # 6.9e-4


def probe_tolerance(metric: str, site: str, eps: float, z_max: float, value: float = math.nan) -> tuple[float, float]:
    """(rtol, atol) of one probe value when the weights are `eps` apart (relative) and the largest
    attention logit is `z_max`. Activations move like the weights that make them, by eps. `value`:
    the row's own value (one process), for the tolerances that depend on it (decay_r2)."""
    floor = site not in ("w_q", "w_k", "dw_k", "attn", "q_gain", "k_gain")  # activations' float32 Gram
    dz = 2 * eps * z_max  # a logit q.k moves by eps through q and eps through k
    if metric in ("decay", "decay_r2"):
        # the least-squares slope of log λ_i on log i over `decay_ranks`: each λ = s^2 moves by 2 x 2
        # eps relative, plus the float32 Gram floor F^2 λ_1 (F above), relative to λ_i at most F^2 K
        # where K = λ_1 / λ_i <= 1e4 (the fitted ranks of these 32-dim heads stay within four
        # decades of the top). α moves by at most δ Σ|dx_i| / Σ dx_i^2 (dx: centered log ranks);
        # R^2 = cos^2 of the angle between dx and dy, turned by at most |δ| / |dy| where
        # |dy| >= |α| |dx|: it moves by at most 2 sqrt(m) δ / (|α| |dx|).
        from rankscope.measure.metrics import decay_ranks

        x = np.log(np.array(decay_ranks(HEAD_DIM), dtype=float))
        dx = x - x.mean()
        delta = 4 * eps + F * F * 1e4
        if metric == "decay":
            return 0.0, delta * np.abs(dx).sum() / (dx * dx).sum()
        return 0.0, 2 * math.sqrt(len(x)) * delta / (abs(value) * math.sqrt((dx * dx).sum()) + 1e-300)
    if metric in ("spectral_norm", "gain_mean"):
        return eps, 0.0  # Weyl: |d s_max| <= ||dW||; a mean moves by at most its entries' largest move
    if metric in ("stable_rank", "pr_eig"):
        return 4 * eps, 0.0  # a ratio of two sums of eigenvalues (~ x^2: each sum moves by 2 eps)
    if metric == "pr_sv":
        return 4 * eps + (2 * F if floor else 0.0), 0.0  # as above; (sum s)^2 doubles F's share
    if metric == "erank":
        # exp(H) of p = s / sum s: dH = -sum dp (log p + 1), |dp| <= 2 eps p: 2 eps (H + 1) with
        # H <= log E; a direction at the floor has p ~ F and contributes F (1 + |log F|)
        return 2 * eps * (math.log(HEAD_DIM) + 1) + (F * (1 + abs(math.log(F))) if floor else 0.0), 0.0
    if metric in ("r90", "kv_r90"):
        return 0.0, 1.0  # a count of directions: one near the 90% line may cross it
    if metric == "rms_ratio":
        return 2 * eps, 0.0  # the step's update over the weights (update_geometry), each eps
    if metric in ("k_share", "block_share"):
        return 4 * eps, 0.0  # a ratio of sums of squares of the update's entries, each ~ x^2
    if metric == "max_logit":
        return 2 * eps, 0.0  # q.k, each factor eps
    if metric in ("induction_score", "prev_token_score"):
        # an attention weight p_j = softmax(z)_j: d log p_j = dz_j - E_p[dz], at most 2 dz: relative,
        # however small p is
        return 2 * dz, 0.0
    if metric == "entropy":
        # dH = -Cov_p(log p, dz): at most the spread of log p (below log T) times dz; absolute
        return 0.0, math.log(SEQ_LEN) * dz
    if metric == "gain_cv":
        # std / mean of gains near 1, 0 at the start: std moves by the gains' own move, eps x 1,
        # and mean's move adds cv x eps: absolute (a relative tolerance would be 0 at cv = 0)
        return 0.0, 2 * eps
    if metric == "gain_near_zero":
        return 0.0, 1 / HEAD_DIM  # the share of gains below 0.1: one gain may cross
    if metric == "kv_dloss":
        # the relative loss increase at the rank picked: as dloss_r below, at a rank that may move a rung
        return 0.0, 0.01 + 2 * eps + 4 * U32
    if metric.startswith("dloss_r"):
        # (L_r - L) / L: both losses move by eps (the losses above), plus their float32 rounding;
        # absolute, for a difference that is 0 at full rank
        return 0.0, 2 * eps + 4 * U32
    raise KeyError(f"no tolerance for probe metric {metric!r}: derive one")


@pytest.mark.slow
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
    for arm, eps in EPS.items():
        # a loss is a mean of -log p over 128 tokens: each moves by about its logits' divergence
        # (eps times a logit scale below 10 here), with independent signs that average down by
        # sqrt(128) > 10: rtol eps. A gradient is linear in each weight matrix on its path, and its
        # activations and backpropagated errors are each off by eps: its norm by about 2 eps.
        for col, rtol in (("train_loss", eps), ("val_loss", eps), ("grad_norm", 2 * eps)):
            a = one_s[one_s.arm == arm][col].to_numpy(float)
            b = two_s[two_s.arm == arm][col].to_numpy(float)
            np.testing.assert_allclose(b[~np.isnan(a)], a[~np.isnan(a)], rtol=rtol, err_msg=f"{arm} {col}")
        v = one_s[one_s.arm == arm]["val_loss"].to_numpy()
        assert v[-1] < v[0] - 0.5  # it really trained
    keys = ["arm", "step", "site", "layer", "head", "metric"]
    one_p, two_p = (store.load_probes(tmp_path / d).sort_values(keys).reset_index(drop=True) for d in ("one", "two"))
    assert len(one_p) == len(two_p) and (one_p[keys] == two_p[keys]).all().all()
    one_p["two"] = two_p["value"]
    bad = []
    for arm, eps in EPS.items():
        rows = one_p[one_p.arm == arm]
        z_max = rows.loc[rows.metric == "max_logit", "value"].max()  # the largest attention logit
        for r in rows.itertuples():
            if r.metric in ("functional_rank", "kv_rank"):  # a rung of the rank ladder (1, 2, 4, ...)
                # picked by a threshold on dloss: a dloss within its tolerance of the threshold moves it one rung
                ok = abs(math.log2(r.two) - math.log2(r.value)) <= 1
            else:
                alpha = rows.loc[
                    (rows.step == r.step) & (rows.site == r.site) & (rows.layer == r.layer) & (rows["head"] == r.head)
                    & (rows.metric == "decay"), "value"
                ]  # fmt: skip
                value = float(alpha.iloc[0]) if r.metric == "decay_r2" and len(alpha) else r.value
                rtol, atol = probe_tolerance(r.metric, r.site, eps, z_max, value)
                ok = abs(r.two - r.value) <= atol + rtol * abs(r.value) or (math.isnan(r.two) and math.isnan(r.value))
            if not ok:
                bad.append(f"{arm} step {r.step} {r.site} L{r.layer} H{r.head} {r.metric}: {r.value!r} vs {r.two!r}")
    assert not bad, f"{len(bad)} of {len(one_p)} probe values differ: " + "; ".join(bad[:10])
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


@pytest.mark.slow
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
    from rankscope.run.train import train

    results = {}
    for name, extra in {
        "plain": {},
        "accum": {"train.grad_accum": 2},
        "ckpt": {"train.activation_checkpointing": True},
    }.items():
        train(apply_overrides(RunConfig(), {**base, **extra}), tmp_path / name, progress=False)
        results[name] = store.read_table(tmp_path / name / "scalars.csv")
    # Accumulating two micro-batches sums the gradient in another order, as DDP does: the weights
    # may then be EPS["muon-ns"] apart, and the losses and gradient norm as in
    # test_two_processes_match_one. Checkpointing recomputes the same float32 ops on the same
    # inputs (equal to the bit today); a recompute through another kernel path would round
    # differently, with the same consequence. (Measured here: 2e-5 apart after 6 steps.)
    eps = EPS["muon-ns"]
    for name in ("accum", "ckpt"):
        for col, rtol in (("train_loss", eps), ("val_loss", eps), ("grad_norm", 2 * eps)):
            np.testing.assert_allclose(
                results[name][col].to_numpy(float)[1:],  # row 0, before any step, has no train loss
                results["plain"][col].to_numpy(float)[1:],
                rtol=rtol,
                err_msg=f"{name} {col}",
            )


def test_activation_checkpointing_gradients_equal():
    cfg = apply_overrides(RunConfig(), SETTINGS).model
    a, b = GPT(cfg), GPT(cfg)
    b.load_state_dict(a.state_dict())
    b.activation_checkpointing = True
    x = torch.randint(0, 256, (2, 16))
    a(x, x).backward()
    b(x, x).backward()
    # the recomputed forward runs the same float32 ops on the same inputs (equal to the bit today);
    # through another kernel path each gradient entry, a sum over the 32 tokens, could round
    # differently: by sqrt(32) U32 c of the gradient's scale, c <= 100 the sum's cancellation
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None:
            atol = math.sqrt(x.numel()) * U32 * 100 * pa.grad.abs().max().item()
            torch.testing.assert_close(pb.grad, pa.grad, rtol=0, atol=atol, msg=n)


def _sharded_muon_worker(rank: int, world: int, init: str, out: str, grouping: str) -> None:
    import torch.distributed as dist

    from rankscope.core.optim import build_optimizers
    from rankscope.settings.config import OptimConfig

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
    rdist.shutdown()  # leaves together: a rank that tears gloo down first can abort its peer


@pytest.mark.parametrize("grouping", ["stacked", "separate", "per_head"])
def test_sharded_muon_step_equals_the_single_process_step(tmp_path, grouping):
    """Each rank orthogonalizes its share (a stacked layer is owned whole), then they exchange: the
    result is bitwise the same as one process updating every matrix."""
    import torch.multiprocessing as mp

    from rankscope.core.optim import build_optimizers
    from rankscope.settings.config import OptimConfig

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
