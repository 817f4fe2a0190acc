"""The progressive stream with another candidate-selection rule: real files, same format.

    python -m bench.rcc_chain --rule greedy [bench.progressive options ...]
        [--out reports/rcc_chain_greedy.json]

    e.g. python -m bench.rcc_chain --rule greedy -n 8 --pad-bits 8 --arithmetic float32 \\
             --no-baselines --no-ddim --perturb 0 --threads 1 --out reports/rcc_chain_greedy.json
         python -m bench.progressive_compare reports/rcc_chain_pfr.json reports/rcc_chain_greedy.json

The encoder's choice of each chunk's index is the only thing a rule changes: the decoder
takes candidate n* of the chunk's keyed stream whatever chose it, so the files are ordinary
progressive streams (`bench.progressive` encodes, decodes every prefix and checks the full
stream lossless, exactly as for its own runs). This script runs `bench.progressive` with
the progressive encoder's `rcc.pfr_select_many` replaced by `rcc.select_many` under
``--rule`` (`rcc.SELECTION_RULES`), and adds to its JSON and markdown what the rule's chunks
did, summed over all chunks of all images:

    kl_bits            the chunks' KL (bits)
    delivered_bits     log2 q/p of the samples sent (what they deliver)
    log2_candidates    sum of log2 N: a uniform index's cost (the greedy rule's law)
    candidates         sum of N: the search's work
    index_bits_real    the stream's latent-stage bits minus its checks' bits (what the
                       indices and the stage levels cost under the stream's adaptive laws)

and the bound's own rate-distortion curve on the same images (``bound_curve``): the bound's
bits to each stage against the PSNR of x^_0 from the bound's exact samples of q at that stage
(`likelihood.bound_bits`' MSE, the same noise as `bench.progressive`'s bound, x^_0 not
rounded to 8 bits), so that a real prefix is read against the bound at equal PSNR.
`bench.progressive_compare` reads the bound at the stage where the real x^_0 reaches the PSNR
instead; the two agree for a rule that delivers each stage's KL, and a rule that delivers
more than the KL (greedy) reaches each PSNR at an earlier stage, where the bound of the same
stages is lower than the bound's own rate at that PSNR.

Every other option is `bench.progressive`'s (its --out is this script's), but
``--small-stage-bits B --small-stage-pad P``: a stage of less than B bits of KL gets the pad P
instead (`RecordingSelector`). ``--pad-bits`` sets
each chunk's budget, 2^ceil(KL + pad) capped at 2^--log2-candidates: with the greedy rule a
large pad gives every chunk of 8 bits or more the full 2^16 (a small chunk then delivers
more than its KL, which the chain repays: reports/rcc_methods.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

from bench import progressive
from bench.common import REPORTS_DIR, module_command, run_main, write_json, write_text
from bench.progressive_compare import first_reaching, rate_at_psnr
from bench.rcc_methods import chunk_kl_bits
from diffcodec.codec import rcc
from diffcodec.codec.progressive import codec as pg
from diffcodec.errors import DiffcodecError

LN2 = math.log(2.0)
PSNRS = [20.0, 25.0, 30.0, 35.0, 40.0, 45.0]


class RecordingSelector:
    """`rcc.select_many` under one rule, with the same call form as `rcc.pfr_select_many`,
    summing what each chunk it chose delivers (log2 w of the exact sample of its index).

    A stage whose KL (its chunks' together) is below ``small_stage_bits`` gets each chunk's
    budget cut to 2^ceil(KL_chunk + small_stage_pad) (the encoder's choice, as --pad-bits is):
    so that a large pad serves the stages that carry the rate and the first, small stages,
    whose prefixes are the low-PSNR points, do not pay 2^16 candidates' index for a few bits.
    """

    def __init__(self, rule: str, *, small_stage_bits: float = 0.0, small_stage_pad: float = 2.0) -> None:
        if rule not in rcc.SELECTION_RULES:
            raise DiffcodecError(f"unknown rule {rule!r}; known: {', '.join(rcc.SELECTION_RULES)}")
        self.rule = rule
        self.small_stage_bits, self.small_stage_pad = small_stage_bits, small_stage_pad
        self.totals = {"chunks": 0, "kl_bits": 0.0, "delivered_bits": 0.0, "log2_candidates": 0.0, "candidates": 0}

    def __call__(self, tasks, *, workers: int = 1) -> list[int]:
        kls = [chunk_kl_bits(lw.a, lw.b) for lw, _, _ in tasks]
        if sum(kls) < self.small_stage_bits:
            tasks = [(lw, key, min(num, 1 << max(1, math.ceil(kl + self.small_stage_pad))))
                     for (lw, key, num), kl in zip(tasks, kls)]
        chosen = rcc.select_many(tasks, rule=self.rule, workers=workers)
        for (lw, key, num), index, kl in zip(tasks, chosen, kls):
            u = rcc.pfr_decode(key, index, len(lw.a))
            self.totals["chunks"] += 1
            self.totals["kl_bits"] += kl
            self.totals["delivered_bits"] += float(lw(u[None])[0]) / LN2
            self.totals["log2_candidates"] += math.log2(num)
            self.totals["candidates"] += int(num)
        return chosen


def chunk_stats(totals: dict[str, float], run: dict[str, Any], num_checks: int) -> dict[str, Any]:
    """The selector's totals with the stream's real latent-stage bits beside them, less the
    ``num_checks`` group checks those stages hold (the closing check follows the pixels)."""
    rows = run["per_image"]
    K = len(rows[0]["real_bits"]) - 1
    checks = num_checks * int(run["params"].get("check_bits", 0))
    latent_bits = float(sum(r["real_bits"][K - 1] for r in rows)) - checks
    delivered = totals["delivered_bits"]
    return {**totals, "index_bits_real": latent_bits, "check_bits_excluded": checks,
            "delivery": delivered / totals["kl_bits"] if totals["kl_bits"] else None,
            "index_per_delivered": latent_bits / delivered if delivered > 0 else None,
            "uniform_index_per_delivered": totals["log2_candidates"] / delivered if delivered > 0 else None}


def bound_psnrs(bound: Any) -> list[float]:
    """PSNR (dB) of the bound's x^_0 at stages 0..K-1 of one image (its tiles' MSE averaged)."""
    mse = bound.xstart_mse.mean(axis=0)[::-1]  # stage j holds the latent at code step K-1-j
    return [float(10.0 * np.log10(255.0**2 / max(m, 1e-12))) for m in mse]


def bound_rd(run: dict[str, Any], psnrs: list[float]) -> list[dict[str, Any]]:
    """At each PSNR: the real rate (header included) and the bound's rate on the bound's own
    curve, both bits/dim, interpolated on the image-mean curves as `bench.progressive_compare`
    reads them."""
    rows = run["per_image"]
    num_dims = float(run["num_dims"])
    K = len(rows[0]["real_bits"]) - 1
    bound_rate = np.mean([np.cumsum(r["bound_bits"])[:K] / num_dims for r in rows], axis=0)
    bound_psnr = np.mean([r["bound_psnr"] for r in rows], axis=0)
    out = []
    for psnr in psnrs:
        real = rate_at_psnr(run, psnr)
        bound = first_reaching(bound_rate.tolist(), bound_psnr.tolist(), psnr)
        out.append({"psnr": psnr, "real_bpd": real, "bound_bpd": bound,
                    "ratio": real / bound if real is not None and bound else None})
    return out


def section(selection: dict[str, Any]) -> str:
    small = (f" Stages of less than {selection['small_stage_bits']:g} bits of KL: pad {selection['small_stage_pad']:g}."
             if selection.get("small_stage_bits") else "")
    return (f"\nSelection rule: **{selection['rule']}** (`rcc.select_many`; the stream format is unchanged).{small} "
            f"Over {selection['chunks']} chunks: KL {selection['kl_bits']:.0f} bits, the samples deliver "
            f"{selection['delivered_bits']:.0f} ({selection['delivery']:.3f} of the KL); the latent stages' real bits "
            f"without group checks {selection['index_bits_real']:.0f} = {selection['index_per_delivered']:.3f} per "
            f"delivered bit (sum of log2 N: {selection['log2_candidates']:.0f} = "
            f"{selection['uniform_index_per_delivered']:.3f}); "
            f"{selection['candidates'] / selection['chunks']:.0f} candidates per chunk searched.\n")


def rd_table(run: dict[str, Any]) -> str:
    lines = ["", "Real rate against the bound's own rate-distortion curve at equal PSNR (bits/dim; bound: its bits "
             "to the stage where its exact samples' x^_0 reaches the PSNR):", "",
             "| PSNR dB | real (header included) | bound | real / bound |", "|---|---|---|---|"]
    for r in run["bound_curve"]:
        cells = ["-" if r[k] is None else f"{r[k]:.4f}" for k in ("real_bpd", "bound_bpd")]
        lines.append(f"| {r['psnr']:g} | {cells[0]} | {cells[1]} | "
                     + ("-" if r["ratio"] is None else f"{r['ratio']:.2f}") + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rcc_chain", description=__doc__.split("\n\n")[0],
                                add_help=True)
    p.add_argument("--rule", default="greedy", help=f"selection rule: {', '.join(rcc.SELECTION_RULES)}")
    p.add_argument("--small-stage-bits", type=float, default=0.0,
                   help="stages of less KL than this get --small-stage-pad instead of --pad-bits (default 0: none)")
    p.add_argument("--small-stage-pad", type=float, default=2.0)
    p.add_argument("--out", type=Path, help="output JSON (default reports/rcc_chain_RULE.json)")
    args, rest = p.parse_known_args(argv)
    selector = RecordingSelector(args.rule, small_stage_bits=args.small_stage_bits, small_stage_pad=args.small_stage_pad)
    out = args.out or REPORTS_DIR / f"rcc_chain_{args.rule}.json"
    if "--stream-version" not in rest:  # the rules act on version 3's per-chunk candidates (`rcc`), not version 4's pools
        rest += ["--stream-version", "3"]
    if "--perturb" not in rest:  # the perturbation study encodes once more, outside the per-image rows
        rest += ["--perturb", "0"]
    checks: list[int] = []
    encode = pg.encode

    def counting_encode(*a: Any, **kw: Any) -> pg.Encoded:
        encoded = encode(*a, **kw)
        checks.append(encoded.num_checks)
        return encoded

    bounds: list[Any] = []
    bound_bits = progressive.bound_bits

    def keeping_bound(*a: Any, **kw: Any) -> Any:
        result = bound_bits(*a, **kw)
        bounds.append(result)
        return result

    with (mock.patch.object(rcc, "pfr_select_many", selector), mock.patch.object(pg, "encode", counting_encode),
          mock.patch.object(progressive, "bound_bits", keeping_bound)):
        code = progressive.main(rest + ["--out", str(out)])
    if code:
        return code
    run = json.loads(out.read_text())
    stats = chunk_stats(selector.totals, run, sum(checks))
    for row, bound in zip(run["per_image"], bounds):
        row["bound_psnr"] = bound_psnrs(bound)
    run["selection"] = {"rule": args.rule, "small_stage_bits": args.small_stage_bits,
                        "small_stage_pad": args.small_stage_pad, **stats}
    run["bound_curve"] = bound_rd(run, PSNRS)
    run["provenance"]["command"] = module_command("bench.rcc_chain", argv)
    write_json(out, run)
    write_text(out.with_suffix(".md"), progressive.markdown(run) + section(run["selection"]) + rd_table(run))
    print(section(run["selection"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
