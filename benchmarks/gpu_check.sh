#!/usr/bin/env bash
# The GPU checks as one verdict, for a machine with one CUDA GPU (under 8 minutes on an H100): a bf16
# training step eager vs compiled, `rankscope bench --preset seed-88m`, the probe's eigenvalues on
# the device vs the host, a resumed run's peak memory, seed-1.5b's memory extrapolated to its 32
# layers, and a short real qk-muon study at seed-88m. One line `PASS|FAIL name: figure` per check,
# then `N PASS, M FAIL`; exit code 1 if any failed. Small text logs under $OUT (default ./gpu-out).
# The logic is benchmarks/gpu_check.py; `bash benchmarks/gpu_check.sh --dry-run` runs every check's
# code path on the CPU at tiny sizes. No `set -e`: one failing check must not hide the others.
cd "$(dirname "$0")/.." || exit 2
exec python benchmarks/gpu_check.py "$@"
