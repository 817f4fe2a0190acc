"""How many bits the exact network's operands need: the bound at other operand widths, paired.

    python -m bench.exact_bits [--data DIR] [--num-images 64] [--t-samples 3]
                               [--widths 13/13,12/12,11/11,10/10,8/8,13/10,13/8,13/7,10/13]
                               [--out reports/exact_bits.json]

Contract 1's exact network (`exact_net`) quantizes every convolution's and linear layer's
input per image and its weights per output channel to power-of-two-scaled integers of
widths chosen from the fan-in (about 27 bits: its outputs are float64's to 3e-6). Here its
convolutions and linear layers are re-quantized to other (activation / weight) widths, and
the bound of the first ``--num-images`` CIFAR-10 test images is measured against the float32
network, paired (`bench.exact_cost.measure`: the same tiles, timesteps and noise). The
widths whose cost stays below the issue's +0.05% chose contract 2's operands (14-bit
integers, per-channel weight scales): `exact_net2`, reports/exact.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import REPORTS_DIR, module_command, provenance, resolve_data, run_main, write_report
from bench.exact_cost import difference_record, measure
from diffcodec import exact
from diffcodec.checkpoint import load_checkpoint
from diffcodec.data import read_images
from diffcodec.errors import DiffcodecError
from diffcodec.exact_net import ExactConv2d, ExactLinear, exact_network
from diffcodec.runtime import network

DEFAULT_WIDTHS = "13/13,12/12,11/11,10/10,8/8,13/10,13/8,13/7,10/13"


def parse_widths(text: str) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(int(v) for v in item.split("/")) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ACT/WEIGHT bit pairs such as 13/10, got {text!r}") from None
    if not pairs or any(len(p) != 2 or not 2 <= min(p) <= max(p) <= 26 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected ACT/WEIGHT bit pairs between 2 and 26, got {text!r}")
    return pairs


def requantized_network(model: torch.nn.Module, act_bits: int, weight_bits: int) -> torch.nn.Module:
    """Contract 1's network with every convolution and linear layer at these operand widths."""
    net = exact_network(model)
    floats = dict(model.named_modules())
    for name, layer in net.named_modules():
        if not isinstance(layer, (ExactConv2d, ExactLinear)):
            continue
        weight = floats[name].weight.detach()
        if weight.dim() == 4:
            weight = weight.permute(0, 2, 3, 1)
        w_int, w_shift = exact.quantize(weight.reshape(weight.shape[0], -1), weight_bits, dims=(1,))
        layer.w_int.copy_(w_int)
        layer.w_scale.copy_(exact.pow2(-w_shift).reshape(-1))
        layer.act_bits, layer.weight_bits = act_bits, weight_bits
    return net


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.exact_bits", description=__doc__.splitlines()[0])
    p.add_argument("--data", help="CIFAR-10 test shards (default ../shared/data/cifar10/test)")
    p.add_argument("--checkpoint", "-c", help="checkpoint (default: the embedded default model)")
    p.add_argument("--num-images", "-n", type=int, default=64)
    p.add_argument("--t-samples", type=int, default=3)
    p.add_argument("--widths", type=parse_widths, default=parse_widths(DEFAULT_WIDTHS),
                   help=f"ACT/WEIGHT bit pairs (default {DEFAULT_WIDTHS})")
    p.add_argument("--out", default=str(REPORTS_DIR / "exact_bits.json"))
    args = p.parse_args(argv)
    if args.num_images < 2 or args.t_samples < 1:
        raise DiffcodecError("--num-images must be at least 2 and --t-samples at least 1")
    loaded = load_checkpoint(args.checkpoint)
    images = read_images(resolve_data(args.data), limit=args.num_images).images
    rows: list[dict[str, Any]] = []
    for act_bits, weight_bits in args.widths:
        start = time.perf_counter()
        net = requantized_network(loaded.model, act_bits, weight_bits)
        fns = {"float32": network(loaded.model), "exact": network(net)}
        run = measure(loaded, images, arithmetics=("float32", "exact"), t_samples=args.t_samples, fns=fns)
        d = difference_record(run["results"]["exact"], run["results"]["float32"])
        rows.append({"activation_bits": act_bits, "weight_bits": weight_bits, "difference_bpd": d["mean_bpd"],
                     "difference_bpd_stderr": d["stderr_bpd"], "relative_percent": d["relative_percent"],
                     "relative_percent_stderr": d["relative_percent_stderr"], "terms_bpd": d["terms_mean_bpd"],
                     "seconds": time.perf_counter() - start})
        print(f"{act_bits}/{weight_bits} bits: {d['relative_percent']:+.4f}% ± {d['relative_percent_stderr']:.4f}",
              file=sys.stderr, flush=True)
    payload = {"kind": "exact_bits", "num_images": args.num_images, "t_samples": args.t_samples, "rows": rows,
               "provenance": provenance(args, loaded, 0, command=module_command("bench.exact_bits", argv))}
    write_report(Path(args.out), payload, markdown)
    return 0


def markdown(payload: dict[str, Any]) -> str:
    lines = ["<!-- generated by bench/exact_bits.py; do not edit -->",
             f"{payload['num_images']} CIFAR-10 test images, {payload['t_samples']} importance-sampled timesteps each, "
             f"paired against float32. Command: `{payload['provenance'].get('command')}`", "",
             "| activation bits | weight bits | bound − float32 (bits/dim) | relative |", "|---|---|---|---|"]
    lines += [f"| {r['activation_bits']} | {r['weight_bits']} | {r['difference_bpd']:+.2e} ± "
              f"{r['difference_bpd_stderr']:.1e} | {r['relative_percent']:+.4f}% ± {r['relative_percent_stderr']:.4f} |"
              for r in payload["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(run_main(main))
