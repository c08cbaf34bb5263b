"""The names every part of rankscope shares, in one place, torch-free.

A *site* is where a per-head activation is read (the model's identity taps, or the matching
point of another model found by `attach`); the `site` column of the probe table also holds a few
layer-wide groups (attention statistics, QK-Norm gains, weight slices). Config validates against
these names, the probes write them, the report displays them. Adding a site means a tap in the
model and a line here. A spectrum metric's name and label are here too (`SPECTRUM`); its formula is
in `rankscope.measure.metrics`.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

# head index of per-layer rows (gain statistics, functional rank); the store's convention
LAYER_WIDE = -1


@dataclass(frozen=True)
class SiteName:
    """One value of the probe table's `site` column. `label` reads in a quantity's name
    ("mean <label> PR"); `description` reads in a caption ("PR of the <description>")."""

    name: str
    label: str
    description: str
    activation: bool  # a per-head activation a probe reads (rather than a group of other rows)


# In table order: where the seed looked first, then the rest of the attention block.
_SITES = (
    SiteName("k", "key", "keys after QK-Norm and RoPE", True),
    SiteName("k_pre", "pre-RoPE key", "keys before RoPE", True),
    SiteName("q", "query", "queries after QK-Norm and RoPE", True),
    SiteName("q_pre", "pre-RoPE query", "queries before RoPE", True),
    SiteName("v", "value", "values", True),
    SiteName("o", "head-output", "each head's attention output", True),
    SiteName("attn", "attention", "attention pattern", False),
    SiteName("q_gain", "query-gain", "query QK-Norm gains", False),
    SiteName("k_gain", "key-gain", "key QK-Norm gains", False),
    SiteName("w_q", "W_Q", "each head's slice of the query weight W_Q", False),
    SiteName("w_k", "W_K", "each head's slice of the key weight W_K", False),
    SiteName("dw_k", "W_K-update", "update each head's W_K slice received in one optimizer step", False),
)
SITES: dict[str, SiteName] = {s.name: s for s in _SITES}
SITE_ORDER: tuple[str, ...] = tuple(SITES)
# The activation sites a probe can read, in the order of the forward pass.
ProbeSite = Literal["q_pre", "q", "k_pre", "k", "v", "o"]
PROBE_SITES: tuple[str, ...] = typing.get_args(ProbeSite)
assert set(PROBE_SITES) == {s.name for s in _SITES if s.activation}


def site_label(site: str) -> str:
    return SITES[site].label if site in SITES else site


def site_description(site: str) -> str:
    return SITES[site].description if site in SITES else f"{site} site"


@dataclass(frozen=True)
class Metric:
    """One spectrum metric: its column name in the probe table, how the report names it, and
    whether it counts dimensions (then more is better, the seed's convention: "higher")."""

    name: str
    label: str
    dimensions: bool = True


# Every metric `measure.metrics.metrics_from_gram` returns, in table order. Adding a metric: a line
# here, its formula in `metrics_from_gram`, and a test; the probe, the store and the report follow.
SPECTRUM: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("pr_sv", "PR"),
        Metric("pr_eig", "PR (covariance)"),
        Metric("erank", "effective rank"),
        Metric("stable_rank", "stable rank"),
        Metric("r90", "r90"),
        Metric("decay", "decay exponent α", dimensions=False),
        Metric("decay_r2", "decay fit R²", dimensions=False),
    )
}
METRICS: tuple[str, ...] = tuple(SPECTRUM)


def metric_label(metric: str) -> str:
    return SPECTRUM[metric].label if metric in SPECTRUM else metric


# The built-in corpora `--data` and `data.path` accept by name, the default first (their
# documents and titles: `rankscope.data.corpora`, which a test holds to this tuple).
BUILTIN_CORPORA: tuple[str, ...] = ("sotu", "python-stdlib")
