"""One training run: train(cfg, out_dir) -> summary. One readable loop in labelled sections.

For a given seed every arm starts from the same initial weights (per-parameter seeding, see
`GPT.reset_parameters`) and sees the same batches in the same order (`BatchSampler` is a pure
function of (seed, step)); validation and probe batches are fixed by the data alone. So arms
compare seed by seed.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import RunConfig
from .data import TokenData, BatchSampler, fixed_batches, load_data
from .errors import RankscopeError
from .model import GPT
from .optim import build_optimizers, lr_scale, set_lr
from .probe import gpt_probe
from .store import RunStore, write_json


class RunDiverged(RankscopeError):
    """The loss became NaN or infinite; the rows written so far are kept."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RankscopeError(f"train.device={name} but CUDA is not available on this machine")
    return torch.device(name)


def provenance(cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    """Where and with what a run was made (modded-nanogpt's habit of logging its environment)."""
    src = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True, timeout=10)
            return out.stdout.strip() if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    return {
        "rankscope": __version__,
        "git_commit": commit,
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "seed": cfg.seed,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def eval_steps(total_steps: int, tokens_per_step: int, every_tokens: int) -> list[int]:
    """Steps (0..total_steps) at which to evaluate: token 0, every `every_tokens`, and the end."""
    steps = {0, total_steps}
    k = 1
    while k * every_tokens < total_steps * tokens_per_step:
        steps.add(math.ceil(k * every_tokens / tokens_per_step))
        k += 1
    return sorted(steps)


def train(cfg: RunConfig, out_dir: str | Path, data: TokenData | None = None, *, arm: str = "",
          progress: bool = True, progress_desc: str | None = None) -> dict[str, Any]:
    # --- setup: device, model, optimizers, data --------------------------------------------
    tc = cfg.train
    device = resolve_device(tc.device)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if data is None:
        data = load_data(cfg.data.path or None, cfg.model.vocab_size, progress=progress)
    if data.vocab_size > cfg.model.vocab_size:
        raise RankscopeError(f"data has vocab_size {data.vocab_size} > model.vocab_size {cfg.model.vocab_size}")
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model)
    model.reset_parameters(cfg.seed)
    model.to(device)
    optimizers, role_counts = build_optimizers(model, cfg.optim, fused=use_cuda)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_cuda else contextlib.nullcontext

    tokens_per_step = tc.batch_size * tc.seq_len
    total_steps = max(1, math.ceil(tc.tokens / tokens_per_step))
    sampler = BatchSampler(data.train, tc.batch_size, tc.seq_len, seed=cfg.seed)
    val_batches = [(x.to(device), y.to(device)) for x, y in fixed_batches(data.val, tc.eval_batches, tc.batch_size, tc.seq_len)]
    ood_batches = ([(x.to(device), y.to(device)) for x, y in fixed_batches(data.ood, tc.eval_batches, tc.batch_size, tc.seq_len)]
                   if data.ood else [])
    probe_batch = fixed_batches(data.val, 1, cfg.probe.batch_size, tc.seq_len)[0][0].to(device)
    probe = gpt_probe(model, cfg.probe.sites, attention=cfg.probe.attention) if cfg.probe.enabled else None

    out_dir = Path(out_dir)
    store = RunStore(out_dir)
    write_json(out_dir / "config.json", {
        "arm": arm, **cfg.to_dict(), "n_params": model.num_params(), "param_roles": role_counts,
        "data_source": data.source, "tokens_per_step": tokens_per_step, "steps": total_steps,
        "flops_per_token": model.flops_per_token(tc.seq_len),
    })
    write_json(out_dir / "provenance.json", provenance(cfg, device))

    # --- evaluation and probing (on fixed batches, the same for every arm) ---------------------
    @torch.no_grad()
    def mean_loss(batches: list) -> float:
        model.eval()
        with autocast():
            losses = [model(x, y) for x, y in batches]
        model.train()
        return torch.stack(losses).mean().item() if losses else float("nan")

    probe_seconds = 0.0

    def evaluate(step: int, train_loss: float, grad_norm: float, scale: float, t0: float) -> dict[str, Any]:
        nonlocal probe_seconds
        base = dict(arm=arm, seed=cfg.seed, step=step, tokens=step * tokens_per_step)
        row = dict(base, train_loss=train_loss, val_loss=mean_loss(val_batches),
                   ood_loss=mean_loss(ood_batches) if ood_batches else "", lr_scale=scale, grad_norm=grad_norm)
        probe_rows = []
        if probe is not None:
            tp = time.perf_counter()
            model.eval()
            with autocast():
                probe_rows = probe.measure([probe_batch])
            model.train()
            probe_seconds += time.perf_counter() - tp
            store.probes.append(dict(base, **r) for r in probe_rows)
        row.update(elapsed_s=time.perf_counter() - t0, probe_s=probe_seconds)
        store.scalars.append([row])
        key = [r["value"] for r in probe_rows if r["site"] == "k" and r["metric"] == "pr_sv"]
        row["key_pr"] = sum(key) / len(key) if key else float("nan")
        return row

    # --- the loop ------------------------------------------------------------------------------
    evals = set(eval_steps(total_steps, tokens_per_step, tc.eval_every))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_steps * tokens_per_step, unit="tok", unit_scale=True, dynamic_ncols=True,
                   desc=progress_desc or f"{arm or 'run'} seed {cfg.seed}", leave=True)
    loss_sum = torch.zeros((), device=device)
    norm_sum = torch.zeros((), device=device)
    n_since = 0
    scale = lr_scale(0, tc.tokens, cfg.optim)
    last: dict[str, Any] = {}
    t0 = time.perf_counter()
    model.train()
    try:
        for step in range(total_steps + 1):
            # evaluate + probe at the scheduled points; the only place losses are read on the host
            if step in evals:
                train_loss = (loss_sum / n_since).item() if n_since else float("nan")
                grad_norm = (norm_sum / n_since).item() if n_since else float("nan")
                last = evaluate(step, train_loss, grad_norm, scale, t0)
                loss_sum.zero_(), norm_sum.zero_()
                n_since = 0
                bad = [k for k in ("train_loss", "val_loss") if step > 0 and not math.isfinite(last[k])]
                if bad:
                    raise RunDiverged(f"run {arm or ''} seed {cfg.seed} diverged: {bad[0]} is {last[bad[0]]} "
                                      f"at {step * tokens_per_step:,} tokens (rows up to here are kept)")
                if bar is not None:
                    bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{last['val_loss']:.3f}",
                                    pr=f"{last['key_pr']:.1f}", refresh=False)
            if step == total_steps:
                break

            # one optimizer step on the next batch
            scale = lr_scale(step * tokens_per_step, tc.tokens, cfg.optim)
            set_lr(optimizers, scale)
            x, y = sampler.batch(step)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast():
                loss = model(x, y)
            loss.backward()
            if cfg.optim.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            for opt in optimizers:
                opt.step()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            norm_sum += norm.detach()
            n_since += 1
            if bar is not None:
                bar.update(tokens_per_step)
    finally:
        if bar is not None:
            bar.close()
        store.close()

    elapsed = time.perf_counter() - t0
    summary = {
        "status": "done", "arm": arm, "seed": cfg.seed, "steps": total_steps,
        "tokens": total_steps * tokens_per_step, "elapsed_s": elapsed, "probe_s": probe_seconds,
        "tokens_per_s": total_steps * tokens_per_step / elapsed, "final_val_loss": last.get("val_loss"),
        "final_key_pr": last.get("key_pr"),
    }
    store.finish(summary)
    return summary
