"""KV-cache headroom of any model the probe attaches to (`headroom.model_kv_headroom`): on
rankscope's GPT the same rows as the layer-restarting search, in every Hugging Face layout a
planted rank-3 head kept exactly at rank 3 and not at rank 2, post-RoPE projections equal to
projecting the keys the attention function receives, and `rankscope analyze` of a Hugging Face
folder writing the table and figure."""

from __future__ import annotations

import pytest
import torch
import transformers
from _headroom import batch, rank3_model, table
from _hf import FAMILIES, SMALL, V, hf_model, set_attention
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from rankscope.attach import detect
from rankscope.attach.headroom import kv_sites, model_kv_headroom
from rankscope.errors import RankscopeError
from rankscope.measure.headroom import kv_headroom

IDS = torch.randint(0, V, (4, 33), generator=torch.Generator().manual_seed(2))
X, Y = IDS[:, :-1], IDS[:, 1:]


@pytest.mark.parametrize("tol", [0.01, 1e-4])
def test_the_whole_model_search_gives_the_layer_restarting_rows_on_rankscope_gpt(tol):
    model = rank3_model()
    x, y = batch()
    fast = table(kv_headroom(model, x, y, tol=tol))
    whole = table(model_kv_headroom(model, x, y, tol=tol))
    assert fast.keys() == whole.keys()
    for key, v in fast.items():
        assert whole[key] == pytest.approx(v, abs=1e-6), key  # the same ranks; dloss to float round-off
    assert fast[("k_pre", 1, 0, "kv_rank")] <= 4


def plant_rank3(model: torch.nn.Module, family: str, layer: int = 1, g: int = 0) -> None:
    """Make kv head g of `layer` compute its keys (before QK-Norm and RoPE) through a rank-3 map with
    no bias: its k_pre keys span 3 dimensions (a per-head QK-Norm maps that span onto another one)."""
    att = detect(model)
    E, D = att.head_dim, att.n_head * att.head_dim
    gen = torch.Generator().manual_seed(5)

    def low_rank(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, 3, generator=gen) @ torch.randn(3, cols, generator=gen) * 0.5

    with torch.no_grad():
        if family == "gpt2":  # Conv1D: x @ W (D, 3D) + b, keys in columns D + g E ...
            a = model.transformer.h[layer].attn.c_attn
            cols = slice(D + g * E, D + (g + 1) * E)
            a.weight[:, cols], a.bias[cols] = low_rank(a.weight.shape[0], E), 0.0
            return
        if family == "gpt_neox":  # head-interleaved: rows of head g are [q | k | v]
            a = model.gpt_neox.layers[layer].attention.query_key_value
            rows = slice(g * 3 * E + E, g * 3 * E + 2 * E)
        else:
            a = model.model.layers[layer].self_attn.k_proj
            rows = slice(g * E, (g + 1) * E)
        a.weight[rows] = low_rank(E, a.weight.shape[1])
        if a.bias is not None:
            a.bias[rows] = 0.0


def layout_model(family: str) -> torch.nn.Module:
    """`_hf.hf_model`, and two more places a QK-Norm leaves the stored keys: Gemma 3
    normalises each head after moving heads before tokens, (B, G, T, E); OLMo 2 the whole projection."""
    torch.manual_seed(0)
    if family == "gemma3":
        cfg = transformers.Gemma3TextConfig(**SMALL, num_key_value_heads=2, head_dim=16, sliding_window=8)
        return transformers.Gemma3ForCausalLM(cfg).eval()
    if family == "olmo2":
        return transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**SMALL, num_key_value_heads=2)).eval()
    return hf_model(family)


@pytest.mark.parametrize("family", [*FAMILIES, "gemma3", "olmo2"])
def test_a_planted_rank_three_head_is_kept_exactly_at_rank_three_and_not_at_two(family):
    model = layout_model(family)
    plant_rank3(model, family)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    at = {}
    for r in (2, 3):  # tol 1: the search stops at the one rung r, and reports its dloss
        at[r] = table(model_kv_headroom(model, X, Y, tol=1.0, ladder=[r]))
    head = ("k_pre", 1, 0)
    assert at[3][(*head, "kv_rank")] == 3
    assert abs(at[3][(*head, "kv_dloss")]) < 1e-6  # the keys are unchanged to float round-off
    assert abs(at[2][(*head, "kv_dloss")]) > 1e-5  # one fewer changes the loss, 10x more than round-off
    assert at[3][(*head, "kv_r90")] <= 3
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# --- post-RoPE: the keys the attention function receives, projected there --------------------------------

EDIT: dict = {}


def _project_keys(module, query, key, value, attention_mask, **kwargs):
    """The model's sdpa attention, with kv head EDIT['g'] of layer EDIT['layer'] projected by EDIT['p']:
    `key` (B, kv heads, T, E) is exactly what the layer scores, after RoPE."""
    if module.layer_idx == EDIT.get("layer"):
        key = key.clone()
        key[:, EDIT["g"]] = key[:, EDIT["g"]] @ EDIT["p"]
    if EDIT.get("capture") is not None:
        EDIT["capture"][module.layer_idx] = key.detach().clone()
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("rankscope_kv_reference", _project_keys)
AttentionMaskInterface.register("rankscope_kv_reference", sdpa_mask)


def reference_loss(model: torch.nn.Module) -> float:
    with torch.no_grad():
        logits = model(input_ids=X).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), Y.flatten()).item()


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt_neox"])  # full RoPE; QK-Norm; partial RoPE
def test_post_rope_projections_equal_projecting_what_the_attention_function_receives(family):
    model = hf_model(family)
    got = table(model_kv_headroom(model, X, Y, sites=("k",), tol=1.0, ladder=[2]))
    before = model.config._attn_implementation
    set_attention(model, "rankscope_kv_reference")
    try:
        EDIT.clear()
        EDIT["capture"] = keys = {}
        full = reference_loss(model)
        for layer, k in keys.items():
            for g in range(k.shape[1]):
                a = k[:, g].flatten(0, 1).double()  # (B T, E) post-RoPE keys of kv head g
                v = torch.linalg.eigh(a.T @ a).eigenvectors[:, -2:]
                EDIT.clear()
                EDIT.update(layer=layer, g=g, p=(v @ v.T).float())
                want = (reference_loss(model) - full) / full
                assert got[("k", layer, g, "kv_dloss")] == pytest.approx(want, rel=1e-3, abs=2e-6)
    finally:
        EDIT.clear()
        set_attention(model, before)


def test_without_rope_the_scored_keys_are_the_stored_keys():
    model = hf_model("gpt2")
    t = table(model_kv_headroom(model, X, Y, tol=0.01))
    assert {k[0] for k in t} == {"k_pre", "k"}
    assert all(t[("k", *k[1:])] == v for k, v in t.items() if k[0] == "k_pre")


def test_models_without_a_head_or_a_site_are_refused_clearly():
    base = transformers.LlamaModel(hf_model("llama").config)  # no language-model head: no loss
    assert kv_sites(detect(base)) == ()
    with pytest.raises(RankscopeError, match="language-model head"):
        model_kv_headroom(base, X, Y)
    with pytest.raises(RankscopeError, match="'v'"):
        model_kv_headroom(hf_model("llama"), X, Y, sites=("v",))
