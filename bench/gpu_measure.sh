#!/usr/bin/env bash
# The GPU measurements the open issues ask for, each under its own time limit, in the order of
# their worth, for one device call of at most 10 minutes (the limits add up to 490 s). Stage first:
#   ../shared/tools/device-stage 0 1 && cp ../shared/data/kodak/kodim01.png .device/
# then the device command (carry [".device"], timeout_s 560):
#   bash bench/gpu_measure.sh [CHECKPOINT]          # default: the embedded default model
#
# Into $OUT (each step's output as it finishes, so a step cut by its limit loses only itself;
# steps.txt: every step's exit status and wall seconds, the GPU's name first):
#   photo-encode.json    issue 28: the photo ($PHOTO, default .device/kodim01.png, 768x512) as the
#   gpu-photo.dfc        CLI codes it by default (progressive, 40 dB) on the GPU, limit 130 s, and
#   photo-decode.json    decoded there, limit 100 s; the file and the GPU's PNG come back:
#   gpu-photo.png        `diffcodec decode <files_at>/gpu-photo.dfc -o x.png --device cpu` here must
#                        give the same pixels (GPU -> CPU)
#   cpu_to_gpu.txt       issue 27: golden files written on a CPU (contract 2, both modes, the stream
#                        versions of then and now) decoded on the GPU, limit 45 s
#   progressive.json     progressive encode of 8 CIFAR-10 test images (K = 50), limit 45 s;
#   gpu-prog.dfc         the file comes back
#   exact_speed.json     forward passes/s of the float32, float64, bf16 and exact networks at batch
#                        1 and 64, limit 45 s
#   lossless-k100.json   bits-back encode of $CODEC_IMAGES test images (default 256) at K = 100,
#   gpu-k100.dfc         then decode on the GPU (limits 40 s each); the file comes back
#   nll-full.json        only with NLL_LIMIT=S: the bound on every image of .device/data/test
#                        (T = 1000, bf16 autocast, batch $NLL_BATCH, default 1000), limit S s (it
#                        needs minutes: a call of its own, or bench/train_gpu.sh's evaluation)
# The encodes use the default arithmetic, the exact contract, so every file that comes back must
# decode here on the CPU to the pixels the GPU decoded.
# Dry run on a CPU (minutes): DEVICE=cpu PYTHON=.venv/bin/python PHOTO=small.png CODEC_IMAGES=2 \
#   TEST_DATA=../shared/data/cifar10/test bash bench/gpu_measure.sh
set -uo pipefail
ckpt=${1:-}
out=${OUT:-/tmp/out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
if ls .device/whl/*.whl >/dev/null 2>&1 && ! python3 -c "import constriction" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/*.whl
fi
py=${PYTHON:-python3}
test_data=${TEST_DATA:-.device/data/test}
photo=${PHOTO:-.device/kodim01.png}
device=${DEVICE:-cuda}
c=(); [ -n "$ckpt" ] && c=(-c "$ckpt")
n=${CODEC_IMAGES:-256}

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, report its wall time
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s.%N)
  timeout "$limit" "$@"; local rc=$?
  printf '%s: rc %s, %.1f s (limit %s s)\n' "$name" "$rc" "$(echo "$(date +%s.%N) - $t0" | bc)" "$limit" | tee -a "$out/steps.txt"
}

{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi ($device)"; } \
  | tee "$out/steps.txt"
# the CPU kernels (diffcodec/csrc: the codecs' CPU side) for this machine's Python, where it has a
# C compiler; without one the torch twins run (the same bits)
step native-build 45 bash -c "$py setup.py -q build_ext --inplace > $out/native-build.txt 2>&1"
if [ -f "$photo" ]; then
  step photo-encode 130 bash -c "$py -m diffcodec.cli encode $photo ${c[*]} --device $device \
    -o $out/gpu-photo.dfc --force --json --quiet > $out/photo-encode.json"
  [ -f "$out/gpu-photo.dfc" ] && step photo-decode 100 bash -c "$py -m diffcodec.cli decode $out/gpu-photo.dfc \
    ${c[*]} --device $device -o $out/gpu-photo.png --force --json --quiet > $out/photo-decode.json"
else
  echo "photo: no $photo (stage it: cp ../shared/data/kodak/kodim01.png .device/)" | tee -a "$out/steps.txt"
fi
# Contract 2 (issue 27): files written on a CPU decode on the GPU to their pinned pixels.
step cpu-to-gpu 45 $py - "$device" <<'PY' | tee "$out/cpu_to_gpu.txt"
import hashlib
import sys
from pathlib import Path
from diffcodec.checkpoint import load_checkpoint
from diffcodec.codec import api
device = sys.argv[1]
model = load_checkpoint(None, device=device)
want = "b5a67142a461dcc766e3b165d6fa4ca7ee83bf83094f17c47beab561eea195e4"  # tests/test_golden.py EXACT_SOURCE_SHA256
for name in ("default_exact_lossless_k10_c2.dfc", "default_exact_progressive_k10_c2.dfc",
             "default_exact_lossless_k10_v4.dfc", "default_exact_progressive_k10_v4.dfc",
             "default_exact_progressive_k10_s6.dfc", "default_exact_lossless_k10_boot_s6.dfc"):
    path = Path("tests/golden", name)
    if not path.exists():
        print(name, "not in tests/golden")
        continue
    r = api.decode(path.read_bytes(), model=model, device=device)
    got = hashlib.sha256(b"".join(im.tobytes() for im in r.images)).hexdigest()
    print(name, f"decoded on {device}:", "the pinned pixels" if got == want else f"DIFFERENT ({got})")
PY
step progressive 45 bash -c "$py -m diffcodec.cli encode $test_data -n 8 ${c[*]} --device $device --progressive \
  -o $out/gpu-prog.dfc --force --json --quiet > $out/progressive.json"
step exact-speed 45 $py -m bench.exact_speed ${c[*]} --device "$device" --batch-sizes 1,64 --out "$out/exact_speed.json"
step encode-k100 40 bash -c "$py -m diffcodec.cli encode $test_data -n $n ${c[*]} \
  --device $device --lossless -k 100 -b $n --no-bound -o $out/gpu-k100.dfc --force --json --quiet > $out/lossless-k100.json"
[ -f "$out/gpu-k100.dfc" ] && step decode-k100 40 bash -c "$py -m diffcodec.cli decode \
  $out/gpu-k100.dfc ${c[*]} --device $device -o /tmp/gpu-decoded-k100 --force --json --quiet >> $out/lossless-k100.json"
[ "${NLL_LIMIT:-0}" -gt 0 ] && step nll-full "$NLL_LIMIT" bash -c "$py -m diffcodec.cli nll $test_data ${c[*]} --device $device \
  $([ "$device" = cuda ] && echo --bf16) -b ${NLL_BATCH:-1000} --json --quiet > $out/nll-full.json"
