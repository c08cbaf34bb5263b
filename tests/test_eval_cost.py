"""What evaluation costs on a GPU, checked on the CPU: no whole (batch x seq x vocab) logits in any
evaluation (the seed-1.5b evaluation batch would need about 32 GB for them), no LM head in probe
forwards, and every small eigen/singular-value problem of a measurement decomposed on the host
after one device-to-host copy (`metrics.eigh_batched`), agreeing with the decomposition where the
matrices live."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _tolerances import U32
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import rankscope.core.model as model_mod
import rankscope.measure.metrics as metrics
import rankscope.measure.weight_spectra as spectra
from rankscope.core.model import GPT, ModelConfig, mixed_precision
from rankscope.measure.functional_rank import functional_rank
from rankscope.measure.headroom import kv_headroom
from rankscope.measure.icl import loss_and_icl
from rankscope.measure.induction import gpt_induction_scores, induction_batch
from rankscope.measure.metrics import eigh_batched
from rankscope.measure.probe import GramProbe, gpt_probe
from rankscope.measure.sites import gpt_sites
from rankscope.measure.weight_spectra import weight_spectra

CFG = ModelConfig(vocab_size=61, n_layer=2, d_model=32, n_head=4, n_kv_head=2, head_dim=8, d_mlp=64, max_seq_len=64)
B, T, CHUNK = 3, 40, 16  # 120 token rows; evaluations are made to chunk them by 16


def gpt(seed: int = 0) -> GPT:
    model = GPT(CFG).eval()
    model.reset_parameters(seed)
    return model


def batches(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [tuple(torch.randint(0, CFG.vocab_size, (B, T), generator=g) for _ in range(2)) for _ in range(n)]


class LogitRows(TorchDispatchMode):
    """The most rows of vocabulary-wide floating tensors any operation produced."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.ndim and t.shape[-1] == self.vocab:
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 rows on every device, so that 120 rows of logits at once would show."""
    monkeypatch.setattr(model_mod, "_CE_ROWS", CHUNK)
    monkeypatch.setattr(model_mod, "_CE_DEVICE_ELEMS", CHUNK * CFG.vocab_size)


def direct_losses(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token float32 cross-entropy from the whole logits, as evaluations computed it before."""
    return F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten(), reduction="none").view(y.shape)


# --- no whole logits in evaluation ----------------------------------------------------------------


def test_evaluations_never_hold_whole_logits_and_equal_the_full_computation(small_chunks):
    model, val = gpt(), batches()
    half = T // 2
    ind_x = induction_batch(CFG.vocab_size, B, half, seed=0)
    with torch.no_grad():
        per_tok = torch.cat([direct_losses(model, x, y) for x, y in val])  # (2B, T)
        # positions L .. 2L-2 of the repeated batch predict L+1 .. 2L-1 (induction._induction_loss_from_logits)
        ind_ref = direct_losses(model, ind_x[:, :-1], ind_x[:, 1:])[:, half:].mean().item()
        mean_ref = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in val]
        spy = LogitRows(CFG.vocab_size)
        with spy:
            mean_loss = [model(x, y).item() for x, y in val]  # the trainer's mean_loss
            val_loss, icl = loss_and_icl(model, val)
            ind_loss, _ = gpt_induction_scores(model, half).measure_with_loss(ind_x)
            functional_rank(model, *val[0], ladder=[2, 8])
            kv_headroom(model, *val[0])
    assert spy.rows <= max(CHUNK, CFG.d_model)  # chunks, and the transposed embedding (D, V) itself
    # float32 sums of the same float32 terms in other orders: within T U32 of the loss (T terms a row)
    tol = T * U32
    assert mean_loss == pytest.approx(mean_ref, rel=tol)
    per_pos = per_tok.mean(0)
    assert val_loss == pytest.approx(per_pos.mean().item(), rel=tol)
    assert icl == pytest.approx((per_pos[-4:].mean() - per_pos[2:5].mean()).item(), abs=tol * per_pos.max().item())
    assert ind_loss == pytest.approx(ind_ref, rel=tol)


def test_the_mean_loss_is_chunked_on_every_device(small_chunks):
    """The head took the whole-logit cross-entropy off the CPU; the meta device stands for CUDA."""
    model = gpt().to("meta")
    x = torch.zeros(B, T, dtype=torch.long, device="meta")
    spy = LogitRows(CFG.vocab_size)
    with torch.no_grad(), spy:
        loss = model(x, x)
    assert loss.shape == () and spy.rows <= max(CHUNK, CFG.d_model)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_the_chunked_loss_under_bf16_autocast_equals_the_whole_logit_loss(small_chunks):
    """The GPU's evaluation: bf16 logits, cross-entropy in float32, whole or in chunks alike."""
    model, ((x, y), _) = gpt(), batches()
    with torch.no_grad(), mixed_precision("cpu"):
        h = model.trunk(x)
        chunked = model.head(h, y)
        logits = F.linear(model.final_norm(h), model.embed.weight)  # (B, T, V), bf16 as before
        whole = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    assert logits.dtype == torch.bfloat16 and chunked.dtype == torch.float32
    assert chunked.item() == pytest.approx(whole.item(), rel=T * U32)


# --- no LM head in probe forwards -----------------------------------------------------------------


def test_the_probe_forward_never_runs_the_lm_head(monkeypatch):
    model, ((x, _), _) = gpt(), batches()
    sites = ["q", "k", "k_pre", "v", "o"]
    plain = gpt_probe(model, sites)
    full = GramProbe(model, gpt_sites(sites), plain.attention, plain.gains, forward=model)
    want = full.measure([x])  # the same hooks on a forward that does run the head
    calls = []
    head = model.head
    monkeypatch.setattr(model, "head", lambda *a, **k: calls.append(1) or head(*a, **k))
    assert gpt_probe(model, sites).measure([x]) == want  # bitwise: the same activations
    assert calls == []
    model(x)
    assert calls == [1]  # the spy does see a head that runs


# --- one copy to the host for every small decomposition ------------------------------------------


@pytest.fixture
def copies(monkeypatch):
    """Count the device-to-host copies `metrics.to_host` makes, wherever it is called from."""
    seen = []
    real = metrics.to_host

    def spy(*tensors):
        seen.append(len(tensors))
        return real(*tensors)

    monkeypatch.setattr(metrics, "to_host", spy)
    monkeypatch.setattr(spectra, "to_host", spy)
    return seen


def by_key(rows):
    return {(r["layer"], r["head"], r["site"], r["metric"]): r["value"] for r in rows}


def test_weight_spectra_on_the_host_path_is_one_copy_and_matches_svdvals(copies):
    model = gpt(seed=2)
    with torch.no_grad():
        for b in model.blocks:  # a head with a spread spectrum, so s_max and PR mean something
            b.attn.k_proj.weight[:8] *= torch.linspace(0.1, 3.0, 8)[:, None]
    device = by_key(weight_spectra(model, path="device"))
    host = by_key(weight_spectra(model, path="host"))
    assert copies == [1] and device.keys() == host.keys()
    # from the Gram's eigenvalues: each within E eps λ_max, so s within about E eps s_max² / s
    for key, v in device.items():
        assert host[key] == pytest.approx(v, rel=1e-10), key
    with pytest.raises(ValueError, match="path"):
        weight_spectra(model, path="gpu")


def test_functional_rank_and_kv_headroom_take_one_copy_on_the_host_path(copies):
    model, ((x, y), _) = gpt(seed=3), batches()
    with torch.no_grad():
        fr_device = by_key(functional_rank(model, x, y))
        fr_host = by_key(functional_rank(model, x, y, eig_path="host"))
        assert copies == [CFG.n_layer * 2]  # every layer's k and q Grams, in one copy
        kv_device = by_key(kv_headroom(model, x, y))
        kv_host = by_key(kv_headroom(model, x, y, eig_path="host"))
        assert copies == [CFG.n_layer * 2] * 2
    # the same Grams, eigenvectors from LAPACK with one thread instead of torch's: projections
    # within a few eps, losses within round-off, so the same ranks
    for got, want in ((fr_host, fr_device), (kv_host, kv_device)):
        assert got.keys() == want.keys()
        for key, v in want.items():
            assert got[key] == pytest.approx(v, rel=1e-4, abs=1e-6), key


def test_eigh_batched_on_the_host_path_matches_eigh_per_batch():
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(n, 30, 6, generator=g, dtype=torch.float64) for n in (3, 5)]
    mats = [x.mT @ x for x in xs]
    mats[1] = mats[1].view(5, 1, 6, 6)  # any batch shape comes back as it went in
    device = eigh_batched(mats)
    host = eigh_batched(mats, path="host", workers=2)
    for d, h, m in zip(device, host, mats):
        assert h.eigenvalues.shape == m.shape[:-1] and h.eigenvectors.shape == m.shape
        ref = torch.linalg.eigh(m)
        assert torch.equal(d.eigenvalues, ref.eigenvalues)  # the device path is the plain call
        tol = 6 * 4 * torch.finfo(torch.float64).eps * ref.eigenvalues[..., -1:]
        assert ((h.eigenvalues - ref.eigenvalues).abs() <= tol).all()
        # eigenvectors up to sign: compare the reconstruction V diag(λ) Vᵀ with the matrix
        back = h.eigenvectors @ torch.diag_embed(h.eigenvalues) @ h.eigenvectors.mT
        assert torch.allclose(back, m, rtol=0, atol=1e-12 * m.abs().max().item())
    assert eigh_batched([]) == []
    with pytest.raises(ValueError, match="one size"):
        eigh_batched([mats[0], torch.eye(3, dtype=torch.float64)])


def test_on_the_cpu_the_default_path_is_the_plain_call(copies):
    """The CPU's numbers are unchanged: no copy, torch.linalg.eigh / svdvals where the matrices are."""
    model, ((x, y), _) = gpt(seed=5), batches()
    with torch.no_grad():
        functional_rank(model, x, y, ladder=[4, 8])
        kv_headroom(model, x, y)
        weight_spectra(model)
    assert copies == []
