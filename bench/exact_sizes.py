"""Files of the exact contract against same-machine float32 files: size, CPU time, round trip.

    python -m bench.exact_sizes [DATA] [--lossless-images 8] [--progressive-images 2] [--out reports/exact_sizes.json]

The first CIFAR-10 test images are coded losslessly (K = 100, the default, bootstrap
included) and progressively (K = 50) with ``arithmetic="float32"`` and with the default
exact arithmetic, each decoded back on the CPU (one torch thread, one search worker): the
file size, bits/dim, encode / decode CPU seconds and whether the pixels came back exactly.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from bench.common import REPORTS_DIR, resolve_data, run_main
from diffcodec.checkpoint import load_checkpoint
from diffcodec.codec import api
from diffcodec.data import read_images


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.exact_sizes", description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="?", help="CIFAR-10 test shards (default ../shared/data/cifar10/test)")
    p.add_argument("--checkpoint", "-c", help="checkpoint (default: the embedded default model)")
    p.add_argument("--lossless-images", type=int, default=8)
    p.add_argument("--progressive-images", type=int, default=2)
    p.add_argument("--out", default=str(REPORTS_DIR / "exact_sizes.json"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    model = load_checkpoint(args.checkpoint)
    images = read_images(resolve_data(args.data), limit=max(args.lossless_images, args.progressive_images)).images
    out = {}
    for mode, n, steps in (("lossless", args.lossless_images, 100), ("progressive", args.progressive_images, 50)):
        batch = list(images[:n])
        for arithmetic in ("float32", "exact"):
            extra = {"workers": 1} if mode == "progressive" else {}
            t0 = time.process_time()
            enc = api.encode(batch, model=model, mode=mode, steps=steps, arithmetic=arithmetic, compute_bound=False,
                             **extra)
            t1 = time.process_time()
            dec = api.decode(enc.data, model=model, device="cpu")
            t2 = time.process_time()
            out[f"{mode}-{arithmetic}"] = {
                "images": n, "steps": steps, "bytes": len(enc.data), "bpd": 8 * len(enc.data) / (n * 3072),
                "encode_cpu_s": t1 - t0, "decode_cpu_s": t2 - t1,
                "exact_round_trip": all(np.array_equal(a, b) for a, b in zip(batch, dec.images))}
            print(mode, arithmetic, out[f"{mode}-{arithmetic}"], file=sys.stderr, flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
