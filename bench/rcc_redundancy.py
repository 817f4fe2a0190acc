"""What one chunk of reverse channel coding costs, and how exact its sample is, as a
function of the chunk's KL and the encoder's candidate budget.

    python -m bench.rcc_redundancy [--kl-bits 2,4,...,40] [--log2-candidates 12,16,20,24,28]
        [--trials 2000] [--seed 0] [--out reports/rcc_redundancy.json]

(`python -m bench.plot` draws reports/rcc_redundancy.png from the JSON.)

Why one dimension is enough. For q = N(m_q, s^2 I) and p = N(m_p, s^2 I) (equal variances)
the PFR score of a candidate u ~ N(0, I) depends on u only through its projection
v = e . u onto the unit direction e of the mean shift: log w = mu v - mu^2 / 2, with
mu = |m_q - m_p| / s and KL(q || p) = mu^2 / 2 nats. So a chunk of any width behaves, for
the index and for the selected sample's law along e, exactly as the 1-D problem
"send v ~ N(mu, 1) using N(0, 1)" (the codec's learned variances add a small quadratic
term; the mean shift dominates). Components orthogonal to e are p-distributed either way.

Per (KL, N) the script draws ``trials`` independent truncated PFR selections
(`rcc.pfr_select`'s rule: argmin_n log T_n - log w(v_n) over n < N) and records
  index_bits      the index's ideal code length under the best law of its exponent
                  (plug-in entropy of bit_length(n*) plus the m - 1 mantissa bits, as
                  `rcc.split_index` codes it); ``redundancy_bits`` = index_bits - KL
  shift_fraction  E[v*] / mu: the share of the mean shift the sample delivers (1 if exact)
  sample_std      std of v* (1 if exact)
  delivered_bits  KL(N(E v*, var v*) || N(0, 1)): the information the sample carries
                  (KL if exact); the shortfall is paid again by later stages

Exact simulation of up to 2^28 candidates without drawing them all: the first 4096 are drawn
in full; beyond them only candidates whose v exceeds the threshold at which they could
still win (log T_4095 - mu v < best score so far) are drawn, as a binomial count with
uniform positions, truncated-normal values and gamma-distributed arrival gaps. A candidate
below the threshold cannot beat the best of the first 4096, so the argmin is exact.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import ndtr, ndtri

from bench.common import REPORTS_DIR, module_command, provenance, run_main, write_json, write_text

LN2 = math.log(2.0)
FULL_PREFIX = 4096  # candidates drawn in full before thresholding


def pfr_trial(mu: float, num_candidates: int, rng: np.random.Generator) -> tuple[int, float]:
    """One truncated PFR selection of the 1-D problem: (index n*, selected v*)."""
    m = min(num_candidates, FULL_PREFIX)
    v = rng.standard_normal(m)
    log_t = np.log(np.cumsum(rng.standard_exponential(m)))
    score = log_t - mu * v
    best = int(np.argmin(score))
    best_score, best_v = float(score[best]), float(v[best])
    rest = num_candidates - m
    if rest == 0 or mu <= 0.0:
        return best, best_v
    # beyond the prefix T_n > T_{m-1}: a candidate there can win only if v > threshold
    t_prev = math.exp(float(log_t[-1]))
    threshold = (float(log_t[-1]) - best_score) / mu
    tail = float(ndtr(-threshold))  # P(v > threshold)
    count = int(rng.binomial(rest, tail))
    if count == 0:
        return best, best_v
    positions = np.sort(rng.choice(rest, size=count, replace=False)) if count < rest else np.arange(rest)
    idx = m + positions
    # arrival times at those indices: gamma increments between consecutive chosen indices
    gaps = np.diff(np.concatenate([[m - 1], idx]))
    times = t_prev + np.cumsum(rng.standard_gamma(gaps.astype(np.float64)))
    # truncated normal above the threshold by inversion of the upper tail
    u = rng.random(count)
    vals = -ndtri(np.clip(u * tail, 1e-300, None))
    scores = np.log(times) - mu * vals
    j = int(np.argmin(scores))
    if scores[j] < best_score:
        return int(idx[j]), float(vals[j])
    return best, best_v


def index_entropy_bits(indices: np.ndarray) -> float:
    """Ideal code length of the indices (bits): exponent under its empirical law (plug-in
    entropy with the Miller-Madow correction) plus m - 1 uniform mantissa bits."""
    exps = np.array([int(n).bit_length() for n in indices])
    _, counts = np.unique(exps, return_counts=True)
    p = counts / counts.sum()
    entropy = float(-(p * np.log2(p)).sum()) + (len(counts) - 1) / (2 * len(indices) * LN2)
    return entropy + float(np.maximum(exps - 1, 0).mean())


def measure(kl_bits: float, log2_candidates: int, trials: int, rng: np.random.Generator) -> dict[str, float]:
    mu = math.sqrt(2.0 * kl_bits * LN2)
    picks = [pfr_trial(mu, 1 << log2_candidates, rng) for _ in range(trials)]
    indices = np.array([n for n, _ in picks], dtype=np.int64)
    v = np.array([x for _, x in picks])
    mean, var = float(v.mean()), float(v.var())
    delivered = 0.5 * (var + mean**2 - 1.0 - math.log(var)) / LN2
    bits = index_entropy_bits(indices)
    return {
        "kl_bits": kl_bits,
        "log2_candidates": log2_candidates,
        "trials": trials,
        "index_bits": bits,
        "redundancy_bits": bits - kl_bits,
        "shift_fraction": mean / mu,
        "sample_std": math.sqrt(var),
        "delivered_bits": delivered,
        "shortfall_bits": kl_bits - delivered,
        "mean_log2_index": float(np.log2(indices + 1.0).mean()),
    }


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    kls = sorted({r["kl_bits"] for r in rows})
    budgets = sorted({r["log2_candidates"] for r in rows})
    cell = {(r["kl_bits"], r["log2_candidates"]): r for r in rows}
    lines = [
        "# Reverse channel coding: cost and exactness of one chunk",
        "",
        f"`{command}` (1-D equivalent of a chunk; see the docstring of `bench/rcc_redundancy.py`).",
        "Each cell: index bits over the chunk's KL (redundancy) / share of the mean shift the",
        "selected sample delivers (1.00 = exact) / information the sample delivers, in bits.",
        "",
        "| KL bits | " + " | ".join(f"2^{b} candidates" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for kl in kls:
        cells = []
        for b in budgets:
            r = cell.get((kl, b))
            cells.append("" if r is None else
                         f"{r['redundancy_bits']:+.2f} / {r['shift_fraction']:.2f} / {r['delivered_bits']:.1f}")
        lines.append(f"| {kl:g} | " + " | ".join(cells) + " |")
    exact = [r for r in rows if r["shift_fraction"] > 0.98 and r["sample_std"] > 0.95]
    if exact:
        lo, hi = min(exact, key=lambda r: r["kl_bits"]), max(exact, key=lambda r: r["kl_bits"])
        lines += ["", f"Exact chunks (shift share > 0.98, std > 0.95) pay {lo['redundancy_bits']:.2f} bits at "
                  f"KL {lo['kl_bits']:g} .. {hi['redundancy_bits']:.2f} bits at KL {hi['kl_bits']:g} over their KL "
                  "(growing like log KL): an overhead of at most 10% needs exact chunks of "
                  f"{10 * hi['redundancy_bits']:.0f}+ bits, i.e. far more than 2^{max(r['log2_candidates'] for r in rows)} "
                  "candidates each."]
    best = min(rows, key=lambda r: r["index_bits"] / max(r["delivered_bits"], 1e-9))
    lines += ["", "Index bits per bit the sample delivers (the shortfall is paid again later): best "
              f"{best['index_bits'] / best['delivered_bits']:.2f} at KL {best['kl_bits']:g}, 2^{best['log2_candidates']} "
              "candidates.", "",
              "| KL bits | " + " | ".join(f"2^{b}" for b in budgets) + " |",
              "|---|" + "---|" * len(budgets)]
    for kl in kls:
        lines.append(f"| {kl:g} | " + " | ".join(
            "" if (kl, b) not in cell else f"{cell[(kl, b)]['index_bits'] / max(cell[(kl, b)]['delivered_bits'], 1e-9):.2f}"
            for b in budgets) + " |")
    return "\n".join(lines) + "\n"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def check_grid(p: argparse.ArgumentParser, args: argparse.Namespace, max_log2: int) -> None:
    """Refuse (exit status 2) fewer than 2 trials, an empty grid, a KL <= 0 or a budget out of 1..max_log2."""
    if args.trials < 2 or not args.kl_bits or not args.log2_candidates:
        p.error("need --trials >= 2 and at least one KL and one budget")
    if any(k <= 0 for k in args.kl_bits) or any(not 1 <= b <= max_log2 for b in args.log2_candidates):
        p.error(f"KLs must be > 0 bits and budgets 1..{max_log2}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rcc_redundancy", description=__doc__.split("\n\n")[0])
    p.add_argument("--kl-bits", type=_floats, default=_floats("2,4,6,8,11,14,17,20,28,40"),
                   help="chunk KLs in bits (default 2,4,6,8,11,14,17,20,28,40)")
    p.add_argument("--log2-candidates", type=_ints, default=_ints("12,16,20,24,28"),
                   help="candidate budgets as log2 (default 12,16,20,24,28)")
    p.add_argument("--trials", type=int, default=2000, help="selections per cell (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPORTS_DIR / "rcc_redundancy.json")
    args = p.parse_args(argv)
    check_grid(p, args, 40)
    rng = np.random.default_rng(args.seed)
    rows = []
    for b in args.log2_candidates:
        for kl in args.kl_bits:
            row = measure(kl, b, args.trials, rng)
            rows.append(row)
            print(f"2^{b:2d} candidates, KL {kl:5.1f} bits: redundancy {row['redundancy_bits']:+.2f} bits, "
                  f"shift share {row['shift_fraction']:.3f}, std {row['sample_std']:.3f}, "
                  f"delivered {row['delivered_bits']:.2f} bits", file=sys.stderr, flush=True)
    prov = provenance(args, seed=args.seed, command=module_command("bench.rcc_redundancy", argv))
    write_json(args.out, {"kind": "rcc_redundancy", "rows": rows, "provenance": prov})
    write_text(args.out.with_suffix(".md"), markdown(rows, prov["command"]))
    print(f"wrote {args.out} and {args.out.with_suffix('.md').name} (figure: python -m bench.plot)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
