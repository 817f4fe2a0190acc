"""Bits/dim of a checkpoint on the CIFAR-10 test set, term by term, and the paper's Figure 5.

    python -m bench.nll [DATA] [--checkpoint F] [--num-images N] [--steps 1000,100] [--out reports/nll.json]
    python -m bench.nll --ci-reference        # writes reports/nll_ci_reference.json (see tests/test_bench_nll.py)

For every chain length K in ``--steps`` (default: the model's T) the bound is evaluated with
`diffcodec.evaluate.run_nll` and summarised as: bits/dim (mean ± s.e. over images); the
terms L_T, L_0, L_1..L_9, L_10..L_99, L_100..L_{T-1} (grouped by ORIGINAL timestep, so a
respaced chain's steps fall in the range they cover), each mean ± s.e.; per-step mean terms
and the RMSE of x^_0; and the rate–distortion curve of the paper's Figure 5 / Table 4:

    reverse time  r = T - t + 1                    (paper t = 1..T; code column c = t - 1)
    rate(r)       = L_T + sum_{s >= t} L_s           bits/dim received once x_t is known
    RMSE(r)       = sqrt(mean_images ||x_0 - x^_0(x_t)||^2 / D)  on the [0, 255] scale

At r = T (t = 1) the rate is L_T + L_1 + ... + L_{T-1} (the paper's 1.78 bits/dim) and the
RMSE is that of x^_0 predicted from x_1 (0.95); sending x_0 itself costs L_0 more and ends
lossless. On a respaced chain, column c sits at original timestep s_c, so r = T - s_c.

The JSON goes to ``--out`` and the markdown tables built from it to the same name with .md.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import (
    REPORTS_DIR,
    module_command,
    provenance,
    resolve_data,
    run_main,
    write_json,
    write_report,
)
from diffcodec.checkpoint import LoadedModel, load_checkpoint
from diffcodec.errors import DiffcodecError
from diffcodec.evaluate import NllRun, run_nll
from diffcodec.likelihood import BoundResult
from diffcodec.runtime import pick_device

# The paper's Table 4 (CIFAR-10 test set): reverse time -> (rate bits/dim, RMSE on [0, 255]).
PAPER_TABLE4: dict[int, tuple[float, float]] = {
    1000: (1.77581, 0.95136),
    900: (0.11994, 12.02277),
    800: (0.05415, 18.47482),
    700: (0.02866, 24.43656),
    600: (0.01507, 30.80948),
    500: (0.00716, 38.03236),
    400: (0.00282, 46.12765),
    300: (0.00081, 54.18826),
    200: (0.00013, 60.97170),
    100: (0.00000, 67.60125),
}
PAPER_T = 1000

# Ranges of ORIGINAL timestep (paper L_k at original step k), [lo, hi); None = up to T - 1.
TERM_RANGES: tuple[tuple[int, int | None], ...] = ((0, 1), (1, 10), (10, 100), (100, None))

# The CI benchmark's defaults (tests/test_bench_nll.py reads its settings from the reference).
CI_NUM_IMAGES = 12
# K = 100 uniformly respaced steps: the whole pipeline (model, respacing, every term) at a tenth
# of the full chain's cost (the full T = 1000 chain took 14 minutes of the CI run on a 2-core
# Intel Xeon, one torch thread). None: the model's full T.
CI_STEPS: int | None = 100
CI_SEED = 0
CI_BATCH_SIZE = 4  # the "worse model" test re-runs the first batch, paired with the reference
CI_REFERENCE = REPORTS_DIR / "nll_ci_reference.json"

# Regression tolerance of the CI benchmark, in bits/dim (justified in `compare_to_reference`).
CI_ABS_TOL_BPD = 1e-3
CI_PAIRED_SE_FACTOR = 3.0


def mean_se(values: np.ndarray) -> tuple[float, float]:
    """Mean over axis 0 and its standard error (NaN s.e. for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    se = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return float(values.mean()), se


def range_name(lo: int, hi: int | None) -> str:
    if hi == lo + 1:
        return f"L_{lo}"
    return f"L_{lo}..L_{hi - 1}" if hi is not None else f"L_{lo}..L_T-1"


def grouped_terms(result: BoundResult) -> dict[str, dict[str, float]]:
    """Each term range's bits/dim, mean ± s.e. over images: {'L_T': {'mean', 'stderr', 'steps'}, ...}.

    Ranges follow `TERM_RANGES` by original timestep; empty ranges (T < 100, or a respaced
    chain that skips 1..9) are left out. 'steps' counts the chain's steps in the range.
    """
    t = result.timesteps
    out: dict[str, dict[str, float]] = {}
    prior_mean, prior_se = mean_se(result.prior_bits / result.num_dims)
    out["L_T"] = {"mean": prior_mean, "stderr": prior_se, "steps": 1}
    for lo, hi in TERM_RANGES:
        cols = (t >= lo) & (t < (hi if hi is not None else np.iinfo(np.int64).max))
        if not cols.any():
            continue
        m, se = mean_se(result.terms_bits[:, cols].sum(axis=1) / result.num_dims)
        out[range_name(lo, hi)] = {"mean": m, "stderr": se, "steps": int(cols.sum())}
    return out


@dataclass(frozen=True)
class RateDistortion:
    """Figure 5's curves, ordered by increasing reverse time. float64 numpy arrays [K]."""

    reverse_time: np.ndarray  # T - original timestep of the column (paper t = timestep + 1)
    rate_bpd: np.ndarray  # mean over images of L_T + sum of the terms of later code steps
    rate_bpd_stderr: np.ndarray
    rmse_255: np.ndarray  # sqrt of the mean over images of the x^_0 MSE, [0, 255] scale
    lossless_bpd: float  # the whole bound: the rate after x_0 itself is sent (RMSE 0)


def rate_distortion(result: BoundResult, num_timesteps: int) -> RateDistortion:
    """Cumulative rate and RMSE of x^_0 against reverse time (see the module docstring)."""
    terms_bpd = result.terms_bits / result.num_dims[:, None]  # [N, K], column k = paper L_k
    # later[:, c] = sum of columns k > c: the bits sent before x_{t} with t = c + 1 is known
    suffix = np.cumsum(terms_bpd[:, ::-1], axis=1)[:, ::-1]
    later = np.concatenate([suffix[:, 1:], np.zeros((len(terms_bpd), 1))], axis=1)
    rate = (result.prior_bits / result.num_dims)[:, None] + later  # [N, K]
    n = len(rate)
    se = rate.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else np.full(rate.shape[1], np.nan)
    order = slice(None, None, -1)  # columns run in increasing t = decreasing reverse time
    return RateDistortion(
        reverse_time=(num_timesteps - result.timesteps)[order].astype(np.int64),
        rate_bpd=rate.mean(axis=0)[order],
        rate_bpd_stderr=se[order],
        rmse_255=np.sqrt(result.xstart_mse.mean(axis=0))[order],
        lossless_bpd=float(result.total_bpd.mean()),
    )


def table4_rows(rd: RateDistortion, num_timesteps: int) -> list[dict[str, Any]]:
    """Our rate and RMSE at the paper's reverse times 100, ..., 1000 (scaled to T), beside the
    paper's Table 4. On a respaced chain the nearest reverse time on the chain is used and
    recorded as 'reverse_time_used'."""
    rows = []
    for paper_r in sorted(PAPER_TABLE4, reverse=True):
        target = paper_r * num_timesteps / PAPER_T
        i = int(np.argmin(np.abs(rd.reverse_time - target)))
        paper_rate, paper_rmse = PAPER_TABLE4[paper_r]
        rows.append({
            "reverse_time": paper_r,
            "reverse_time_used": int(rd.reverse_time[i]),
            "rate_bpd": float(rd.rate_bpd[i]),
            "rate_bpd_stderr": float(rd.rate_bpd_stderr[i]),
            "rmse_255": float(rd.rmse_255[i]),
            "paper_rate_bpd": paper_rate,
            "paper_rmse_255": paper_rmse,
        })
    return rows


def summarize_run(run: NllRun, num_timesteps: int) -> dict[str, Any]:
    """The JSON record of one chain: totals, grouped terms, per-step curves, Figure 5, Table 4."""
    r = run.result
    total_mean, total_se = mean_se(r.total_bpd)
    terms_bpd = r.terms_bits / r.num_dims[:, None]
    n = len(terms_bpd)
    rd = rate_distortion(r, num_timesteps)
    rate_mean, rate_se = mean_se((r.prior_bits + r.terms_bits[:, 1:].sum(axis=1)) / r.num_dims)
    return {
        "steps": int(r.terms_bits.shape[1]),
        "num_images": n,
        "num_tiles": run.num_tiles,
        "bits_per_dim": total_mean,
        "bits_per_dim_stderr": total_se,
        "terms": grouped_terms(r),
        # Section 4.3's split: rate L_1..L_T (prior included), distortion L_0, RMSE at t = 1
        "rate_L1_to_LT_bpd": rate_mean,
        "rate_L1_to_LT_bpd_stderr": rate_se,
        "xstart_rmse_255_at_t1": float(np.sqrt(r.xstart_mse[:, 0].mean())),
        "per_step": {
            "timesteps": r.timesteps.tolist(),
            "terms_bpd_mean": terms_bpd.mean(axis=0).tolist(),
            "terms_bpd_stderr": (terms_bpd.std(axis=0, ddof=1) / math.sqrt(n)).tolist() if n > 1 else None,
            "xstart_rmse_255": np.sqrt(r.xstart_mse.mean(axis=0)).tolist(),
        },
        "figure5": {
            "reverse_time": rd.reverse_time.tolist(),
            "rate_bpd": rd.rate_bpd.tolist(),
            "rate_bpd_stderr": rd.rate_bpd_stderr.tolist(),
            "rmse_255": rd.rmse_255.tolist(),
            "lossless_bpd": rd.lossless_bpd,
        },
        "table4": table4_rows(rd, num_timesteps),
        "per_image_bpd": r.total_bpd.tolist(),
        "seconds": run.seconds,
        "images_per_second": n / run.seconds if run.seconds > 0 else None,
        "device": run.device,
    }


# ------------------------------------------------------------------------------ markdown


def _pm(entry: dict[str, float], digits: int = 4) -> str:
    se = entry.get("stderr")
    return f"{entry['mean']:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None and math.isfinite(se) else "")


def markdown_tables(payload: dict[str, Any], *, header: bool = True) -> str:
    """The bits/dim table (one row per chain) and the Table 4 comparison, from nll.json; with
    ``header`` a first paragraph naming the model, images, seed, device and command."""
    prov = payload["provenance"]
    model = prov.get("model") or {}
    runs = payload["runs"]
    names = list(runs[0]["terms"]) if runs else []
    lines = [
        f"<!-- generated by bench/nll.py from {payload.get('json_name', 'nll.json')}; do not edit -->",
        f"Model `{model.get('path')}` (fingerprint `{model.get('fingerprint')}`), "
        f"{payload['num_images']} CIFAR-10 test images, seed {prov.get('seed')}, device {prov.get('device')}.",
        f"Command: `{prov.get('command')}`",
        "",
    ] if header else []
    lines += [
        "Bits/dim (mean ± s.e. over images) and its terms; each range sums the chain's steps at those "
        "original timesteps:",
        "",
        "| steps K | bits/dim | " + " | ".join(names) + " | RMSE x^_0 at t=1 | seconds |",
        "|---|---|" + "---|" * len(names) + "---|---|",
    ]
    for run in runs:
        cells = [_pm(run["terms"][k], 5) if k in run["terms"] else "–" for k in names]
        lines.append(
            f"| {run['steps']}{' (' + run['spacing'] + ')' if run.get('spacing') else ''} | "
            f"{_pm({'mean': run['bits_per_dim'], 'stderr': run['bits_per_dim_stderr']})} | "
            + " | ".join(cells) + f" | {run['xstart_rmse_255_at_t1']:.3f} | {run['seconds']:.0f} |"
        )
    fig_run = figure5_run(payload)
    if fig_run is not None:
        lines += [
            "",
            f"Table 4 (rate–distortion against reverse time), ours on the {fig_run['steps']}-step chain beside the "
            "paper's (35.7M model, CIFAR-10 test set). Rate = cumulative bits/dim received; RMSE of x^_0 on [0, 255]:",
            "",
            "| reverse time | rate (bits/dim), ours | rate, paper | RMSE, ours | RMSE, paper |",
            "|---|---|---|---|---|",
        ]
        for row in fig_run["table4"]:
            shown = row["reverse_time"] if row["reverse_time_used"] == row["reverse_time"] else \
                f"{row['reverse_time']} (chain: {row['reverse_time_used']})"
            lines.append(
                f"| {shown} | {row['rate_bpd']:.5f} | {row['paper_rate_bpd']:.5f} | {row['rmse_255']:.3f} | "
                f"{row['paper_rmse_255']:.3f} |"
            )
        lossless = fig_run["figure5"]["lossless_bpd"]
        lines.append(f"| lossless (x_0 sent) | {lossless:.5f} | 3.75 (L_simple, Table 1) | 0 | 0 |")
    return "\n".join(lines) + "\n"


def figure5_run(payload: dict[str, Any]) -> dict[str, Any] | None:
    """The run that Figure 5 is drawn from: the longest chain (full T when evaluated)."""
    runs = payload.get("runs") or []
    return max(runs, key=lambda r: r["steps"]) if runs else None


# ------------------------------------------------------------------------------ the CI benchmark


@dataclass(frozen=True)
class Comparison:
    ok: bool
    diff_bpd: float  # mean over images of (measured - reference) bits/dim
    paired_stderr_bpd: float  # standard error of that mean
    tolerance_bpd: float
    message: str


def compare_to_reference(per_image_bpd: np.ndarray, reference: dict[str, Any]) -> Comparison:
    """Is a measured bits/dim (per image, the first n of the reference's images, same seed and
    batches) consistent with the reference? Two-sided: a bug that drops a term lowers it.

    With the same weights, images, seed and batch size the noise draws are identical, so the
    value is a deterministic function of the code: on one machine it reproduces exactly and
    across machines only float rounding in the network (~1e-6 relative) moves it. The s.e.
    across images (~0.05 bits/dim for 16 images) measures how far these images sit from the
    test-set mean, which is irrelevant to a paired re-run, so it is NOT the tolerance. The
    tolerance is max(1e-3 bits/dim, 3 x s.e. of the paired per-image differences):
    - the 1e-3 floor covers float differences across machines with ~100x margin, and is far
      below any change worth catching (a model that is 1e-3 bits/dim worse is a regression we
      accept not to see);
    - if a change to the code legitimately redraws the noise (another draw order), each image's
      single-sample estimate moves by its own noise and the paired differences scatter around
      zero; 3 s.e. of their mean accepts that at ~99.7% while a real shift of the bound, which
      moves every image the same way, still stands out.
    """
    ref = np.asarray(reference["per_image_bpd"], dtype=np.float64)
    got = np.asarray(per_image_bpd, dtype=np.float64)
    if not 1 <= len(got) <= len(ref):
        raise ValueError(f"expected 1..{len(ref)} per-image values, got {len(got)}")
    d = got - ref[: len(got)]
    diff = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
    tol = max(CI_ABS_TOL_BPD, CI_PAIRED_SE_FACTOR * se)
    ok = bool(abs(diff) <= tol)
    verdict = "within" if ok else "OUTSIDE"
    message = (
        f"bits/dim {got.mean():.5f} vs reference {ref[: len(got)].mean():.5f} on {len(got)} images: "
        f"difference {diff:+.5f} (paired s.e. {se:.5f}), {verdict} tolerance ±{tol:.5f}"
    )
    return Comparison(ok, diff, se, tol, message)


def reference_mismatch(reference: dict[str, Any], loaded: LoadedModel) -> str | None:
    """Why the reference cannot judge this model (another fingerprint), or None."""
    if reference.get("fingerprint") != loaded.fingerprint:
        return (
            f"the CI reference was recorded for model {reference.get('fingerprint')} but the model is "
            f"{loaded.fingerprint}; regenerate it with `python -m bench.nll --ci-reference` and commit "
            f"{CI_REFERENCE.relative_to(REPORTS_DIR.parent)}"
        )
    return None


def evaluate_subset(
    loaded: LoadedModel,
    data: str | Path,
    *,
    num_images: int,
    steps: int | None,
    seed: int,
    batch_size: int,
    device: torch.device,
    progress: bool = False,
    spacing: str = "uniform",
) -> NllRun:
    """The bound of the first ``num_images`` images of ``data`` (read with diffcodec.data)."""
    from diffcodec.data import read_images

    images = read_images(data, limit=num_images)
    if len(images) < num_images:
        raise DiffcodecError(f"{data}: holds {len(images)} images, fewer than the {num_images} asked for")
    return run_nll(loaded, images, steps=steps, spacing=spacing, batch_size=batch_size, seed=seed, device=device,
                   progress=progress)


def ci_reference_payload(run: NllRun, loaded: LoadedModel, *, data: str, seed: int, batch_size: int,
                         prov: dict[str, Any]) -> dict[str, Any]:
    r = run.result
    mean, se = mean_se(r.total_bpd)
    return {
        "bits_per_dim": mean,
        "bits_per_dim_stderr": se,
        "per_image_bpd": r.total_bpd.tolist(),
        "fingerprint": loaded.fingerprint,
        "num_images": len(r.total_bpd),
        "steps": int(r.terms_bits.shape[1]),
        "num_timesteps": loaded.diffusion_config.num_timesteps,
        "seed": seed,
        "batch_size": batch_size,
        "data": data,
        "seconds": run.seconds,
        "tolerance_rule": f"|mean paired difference| <= max({CI_ABS_TOL_BPD}, {CI_PAIRED_SE_FACTOR} x paired s.e.)",
        "provenance": prov,
    }


# ------------------------------------------------------------------------------ command line


def parse_steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return steps


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.nll", description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="?",
                   help="CIFAR-10 test shards (default: ../shared/data/cifar10/test beside the repo)")
    p.add_argument("--checkpoint", "-c", help="checkpoint (default: the embedded default model)")
    p.add_argument("--num-images", "-n", type=int,
                   help=f"first N images (default 256; {CI_NUM_IMAGES} with --ci-reference)")
    p.add_argument("--steps", "-k", type=parse_steps,
                   help="chain lengths, e.g. 1000,100 (default: the model's T)")
    p.add_argument("--batch-size", "-b", type=int,
                   help=f"images per batch (default 32; {CI_BATCH_SIZE} with --ci-reference)")
    p.add_argument("--spacing", choices=("uniform", "quadratic"), default="uniform",
                   help="steps kept by the respaced chains (K < T): uniform (default) or dense near t = 0")
    p.add_argument("--seed", type=int, default=CI_SEED, help="seed of the noise draws (default 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--out", help="output JSON (default reports/nll.json, or reports/nll_ci_reference.json)")
    p.add_argument("--ci-reference", action="store_true", help="record the CI benchmark's reference value")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 is faster on a CPU "
                                               "another job keeps busy)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = module_command("bench.nll", argv)
    ci = args.ci_reference
    num_images = args.num_images or (CI_NUM_IMAGES if ci else 256)
    batch_size = args.batch_size or (CI_BATCH_SIZE if ci else 32)
    if num_images < 1 or batch_size < 1:
        raise DiffcodecError("--num-images and --batch-size must be positive")
    if args.threads is not None:
        if args.threads < 1:
            raise DiffcodecError("--threads must be positive")
        torch.set_num_threads(args.threads)  # a script's choice, recorded in the device string
    device = pick_device(args.device)
    data = resolve_data(args.data)
    loaded = load_checkpoint(args.checkpoint, device=device)
    T = loaded.diffusion_config.num_timesteps
    steps_list = args.steps or ([CI_STEPS or T] if ci else [T])
    if any(k > T for k in steps_list):
        raise DiffcodecError(f"--steps must be at most the model's T = {T}")
    prov = provenance(args, loaded, args.seed, device=device, command=command)

    if ci:
        if len(steps_list) != 1:
            raise DiffcodecError("--ci-reference takes one --steps value")
        run = evaluate_subset(loaded, data, num_images=num_images, steps=steps_list[0], seed=args.seed,
                              batch_size=batch_size, device=device, progress=not args.quiet)
        payload = ci_reference_payload(run, loaded, data=str(args.data or "../shared/data/cifar10/test"),
                                       seed=args.seed, batch_size=batch_size, prov=prov)
        out = write_json(args.out or CI_REFERENCE, payload)
        print(f"{payload['bits_per_dim']:.5f} ± {payload['bits_per_dim_stderr']:.5f} bits/dim on {num_images} images, "
              f"K={payload['steps']}, {run.seconds:.1f} s -> {out}")
        return 0

    runs = []
    for k in steps_list:
        run = evaluate_subset(loaded, data, num_images=num_images, steps=k, seed=args.seed, batch_size=batch_size,
                              device=device, progress=not args.quiet, spacing=args.spacing)
        runs.append(summarize_run(run, T))
        runs[-1]["spacing"] = args.spacing if k < T else None
        print(f"K={k}: {runs[-1]['bits_per_dim']:.4f} ± {runs[-1]['bits_per_dim_stderr']:.4f} bits/dim "
              f"({run.seconds:.0f} s)", file=sys.stderr)
    out = Path(args.out or REPORTS_DIR / "nll.json")
    payload = {
        "kind": "nll",
        "json_name": out.name,
        "data": str(args.data or "../shared/data/cifar10/test"),
        "num_images": num_images,
        "batch_size": batch_size,
        "num_timesteps": T,
        "var_type": loaded.diffusion_config.var_type,
        "provenance": prov,
        "runs": runs,
    }
    write_report(out, payload, markdown_tables)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
