#!/usr/bin/env bash
# One GPU training piece of at most 9 minutes, resumable across pieces and across machines.
#
# On the GPU machine, from the repository root (the `run` tool's command), with .device
# carried (staged here by ../shared/tools/device-stage, see reports/training.md):
#
#   bash bench/train_gpu.sh PRESET MINUTES [NAME] [NLL_IMAGES]
#
#   PRESET      ddpm-cifar10 (the paper: L_simple, fixedlarge) or small-learned / ddpm-cifar10-learned
#               (hybrid loss, learned-range variances); the loss is the preset's recipe (diffcodec.train_config.RECIPES)
#   MINUTES     time box of the training itself, at most 9 (a command may run 10 minutes)
#   NAME        run name (default: PRESET); the run directory is runs/NAME
#   NLL_IMAGES  if > 0, afterwards evaluate the exported EMA weights on that many test images
#               from .device/data/test (full T = 1000 bound) into $OUT/nll-NAME.json
#
# Where it starts from, in this order:
#   1. runs/NAME/state.pt      the same (still warm) machine ran an earlier piece: --resume (exact)
#   2. .device/ckpt/NAME.pt    EMA weights carried from an earlier machine: --init (fresh optimizer)
#   3. nothing                 a fresh run
# Disk does not survive between machines, so every piece exports fp16 EMA weights and sends
# them back through $OUT in parts of 15 MiB (files coming back are limited to 16 MiB each,
# 64 MiB together): reassemble them here with
#
#   bash bench/train_gpu.sh collect FILES_AT NAME      # -> .device/ckpt/NAME.pt (carried next time)
#
# The paper's 35.7M model exports 71 MB of fp16 weights: more than can come back (64 MiB) or
# travel (64 MiB with the data), so it can only be continued on the same warm machine (one
# session's 30 device minutes); its pieces still report loss history and the nll result.
set -euo pipefail

if [ "${1:-}" = "collect" ]; then
  files_at=${2:?usage: train_gpu.sh collect FILES_AT NAME}; name=${3:?usage: train_gpu.sh collect FILES_AT NAME}
  top=$(git rev-parse --show-toplevel); mkdir -p "$top/.device/ckpt"
  parts=$(ls "$files_at"/"$name".pt.part-* 2>/dev/null | sort)
  [ -n "$parts" ] || { echo "no $name.pt.part-* under $files_at" >&2; exit 1; }
  cat $parts > "$top/.device/ckpt/$name.pt.tmp" && mv "$top/.device/ckpt/$name.pt.tmp" "$top/.device/ckpt/$name.pt"
  ls -l "$top/.device/ckpt/$name.pt"
  exit 0
fi

preset=${1:?usage: train_gpu.sh PRESET MINUTES [NAME] [NLL_IMAGES]}
minutes=${2:?usage: train_gpu.sh PRESET MINUTES [NAME] [NLL_IMAGES]}
name=${3:-$preset}
nll_images=${4:-0}
out=${OUT:-/tmp/out}; mkdir -p "$out"
awk -v m="$minutes" 'BEGIN { exit !(m > 0 && m <= 9) }' || { echo "MINUTES must be in (0, 9]" >&2; exit 2; }
export PYTHONUNBUFFERED=1

# TRAIN_DIR / TEST_DATA override where the shards are (default: what device-stage staged); a
# folder outside the checkout (e.g. /root/train) can gather shards carried by several calls.
train_dir=${TRAIN_DIR:-.device/data/train}
test_data=${TEST_DATA:-.device/data/test}
if ls .device/whl/*.whl >/dev/null 2>&1; then
  python3 -c "import constriction" 2>/dev/null || [ -d /tmp/site/constriction ] || python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
[ -d "$train_dir" ] || { echo "no $train_dir: run ../shared/tools/device-stage here first" >&2; exit 2; }

run=runs/$name
export_path=$run/export-fp16.pt
start=()
if [ -f "$run/state.pt" ]; then
  start=(--resume)
  echo "resuming $run (same machine)"
elif [ -f ".device/ckpt/$name.pt" ]; then
  start=(--init ".device/ckpt/$name.pt")
  echo "continuing from the carried EMA weights .device/ckpt/$name.pt"
else
  start=(--preset "$preset")
  echo "fresh run $run"
fi

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -m diffcodec.cli train "$train_dir" "${start[@]}" --minutes "$minutes" --out "$run" \
  --export "$export_path" --force --device "${DEVICE:-cuda}" --compile --json 2>&1 > "$out/train-$name.json" \
  | tee "$out/train-$name.log"
cat "$out/train-$name.json"
cp "$run/loss_history.json" "$out/loss_history-$name.json"

size=$(stat -c %s "$export_path")
if [ "$size" -le $((60 * 1024 * 1024)) ]; then
  split -b 15M -d -a 1 "$export_path" "$out/$name.pt.part-"
  ls -l "$out"/"$name".pt.part-*
else
  echo "note: $export_path is $((size / 1024 / 1024)) MiB, too large to come back; it stays on this machine"
fi

if [ "$nll_images" -gt 0 ]; then
  python3 -m diffcodec.cli nll "$test_data" --checkpoint "$export_path" --num-images "$nll_images" \
    --batch-size "${NLL_BATCH:-500}" --device "${DEVICE:-cuda}" --json --quiet > "$out/nll-$name.json"
  cat "$out/nll-$name.json"
fi
