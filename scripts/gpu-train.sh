#!/usr/bin/env bash
# One prepared GPU session (issue 21): within BUDGET_S seconds in all, train a general model of
# the reference's size (K = 16, width 256) on general images, fine-tune it on Fashion-MNIST, and
# fine-tune it with the outlier loss. Each phase ends at its share of the budget (--max-time: the
# model file is written then too) and checkpoints every 200 steps; after each phase its model is
# converted to f16 into $OUT (9.6 MB each: the GPU machine returns at most 8 files of 16 MiB), so
# a time-out still leaves the finished phases' models. Prints and records training images/s.
#
# On the GPU machine (after scripts/gpu-train-data.sh and ../shared/gpu/build-cuda.sh):
#   run(command='bash scripts/gpu-train.sh', carry=['target-cuda/dist','gpu-data'], timeout_s=600)
# Rehearsal on the CPU (tiny model, one minute):
#   GW=target/release/glowwatch DEVICE=cpu CONFIG=models/configs/tiny-ci.toml BUDGET_S=60 \
#     OUT=/tmp/gpu-train-out bash scripts/gpu-train.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
WORK=${WORK:-/tmp/gpu-train-work}; mkdir -p "$WORK"
DEVICE=${DEVICE:-cuda:0}
BUDGET_S=${BUDGET_S:-450}   # each phase overruns its share by start-up and a last validation (~15 s on the CPU)
DATA=${DATA:-gpu-data}
CONFIG=${CONFIG:-models/configs/grey32-l3-k16-w256.toml}
BATCH=${BATCH:-64}
if [ -n "${GW:-}" ]; then
  gw() { "$GW" "$@"; }
else
  gw() { QUIET=${QUIET:-1} bash target-cuda/dist/run-on-device.sh target-cuda/dist/glowwatch "$@"; }
fi
# Shares of the budget: general 50 %, fine-tune 20 %, outlier 25 %; 5 % for start-up and conversion.
t_gen=$(( BUDGET_S * 50 / 100 )); t_ft=$(( BUDGET_S * 20 / 100 )); t_out=$(( BUDGET_S * 25 / 100 ))
summary="$OUT/summary.txt"
echo "device $DEVICE config $CONFIG batch $BATCH budget ${BUDGET_S}s (general ${t_gen}s, fine-tune ${t_ft}s, outlier ${t_out}s)" | tee "$summary"

# Images/s of a phase from its JSON event log (step events: step, elapsed_s, images_per_s).
rate() {
  python3 - "$1" "$BATCH" <<'PY'
import json, sys
steps = [e for e in (json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")) if "elapsed_s" in e]
if not steps:
    print("no step events"); sys.exit()
last = steps[-1]
batch = int(sys.argv[2])
mean = last["step"] * batch / max(last["elapsed_s"], 1e-9)
print(f"{last['step']} steps, {mean:.0f} images/s over the phase (start-up included), "
      f"{last.get('images_per_s', 0):.0f} images/s in the last interval, bpd {last.get('bpd')}")
PY
}

phase() { # name seconds args...
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  gw train --device "$DEVICE" --batch "$BATCH" --max-time "${secs}s" --checkpoint-every 200 --log-every 5 \
     --out "$WORK/$name.safetensors" "$@" 2> "$OUT/$name.log.jsonl"
  local rc=$?
  echo "$name: exit $rc after $(( SECONDS - t0 ))s; $(rate "$OUT/$name.log.jsonl")" | tee -a "$summary"
  if [ -f "$WORK/$name.safetensors" ]; then
    gw model convert "$WORK/$name.safetensors" --out "$OUT/$name.f16.safetensors" --dtype f16 | tee -a "$summary"
  fi
}

phase general "$t_gen" --data "$DATA/general_train.parquet" --val "$DATA/general_val.parquet" \
  --config "$CONFIG" --lr 1e-3 --warmup 100 --flip --epochs 1000 --name general-k16w256
phase fashion "$t_ft" --data "$DATA/fashion_train.parquet" --init-from "$WORK/general.safetensors" \
  --epochs 1000 --name fashion-mnist-k16w256
phase outlier "$t_out" --data "$DATA/fashion_train.parquet" --init-from "$WORK/general.safetensors" \
  --general-model "$WORK/general.safetensors" --outlier-data "$DATA/general_train.parquet" \
  --outlier-weight 300 --outlier-temperature 300 --warmup 0 --epochs 1000 --name fashion-mnist-outlier-k16w256
ls -la "$OUT" | tee -a "$summary"
