"""The bound of a whole test set on a CPU: Monte Carlo over timesteps (`diffcodec nll --t-samples`).

Summing all T = 1000 terms costs 1000 network calls per image: 10,000 CIFAR-10 test images
take about 90 hours on one core of this project's CPU. Drawing N timesteps per image from
an importance proposal gives an unbiased estimate of the same bound for 1 + N calls
(``diffcodec.likelihood``, Monte Carlo over timesteps); the standard error over images
includes the extra variance. Writes reports/nll_test_all.json: bits/dim and each term
range's mean ± s.e., the spread over images, the estimator's settings.

    python -m bench.nll_all --t-samples 8                       # run it (1 + 8 calls per image)
    python -m bench.nll_all --terms T.npz --cli-json R.json     # or report an earlier run of
        diffcodec nll DATA --t-samples 8 --json --save-terms T.npz > R.json   (e.g. on a GPU box)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import REPORTS_DIR, load_json_input, module_command, provenance, resolve_data, run_main, write_json
from bench.nll import grouped_terms, mean_se
from diffcodec.likelihood import BoundResult

DEFAULT_T_SAMPLES = 8


def report_of(result: BoundResult, run: dict[str, Any]) -> dict[str, Any]:
    """The report's numbers from per-image terms (one row per image) and the run's settings."""
    total = result.total_bpd
    mean, se = mean_se(total)
    return {
        "bits_per_dim": mean,
        "bits_per_dim_stderr": se,
        "terms_bpd": grouped_terms(result),
        "per_image_bpd_percentiles": {str(q): float(np.percentile(total, q)) for q in (1, 10, 50, 90, 99)},
        "num_images": len(total),
        "num_steps": int(result.terms_bits.shape[1]),
        **run,
    }


def result_of_terms(path: str | Path) -> BoundResult:
    """A BoundResult from a `diffcodec nll --save-terms` file (one-line errors for a missing or
    wrong file)."""
    from diffcodec.errors import DiffcodecError

    try:
        with np.load(path) as z:
            return BoundResult(prior_bits=z["prior_bits"], terms_bits=z["terms_bits"], xstart_mse=z["xstart_mse"],
                               timesteps=z["timesteps"], num_dims=z["num_dims"])
    except FileNotFoundError:
        raise DiffcodecError(f"{path}: no such file") from None
    except (OSError, ValueError, KeyError) as e:  # not an npz, or one without the terms
        raise DiffcodecError(f"{path}: not a `diffcodec nll --save-terms` file ({e})") from None


def read_cli_json(path: str | Path) -> dict[str, Any]:
    """The `diffcodec nll --json` output of the run that saved the terms."""
    from diffcodec.errors import DiffcodecError

    run = load_json_input(path, "the JSON output of `diffcodec nll --json`")
    if "fingerprint" not in run:
        raise DiffcodecError(f"{path}: not the JSON output of `diffcodec nll --json` (no model fingerprint)")
    return run


RUN_KEYS = ("estimator", "t_samples", "num_timesteps", "var_type", "schedule", "fingerprint", "weights", "seed",
            "batch_size", "network_precision", "device", "device_name", "seconds", "checkpoint")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.nll_all", description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="?", help="CIFAR-10 test shards (default ../shared/data/cifar10/test)")
    p.add_argument("--checkpoint", "-c", help="checkpoint (default: the embedded default model)")
    p.add_argument("--num-images", "-n", type=int, help="only the first N images (default: all)")
    p.add_argument("--t-samples", type=int, default=DEFAULT_T_SAMPLES,
                   help=f"timesteps drawn per image (default {DEFAULT_T_SAMPLES})")
    p.add_argument("--batch-size", "-b", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    p.add_argument("--terms", help="report an earlier `diffcodec nll --save-terms` file instead of running")
    p.add_argument("--cli-json", help="with --terms: that run's `--json` output (its settings and timing)")
    p.add_argument("--cli-command", help="with --terms: the command that made it (recorded)")
    p.add_argument("--out", default=str(REPORTS_DIR / "nll_test_all.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from diffcodec.checkpoint import load_checkpoint
    from diffcodec.data import read_images
    from diffcodec.errors import DiffcodecError
    from diffcodec.evaluate import run_nll

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_checkpoint(args.checkpoint, device="cpu")
    prov = provenance(args, loaded, seed=args.seed, device="cpu", command=module_command("bench.nll_all", argv))
    if args.terms:
        if not args.cli_json:
            raise DiffcodecError("--terms needs --cli-json (the run's settings and timing)")
        run = read_cli_json(args.cli_json)
        if run.get("fingerprint") != loaded.fingerprint:
            raise DiffcodecError(f"{args.cli_json}: model {run.get('fingerprint')}, checkpoint {loaded.fingerprint}")
        result = result_of_terms(args.terms)
        if len(result.total_bpd) != run.get("num_images", len(result.total_bpd)):
            raise DiffcodecError(f"{args.terms}: {len(result.total_bpd)} images, {args.cli_json}: {run['num_images']}")
        prov["nll_command"] = args.cli_command
        # the machine that ran the nll command, not this one (older --json output: its device kind only)
        prov["device"] = run.get("device_name") or f"{run.get('device', 'unknown')} (kind only: not recorded by the run)"
    else:
        images = read_images(resolve_data(args.data), limit=args.num_images)
        nll = run_nll(loaded, images, batch_size=args.batch_size, seed=args.seed, device=torch.device("cpu"),
                      t_samples=args.t_samples)
        result = nll.result
        run = {"estimator": "monte-carlo over timesteps", "t_samples": nll.t_samples,
               "num_timesteps": loaded.diffusion_config.num_timesteps, "var_type": loaded.diffusion_config.var_type,
               "schedule": loaded.diffusion_config.schedule, "fingerprint": loaded.fingerprint,
               "weights": loaded.meta.get("weights", "unknown"), "seed": args.seed, "batch_size": args.batch_size,
               "network_precision": "float32", "device": nll.device, "device_name": nll.device_name,
               "seconds": nll.seconds}
    report = {"provenance": prov, **report_of(result, {k: run.get(k) for k in RUN_KEYS if k in run})}
    path = write_json(args.out, report)
    print(f"{report['bits_per_dim']:.4f} ± {report['bits_per_dim_stderr']:.4f} bits/dim over "
          f"{report['num_images']} images; wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
