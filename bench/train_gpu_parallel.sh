#!/usr/bin/env bash
# Several GPU training pieces at once on one GPU (one process each), then a bundle for $OUT.
#
#   bash bench/train_gpu_parallel.sh MINUTES NLL_IMAGES PRESET [PRESET...]
#
# A 9M-parameter UNet at batch 256 leaves most of an H100 idle (the step is bound by kernel
# launches), so two runs side by side cost each run little: a fair comparison of recipes in
# the same wall-clock minutes. Each PRESET runs `bench/train_gpu.sh PRESET MINUTES PRESET
# NLL_IMAGES` (resuming runs/PRESET on a warm machine). Training shards carried in
# .device/data/train are first gathered into $TRAIN_DIR (default /root/diffcodec-train,
# outside the checkout, so shards carried by successive calls to a warm machine add up).
# Back in $OUT: each run's fp16 EMA weights in 15 MiB parts (train_gpu.sh collect) and
# logs.tgz with every run's log, JSON result, loss history and nll result.
set -uo pipefail
minutes=${1:?usage: train_gpu_parallel.sh MINUTES NLL_IMAGES PRESET [PRESET...]}
nll_images=${2:?usage: train_gpu_parallel.sh MINUTES NLL_IMAGES PRESET [PRESET...]}
shift 2
[ $# -ge 1 ] || { echo "name at least one preset" >&2; exit 2; }
out=${OUT:-/tmp/out}; mkdir -p "$out"
export TRAIN_DIR=${TRAIN_DIR:-/root/diffcodec-train}
mkdir -p "$TRAIN_DIR" && cp -n .device/data/train/*.npz "$TRAIN_DIR"/ 2>/dev/null
echo "training shards in $TRAIN_DIR: $(ls "$TRAIN_DIR" | wc -l)"
if ls .device/whl/*.whl >/dev/null 2>&1 && ! python3 -c "import constriction" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/*.whl
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

pids=()
for preset in "$@"; do
  mkdir -p "$out/$preset"
  OUT="$out/$preset" bash bench/train_gpu.sh "$preset" "$minutes" "$preset" "$nll_images" \
    > "$out/$preset/stdout.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { status=1; echo "run ${*:$((i + 1)):1} failed; its log ends:"; tail -20 "$out/${*:$((i + 1)):1}/stdout.log"; }
done
nvidia-smi --query-gpu=memory.used --format=csv,noheader || true

for preset in "$@"; do
  mv "$out/$preset"/*.pt.part-* "$out"/ 2>/dev/null
  echo "== $preset"
  grep -h '"steps"\|"images_per_second"\|"final_loss"\|"export_fingerprint"' "$out/$preset/train-$preset.json" 2>/dev/null
  grep -h '"bits_per_dim"\|"bits_per_dim_stderr"\|"L_0_bpd"\|"seconds"' "$out/$preset/nll-$preset.json" 2>/dev/null
done
tar czf "$out/logs.tgz" -C "$out" "$@" && for preset in "$@"; do rm -rf "${out:?}/$preset"; done
ls -l "$out"
exit $status
