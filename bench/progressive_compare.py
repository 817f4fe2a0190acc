"""Two or more `bench.progressive` runs side by side: the rate each needs at equal PSNR.

    python -m bench.progressive_compare A.json B.json [...] [--psnr 20,25,30,35,40,45]
        [--images N] [--out reports/progressive_compare.md]

For every run, the mean over its images of the real prefix rate (header included, bits/dim)
against the mean PSNR of x^_0 at each stage (the rows of its markdown table) is interpolated
linearly in PSNR at the requested PSNRs; beside it the full rate and the bound of its chain,
the share of the KL stages' bits the sent latents deliver, and the seconds per image. A second
table gives each run's real rate over the bound of its own chain at the same PSNRs (both read
at the stage where the real x^_0 reaches the PSNR). ``--images N`` compares the first N
images of every run (their summaries recomputed), so that a long run and a short one are
read on the same images. A run measured with its classical baselines (``lossy_baselines``:
JPEG, WebP, JPEG-XL, AVIF on the same images) gets a third table: bits per pixel each needs to
reach each PSNR, the real stream's prefixes (header included) and the bound beside them. This
is how a coded-chain choice (e.g. ``--min-stage-bits``, ``--steps``, ``--log2-candidates``) is
picked: by the measured rate at equal PSNR, not by the
bound alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import module_command, run_main, write_text
from bench.progressive import summarize
from diffcodec.errors import DiffcodecError


def rate_at_psnr(run: dict[str, Any], psnr_db: float, key: str = "real_with_header_bpd") -> float | None:
    """Real bits/dim (header included; ``key`` = "bound_bpd": the bound of the same stages) of
    the first prefix reaching ``psnr_db`` on the mean curve, interpolated between stages; None
    beyond the last latent stage."""
    stages = [s for s in run["summary"]["stages"] if s["psnr_xstart"] is not None and np.isfinite(s["psnr_xstart"])]
    return first_reaching([s[key] for s in stages], [s["psnr_xstart"] for s in stages], psnr_db)


def first_reaching(rates: list[float], psnrs: list[float], psnr_db: float) -> float | None:
    """The rate at which a curve of (rate, PSNR) points in rate order first reaches ``psnr_db``,
    read on the running maximum of PSNR and interpolated linearly between points; the first
    rate when the first point already reaches it; None when no point does."""
    rate, psnr = np.asarray(rates, dtype=np.float64), np.maximum.accumulate(psnrs)
    if psnr_db > psnr[-1]:
        return None
    j = int(np.searchsorted(psnr, psnr_db))
    if j == 0:
        return float(rate[0])
    frac = (psnr_db - psnr[j - 1]) / max(psnr[j] - psnr[j - 1], 1e-12)
    return float(rate[j - 1] + frac * (rate[j] - rate[j - 1]))


def codec_bpp_at_psnr(points: list, psnr_db: float) -> tuple[float | None, bool]:
    """Bits per pixel a classical codec needs for ``psnr_db``, from its (mean bpp, mean PSNR,
    setting) points, interpolated linearly between settings on the running maximum of PSNR.
    Returns (bpp, at_most): at_most is True when its smallest file already reaches the PSNR
    (the need is at most that file's rate); (None, False) when no setting reaches it."""
    pts = sorted((float(b), float(q)) for b, q, *_ in points)
    bpp = first_reaching([b for b, _ in pts], [q for _, q in pts], psnr_db)
    return bpp, bpp is not None and psnr_db < pts[0][1]


def label(run: dict[str, Any]) -> str:
    p = run["params"]
    return (f"K={p['num_steps']} chunk {p['chunk_bits']:g} 2^{p['log2_candidates']} "
            f"min_stage_bits {p.get('min_stage_bits', 0):g}"
            + ("" if run.get("arithmetic", "exact") == "exact" else f" {run['arithmetic']}"))


def first_images(run: dict[str, Any], num_images: int, path: str) -> dict[str, Any]:
    """``run`` with its summary recomputed from its first ``num_images`` images."""
    rows = run.get("per_image") or []
    if len(rows) < num_images:
        raise DiffcodecError(f"{path} has {len(rows)} images with per-image rows, fewer than --images {num_images}")
    return {**run, "summary": summarize(rows[:num_images], int(run["num_dims"]))}


def _cell(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def markdown(command: str, paths: list[str], runs: list[dict[str, Any]], psnrs: list[float]) -> str:
    lines = ["# Progressive runs compared at equal PSNR", "",
             f"`{command}`: mean real rate (bits/dim, header included) "
             "where the mean PSNR of x^_0 first reaches each value, interpolated between stages; sample / KL: "
             "log2 q/p of the sent latents over their stages' KL (1 for exact samples of q).", "",
             "| run | images | " + " | ".join(f"{p:g} dB" for p in psnrs)
             + " | full rate | bound | sample / KL | encode s/image | decode s/image |",
             "|---|---|" + "---|" * (len(psnrs) + 5)]
    for path, run in zip(paths, runs):
        cells = [rate_at_psnr(run, p) for p in psnrs]
        full = run["summary"]["full_rate"]
        seconds = run["summary"]["seconds"]
        lines.append(f"| {label(run)} ({Path(path).name}) | {run['summary']['num_images']} | "
                     + " | ".join(_cell(c, ".4f") for c in cells)
                     + f" | {full['real_with_header_bpd']:.4f} | {full['bound_bpd']:.4f} | "
                     f"{_cell(full.get('rcc_sample_over_kl'), '.3f')} | "
                     f"{_cell(seconds.get('encode', {}).get('mean_per_image'), '.1f')} | "
                     f"{seconds['decode']['mean_per_image']:.1f} |")
    lines += ["", "Real rate (header included) over the bound of the same stages, where x^_0 reaches each PSNR:", "",
              "| run | " + " | ".join(f"{p:g} dB" for p in psnrs) + " | full rate |",
              "|---|" + "---|" * (len(psnrs) + 1)]
    for path, run in zip(paths, runs):
        ratios = []
        for p in psnrs:
            real, bound = rate_at_psnr(run, p), rate_at_psnr(run, p, "bound_bpd")
            ratios.append(real / bound if real is not None and bound else None)
        full = run["summary"]["full_rate"]
        lines.append(f"| {label(run)} ({Path(path).name}) | " + " | ".join(_cell(r, ".2f") for r in ratios)
                     + f" | {full['real_with_header_bpd'] / full['bound_bpd']:.2f} |")
    for path, run in zip(paths, runs):
        lines += classical_table(path, run, psnrs)
    return "\n".join(lines) + "\n"


def classical_table(path: str, run: dict[str, Any], psnrs: list[float]) -> list[str]:
    """Bits per pixel needed at each PSNR: this run's real prefixes and bound, and each
    classical codec measured on the same images ([] when the run has none, or when its
    summary covers fewer images than its baselines)."""
    baselines = run.get("lossy_baselines") or {}
    if not baselines or run["summary"]["num_images"] != len(run.get("per_image") or []):
        return []
    per_pixel = 3.0  # bits per pixel = 3 x bits per dimension (RGB)
    ours = [rate_at_psnr(run, p) for p in psnrs]
    lines = ["", f"Bits per pixel to reach each PSNR on the same {run['summary']['num_images']} images "
             f"({Path(path).name}; mean rate at mean PSNR, whole files; ≤: that codec's smallest file already "
             "reaches it; -: no setting reaches it); below it, the PSNRs at which the real stream needs fewer bits "
             "than every classical codec.", "",
             "| codec | " + " | ".join(f"{p:g} dB" for p in psnrs) + " |", "|---|" + "---|" * len(psnrs),
             f"| diffcodec real prefixes, header included ({label(run)}) | "
             + " | ".join(_cell(None if r is None else per_pixel * r, ".3f") for r in ours) + " |",
             "| the bound of the same stages | " + " | ".join(
                 _cell(None if (b := rate_at_psnr(run, p, "bound_bpd")) is None else per_pixel * b, ".3f")
                 for p in psnrs) + " |"]
    wins = [r is not None for r in ours]
    for name, points in baselines.items():
        cells = []
        for i, p in enumerate(psnrs):
            bpp, at_most = codec_bpp_at_psnr(points, p)
            cells.append("-" if bpp is None else ("≤" if at_most else "") + f"{bpp:.3f}")
            if ours[i] is not None and bpp is not None and per_pixel * ours[i] >= bpp:
                wins[i] = False
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    won = [f"{p:g}" for p, w in zip(psnrs, wins) if w]
    lines += ["", "Fewer bits than every classical codec at: " + (", ".join(won) + " dB" if won else "none of these PSNRs")
              + "."]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.progressive_compare", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="bench.progressive JSON files")
    p.add_argument("--psnr", default="20,25,30,35,40,45", help="PSNRs in dB (comma-separated)")
    p.add_argument("--images", type=int, help="compare the first N images of every run")
    p.add_argument("--out", help="write the markdown here (else print it)")
    args = p.parse_args(argv)
    if args.images is not None and args.images < 1:
        raise DiffcodecError(f"--images must be positive, got {args.images}")
    runs = [json.loads(Path(path).read_text()) for path in args.runs]
    if args.images is not None:
        runs = [first_images(run, args.images, path) for run, path in zip(runs, args.runs)]
    text = markdown(module_command("bench.progressive_compare", argv), args.runs, runs, [float(v) for v in args.psnr.split(",")])
    if args.out:
        write_text(Path(args.out), text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
