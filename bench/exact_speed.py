"""Forward passes per second of the exact network against the float32 and float64 networks.

    python -m bench.exact_speed [--checkpoint F] [--device cpu|cuda] [--batch-sizes 1,16]
                                [--repeats 5] [--threads N] [--out reports/exact_speed.json]

Three networks from one checkpoint, each called as the codecs call it (`runtime.network`,
inference mode): the float32 model, its float64 copy (``network(model, float64=True)``) and
the exact network (`exact_net.exact_network`: fixed-point operands, bit-identical outputs on
every machine). Each is timed on seeded [B, C, S, S] inputs at the model's tile size (32x32
for the CIFAR-10 models) and random timesteps, ``--repeats`` calls per batch size after two
warm-up calls; the three networks are called in turn within each repeat, so a neighbour's
burst on a shared CPU hits all of them alike. Reported per network and batch size: the median
and fastest seconds per call, image-forwards per second (from the median), and the exact
network's slowdown against each float network.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import REPORTS_DIR, int_list, module_command, provenance, run_main, write_json
from diffcodec.checkpoint import load_checkpoint
from diffcodec.errors import DiffcodecError
from diffcodec.exact_net import exact_network
from diffcodec.runtime import ModelFn, device_string, network, pick_device

NETWORKS = ("float32", "float64", "exact")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_networks(model: torch.nn.Module, device: torch.device) -> dict[str, ModelFn]:
    """The three networks, each a ``ModelFn`` on ``device`` (the model itself is untouched)."""
    exact = exact_network(model).to(device)
    return {
        "float32": network(model, device=device),
        "float64": network(model, float64=True, device=device),
        "exact": network(exact, device=device),
    }


def time_networks(fns: dict[str, ModelFn], batch_size: int, *, in_channels: int, image_size: int,
                  num_timesteps: int, repeats: int, device: torch.device, seed: int = 0) -> dict[str, dict[str, float]]:
    """Seconds per call of each network on one seeded batch (interleaved repeats, two warm-ups).
    The float64 network is given the batch in float64 (converted before timing); the others
    take it in float32 (the exact network quantizes any float input)."""
    g = torch.Generator().manual_seed(seed)
    x32 = torch.randn(batch_size, in_channels, image_size, image_size, generator=g).to(device)
    t = torch.randint(0, num_timesteps, (batch_size,), generator=g).to(device)
    inputs = {name: x32.double() if name == "float64" else x32 for name in fns}
    for name, fn in fns.items():
        for _ in range(2):  # warm-up: allocations, kernel selection for this shape
            fn(inputs[name], t)
    _sync(device)
    calls: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(inputs[name], t)
            _sync(device)
            calls[name].append(time.perf_counter() - start)
    out = {}
    for name, seconds in calls.items():
        median, fastest = float(np.median(seconds)), float(np.min(seconds))
        out[name] = {
            "seconds_per_call": median,
            "seconds_per_call_min": fastest,
            "repeats": repeats,
            "image_forwards_per_second": batch_size / median,
            "image_forwards_per_second_best": batch_size / fastest,
        }
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per batch size: image-forwards/s of each network and the exact slowdowns."""
    head = f"{'batch':>5}  " + "  ".join(f"{name + ' fwd/s':>13}" for name in NETWORKS) + \
        f"  {'exact/f32':>9}  {'exact/f64':>9}"
    lines = [head, "-" * len(head)]
    for row in rows:
        rates = "  ".join(f"{row['networks'][name]['image_forwards_per_second']:>13.2f}" for name in NETWORKS)
        lines.append(f"{row['batch_size']:>5}  {rates}  {row['exact_slowdown_vs_float32']:>8.2f}x"
                     f"  {row['exact_slowdown_vs_float64']:>8.2f}x")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.exact_speed", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", "-c", help="checkpoint (default: the embedded default model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--batch-sizes", "--batch-size", dest="batch_sizes", default="1,16",
                   help="comma-separated batch sizes (default 1,16)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per network and batch size (default 5)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPORTS_DIR / "exact_speed.json"),
                   help="output JSON (default reports/exact_speed.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = module_command("bench.exact_speed", argv)
    batch_sizes = int_list(args.batch_sizes, "--batch-sizes")
    if min(batch_sizes) < 1 or args.repeats < 1:
        raise DiffcodecError("batch sizes and --repeats must be positive")
    if args.threads is not None:
        if args.threads < 1:
            raise DiffcodecError("--threads must be positive")
        torch.set_num_threads(args.threads)  # a script's choice, recorded in the device string
    device = pick_device(args.device)
    loaded = load_checkpoint(args.checkpoint, device=device)
    mc = loaded.model_config
    fns = build_networks(loaded.model, device)
    rows: list[dict[str, Any]] = []
    for b in batch_sizes:
        nets = time_networks(fns, b, in_channels=mc.in_channels, image_size=mc.image_size,
                             num_timesteps=loaded.diffusion_config.num_timesteps, repeats=args.repeats,
                             device=device, seed=args.seed)
        exact_s = nets["exact"]["seconds_per_call"]
        rows.append({
            "batch_size": b,
            "networks": nets,
            "exact_slowdown_vs_float32": exact_s / nets["float32"]["seconds_per_call"],
            "exact_slowdown_vs_float64": exact_s / nets["float64"]["seconds_per_call"],
        })
        print(f"B={b}: " + ", ".join(f"{name} {nets[name]['image_forwards_per_second']:.2f}" for name in NETWORKS)
              + " image-forwards/s", file=sys.stderr)
    payload = {
        "kind": "exact_speed",
        "image_size": mc.image_size,
        "device": device_string(device),
        "torch": torch.__version__,
        "rows": rows,
        "provenance": provenance(args, loaded, args.seed, device=device, command=command),
    }
    print(format_table(rows))
    out = write_json(Path(args.out), payload)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
