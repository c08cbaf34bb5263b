"""Hand-built study folders for the report's tests, whose answers are known in closed form.

The simple synthetic values (`make_study`):
    val loss(arm, seed, t) = 5 - t/1000 + LOSS_OFFSET[arm] + 0.02 * seed
    PR(arm, seed, layer, head, t) = PR_BASE[arm] + 2 * layer + head + seed - t/100
so with 2 layers x 2 heads the mean over heads then layers is PR_BASE + 1 + 0.5 + seed - t/100, and
every difference between two arms is the same in every seed (a constant shift: zero-width paired
intervals). `make_realistic_study` writes a study with every metric the trainer records, log-spaced
eval points from 0 and seed noise; it also builds the demo study looked at by hand. `write_run`
writes one run folder from its rows, for studies with values of their own (test_factorial's grid).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from rankscope.report import load_study
from rankscope.storage.store import PROBE_COLUMNS, SCALAR_COLUMNS, RunStore, TableWriter, run_dir, write_record

LOSS_OFFSET = {"qk": 0.0, "none": 0.05, "frozen": 0.03}
PR_BASE = {"qk": 10.0, "none": 20.0, "frozen": 15.0}
TOKENS = [0, 100, 200, 300, 400]
N_LAYER, N_HEAD, HEAD_DIM = 2, 2, 8
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def loss(arm: str, seed: int, t: int) -> float:
    return 5 - t / 1000 + LOSS_OFFSET[arm] + 0.02 * seed


def pr(arm: str, seed: int, layer: int, head: int, t: int) -> float:
    return PR_BASE[arm] + 2 * layer + head + seed - t / 100


# --- one run folder from its rows ------------------------------------------------------------------


def scalar_row(arm: str, seed: int, step: int, tokens: int, loss: float) -> dict:
    """One eval point's row of scalars.csv: train and val loss both `loss`, no OOD loss."""
    return {
        "arm": arm,
        "seed": seed,
        "step": step,
        "tokens": tokens,
        "train_loss": loss,
        "val_loss": loss,
        "ood_loss": "",
        "lr_scale": 1.0,
        "grad_norm": 1.0,
        "elapsed_s": float(step),
        "probe_s": 0.0,
    }


def probe_row(
    arm: str, seed: int, step: int, tokens: int, layer: int, head: int, site: str, metric: str, value: float
) -> dict:
    """One row of probes.csv, its fields in the table's column order."""
    return {
        "arm": arm,
        "seed": seed,
        "step": step,
        "tokens": tokens,
        "layer": layer,
        "head": head,
        "site": site,
        "metric": metric,
        "value": value,
    }


def write_run(
    root: Path, arm: str, seed: int, config: dict, points: list[tuple], *, summary: dict | None = None
) -> Path:
    """A run folder as the trainer leaves it: config.json, then for the i-th eval point
    `(tokens, loss, probes)` its scalars row at step i and its probe rows, `probes` being
    `(layer, head, site, metric, value)` tuples; done.json holds `summary`, and a run without one
    (stopped, or still going) has none."""
    rd = run_dir(root, arm, seed)
    store = RunStore(rd)
    write_record(rd / "config.json", config)
    for i, (t, v, probes) in enumerate(points):
        store.scalars.append([scalar_row(arm, seed, i, t, v)])
        if probes:
            store.probes.append([probe_row(arm, seed, i, t, *p) for p in probes])
    if summary is None:
        store.close()
    else:
        store.finish(summary)
    return rd


# --- the simple study ------------------------------------------------------------------------------


def make_study(
    root: Path,
    arms: dict[str, str],
    seeds: list[int],
    *,
    tokens=TOKENS,
    done=True,
    probes=True,
    name="demo",
    planned_seeds: list[int] | None = None,
) -> Path:
    """A study folder; `arms` maps the arm name written on disk to its value family in LOSS/PR."""
    root.mkdir(parents=True, exist_ok=True)
    write_record(
        root / "study.json",
        {
            "name": name,
            "preset": "tiny",
            "tokens": 400,
            "seeds": planned_seeds or seeds,
            "arms": {a: {"model.qk_norm": fam} for a, fam in arms.items()},
            "description": "hand-built test study",
        },
    )
    for arm, fam in arms.items():
        for seed in seeds:
            add_run(root, arm, fam, seed, tokens=tokens, done=done, probes=probes)
    return root


def add_run(
    root: Path, arm: str, fam: str, seed: int, *, tokens=TOKENS, done=True, probes=True, diverge_at: int | None = None
) -> Path:
    """One run of `arm` with the values of family `fam` at `tokens`: finished (`done`) or stopped,
    with key PR rows or none (`probes`). With `diverge_at`, its loss and key PR are NaN from the first
    point at or past it, where the run stops with a done.json that says it diverged."""
    config = {
        "arm": arm,
        "seed": seed,
        "model": {
            "n_layer": N_LAYER,
            "n_head": N_HEAD,
            "n_kv_head": N_HEAD,
            "head_dim": HEAD_DIM,
            "d_model": 16,
            "qk_norm": fam,
            "vocab_size": 64,
        },
        "optim": {"name": "muon"},
        "train": {"tokens": 400, "batch_size": 2, "seq_len": 8},
        "probe": {"sites": ["k"]},
    }
    points = []
    for t in tokens:
        bad = diverge_at is not None and t >= diverge_at
        heads = [
            (layer, head, "k", "pr_sv", float("nan") if bad else pr(fam, seed, layer, head, t))
            for layer in range(N_LAYER)
            for head in range(N_HEAD)
        ]
        points.append((t, float("nan") if bad else loss(fam, seed, t), heads if probes else []))
        if bad:
            break
    finished = done and diverge_at is None
    rd = write_run(root, arm, seed, config, points, summary={"tokens": tokens[-1]} if finished else None)
    if diverge_at is not None:
        message = f"run {arm} seed {seed} diverged at {diverge_at:,} tokens: val_loss is nan"
        write_record(rd / "done.json", {"status": "diverged", "arm": arm, "seed": seed, "message": message})
    return rd


def frames(study: Path):
    s = load_study(study)
    return s.scalars, s.probes, s


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5_000, f"{path} is suspiciously small"


# --- a realistic study: every metric, log-spaced eval points, seed noise ---------------------------

REAL_ARMS = {"no-norm": ("none", "muon"), "qk-norm": ("learned", "muon"), "qk-clip": ("none", "muon")}


def make_realistic_study(
    root: Path,
    *,
    seeds=(0, 1, 2),
    n_layer=8,
    n_head=4,
    head_dim=64,
    n_points=24,
    top=100_000_000,
    spectral_sites=("k", "k_pre", "q", "q_pre", "v", "o"),
    rank_grid=(1, 2, 4, 8, 16, 32, 64),
    rng_seed=0,
    preset="tiny",
) -> Path:
    """Three arms (no QK-Norm, learned QK-Norm with collapsing layers 1 and 3, QK-Clip) with seed
    effects shared across arms (same seed = same init and batches), every metric the trainer writes,
    and log-spaced eval points from 0 to `top` tokens."""
    rng = np.random.default_rng(rng_seed)
    tokens = [0] + np.unique(np.geomspace(16_384, top, n_points).astype(np.int64)).tolist()
    root.mkdir(parents=True, exist_ok=True)
    write_record(
        root / "study.json",
        {
            "name": "report4-demo",
            "preset": preset,
            "tokens": top,
            "seeds": list(seeds),
            "description": "Synthetic study: QK-Norm x QK-Clip under Muon, log-spaced eval points.",
            "arms": {
                a: {"model.qk_norm": qk, **({"model.qk_clip": 100.0} if a == "qk-clip" else {})}
                for a, (qk, _) in REAL_ARMS.items()
            },
        },
    )
    collapsed = {1, 3}
    seed_fx = {s: rng.normal(size=8) for s in seeds}  # shared by every arm of a seed
    for arm, (qk, opt) in REAL_ARMS.items():
        for s in seeds:
            fx = seed_fx[s]
            own = np.random.default_rng(hash((arm, s)) % 2**32)
            rd = run_dir(root, arm, s)
            rd.mkdir(parents=True, exist_ok=True)
            write_record(
                rd / "config.json",
                {
                    "arm": arm,
                    "seed": s,
                    "model": {
                        "n_layer": n_layer,
                        "n_head": n_head,
                        "n_kv_head": n_head,
                        "head_dim": head_dim,
                        "d_model": n_head * head_dim,
                        "qk_norm": qk,
                        "vocab_size": 49152,
                    },
                    "optim": {
                        "name": opt,
                        "muon_qkvo": "stacked",
                        "muon_ns": "polar_express",
                        **({"qk_clip_tau": 100.0} if arm == "qk-clip" else {}),
                    },
                    "train": {
                        "tokens": top,
                        "batch_size": 4,
                        "seq_len": 2048,
                        "eval_schedule": "log",
                        "eval_points": n_points,
                    },
                    "probe": {"sites": list(spectral_sites)},
                },
            )
            cols = SCALAR_COLUMNS + tuple(c for c in ("icl_score", "induction_loss") if c not in SCALAR_COLUMNS)
            sw, pw = TableWriter(rd / "scalars.csv", cols), TableWriter(rd / "probes.csv", PROBE_COLUMNS)
            off = {"no-norm": 0.03, "qk-norm": 0.0, "qk-clip": 0.02}[arm]
            pr_end = {"no-norm": 48.0, "qk-norm": 36.0, "qk-clip": 44.0}[arm]
            for step, t in enumerate(tokens):
                u = math.log10(1 + t / 16_384) / math.log10(1 + top / 16_384)  # 0 -> 1, log progress
                val = 3.3 + off * u + 7.5 * math.exp(-6 * u) + 0.02 * fx[0] + 0.004 * own.normal()
                row = {
                    "arm": arm,
                    "seed": s,
                    "step": step,
                    "tokens": t,
                    "train_loss": val + 0.01,
                    "val_loss": val,
                    "ood_loss": val + 0.8 + (0.03 if arm == "qk-norm" else 0) * u + 0.02 * fx[1] + 0.01 * own.normal(),
                    "icl_score": -0.05
                    - 0.6 * u**2
                    - (0.05 if arm == "no-norm" else 0) * u
                    + 0.02 * fx[2]
                    + 0.01 * own.normal(),
                    "induction_loss": 1.0
                    + 6.0 * math.exp(-4 * u)
                    + (0.15 if arm == "qk-norm" else 0) * u
                    + 0.05 * fx[3]
                    + 0.03 * own.normal(),
                    "lr_scale": 1.0,
                    "grad_norm": 1.0,
                    "elapsed_s": float(step),
                    "probe_s": 0.0,
                    "eval_s": 0.0,
                }
                rows = []
                key = {"arm": arm, "seed": s, "step": step, "tokens": t}

                def add(layer, head, site, metric, v, key=key, rows=rows):
                    rows.append(
                        {**key, "layer": layer, "head": head, "site": site, "metric": metric, "value": float(v)}
                    )

                for layer in range(n_layer):
                    dead = arm == "qk-norm" and layer in collapsed
                    target = 9.0 if dead else pr_end + 2 * math.sin(layer)
                    for head in range(n_head):
                        base = 55 + (target - 55) * u**1.3 + 1.5 * fx[4] * u + own.normal() * 1.2
                        base = float(np.clip(base, 1.5, head_dim))
                        for site in spectral_sites:
                            f = 1.0 if site == "k" else 0.9 if site.endswith("_pre") else 1.1
                            p = min(head_dim, base * f)
                            add(layer, head, site, "pr_sv", p)
                            add(layer, head, site, "pr_eig", 0.8 * p)
                            add(layer, head, site, "erank", min(head_dim, 1.2 * p))
                            add(layer, head, site, "stable_rank", max(1.0, p / 8))
                            add(layer, head, site, "r90", round(min(head_dim, 1.1 * p)))
                        add(
                            layer,
                            head,
                            "attn",
                            "entropy",
                            4.0 - 2.0 * u - (1.5 * u if dead else 0) + 0.1 * own.normal(),
                        )
                        add(layer, head, "attn", "max_logit", 4 + 10 * u + (18 * u if dead else 0) + own.normal())
                        ind = 0.05 + (0.7 * u if (layer, head) in ((2, 1), (5, 3)) else 0.03 * u)
                        add(
                            layer,
                            head,
                            "attn",
                            "induction_score",
                            min(1.0, ind * (0.8 if arm == "qk-norm" else 1) + 0.02 * abs(own.normal())),
                        )
                        for w in ("w_q", "w_k"):
                            sr = 12 - 4 * u - (6 * u if dead else 0) + 0.4 * own.normal()
                            add(layer, head, w, "stable_rank", max(1.0, sr))
                            add(layer, head, w, "pr_sv", max(1.0, 3 * sr))
                            add(layer, head, w, "spectral_norm", 1 + u + 0.1 * own.normal())
                    if qk == "learned":
                        for g in ("q_gain", "k_gain"):
                            add(layer, -1, g, "gain_mean", 1 + 0.5 * u)
                            add(layer, -1, g, "gain_cv", 0.1 + (0.9 if dead else 0.2) * u + 0.02 * own.normal())
                            add(layer, -1, g, "gain_near_zero", (0.3 if dead else 0.01) * u)
                    if t in (tokens[len(tokens) // 2], tokens[-1]):  # functional rank: mid-run and at the end
                        fr = max(1, round((0.35 if dead else 0.45) * (55 + (target - 55) * u**1.3) + own.normal()))
                        for site in ("k", "q"):
                            add(layer, -1, site, "functional_rank", fr)
                            for r in rank_grid:
                                add(layer, -1, site, f"dloss_r{r}", 0.0 if r >= head_dim else 0.01 * (fr / r) ** 2)
                sw.append([row])
                pw.append(rows)
            sw.close()
            pw.close()
            write_record(rd / "done.json", {"tokens": top})
    return root
