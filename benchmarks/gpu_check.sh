#!/usr/bin/env bash
# The GPU checks, as one script for a machine with one CUDA GPU (about 11 minutes on an H100/H200):
# the seed-88m benchmark, Muon's cost by grouping and iteration at the seed's shapes, the probe's
# eigenvalues on the device against the host, then a short real muon-grouping study at the seed's
# scale, with results under $OUT (or ./gpu-out).
# FINDINGS.md's full GPU command is the same study at 25M tokens and 3 seeds (about 6 GPU-hours).
set -euo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
# 1. throughput, MFU, memory, probe share for the seed's model (embedded corpus, 49k vocabulary)
rankscope bench --preset seed-88m --tokens 3M --no-progress 2>&1 | tee "$OUT/bench-seed-88m.txt"
# 2. the optimizer step alone at the seed's shapes, per grouping and iteration
(cd benchmarks && python bench_muon.py --preset seed-88m --optimizer-only --rounds 5 --steps 3) \
    2>&1 | tee "$OUT/bench-muon-seed-88m.txt"
# 3. the probe's eigenvalues: torch on the GPU (one matrix at a time above 32x32) against the host
#    path, at the seed-88m (176 x 64x64) and seed-1.5b (512 x 128x128) shapes, float64 and float32,
#    with the two paths' agreement; then the probe's Grams with TF32 on against float64 (about a minute)
(cd benchmarks && python bench_probe_eig.py --repeats 7) 2>&1 | tee "$OUT/bench-probe-eig.txt"
# 4. a short real study: the grouping confound at the seed's scale, 1M tokens per arm, timed
/usr/bin/time -v rankscope run muon-grouping --preset seed-88m --tokens 1M --out "$OUT/study" --no-progress \
    2>&1 | tail -40 | tee "$OUT/study.txt"
cp "$OUT/study/report.md" "$OUT/report.md"
