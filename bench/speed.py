"""Throughput of the bound evaluation and of the bare network, on the device used.

    python -m bench.speed [DATA] [--checkpoint F] [--device cpu|cuda] [--batch-sizes 32] [--steps 20]
                          [--out reports/speed.json]

Two numbers per batch size B:

* the bare forward pass: the network alone on a batch of B noisy inputs, timed over
  ``--repeats`` calls after one warm-up. A bound over a T-step chain needs T forward passes
  per image, so ``image_forwards_per_second / T`` is the network-bound limit of bits/dim
  evaluation (images/s) at full T;
* the bound itself (`diffcodec.evaluate.run_nll`: noise draws, posterior algebra, KL and
  discretized-decoder terms in float64, per-step bookkeeping) on ``--num-images`` images
  over a respaced ``--steps``-step chain. Its cost is linear in the number of steps, so the
  full-T rate is measured-rate x K / T; both are recorded, and the ratio to the network
  limit shows the bookkeeping overhead.

Images come from DATA (default the shared CIFAR-10 test shards); throughput does not depend
on their content, so without data the script uses seeded random images and says so.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import REPORTS_DIR, int_list, module_command, provenance, resolve_data, run_main, write_json
from diffcodec.checkpoint import LoadedModel, load_checkpoint
from diffcodec.data import ImageSet, read_images
from diffcodec.errors import DiffcodecError
from diffcodec.evaluate import run_nll
from diffcodec.runtime import network, pick_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(loaded: LoadedModel, batch_size: int, *, repeats: int, device: torch.device,
                 seed: int = 0) -> dict[str, float]:
    """Median seconds per network call on a [B, 3, S, S] batch at random timesteps, and the rates
    it implies (two warm-up calls first; the median resists a neighbour's burst on a shared CPU)."""
    mc = loaded.model_config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, mc.in_channels, mc.image_size, mc.image_size, generator=g).to(device)
    T = loaded.diffusion_config.num_timesteps
    t = torch.randint(0, T, (batch_size,), generator=g).to(device)
    fn = network(loaded.model)
    for _ in range(2):  # warm-up: allocations, kernel selection for this shape
        fn(x, t)
    _sync(device)
    calls = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x, t)
        _sync(device)
        calls.append(time.perf_counter() - start)
    per_call = float(np.median(calls))
    fastest = float(np.min(calls))
    return {
        "seconds_per_call": per_call,
        "seconds_per_call_min": fastest,
        "repeats": repeats,
        "image_forwards_per_second_best": batch_size / fastest,
        "image_forwards_per_second": batch_size / per_call,
        "full_T_images_per_second_limit": batch_size / per_call / T,
    }


def speed_images(data: str | None, num_images: int, image_size: int, seed: int) -> tuple[ImageSet, str]:
    """The first ``num_images`` images of ``data`` (or of the shared CIFAR-10 test set), or
    seeded random images when no data is there; with a note saying which."""
    try:
        path = resolve_data(data)
    except DiffcodecError:
        if data is not None:
            raise
        rng = np.random.default_rng(seed)
        imgs = list(rng.integers(0, 256, (num_images, image_size, image_size, 3), dtype=np.uint8))
        return ImageSet(imgs, [f"random{i}" for i in range(num_images)], None), "seeded random images (no data found)"
    return read_images(path, limit=num_images), f"first {num_images} images of {path.name}"


def time_bound(loaded: LoadedModel, images: ImageSet, *, steps: int, batch_size: int, seed: int,
               device: torch.device) -> dict[str, float]:
    """Images/s of the bound on a ``steps``-step chain, and extrapolated to full T."""
    run = run_nll(loaded, images, steps=steps, batch_size=batch_size, seed=seed, device=device, progress=False)
    T = loaded.diffusion_config.num_timesteps
    per_second = len(images) / run.seconds
    return {
        "steps": steps,
        "num_images": len(images),
        "seconds": run.seconds,
        "images_per_second_at_steps": per_second,
        "full_T_images_per_second": per_second * steps / T,
        "image_steps_per_second": per_second * steps,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="?", help="images (default: ../shared/data/cifar10/test beside the repo)")
    p.add_argument("--checkpoint", "-c", help="checkpoint (default: the embedded default model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--batch-sizes", default="1,8,32,64", help="comma-separated batch sizes (default 1,8,32,64)")
    p.add_argument("--num-images", "-n", type=int, default=64,
                   help="images for the bound timing, at least the largest batch (default 64)")
    p.add_argument("--steps", "-k", type=int, default=20, help="chain length for the bound timing (default 20)")
    p.add_argument("--repeats", type=int, default=10, help="timed forward calls per batch size (default 10)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 is faster on a CPU "
                                               "another job keeps busy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPORTS_DIR / "speed.json"), help="output JSON (default reports/speed.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = module_command("bench.speed", argv)
    batch_sizes = int_list(args.batch_sizes, "--batch-sizes")
    if min(batch_sizes) < 1 or args.num_images < 1 or args.steps < 1 or args.repeats < 1:
        raise DiffcodecError("batch sizes, --num-images, --steps and --repeats must be positive")
    if args.num_images < max(batch_sizes):
        raise DiffcodecError(f"--num-images ({args.num_images}) must be at least the largest batch size "
                             f"({max(batch_sizes)}), or that batch is never full")
    if args.threads is not None:
        if args.threads < 1:
            raise DiffcodecError("--threads must be positive")
        torch.set_num_threads(args.threads)  # a script's choice, recorded in the device string
    device = pick_device(args.device)
    loaded = load_checkpoint(args.checkpoint, device=device)
    T = loaded.diffusion_config.num_timesteps
    if args.steps > T:
        raise DiffcodecError(f"--steps must be at most the model's T = {T}")
    images, note = speed_images(args.data, args.num_images, loaded.model_config.image_size, args.seed)
    rows: list[dict[str, Any]] = []
    for b in batch_sizes:
        fwd = time_forward(loaded, b, repeats=args.repeats, device=device, seed=args.seed)
        bound = time_bound(loaded, images, steps=args.steps, batch_size=b, seed=args.seed, device=device)
        fraction = bound["full_T_images_per_second"] / fwd["full_T_images_per_second_limit"]
        row = {"batch_size": b, "forward": fwd, "bound": bound, "bound_fraction_of_network_limit": fraction}
        rows.append(row)
        print(f"B={b}: forward {fwd['image_forwards_per_second']:.1f} image-forwards/s "
              f"(full-T limit {fwd['full_T_images_per_second_limit']:.4f} images/s); bound "
              f"{bound['full_T_images_per_second']:.4f} images/s at full T "
              f"({row['bound_fraction_of_network_limit']:.0%} of the limit)", file=sys.stderr)
    payload = {
        "kind": "speed",
        "num_timesteps": T,
        "images": note,
        "rows": rows,
        "provenance": provenance(args, loaded, args.seed, device=device, command=command),
    }
    out = write_json(Path(args.out), payload)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
