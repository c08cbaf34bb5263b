"""`optim.muon_qkvo`, the Muon partition setting: which of each layer's Q, K, V, O Muon
orthogonalizes together. Its syntax (an alias, or a partition of {q, k, v, o} into parts joined by
"+"), its canonical parts (`muon_partition`), and what a partition needs of the model's shapes
(`muon_partition_checks`, one of `config.validate`'s cross-field rules). Torch-free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import ModelConfig, OptimConfig

# `optim.muon_qkvo`: an alias, or a partition of {q, k, v, o} into parts joined by "+" (each letter
# once): "qkvo" is the seed's stack, "q+k+v+o" each matrix alone, "k+qvo" K alone beside the rest.
MUON_PARTITION = (
    r"stacked|separate|per_head"  # the aliases, or: every letter present, none twice, "+" between parts
    r"|(?=[^q]*q)(?=[^k]*k)(?=[^v]*v)(?=[^o]*o)(?!.*([qkvo]).*\1)[qkvo]+(\+[qkvo]+)*"
)
MUON_PARTITION_WHAT = "stacked, separate, per_head or a partition of q, k, v, o such as qk+vo (each letter once)"
_MUON_ALIASES = {"stacked": "qkvo", "separate": "q+k+v+o", "per_head": "q+k+v+o"}
_QKVO = "qkvo"


def muon_partition(qkvo: str, head_group: int = 0) -> tuple[tuple[str, ...], int]:
    """The parts Muon orthogonalizes together and the heads per block, from `optim.muon_qkvo` and
    `optim.muon_head_group`: ("qkvo",), 0 for the seed's stack. Letters keep the seed's Q, K, V, O
    order within a part and parts are ordered by their first letter, so "vo+kq" is "qk+vo".
    `per_head` is q+k+v+o cut into single heads unless a head group is given."""
    parts = _MUON_ALIASES.get(qkvo, qkvo).split("+")
    canonical = sorted(("".join(sorted(p, key=_QKVO.index)) for p in parts), key=lambda p: _QKVO.index(p[0]))
    if qkvo == "per_head" and head_group == 0:
        head_group = 1
    return tuple(canonical), head_group


def muon_partition_checks(m: ModelConfig, o: OptimConfig) -> list[tuple[bool, str]]:
    """What a Muon partition needs of the model's shapes. Whole matrices stack by rows, so a part
    that holds O beside another matrix needs O's columns (heads x head_dim) to be d_model wide. Cut
    into heads, every matrix of a part must have as many head groups: Q and O count query heads,
    K and V kv heads, so a part mixing the two needs as many kv heads as query heads."""
    parts, g = muon_partition(o.muon_qkvo, o.muon_head_group)
    name = f"optim.muon_qkvo={o.muon_qkvo}"
    if g == 0:
        stacks_o = any("o" in p and len(p) > 1 for p in parts)
        return [
            (
                not stacks_o or m.n_head * m.head_dim == m.d_model,
                f"{name} stacks O's weight with other matrices by rows, which needs model.n_head x "
                f"model.head_dim ({m.n_head} x {m.head_dim}) = model.d_model ({m.d_model}); "
                f"use a partition with o alone (such as qkv+o), separate or per_head",
            )
        ]
    counts = {"q": m.n_head, "o": m.n_head, "k": m.n_kv_head, "v": m.n_kv_head}
    heads = {counts[x] for p in parts for x in p}
    mixed = any(len({counts[x] for x in p}) > 1 for p in parts)
    return [
        (
            all(h % g == 0 for h in heads),
            f"optim.muon_head_group ({g}) must divide the heads it groups (model.n_head {m.n_head}"
            + ("" if heads == {m.n_head} else f", model.n_kv_head {m.n_kv_head}")
            + ")",
        ),
        (
            not mixed,
            f"{name} cut into heads stacks query-side (q, o) with kv-side (k, v) head groups, which needs "
            f"model.n_kv_head ({m.n_kv_head}) = model.n_head ({m.n_head}); keep them in separate parts",
        ),
    ]
