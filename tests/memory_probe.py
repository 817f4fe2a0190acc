"""Peak memory of the codecs against the number of tiles, measured in one fresh process
(``python -m tests.memory_probe MODE SIDE [SIDE ...] [--batch N]``; tests/test_codec_memory.py).

The model is the `tiny` preset widened to 32 channels at 16x16 tiles, with attention at 16:
under the exact contract one tile in a network call holds about 1.5 MB of activations (its
attention scores and weights are float64 [256, 256]), several times the coding state of its
768 dimensions, so a codec that sent more tiles through a network call than its batch
would show it at once (``--batch 1024``, from 36 to 144 tiles: progressive +160 MiB,
lossless +50 MiB, whose chain also waits for its stack to hold a batch's bits). Each image
is square, SIDE pixels, coded with K = 2 steps in batches of ``--batch`` tiles (default
`BATCH`; lossless without its bootstrap) and decoded back in the same batches (the round
trip is checked). The peak resident
memory of each phase (VmHWM, reset through /proc/self/clear_refs after the heap's free
memory is trimmed) is reported in MiB above the resident memory before it, as one JSON line:
``[{"side", "tiles", "dims", "encode_mib", "decode_mib", "bytes"}, ...]``.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import sys

import numpy as np
import torch

BATCH = 16
TILE = 16


def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field)).split()[1]) / 1024


def _reset_peak() -> float:
    """Hands freed heap memory back to the system (glibc's malloc_trim, where there is one),
    so that what a phase reuses of it counts, then resets VmHWM to the resident memory
    (Linux); returns that, in MiB."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS:")


def wide_tiny_model():
    from diffcodec.checkpoint import LoadedModel, fingerprint
    from diffcodec.config import preset
    from diffcodec.unet import UNet

    mc, dc = preset("tiny")
    mc = dataclasses.replace(mc, ch=32, image_size=TILE)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = UNet(mc).eval()
    return LoadedModel(model, mc, dc, fingerprint(model.state_dict()), {"weights": "test"}, "<memory probe>")


def main(argv: list[str]) -> int:
    from diffcodec.codec import api
    from tests.conftest import synthetic_images

    p = argparse.ArgumentParser(prog="python -m tests.memory_probe")
    p.add_argument("mode", choices=("lossless", "progressive"))
    p.add_argument("sides", type=int, nargs="+")
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--region-tiles", type=int, default=None,
                   help="progressive: the stream's regions (default: the encoder's, `progressive.params.REGION_TILES`)")
    args = p.parse_args(argv)
    mode, sides, batch = args.mode, args.sides, args.batch
    torch.set_num_threads(1)
    loaded = wide_tiny_model()
    # warm-up: lazy imports, kernels and caches in before anything is measured
    # a lossless stream without its bootstrap: that is the progressive codec on a few tiles,
    # measured in the progressive mode (and it would be most of this probe's time)
    extra = {"bootstrap": False} if mode == "lossless" else {}
    if mode == "progressive" and args.region_tiles is not None:
        from diffcodec.codec.progressive.params import ProgressiveParams
        extra = {"progressive_params": ProgressiveParams(num_steps=2, region_tiles=args.region_tiles)}
    warm = api.encode(synthetic_images([(TILE, TILE)]), model=loaded, mode=mode, steps=2, batch_size=batch,
                      compute_bound=False, **extra)
    api.decode(warm.data, model=loaded, batch_size=batch)
    rows = []
    for side in sides:
        image = synthetic_images([(side, side)])
        base = _reset_peak()
        enc = api.encode(image, model=loaded, mode=mode, steps=2, batch_size=batch, compute_bound=False, **extra)
        encode_mib = _status("VmHWM:") - base
        base = _reset_peak()
        dec = api.decode(enc.data, model=loaded, batch_size=batch)
        decode_mib = _status("VmHWM:") - base
        if not np.array_equal(dec.images[0], image[0]):
            raise SystemExit(f"{mode} {side}x{side}: the round trip changed the image")
        rows.append({"side": side, "tiles": (side // TILE) ** 2, "dims": side * side * 3, "encode_mib": encode_mib,
                     "decode_mib": decode_mib, "bytes": len(enc.data)})
        del enc, dec
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
