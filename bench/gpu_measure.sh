#!/usr/bin/env bash
# The GPU measurements the open issues ask for, each under its own time limit, for one device
# call of at most 10 minutes (carry .device with both CIFAR-10 test shards: device-stage 0 2).
#
#   bash bench/gpu_measure.sh [CHECKPOINT]          # default: the embedded default model
#
# Into $OUT (each step's JSON as it finishes, so a step cut by its limit loses only itself):
#   nll-full.json        the bound on every image of .device/data/test (T = 1000, bf16 autocast,
#                        batch $NLL_BATCH, default 1000), limit $NLL_LIMIT s (default 330)
#   lossless-kK.json     bits-back encode of $CODEC_IMAGES test images (default 256) at K = 100 and
#   gpu-kK.dfc           K = 1000, then decode on the GPU; the .dfc files come back so that a CPU
#                        can try to decode them here (GPU -> CPU decodability)
#   progressive.json     progressive encode of 8 images (K = 50), limit 90 s; gpu-prog.dfc comes back
#   exact_speed.json     forward passes/s of the float32, float64, bf16 and exact (contracts 1, 2) networks (batch 1, 64)
#   cpu_to_gpu.txt       the contract-2 (and contract-1) golden files, written on a CPU, decoded on the GPU
#   exact_speed2.json    the same at batch 1, 64 and 256
#   lossless-k100-f32.json, gpu-k100-f32.dfc   the same K = 100 encode with --float32 (same-machine
#                        file): the exact path's speed against the float path's on the GPU
# The encodes use the default arithmetic, the exact contract: back here,
# `diffcodec decode <files_at>/gpu-k100.dfc -o /tmp/x --device cpu` (and gpu-prog.dfc) must give
# the coded pixels bit for bit; the --float32 file is expected to be refused or to diverge.
set -uo pipefail
ckpt=${1:-}
out=${OUT:-/tmp/out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
if ls .device/whl/*.whl >/dev/null 2>&1 && ! python3 -c "import constriction" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/*.whl
fi
test_data=${TEST_DATA:-.device/data/test}
device=${DEVICE:-cuda}
c=(); [ -n "$ckpt" ] && c=(-c "$ckpt")
n=${CODEC_IMAGES:-256}

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, report its wall time
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s.%N)
  timeout "$limit" "$@"; local rc=$?
  printf '%s: rc %s, %.1f s (limit %s s)\n' "$name" "$rc" "$(echo "$(date +%s.%N) - $t0" | bc)" "$limit" | tee -a "$out/steps.txt"
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$out/steps.txt"
step nll-full "${NLL_LIMIT:-330}" bash -c "python3 -m diffcodec.cli nll $test_data ${c[*]} --device $device \
  $([ "$device" = cuda ] && echo --bf16) -b ${NLL_BATCH:-1000} --json --quiet > $out/nll-full.json"
for k in 100 1000; do
  step "encode-k$k" "${CODEC_LIMIT:-60}" bash -c "python3 -m diffcodec.cli encode $test_data -n $n ${c[*]} \
    --device $device -k $k -b $n --no-bound -o $out/gpu-k$k.dfc --force --json --quiet > $out/lossless-k$k.json"
  [ -f "$out/gpu-k$k.dfc" ] && step "decode-k$k" "${CODEC_LIMIT:-60}" bash -c "python3 -m diffcodec.cli decode \
    $out/gpu-k$k.dfc ${c[*]} --device $device -o /tmp/gpu-decoded-k$k --force --json --quiet >> $out/lossless-k$k.json"
done
step progressive 90 bash -c "python3 -m diffcodec.cli encode $test_data -n 8 ${c[*]} --device $device --progressive \
  -o $out/gpu-prog.dfc --force --json --quiet > $out/progressive.json"
step exact-speed 60 python3 -m bench.exact_speed ${c[*]} --device "$device" --batch-sizes 1,64 --out "$out/exact_speed.json"
step encode-k100-f32 "${CODEC_LIMIT:-60}" bash -c "python3 -m diffcodec.cli encode $test_data -n $n ${c[*]} \
  --device $device -k 100 -b $n --no-bound --float32 -o $out/gpu-k100-f32.dfc --force --json --quiet \
  > $out/lossless-k100-f32.json"
# Contract 2 (issue 27): files written on this machine's CPU decode on the GPU to their pinned
# pixels (CPU -> GPU), both modes; the GPU's own files come back above (GPU -> CPU: decode them
# here with `diffcodec decode ... --device cpu`); the exact network's speed against float32 and
# bf16 at batch 1, 64 and 256 (exact_speed2.json).
step cpu-to-gpu 120 python3 - <<'PY' | tee "$out/cpu_to_gpu.txt"
import hashlib
from pathlib import Path
from diffcodec.checkpoint import load_checkpoint
from diffcodec.codec import api
model = load_checkpoint(None, device="cuda")
want = "b5a67142a461dcc766e3b165d6fa4ca7ee83bf83094f17c47beab561eea195e4"  # tests/test_golden.py EXACT_SOURCE_SHA256
for name in ("default_exact_lossless_k10_c2.dfc", "default_exact_progressive_k10_c2.dfc",
             "default_exact_lossless_k10_v4.dfc", "default_exact_progressive_k10_v4.dfc"):
    r = api.decode(Path("tests/golden", name).read_bytes(), model=model, device="cuda")
    got = hashlib.sha256(b"".join(im.tobytes() for im in r.images)).hexdigest()
    print(name, "decoded on the GPU:", "the pinned pixels" if got == want else f"DIFFERENT ({got})")
PY
step exact-speed2 120 python3 -m bench.exact_speed ${c[*]} --device "$device" --batch-sizes 1,64,256 \
  --repeats 5 --out "$out/exact_speed2.json"
