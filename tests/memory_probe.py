"""Peak memory of the codecs against the number of tiles, measured in one fresh process
(``python -m tests.memory_probe MODE SIDE [SIDE ...] [--batch N] [--psnr DB]``; tests/test_codec_memory.py).

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
memory is trimmed) is reported in MiB above the resident memory before it, and the peak of the
heap's live bytes (`LiveHeap`: what the code holds, without the freed pages the heap keeps,
whose layout moves the resident peak by several MiB between runs), as one JSON line:
``[{"side", "tiles", "dims", "encode_mib", "decode_mib", "encode_live_mib", "decode_live_mib",
"bytes"}, ...]``.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import sys
import threading

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


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


class LiveHeap:
    """The peak of the heap's live bytes (glibc's mallinfo2: in use in the heap plus mmapped;
    numpy's and torch's arrays are there, Python's small objects are not) over a ``with`` block,
    in MiB above its start, sampled every half millisecond by a thread. Unlike the resident
    memory it does not count freed pages the heap keeps, so it moves little between runs.
    ``peak_mib`` is None where there is no mallinfo2 (another C library)."""

    def __init__(self) -> None:
        try:
            self._info = ctypes.CDLL("libc.so.6").mallinfo2
            self._info.restype = _MallInfo2
        except (OSError, AttributeError):
            self._info = None
        self.peak_mib: float | None = None

    def _live(self) -> int:
        info = self._info()
        return info.uordblks + info.hblkhd

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._live())
            self._stop.wait(0.0005)

    def __enter__(self) -> LiveHeap:
        if self._info is not None:
            self._base = self._peak = self._live()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._info is not None:
            self._stop.set()
            self._thread.join()
            self.peak_mib = (max(self._peak, self._live()) - self._base) / 2**20


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
    from diffcodec.codec.rate import psnr_db
    from tests.conftest import synthetic_images

    p = argparse.ArgumentParser(prog="python -m tests.memory_probe")
    p.add_argument("mode", choices=("lossless", "progressive"))
    p.add_argument("sides", type=int, nargs="+")
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--psnr", type=float, default=None,
                   help="progressive: a rate target (`rate.RateTarget`), as the CLI's default encode has (40); "
                        "one no boundary before the end reaches (99) shows every boundary to rate control "
                        "and still ends lossless")
    p.add_argument("--region-tiles", type=int, default=None,
                   help="progressive: the stream's regions (default: the encoder's, `progressive.params.REGION_TILES`)")
    args = p.parse_args(argv)
    mode, sides, batch = args.mode, args.sides, args.batch
    target = {}
    if args.psnr is not None:
        from diffcodec.codec.rate import RateTarget
        target = {"target": RateTarget("psnr", args.psnr)}
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
        with LiveHeap() as encode_live:
            enc = api.encode(image, model=loaded, mode=mode, steps=2, batch_size=batch, compute_bound=False,
                             **extra, **target)
        encode_mib = _status("VmHWM:") - base
        base = _reset_peak()
        with LiveHeap() as decode_live:
            dec = api.decode(enc.data, model=loaded, batch_size=batch)
        decode_mib = _status("VmHWM:") - base
        back = dec.images[0]
        lossy_as_said = getattr(enc, "psnr", None) is not None and back.shape == image[0].shape and \
            psnr_db(back, image[0]) == enc.psnr[0]
        if not (np.array_equal(back, image[0]) or lossy_as_said):
            raise SystemExit(f"{mode} {side}x{side}: the round trip changed the image")
        rows.append({"side": side, "tiles": (side // TILE) ** 2, "dims": side * side * 3, "encode_mib": encode_mib,
                     "decode_mib": decode_mib, "encode_live_mib": encode_live.peak_mib,
                     "decode_live_mib": decode_live.peak_mib, "bytes": len(enc.data)})
        del enc, dec
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
