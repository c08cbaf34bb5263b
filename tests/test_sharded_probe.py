"""Probes of sharded models: two gloo processes on the CPU, each with half of one batch, give the
rows of one process that measures the whole batch, whether the model is a plain replica, wrapped in
DistributedDataParallel or sharded by FSDP2's `fully_shard`; a ProbeLogger writes on rank 0 only.

The two processes run once for the module (`sharded`), every scenario in turn, and leave what each
rank measured in files that the tests below compare with one process here.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import pytest
import torch
from _tolerances import U32, entropy_tol, gram_rtol, logit_atol, r90_is_stable

from rankscope.attach import Probe
from rankscope.core.model import GPT, ModelConfig
from rankscope.errors import RankscopeError
from rankscope.integrations import ProbeLogger, ProbeOptions
from rankscope.measure.probe import gpt_probe
from rankscope.run import dist as rdist
from rankscope.settings.vocab import METRICS, PROBE_SITES
from rankscope.storage import store

CFG = ModelConfig(vocab_size=256, n_layer=2, d_model=64, n_head=4, n_kv_head=2, head_dim=16, d_mlp=128, max_seq_len=32)
WORLD, B, T = 2, 4, 32
X = torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
SITES = PROBE_SITES  # q_pre, q, k_pre, k, v, o
KEYS = ["layer", "head", "site", "metric"]
SCENARIOS = ("replicated", "group", "ddp", "fsdp2")


def build() -> GPT:
    """The same model in every process: seeded weights, and QK-Norm gains that are not all ones (so
    the gain rows, read from FSDP2's sharded parameters, have something to get right)."""
    torch.manual_seed(0)
    model = GPT(CFG)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for block in model.blocks:
            for norm in (block.attn.q_norm, block.attn.k_norm):
                norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) * 1.8 + 0.2)
    return model


def half(rank: int) -> torch.Tensor:
    """This rank's share of X: its rows."""
    return X[rank * B // WORLD : (rank + 1) * B // WORLD]


def recording(set_attribute, log: list) -> None:
    """Record what `metrics_from_gram` receives (the Grams, column sums and token counts, after any
    reduction) in `log`; set_attribute: setattr, or a MonkeyPatch's."""
    import rankscope.measure.probe as probe_module

    inner = probe_module.metrics_from_gram

    def record(g, col_sum=None, n=None, **kw):
        log.append((g.clone(), col_sum.clone(), torch.as_tensor(n).clone()))
        return inner(g, col_sum, n, **kw)

    set_attribute(probe_module, "metrics_from_gram", record)


def site_activations(model: GPT, *batches: torch.Tensor) -> dict[tuple[str, int], torch.Tensor]:
    """What every site's tap hands on, (B, T, heads, E) by (site, layer), for `batches` run one
    after the other and concatenated along the batch."""
    taps = {
        (path.split(".")[-1], int(path.split(".")[1])): mod
        for path, mod in model.named_modules()
        if path.split(".")[-1] in SITES and ".attn." in path
    }
    seen: dict[tuple[str, int], list[torch.Tensor]] = {key: [] for key in taps}
    handles = [mod.register_forward_hook(lambda m, a, o, out=seen[key]: out.append(o)) for key, mod in taps.items()]
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
    return {key: torch.cat(parts) for key, parts in seen.items()}


def _worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)  # two processes on a small machine
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        results = {}
        log: list = []
        recording(lambda obj, name, value: setattr(obj, name, value), log)
        plain = build()
        models = {
            "replicated": (plain, "auto"),
            "group": (plain, dist.new_group(list(range(WORLD)))),
            "ddp": (DistributedDataParallel(build()), "auto"),
        }
        sharded = build()
        mesh = init_device_mesh("cpu", (WORLD,))
        for block in sharded.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        models["fsdp2"] = (sharded, True)
        for name, (model, distributed) in models.items():
            log.clear()
            table = Probe(model, SITES, distributed=distributed).measure(half(rank))
            results[name] = (table, list(log))
        dtensors = [type(p).__name__ for p in sharded.blocks[0].parameters()]
        results["fsdp2-after"] = (dtensors, sharded.training)
        log.clear()
        results["alone"] = (Probe(plain, SITES, distributed=False).measure(half(rank)), list(log))

        # a logger on every rank (DDP), each with its half: rank 0 writes, rank 1 writes nothing
        ddp = models["ddp"][0]
        folder = f"{out}/logs" if rank == 0 else f"{out}/logs-rank{rank}"
        logger = ProbeLogger(
            ddp, folder, every_steps=1, batch=half(rank), sites=SITES, tensorboard=False, wandb=False, arm="dp"
        )
        tables = [logger.step(0)]
        tables.append(logger.step(T * B, loss=torch.tensor(1.0 + 2.0 * rank)))  # rank 0: 1, rank 1: 3
        logger.close()
        results["logger"] = (tables, logger.writes, logger.store is None)
        try:  # the run is finished: rank 0 refuses it, and so does every rank with it
            ProbeLogger(ddp, folder, every_steps=1, batch=half(rank), sites=SITES, tensorboard=False, arm="dp")
            results["refused"] = None
        except RankscopeError as e:
            results["refused"] = str(e)

        # the reduction itself, on made-up accumulators: sums add, maxima max, a NaN max stays NaN
        gp = gpt_probe(plain, ["k"])
        gp._reset()
        gp._gram[("k", 0)], gp._sum[("k", 0)], gp._n[("k", 0)] = torch.full((1, 2, 2), rank + 1.0), torch.ones(1, 2), 3
        gp._ent[0], gp._ent_n[0] = torch.tensor([0.5, 1.0], dtype=torch.float64), 5 + rank
        gp._maxlogit[0] = torch.tensor([float("nan") if rank else 1.0, 2.0 + rank, -1.0])
        gp._all_reduce(None)
        results["reduce"] = {k: dict(getattr(gp, k)) for k in ("_gram", "_sum", "_n", "_ent", "_ent_n", "_maxlogit")}
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        rdist.shutdown()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """What each of the two ranks measured: {rank: {scenario: ...}}, and the folder they wrote."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("sharded")
    ranks = mp.spawn(_worker, args=(f"file://{out / 'rdzv'}", str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 300  # a collective that one rank misses would wait forever
    while not ranks.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ranks.processes:
                proc.kill()
            pytest.fail("the two ranks did not finish within 300 s")
    return {r: torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)}, out


@pytest.fixture(scope="module")
def one():
    """One process measuring the whole batch: its table, what its metrics received, and the
    activations of every site and the post-RoPE q and k (for the tolerances)."""
    model = build()
    acts = site_activations(model, X)
    log: list = []
    mp = pytest.MonkeyPatch()
    recording(mp.setattr, log)
    try:
        table = Probe(model, SITES).measure(X)
    finally:
        mp.undo()
    return table, log, acts


def per_head(a: torch.Tensor) -> torch.Tensor:
    """(B, T, heads, E) -> (heads, B*T, E)."""
    return a.flatten(0, 1).transpose(0, 1)


def tolerances(acts: dict[tuple[str, int], torch.Tensor]) -> dict[str, tuple[float, float]]:
    """(rtol, atol) of each metric when one process sums a head's Gram over all of `acts`' tokens in
    float32 and two processes each over their half, then add the halves in float64.

    Both sides see the very same activations (asserted by the test below: a row's forward pass does
    not depend on the other rows of its batch), so they differ by summation order alone:
    - spectral metrics: `gram_rtol` of the activations; r90, a count, exactly where no head has a
      cumulative share within round-off of 90% (`r90_is_stable`), else within one;
      the power-law fit's decay and decay_r2 by `decay_tol`;
    - entropy: a float32 sum over a process's query rows before the float64 one: `entropy_tol`
      over all B*T rows (of logits that differ by at most `logit_atol`: the same logits, at most);
    - max logit: a maximum is exact, of logits that are the same: within `logit_atol`, which
      bounds two float32 computations of them (exactly equal here);
    - gains: the same parameters (FSDP2 gathers its shards exactly): exactly.
    A metric not named here has no tolerance: derive one.
    """
    heads = [per_head(a) for a in acts.values()]
    rtol = gram_rtol(heads)
    batch, t = acts[("q", 0)].shape[:2]
    dlogit = 0.0
    for layer in range(CFG.n_layer):
        q, k = acts[("q", layer)].transpose(1, 2), acts[("k", layer)].transpose(1, 2)  # (B, heads, T, E)
        k = k.repeat_interleave(CFG.n_head // CFG.n_kv_head, dim=1)
        dlogit = max(dlogit, logit_atol(q, k, 1 / math.sqrt(CFG.head_dim)))
    tol = {"entropy": entropy_tol(t, batch * t, dlogit), "max_logit": (0.0, dlogit)}
    tol.update({m: (0.0, 0.0) for m in ("gain_mean", "gain_cv", "gain_near_zero")})
    tol["r90"] = (0.0, 0.0 if r90_is_stable(heads) else 1.0)  # a count: one direction may cross 90%
    tol.update({m: (rtol, 0.0) for m in ("pr_sv", "pr_eig", "erank", "stable_rank")})
    if "decay" in METRICS:
        decay, r2 = decay_tol(heads)
        tol.update(decay=(0.0, decay), decay_r2=(0.0, r2))
    unknown = set(METRICS) - set(tol)
    assert not unknown, f"no tolerance for {', '.join(sorted(unknown))}: derive one"
    return tol


def decay_tol(acts) -> tuple[float, float]:
    """Absolute tolerances of decay (α) and decay_r2 (R²) under the Gram round-off of `gram_rtol`:
    each eigenvalue moves by about E sqrt(N) U32 λ_1, so log λ_i by δ_i = E sqrt(N) U32 λ_1 / λ_i.
    α = -Σ dx_i y_i / Σ dx_i² (dx: the centered log ranks) moves by at most Σ |dx_i| δ_i / Σ dx_i²;
    R² = cos² of the angle between dx and the centered log λ (dy): δ turns dy by at most |δ| / |dy|,
    so R² moves by at most 2 |δ| / |dy|. Every fitted eigenvalue is far above the fit's floor
    (asserted), so the same ranks are fitted on both sides. acts: iterable of (heads, N, E)."""
    from rankscope.measure.metrics import decay_ranks

    worst_alpha = worst_r2 = 0.0
    for a in acts:
        a = a.double()
        n, e = a.shape[-2:]
        ev = torch.linalg.eigvalsh(a.mT @ a).flip(-1)  # (heads, E), descending
        ranks = decay_ranks(e)
        lam = ev[:, ranks.start - 1 : ranks.stop - 1]
        delta = e * math.sqrt(n) * U32 * ev[:, :1] / lam
        assert (lam > 1e-9 * ev[:, :1]).all() and (delta < 0.1).all(), "a head too close to rank-deficient"
        x = torch.arange(ranks.start, ranks.stop, dtype=torch.float64).log()
        dx = x - x.mean()
        dy = lam.log() - lam.log().mean(-1, keepdim=True)
        worst_alpha = max(worst_alpha, ((dx.abs() * delta).sum(-1) / dx.square().sum()).max().item())
        worst_r2 = max(worst_r2, (2 * delta.norm(dim=-1) / dy.norm(dim=-1)).max().item())
    return worst_alpha, worst_r2


def compare(got: pd.DataFrame, want: pd.DataFrame, tol: dict[str, tuple[float, float]]) -> None:
    assert len(got) == len(want) and (got[KEYS].to_numpy() == want[KEYS].to_numpy()).all()
    assert set(want.metric) <= set(tol), set(want.metric) - set(tol)
    bad = []
    for metric, (rtol, atol) in tol.items():
        sel = (want.metric == metric).to_numpy()
        a, b = got.value.to_numpy()[sel], want.value.to_numpy()[sel]
        if not np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True):
            worst = np.abs(a - b).max()
            bad.append(f"{metric}: off by up to {worst:.3g} (rtol {rtol:.3g}, atol {atol:.3g})")
    assert not bad, "; ".join(bad)


def test_a_rows_forward_pass_does_not_depend_on_its_batch(one):
    """The premise of the comparisons: the ranks' halves give exactly the whole batch's activations."""
    _, _, acts = one
    halves = site_activations(build(), *(half(r) for r in range(WORLD)))
    for key, a in acts.items():
        assert torch.equal(halves[key], a), key


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_two_ranks_give_the_rows_of_one_process(sharded, one, scenario):
    results, _ = sharded
    table, log, acts = one
    got, got_log = results[0][scenario]
    # token counts are exact, and every head of every site counts all B*T tokens of both halves
    (g1, s1, n1), (g2, s2, n2) = log[0], got_log[0]
    assert torch.equal(n2, n1) and (n1 == B * T).all()
    assert g2.shape == g1.shape and s2.shape == s1.shape
    assert r90_is_stable(per_head(a) for a in acts.values())  # so r90 is compared exactly
    compare(got, table, tolerances(acts))
    # every rank of the group gets the same table, bit for bit
    other, _ = results[1][scenario]
    pd.testing.assert_frame_equal(other, got, check_exact=True)


def test_fsdp2_parameters_stay_sharded_and_modes_come_back(sharded):
    results, _ = sharded
    kinds, training = results[0]["fsdp2-after"]
    assert set(kinds) == {"DTensor"} and training is True
    table, _ = results[0]["fsdp2"]
    assert {"q_gain", "k_gain"} <= set(table.site)


def test_ranks_that_opt_out_measure_their_own_tokens(sharded):
    results, _ = sharded
    model = build()
    for rank in range(WORLD):
        got, got_log = results[rank]["alone"]
        want = Probe(model, SITES).measure(half(rank))  # one process, this rank's half only
        assert (got_log[0][2] == B // WORLD * T).all()
        # the same tokens and code on both sides: equal up to a Gram summed on another thread count
        tol = tolerances(site_activations(model, half(rank)))
        compare(got, want, tol)


def test_probe_logger_writes_on_rank_zero_only(sharded, one):
    results, out = sharded
    table, _, acts = one
    tables, writes, no_store = results[0]["logger"]
    assert writes and not no_store
    other_tables, other_writes, other_no_store = results[1]["logger"]
    assert not other_writes and other_no_store
    assert not (out / "logs-rank1").exists()  # rank 1 made no folder at all
    for a, b in zip(tables, other_tables):
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    run = out / "logs" / "dp" / "seed-0"
    probes = store.load_probes(out / "logs").sort_values(["step", *KEYS], kind="stable")
    tol = tolerances(acts)
    for step in (0, 1):
        rows = probes[probes.step == step].drop(columns=["arm", "seed", "step", "tokens"]).reset_index(drop=True)
        compare(rows.sort_values(KEYS).reset_index(drop=True), table.sort_values(KEYS).reset_index(drop=True), tol)
    scalars = store.read_table(run / "scalars.csv")
    assert scalars["train_loss"].dropna().tolist() == [2.0]  # the mean of rank 0's 1 and rank 1's 3
    assert (run / "done.json").exists()
    assert store.read_json(run / "provenance.json")["world_size"] == WORLD
    for rank in range(WORLD):
        assert "holds a finished run" in results[rank]["refused"]


def test_the_reduction_sums_counts_and_maxima(sharded):
    results, _ = sharded
    for rank in range(WORLD):
        r = results[rank]["reduce"]
        assert torch.equal(r["_gram"][("k", 0)], torch.full((1, 2, 2), 3.0, dtype=torch.float64))
        assert torch.equal(r["_sum"][("k", 0)], torch.full((1, 2), 2.0, dtype=torch.float64))
        assert r["_n"][("k", 0)].item() == 6 and r["_ent_n"][0].item() == 11
        assert torch.equal(r["_ent"][0], torch.tensor([1.0, 2.0], dtype=torch.float64))
        m = r["_maxlogit"][0]
        assert m.dtype == torch.float32 and m[0].isnan() and m[1:].tolist() == [3.0, -1.0]


# --- one process: nothing changes, nothing is communicated ---------------------------------------


def test_one_process_communicates_nothing_and_keeps_its_rows(monkeypatch):
    import torch.distributed as dist

    def refuse(*a, **k):
        raise AssertionError("a collective in a single-process probe")

    monkeypatch.setattr(dist, "all_reduce", refuse)
    model = build()
    got = Probe(model, SITES).measure(X)
    # the trainer's GramProbe, which never reduces, gives the very same rows, bit for bit
    want = pd.DataFrame(gpt_probe(model, SITES).measure([X]))
    pd.testing.assert_frame_equal(
        got.sort_values(KEYS).reset_index(drop=True),
        want.astype({"value": "float64"}).sort_values(KEYS).reset_index(drop=True)[got.columns],
        check_exact=True,
        check_dtype=False,
    )
    pd.testing.assert_frame_equal(Probe(model, SITES, distributed=False).measure(X), got, check_exact=True)


def test_distributed_settings_are_checked():
    model = build()
    with pytest.raises(RankscopeError, match="distributed must be"):
        Probe(model, distributed="yes")
    with pytest.raises(RankscopeError, match="distributed must be"):
        ProbeOptions(every_steps=1, batch=X, distributed=2)
    with pytest.raises(RankscopeError, match="initialised torch.distributed"):
        Probe(model, distributed=True).measure(X)
