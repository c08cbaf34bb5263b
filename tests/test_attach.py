"""Finding attention sites in foreign models: every value equals a direct computation from the
model's own internals, and measuring never changes the model."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import transformers
from _hf import FAMILIES, V, hf_model, set_attention
from _tolerances import U32, entropy_tol, gram_rtol, logit_atol, perturbed_pr_rtol, r90_is_stable, rope_eps
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from rankscope.attach import Probe, detect, token_batches
from rankscope.core.model import GPT, ModelConfig
from rankscope.errors import RankscopeError
from rankscope.measure.metrics import metrics_from_gram, participation_ratio
from rankscope.measure.probe import AttentionStats, gpt_probe
from rankscope.measure.sites import Site
from rankscope.settings.vocab import METRICS, PROBE_SITES

X = torch.randint(0, V, (3, 20), generator=torch.Generator().manual_seed(1))

# --- a reference path: the exact q and k each attention layer hands to its attention function ----

CAPTURED: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _capture(module, query, key, value, attention_mask, **kwargs):
    CAPTURED[module.layer_idx] = (query.detach().clone(), key.detach().clone())  # (B, heads, T, E)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("rankscope_reference", _capture)
AttentionMaskInterface.register("rankscope_reference", sdpa_mask)  # the masks sdpa gets (sliding windows too)


def reference_qk(model: nn.Module, x: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    CAPTURED.clear()
    before = model.config._attn_implementation
    set_attention(model, "rankscope_reference")
    try:
        with torch.no_grad():
            model(x)
    finally:
        set_attention(model, before)
    return dict(CAPTURED)


def per_head(a: torch.Tensor) -> torch.Tensor:
    """(B, heads, T, E) -> (heads, B*T, E): one activation matrix per head."""
    return a.transpose(0, 1).flatten(1, 2)


def rows(df: pd.DataFrame, site: str, metric: str, layer: int) -> np.ndarray:
    sel = df[(df.site == site) & (df.metric == metric) & (df.layer == layer)].sort_values("head")
    return sel["value"].to_numpy()


def all_metrics(x: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.double()
    return metrics_from_gram(x.mT @ x, x.sum(-2), x.shape[-2])


@pytest.mark.parametrize("family", FAMILIES)
def test_post_rope_keys_and_queries_equal_what_the_attention_function_receives(family):
    model = hf_model(family)
    df = Probe(model, ["q", "k"], attention=False).measure(X)
    ref = reference_qk(model, X)
    assert sorted(ref) == [0, 1]
    for layer, (q, k) in ref.items():
        for site, act in (("k", k), ("q", q)):
            expected = all_metrics(per_head(act))
            assert len(rows(df, site, "pr_sv", layer)) == act.shape[1]  # kv heads for keys (GQA)
            # the probe rebuilds the very same q and k with the model's own functions (bitwise), but
            # sums their Grams in float32 against this float64 reference: `gram_rtol`. r90 is a count:
            # equal, as long as no share lies within round-off of 90%
            rtol = gram_rtol([per_head(act)])
            assert r90_is_stable([per_head(act)])
            for m in METRICS:
                np.testing.assert_allclose(
                    rows(df, site, m, layer),
                    expected[m].numpy(),
                    rtol=0 if m == "r90" else rtol,
                    atol=0,
                    err_msg=f"{family} {site} {m} layer {layer}",
                )


def _rope_by_hand(x: torch.Tensor, theta: float, rotary_dims: int) -> torch.Tensor:
    """x (B, heads, T, E); the rotate-half RoPE of Hugging Face's Llama, on the first rotary_dims."""
    T = x.shape[2]
    inv = 1.0 / theta ** (torch.arange(0, rotary_dims, 2, dtype=torch.float64) / rotary_dims)
    ang = torch.outer(torch.arange(T, dtype=torch.float64), inv)
    cos, sin = torch.cat([ang, ang], -1).cos().float(), torch.cat([ang, ang], -1).sin().float()
    r, rest = x[..., :rotary_dims], x[..., rotary_dims:]
    r1, r2 = r.chunk(2, dim=-1)
    turned = r * cos + torch.cat([-r2, r1], -1) * sin
    return torch.cat([turned, rest], -1)


def _attention_inputs(model: nn.Module, attn_modules: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """The hidden states each attention layer receives (its input, after the pre-attention norm)."""
    got, handles = [], []
    for m in attn_modules:
        handles.append(
            m.register_forward_pre_hook(
                lambda mod, args, kwargs: got.append((args[0] if args else kwargs["hidden_states"]).detach()),
                with_kwargs=True,
            )
        )
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return got


def test_qwen3_keys_rebuilt_by_hand_from_weights_norm_and_rope():
    """k = RoPE(k_norm(k_proj(h))) from the layer's weights, RMSNorm and RoPE written out by hand."""
    model = hf_model("qwen3")
    cfg = model.config
    E, G = cfg.head_dim, cfg.num_key_value_heads
    df = Probe(model, ["k_pre", "k", "q_pre"], attention=False).measure(X)
    attns = [layer.self_attn for layer in model.model.layers]
    for layer, (attn, h) in enumerate(zip(attns, _attention_inputs(model, attns, X))):
        with torch.no_grad():
            k = (h @ attn.k_proj.weight.T).view(*h.shape[:2], G, E)  # (B, T, G, E); no bias in Qwen3
            k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * attn.k_norm.weight
            k_rot = _rope_by_hand(k.transpose(1, 2), 500.0, E)  # (B, G, T, E)
        # the projection and the norm by hand are the model's own float32 ops (bitwise equal keys), so
        # k_pre differs only in the Gram's precision (`gram_rtol`); the rotated keys also differ by the
        # model's float32 RoPE angles (`rope_eps`), which moves pr_sv by `perturbed_pr_rtol`
        k_pre = per_head(k.transpose(1, 2))
        np.testing.assert_allclose(
            rows(df, "k_pre", "pr_sv", layer), participation_ratio(k_pre).numpy(), rtol=gram_rtol([k_pre])
        )
        rtol = gram_rtol([per_head(k_rot)]) + perturbed_pr_rtol(E, rope_eps(X.shape[1]))
        np.testing.assert_allclose(
            rows(df, "k", "pr_sv", layer), participation_ratio(per_head(k_rot)).numpy(), rtol=rtol
        )
    # the norm matters: without it the pre-RoPE keys would differ
    assert not np.allclose(rows(df, "k_pre", "pr_sv", 0), rows(df, "q_pre", "pr_sv", 0)[:G])


def test_gpt_neox_partial_rotary_by_hand():
    model = hf_model("gpt_neox")
    H, E = 4, 16
    r = int(E * 0.25)
    df = Probe(model, ["k", "k_pre", "v"], attention=False).measure(X)
    attns = [layer.attention for layer in model.gpt_neox.layers]
    for layer, (attn, h) in enumerate(zip(attns, _attention_inputs(model, attns, X))):
        with torch.no_grad():
            qkv = attn.query_key_value(h).view(*h.shape[:2], H, 3 * E)  # per head [q | k | v]
            k, v = qkv[..., E : 2 * E].transpose(1, 2), qkv[..., 2 * E :].transpose(1, 2)  # (B, H, T, E)
        for site, act in (("k_pre", k), ("k", _rope_by_hand(k, 10000.0, r)), ("v", v)):
            # k_pre and v are slices of the model's own projection output: only the Gram's precision
            # differs (`gram_rtol`); the keys rotated by hand also differ by the model's float32 angles
            rtol = gram_rtol([per_head(act)]) + (perturbed_pr_rtol(E, rope_eps(X.shape[1])) if site == "k" else 0)
            np.testing.assert_allclose(
                rows(df, site, "pr_sv", layer), participation_ratio(per_head(act)).numpy(), rtol=rtol, err_msg=site
            )
    assert "partial RoPE (4 of 16 dims)" in detect(model).describe()


def test_gpt2_keys_have_no_rope_and_values_and_outputs_match_hand_splits():
    model = hf_model("gpt2")
    df = Probe(model, list(PROBE_SITES), attention=False).measure(X)
    assert np.array_equal(rows(df, "k", "pr_sv", 1), rows(df, "k_pre", "pr_sv", 1))
    attns = [b.attn for b in model.transformer.h]
    outs, handles = [], [a.c_proj.register_forward_pre_hook(lambda m, a: outs.append(a[0].detach())) for a in attns]
    hs = _attention_inputs(model, attns, X)
    for h in handles:
        h.remove()
    for layer, (attn, h) in enumerate(zip(attns, hs)):
        with torch.no_grad():
            q, k, v = (h @ attn.c_attn.weight + attn.c_attn.bias).split(64, dim=-1)  # Conv1D: x W + b
        for site, act in (("q", q), ("k", k), ("v", v), ("o", outs[layer])):
            heads = act.view(*act.shape[:2], 4, 16).transpose(1, 2)
            # o is c_proj's own input; x W + b the products of Conv1D's addmm, which may add the bias
            # in another rounding (about 2 u of |x W| + |b| per element, say 4 u of the activations:
            # `perturbed_pr_rtol`); beyond that only the Gram's precision differs (`gram_rtol`)
            rtol = gram_rtol([per_head(heads)]) + (perturbed_pr_rtol(16, 4 * U32) if site != "o" else 0)
            np.testing.assert_allclose(
                rows(df, site, "pr_sv", layer), participation_ratio(per_head(heads)).numpy(), rtol=rtol, err_msg=site
            )


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2", "gpt_neox"])
def test_attention_entropy_and_max_logit_equal_the_models_own_attention(family):
    """Against the eager attention's own probabilities (Mistral's: under its sliding window) and the
    largest masked logit q·k·scale from the reference q and k."""
    model = hf_model(family)
    df = Probe(model, ["k"]).measure(X)
    ref = reference_qk(model, X)
    set_attention(model, "eager")
    with torch.no_grad():
        probs = model(X, output_attentions=True).attentions
    T = X.shape[1]
    window = getattr(model.config, "sliding_window", None) if family == "mistral" else None
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    hidden = (j > i) | ((i - j >= window) if window else torch.zeros(T, T, dtype=torch.bool))
    for layer, p in enumerate(probs):
        ent = -(p * p.clamp_min(1e-30).log()).sum(-1).mean((0, 2))
        q, k = ref[layer]
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        logits = (q @ k.mT) * (q.shape[-1] ** -0.5)
        mx = logits.masked_fill(hidden, float("-inf")).amax((0, 2, 3))
        # the probe's logits are float32 dot products of the same q and k, perhaps summed in another
        # order (`logit_atol`; so is the max over them); its entropy moves by at most 2 log T times that,
        # plus the two sides' own rounding of softmax and entropy sums over T keys and B x T rows
        dlogit = logit_atol(q, k, q.shape[-1] ** -0.5)
        rtol, atol = entropy_tol(T, X.shape[0] * T, dlogit)
        np.testing.assert_allclose(rows(df, "attn", "entropy", layer), ent.numpy(), rtol=rtol, atol=atol)
        np.testing.assert_allclose(rows(df, "attn", "max_logit", layer), mx.numpy(), rtol=0, atol=dlogit)


def test_qwen3_gains_are_reported_per_layer():
    model = hf_model("qwen3")
    df = Probe(model).measure(X)
    w = model.model.layers[1].self_attn.k_norm.weight.detach().double()
    got = df[(df.site == "k_gain") & (df.layer == 1) & (df.metric == "gain_mean")]
    assert got["head"].tolist() == [-1]
    assert got["value"].item() == pytest.approx(w.mean().item())


@pytest.mark.parametrize("family", FAMILIES)
def test_measuring_never_changes_the_model(family):
    model = hf_model(family)
    model.train()  # modes must come back as they were, dropout or not
    model.get_output_embeddings().eval()  # ...each module's own
    modes = {n: m.training for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        before = model(X).logits
    for n, m in model.named_modules():
        m.training = modes[n]
    during = []

    def forward(x):  # the model's logits while every hook of every site is attached
        during.append(model(input_ids=x, use_cache=False).logits)

    rng = torch.get_rng_state()
    Probe(model, list(PROBE_SITES), forward=forward).measure(X)
    assert torch.equal(torch.get_rng_state(), rng)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(not (m._forward_hooks or m._forward_pre_hooks) for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    model.eval()
    with torch.no_grad():
        after = model(X).logits
    assert torch.equal(before, during[0]) and torch.equal(before, after)


def test_rankscope_gpt_is_found_and_agrees_with_gpt_probe():
    cfg = ModelConfig(vocab_size=61, n_layer=3, d_model=32, n_head=4, n_kv_head=2, head_dim=8, d_mlp=64, max_seq_len=32)
    model = GPT(cfg).eval()
    x = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(0))
    df = Probe(model, ["k", "q", "v"]).measure(x)
    expected = pd.DataFrame(gpt_probe(model, ["k", "q", "v"]).measure([x]))
    key = ["site", "layer", "head", "metric"]
    merged = df.merge(expected, on=key, suffixes=("", "_ref"))
    assert len(merged) == len(df) == len(expected)
    # the same sites, hooks and arithmetic (Probe wraps a GramProbe on the same taps): bitwise equal
    np.testing.assert_array_equal(merged["value"], merged["value_ref"])
    assert detect(model).describe().startswith("rankscope-gpt: 3 layers, 4 query heads, 2 key/value heads (GQA)")


def test_a_wrapped_model_is_found_inside_its_wrapper():
    """Lightning modules, DDP and friends hold the language model as a submodule."""
    inner = hf_model("llama")

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = inner

        def forward(self, batch):  # not a token-ids forward: the probe must not call it
            raise AssertionError("the probe called the wrapper's forward")

    direct = Probe(inner, ["k", "v"]).measure(X)
    wrapped = Probe(Wrapper(), ["k", "v"]).measure(X)
    pd.testing.assert_frame_equal(direct, wrapped)


# TransformerLens 3 deprecates HookedTransformer in favour of TransformerBridge (4.0 removes it)
lens_deprecation = pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")


@lens_deprecation
def test_transformer_lens_hooked_transformer():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=64,
        n_ctx=32,
        d_head=16,
        n_heads=4,
        n_key_value_heads=2,
        d_vocab=V,
        act_fn="gelu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        use_qk_norm=True,
        seed=0,
    )
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for b in model.blocks:
            b.attn.k_norm.w.uniform_(0.2, 2.0)
    df = Probe(model, list(PROBE_SITES)).measure(X)
    _, cache = model.run_with_cache(X)
    for layer in range(2):
        a = lambda name, layer=layer: cache[f"blocks.{layer}.attn.{name}"].transpose(1, 2)  # noqa: E731  (B, heads, T, E)
        k_pre = cache[f"blocks.{layer}.attn.hook_k"]
        gain = model.blocks[layer].attn.k_norm.w
        with torch.no_grad():
            k_pre = k_pre * torch.rsqrt(k_pre.pow(2).mean(-1, keepdim=True) + cfg.eps) * gain
        for site, act in (
            ("k", a("hook_rot_k")),
            ("q", a("hook_rot_q")),
            ("v", a("hook_v")),
            ("o", a("hook_z")),
            ("k_pre", k_pre.transpose(1, 2)),
        ):
            # the probe reads these very hooks, so only the Grams' precision differs (`gram_rtol`); k_pre by
            # hand takes rsqrt and a product where TransformerLens takes sqrt and a division: within
            # about 4 u of each other per element, which moves pr_sv by `perturbed_pr_rtol`
            rtol = gram_rtol([per_head(act)]) + (perturbed_pr_rtol(cfg.d_head, 4 * U32) if site == "k_pre" else 0)
            np.testing.assert_allclose(
                rows(df, site, "pr_sv", layer), participation_ratio(per_head(act)).numpy(), rtol=rtol, err_msg=site
            )
        p = cache[f"blocks.{layer}.attn.hook_pattern"]
        ent = -(p * p.clamp_min(1e-30).log()).sum(-1).mean((0, 2))
        # attention scores from the same rotated q and k, as float32 dot products perhaps summed in
        # another order, scaled by 1 / attn_scale here and divided by it there (`logit_atol`); the
        # entropy moves by at most 2 log T times that, plus each side's rounding (`entropy_tol`)
        q = a("hook_rot_q")
        k = a("hook_rot_k").repeat_interleave(2, dim=1)  # GQA: 4 query heads read 2 key heads
        dlogit = logit_atol(q, k, 1.0 / float(model.blocks[layer].attn.attn_scale))
        rtol, atol = entropy_tol(X.shape[1], X.numel(), dlogit)
        np.testing.assert_allclose(rows(df, "attn", "entropy", layer), ent.numpy(), rtol=rtol, atol=atol)
        mx = cache[f"blocks.{layer}.attn.hook_attn_scores"].amax((0, 2, 3))  # masked entries are -inf
        np.testing.assert_allclose(rows(df, "attn", "max_logit", layer), mx.numpy(), rtol=0, atol=dlogit)
    assert len(rows(df, "k", "pr_sv", 0)) == 2  # key/value heads
    assert df[df.site == "k_gain"]["layer"].tolist() == [0, 0, 0, 1, 1, 1]


@lens_deprecation
def test_transformer_lens_without_rotary_reads_q_and_k_before_any_rotation():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=1, d_model=32, n_ctx=32, d_head=8, n_heads=4, d_vocab=V, act_fn="relu", seed=0
    )
    df = Probe(HookedTransformer(cfg), ["k", "k_pre", "q", "q_pre"]).measure(X)
    np.testing.assert_array_equal(rows(df, "k", "pr_sv", 0), rows(df, "k_pre", "pr_sv", 0))
    assert detect(HookedTransformer(cfg)).rotary == "none"


class TinyAttention(nn.Module):
    """A model rankscope does not know: fused heads in a module of its own."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, 16)
        self.layers = nn.ModuleList(nn.ModuleDict({"k": nn.Linear(16, 16), "mix": nn.Linear(16, 16)}) for _ in range(2))

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = h + layer["mix"](torch.tanh(layer["k"](h)))
        return h


def test_unknown_models_take_explicit_sites_and_names_fail_clearly():
    model = TinyAttention()
    with pytest.raises(RankscopeError, match="does not recognise the attention layers of TinyAttention"):
        Probe(model)
    df = Probe(model, [Site("keys", "layers.*.k", "BTC", head_dim=8)]).measure(X)
    captured = []
    h = model.layers[1]["k"].register_forward_hook(lambda m, a, o: captured.append(o.detach()))
    with torch.no_grad():
        model(X)
    h.remove()
    keys = per_head(captured[0].unflatten(-1, (2, 8)).transpose(1, 2))
    # the very tensor the probe read; only the Gram's precision differs (float32 there, float64 here)
    np.testing.assert_allclose(rows(df, "keys", "pr_sv", 1), participation_ratio(keys).numpy(), rtol=gram_rtol([keys]))
    assert set(df.site) == {"keys"}
    with pytest.raises(RankscopeError, match="no module matches"):
        Probe(model, [Site("keys", "layers.*.nothing")])
    with pytest.raises(RankscopeError, match="unknown site 'key'"):
        Probe(hf_model("llama"), ["key"])


def test_explicit_attention_stats_for_an_unknown_model():
    model = TinyAttention()
    q = Site("q", "layers.*.k", "BTC", head_dim=8)
    k = Site("k", "layers.*.mix", "BTC", head_dim=8, read="input")  # the same tensor, read as an input
    df = Probe(model, [], attention=AttentionStats(q, k, scale=0.5)).measure(X)
    ent = df[(df.metric == "entropy")]
    assert len(ent) == 4 and (ent["value"] > 0).all() and (ent["value"] < math.log(20)).all()


def test_text_and_tokenizer_give_the_same_rows_as_their_token_batch():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    docs = ["def probe(model):\n    return model\n" * 10, "keys lose dimensions faster " * 20]
    # the alphabet is the characters of the text itself (a few dozen), so every id fits the model's V
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=V, special_tokens=["<|endoftext|>"]))
    assert tok.get_vocab_size() <= V
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    model = hf_model("qwen2")
    probe = Probe(model)
    for t in (tok, fast):
        ids = token_batches(docs, t, seq_len=16, batch_size=3)
        assert ids.shape == (3, 16) and int(ids.max()) < V
        from_text = probe.measure(text=docs, tokenizer=t, seq_len=16, batch_size=3)
        pd.testing.assert_frame_equal(from_text, probe.measure(ids))
    with pytest.raises(RankscopeError, match="fewer than seq_len"):
        probe.measure(text="short", tokenizer=tok, seq_len=64)
    with pytest.raises(RankscopeError, match="tokenizer"):
        probe.measure(text=docs)


def test_result_is_a_tidy_frame():
    df = Probe(hf_model("llama"), ["k", "v"]).measure([X[:1], X[1:]])
    assert list(df.columns) == ["layer", "head", "site", "metric", "value"]
    assert df.dtypes["layer"] == "int64" and df.dtypes["value"] == "float64"
    assert set(df.site) == {"k", "v", "attn"}
    assert not df.duplicated(["layer", "head", "site", "metric"]).any()
