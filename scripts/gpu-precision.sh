#!/usr/bin/env bash
# One prepared GPU session (issue 22, the part prepared without a GPU): every score's AUROC of
# the shipped models in f32, tf32, bf16 and bf16-all, side by side, on Fashion-MNIST test vs
# MNIST and vs the general validation set, plus the paper config's scoring throughput in each
# precision. Results under $OUT (at most 8 files come back): eval-<precision>.json (4),
# bench-paper.json, precision.log. Compare them on the CPU afterwards:
#   python3 scripts/compare_precisions.py <dir with eval-*.json>
# The eval sets do not travel from ../shared: scripts/gpu-precision.sh --prepare copies them
# into gpu-eval/ (11 MB, ignored by git); carry it:
#   run(command='bash scripts/gpu-precision.sh', carry=['target-cuda/dist','gpu-eval'], timeout_s=600)
# Rehearsal on the CPU (f32 and bf16 only; tf32 is CUDA's):
#   GW=target/release/glowwatch DEVICE=cpu PRECISIONS="f32 bf16" MAX_ROWS=500 OUT=/tmp/prec bash scripts/gpu-precision.sh
set -uo pipefail
if [ "${1:-}" = "--prepare" ]; then
  cd "$(dirname "$0")/.."
  mkdir -p gpu-eval
  grep -qx 'gpu-eval/' .git/info/exclude 2>/dev/null || echo 'gpu-eval/' >> .git/info/exclude
  cp ../shared/datasets/{fashion_mnist_test,mnist,general_mix_val}.parquet gpu-eval/
  du -sh gpu-eval; exit 0
fi
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
WORK=${WORK:-/tmp/gpu-precision-work}; mkdir -p "$WORK"
DEVICE=${DEVICE:-cuda:0}
DATA=${DATA:-gpu-eval}
PRECISIONS=${PRECISIONS:-f32 tf32 bf16 bf16-all}
MAX_ROWS=${MAX_ROWS:-10000}
MODEL=${MODEL:-models/fashion-mnist-outlier.safetensors}
GENERAL=${GENERAL:-models/general-mix.safetensors}
if [ -n "${GW:-}" ]; then
  gw() { "$GW" "$@"; }
else
  gw() { QUIET=${QUIET:-1} bash target-cuda/dist/run-on-device.sh target-cuda/dist/glowwatch "$@"; }
fi
log="$OUT/precision.log"
echo "device $DEVICE model $MODEL general $GENERAL rows $MAX_ROWS" | tee "$log"
for p in $PRECISIONS; do
  t0=$SECONDS
  gw eval --device "$DEVICE" --precision "$p" --model "$MODEL" --general "$GENERAL" \
    --in-data "$DATA/fashion_mnist_test.parquet" \
    --ood mnist="$DATA/mnist.parquet" general="$DATA/general_mix_val.parquet" \
    --max-rows "$MAX_ROWS" --out-dir "$WORK/eval-$p" >> "$log" 2>&1
  echo "$p: exit $? after $(( SECONDS - t0 ))s" | tee -a "$log"
  cp "$WORK/eval-$p/eval.json" "$OUT/eval-$p.json" 2>/dev/null
done
if [ "$DEVICE" != "cpu" ]; then
  gw bench --device "$DEVICE" --config paper --batch 1024 --precision "${PRECISIONS// /,}" --runs 5 \
    --peak-tflops 790 --reference-ips 5418 --json "$OUT/bench-paper.json" >> "$log" 2>&1
fi
ls -la "$OUT" | tee -a "$log"
