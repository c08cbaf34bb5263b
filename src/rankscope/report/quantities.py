"""The quantities the report compares across arms: their keys, names, units and which direction is
better. A registry only; `series.py` reads their values from the store's tables.

Site and metric names come from `rankscope.vocab` and `rankscope.metrics`; a probe quantity is
keyed ``"<site>:<metric>"`` (``"k:pr_sv"``: the seed's mean key PR), a scalar one by its column.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..metrics import SPECTRUM, metric_label
from ..vocab import site_description, site_label


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
# The keys' functional rank (evals.functional_rank, per layer, averaged over layers): the fewest
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
]
