"""The `diffcodec` command: argument parsing and printing only; the work lives elsewhere.

Every command is ``main(argv) -> exit status``. A ``DiffcodecError`` (bad input the user
can fix) is printed as one line, ``diffcodec: error: ...``, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from diffcodec.errors import DiffcodecError

EXIT_USER_ERROR = 2
# lossless encode: the chain's default length (reports/nll.md: 3.721 vs 3.696 bits/dim at T = 1000 on
# the default model, 64 CIFAR-10 test images, quadratic spacing)
DEFAULT_LOSSLESS_STEPS = 100


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", "-c", help="checkpoint file (default: the embedded default model)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")


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
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draws (default 0)")
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
    from diffcodec.checkpoint import load_checkpoint
    from diffcodec.data import read_images
    from diffcodec.evaluate import grouped_terms_bpd, pick_device, run_nll
    from diffcodec.likelihood import summarize

    if args.save_terms and Path(args.save_terms).exists() and not args.force:
        raise DiffcodecError(f"{args.save_terms} exists; pass --force to overwrite it")
    device = pick_device(args.device)
    if args.bf16 and device.type != "cuda":
        raise DiffcodecError("--bf16 needs a CUDA device (the CPU path runs float32)")
    images = read_images(args.data, limit=args.num_images, convert=args.convert)
    loaded = load_checkpoint(args.checkpoint, device=device)
    for note in getattr(images, "notes", []):
        print(f"diffcodec: note: {note}", file=sys.stderr)
    run = run_nll(loaded, images, steps=args.steps, spacing=args.spacing, batch_size=args.batch_size, seed=args.seed,
                  device=device, progress=not args.quiet, bf16=args.bf16, t_samples=args.t_samples)
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
        f"{r['seconds']:.1f} s on {r['device']} ({r['images_per_second']:.2f} images/s)",
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
    p.add_argument("--preset", "-p", help="model preset (see diffcodec.config.PRESETS)")
    p.add_argument("--loss", choices=("simple", "hybrid", "vlb"), help="default: the preset's recipe")
    p.add_argument("--minutes", "-m", type=float, help="time box for this call in minutes; saves when it ends")
    p.add_argument("--steps", type=positive_int, help="stop at this total step count")
    p.add_argument("--out", "-o", required=True, metavar="RUN_DIR", help="run directory (state.pt, ema.pt, ...)")
    p.add_argument("--resume", nargs="?", const=True, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR (default: --out) from its state.pt")
    p.add_argument("--init", metavar="CKPT", help="start from a checkpoint's weights (model = EMA = them)")
    p.add_argument("--export", metavar="PATH", help="write the fp16 EMA weights as a checkpoint at the end")
    p.add_argument("--force", action="store_true", help="overwrite --export if it exists")
    p.add_argument("--batch-size", "-b", type=positive_int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int, dest="warmup_steps", help="learning-rate warmup steps")
    p.add_argument("--ema-decay", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the network (CUDA)")
    p.add_argument("--num-train-images", type=positive_int, help="use only the first N training images")
    p.add_argument("--allow-test-data", action="store_true", help="train on data named like a test set")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.set_defaults(run=run_train_command)


def run_train_command(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from diffcodec.evaluate import pick_device
    from diffcodec.train import train

    if args.export and Path(args.export).exists() and not args.force:
        raise DiffcodecError(f"{args.export} exists; pass --force to overwrite it")
    resume = (args.out if args.resume is True else args.resume) if args.resume else None
    overrides = {k: getattr(args, k) for k in ("batch_size", "lr", "warmup_steps", "ema_decay", "seed", "compile")}
    result = train(args.data, run_dir=args.out, preset_name=args.preset, loss=args.loss, minutes=args.minutes,
                   max_steps=args.steps, resume=resume, init=args.init, export=args.export, overrides=overrides,
                   device=pick_device(args.device), allow_test_data=args.allow_test_data,
                   data_limit=args.num_train_images)
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
        print(f"step {result.steps} ({result.steps_this_piece} this call, {result.images_per_second:.1f} img/s), "
              f"loss {loss}, stopped: {result.stopped}; run in {result.run_dir}"
              + (f"; exported {result.export_path} (fingerprint {result.export_fingerprint})"
                 if result.export_path else ""))
    return 0


# ------------------------------------------------------------------------ encode / decode


def add_encode_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "encode",
        help="compress images losslessly into a .dfc file (bits-back coding over the diffusion chain)",
        description="Lossless bits-back ANS coding over the model's diffusion chain: the file size is the "
                    "variational bound (Eq. 5) plus a small overhead. Images of any size are cut into "
                    "model-size tiles; all images share one stream. The stream's first few tiles are sent "
                    "with the progressive codec to seed the bits-back stack (--no-bootstrap: with seeded "
                    "random bits instead, which costs about 18 bits/dim of one tile).",
    )
    p.add_argument("inputs", nargs="+", metavar="IMG_OR_DIR_OR_NPZ",
                   help="image files, folders of images, CIFAR-10 .npz shards or python batches")
    p.add_argument("--output", "-o", required=True, metavar="OUT.dfc", help="the file to write")
    add_model_args(p)
    p.add_argument("--steps", "-k", type=positive_int,
                   help=f"code on the chain respaced to K steps (default {DEFAULT_LOSSLESS_STEPS}, quadratic spacing: "
                        "on the default model its bound is within 1%% of the full T = 1000 chain's at a tenth of "
                        "the network calls; -k 1000 for the full chain)")
    p.add_argument("--num-images", "-n", type=positive_int, help="encode only the first N images")
    p.add_argument("--batch-size", "-b", type=positive_int, default=64,
                   help="most tiles coded together in one chunk (default 64)")
    p.add_argument("--float64", action="store_true",
                   help="run the network in float64: slower, but decodable on other machines of the same kind")
    p.add_argument("--no-bound", action="store_true", help="skip computing the bound (saves one network pass)")
    p.add_argument("--no-bootstrap", action="store_true",
                   help="start the bits-back stack on seeded random bits instead of the progressive codec's "
                        "stream of the first tiles: a few seconds faster, about 55,000 bits larger")
    # progressive mode (diffcodec.progressive); defaults as ProgressiveParams
    p.add_argument("--progressive", action="store_true",
                   help="a progressive lossy-to-lossless file (Algorithms 3/4 with reverse channel coding): any "
                        "prefix decodes to a coarser image; --steps is then the number of coded steps (default 50)")
    p.add_argument("--spacing", choices=("quadratic", "uniform"), default="quadratic",
                   help="spacing of the steps kept when --steps K < T (default quadratic: dense near t = 0, "
                        "where the bits are; the file records it)")
    p.add_argument("--chunk-bits", type=float, default=14.0,
                   help="--progressive: nominal KL in bits of one reverse-channel-coded chunk (default 14)")
    p.add_argument("--convert", action="store_true", help="convert non-RGB / 16-bit images instead of refusing")
    p.add_argument("--force", action="store_true", help="overwrite OUT.dfc if it exists")
    p.add_argument("--json", action="store_true", help="print sizes and timings as JSON on stdout")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(run=run_encode_command)


def read_inputs(paths: list[str], limit: int | None, convert: bool):
    """Images and names from several inputs, stopping after ``limit`` images; notes to stderr."""
    from diffcodec.data import read_images

    images, names = [], []
    for path in paths:
        left = None if limit is None else limit - len(images)
        if left is not None and left < 1:
            break
        got = read_images(path, limit=left, convert=convert)
        for note in got.notes:
            print(f"diffcodec: note: {note}", file=sys.stderr)
        images.extend(got.images)
        names.extend(got.names)
    return images, names


def run_encode_command(args: argparse.Namespace) -> int:

    from tqdm import tqdm

    from diffcodec.bitsback import BOOTSTRAP_PARAMS, GridConfig, bootstrap_count, chain_grid, encode_images
    from diffcodec.checkpoint import load_checkpoint
    from diffcodec.data import write_bytes_atomic
    from diffcodec.evaluate import model_schedule, pick_device

    if args.progressive:
        return run_encode_progressive(args)
    if Path(args.output).exists() and not args.force:
        raise DiffcodecError(f"{args.output}: already exists; pass --force to overwrite it")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS: before CUDA starts
    device = pick_device(args.device)
    loaded = load_checkpoint(args.checkpoint, device=device)
    images, names = read_inputs(args.inputs, args.num_images, args.convert)
    tile = loaded.model_config.image_size
    num_tiles = sum(-(-im.shape[0] // tile) * -(-im.shape[1] // tile) for im in images)
    if args.steps is None:
        args.steps = min(DEFAULT_LOSSLESS_STEPS, loaded.diffusion_config.num_timesteps)
    schedule = model_schedule(loaded, args.steps, args.spacing)
    steps = schedule.num_steps
    boot = 0 if args.no_bootstrap else bootstrap_count(schedule, chain_grid(schedule, GridConfig()), num_tiles,
                                                        3 * tile * tile)
    batches = 0 if args.no_bound else -(-num_tiles // args.batch_size)
    with tqdm(total=BOOTSTRAP_PARAMS.num_stages, unit="stage", desc=f"bootstrap ({boot} tile{'s' * (boot > 1)})",
              disable=args.quiet or not boot, dynamic_ncols=True, leave=False, file=sys.stderr) as boot_bar, \
            tqdm(total=(num_tiles - boot) * steps, unit="tile-step", desc="encode",
                 disable=args.quiet or num_tiles == boot, dynamic_ncols=True, leave=False, file=sys.stderr) as bar, \
            tqdm(total=batches * steps, unit="step", desc="bound", disable=args.quiet or not batches,
                 dynamic_ncols=True, leave=False, file=sys.stderr) as bound_bar:
        result = encode_images(loaded, images, names, steps=args.steps, spacing=args.spacing,
                               max_batch=args.batch_size, device=device,
                               float64=args.float64, compute_bound=not args.no_bound, bootstrap=not args.no_bootstrap,
                               on_step=bar.update, on_bound_step=lambda: bound_bar.update(1),
                               on_bootstrap_stage=lambda _stage: boot_bar.update(1))
    write_bytes_atomic(args.output, result.data, force=args.force)
    report = encode_report(result, args.output, loaded)
    print(json.dumps(report, indent=2) if args.json else format_encode(report))
    return 0


def encode_report(result, path: str, loaded) -> dict:
    from diffcodec.bitsback import BOOTSTRAP_PARAMS

    h, d = result.header, result.num_dims
    tile_dims = 3 * h.tile_size**2
    bound = result.bound_bpd
    return {
        "output": path,
        "num_images": result.num_images,
        "num_tiles": result.num_tiles,
        "num_dims": d,
        "file_bytes": len(result.data),
        "payload_bytes": result.payload_bytes,
        "header_bytes": len(result.data) - result.payload_bytes,
        "bits_per_dim": result.file_bpd,
        "payload_bpd": result.payload_bpd,
        "net_bpd": result.net_bpd,
        "bound_bpd": bound,
        "overhead_pct": 100.0 * (result.file_bpd / bound - 1.0) if bound == bound else None,
        "net_overhead_pct": 100.0 * (result.net_bpd / bound - 1.0) if bound == bound else None,
        "initial_bits": result.initial_bits,
        "initial_bpd": result.initial_bits / d,
        "initial_bpd_one_tile": result.initial_bits / tile_dims,
        "bootstrap_tiles": result.bootstrap_tiles,
        "bootstrap_bits": result.bootstrap_bits,
        "bootstrap_steps": BOOTSTRAP_PARAMS.num_steps if result.bootstrap_tiles else None,
        "bootstrap_bpd": result.bootstrap_bits / (result.bootstrap_tiles * tile_dims) if result.bootstrap_tiles else None,
        "num_chunks": len(result.params.chunks),
        "num_steps": h.num_steps,
        "spacing": result.params.spacing if h.num_steps != h.num_timesteps else None,
        "num_timesteps": h.num_timesteps,
        "var_type": h.var_type,
        "network_float64": result.params.network_float64,
        "device": h.device,
        "fingerprint": loaded.fingerprint,
        "checkpoint": loaded.path,
        "seconds": result.seconds,
        "cpu_seconds": result.cpu_seconds,
        "bound_seconds": result.bound_seconds,
    }


def format_encode(r: dict) -> str:
    bound = r["bound_bpd"]
    lines = [
        f"{r['output']}: {r['num_images']} image(s), {r['num_tiles']} tile(s), {r['file_bytes']:,} bytes",
        f"  actual    {r['bits_per_dim']:.4f} bits/dim (whole file: {r['header_bytes']:,}-byte header + payload)",
    ]
    if bound == bound and bound is not None:
        lines += [
            f"  bound     {bound:.4f} bits/dim (Eq. 5 on the same {r['num_steps']}-step chain"
            + (f", {r['spacing']} spacing" if r["spacing"] else "") + ", likelihood.py)",
            f"  overhead  {r['overhead_pct']:+.2f}% over the bound"
            + (f"; without the initial bits {r['net_bpd']:.4f} bits/dim ({r['net_overhead_pct']:+.2f}%)"
               if r["initial_bits"] else ""),
        ]
    else:
        lines.append(f"  net       {r['net_bpd']:.4f} bits/dim without the initial bits (bound not computed)")
    if r["bootstrap_tiles"]:
        lines.append(
            f"  bootstrap {r['bootstrap_tiles']} tile(s) sent with the progressive codec ({r['bootstrap_steps']}-step "
            f"chain) to seed the stack: {r['bootstrap_bits']:,} bits, {r['bootstrap_bpd']:.3f} bits/dim of those tiles")
    if r["bootstrap_tiles"] and not r["initial_bits"]:
        lines.append("  initial bits 0: the bootstrap covered the stack's deepest dip")
    else:
        lines.append(
            f"  initial bits {r['initial_bits']:,}: {r['initial_bpd']:.4f} bits/dim of this file, paid once per "
            f"stream (= {r['initial_bpd_one_tile']:.1f} bits/dim of one tile)"
            + ("" if r["bootstrap_tiles"] else "; the default bootstrap avoids most of them"))
    lines += [
        f"steps {r['num_steps']} of T={r['num_timesteps']}, {r['var_type']}, {r['num_chunks']} chunk(s), "
        f"{r['device']}{', float64 network' if r['network_float64'] else ''}, "
        f"{r['seconds']:.1f} s coding + {r['bound_seconds']:.1f} s bound",
    ]
    return "\n".join(lines)


def add_decode_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "decode",
        help="decode a .dfc file back to PNG images (verifies the pixel checksum first)",
        description="Decode a .dfc file. OUT is a PNG path for a single image, else a directory that gets "
                    "one PNG per image. Nothing is written unless the decoded pixels match the checksum.",
    )
    p.add_argument("file", metavar="FILE.dfc")
    p.add_argument("--output", "-o", required=True, metavar="OUT", help="OUT.png (one image) or a directory")
    p.add_argument("--checkpoint", "-c", help="checkpoint file (default: the embedded default model)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or auto (default: the encoder's device kind when available)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--json", action="store_true", help="print a summary as JSON on stdout")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    # progressive files only (diffcodec.progressive)
    p.add_argument("--bits", type=positive_int, metavar="N",
                   help="progressive files: use only the first N bits of the file (header included)")
    p.add_argument("--upto", type=positive_int, metavar="STAGES",
                   help="progressive files: decode at most this many stages (1 = x_T only; K + 1 = lossless)")
    p.add_argument("--reconstruction", choices=("xstart", "ddim"), default="xstart",
                   help="progressive files, partial decode: x^_0 predicted from the last latent (xstart, as the "
                        "paper's Figure 5) or deterministic DDIM down the remaining steps (ddim)")
    p.set_defaults(run=run_decode_command)


def run_decode_command(args: argparse.Namespace) -> int:

    import torch
    from tqdm import tqdm

    from diffcodec.bitsback import check_header, decode_container, decode_device, output_paths
    from diffcodec.checkpoint import load_checkpoint
    from diffcodec.container import MODE_BITSBACK, MODE_NAMES, MODE_PROGRESSIVE, read_container
    from diffcodec.data import write_png

    container = read_container(args.file)
    h = container.header
    if h.mode == MODE_PROGRESSIVE:
        return run_decode_progressive(args)
    if args.bits is not None or args.upto is not None:
        raise DiffcodecError(f"{args.file}: --bits and --upto apply to progressive files; this one is bits-back")
    if h.mode != MODE_BITSBACK:
        raise DiffcodecError(f"{args.file}: a {MODE_NAMES[h.mode]} file; this decode handles bits-back files")
    targets = output_paths(args.output, [im.name for im in h.images], force=args.force)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS: before CUDA starts
    device = decode_device(args.device, h.device)
    loaded = load_checkpoint(args.checkpoint, device=device)
    params = check_header(loaded, container, args.file)
    if params.threads and device.type == "cpu" and torch.get_num_threads() != params.threads:
        torch.set_num_threads(params.threads)  # float32 CPU results depend on the thread count
    bits_back_tiles = params.num_tiles - params.bootstrap_tiles
    with tqdm(total=bits_back_tiles * h.num_steps, unit="tile-step", desc="decode",
              disable=args.quiet or not bits_back_tiles, dynamic_ncols=True, leave=False, file=sys.stderr) as bar:
        result = decode_container(loaded, container, device=device, where=args.file, on_step=bar.update)
    # the checksum has been verified: only now touch the output
    if len(targets) > 1 or not args.output.lower().endswith(".png"):
        Path(args.output).mkdir(parents=True, exist_ok=True)
    for target, image in zip(targets, result.images):
        write_png(target, image, force=args.force)
    report = {"file": args.file, "num_images": len(result.images), "outputs": targets,
              "sizes": [[int(im.shape[0]), int(im.shape[1])] for im in result.images], "verified": True,
              "num_steps": h.num_steps, "device": result.device, "encoded_on": h.device, "seconds": result.seconds,
              "cpu_seconds": result.cpu_seconds}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        where = targets[0] if len(targets) == 1 else f"{args.output}/ ({len(targets)} PNGs)"
        print(f"{args.file}: {len(targets)} image(s) decoded and verified -> {where}; "
              f"{h.num_steps} steps, {result.seconds:.1f} s on {result.device}")
    return 0


# --------------------------------------------------------------- progressive encode / decode


def run_encode_progressive(args: argparse.Namespace) -> int:
    """`encode --progressive`: Algorithm 3 as a prefix bitstream (diffcodec.progressive)."""
    from tqdm import tqdm

    from diffcodec import progressive as pg
    from diffcodec.checkpoint import load_checkpoint
    from diffcodec.data import write_bytes_atomic
    from diffcodec.evaluate import pick_device

    if Path(args.output).exists() and not args.force:
        raise DiffcodecError(f"{args.output}: already exists; pass --force to overwrite it")
    device = pick_device(args.device)
    loaded = load_checkpoint(args.checkpoint, device=device)
    T = loaded.diffusion_config.num_timesteps
    try:
        params = pg.ProgressiveParams(num_steps=min(args.steps or pg.ProgressiveParams().num_steps, T),
                                      spacing=args.spacing, chunk_bits=args.chunk_bits,
                                      network_float64=args.float64)
    except ValueError as e:
        raise DiffcodecError(str(e)) from None
    images, names = read_inputs(args.inputs, args.num_images, args.convert)
    with tqdm(total=params.num_stages, unit="stage", desc="encode", disable=args.quiet, dynamic_ncols=True,
              leave=False, file=sys.stderr) as bar:
        data, enc = pg.encode_images(loaded, images, names, params=params, device=device,
                                     progress=lambda _: bar.update(1))
    write_bytes_atomic(args.output, data, force=args.force)
    dims = sum(int(im.size) for im in images)
    header_bits = 8 * len(data) - enc.params.payload_bits
    report = {
        "output": args.output, "mode": "progressive", "num_images": len(images), "num_tiles": enc.params.num_tiles,
        "num_dims": dims, "file_bytes": len(data), "header_bytes": header_bits // 8,
        "bits_per_dim": 8 * len(data) / dims, "payload_bpd": enc.params.payload_bits / dims,
        "analytic_bpd": float(enc.kl_bits.sum()) / dims,
        "num_steps": params.num_steps, "spacing": params.spacing, "chunk_bits": params.chunk_bits,
        "network_float64": params.network_float64, "device": pg.device_kind(device),
        "fingerprint": loaded.fingerprint, "checkpoint": loaded.path,
        "stages": [{"stage": k, "timestep": int(t), "file_bits": header_bits + int(b),
                    "bits_per_dim": (header_bits + int(b)) / dims, "analytic_bpd": float(a) / dims}
                   for k, (t, b, a) in enumerate(zip(enc.timesteps, enc.prefix_bits, np.cumsum(enc.kl_bits)))],
        "seconds": enc.seconds,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        lines = [
            f"{args.output}: {len(images)} image(s), {enc.params.num_tiles} tile(s), {len(data):,} bytes "
            f"(progressive, {params.num_steps} coded steps, {params.spacing})",
            f"  actual    {report['bits_per_dim']:.4f} bits/dim (whole file: {report['header_bytes']:,}-byte header "
            f"+ payload); analytic {report['analytic_bpd']:.4f} on the same stages",
            "  prefixes  stage (t received): bits/dim of the file cut there",
        ]
        for st in report["stages"]:
            t = "x_0" if st["timestep"] < 0 else f"t={st['timestep']}"
            lines.append(f"    {st['stage']:3d} ({t:>6}): {st['bits_per_dim']:.4f}")
        lines.append(f"{enc.seconds.get('total', 0.0):.1f} s on {report['device']}")
        print("\n".join(lines))
    return 0


def run_decode_progressive(args: argparse.Namespace) -> int:
    """`decode` of a progressive file: its longest complete prefix (or --bits / --upto)."""
    from diffcodec import progressive as pg
    from diffcodec.bitsback import decode_device, output_paths
    from diffcodec.checkpoint import load_checkpoint
    from diffcodec.container import unpack
    from diffcodec.data import write_png

    try:
        data = Path(args.file).read_bytes()
    except OSError as e:
        raise DiffcodecError(f"{args.file}: cannot read ({e.strerror})") from None
    h = unpack(data, args.file).header
    targets = output_paths(args.output, [im.name for im in h.images], force=args.force)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS: before CUDA starts
    device = decode_device(args.device, h.device)
    loaded = load_checkpoint(args.checkpoint, device=device)
    r = pg.decode_bytes(loaded, data, num_bits=args.bits, upto=args.upto, reconstruction=args.reconstruction,
                        device=device, where=args.file)
    if r.diverged and args.upto is None:
        raise DiffcodecError(
            f"{args.file}: the lossless stage did not reproduce the encoded pixels (checksum mismatch: this "
            f"decoder's arithmetic differs from the encoder's, e.g. another device, thread count or library "
            f"version; encode with --float64 to avoid it); nothing written. --upto {r.num_stages - 1} writes "
            f"the lossy reconstruction from t = 0")
    if len(targets) > 1 or not args.output.lower().endswith(".png"):
        Path(args.output).mkdir(parents=True, exist_ok=True)
    for target, image in zip(targets, r.images):
        write_png(target, image, force=args.force)
    dims = sum(int(im.size) for im in r.images)
    report = {"file": args.file, "mode": "progressive", "num_images": len(r.images), "outputs": targets,
              "verified": r.verified, "lossless": r.verified, "reconstruction": r.reconstruction,
              "stages": r.stages, "num_stages": r.num_stages, "timestep": r.timestep, "truncated": r.truncated,
              "bits_available": r.file_bits, "bits_used": r.bits_used, "header_bits": r.header_bits,
              "bits_per_dim_used": r.bits_used / dims, "complete_file_bits": r.header_bits + r.payload_bits_total,
              "device": str(device), "encoded_on": h.device, "seconds": r.seconds}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        where = targets[0] if len(targets) == 1 else f"{args.output}/ ({len(targets)} PNGs)"
        if r.verified:
            what = "lossless, checksum verified"
        else:
            t = "t=0" if r.timestep == 0 else f"t={r.timestep}"
            what = (f"lossy: stage {r.stages} of {r.num_stages} ({t}), {r.reconstruction} reconstruction"
                    + ("; the file is cut short" if r.truncated else ""))
        print(f"{args.file}: {len(targets)} image(s) -> {where}; {what}; used {r.bits_used:,} of "
              f"{r.file_bits:,} bits ({report['bits_per_dim_used']:.4f} bits/dim; complete file "
              f"{report['complete_file_bits']:,})")
    return 0


# --------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffcodec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_nll_parser(sub)
    add_train_parser(sub)
    add_encode_parser(sub)
    add_decode_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except DiffcodecError as e:
        print(f"diffcodec: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("diffcodec: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("diffcodec: error: out of memory; try a smaller --batch-size", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
