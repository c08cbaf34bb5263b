"""rankscope models in EleutherAI's lm-evaluation-harness (an optional extra): scoring text the
harness's way, and a harness `LM` around it.

The pure functions here score text with any causal model that maps token ids (B, T) to logits
(B, T, V) — rankscope's `GPT` is one — and a Hugging Face `tokenizers.Tokenizer`; they need only
torch and are tested without lm_eval:

- `loglikelihood`:         Σ log p(continuation | context), and whether greedy decoding would
                           produce the continuation (the harness's multiple-choice tasks).
- `loglikelihood_rolling`: Σ log p(text) in disjoint windows with maximal context (perplexity tasks).
- `greedy_until`:          greedy generation up to stop strings (generative tasks).

`RankscopeLM` subclasses `lm_eval.api.model.LM` around them and `evaluate` runs
`lm_eval.simple_evaluate`; both exist only when lm_eval is installed (pip install
'rankscope[lm-eval]') and otherwise raise a `RankscopeError` saying so.

Conventions follow the harness's own HF model (lm_eval/models/huggingface.py) so scores compare:
the context/continuation split of `encode_pair`, left truncation to the model's context, the
document separator as the context of an empty context and as the prefix of rolling windows.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..data.tokenizer import EOT_TOKEN
from ..errors import RankscopeError

INSTALL_HINT = "install the optional extra: pip install 'rankscope[lm-eval]'"


class LMEvalMissing(RankscopeError, ImportError):
    """lm_eval is not installed. A RankscopeError (one clear line at the command line) and an
    ImportError (so `from rankscope.integrations.lm_eval import RankscopeLM` fails like an import)."""


# --- shared plumbing ---------------------------------------------------------------------------


def _device(model: Any) -> torch.device:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def _max_len(model: Any, max_len: int | None) -> int:
    """Longest input the model takes: rankscope's GPT has RoPE tables for cfg.max_seq_len only."""
    if max_len is None:
        max_len = getattr(getattr(model, "cfg", None), "max_seq_len", None)
    if max_len is None:
        raise ValueError("max_len is required for a model without cfg.max_seq_len")
    if max_len < 1:
        raise ValueError(f"max_len must be positive, got {max_len}")
    return int(max_len)


def _prefix_id(tokenizer: Any, prefix_id: int | None) -> int:
    """The token that stands for "start of a document": rankscope's <|endoftext|> (id 0)."""
    if prefix_id is not None:
        return prefix_id
    found = tokenizer.token_to_id(EOT_TOKEN)
    if found is None:
        raise ValueError(f"the tokenizer has no {EOT_TOKEN} token; pass prefix_id")
    return found


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # no special tokens: rankscope's tokenizer has none to add, and a foreign one's BOS would
    # land in the middle of context + continuation
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)] if texts else []


def encode_pairs(
    tokenizer: Any, requests: Sequence[tuple[str, str]], prefix_id: int | None = None
) -> list[tuple[list[int], list[int]]]:
    """Token ids (context, continuation) for each request, the harness's way: trailing spaces of
    the context move to the continuation, context + continuation is encoded whole, and the
    continuation is what follows the context's own encoding (so the continuation's first token is
    the one a model would really see there). An empty context becomes the document separator."""
    prefix = _prefix_id(tokenizer, prefix_id)
    ctxs, conts = [], []
    for context, continuation in requests:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        ctxs.append(context)
        conts.append(continuation)
    wholes = _encode(tokenizer, [c + d for c, d in zip(ctxs, conts)])
    ctx_ids = _encode(tokenizer, ctxs)
    out = []
    for ctx, cont, whole, ids in zip(ctxs, conts, wholes, ctx_ids):
        if ctx == "":
            out.append(([prefix], _encode(tokenizer, [cont])[0]))
        else:
            out.append((ids, whole[len(ids) :]))
    return out


@torch.no_grad()
def loglikelihood_tokens(
    model: Callable[[torch.Tensor], torch.Tensor],
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 16,
    max_len: int | None = None,
) -> list[tuple[float, bool]]:
    """(Σ log p(continuation | context), greedy) for token-id requests (context, continuation).

    The model sees (context + continuation)[:-1], left-truncated to its last max_len tokens;
    the continuation (at most max_len tokens) is scored from the last len(continuation) logits.
    Requests are batched longest first and right-padded: with causal attention, padding after a
    sequence cannot change its logits. Log-probabilities in float32.
    """
    max_len = _max_len(model, max_len)
    items = []
    for ctx, cont in requests:
        ctx, cont = list(ctx), list(cont)
        if len(cont) > max_len:
            raise ValueError(f"a continuation of {len(cont)} tokens does not fit the model's context of {max_len}")
        if not ctx and cont:
            raise ValueError("an empty context: start it with the document separator (see encode_pairs)")
        items.append(((ctx + cont)[-(max_len + 1) :][:-1], cont))
    return _score(model, items, batch_size)


def _score(
    model: Callable[[torch.Tensor], torch.Tensor], items: list[tuple[list[int], list[int]]], batch_size: int
) -> list[tuple[float, bool]]:
    """Score targets tgt (m tokens) from the last m logits of the input inp (n >= m tokens)."""
    device = _device(model)
    results: list[tuple[float, bool]] = [(0.0, True)] * len(items)  # an empty continuation: log 1
    order = sorted((i for i, (_, t) in enumerate(items) if t), key=lambda i: -len(items[i][0]))
    for b in range(0, len(order), batch_size):
        chunk = order[b : b + batch_size]
        width = len(items[chunk[0]][0])
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, i in enumerate(chunk):
            inp = items[i][0]
            x[row, : len(inp)] = torch.tensor(inp, dtype=torch.long)
        logits = model(x.to(device))  # (b, width, V)
        sums, greedy = [], []
        for row, i in enumerate(chunk):
            inp, tgt = items[i]
            n, m = len(inp), len(tgt)
            logp = torch.log_softmax(logits[row, n - m : n].float(), dim=-1)  # (m, V)
            t = torch.tensor(tgt, dtype=torch.long, device=logp.device)
            sums.append(logp.gather(-1, t[:, None]).sum())
            greedy.append((logp.argmax(-1) == t).all())
        values = torch.stack([torch.stack(sums).double(), torch.stack(greedy).double()], -1).tolist()  # one sync
        for i, (s, g) in zip(chunk, values):
            results[i] = (s, bool(g))
    return results


def loglikelihood(
    model: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 16,
    max_len: int | None = None,
    prefix_id: int | None = None,
) -> list[tuple[float, bool]]:
    """(Σ log p(continuation | context), is greedy) for each (context, continuation) string pair:
    the harness's `loglikelihood` request. is greedy: the argmax token equals the continuation's at
    every position. max_len defaults to `model.cfg.max_seq_len`; longer inputs lose their start."""
    return loglikelihood_tokens(model, encode_pairs(tokenizer, requests, prefix_id), batch_size, max_len)


def rolling_windows(tokens: Sequence[int], prefix_id: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(input, targets) windows that predict every token of `tokens` exactly once, each with as much
    context as fits (the harness's get_rolling_token_windows + make_disjoint_window, context 1).

    Targets are cut into consecutive chunks of max_len; the chunk tokens[s:e] is predicted from the
    max_len tokens of [prefix] + tokens that end just before tokens[e-1], so the first chunk starts
    from the prefix alone and later chunks, the last included, get a full context. Targets are the
    last len(targets) predictions of the input."""
    if max_len < 1:
        raise ValueError(f"max_len must be positive, got {max_len}")
    full = [prefix_id] + list(tokens)
    windows = []
    for s in range(0, len(tokens), max_len):
        e = min(s + max_len, len(tokens))
        windows.append((full[max(0, e - max_len) : e], list(tokens[s:e])))
    return windows


def loglikelihood_rolling(
    model: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 16,
    max_len: int | None = None,
    prefix_id: int | None = None,
) -> list[float]:
    """Σ log p(text), each text a document of its own that starts after the document separator,
    scored in `rolling_windows` of the model's context (the harness's `loglikelihood_rolling`)."""
    max_len = _max_len(model, max_len)
    prefix = _prefix_id(tokenizer, prefix_id)
    owners, items = [], []
    for t, ids in enumerate(_encode(tokenizer, list(texts))):
        for w in rolling_windows(ids, prefix, max_len):
            owners.append(t)
            items.append(w)
    totals = [0.0] * len(texts)
    for t, (lp, _) in zip(owners, _score(model, items, batch_size)):
        totals[t] += lp
    return totals


@torch.no_grad()
def greedy_until(
    model: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Any,
    context: str,
    until: Sequence[str] | str = (),
    max_gen_toks: int = 256,
    max_len: int | None = None,
    prefix_id: int | None = None,
) -> str:
    """Greedy continuation of `context`: stops after max_gen_toks tokens, at the document separator,
    or once a stop string appears, and returns the text before the first stop string.

    One forward per generated token on the (left-truncated) whole sequence: rankscope's GPT has no
    key/value cache, and evaluation continuations are short."""
    max_len = _max_len(model, max_len)
    prefix = _prefix_id(tokenizer, prefix_id)
    until = [until] if isinstance(until, str) else [u for u in until if u]
    ids = _encode(tokenizer, [context])[0] if context else [prefix]
    device = _device(model)
    gen: list[int] = []
    text = ""
    for _ in range(max_gen_toks):
        x = torch.tensor([(ids + gen)[-max_len:]], dtype=torch.long, device=device)
        nxt = int(model(x)[0, -1].argmax())
        if nxt == prefix:
            break
        gen.append(nxt)
        text = tokenizer.decode(gen)
        if any(u in text for u in until):
            break
    for u in until:  # cut at the earliest stop string
        text = text.split(u)[0]
    return text


# --- lm_eval integration (built only when lm_eval is importable) --------------------------------

_LM_CLASS: type | None = None


def _lm_class() -> type:
    """Build (once) `RankscopeLM`, a subclass of `lm_eval.api.model.LM`."""
    global _LM_CLASS
    if _LM_CLASS is not None:
        return _LM_CLASS
    try:
        from lm_eval.api.model import LM
    except ImportError:
        raise LMEvalMissing(f"lm-evaluation-harness (lm_eval) is not installed; {INSTALL_HINT}") from None

    class RankscopeLM(LM):
        """A rankscope model (ids -> logits) and its tokenizer as an lm_eval language model.
        Requests are lm_eval `Instance`s whose `.args` are (context, continuation) for
        loglikelihood, (text,) for loglikelihood_rolling, (context, gen_kwargs) for generate_until."""

        def __init__(
            self,
            model: Any,
            tokenizer: Any,
            batch_size: int = 16,
            max_len: int | None = None,
            max_gen_toks: int = 256,
            prefix_id: int | None = None,
        ):
            super().__init__()
            self.model, self.tokenizer = model, tokenizer
            self.batch_size, self.max_gen_toks = batch_size, max_gen_toks
            self.max_length = _max_len(model, max_len)
            self.prefix_id = _prefix_id(tokenizer, prefix_id)

        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            return loglikelihood(
                self.model,
                self.tokenizer,
                [tuple(r.args) for r in requests],
                self.batch_size,
                self.max_length,
                self.prefix_id,
            )

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            return loglikelihood_rolling(
                self.model,
                self.tokenizer,
                [r.args[0] for r in requests],
                self.batch_size,
                self.max_length,
                self.prefix_id,
            )

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            out = []
            for r in requests:
                context, kwargs = r.args
                kwargs = dict(kwargs or {})
                if kwargs.get("do_sample") and kwargs.get("temperature", 1.0) != 0:
                    warnings.warn("RankscopeLM decodes greedily; do_sample is ignored", stacklevel=2)
                out.append(
                    greedy_until(
                        self.model,
                        self.tokenizer,
                        context,
                        kwargs.get("until") or (),
                        int(kwargs.get("max_gen_toks", self.max_gen_toks)),
                        self.max_length,
                        self.prefix_id,
                    )
                )
            return out

    _LM_CLASS = RankscopeLM
    return _LM_CLASS


def __getattr__(name: str) -> Any:
    # `RankscopeLM` is created on first access, so importing this module never needs lm_eval
    if name == "RankscopeLM":
        return _lm_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    tasks: list[str],
    *,
    batch_size: int = 16,
    max_len: int | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Run lm-evaluation-harness tasks on a rankscope model: `lm_eval.simple_evaluate(model=
    RankscopeLM(...), tasks=tasks, **kwargs)` (e.g. num_fewshot=0, limit=100), in eval mode.
    Returns the harness's results dict. Raises RankscopeError when lm_eval is missing."""
    try:
        import lm_eval
    except ImportError:
        raise LMEvalMissing(f"lm-evaluation-harness (lm_eval) is not installed; {INSTALL_HINT}") from None
    lm = _lm_class()(model, tokenizer, batch_size=batch_size, max_len=max_len)
    was_training = model.training
    model.eval()
    try:
        return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), **kwargs)
    finally:
        model.train(was_training)
