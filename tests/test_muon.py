"""Muon's groupings and iterations against references written from the formulas.

The seed's update (its optimizers/muon.py and models/layers.py at 772cf07), for each layer's one
stacked attention matrix W = [W_q; W_k; W_v; W_o] (rows):
    buf <- buf + (1 - mu)(G - buf);   U = G + mu (buf - G)          (Nesterov, elementwise)
    X = U / (1.01 ||U||_F + 1e-7) in bfloat16, transposed if tall;
    five times: A = X Xᵀ, X <- a X + (b A + c A A) X  with the five Polar Express triples
    W <- W - lr sqrt(max(1, rows / cols)) X
The references below apply this one matrix at a time, in a loop, with no batching: the optimizer
under test batches equal shapes, slices and restacks, so agreement checks all of that.
"""

from __future__ import annotations

import math

import pytest
import torch
from _muon import LR, MHA, MU, SMALL, muon_names, random_grads, seed_polar_express
from _tolerances import BF16_ITERATION_RTOL, U32

from rankscope.core.model import GPT
from rankscope.core.optim import BlockMuon, build_optimizers, orthogonalize
from rankscope.errors import ConfigError
from rankscope.settings.config import OptimConfig, RunConfig, apply_overrides


def reference_steps(model: GPT, grads: list[dict], blocks_of) -> dict[str, torch.Tensor]:
    """Run the seed's formula for several steps on given gradients. `blocks_of(name -> tensor)`
    returns the blocks: lists of (param name, row slice, col slice) stacked by rows."""
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    bufs = {n: torch.zeros_like(w) for n, w in weights.items()}
    for g in grads:
        updates = {}
        for n in g:
            bufs[n].lerp_(g[n], 1 - MU)  # the seed's own calls
            updates[n] = g[n].lerp(bufs[n], MU)
        for pieces in blocks_of(weights):
            u = torch.cat([updates[n][r, c] for n, r, c in pieces], dim=0)
            x = seed_polar_express(u).float()
            scale = math.sqrt(max(1.0, u.shape[0] / u.shape[1]))
            row = 0
            for n, r, c in pieces:
                h = weights[n][r, c].shape[0]
                weights[n][r, c] -= LR * scale * x[row : row + h]
                row += h
    return weights


def run_optimizer(model: GPT, cfg: OptimConfig, grads: list[dict]) -> dict[str, torch.Tensor]:
    opt = build_optimizers(model, cfg)
    params = dict(model.named_parameters())
    for g in grads:
        for n, p in params.items():
            p.grad = g[n].clone() if n in g else None
        opt.step()
    return {n: p.detach() for n, p in params.items()}


ALL = (slice(None), slice(None))


def stacked_blocks(model: GPT):
    def blocks(weights):
        out = []
        for i in range(model.cfg.n_layer):
            a = f"blocks.{i}.attn."
            out.append([(a + m + ".weight", *ALL) for m in ("q_proj", "k_proj", "v_proj", "o_proj")])
            out += [[(f"blocks.{i}.mlp.{m}.weight", *ALL)] for m in ("up", "down")]
        return out

    return blocks


def separate_blocks(model: GPT):
    return lambda weights: [[(n, *ALL)] for n in muon_names(model)]


def per_head_blocks(model: GPT):
    E = model.cfg.head_dim

    def blocks(weights):
        out = []
        for n in muon_names(model):
            rows, cols = weights[n].shape
            if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
                out += [[(n, slice(h * E, (h + 1) * E), slice(None))] for h in range(rows // E)]
            elif n.endswith("o_proj.weight"):
                out += [[(n, slice(None), slice(h * E, (h + 1) * E))] for h in range(cols // E)]
            else:
                out.append([(n, *ALL)])
        return out

    return blocks


def assert_matches(got: dict, want: dict, names: list[str], tol: float = 1e-5) -> None:
    """Every Muon matrix equal to the reference: the difference is under `tol` of the size of the
    reference's change (Frobenius norms), i.e. float32 rounding of the accumulated update. The
    bfloat16 iteration itself must agree bit for bit: one flipped bfloat16 rounding grows to about
    1% after five Polar Express steps, and a different grouping misses by tens of percent (see
    test_stacked_polar_express_is_the_seeds_update)."""
    for n in names:
        change = (want[n] - got["__init__"][n]).norm().item()
        dev = (got[n] - want[n]).norm().item()
        assert dev < tol * change, f"{n}: off by {dev / change:.3g} of the update"


def optimizer_vs_reference(grouping: str, blocks_of, ns: str = "polar_express"):
    torch.manual_seed(0)
    model = GPT(SMALL)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = random_grads(model)
    want = reference_steps(model, grads, blocks_of(model))
    got = run_optimizer(model, OptimConfig(muon_lr=LR, muon_momentum=MU, muon_qkvo=grouping, muon_ns=ns), grads)
    got["__init__"] = init
    return got, want, muon_names(model)


def test_stacked_polar_express_is_the_seeds_update():
    got, want, names = optimizer_vs_reference("stacked", stacked_blocks)
    assert_matches(got, want, names)
    # the stacked update really is not the separate one: K's step depends on Q, V and O
    torch.manual_seed(0)
    model = GPT(SMALL)
    separate = reference_steps(model, random_grads(model), separate_blocks(model))
    k = "blocks.0.attn.k_proj.weight"
    assert (separate[k] - want[k]).norm() > 0.3 * (want[k] - got["__init__"][k]).norm()


def test_stacked_lr_scale_is_the_stacks():
    """One layer at the seed's shape ratio: (4 + 2 + 2 + 4) heads x 8 rows over 32 columns = 3."""
    torch.manual_seed(0)
    model = GPT(SMALL)
    q = model.blocks[0].attn.q_proj.weight
    before = q.detach().clone()
    grads = random_grads(model, steps=1)
    after = run_optimizer(model, OptimConfig(muon_lr=LR, muon_momentum=0.0, muon_nesterov=False), grads)
    stacked = torch.cat([grads[0][f"blocks.0.attn.{m}.weight"] for m in ("q_proj", "k_proj", "v_proj", "o_proj")])
    x = seed_polar_express(stacked).float()
    assert stacked.shape == (96, 32)
    # no momentum: the optimizer orthogonalizes exactly this matrix, with the seed's bfloat16 ops, so
    # its X is this one bit for bit (a different scale or grouping would miss by far more than any
    # round-off). What remains is the float32 update W - c X, c = LR sqrt(3): here two roundings (c X,
    # then the difference), there one or two (an add with alpha, fused or not), each of at most u:
    # 3 u of |W| + c |X| apart per element at most
    c = LR * math.sqrt(3)
    got = after["blocks.0.attn.q_proj.weight"]
    assert ((got - (before - c * x[:32])).abs() <= 3 * U32 * (before.abs() + c * x[:32].abs())).all()


def test_per_head_matches_a_per_slice_reference():
    got, want, names = optimizer_vs_reference("per_head", per_head_blocks)
    assert_matches(got, want, names)


def test_separate_polar_express_matches_a_per_matrix_reference():
    got, want, names = optimizer_vs_reference("separate", separate_blocks)
    assert_matches(got, want, names)


def test_separate_newton_schulz_is_torch_muon_and_block_muon_agrees():
    torch.manual_seed(0)
    model = GPT(SMALL)
    cfg = OptimConfig(muon_lr=LR, muon_qkvo="separate", muon_ns="newton_schulz")
    assert any(type(o) is torch.optim.Muon for o in build_optimizers(model, cfg).optimizers)
    grads = random_grads(model)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch_result = {n: w.clone() for n, w in run_optimizer(model, cfg, grads).items()}
    # the same update through BlockMuon, every matrix its own block
    torch.manual_seed(0)
    model = GPT(SMALL)
    names = muon_names(model)
    params = dict(model.named_parameters())
    opt = BlockMuon([dict(params=[params[n] for n in names])], lr=LR, ns="newton_schulz")
    for g in grads:
        for n in names:
            params[n].grad = g[n].clone()
        opt.step()
    block = {n: params[n].detach() for n in names}
    block["__init__"] = init
    # the two run their bf16 matmuls through different kernels on some CPUs (batched here, one
    # matrix at a time in torch): equal to bf16 rounding of the iteration, bit for bit on AVX2/AVX-512
    assert_matches(block, torch_result, names, tol=BF16_ITERATION_RTOL)
    # a tolerance that still tells groupings apart: the seed's stack misses torch's update by far more
    stacked = {n: w.clone() for n, w in trained_with(OptimConfig(muon_lr=LR, muon_ns="newton_schulz"), grads).items()}
    k = "blocks.0.attn.k_proj.weight"
    assert (stacked[k] - torch_result[k]).norm() > 10 * BF16_ITERATION_RTOL * (torch_result[k] - init[k]).norm()


def trained_with(cfg: OptimConfig, grads: list[dict]) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return run_optimizer(GPT(SMALL), cfg, grads)


def test_orthogonalize_batches_like_one_at_a_time():
    g = torch.randn(5, 24, 40, generator=torch.Generator().manual_seed(0))
    for method in ("polar_express", "newton_schulz"):
        batched = orthogonalize(g, method)
        for i in range(5):
            torch.testing.assert_close(batched[i], orthogonalize(g[i], method), atol=0, rtol=0)
    # and its result is near-orthogonal: singular values within the bands each iteration reaches
    s = torch.linalg.svdvals(orthogonalize(g, "polar_express").float())
    assert 0.7 < s.min() and s.max() < 1.25
    s = torch.linalg.svdvals(orthogonalize(g, "newton_schulz").float())
    assert 0.5 < s.min() and s.max() < 1.3  # torch's quintic: roughly Uniform(0.5, 1.5) by design


@pytest.mark.parametrize("grouping", ["stacked", "separate", "per_head"])
def test_every_grouping_state_round_trips_and_trains(grouping):
    torch.manual_seed(0)
    model = GPT(SMALL)
    cfg = OptimConfig(muon_qkvo=grouping)
    opt = build_optimizers(model, cfg)
    x = torch.randint(0, 64, (2, 16))
    first = model(x, x).item()
    for _ in range(5):
        model(x, x).backward()
        opt.step()
        opt.zero_grad()
    assert model(x, x).item() < first - 0.5
    other = build_optimizers(model, cfg)
    other.load_state_dict(opt.state_dict())
    for sa, sb in zip(opt.state_dict()["optimizers"], other.state_dict()["optimizers"]):
        assert sa["param_groups"] == sb["param_groups"]
        for k, state in sa["state"].items():
            for name, value in state.items():
                assert torch.equal(value, sb["state"][k][name])


def test_stacked_needs_heads_times_head_dim_equal_d_model():
    with pytest.raises(ConfigError, match="n_head x model.head_dim"):
        apply_overrides(RunConfig(), {"model.head_dim": 32})
    # the other groupings, or AdamW, do not
    apply_overrides(RunConfig(), {"model.head_dim": 32, "optim.muon_qkvo": "separate"})
    apply_overrides(RunConfig(), {"model.head_dim": 32, "optim.name": "adamw"})
    with pytest.raises(ConfigError, match="1..5 for polar_express"):
        apply_overrides(RunConfig(), {"optim.muon_ns_steps": 6})
    with pytest.raises(ConfigError, match="optim.muon_qkvo must be"):
        apply_overrides(RunConfig(), {"optim.muon_qkvo": "paired"})


# --- partitions of {q, k, v, o} and head groups ----------------------------------------------------

PARTITIONS = ("qkvo", "q+k+v+o", "qk+vo", "k+qvo", "qkv+o", "qo+kv", "qv+ko", "q+ko+v")


def partition_blocks(parts: list[str], heads: int):
    """The blocks a partition defines, built here from the definition: per layer, each part's
    matrices stacked by rows in q, k, v, o order; cut into heads, block j of a part stacks head
    group j of each of its matrices (Q, K, V rows; O columns, transposed when stacked with others)."""

    def builder(model: GPT):
        E = heads * model.cfg.head_dim
        order = "qkvo"

        def blocks(weights):
            out = []
            for i in range(model.cfg.n_layer):
                a = f"blocks.{i}.attn."
                name = {x: f"{a}{x}_proj.weight" for x in order}
                for part in parts:
                    letters = sorted(part, key=order.index)
                    if not heads:
                        out.append([(name[x], *ALL, False) for x in letters])
                        continue
                    groups = weights[name[letters[0]]].shape[1 if letters[0] == "o" else 0] // E
                    for j in range(groups):
                        cut = slice(j * E, (j + 1) * E)
                        stacked = len(letters) > 1  # O's columns transposed beside row slices
                        out.append(
                            [
                                (name[x], slice(None), cut, stacked) if x == "o" else (name[x], cut, slice(None), False)
                                for x in letters
                            ]
                        )
                out += [[(f"blocks.{i}.mlp.{m}.weight", *ALL, False)] for m in ("up", "down")]
            return out

        return blocks

    return builder


def reference_partition_steps(model: GPT, grads: list[dict], blocks_of) -> dict[str, torch.Tensor]:
    """`reference_steps` for pieces that may be transposed: (name, rows, cols, transposed)."""
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    bufs = {n: torch.zeros_like(w) for n, w in weights.items()}
    for g in grads:
        updates = {}
        for n in g:
            bufs[n].lerp_(g[n], 1 - MU)
            updates[n] = g[n].lerp(bufs[n], MU)
        for pieces in blocks_of(weights):
            u = torch.cat([updates[n][r, c].T if t else updates[n][r, c] for n, r, c, t in pieces], dim=0)
            x = seed_polar_express(u).float()
            scale = math.sqrt(max(1.0, u.shape[0] / u.shape[1]))
            row = 0
            for n, r, c, t in pieces:
                view = weights[n][r, c].T if t else weights[n][r, c]
                h = view.shape[0]
                view -= LR * scale * x[row : row + h]
                row += h
    return weights


@pytest.mark.parametrize("heads", [0, 1, 2])
@pytest.mark.parametrize("partition", PARTITIONS)
def test_every_partition_is_its_blocks_update(partition, heads):
    torch.manual_seed(0)
    model = GPT(MHA)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = random_grads(model)
    parts = partition.split("+")
    want = reference_partition_steps(model, grads, partition_blocks(parts, heads)(model))
    cfg = OptimConfig(muon_lr=LR, muon_momentum=MU, muon_qkvo=partition, muon_head_group=heads)
    got = run_optimizer(model, cfg, grads)
    got["__init__"] = init
    assert_matches(got, want, muon_names(model))


@pytest.mark.parametrize("partition", ["qk+vo", "k+qvo", "qkv+o"])
def test_a_partition_is_the_polar_factor_of_its_concatenated_block(partition):
    """One step without momentum against the exact polar factor U Vᵀ (float64 SVD) of each part's
    concatenated gradient: K's update is within the Polar Express band of its own part's polar
    factor, and far from what any other partition would give it."""
    torch.manual_seed(0)
    model = GPT(MHA)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = random_grads(model, steps=1)
    for x in "qvo":  # K's gradient small beside the others': its share of a stack depends on its partners
        grads[0][f"blocks.0.attn.{x}_proj.weight"] *= 4
    cfg = OptimConfig(muon_lr=LR, muon_momentum=0.0, muon_nesterov=False, muon_qkvo=partition)
    after = run_optimizer(model, cfg, grads)

    def polar_k(part: str) -> torch.Tensor:
        names = [f"blocks.0.attn.{x}_proj.weight" for x in part]
        g = torch.cat([grads[0][n] for n in names]).double()
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        x = u @ vh
        row = part.index("k") * 32  # every matrix of MHA has 32 rows
        return LR * math.sqrt(max(1.0, g.shape[0] / g.shape[1])) * x[row : row + 32]

    k = "blocks.0.attn.k_proj.weight"
    step = (before[k] - after[k]).double()
    own = next(p for p in partition.split("+") if "k" in p)
    error = (step - polar_k(own)).norm()
    assert error < 0.2 * polar_k(own).norm()
    for other in {"k", "qk", "kv", "qkvo"} - {own}:
        assert (step - polar_k(other)).norm() > 2 * error, other


def test_partition_aliases_train_the_same_bits():
    torch.manual_seed(0)
    model = GPT(SMALL)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = random_grads(model)

    def trained(**kw):
        model.load_state_dict(init)
        return {n: w.clone() for n, w in run_optimizer(model, OptimConfig(muon_lr=LR, **kw), grads).items()}

    for alias, (name, heads) in {
        "stacked": ("qkvo", 0),
        "separate": ("o+v+k+q", 0),
        "per_head": ("q+k+v+o", 1),
    }.items():
        a, b = trained(muon_qkvo=alias), trained(muon_qkvo=name, muon_head_group=heads)
        assert all(torch.equal(a[n], b[n]) for n in a), alias
    # the letters' order inside a part is not the stacking order: vo+kq is qk+vo
    a, b = trained(muon_qkvo="vo+kq"), trained(muon_qkvo="qk+vo")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_gqa_partitions_by_heads_where_the_counts_agree():
    """SMALL has 4 query and 2 kv heads: whole-matrix partitions and head groups that keep the
    query side (q, o) apart from the kv side (k, v) train; mixing them is refused in one line."""
    torch.manual_seed(0)
    model = GPT(SMALL)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = random_grads(model)
    for partition, heads in (("qo+kv", 1), ("qo+kv", 2), ("q+k+v+o", 2), ("qk+vo", 0), ("k+qvo", 0)):
        model.load_state_dict(init)
        want = reference_partition_steps(model, grads, partition_blocks(partition.split("+"), heads)(model))
        got = run_optimizer(model, OptimConfig(muon_lr=LR, muon_qkvo=partition, muon_head_group=heads), grads)
        got["__init__"] = init
        assert_matches(got, want, muon_names(model))
    base = {"model.n_kv_head": 2, "model.n_head": 4, "model.head_dim": 48}
    with pytest.raises(ConfigError, match="n_kv_head .2. = model.n_head .4.; keep them in separate parts"):
        apply_overrides(RunConfig(), {**base, "optim.muon_qkvo": "qk+vo", "optim.muon_head_group": 1})
    with pytest.raises(ConfigError, match=r"muon_head_group \(3\) must divide the heads it groups"):
        apply_overrides(RunConfig(), {**base, "optim.muon_qkvo": "qo+kv", "optim.muon_head_group": 3})


@pytest.mark.parametrize("bad", ["qk+v", "qq+kvo", "qk+vo+", "qkvox", "QKVO", "q k v o"])
def test_a_partition_names_each_letter_once(bad):
    with pytest.raises(ConfigError, match="optim.muon_qkvo must be stacked, separate, per_head or a partition"):
        apply_overrides(RunConfig(), {"optim.muon_qkvo": bad})


def test_a_part_stacking_o_needs_square_attention():
    # head_dim 32 x 3 heads = 96 columns of O, not d_model 192: O cannot stack by rows under Q
    for partition in ("qkvo", "qk+vo", "k+qvo"):
        with pytest.raises(ConfigError, match="stacks O's weight with other matrices by rows"):
            apply_overrides(RunConfig(), {"model.head_dim": 32, "optim.muon_qkvo": partition})
    for fine in ("qkv+o", "qk+v+o"):
        apply_overrides(RunConfig(), {"model.head_dim": 32, "optim.muon_qkvo": fine})
    # cut into heads, O's column slices transpose to (head_dim, d_model): no constraint
    apply_overrides(RunConfig(), {"model.head_dim": 32, "optim.muon_qkvo": "qkvo", "optim.muon_head_group": 1})
