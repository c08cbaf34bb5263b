"""Tiny Hugging Face models and tokenizers, built from configs and trained on the spot (no download):
a randomly initialised model of each attention family the probe attaches to, switching a model's
attention function, and a small byte-level BPE."""

from __future__ import annotations

import torch
import transformers
from torch import nn

V = 100
SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    vocab_size=V,
    bos_token_id=0,
    eos_token_id=0,
)


def hf_model(family: str, seed: int = 0) -> nn.Module:
    """A randomly initialised tiny model of one family, built from its config (no download)."""
    torch.manual_seed(seed)
    if family == "llama":
        cfg = transformers.LlamaConfig(**SMALL, num_key_value_heads=2, rope_theta=500.0)
        m = transformers.LlamaForCausalLM(cfg)
    elif family == "mistral":  # a window shorter than the batch, so the window masks matter
        cfg = transformers.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=6)
        m = transformers.MistralForCausalLM(cfg)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**SMALL, num_key_value_heads=1)
        m = transformers.Qwen2ForCausalLM(cfg)
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=24, rope_theta=500.0)
        m = transformers.Qwen3ForCausalLM(cfg)
        with torch.no_grad():  # gains that are not all ones, so applying QK-Norm matters
            for layer in m.model.layers:
                layer.self_attn.q_norm.weight.uniform_(0.2, 2.0)
                layer.self_attn.k_norm.weight.uniform_(0.2, 2.0)
    elif family == "gpt2":
        cfg = transformers.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, vocab_size=V, n_positions=64, bos_token_id=0, eos_token_id=0
        )
        m = transformers.GPT2LMHeadModel(cfg)
    elif family == "gpt_neox":  # partial rotary: a quarter of each head turns
        cfg = transformers.GPTNeoXConfig(**SMALL, rotary_pct=0.25, max_position_embeddings=64)
        m = transformers.GPTNeoXForCausalLM(cfg)
    else:
        raise ValueError(family)
    return m.eval()


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox")


def set_attention(model: nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # transformers < 4.54
        model.config._attn_implementation = name


def tokenizer(vocab: int) -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        ["def f(x):\n    return x + 1\n" * 20, "keys lose dimensions"],
        trainers.BpeTrainer(
            vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
