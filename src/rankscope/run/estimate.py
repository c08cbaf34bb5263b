"""What a run will need before it starts: its peak memory, from the config alone, and its time.

Memory is counted, not guessed: the parameters by role on a model built on the `meta` device (no
storage), their gradients and the optimizer's state (Muon one momentum buffer per matrix, AdamW
two moments), and the activations a training step keeps for its backward pass. Those were
measured term by term with `torch.autograd.graph.saved_tensors_hooks` on this model (the test
holds the formula to the measurement at several shapes): per token and layer, in floats,

    4·D + 2·F + 2·H·E + 2·G·E + H + 2        (+ H·E + G·E + H + G with QK-Norm)

(two RMSNorms' normalised input and output, the MLP's hidden and squared-ReLU output, Q, K, V and
their rotated copies, attention's output and log-sum-exp), plus 2·D + 3 a token for the final norm
and the head. With activation checkpointing a layer keeps only its input (D a token) and one layer
is recomputed at a time. On CUDA under bf16 autocast, the matmul side is stored in 2 bytes and
each norm keeps its float32 input beside a bf16 copy; the training head forms float32 logits
and cross-entropy's copies (10 bytes a logit), where the CPU's chunked head never does.

An evaluation forward runs `eval_group` whole `train.batch_size` batches without gradients (one
layer's transient at a time, and the head in chunks); the probe runs `probe.batch_size` sequences
with its attention logits in chunks of 512 queries. The peak of the run is the largest of the three on top of what
stays resident (weights and optimizer state); on a CPU, twice the tensors counted
(`CPU_PROCESS_FACTOR`: what a process's resident memory measured above them).

Time is `model.flops_per_token` x tokens (and the evaluations' forward passes) over a matmul rate
measured here, at the fraction of it a step reaches (BENCHMARKS.md: 50-70% on a 2-core CPU).
It is a guide to within a factor of about 2, for seeing a run that will not fit a job's limit
before it starts.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..errors import ConfigError
from ..settings.config import RunConfig
from .cadence import run_cadence

# Of the measured matmul rate, the share a training step reaches (model FLOPs over time): on the
# 2-core CPU 61% eager and 64-69% compiled at the tiny preset (BENCHMARKS.md, issue 13); a GPU's
# small-model steps reach far less of a large bf16 matmul's rate.
STEP_EFFICIENCY = {"cpu": 0.55, "cuda": 0.35, "mps": 0.35}
ATTENTION_CHUNK = 512  # queries per chunk of the probe's attention logits (measure/attention.py)
# A CPU process peaks above the tensors it holds: glibc keeps freed blocks (train.keep_freed_memory
# raises its thresholds on purpose) and fragments them, and torch's runtime (oneDNN's scratch
# buffers, OpenMP's threads) grows on first use. Measured over a short run of four shapes (tiny,
# tiny with 128 probe sequences, d_model 384, deep; BENCHMARKS.md): the resident peak above the
# process's start was 1.1-2.4x the tensors counted here. A CUDA peak is tensors alone.
CPU_PROCESS_FACTOR = 2.0
# An evaluation forward holds at most this many tokens (issue 20). One eager forward of seed-88m's
# 4 x 2048 batch on a GPU is 1,326 kernel launches for 6.5 ms of FLOPs, at the balance of launching
# and computing (BENCHMARKS.md); four batches at once are compute-bound with room to spare. On a CPU
# grouping costs and saves nothing measurable.
EVAL_FORWARD_TOKENS = 32_768


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a run will hold beside what the process holds already (torch itself, the data)."""

    params: int
    resident: int  # weights, and the optimizer's state, held through the run
    train: int  # a training step's peak: resident + gradients + activations + the backward's transient
    evaluation: int  # an evaluation's peak: resident + one layer of its forward's batches + the head's chunk
    probe: int  # the probe's peak: resident + its batch's layer transient and attention chunk
    eval_group: int = 1  # validation batches one evaluation forward runs (`eval_group`)

    @property
    def peak(self) -> int:
        return max(self.train, self.evaluation, self.probe)

    @property
    def setting(self) -> str:
        """The setting to lower when the peak does not fit: the one that drives the largest part."""
        if self.peak == self.probe and self.probe > self.train:
            return "probe.batch_size"
        if self.peak - self.resident < self.resident:
            return "the model's size (model.n_layer, model.d_model, model.d_mlp)"
        if self.peak == self.evaluation and self.evaluation > self.train:
            return "train.batch_size (an evaluation runs one whole batch)"
        return "train.batch_size, or raise train.grad_accum (or turn on train.activation_checkpointing)"


def param_counts(cfg: RunConfig) -> dict[str, int]:
    """Trainable parameters by role ('matrix', 'embedding', 'gain') and 'total', from a model
    built on the meta device: exact, and free at any size."""
    import torch

    from ..core.model import GPT

    with torch.device("meta"):
        model = GPT(cfg.model)
    counts = {role: sum(p.numel() for _, p in ps) for role, ps in model.param_roles().items()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def layer_floats(cfg: RunConfig) -> int:
    """Floats a training step keeps per token and layer for the backward pass (module docstring)."""
    m = cfg.model
    he, ge = m.n_head * m.head_dim, m.n_kv_head * m.head_dim
    n = 4 * m.d_model + 2 * m.d_mlp + 2 * he + 2 * ge + m.n_head + 2
    if m.qk_norm != "none":
        n += he + ge + m.n_head + m.n_kv_head
    return n


def memory(cfg: RunConfig, device_type: str = "cpu", world_size: int = 1) -> MemoryEstimate:
    """The peak memory of one process of a run (module docstring), in bytes."""
    m, tc = cfg.model, cfg.train
    counts = param_counts(cfg)
    params = counts["total"]
    muon = counts["matrix"] if cfg.optim.name == "muon" else 0
    state = 4 * (muon // world_size + 2 * (counts["total"] - muon))  # Muon's momentum shards across ranks
    resident = 4 * params + state
    gradients = 4 * params
    cuda = device_type == "cuda"
    rows = max(1, tc.batch_size // (tc.grad_accum * world_size))  # one micro-batch of this rank
    tokens = rows * tc.seq_len
    per_layer = layer_floats(cfg)
    # bytes a float of the saved activations takes: 4 on CPU; under bf16 autocast about 2.4 (the
    # norms' float32 inputs are 4·D of the per-layer floats, the rest is bf16)
    unit = 4.0 if not cuda else (4 * 4 * m.d_model + 2 * (per_layer - 4 * m.d_model)) / per_layer
    if tc.activation_checkpointing:
        kept = tokens * m.n_layer * m.d_model * 4 + tokens * per_layer * unit  # inputs + one recomputed layer
    else:
        kept = tokens * m.n_layer * per_layer * unit
    head_kept = tokens * (2 * m.d_model + 3) * 4
    if cuda:  # bf16 logits, their float32 copy and log-softmax's float32 output
        head = tokens * m.vocab_size * 10
    else:  # the chunked head keeps dW and forms 512 rows of logits at a time
        head = m.vocab_size * m.d_model * 4 + 512 * m.vocab_size * 4 * 2
    backward = 2 * tokens * per_layer * unit  # one layer's activation gradients in flight
    train = resident + gradients + kept + head_kept + head + backward

    def forward(n_rows: int) -> float:
        """A no-grad forward over n_rows sequences: one layer's transient and the head's chunk."""
        t = n_rows * tc.seq_len
        chunk = (512 if not cuda else max(1, (1 << 24) // m.vocab_size)) * m.vocab_size * 4 * 2
        return t * (2 * m.d_model * 4 + per_layer * unit) + chunk

    # the largest divisor of eval_batches (so every forward holds as many rows and the mean over
    # forwards is the mean over batches) within EVAL_FORWARD_TOKENS whose forward stays under a
    # training step's peak: grouping never raises the run's peak
    group = max(
        (
            g
            for g in range(2, tc.eval_batches + 1)
            if tc.eval_batches % g == 0
            and g * tc.batch_size * tc.seq_len <= EVAL_FORWARD_TOKENS
            and resident + forward(g * tc.batch_size) <= train
        ),
        default=1,
    )
    evaluation = resident + forward(group * tc.batch_size)
    probe = resident
    if cfg.probe.enabled:
        b = cfg.probe.batch_size
        attention = 0
        if cfg.probe.attention:  # float32 logits of a chunk of queries and their softmax
            attention = 2 * b * m.n_head * min(ATTENTION_CHUNK, tc.seq_len) * tc.seq_len * 4
        sites = len(cfg.probe.sites) * b * tc.seq_len * m.n_head * m.head_dim * 4 * m.n_layer
        probe += forward(b) + attention + sites
    f = 1.0 if cuda else CPU_PROCESS_FACTOR
    return MemoryEstimate(params, int(f * resident), int(f * train), int(f * evaluation), int(f * probe), group)


def eval_group(cfg: RunConfig, device_type: str = "cpu", world_size: int = 1) -> int:
    """How many of the `train.eval_batches` validation (and out-of-distribution) batches one
    evaluation forward of a run of `cfg` runs at once: the largest divisor of `eval_batches` whose
    batches hold at most `EVAL_FORWARD_TOKENS` tokens and whose forward needs no more memory than a
    training step of this process (1 where one batch is over either already)."""
    return memory(cfg, device_type, world_size).eval_group


def available_memory(device) -> int | None:
    """Bytes a run can still take: CUDA's free memory on its device, or the CPU's available RAM
    (Linux's MemAvailable; the physical total elsewhere). None where neither can be read."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def fmt_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; binary units, as memory is sold and reported."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_memory(cfg: RunConfig, device, world_size: int = 1, what: str = "") -> tuple[MemoryEstimate, int | None]:
    """The estimate, and the memory available; one line (ConfigError) when the estimate does not fit."""
    est = memory(cfg, device.type, world_size)
    free = available_memory(device)
    if free is not None and est.peak > free:
        where = "the GPU has" if device.type == "cuda" else "this machine has"
        raise ConfigError(
            f"{what + ': ' if what else ''}a run needs about {fmt_bytes(est.peak)} of memory (estimated) and "
            f"{where} {fmt_bytes(free)} available: lower {est.setting}"
        )
    return est, free


def seconds(cfg: RunConfig, rate: float, device_type: str = "cpu", world_size: int = 1) -> float:
    """Expected seconds of a run at a measured matmul `rate` (FLOP/s of one device): training
    FLOPs plus the evaluations' forward passes, at `STEP_EFFICIENCY` of the rate."""
    import torch

    from ..core.model import GPT

    tc = cfg.train
    with torch.device("meta"):
        per_token = GPT(cfg.model).flops_per_token(tc.seq_len)
    cadence = run_cadence(cfg)
    tokens_per_step, steps, n_evals = cadence.tokens_per_step, cadence.total_steps, len(cadence.evals)
    # an evaluation: validation (and as many out-of-distribution) batches forward, a third of a
    # training token's FLOPs each, and the probe's batch
    eval_tokens = 2 * tc.eval_batches * tokens_per_step + cfg.probe.batch_size * tc.seq_len
    flops = steps * tokens_per_step * per_token + n_evals * eval_tokens * per_token / 3
    return flops / (rate * world_size * STEP_EFFICIENCY.get(device_type, 0.35))


def fmt_time(s: float) -> str:
    """Seconds in the unit a person plans with: '40 s', '12 min', '3.5 h', '2.1 days'."""
    if s < 90:
        return f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def memory_line(runs, world_size: int = 1) -> list[str]:
    """Check that every run of `runs` ((arm, config) pairs) fits its device's memory, before
    anything is written (ConfigError, one line naming the setting to lower, when one does not), and
    say what the largest needs: the line a study prints at its start."""
    from .build import resolve_device

    worst: tuple[int, str, int | None] | None = None
    for arm, cfg in runs:
        device = resolve_device(cfg.train.device)
        est, free = check_memory(cfg, device, world_size, what=f"{arm} seed {cfg.seed}")
        if worst is None or est.peak > worst[0]:
            worst = (est.peak, device.type, free)
    if worst is None:
        return []
    peak, kind, free = worst
    where = "the GPU has" if kind == "cuda" else "this machine has"
    return [
        f"rankscope: memory: about {fmt_bytes(peak)} a process at its peak (estimated"
        + (f"; {where} {fmt_bytes(free)} available)" if free is not None else ")")
    ]


def time_line(runs, world_size: int = 1) -> list[str]:
    """How long `runs` ((arm, config) pairs, each from its start) should take on this machine."""
    from .bench import matmul_rate
    from .build import resolve_device

    total, rates = 0.0, {}
    for _, cfg in runs:
        device = resolve_device(cfg.train.device)
        if str(device) not in rates:
            rates[str(device)] = matmul_rate(device, reps=3, scale=2)  # milliseconds
        total += seconds(cfg, rates[str(device)], device.type, world_size)
    if not runs:
        return []
    n = len(runs)
    return [
        f"rankscope: time: about {fmt_time(total)} for {n} run{'s' if n != 1 else ''} from the start "
        "(FLOPs at a matmul rate measured now; a guide within a factor of 2)"
    ]


def busy_line(runs) -> list[str]:
    """A line when this machine's CPUs are busy already and a CPU run would take all of them: two
    processes that each use every core train at under half their rate together, where one thread
    each (cores / processes) keeps the sum (BENCHMARKS.md, benchmarks/bench_sharing.py)."""
    cpus = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # not on this platform
        return []
    all_threads = [cfg for _, cfg in runs if cfg.train.threads == 0 and cfg.train.device in ("auto", "cpu")]
    if not all_threads or load < cpus:
        return []
    return [
        f"rankscope: this machine is busy (load {load:.1f} on {cpus} CPUs) and each run takes every core: "
        f"processes side by side each slow down by more than their number; for runs side by side, "
        f"--set train.threads=N with N = {cpus} / processes"
    ]
