#!/usr/bin/env bash
# The GPU checks of issue 3, as one script for a machine with one CUDA GPU (about 10 minutes on an
# H100/H200): the seed-88m benchmark, then a short real study, with results under $OUT (or ./gpu-out).
set -euo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
# 1. throughput, MFU, memory, probe share for the seed's model (embedded corpus, 49k vocabulary)
rankscope bench --preset seed-88m --tokens 3M --no-progress 2>&1 | tee "$OUT/bench-seed-88m.txt"
# 2. a short real study: qk-muon at the seed's scale, 2M tokens per arm, timed
/usr/bin/time -v rankscope run qk-muon --preset seed-88m --tokens 2M --out "$OUT/study" --no-progress \
    2>&1 | tail -40 | tee "$OUT/study.txt"
cp "$OUT/study/report.md" "$OUT/report.md"
