#!/usr/bin/env bash
# One prepared GPU session: parity checks (doctor) and the scoring benchmark, results under $OUT.
# Run on the device machine from the repo root, with target-cuda/dist carried there:
#   bash scripts/device-check.sh
set -uo pipefail
D=target-cuda/dist
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
run() { QUIET=${QUIET:-1} bash $D/run-on-device.sh $D/glowwatch "$@"; }
QUIET=0 run doctor --device cuda:0 --config small --batch 32 2>&1 | tee "$OUT/doctor.log"
run doctor --device cuda:0 --config paper --batch 16 2>&1 | tee -a "$OUT/doctor.log"
# Reference figures (../shared/docs/performance.md, batch 1024): paper RGB best 5,418 img/s (TF32),
# paper grey best 5,292 (TF32). H200 bf16 dense peak ~790 TFLOP/s.
run bench --device cuda:0 --config paper --batch 256,1024 --precision f32,tf32,bf16 --runs 5 --profile \
    --peak-tflops 790 --reference-ips 5418 --json "$OUT/bench-paper3.json" 2>&1 | tee "$OUT/bench.log"
run bench --device cuda:0 --config paper1 --batch 256,1024 --precision f32,tf32,bf16 --runs 5 \
    --peak-tflops 790 --reference-ips 5292 --json "$OUT/bench-paper1.json" 2>&1 | tee -a "$OUT/bench.log"
run bench --device cuda:0 --config small,small3 --batch 256,1024 --precision f32,tf32,bf16 --runs 5 \
    --peak-tflops 790 --json "$OUT/bench-small.json" 2>&1 | tee -a "$OUT/bench.log"
