"""Offline helpers shared by the examples: text from this Python's standard library and a small
byte-level BPE trained on it, so every example runs without downloading anything."""

from __future__ import annotations

from rankscope.data import stdlib_corpus_files
from rankscope.data.corpus import read_document


def stdlib_text(n_files: int = 40, split: str = "train") -> list[str]:
    """The first n_files documents of rankscope's embedded corpus (train or val split)."""
    train, val, _ = stdlib_corpus_files()
    files = train if split == "train" else val
    return [read_document(p, python_source=True) for p in files[:n_files]]


def tiny_tokenizer(texts: list[str], vocab_size: int = 512):
    """A Hugging Face fast tokenizer (byte-level BPE, GPT-2 style) trained on `texts` in a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,  # a second's work: its progress lines would flood the terminal
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
