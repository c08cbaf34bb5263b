"""The quantities the report compares across arms: their keys, names, units, which direction is
better, and the chance or floor level a quantity starts from (`chance_level`, and `still_at_chance`:
has it left that level?). A registry only; `series.py` reads their values from the store's tables.

Site and metric names come from `rankscope.settings.vocab`; a probe quantity is keyed
``"<site>:<metric>"`` (``"k:pr_sv"``: the seed's mean key PR), a scalar one by its column.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..settings.vocab import SPECTRUM, metric_label, site_description, site_label


@dataclass(frozen=True)
class Quantity:
    """A number per run and eval point that the report compares across arms.

    higher: True if more is better, False if less is, None if neither (no arm is marked better).
    what: one line for captions and legends, with its direction in words.
    """

    key: str
    label: str
    higher: bool | None
    what: str
    unit: str = ""
    decimals: int | None = None  # None: chosen from the values' magnitude


VAL_LOSS = Quantity("val_loss", "val loss", False, "validation loss; lower = better", "nats / token", 3)
SCALAR_QUANTITIES: dict[str, Quantity] = {
    "val_loss": VAL_LOSS,
    "ood_loss": Quantity(
        "ood_loss", "OOD loss", False, "loss on held-out out-of-distribution text; lower = better", "nats / token", 3
    ),
    "icl_score": Quantity(
        "icl_score",
        "ICL score",
        False,
        "in-context learning score: mean loss over the last 10% of positions minus the mean "
        "loss at positions [T/16, T/8); more negative = better use of context",
        "nats / token",
        3,
    ),
    "induction_loss": Quantity(
        "induction_loss",
        "induction loss",
        False,
        "loss on the second copy of repeated random token sequences; lower = better",
        "nats / token",
        3,
    ),
}
INDUCTION = Quantity(
    "induction_score",
    "mean induction score",
    True,
    "attention induction score (0 to 1; higher = stronger induction), mean over heads then layers",
    "",
    3,
)
INDUCTION_MAX = Quantity(
    "induction_max",
    "top induction score",
    True,
    "the strongest induction head's score (max over layers and heads); higher = stronger",
    "",
    3,
)
# The downstream measures the seed asks about ("is QK-Norm cheating?"), in report order.
DOWNSTREAM = ("ood_loss", "icl_score", "induction_loss", "induction_score", "induction_max")
# The keys' functional rank (measure.functional_rank, per layer, averaged over layers): the fewest
# key dimensions that keep the loss within 1%. No direction: fewer needed is neither good nor bad.
KEY_FUNCTIONAL_RANK = Quantity(
    "k:functional_rank",
    "key functional rank",
    None,
    "the fewest principal key directions per layer that keep the loss within 1%, averaged over layers",
    "dimensions",
    1,
)


def quantity_name(site: str, metric: str) -> str:
    """'mean key PR' for (k, pr_sv); 'mean value effective rank' for (v, erank), and so on."""
    return f"mean {site_label(site)} {metric_label(metric)}"


def counts_dimensions(metric: str) -> bool:
    """True for the spectrum metrics that count dimensions (PR, effective rank, ...): more is better
    by the seed's convention, and a head's head dimension bounds them."""
    return metric in SPECTRUM and SPECTRUM[metric].dimensions


# evals writes the rank sweep as `dloss_r<r>`: the relative loss increase at projection rank r
RANK_SWEEP = "dloss_r"


def is_rank_sweep(metric: str) -> bool:
    """The `dloss_r<r>` metrics: one per projection rank, shown as curves rather than table rows."""
    return metric.startswith(RANK_SWEEP) and metric[len(RANK_SWEEP) :].isdigit()


def probe_quantity(site: str = "k", metric: str = "pr_sv") -> Quantity:
    what = f"{metric_label(metric)} of the {site_description(site)}"
    higher = True if counts_dimensions(metric) else None
    if higher:
        what += ", averaged over heads then layers; higher = more dimensions used"
    return Quantity(f"{site}:{metric}", quantity_name(site, metric), higher, what, "dimensions" if higher else "")


def downstream_quantity(key: str) -> Quantity:
    """The Quantity of one of `DOWNSTREAM`."""
    return SCALAR_QUANTITIES.get(key) or {INDUCTION.key: INDUCTION, INDUCTION_MAX.key: INDUCTION_MAX}[key]


# --- chance and floor levels ----------------------------------------------------------------------


@dataclass(frozen=True)
class ChanceLevel:
    """Where a quantity sits before the model has learned what it measures.

    kind: "chance" (what a model that ignores the thing measured scores) or "floor" (the least
    value possible). rises: True when learning moves the quantity up from the level (scores,
    ranks), False when down (losses). tol: the smallest move that counts as leaving it (the seeds'
    spread counts too, see `still_at_chance`). label: the level in words, after its kind ("chance
    ln 4096 = 8.32"), for captions and text; short: two lines for a figure's line ("chance\n8.32").
    """

    key: str
    value: float
    kind: str
    rises: bool
    tol: float
    label: str
    worse: str = ""  # what a value on the wrong side of the level means, for the text

    @property
    def short(self) -> str:
        v = abs(self.value)
        text = "0" if v == 0 else "≈0" if v < 0.002 else f"{self.value:.3g}" if v >= 1 else f"{self.value:.2g}"
        return f"{self.kind}\n{text}"


def uniform_induction_score(seq_len: int) -> float:
    """The induction score (`measure.induction.InductionScores`) of uniform causal attention on a sequence of
    `seq_len` tokens (two copies of seq_len // 2): a query at position i gives each of its i + 1
    keys 1 / (i + 1), averaged over the second copy's positions i = L .. 2L - 1; about ln 2 / L."""
    L = int(seq_len) // 2
    return sum(1.0 / (i + 1) for i in range(L, 2 * L)) / L if L else math.nan


def _configs(study: Any) -> list[Mapping[str, Any]]:
    """The run configs of a `load.StudyData` (its runs' config.json), or an iterable of configs."""
    runs = getattr(study, "runs", None)
    return [r.config for r in runs] if runs is not None else [c for c in study if isinstance(c, Mapping)]


def _shared(configs: list[Mapping[str, Any]], section: str, name: str) -> int | None:
    """A setting every run has and agrees on (merged studies with other vocabularies have none)."""
    values = {(c.get(section) or {}).get(name) for c in configs}
    return int(values.pop()) if len(values) == 1 and None not in values else None


def chance_level(key: str, study: Any) -> ChanceLevel | None:
    """The chance or floor level of quantity `key` in `study` (a `load.StudyData`, or its runs'
    configs), or None when it has none or the runs disagree on what sets it.

    induction_loss: ln(model.vocab_size), the loss of a model that ignores the repeated context
    (an untrained model's); induction_score and induction_max: `uniform_induction_score` of
    train.seq_len, uniform attention's (about 0); icl_score: 0, a model that does not use its
    context; any site's functional_rank: 1, the fewest directions a projection can keep.
    """
    configs = _configs(study)
    if key == "induction_loss":
        vocab = _shared(configs, "model", "vocab_size")
        if not vocab or vocab < 2:
            return None
        level = math.log(vocab)
        worse = (
            "the model predicts its own corpus's tokens on the repeated random tokens, confidently and wrongly, "
            "instead of copying the first copy"
        )
        return ChanceLevel(key, level, "chance", False, 0.01 * level, f"ln {vocab} = {level:.2f}", worse)
    if key in ("induction_score", "induction_max"):
        seq_len = _shared(configs, "train", "seq_len")
        if not seq_len or seq_len < 4:
            return None
        level = uniform_induction_score(seq_len)
        # still at chance while below twice uniform attention's score
        worse = "attention avoids the token after the earlier copy more than uniform attention would"
        return ChanceLevel(key, level, "chance", True, level, f"{level:.3g} (uniform attention)", worse)
    if key == "icl_score":
        worse = "late positions have a higher loss than early ones: the context hurts the prediction"
        return ChanceLevel(key, 0.0, "chance", False, 0.02, "0 (context unused)", worse)
    if key.endswith(":functional_rank") or key == "functional_rank":
        return ChanceLevel(key, 1.0, "floor", True, 1e-6, "1 (one direction)")
    return None


AT, WORSE, PAST = "at", "worse", "past"  # chance_state's answers
STATE_WORDS = {AT: "at chance", WORSE: "worse than chance", PAST: "past chance"}


def chance_state(key: str, values: Iterable[float], study: Any) -> str | None:
    """Where quantity `key` stands against its chance or floor level (`chance_level`) in `values`,
    its values at one point (one per seed; NaNs ignored): PAST when the mean has moved past the
    level in the direction learning moves it, by more than both the seeds' standard deviation and
    the level's tolerance; WORSE when it has moved as far the other way (a loss above chance, a
    score below it); AT otherwise. A floor is left when any value is above it (so per-layer values
    test "every layer at the floor"). None when there is no level or no value."""
    level = chance_level(key, study)
    v = np.asarray([float(x) for x in values], dtype=float)
    v = v[np.isfinite(v)]
    if level is None or not len(v):
        return None
    if level.kind == "floor":
        return AT if bool(np.all(v <= level.value + level.tol)) else PAST
    moved = (v.mean() - level.value) if level.rises else (level.value - v.mean())
    noise = max(float(v.std(ddof=1)) if len(v) > 1 else 0.0, level.tol)
    return PAST if moved > noise else WORSE if moved < -noise else AT


def still_at_chance(key: str, values: Iterable[float], study: Any) -> bool:
    """True when quantity `key` has not moved past its chance or floor level (`chance_state` AT or
    WORSE): its differences between arms are not findings yet. False with no level or no value."""
    return chance_state(key, values, study) in (AT, WORSE)


__all__ = [
    "Quantity",
    "VAL_LOSS",
    "SCALAR_QUANTITIES",
    "INDUCTION",
    "INDUCTION_MAX",
    "DOWNSTREAM",
    "KEY_FUNCTIONAL_RANK",
    "quantity_name",
    "counts_dimensions",
    "RANK_SWEEP",
    "is_rank_sweep",
    "probe_quantity",
    "downstream_quantity",
    "ChanceLevel",
    "uniform_induction_score",
    "chance_level",
    "AT",
    "WORSE",
    "PAST",
    "STATE_WORDS",
    "chance_state",
    "still_at_chance",
]
