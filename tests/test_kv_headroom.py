"""KV-cache headroom: the per-kv-head rank at tolerance (headroom.kv_headroom), its bytes per token,
and its table and figure in the study report."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from _headroom import CFG, E, batch, rank3_model, table
from _studies import make_realistic_study

from rankscope.measure.headroom import kv_headroom, r90_from_eigenvalues
from rankscope.report.kv_headroom import (
    PLOT,
    bytes_saved_per_token,
    headroom_frame,
    headroom_table,
)
from rankscope.settings.config import RunConfig
from rankscope.storage.store import PROBE_COLUMNS, TableWriter, load_probes


@pytest.mark.parametrize("tol", [0.01, 1e-4])
def test_rank_three_keys_need_at_most_four_dimensions_before_rope(tol):
    model = rank3_model()
    x, y = batch()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = kv_headroom(model, x, y, tol=tol)
    t = table(rows)
    assert len(rows) == 2 * CFG.n_layer * CFG.n_kv_head * 3  # sites x layers x kv heads x metrics
    assert t[("k_pre", 1, 0, "kv_rank")] <= 4  # the smallest ladder rung >= 3
    assert t[("k_pre", 1, 0, "kv_r90")] <= 3  # the keys' energy lies in 3 directions
    assert t[("k_pre", 1, 0, "kv_dloss")] <= tol
    for (_site, _layer, _head, metric), v in t.items():
        assert 1 <= v <= E if metric != "kv_dloss" else v <= tol
    assert not any(tap._forward_hooks for b in model.blocks for tap in b.attn.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_projecting_onto_the_exact_key_subspace_keeps_the_loss():
    """At rank 4 the top-4 directions hold the 3-dim key subspace: the loss is unchanged to float
    precision. On the ladder (4, 16) the search measures rank 4 alone: within a 1e-6 tolerance,
    with a dloss of projection round-off, and the same as a direct projected forward's."""
    model = rank3_model()
    x, y = batch()
    t = table(kv_headroom(model, x, y, sites=("k_pre",), tol=1e-6, ladder=[4, 16]))
    assert t[("k_pre", 1, 0, "kv_rank")] == 4
    assert abs(t[("k_pre", 1, 0, "kv_dloss")]) < 1e-6
    # the same number from a direct projected forward of that head alone
    acts = {}
    hook = model.blocks[1].attn.k_pre.register_forward_hook(lambda m, i, o: acts.setdefault("k", o))
    with torch.no_grad():
        full = model(x, y).item()
    hook.remove()
    a = acts["k"][:, :, 0].float().flatten(0, 1)  # (N, E)
    v = torch.linalg.eigh((a.T @ a).double()).eigenvectors[:, -4:]
    p = (v @ v.T).float()

    def project(m, i, o):
        o = o.clone()
        o[:, :, 0] = o[:, :, 0] @ p
        return o

    hook = model.blocks[1].attn.k_pre.register_forward_hook(project)
    with torch.no_grad():
        projected = model(x, y).item()
    hook.remove()
    assert abs((projected - full) / full) < 1e-6
    assert t[("k_pre", 1, 0, "kv_dloss")] == pytest.approx((projected - full) / full, abs=1e-7)


def test_r90_from_eigenvalues():
    ev = torch.tensor([[0.0, 0.0, 1.0, 9.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert r90_from_eigenvalues(ev).tolist() == [1.0, 4.0, 0.0]


def test_bad_arguments():
    model = rank3_model()
    x, y = batch()
    with pytest.raises(ValueError):
        kv_headroom(model, x, y, sites=("q",))
    with pytest.raises(ValueError):
        kv_headroom(model, x, y, ladder=[0, 4])
    with pytest.raises(ValueError):
        kv_headroom(model, x, y, tol=-1)


def test_bytes_saved_per_token_closed_form():
    # 2 layers x 2 kv heads, head_dim 16, bf16: (16-4) + (16-16) + (16-8) + (16-2) = 34 values
    assert bytes_saved_per_token([4, 16, 8, 2], 16) == 34 * 2
    assert bytes_saved_per_token([4, 16, 8, 2], 16, bytes_per_value=4) == 34 * 4
    assert bytes_saved_per_token([64] * 88, 64) == 0.0


def test_default_settings():
    p = RunConfig().probe
    assert p.kv_headroom == "end" and p.kv_tolerance == 0.01


# --- the study report -----------------------------------------------------------------------------------


def add_kv_rows(root, n_layer=3, n_kv=2, head_dim=16, floor_before_rope=False):
    """Append kv rows at each run's last point: rank 2^(layer+1) before RoPE, twice that after,
    r90 = rank + head - 1 (seed-independent); `floor_before_rope`: rank 1 before RoPE everywhere,
    as in a model that barely uses its keys yet."""
    for rd in sorted(p.parent for p in root.rglob("done.json")):
        probes = load_probes(rd)
        last = probes[probes["tokens"] == probes["tokens"].max()].iloc[0]
        key = {c: last[c] for c in ("arm", "seed", "step", "tokens")}
        rows = []
        for layer in range(n_layer):
            for g in range(n_kv):
                for site, f in (("k_pre", 1), ("k", 2)):
                    r = 1 if floor_before_rope and site == "k_pre" else min(head_dim, f * 2 ** (layer + 1))
                    for metric, v in (("kv_rank", r), ("kv_dloss", 0.005), ("kv_r90", min(head_dim, r + g - 1))):
                        rows.append({**key, "layer": layer, "head": g, "site": site, "metric": metric, "value": v})
        w = TableWriter(rd / "probes.csv", PROBE_COLUMNS)
        w.append(rows)
        w.close()


def test_headroom_table_numbers(tmp_path):
    root = make_realistic_study(tmp_path / "s", seeds=(0, 1), n_layer=3, n_head=2, head_dim=16, n_points=4)
    add_kv_rows(root)
    from rankscope.report.load import load_study

    study = load_study(root)
    frame = headroom_frame(study.probes, study.arms)
    tab = headroom_table(frame, 16, arms=study.arms)
    assert len(tab) == 3 * 2  # arms x sites
    pre = tab[(tab["arm"] == study.arms[0]) & (tab["site"] == "k_pre")].iloc[0]
    # ranks 2, 4, 8 per layer, 2 kv heads: saved (14 + 12 + 8) x 2 heads x 2 bytes; full 6 x 16 x 2
    assert pre["heads"] == 6 and pre["seeds"] == 2
    assert pre["full_bytes"] == 6 * 16 * 2
    assert pre["saved_bytes"] == (14 + 12 + 8) * 2 * 2
    assert pre["rank"] == pytest.approx(14 / 3)
    # r90 = rank - 1 on head 0, rank on head 1: one entry below per layer and seed
    assert pre["saved_r90_bytes"] == ((15 + 13 + 9) + (14 + 12 + 8)) * 2
    assert pre["r90_below"] == 3 * 2
    post = tab[(tab["arm"] == study.arms[0]) & (tab["site"] == "k")].iloc[0]
    assert post["saved_bytes"] == (12 + 8 + 0) * 2 * 2


def test_report_has_kv_headroom_table_and_figure(tmp_path):
    from rankscope.report import write_report

    root = make_realistic_study(tmp_path / "s", seeds=(0, 1), n_layer=3, n_head=2, head_dim=16, n_points=4)
    add_kv_rows(root)
    md = write_report(root).read_text()
    assert "## KV-cache headroom" in md
    assert f"plots/{PLOT}" in md
    assert (root / "plots" / PLOT).is_file()
    section = md.split("## KV-cache headroom")[1].split("\n## ")[0]
    assert "rank at 1%" in section and "r90" in section and "bf16" in section
    assert "`k_pre`" in section and "`k`" in section
    html = (root / "report.html").read_text()
    assert "KV-cache headroom" in html


def test_headroom_at_the_floor_is_named_as_such(tmp_path):
    """Every head before RoPE at rank 1, the bottom of the ladder: the table, the figure, the
    summary and analyze's markdown say the keys are barely used and the saving is an upper bound."""
    from rankscope.report import write_report
    from rankscope.report.kv_headroom import analyze_markdown
    from rankscope.report.load import load_study

    root = make_realistic_study(tmp_path / "s", seeds=(0, 1), n_layer=3, n_head=2, head_dim=16, n_points=4)
    add_kv_rows(root, floor_before_rope=True)
    study = load_study(root)
    tab = headroom_table(headroom_frame(study.probes, study.arms), 16, arms=study.arms)
    pre, post = (tab[(tab["arm"] == study.arms[0]) & (tab["site"] == s)].iloc[0] for s in ("k_pre", "k"))
    assert (pre["floor"], pre["rows"], pre["floor_dloss"]) == (12, 12, 0.005) and post["floor"] == 0
    md = write_report(root).read_text()
    section = md.split("## KV-cache headroom")[1].split("\n## ")[0]
    assert "1.0 (floor)" in section and "≤ bound" in section
    assert (
        "every kv head at rank 1, the smallest rank tried (projecting to one direction costs at most 0.5% loss)"
        in section
    )
    assert "saving is an upper bound for a model that does not need its keys yet" in section
    summary = md.split("## Summary")[1].split("\n## ")[0]
    assert "KV-cache headroom is at its floor for" in summary and "(keys before RoPE)" in summary
    assert "(keys after RoPE)" not in summary  # after RoPE the heads need 4 to 16 dimensions
    assert "At rank 1, the bottom of the ladder" in md  # the figure's caption
    text = analyze_markdown(tab[tab["arm"] == study.arms[0]], 0.01)
    assert "| 1.0 (floor) |" in text and "upper bound" in text


def test_report_without_kv_rows_has_no_section(tmp_path):
    from rankscope.report import write_report

    root = make_realistic_study(tmp_path / "s", seeds=(0,), n_layer=2, n_head=2, head_dim=16, n_points=3)
    md = write_report(root).read_text()
    assert "KV-cache headroom" not in md
    assert isinstance(headroom_frame(pd.DataFrame()), pd.DataFrame)


# --- the trainer and `rankscope analyze` -----------------------------------------------------------------


def test_a_run_writes_kv_rows_at_the_end_and_analyze_writes_the_table(tmp_path, monkeypatch):
    from _runs import config, shards

    from rankscope.analyze import analyze
    from rankscope.analyze.headroom import HEADROOM_TABLE
    from rankscope.run.train import train
    from rankscope.storage.store import read_table

    monkeypatch.setenv("RANKSCOPE_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "qk" / "seed-0"
    cfg = config(shards(tmp_path))
    train(cfg, run, progress=False, arm="qk")
    probes = load_probes(run)
    kv = probes[probes["metric"].isin(["kv_rank", "kv_dloss", "kv_r90"])]
    m = cfg.model
    assert set(kv["step"]) == {probes["step"].max()}  # at the end only
    assert len(kv) == 2 * m.n_layer * m.n_kv_head * 3 and set(kv["site"]) == {"k_pre", "k"}
    ranks = kv[kv["metric"] == "kv_rank"]["value"]
    assert ranks.between(1, m.head_dim).all()

    res = analyze(run, device="cpu")
    table = read_table(res.out / HEADROOM_TABLE)
    assert list(table.columns) == list(PROBE_COLUMNS) and len(table) == len(kv)
    assert "## KV-cache headroom" in res.summary and "bf16" in res.summary
    assert "## KV-cache headroom" in (res.out / "summary.md").read_text()
    assert table[table["metric"] == "kv_rank"]["value"].between(1, m.head_dim).all()
    assert res.kv_plot is not None and res.kv_plot.name == PLOT and res.kv_plot.is_file()


def test_kv_caption_speaks_of_seeds_only_when_there_are_several(tmp_path):
    from rankscope.report.kv_headroom import plot_kv_headroom
    from rankscope.report.load import load_study

    for seeds in ((0,), (0, 1)):
        root = make_realistic_study(
            tmp_path / f"s{len(seeds)}", seeds=seeds, n_layer=2, n_head=2, head_dim=16, n_points=3
        )
        add_kv_rows(root, n_layer=2)
        study = load_study(root)
        frame = headroom_frame(study.probes, study.arms)
        plot = plot_kv_headroom(frame, study.arms, {a: "C0" for a in study.arms}, tmp_path / f"kv{len(seeds)}.png")
        assert ("mean over seeds" in plot.caption) == (len(seeds) > 1)
