"""What the trainer does only on a GPU, checked on the CPU where it can be: torch.compile of the
training step, bf16 autocast of the model and of the probe under it, QK-Clip's max logits under
autocast, and the probe's two eigenvalue paths (on the device, or copied to the host)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from _runs import config, shards
from _tolerances import U32, U_BF16, gram_rtol, logit_atol, perturbed_pr_rtol, r90_is_stable

from rankscope.core.model import GPT, ModelConfig, causal_max_logit, mixed_precision, qk_clip
from rankscope.measure.metrics import (
    EIG_PATHS,
    _to_host,
    eig_path,
    eigvalsh_batched,
    host_eigvalsh,
    metrics_from_gram,
)
from rankscope.measure.probe import AttentionStats, GramProbe, gpt_gains
from rankscope.measure.sites import gpt_sites
from rankscope.run.train import train
from rankscope.settings.vocab import METRICS
from rankscope.storage import store

CFG = ModelConfig(vocab_size=61, n_layer=2, d_model=32, n_head=4, n_kv_head=2, head_dim=8, d_mlp=64, max_seq_len=32)
SITES = ["q_pre", "q", "k_pre", "k", "v", "o"]

# CPU autocast feeds bf16 activations to the float32 QK-Norm gains, which torch.rms_norm warns about
bf16_warning = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")


def model_and_batch(seed: int = 0) -> tuple[GPT, torch.Tensor]:
    model = GPT(CFG).eval()
    model.reset_parameters(seed)
    x = torch.randint(0, CFG.vocab_size, (3, 20), generator=torch.Generator().manual_seed(seed))
    return model, x


def capture(model: GPT, x: torch.Tensor, names: list[str]) -> dict[tuple[str, int], torch.Tensor]:
    """Every tap's activation in one forward pass, as the model made it: {(name, layer): (B, T, heads, E)}."""
    out, handles = {}, []
    for i, b in enumerate(model.blocks):
        for n in names:
            handles.append(
                getattr(b.attn, n).register_forward_hook(lambda m, a, o, k=(n, i): out.__setitem__(k, o.clone()))
            )
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return out


def table(rows: list[dict]) -> dict[tuple, float]:
    return {(r["site"], r["layer"], r["head"], r["metric"]): r["value"] for r in rows}


def spd(batch: tuple[int, ...], d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gram matrices XᵀX of (2d, d) activations with a mean, their column sums and row counts."""
    x = torch.randn(*batch, 2 * d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.3
    return x.mT @ x, x.sum(-2), torch.full(batch, 2.0 * d, dtype=torch.float64)


# --- the eigenvalue paths -------------------------------------------------------------------------


def test_on_the_cpu_every_eigenvalue_path_is_the_call_it_always_was():
    g, s, n = spd((5,), 40)
    plain = torch.linalg.eigvalsh(g)
    for path in EIG_PATHS:
        assert torch.equal(eigvalsh_batched(g, path=path), plain), path
    device, host = (metrics_from_gram(g, s, n, path=p) for p in ("device", "host"))
    assert device.keys() == host.keys() == set(METRICS)
    assert all(torch.equal(device[m], host[m]) for m in METRICS)  # bitwise: the same computation
    model, x = model_and_batch()
    rows = [GramProbe(model, gpt_sites(SITES), eig_path=p).measure([x]) for p in ("device", "host")]
    assert rows[0] == rows[1] and len(rows[0]) > 0


def test_a_failed_measurement_leaves_no_grams_or_hooks_behind():
    """The probe's Grams (on a GPU: device memory) and pending activations go with the failure."""
    model, x = model_and_batch()
    probe = GramProbe(model, gpt_sites(SITES), AttentionStats(*gpt_sites(["q", "k"])))

    def forward_then_fail(batch):
        model(batch)
        raise RuntimeError("out of memory, say")

    with torch.no_grad(), pytest.raises(RuntimeError, match="out of memory"):
        probe.measure([x], forward=forward_then_fail)
    assert probe._gram == {} and probe._pending == {} and probe._ent == {}
    assert all(not m._forward_hooks for m in model.modules())


def test_host_eigvalsh_matches_lapack_whatever_the_number_of_workers():
    g, _, _ = spd((2, 3), 48, seed=1)
    threads = torch.get_num_threads()
    one = host_eigvalsh(g, workers=1)
    assert one.shape == (2, 3, 48)
    for workers in (2, 4, 100):  # more workers than matrices: one each
        assert torch.equal(host_eigvalsh(g, workers=workers), one)  # each matrix alone, one thread: bitwise
    assert torch.get_num_threads() == threads  # restored
    # against LAPACK with torch's own threads: both backward stable, each eigenvalue within about
    # d eps ||G||_2 of the exact one (Weyl), so within 2 d eps λ_max of each other
    ref = torch.linalg.eigvalsh(g)
    tol = 2 * 48 * torch.finfo(torch.float64).eps * ref[..., -1:]
    assert ((one - ref).abs() <= tol).all()
    with pytest.raises(ValueError, match="CPU"):
        host_eigvalsh(torch.empty(2, 4, 4, device="meta"))


def test_auto_path_sends_large_gpu_matrices_to_the_host():
    def on(device: str, d: int) -> SimpleNamespace:  # eig_path reads only the device and the shape
        return SimpleNamespace(device=torch.device(device), shape=(176, d, d))

    assert eig_path(on("cuda", 64)) == "host"  # one cuSOLVER call per matrix above 32x32
    assert eig_path(on("cuda", 128)) == "host"
    assert eig_path(on("cuda", 32)) == "device"  # batched Jacobi up to 32x32
    assert eig_path(on("cpu", 128)) == "device"
    assert eig_path(on("mps", 64)) == "host"
    assert eig_path(on("cuda", 128), "device") == "device"
    assert eig_path(on("cpu", 8), "host") == "host"
    with pytest.raises(ValueError, match="eigenvalue path"):
        eig_path(on("cuda", 64), "gpu")
    with pytest.raises(ValueError, match="eig_path"):
        GramProbe(GPT(CFG), gpt_sites(["k"]), eig_path="gpu")


def test_one_copy_to_the_host_keeps_every_value_and_shape():
    g, s, n = spd((4,), 6, seed=2)
    g32 = g.float()
    hg, hs, hn = _to_host(g32, s, n)
    assert [t.dtype for t in (hg, hs, hn)] == [torch.float64] * 3
    assert torch.equal(hg, g32.double()) and torch.equal(hs, s) and torch.equal(hn, n)


# --- bf16 autocast --------------------------------------------------------------------------------


@bf16_warning
def test_bf16_autocast_forward_loss_is_close_to_float32():
    model, x = model_and_batch()
    y = x.roll(-1, dims=1)
    with torch.no_grad():
        full = model(x, y)
        with mixed_precision("cpu"):
            mixed = model(x, y)
        h = model.final_norm(model.forward_blocks(model.embed_tokens(x)))
    assert mixed.dtype == torch.float32 and math.isfinite(mixed.item())
    assert mixed.item() != full.item()  # autocast really ran the matmuls in bf16
    # The loss is a mean of lse - l_y: it moves by at most 2 max |Δ logit|. Under autocast every
    # matmul rounds its two inputs and its output to bf16 (U_BF16 each); along the path to a logit
    # that is 3 for the head and 4 per residual branch (input, weights, inner activation, output),
    # attention and MLP in each layer: 3 + 8 n_layer roundings, each relative to the logit's scale
    # Σ|h_i w_i| (the float32 model's, as `_tolerances.logit_atol` takes it).
    scale = (h.abs() @ model.embed.weight.abs().T).amax().item()
    tol = 2 * (3 + 8 * CFG.n_layer) * U_BF16 * scale
    assert abs(mixed.item() - full.item()) <= tol


class GramSpy(GramProbe):
    """A GramProbe that records the dtype of what it accumulated, just before the eigenvalues."""

    def _spectral_rows(self):
        self.dtypes = {k: (g.dtype, self._sum[k].dtype) for k, g in self._gram.items()}
        return super()._spectral_rows()


@bf16_warning
def test_probe_under_bf16_autocast_accumulates_float64_and_matches_float32():
    model, x = model_and_batch(seed=3)
    probe = GramSpy(model, gpt_sites(SITES), AttentionStats(*gpt_sites(["q", "k"])), gpt_gains(model))
    with torch.no_grad():
        full = table(probe.measure([x]))
        full_acts = capture(model, x, SITES)
        with mixed_precision("cpu"):
            mixed = table(probe.measure([x]))
            acts = capture(model, x, SITES)  # what the hooks saw: the same forward, bitwise
    assert acts[("q", 0)].dtype == torch.bfloat16  # the hooks really received bf16 activations
    assert set(probe.dtypes.values()) == {(torch.float64, torch.float64)}
    assert full.keys() == mixed.keys()

    for (site, layer), a in acts.items():
        per_head = a.float().flatten(0, 1).transpose(0, 1)  # (heads, N, E): bf16 values, exact in float32
        d = per_head.double()
        ref = metrics_from_gram(d.mT @ d, d.sum(-2), d.shape[-2])
        # (1) against float64 metrics of the very bf16 activations the hooks read: products of bf16
        # values are exact in float32, so only the probe's float32 sums round (`gram_rtol`). A Gram
        # in bf16 would be off by U_BF16 = 4e-3 of its entries, far beyond this.
        rtol = gram_rtol([per_head])
        stable = r90_is_stable([per_head])
        for m in METRICS:
            for head in range(per_head.shape[0]):
                got, want = mixed[(site, layer, head, m)], ref[m][head].item()
                if m == "r90":
                    assert not stable or got == want, (site, layer, head)
                else:
                    assert got == pytest.approx(want, rel=rtol), (site, layer, head, m)
        # (2) against the float32 run: the activations moved by eps of their Frobenius norm F (measured
        # per head); pr_sv then by `perturbed_pr_rtol`. stable_rank = F² / s_max²: F moves by at most
        # eps F, s_max by eps F <= eps sqrt(E) s_max (Weyl), so the ratio by at most
        # (1 + eps)² / (1 - eps sqrt(E))² - 1, about 2 (1 + sqrt(E)) eps. Both runs also round their
        # Grams: `gram_rtol` each.
        f32 = full_acts[(site, layer)].flatten(0, 1).transpose(0, 1).double()
        eps = ((d - f32).norm(dim=(-2, -1)) / f32.norm(dim=(-2, -1))).max().item()
        e = per_head.shape[-1]
        grams = gram_rtol([per_head]) + gram_rtol([f32])
        pr = perturbed_pr_rtol(e, eps) + grams
        sr = (1 + eps) ** 2 / (1 - eps * math.sqrt(e)) ** 2 - 1 + grams
        for head in range(per_head.shape[0]):
            key = (site, layer, head)
            assert mixed[(*key, "pr_sv")] == pytest.approx(full[(*key, "pr_sv")], rel=pr), key
            assert mixed[(*key, "stable_rank")] == pytest.approx(full[(*key, "stable_rank")], rel=sr), key

    # the attention statistics: float32 logits from the bf16 q and k, not a bf16 matmul
    for layer in range(CFG.n_layer):
        q = acts[("q", layer)].float().transpose(1, 2)  # (B, H, T, E)
        k = acts[("k", layer)].float().transpose(1, 2).repeat_interleave(2, dim=1)
        scale = 1 / math.sqrt(CFG.head_dim)
        T = q.shape[2]
        logits = (q @ k.mT * scale).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        atol = logit_atol(q, k, scale)  # two float32 sums of E products in other orders
        for h in range(CFG.n_head):
            assert abs(mixed[("attn", layer, h, "max_logit")] - logits[:, h].amax().item()) <= atol


@bf16_warning
def test_qk_clip_max_logits_are_float32_under_autocast():
    """Training forwards track each head's largest logit for QK-Clip; under autocast the logits'
    matmul would run in bf16 unless the tracking turns autocast off, as it does."""
    model, x = model_and_batch(seed=4)
    model.train()
    for b in model.blocks:
        b.attn.track_max_logit = True
    with torch.no_grad(), mixed_precision("cpu"):
        taps = capture(model, x, ["q", "k"])
    assert taps[("q", 0)].dtype == torch.bfloat16
    for i, b in enumerate(model.blocks):
        # the same function on the same bf16 q and k, outside autocast: float32 logits, bitwise
        assert torch.equal(b.attn.max_logit, causal_max_logit(taps[("q", i)], taps[("k", i)]))
    tau = float(model.blocks[0].attn.max_logit.median())
    expected = sum(int((b.attn.max_logit > tau).sum()) for b in model.blocks)
    clipped = qk_clip(model, tau)
    assert isinstance(clipped, torch.Tensor) and clipped.item() == expected >= 1  # counted on the device
    assert all(torch.equal(b.attn.max_logit, torch.zeros(CFG.n_head)) for b in model.blocks)


# --- torch.compile --------------------------------------------------------------------------------


def test_compiled_training_steps_match_eager_and_the_probe_causes_no_recompile(tmp_path, monkeypatch):
    """train.compile=on: the training step runs through torch.compile (inductor), while evaluations
    and probe hooks use the eager model between steps; a recompile (a guard the hooks broke) fails."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    data = shards(tmp_path)
    settings = {"train.tokens": 2 * 128, "train.eval_every": 128, "probe.downstream": False}
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    rows, graphs = {}, {}
    for mode in ("off", "on"):
        train(config(data, **settings, **{"train.compile": mode}), tmp_path / mode, progress=False)
        rows[mode] = store.read_table(tmp_path / mode / "scalars.csv").set_index("step")
        graphs[mode] = counters["stats"]["unique_graphs"]
    assert graphs == {"off": 0, "on": 1}  # compiled, and into one graph: no graph break in the step
    eager, compiled = rows["off"], rows["on"]
    assert list(compiled.index) == [0, 1, 2]
    assert compiled.loc[0, "val_loss"] == eager.loc[0, "val_loss"]  # both eager, before any step
    # Step 1's train_loss is the first compiled forward: the same weights and batch, float32 sums
    # in other orders (inductor fuses them). Five stages in series (two blocks' attention and MLP,
    # the head), each summing at most 256 terms (the vocabulary's logsumexp): round-off of random
    # sign, about 2 sqrt(256) U32 each.
    first = 5 * 2 * math.sqrt(256) * U32
    assert compiled.loc[1, "train_loss"] == pytest.approx(eager.loc[1, "train_loss"], rel=first)
    # After a step the weights differ by the gradients' round-off carried through Muon's bf16
    # Polar Express: a flipped rounding, 8.16 U_BF16 at most (test_distributed's EPS["muon"]), and a
    # loss moves by about as much relative
    for step in (1, 2):
        assert compiled.loc[step, "val_loss"] == pytest.approx(eager.loc[step, "val_loss"], rel=8.16 * U_BF16)
    assert compiled.loc[2, "train_loss"] == pytest.approx(eager.loc[2, "train_loss"], rel=8.16 * U_BF16)
    torch._dynamo.reset()
