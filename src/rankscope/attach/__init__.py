"""Point rankscope's probes at any language model: `Probe(model)` finds its attention sites by itself.

`detect` recognises

- rankscope's own GPT (its identity taps; `gpt.py`),
- Hugging Face `transformers` decoders (`huggingface.py`): the Llama-style attention of Llama,
  Mistral, Mixtral, Qwen2, Qwen3 and their kin (separate q/k/v/o projections, grouped-query heads,
  QK-Norm), GPT-2 (one fused `c_attn`) and GPT-NeoX (one fused, head-interleaved
  `query_key_value`, partial rotary); their post-RoPE q and k are rebuilt with the model's own
  rotary function (`rotary.py`),
- TransformerLens `HookedTransformer` hook points (`lens.py`: `blocks.{i}.attn.hook_q/k/v/z`,
  `hook_rot_q/k`),

inside whatever wraps them, and reads, for every layer and head, the six sites of rankscope's GPT
(`rankscope.settings.vocab.PROBE_SITES`):

    q_pre, k_pre   queries and keys after QK-Norm (where the model has it), before RoPE
    q, k           the same after RoPE: what the attention scores are made of
    v              values
    o              each head's attention output, before the output projection

Anything else attaches through explicit `measure.sites.Site`s. `token_batches` (`text.py`) cuts text into
a probe batch with the model's own tokenizer.

Probes never change the model: hooks only read, run under `no_grad`, and are removed after each
measurement; the model is put in eval mode for the measurement (no dropout) and every module's
mode and the random number generators are restored afterwards, so a training loop that probes
is bitwise the loop that does not.

In a data-parallel or fully sharded run (DDP, FSDP2's `fully_shard`) every rank probes its own
share of the batch and the probe sums the Grams (and every other sum) over the ranks, so each rank
gets the table of all their tokens together: `Probe(model, distributed=...)`, see `Probe`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..errors import RankscopeError
from ..measure.probe import AttentionStats, GramProbe
from ..measure.sites import Site
from ..settings.vocab import PROBE_SITES
from .attachment import Attachment
from .gpt import detect_gpt
from .huggingface import detect_hf
from .lens import detect_lens
from .text import token_batches

COLUMNS = ("layer", "head", "site", "metric", "value")

__all__ = ["Attachment", "AttentionStats", "Probe", "Site", "detect", "token_batches"]

# Tried in this order on every module, outermost first; each returns None for a model not its own.
_DETECTORS = (detect_gpt, detect_hf, detect_lens)


def detect(model: nn.Module) -> Attachment:
    """Find the language model in `model` (itself, or a submodule: inside DDP, torch.compile, a
    Lightning module, ...) and its attention sites. Raises RankscopeError when none is recognised."""
    for path, m in model.named_modules():  # outermost first: the language model, not one of its parts
        for d in _DETECTORS:
            found = d(m, path)
            if found is not None:
                return found
    raise RankscopeError(
        f"rankscope does not recognise the attention layers of {type(model).__name__} (it knows its own GPT, "
        f"Hugging Face Llama-style, GPT-2 and GPT-NeoX attention, and TransformerLens HookedTransformer); "
        f"pass explicit sites, e.g. Probe(model, sites=[Site('k', 'layers.*.attn.k_proj', 'BTC', head_dim=64)])"
    )


class Probe:
    """Per layer x head x site x metric geometry of a model's attention, as a pandas DataFrame.

    >>> probe = Probe(model)                         # keys after QK-Norm and RoPE, + attention stats
    >>> df = probe.measure(tokens)                   # tokens: (B, T) ids, or a list of such batches
    >>> df = probe.measure(text=docs, tokenizer=tok) # or text and the model's tokenizer
    >>> df.query("site == 'k' and metric == 'pr_sv'").groupby("layer").value.mean()

    sites: names among q_pre, q, k_pre, k, v, o (found in the model by `detect`) and/or explicit
        `measure.sites.Site`s for models rankscope does not know.
    attention: True = per-head attention entropy and max logit wherever the post-RoPE q and k can be
        had exactly; False = none; or an explicit `probe.AttentionStats`.
    gains: QK-Norm gain statistics (per layer, head -1) where the model has learned gains.
    forward: how to run the model on a batch of token ids (found by `detect` when not given).
    distributed: where the tokens of one measurement come from in a multi-process run (DDP, FSDP2
        `fully_shard`, or plain replicas). "auto" (the default): when torch.distributed is
        initialised with more than one process, every rank measures its own share of the batch and
        the sums behind every row (Grams, column sums, token counts, attention-entropy sums; max
        logits by maximum) are all-reduced over the default group before the metrics, so every rank
        returns the same table, that of all the ranks' tokens; in one process nothing is
        communicated. True: the same, but a missing process group is an error. A ProcessGroup:
        reduce over that group. False: each rank measures its own tokens alone (and may probe alone,
        e.g. rank 0 only in a DDP run; under FSDP2 every rank must still run the forward pass). When
        reducing, every rank of the group must call `measure` at the same point with the same number
        of batches (at least one). Gain rows read the parameters, the same on every rank; FSDP2's
        sharded (DTensor) gains are gathered first.

    Columns of the result: layer, head, site, metric, value (the metric names of
    `rankscope.settings.vocab.METRICS`; site "attn" holds entropy and max_logit; site q_gain/k_gain holds
    gain_mean, gain_cv, gain_near_zero with head -1).
    """

    def __init__(
        self,
        model: nn.Module,
        sites: Iterable[str | Site] = ("k",),
        *,
        attention: bool | AttentionStats = True,
        gains: bool = True,
        forward: Callable[[torch.Tensor], Any] | None = None,
        distributed: bool | str | Any = "auto",
    ):
        check_distributed(distributed)
        self.model = model
        self.distributed = distributed
        sites = [sites] if isinstance(sites, (str, Site)) else list(sites)
        names = [s for s in sites if isinstance(s, str)]
        explicit = [s for s in sites if isinstance(s, Site)]
        unknown = [n for n in names if n not in PROBE_SITES]
        if unknown:
            raise RankscopeError(f"unknown site {unknown[0]!r} (choose from {', '.join(PROBE_SITES)}, or pass a Site)")
        every = names + [s.name for s in explicit]
        if len(set(every)) != len(every):
            raise RankscopeError(f"site names must be unique, got {', '.join(every)}")

        # Every pattern is relative to `model` as given (detect() prefixes the path of the language
        # model inside it), so detected and explicit sites hook the same tree.
        self.attachment: Attachment | None = None
        try:
            self.attachment = detect(model)
        except RankscopeError:
            if names:
                raise
        att = self.attachment
        chosen: list[Site] = []
        for n in names:
            assert att is not None  # detect() raised above when names were asked of an unknown model
            if n not in att.sites:
                raise RankscopeError(f"site {n!r} is not available for {att.family}: " + "; ".join(att.notes))
            chosen.append(att.sites[n])
        chosen += explicit
        stats: AttentionStats | None
        if isinstance(attention, AttentionStats):
            stats = attention
        else:
            stats = att.attention if (attention and att is not None) else None
        self.notes = tuple(att.notes) if att is not None else ()
        self.forward = forward or (att.forward if att is not None else model)
        self._contexts = att.contexts if att is not None else ()
        try:
            self._probe = GramProbe(model, chosen, stats, dict(att.gains) if (gains and att is not None) else None)
        except ValueError as e:  # an explicit pattern that matches nothing
            raise RankscopeError(f"{e} in {type(model).__name__}") from None
        self._site_names = tuple(s.name for s in chosen)

    # -- measuring --

    def measure(
        self,
        batches: torch.Tensor | Iterable[torch.Tensor] | None = None,
        *,
        text: str | Iterable[str] | None = None,
        tokenizer: Any = None,
        seq_len: int = 256,
        batch_size: int = 8,
    ) -> pd.DataFrame:
        """Run the model on token batches (or on `text` cut into one batch with `tokenizer`) with the
        hooks attached; return the tidy table. The model's outputs, parameters, modes and the random
        number generators are as they were before."""
        if text is not None:
            if batches is not None:
                raise RankscopeError("give either token batches or text (with a tokenizer) to measure on, not both")
            if tokenizer is None:
                raise RankscopeError("measuring on text needs the model's tokenizer (tokenizer=...)")
            given: list[torch.Tensor] = [token_batches(text, tokenizer, seq_len, batch_size)]
        elif batches is None:
            raise RankscopeError("give either token batches or text (with a tokenizer) to measure on")
        else:
            given = [batches] if isinstance(batches, torch.Tensor) else list(batches)
        device = device_of(self.model)
        given = [b.to(device) if b.device != device else b for b in given]
        for b in given:
            if b.ndim != 2 or b.dtype not in (torch.int64, torch.int32):
                raise RankscopeError(
                    f"token batches must be (batch, tokens) integer ids, got {tuple(b.shape)} {b.dtype}"
                )
        rows = self._measure(given)
        return pd.DataFrame(rows, columns=list(COLUMNS)).astype(
            {"layer": "int64", "head": "int64", "site": str, "metric": str, "value": "float64"}
        )

    __call__ = measure

    def _measure(self, batches: list[torch.Tensor]) -> list[dict[str, Any]]:
        modes = {m: m.training for m in self.model.modules()}
        devices = [d for d in {p.device for p in self.model.parameters()} if d.type == "cuda"]
        handles = [h for c in self._contexts for h in c.attach()]
        try:
            # fork_rng: a model whose forward draws random numbers even in eval mode still leaves
            # the caller's generators where they were
            with torch.random.fork_rng(devices=devices):
                self.model.eval()  # no dropout while measuring; every module's own flag comes back below
                reduce, group = reduction(self.distributed)
                return self._probe.measure(batches, forward=self.forward, reduce=reduce, group=group)
        finally:
            for h in handles:
                h.remove()
            for m, was in modes.items():
                m.training = was

    # -- what was found --

    @property
    def sites(self) -> list[str]:
        return list(self._site_names)

    def describe(self) -> str:
        if self.attachment is not None:
            text = self.attachment.describe()
        else:
            text = f"{type(self.model).__name__} (explicit sites)"
        return text + "".join(f"\n  note: {n}" for n in self.notes)

    def __repr__(self) -> str:
        return f"Probe({self.describe().splitlines()[0]}; sites {', '.join(self.sites)})"


def check_distributed(distributed: Any) -> None:
    """Refuse a `distributed` setting that is none of "auto", True, False or a ProcessGroup."""
    if isinstance(distributed, bool) or (isinstance(distributed, str) and distributed == "auto"):
        return
    import torch.distributed as tdist

    if tdist.is_available() and isinstance(distributed, tdist.ProcessGroup):
        return
    raise RankscopeError(
        f"distributed must be 'auto', True, False or a torch.distributed ProcessGroup, got {distributed!r}"
    )


def reduction(distributed: Any) -> tuple[bool, Any]:
    """(reduce, group) for one measurement under a `Probe(distributed=...)` setting: whether to
    all-reduce the probe's sums, and over which process group (None: the default group). Decided
    at each measurement, so a probe made before `init_process_group` still reduces."""
    if distributed is False:
        return False, None
    import torch.distributed as tdist

    initialised = tdist.is_available() and tdist.is_initialized()
    if distributed is True or isinstance(distributed, str):  # "auto" (check_distributed refused the rest)
        if not initialised:
            if distributed is True:
                raise RankscopeError(
                    "distributed=True needs an initialised torch.distributed process group "
                    "(torch.distributed.init_process_group); use 'auto' to probe alone without one"
                )
            return False, None
        return tdist.get_world_size() > 1, None
    if not initialised:
        raise RankscopeError("a process group was given, but torch.distributed is not initialised")
    return tdist.get_world_size(distributed) > 1, distributed


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters (or, without any, its buffers) live; the CPU for neither."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")
