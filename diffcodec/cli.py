"""The `diffcodec` command: the parser, `nll` and `train`; `cli_codec` has encode / decode,
`cli_files` info / cut.

Argument parsing and printing only; the work lives in the modules each command calls.

Every command is ``main(argv) -> exit status``. A ``DiffcodecError`` (bad input the user
can fix) is printed as one line, ``diffcodec: error: ...``, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from diffcodec.cli_codec import add_decode_parser, add_encode_parser, add_model_args, positive_int, seed_int
from diffcodec.cli_files import add_cut_parser, add_info_parser
from diffcodec.config import PRESETS
from diffcodec.errors import DiffcodecError

EXIT_USER_ERROR = 2
DESCRIPTION = ("Exact bits/dim and real compression with a denoising diffusion model (DDPM): the variational "
               "bound term by term (nll), progressive lossy-to-lossless and bits-back lossless .dfc files "
               "(encode / decode, info / cut), training (train).")


# ---------------------------------------------------------------------------------- nll


def add_nll_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "nll",
        help="bits/dim of images under the model (the variational bound, term by term)",
        description="Exact variational-bound bits/dim (Ho et al. 2020, Eq. 5): L_T + sum of KL terms + L_0.",
    )
    p.add_argument("data", help="an image, a folder of images, a CIFAR-10 .npz shard or folder of shards, "
                                "or the official CIFAR-10 python files (DIR[:train|:test] or the .tar.gz)")
    add_model_args(p)
    p.add_argument("--num-images", "-n", type=positive_int, help="use only the first N images")
    p.add_argument("--steps", "-k", type=positive_int, help="respace the chain to K steps (default: the model's T)")
    p.add_argument("--spacing", choices=("uniform", "quadratic"), default="uniform",
                   help="with --steps: keep evenly spread steps (uniform, the default, as the literature's "
                        "respaced bounds) or steps dense near t = 0 (quadratic)")
    p.add_argument("--t-samples", type=positive_int, metavar="N",
                   help="estimate each image's KL terms from N timesteps drawn at random (importance-sampled, "
                        "stratified; unbiased, the ± covers the extra variance): 1 + N network calls per image "
                        "instead of K. For large sets on a CPU; default: sum the whole chain")
    p.add_argument("--batch-size", "-b", type=positive_int, default=64, help="images (tiles) per batch (default 64)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the noise draws (default 0)")
    p.add_argument("--bf16", action="store_true",
                   help="run the network in bfloat16 autocast (CUDA only; faster, the bound's arithmetic stays "
                        "float32/64; the JSON records it)")
    p.add_argument("--convert", action="store_true", help="convert non-RGB / 16-bit images instead of refusing")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("--save-terms", metavar="FILE.npz",
                   help="write per-image, per-term bits (prior_bits, terms_bits, xstart_mse, ...) to FILE.npz")
    p.add_argument("--force", action="store_true", help="overwrite --save-terms if it exists")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(run=run_nll_command)


def run_nll_command(args: argparse.Namespace) -> int:
    from diffcodec import distributed
    from diffcodec.checkpoint import load_checkpoint
    from diffcodec.data import read_images
    from diffcodec.evaluate import grouped_terms_bpd, run_nll
    from diffcodec.likelihood import summarize
    from diffcodec.runtime import pick_device

    if args.save_terms and Path(args.save_terms).exists() and not args.force:
        raise DiffcodecError(f"{args.save_terms} exists; pass --force to overwrite it")
    device = distributed.local_device(pick_device(args.device))
    world = distributed.init(device)  # under torchrun: the images are shared out (evaluate.run_nll)
    if args.bf16 and device.type != "cuda":
        raise DiffcodecError("--bf16 needs a CUDA device (the CPU path runs float32)")
    images = read_images(args.data, limit=args.num_images, convert=args.convert)
    loaded = load_checkpoint(args.checkpoint, device=device)
    distributed.ready(world)
    for note in getattr(images, "notes", []) if world.is_main else []:
        print(f"diffcodec: note: {note}", file=sys.stderr)
    run = run_nll(loaded, images, steps=args.steps, spacing=args.spacing, batch_size=args.batch_size, seed=args.seed,
                  device=device, progress=not args.quiet, bf16=args.bf16, t_samples=args.t_samples, world=world)
    if not world.is_main:
        return 0
    summary = summarize(run.result)
    groups = grouped_terms_bpd(run.result)
    if args.save_terms:
        save_terms(args.save_terms, run, images.names)
    report = {
        "bits_per_dim": summary.total_bpd,
        "bits_per_dim_stderr": summary.total_bpd_stderr,
        "L_0_bpd": summary.decoder_bpd,
        "L_T_bpd": summary.prior_bpd,
        "kl_terms_bpd": summary.kl_bpd,
        "terms_bpd": groups,
        "xstart_rmse_255_at_t1": summary.xstart_rmse_255_at_t1,
        "num_images": summary.num_images,
        "num_tiles": run.num_tiles,
        "num_steps": summary.num_steps,
        "spacing": args.spacing if args.steps else None,
        "estimator": "monte-carlo over timesteps" if run.t_samples else "whole chain",
        "t_samples": run.t_samples,
        "num_timesteps": loaded.diffusion_config.num_timesteps,
        "var_type": loaded.diffusion_config.var_type,
        "schedule": loaded.diffusion_config.schedule,
        "checkpoint": loaded.path,
        "fingerprint": loaded.fingerprint,
        "weights": loaded.meta.get("weights", "unknown"),
        "seed": args.seed,
        "batch_size": args.batch_size,
        "network_precision": "bf16 autocast" if args.bf16 else "float32",
        "device": run.device,
        "device_name": run.device_name,
        "world_size": run.world_size,
        "seconds": run.seconds,
        "images_per_second": summary.num_images / run.seconds if run.seconds > 0 else math.nan,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_nll(report))
    return 0


def format_nll(r: dict) -> str:
    se = r["bits_per_dim_stderr"]
    lines = [
        f"bits/dim  {r['bits_per_dim']:.4f}" + (f" ± {se:.4f} (s.e.)" if not math.isnan(se) else ""),
        f"  L_T (prior)           {r['L_T_bpd']:.5f}",
        f"  KL terms (L_1..)      {r['kl_terms_bpd']:.5f}",
        f"  L_0 (decoder)         {r['L_0_bpd']:.5f}",
        "  by timestep: " + ", ".join(f"{k} {v:.4f}" for k, v in r["terms_bpd"].items()),
        f"images {r['num_images']} ({r['num_tiles']} tiles), steps {r['num_steps']} of T={r['num_timesteps']}, "
        f"{r['var_type']}, seed {r['seed']}",
        *([f"KL terms estimated from {r['t_samples']} drawn timesteps per image (unbiased; the ± includes it)"]
          if r.get("t_samples") else []),
        f"model {r['checkpoint']} (fingerprint {r['fingerprint']}, {r['weights']} weights)",
        f"{r['seconds']:.1f} s on {r['device']}"
        + (f" x {r['world_size']} processes (torchrun)" if r.get("world_size", 1) > 1 else "")
        + f" ({r['images_per_second']:.2f} images/s)",
    ]
    return "\n".join(lines)


def save_terms(path: str, run, names: list[str]) -> None:
    r = run.result
    tmp = Path(path).with_name(Path(path).name + ".tmp.npz")
    np.savez_compressed(tmp, prior_bits=r.prior_bits, terms_bits=r.terms_bits, xstart_mse=r.xstart_mse,
                        timesteps=r.timesteps, num_dims=r.num_dims, names=np.array(names))
    tmp.replace(path)


# -------------------------------------------------------------------------------- train


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model on CIFAR-10 train images (time-boxed, resumable)",
        description="eps-prediction training (L_simple, Improved DDPM's hybrid loss, or L_vlb with "
                    "importance-sampled t). Saves state.pt, ema.pt and loss_history.json in --out.",
    )
    p.add_argument("data", help="TRAINING images: a folder of .npz shards, CIFAR-10 python batches (train split), ...")
    p.add_argument("--preset", "-p", choices=PRESETS, help="model preset (needed unless --resume or --init names one)")
    p.add_argument("--loss", choices=("simple", "hybrid", "vlb"), help="default: the preset's recipe")
    p.add_argument("--minutes", "-m", type=float, help="time box for this call in minutes; saves when it ends")
    p.add_argument("--steps", type=positive_int, help="stop at this total step count")
    p.add_argument("--out", "-o", required=True, metavar="RUN_DIR", help="run directory (state.pt, ema.pt, ...)")
    p.add_argument("--resume", nargs="?", const=True, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR (default: --out) from its state.pt")
    p.add_argument("--init", metavar="CKPT", help="start from a checkpoint's weights (model = EMA = them)")
    p.add_argument("--export", metavar="PATH", help="write the fp16 EMA weights as a checkpoint at the end")
    p.add_argument("--force", action="store_true", help="overwrite --export if it exists")
    p.add_argument("--batch-size", "-b", type=positive_int, help="images per step (default: the preset's recipe)")
    p.add_argument("--lr", type=float, help="peak learning rate of Adam (default: the preset's recipe)")
    p.add_argument("--warmup", type=int, dest="warmup_steps", help="learning-rate warmup steps")
    p.add_argument("--ema-decay", type=float, help="decay of the exported EMA weights (default: the preset's recipe)")
    p.add_argument("--seed", type=seed_int, help="seed of the initial weights and the data order (default 0)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the network (CUDA)")
    p.add_argument("--num-train-images", type=positive_int, help="use only the first N training images")
    p.add_argument("--allow-test-data", action="store_true", help="train on data named like a test set")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.set_defaults(run=run_train_command)


def run_train_command(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from diffcodec import distributed
    from diffcodec.runtime import pick_device
    from diffcodec.train import train

    if args.export and Path(args.export).exists() and not args.force:
        raise DiffcodecError(f"{args.export} exists; pass --force to overwrite it")
    resume = (args.out if args.resume is True else args.resume) if args.resume else None
    overrides = {k: getattr(args, k) for k in ("batch_size", "lr", "warmup_steps", "ema_decay", "seed", "compile")}
    device = distributed.local_device(pick_device(args.device))
    world = distributed.init(device)  # under torchrun: DDP, --batch-size is the whole step's batch (trainer)
    result = train(args.data, run_dir=args.out, preset_name=args.preset, loss=args.loss, minutes=args.minutes,
                   max_steps=args.steps, resume=resume, init=args.init, export=args.export, overrides=overrides,
                   device=device, allow_test_data=args.allow_test_data,
                   data_limit=args.num_train_images, world=world)
    if not world.is_main:
        return 0
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
        print(f"step {result.steps} ({result.steps_this_piece} this call, {result.images_per_second:.1f} img/s), "
              f"loss {loss}, stopped: {result.stopped}; run in {result.run_dir}"
              + (f"; exported {result.export_path} (fingerprint {result.export_fingerprint})"
                 if result.export_path else ""))
    return 0


# --------------------------------------------------------------------------------- main


class OneLineErrors(argparse.ArgumentParser):
    """Usage errors as one line (the option and what is wrong), not the whole usage block."""

    def error(self, message: str) -> None:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="diffcodec", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_nll_parser(sub)
    add_train_parser(sub)
    add_encode_parser(sub)
    add_decode_parser(sub)
    add_info_parser(sub)
    add_cut_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.run(args)
        from diffcodec import distributed

        distributed.finish(wait=True)  # under torchrun: the ranks leave together
        return code
    except DiffcodecError as e:
        from diffcodec.distributed import error_line

        line = error_line(e)  # under torchrun: rank 0's, and what another rank alone hit
        if line is not None:
            print(line, file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("diffcodec: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("diffcodec: error: out of memory; try a smaller --batch-size", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
