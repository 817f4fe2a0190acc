"""Two or more `bench.progressive` runs side by side: the rate each needs at equal PSNR.

    python -m bench.progressive_compare A.json B.json [...] [--psnr 20,25,30,35,40,45]
        [--out reports/progressive_compare.md]

For every run, the mean over its images of the real prefix rate (header included, bits/dim)
against the mean PSNR of x^_0 at each stage (the rows of its markdown table) is interpolated
linearly in PSNR at the requested PSNRs; beside it the full rate and the bound of its chain.
This is how a coded-chain choice (e.g. ``--min-stage-bits``, ``--steps``) is picked: by the
measured rate at equal PSNR, not by the bound alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import module_command, run_main, write_text


def rate_at_psnr(run: dict[str, Any], psnr_db: float) -> float | None:
    """Real bits/dim (header included) of the first prefix reaching ``psnr_db`` on the mean
    curve, interpolated between stages; None beyond the last latent stage."""
    stages = [s for s in run["summary"]["stages"] if s["psnr_xstart"] is not None and np.isfinite(s["psnr_xstart"])]
    psnr = np.maximum.accumulate([s["psnr_xstart"] for s in stages])
    rate = np.array([s["real_with_header_bpd"] for s in stages])
    if psnr_db > psnr[-1]:
        return None
    j = int(np.searchsorted(psnr, psnr_db))
    if j == 0:
        return float(rate[0])
    frac = (psnr_db - psnr[j - 1]) / max(psnr[j] - psnr[j - 1], 1e-12)
    return float(rate[j - 1] + frac * (rate[j] - rate[j - 1]))


def label(run: dict[str, Any]) -> str:
    p = run["params"]
    return (f"K={p['num_steps']} chunk {p['chunk_bits']:g} 2^{p['log2_candidates']} "
            f"min_stage_bits {p.get('min_stage_bits', 0):g}")


def markdown(command: str, paths: list[str], runs: list[dict[str, Any]], psnrs: list[float]) -> str:
    lines = ["# Progressive runs compared at equal PSNR", "",
             f"`{command}`: mean real rate (bits/dim, header included) "
             "where the mean PSNR of x^_0 first reaches each value, interpolated between stages.", "",
             "| run | images | " + " | ".join(f"{p:g} dB" for p in psnrs) + " | full rate | bound | decode s/image |",
             "|---|---|" + "---|" * (len(psnrs) + 3)]
    for path, run in zip(paths, runs):
        cells = [rate_at_psnr(run, p) for p in psnrs]
        full = run["summary"]["full_rate"]
        lines.append(f"| {label(run)} ({Path(path).name}) | {run['summary']['num_images']} | "
                     + " | ".join("-" if c is None else f"{c:.4f}" for c in cells)
                     + f" | {full['real_with_header_bpd']:.4f} | {full['bound_bpd']:.4f} | "
                     f"{run['summary']['seconds']['decode']['mean_per_image']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.progressive_compare", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="bench.progressive JSON files")
    p.add_argument("--psnr", default="20,25,30,35,40,45", help="PSNRs in dB (comma-separated)")
    p.add_argument("--out", help="write the markdown here (else print it)")
    args = p.parse_args(argv)
    runs = [json.loads(Path(path).read_text()) for path in args.runs]
    text = markdown(module_command("bench.progressive_compare", argv), args.runs, runs, [float(v) for v in args.psnr.split(",")])
    if args.out:
        write_text(Path(args.out), text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
