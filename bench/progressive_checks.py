"""What the progressive stream's integrity checks cost, per image and at every prefix.

    python -m bench.progressive_checks [--report reports/progressive.json] [--encode 2] [DATA]
                                       [--out reports/progressive_checks.json]

Two measurements:

- **From recorded streams**: the check schedule is a function of the stages' levels alone
  (`syntax.Syntax.check_due`), so for each image of a progressive report (its ``levels`` and
  ``real_bits``, streams coded without checks) this computes where the checks fall, their bits
  (check_bits each: a range coder spends exactly that on a uniform symbol of 2^check_bits
  values, to within its 32-bit precision) and the bits that deliver each stage with them (a
  stage now arrives with its group, at the check closing it), header included, against the
  bits that delivered it without them.
- **Real files** (``--encode N``): the first N CIFAR-10 test images coded with the default
  settings twice, without and with checks (the same candidates: the streams differ only by
  the check symbols), and the byte difference of the whole files.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np
import torch

from bench.common import REPO_ROOT, REPORTS_DIR, load_json_input, provenance, resolve_data, run_main, write_report
from diffcodec.codec.progressive.params import ProgressiveParams
from diffcodec.codec.progressive.syntax import StageSymbols, Syntax


def check_schedule(levels: list[int], params: ProgressiveParams, num_dims: int) -> np.ndarray:
    """bool [K]: whether a check follows each RCC stage, for a stream with these levels."""
    params = dataclasses.replace(params, num_steps=len(levels))
    syntax = Syntax(params, num_dims)
    due = []
    for level in levels:
        n, _ = syntax.chunking(level)
        syntax.commit(StageSymbols(level, np.zeros(n if level else 1, dtype=np.int64)))
        due.append(syntax.check_due())
        if due[-1]:
            syntax.close_group()
    return np.array(due)


def from_report(report: dict, params: ProgressiveParams) -> dict:
    dims = int(report["num_dims"])
    images = []
    for im in report["per_image"]:
        levels = [int(v) for v in im["levels"]]
        due = check_schedule(levels, params, dims)
        header = int(im["header_bits"])
        real = np.asarray(im["real_bits"], dtype=np.float64)  # cumulative payload bits per stage (K + 1)
        checks_before = np.append(np.cumsum(due), due.sum())  # checks up to and including each stage
        # with checks, stage k arrives with its group: at the check that closes it
        group_end = np.array([int(np.flatnonzero(due[k:])[0]) + k for k in range(len(due))] + [len(due)])
        with_checks = real[group_end] + params.check_bits * checks_before[group_end]
        images.append({
            "num_checks": int(due.sum()), "check_bits": int(params.check_bits * due.sum()),
            "full_rate_bits": float(real[-1] + header), "full_rate_bits_with_checks": float(with_checks[-1] + header),
            "group_ends": [int(k) for k in np.flatnonzero(due)],
            "prefix_overhead_pct": [float(100 * (w - r) / (r + header)) for w, r in zip(with_checks, real)],
        })
    K = len(report["per_image"][0]["levels"])
    overhead = np.array([im["prefix_overhead_pct"] for im in images])
    return {
        "num_images": len(images), "num_dims": dims, "num_steps": K, "images": images,
        "mean_num_checks": float(np.mean([im["num_checks"] for im in images])),
        "mean_check_bits": float(np.mean([im["check_bits"] for im in images])),
        "full_rate_overhead_pct": float(np.mean([100 * (im["full_rate_bits_with_checks"] / im["full_rate_bits"] - 1)
                                                 for im in images])),
        "prefix_overhead_pct_mean": overhead.mean(0).tolist(),
        "prefix_overhead_pct_max": overhead.max(0).tolist(),
    }


def real_files(data: str | None, num_images: int, checkpoint: str | None) -> list[dict]:
    from diffcodec.checkpoint import load_checkpoint
    from diffcodec.codec import api
    from diffcodec.data import read_images

    torch.set_num_threads(1)
    model = load_checkpoint(checkpoint)
    got = read_images(str(resolve_data(data)), limit=num_images)
    out = []
    for i, img in enumerate(got.images):
        sizes = {}
        for bits in (0, ProgressiveParams().check_bits):
            params = ProgressiveParams(check_bits=bits)
            enc = api.encode([img], [got.names[i]], model=model, mode="progressive", progressive_params=params,
                             workers=1)
            sizes[bits] = (len(enc.data), enc.encoded.num_checks)
            print(f"image {i}: check_bits {bits}: {len(enc.data):,} bytes, {enc.encoded.num_checks} checks",
                  file=sys.stderr)
        (plain, _), (checked, n) = sizes[0], sizes[ProgressiveParams().check_bits]
        out.append({"image": got.names[i], "bytes_without_checks": plain, "bytes_with_checks": checked,
                    "num_checks": n, "difference_bytes": checked - plain})
    return out


def render(r: dict) -> str:
    s = r["from_report"]
    lines = [
        f"# Progressive integrity checks: cost ({r['check_bits']}-bit checks, groups of >= "
        f"max({r['check_min_bits']} bits, {r['check_growth']:g} x the KL before them))",
        "",
        f"From the {s['num_images']} recorded streams of `{r['report']}` ({s['num_dims']} dims, K = {s['num_steps']}): "
        f"{s['mean_num_checks']:.1f} checks per image on average, {s['mean_check_bits']:.0f} bits; the whole file "
        f"+{s['full_rate_overhead_pct']:.2f}% (header included).",
        "",
        "| stage | mean overhead of the prefix | max |",
        "|---|---|---|",
    ]
    for k, (m, x) in enumerate(zip(s["prefix_overhead_pct_mean"], s["prefix_overhead_pct_max"])):
        lines.append(f"| {k} | +{m:.2f}% | +{x:.2f}% |")
    if r.get("real_files"):
        lines += ["", "Real files, the same image coded without and with checks (default settings):", "",
                  "| image | without | with | checks | difference |", "|---|---|---|---|---|"]
        lines += [f"| {f['image']} | {f['bytes_without_checks']:,} B | {f['bytes_with_checks']:,} B | "
                  f"{f['num_checks']} | +{f['difference_bytes']} B |" for f in r["real_files"]]
    lines += ["", f"Command: `{r['provenance']['command']}` ({r['provenance']['device']})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.progressive_checks", description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="?", help="CIFAR-10 test shards for --encode (default ../shared/data/cifar10/test)")
    p.add_argument("--report", default=str(REPORTS_DIR / "progressive.json"),
                   help="a bench.progressive report (per-image levels and real bits)")
    p.add_argument("--encode", type=int, default=0, metavar="N", help="also code the first N images both ways")
    p.add_argument("--checkpoint", "-c", help="checkpoint for --encode (default: the embedded default model)")
    p.add_argument("--out", default=str(REPORTS_DIR / "progressive_checks.json"))
    args = p.parse_args(argv)
    report = load_json_input(args.report, "a bench.progressive report")
    params = ProgressiveParams(num_steps=int(report["params"]["num_steps"]),
                               chunk_bits=float(report["params"]["chunk_bits"]))
    result = {"report": os.path.relpath(args.report, REPO_ROOT), "check_bits": params.check_bits, "check_min_bits": params.check_min_bits,
              "check_growth": params.check_growth, "from_report": from_report(report, params),
              "real_files": real_files(args.data, args.encode, args.checkpoint) if args.encode else [],
              "provenance": provenance(args)}
    write_report(args.out, result, render)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
