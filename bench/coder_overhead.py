"""What the bits-back coder pays over ideal code lengths, by latent window width.

One chunk of test images is encoded on a stack of seeded words; every push and pop is
measured in stack bits (constriction's ``num_valid_bits``) beside the ideal code length of
the same symbols, -log2 of their Gaussian bin mass (scipy, no window, no 2^-24 floor).
Their difference is the coder's overhead alone, free of the sampling noise that separates a
file from the bound. Writes reports/coder_overhead.json, one row per window width.

    python -m bench.coder_overhead -n 16 --steps 100 --windows 5,8
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

import numpy as np
import torch
from scipy.special import log_ndtr

from bench.common import REPORTS_DIR, module_command, provenance, resolve_data, run_main, write_json
from diffcodec.codec.bitsback.chain import GridConfig
from diffcodec.codec.bitsback.file import chain_coder
from diffcodec.codec.entropy import MAX_EXCESS, AnsStack, seeded_words


def bin_bits(x: np.ndarray, mean: np.ndarray, std: np.ndarray, lo: float = -np.inf, hi: float = np.inf) -> float:
    """Sum of -log2 P(bin) under N(mean, std) for bins [x - 1/2, x + 1/2] (edge bins at lo/hi take the tails)."""
    x = np.asarray(x, dtype=np.float64)
    a = np.where(x <= lo, -np.inf, (x - mean - 0.5) / std)
    b = np.where(x >= hi, np.inf, (x - mean + 0.5) / std)
    right = a > 0  # compute on the side of the mean where the CDF is small
    big = np.where(right, log_ndtr(-a), log_ndtr(b))
    small = np.where(right, log_ndtr(-b), log_ndtr(a))
    return float(-(big + np.log1p(-np.exp(small - big))).sum() / math.log(2))


class MeasuredStack(AnsStack):
    """An AnsStack that books each operation's stack bits and ideal bits by kind."""

    def __init__(self, words: np.ndarray) -> None:
        super().__init__(words)
        self.book: dict[str, list[float]] = {}

    def _add(self, kind: str, actual: int, ideal: float) -> None:
        row = self.book.setdefault(kind, [0.0, 0.0])
        row[0] += actual
        row[1] += ideal

    def push_gaussian_windowed(self, symbols, mean, std, half_width, excess_std, max_excess=MAX_EXCESS):
        before = self.num_valid_bits
        super().push_gaussian_windowed(symbols, mean, std, half_width, excess_std, max_excess)
        kind = "push x_K under the prior" if not np.any(mean) else "push x_k under p"
        self._add(kind, self.num_valid_bits - before, bin_bits(symbols, mean, std))

    def pop_gaussian_windowed(self, mean, std, half_width, excess_std, max_excess=MAX_EXCESS):
        before = self.num_valid_bits
        out = super().pop_gaussian_windowed(mean, std, half_width, excess_std, max_excess)
        self._add("pop x_k+1 under q (bits back)", -(before - self.num_valid_bits), -bin_bits(out, mean, std))
        return out

    def push_gaussian(self, symbols, mean, std, lo, hi):
        before = self.num_valid_bits
        super().push_gaussian(symbols, mean, std, lo, hi)
        self._add("push x_0 (pixels)", self.num_valid_bits - before, bin_bits(symbols, mean, std, lo, hi))

    def scramble(self, count, key):
        before = self.num_valid_bits
        super().scramble(count, key)
        self._add("scramble", self.num_valid_bits - before, 0.0)


def measure(loaded, tiles: np.ndarray, steps: int, config: GridConfig) -> dict[str, Any]:
    """Encode ``tiles`` uint8 [B, H, W, 3] as one chunk; bits/dim actual vs ideal, by kind."""
    from diffcodec.evaluate import model_schedule

    schedule = model_schedule(loaded, steps, "quadratic")
    coder = chain_coder(loaded.model, schedule, loaded.diffusion_config.var_type, config=config)
    dims = tiles.size
    stack = MeasuredStack(seeded_words(dims * 40 // 32 + 1024, 1))
    start, clock = stack.num_valid_bits, time.process_time()
    coder.encode_chunk(coder.grid, stack, np.ascontiguousarray(tiles.transpose(0, 3, 1, 2)))
    actual = (stack.num_valid_bits - start) / dims
    ideal = sum(v[1] for v in stack.book.values()) / dims
    return {
        "window_sigmas": config.window_sigmas, "resolution_bits": config.resolution_bits,
        "net_bpd": actual, "ideal_bpd": ideal, "coder_overhead_bpd": actual - ideal,
        "coder_overhead_pct": 100.0 * (actual - ideal) / ideal,
        "by_kind_bpd": {k: {"actual": a / dims, "ideal": i / dims} for k, (a, i) in stack.book.items()},
        "cpu_seconds": time.process_time() - clock,
    }


def main(argv: list[str] | None = None) -> int:
    from diffcodec.checkpoint import load_checkpoint
    from diffcodec.data import read_images

    p = argparse.ArgumentParser(prog="python -m bench.coder_overhead", description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="?", help="CIFAR-10 test shards (default ../shared/data/cifar10/test)")
    p.add_argument("--checkpoint", "-c", help="checkpoint (default: the embedded default model)")
    p.add_argument("--num-images", "-n", type=int, default=16, help="tiles in the chunk (default 16)")
    p.add_argument("--steps", "-k", type=int, default=100, help="K, quadratic spacing (default 100)")
    p.add_argument("--windows", default="5,8", help="window widths in sigmas, comma-separated (default 5,8)")
    p.add_argument("--resolution-bits", type=int, default=GridConfig().resolution_bits)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPORTS_DIR / "coder_overhead.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_checkpoint(args.checkpoint, device="cpu")
    tiles = np.stack(read_images(resolve_data(args.data), limit=args.num_images).images)
    rows = []
    for c in (int(w) for w in args.windows.split(",")):
        rows.append(measure(loaded, tiles, args.steps, GridConfig(resolution_bits=args.resolution_bits,
                                                                      window_sigmas=c)))
        print(f"window {c} sigmas: coder overhead {rows[-1]['coder_overhead_bpd']:+.5f} bits/dim", file=sys.stderr)
    report = {"provenance": provenance(args, loaded, device="cpu", command=module_command("bench.coder_overhead", argv)),
              "num_images": len(tiles), "num_steps": args.steps, "rows": rows}
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
