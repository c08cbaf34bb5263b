"""Text to one probe batch of token ids, cut the way rankscope cuts its own probe batches, with
whatever tokenizer the model came with (transformers, tokenizers, a HookedTransformer)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from ..errors import RankscopeError


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    """`text` as token ids, without special tokens, for each kind of tokenizer a model comes with."""
    if hasattr(tokenizer, "encode") and type(tokenizer).__module__.startswith("tokenizers"):
        return tokenizer.encode(text).ids  # a `tokenizers.Tokenizer`
    if callable(tokenizer) and hasattr(tokenizer, "convert_tokens_to_ids"):  # a transformers tokenizer
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if hasattr(tokenizer, "to_tokens"):  # a HookedTransformer
        return tokenizer.to_tokens(text, prepend_bos=False)[0].tolist()
    if hasattr(tokenizer, "encode"):
        ids = tokenizer.encode(text)
        return list(getattr(ids, "ids", ids))
    raise RankscopeError(
        f"cannot tokenize with a {type(tokenizer).__name__}: give a transformers or tokenizers tokenizer, or token ids"
    )


def _separator(tokenizer: Any) -> list[int]:
    """The end-of-text token that joins documents, as a list of zero or one id."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None and hasattr(tokenizer, "token_to_id"):
        eos = tokenizer.token_to_id("<|endoftext|>")
    return [int(eos)] if eos is not None else []


def token_batches(
    text: str | Iterable[str], tokenizer: Any, seq_len: int = 256, batch_size: int = 8, max_chars: int = 8_000_000
) -> torch.Tensor:
    """One (batch_size, seq_len) batch of token ids from text, the way rankscope cuts its own probe
    batches: documents tokenized without special tokens and joined by the end-of-text token (when
    the tokenizer has one), then `batch_size` windows evenly spaced over the whole stream
    (`rankscope.data.fixed_batches`). At most `max_chars` characters are tokenized."""
    from ..data import fixed_batches

    docs = [text] if isinstance(text, str) else list(text)
    sep, ids, chars = _separator(tokenizer), [], 0
    for doc in docs:
        if chars >= max_chars:
            break
        doc = doc[: max_chars - chars]
        chars += len(doc)
        ids += _token_ids(tokenizer, doc) + sep
    if len(ids) < seq_len + 1:
        raise RankscopeError(
            f"the probe text gives {len(ids)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
            f"give more text or a shorter seq_len"
        )
    return fixed_batches([np.asarray(ids, dtype=np.int64)], 1, batch_size, seq_len)[0][0]
