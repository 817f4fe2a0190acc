"""The `diffcodec encode` and `decode` commands: arguments in, `codec.api` calls, reports out.

Parsing and printing only: which tiles, steps, bootstrap sizes and checks a file needs is
`codec.api`'s business; progress bars follow its ``progress(phase, done, total)`` calls.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from diffcodec.codec import LOSSLESS_STEPS
from diffcodec.codec.progressive.params import ProgressiveParams
from diffcodec.errors import DamagedFileError, DiffcodecError
from diffcodec.timesteps import SPACINGS

if TYPE_CHECKING:
    from diffcodec.codec.rate import RateTarget

EXIT_DAMAGED = 3  # decode: a damaged progressive file; the image of its intact stages was written


class ProgressBars:
    """One tqdm bar per phase of `codec.api`'s progress calls, made when a phase starts."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bars: dict = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        bar = self.bars.get(phase)
        if bar is None:
            bar = self.bars[phase] = tqdm(total=total, desc=phase, unit="step", dynamic_ncols=True, leave=False,
                                          file=sys.stderr)
        bar.update(done - bar.n)

    def __enter__(self) -> ProgressBars:
        return self

    def __exit__(self, *exc) -> None:
        for bar in self.bars.values():
            bar.close()


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def seed_int(text: str) -> int:
    """A seed: an integer in 0..2^63-1 (torch's generators take no more)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < 1 << 63:
        raise argparse.ArgumentTypeError(f"a seed must be in 0..2^63-1, got {text}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", "-c", metavar="CKPT",
                   help="a diffcodec checkpoint, a diffusers DDPM folder, or an Improved DDPM MODEL.pt with its "
                        "MODEL.pt.flags (default: the embedded default model)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")


# ------------------------------------------------------------------------------ encode


DEFAULT_PSNR = 40.0  # `encode` with no mode or target: a progressive file that ends once every image reaches it

ENCODE_DESCRIPTION = f"""\
Compress images into a .dfc file. Images of any size are cut into model-size tiles; all the
images given share one file.

By default (no --lossless, --progressive or target) the file is progressive and lossy: it ends
at the first checked stage boundary where every image reaches {DEFAULT_PSNR:g} dB PSNR, as
cwebp and cjxl give a lossy file at a default quality. Measured with the embedded model
(reports/default_mode.md): on one CIFAR-10 image and a 128x128 Kodak crop the 40 dB file is
2.7x and 3.5x smaller than the whole (lossless) progressive stream and 2.8x and 3.2x smaller
than a --lossless file, and its encode stops there (75% and 84% of the whole stream's CPU
time); at 40 dB the progressive stream takes fewer bits than JPEG, WebP, JPEG-XL and AVIF
(reports/results.md). Every prefix of a progressive file decodes to a coarser image
(diffcodec cut makes a smaller file from it, diffcodec info lists where).

Rate targets (one at a time; progressive files): --psnr DB ends at the first checked boundary
where every image of the file reaches DB (PSNR of the image the decoder makes, per image; only
the whole stream reaches a PSNR no lossy stage does, and then the whole, lossless file is
written); --bpp X and --size BYTES end at the last checked boundary whose whole file (header
included) fits: X bits per pixel of all the file's images together, or BYTES bytes. A size no
file of these images fits is refused (nothing written), naming the smallest file. With
--shards each shard file meets the target on its own.

--progressive writes the whole progressive stream: lossless at full length, any prefix a lossy
image. --lossless writes a bits-back file: lossless, not progressive; the smallest lossless
file for photos and for many images in one file (the Kodak crop: 11.75 bits per pixel against
the whole progressive stream's 13.03, 2.8x less CPU to encode, 4x the time to decode),
about the progressive stream's size for one small image (16.1 against 15.5 bits per pixel)."""


def add_encode_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "encode",
        help=f"compress images into a .dfc file (default: progressive, ending at {DEFAULT_PSNR:g} dB; --psnr, --bpp, "
             "--size; --progressive: the whole lossless stream; --lossless: bits-back)",
        description=ENCODE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="IMG_OR_DIR_OR_NPZ",
                   help="image files, folders of images, CIFAR-10 .npz shards or python batches")
    p.add_argument("--output", "-o", required=True, metavar="OUT.dfc", help="the file to write")
    add_model_args(p)
    progressive = ProgressiveParams()  # its defaults
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--progressive", action="store_true",
                      help="the whole progressive stream (Algorithms 3/4 with reverse channel coding): lossless at "
                           "full length, any prefix decodes to a coarser image")
    mode.add_argument("--lossless", action="store_true",
                      help="bits-back ANS over the diffusion chain: lossless, the size the variational bound "
                           "(Eq. 5) predicts plus a small overhead; not progressive. The stream's first few tiles go "
                           "through the progressive codec to seed the stack (--no-bootstrap: seeded random bits)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--psnr", type=float, metavar="DB",
                        help=f"progressive, lossy: end at the first checked stage boundary where every image reaches "
                             f"DB dB (default {DEFAULT_PSNR:g} when no mode or target is given)")
    target.add_argument("--bpp", type=float, metavar="X",
                        help="progressive, lossy: the largest file (last checked stage boundary) of at most X bits "
                             "per pixel, header included, over all the images' pixels")
    target.add_argument("--size", type=positive_int, metavar="BYTES",
                        help="progressive, lossy: the largest file (last checked stage boundary) of at most BYTES "
                             "bytes, header included")
    p.add_argument("--steps", "-k", type=positive_int,
                   help=f"coded steps K of the chain (progressive default {progressive.num_steps}; --lossless default "
                        f"{LOSSLESS_STEPS}, quadratic spacing: on the default model its bound is within 1%% of the "
                        "full T = 1000 chain's at a tenth of the network calls; -k 1000 for the full chain)")
    p.add_argument("--num-images", "-n", type=positive_int, help="encode only the first N images")
    p.add_argument("--batch-size", "-b", type=positive_int, metavar="TILES",
                   help="most tiles per network call (default 32 on a CPU, the fastest there; 64 on a GPU): "
                        "fewer bound the network's memory on a large photo; a progressive file is the same whatever "
                        "it is (with --float32 every tile goes in one call); a --lossless file codes that many tiles "
                        "together in one chunk (default 64)")
    arith = p.add_mutually_exclusive_group()
    arith.add_argument("--float32", dest="arithmetic", action="store_const", const="float32",
                       help="SAME-MACHINE file: the float32 network instead of the exact one (faster on a CPU), "
                            "but the file decodes only where the encoder's floating point is reproduced (same "
                            "CPU kind, thread count and library versions)")
    arith.add_argument("--float64", dest="arithmetic", action="store_const", const="float64",
                       help="SAME-MACHINE file: the float64 network; decodes only on machines of the same kind")
    p.set_defaults(arithmetic="exact")
    p.add_argument("--no-bound", action="store_true",
                   help="--lossless: skip computing the bound (saves one network pass)")
    p.add_argument("--no-bootstrap", action="store_true",
                   help="--lossless: start the bits-back stack on seeded random bits instead of the progressive "
                        "codec's stream of the first tiles: a few seconds faster, about 55,000 bits larger")
    p.add_argument("--spacing", choices=SPACINGS, default="quadratic",
                   help="spacing of the steps kept when --steps K < T (default quadratic: dense near t = 0, "
                        "where the bits are; the file records it)")
    p.add_argument("--chunk-bits", type=float, default=progressive.chunk_bits,
                   help="progressive: nominal KL in bits of one reverse-channel-coded chunk "
                        f"(default {progressive.chunk_bits:g})")
    p.add_argument("--convert", action="store_true", help="convert non-RGB / 16-bit images instead of refusing")
    p.add_argument("--shards", type=positive_int, metavar="S",
                   help="write a shard set: S .dfc files of consecutive images and an index, -o OUT.dfcset "
                        "(default under torchrun: one shard per process; the files are the same for any number "
                        "of processes; decode takes the .dfcset)")
    p.add_argument("--force", action="store_true", help="overwrite OUT.dfc if it exists")
    p.add_argument("--json", action="store_true", help="print sizes and timings as JSON on stdout")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(run=run_encode_command)


def encode_mode(args: argparse.Namespace) -> tuple[str, RateTarget | None]:
    """(mode, rate target or None) of an encode's flags; one-line errors for flags of the other mode."""
    from diffcodec.codec.rate import RateTarget

    given = [(kind, getattr(args, kind)) for kind in ("psnr", "bpp", "size") if getattr(args, kind) is not None]
    if args.lossless:
        if given:
            raise DiffcodecError(f"--{given[0][0]} is a progressive file's rate target; --lossless files are whole")
        return "lossless", None
    for flag, value in (("--no-bootstrap", args.no_bootstrap), ("--no-bound", args.no_bound)):
        if value:
            raise DiffcodecError(f"{flag} applies to --lossless (bits-back) files")
    if given:
        return "progressive", RateTarget(*given[0])
    return "progressive", None if args.progressive else RateTarget("psnr", DEFAULT_PSNR)


def read_inputs(paths: list[str], limit: int | None, convert: bool):
    """Images and names from several inputs, stopping after ``limit`` images; notes to stderr
    (from rank 0 only, under torchrun)."""
    from diffcodec import distributed
    from diffcodec.data import read_images

    say = distributed.current().is_main
    images, names = [], []
    for path in paths:
        left = None if limit is None else limit - len(images)
        if left is not None and left < 1:
            break
        got = read_images(path, limit=left, convert=convert)
        for note in got.notes if say else []:
            print(f"diffcodec: note: {note}", file=sys.stderr)
        images.extend(got.images)
        names.extend(got.names)
    return images, names


def run_encode_command(args: argparse.Namespace) -> int:
    from diffcodec import distributed, shardset
    from diffcodec.checkpoint import load_checkpoint
    from diffcodec.codec import api
    from diffcodec.outputs import check_output_file, write_bytes_atomic
    from diffcodec.runtime import pick_device, prepare_cuda_determinism

    mode, target = encode_mode(args)
    check_output_file(args.output, force=args.force)
    prepare_cuda_determinism()
    device = distributed.local_device(pick_device(args.device))
    world = distributed.init(device)  # under torchrun: a shard set, shards shared out (shardset)
    loaded = load_checkpoint(args.checkpoint, device=device)
    if args.steps is not None:
        api.check_steps(args.steps, loaded.diffusion_config.num_timesteps)
    images, names = read_inputs(args.inputs, args.num_images, args.convert)
    distributed.ready(world)
    with ProgressBars(args.quiet or not world.is_main) as bars:
        settings = {"model": loaded, "mode": mode, "steps": args.steps, "spacing": args.spacing, "device": device,
                    "arithmetic": args.arithmetic, "batch_size": args.batch_size,
                    "bootstrap": not args.no_bootstrap, "compute_bound": not args.no_bound,
                    "chunk_bits": args.chunk_bits, "progress": bars, "target": target}
        if args.shards or world.distributed or shardset.is_shard_set(args.output):
            return encode_shard_set(args, images, names, settings, world)
        # one image in one file: its name is not stored (the decoder's -o names the output;
        # into a directory, after the .dfc file); several keep theirs (one PNG each)
        result = api.encode(images, names if len(images) > 1 else None, **settings)
    write_bytes_atomic(args.output, result.data, force=args.force)
    if mode == "progressive":
        report = progressive_report(result, args.output, loaded)
        print(json.dumps(report, indent=2) if args.json else format_progressive(report))
    else:
        report = encode_report(result, args.output, loaded)
        print(json.dumps(report, indent=2) if args.json else format_encode(report))
    return 0


def encode_report(result, path: str, loaded) -> dict:
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
        "bits_per_pixel": 3.0 * result.file_bpd,  # whole file per image pixel (the 3 coded channels)
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
        "bootstrap_steps": ProgressiveParams.unpack(result.params.bootstrap_block).num_steps if result.bootstrap_tiles else None,
        "bootstrap_bpd": result.bootstrap_bits / (result.bootstrap_tiles * tile_dims) if result.bootstrap_tiles else None,
        "num_chunks": len(result.params.chunks),
        "num_steps": h.num_steps,
        "spacing": result.params.spacing if h.num_steps != h.num_timesteps else None,
        "num_timesteps": h.num_timesteps,
        "var_type": h.var_type,
        "network_float64": result.params.network_float64,
        "arithmetic": arithmetic_name(h.contract, result.params.network_float64),
        "device": h.device,
        "fingerprint": loaded.fingerprint,
        "checkpoint": loaded.path,
        "seconds": result.seconds,
        "cpu_seconds": result.cpu_seconds,
        "bound_seconds": result.bound_seconds,
    }


def arithmetic_name(contract: int, float64: bool) -> str:
    """How a file's coding parameters were computed, as the reports say it."""
    if contract:
        return f"exact arithmetic (contract v{contract}: decodes on any machine)"
    return f"{'float64' if float64 else 'float32'} network (same-machine file)"


def format_encode(r: dict) -> str:
    bound = r["bound_bpd"]
    lines = [
        f"{r['output']}: {r['num_images']} image(s), {r['num_tiles']} tile(s), {r['file_bytes']:,} bytes",
        f"  actual    {r['bits_per_dim']:.4f} bits/dim = {r['bits_per_pixel']:.3f} bits/pixel (whole file: "
        f"{r['header_bytes']:,}-byte header + payload)",
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
        f"{r['device']}, {r['arithmetic']}, "
        f"{r['seconds']:.1f} s coding + {r['bound_seconds']:.1f} s bound",
    ]
    return "\n".join(lines)

def progressive_report(result, path: str, loaded) -> dict:
    enc, h, dims = result.encoded, result.header, result.num_dims
    header_bits = result.header_bits
    psnr = [None if v == float("inf") else v for v in result.psnr] if result.psnr is not None else None
    last = int(enc.timesteps[enc.stages - 1])
    return {
        "output": path, "mode": "progressive", "num_images": len(h.images), "num_tiles": enc.params.num_tiles,
        "num_dims": dims, "file_bytes": len(result.data), "header_bytes": header_bits // 8,
        "bits_per_dim": 8 * len(result.data) / dims, "bits_per_pixel": 24 * len(result.data) / dims,
        "payload_bpd": 8 * len(enc.payload) / dims, "num_checks": enc.num_checks,
        "check_bits": enc.num_checks * enc.params.check_bits,
        "lossless": enc.complete, "file_stages": enc.stages, "num_stages": enc.params.num_stages,
        "timestep": last, "target": str(result.target) if result.target is not None else None,
        "psnr_db": psnr, "min_psnr_db": (min(v for v in psnr if v is not None) if psnr and any(
            v is not None for v in psnr) else None),
        "analytic_bpd": float(enc.kl_bits.sum()) / dims,
        "num_steps": enc.params.num_steps, "spacing": enc.params.spacing, "chunk_bits": enc.params.chunk_bits,
        "network_float64": enc.params.network_float64, "device": h.device,
        "arithmetic": arithmetic_name(h.contract, enc.params.network_float64),
        "fingerprint": loaded.fingerprint, "checkpoint": loaded.path,
        "stages": [{"stage": k, "timestep": int(t), "file_bits": header_bits + int(b),
                    "bits_per_dim": (header_bits + int(b)) / dims, "analytic_bpd": float(a) / dims}
                   for k, (t, b, a) in enumerate(zip(enc.timesteps, enc.prefix_bits, np.cumsum(enc.kl_bits)))],
        "seconds": enc.seconds,
    }


def format_progressive(r: dict) -> str:
    lines = [
        f"{r['output']}: {r['num_images']} image(s), {r['num_tiles']} tile(s), {r['file_bytes']:,} bytes "
        f"(progressive, {r['num_steps']} coded steps, {r['spacing']})",
    ]
    if r["lossless"]:
        what = f"lossless: the whole stream ({r['num_stages']} stages)"
        if r["target"]:
            what += f"; {r['target']}: no lossy stage reaches it"
    else:
        t = "t=0" if r["timestep"] == 0 else f"t={r['timestep']}"
        what = f"lossy: ends at stage {r['file_stages']} of {r['num_stages']} ({t})"
        if r["min_psnr_db"] is not None:
            what += f", {r['min_psnr_db']:.2f} dB" + (" (worst image)" if r["num_images"] > 1 else "")
        what += f" [{r['target']}]" if r["target"] else ""
    lines += [
        f"  {what}",
        f"  actual    {r['bits_per_dim']:.4f} bits/dim = {r['bits_per_pixel']:.3f} bits/pixel (whole file: "
        f"{r['header_bytes']:,}-byte header + payload, {r['num_checks']} integrity checks = {r['check_bits']} bits); "
        f"analytic {r['analytic_bpd']:.4f} on the same stages",
        "  prefixes  stage (t received): bits/dim of the file cut there",
    ]
    for st in r["stages"]:
        t = "x_0" if st["timestep"] < 0 else f"t={st['timestep']}"
        lines.append(f"    {st['stage']:3d} ({t:>6}): {st['bits_per_dim']:.4f}")
    lines.append(f"{r['seconds'].get('total', 0.0):.1f} s on {r['device']}, {r['arithmetic']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ decode


def add_decode_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "decode",
        help="decode a .dfc file back to PNG images (verifies the pixel checksum first)",
        description="Decode a .dfc file. OUT is a PNG path for a single image, else a directory that gets "
                    "one PNG per image, named from the names stored in the file (a one-image file stores none: its "
                    "PNG is named after FILE). Lossless pixels are written only when they match the file's checksum; a "
                    "progressive file cut short decodes to the stages it holds (a lossy reconstruction, said so: "
                    "'cut short (N of M bytes)' for a format 5 file, which records its length), a lossy file (encode "
                    "with a rate target, or diffcodec cut) to the stages it ends at, and stages are used only once "
                    "their integrity check has matched. A format 5 file of its full length whose stream stops before "
                    "its last stage is damaged, wherever the damage is.",
        epilog="exit status: 0 decoded (lossless and verified, or the reconstruction from a prefix, a cut file or "
               "a lossy file); 2 refused, nothing written; 3 a damaged progressive file: the reconstruction from "
               "its intact stages was written (nothing when no stage before the damage is intact) and the message "
               "says where the damage starts",
    )
    p.add_argument("file", metavar="FILE.dfc", help="the .dfc file to decode (bits-back or progressive), or a shard "
                                                    "set's OUT.dfcset (encode --shards)")
    p.add_argument("--output", "-o", required=True, metavar="OUT", help="OUT.png (one image) or a directory")
    p.add_argument("--checkpoint", "-c", metavar="CKPT",
                   help="a diffcodec checkpoint, a diffusers DDPM folder, or an Improved DDPM MODEL.pt with its "
                        "MODEL.pt.flags (default: the embedded default model)")
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
    p.add_argument("--batch-size", "-b", type=positive_int, metavar="TILES",
                   help="progressive files: most tiles per network call (default 32 on a CPU, the fastest there; "
                        "64 on a GPU); fewer bound the decoder's memory on a large photo and give the same pixels")
    p.set_defaults(run=run_decode_command)

def run_decode_command(args: argparse.Namespace) -> int:
    from diffcodec.codec import api
    from diffcodec.codec.container import MODE_PROGRESSIVE
    from diffcodec.data import read_file_bytes
    from diffcodec.distributed import launched
    from diffcodec.outputs import output_paths, write_png
    from diffcodec.runtime import prepare_cuda_determinism
    from diffcodec.shardset import is_shard_set

    if is_shard_set(args.file) or launched():  # a shard set's index (encode --shards, or under torchrun)
        return decode_shard_set(args)
    data = read_file_bytes(args.file)
    h = api.read_header(data, args.file)
    if args.batch_size is not None and h.mode != MODE_PROGRESSIVE:
        raise DiffcodecError(f"{args.file}: --batch-size applies to progressive files; a lossless file's chunks "
                             "are its own")
    names = [im.name for im in h.images]
    if names == [""]:  # one unnamed image (format 4 stores no name for one): into a directory as FILE's stem
        names = [Path(args.file).stem]
    targets = output_paths(args.output, names, force=args.force)  # before any work
    prepare_cuda_determinism()
    with ProgressBars(args.quiet) as bars:
        try:
            r = api.decode(data, checkpoint=args.checkpoint, device=args.device, where=args.file, num_bits=args.bits,
                           upto=args.upto, reconstruction=args.reconstruction, progress=bars,
                           batch_size=args.batch_size)
        except DamagedFileError as e:  # damaged before any intact stage: nothing to write, but damaged (3), not 2
            print(f"diffcodec: error: {e}", file=sys.stderr)
            return EXIT_DAMAGED
    progressive = isinstance(r, api.ProgressiveDecoding)
    if progressive and r.diverged and args.upto is None:
        raise DiffcodecError(
            f"{args.file}: the lossless stage did not reproduce the encoded pixels (checksum mismatch: this "
            "decoder's arithmetic differs from the encoder's, e.g. another device, thread count or library "
            "version: a same-machine float file; or the file is damaged); nothing written. "
            f"--upto {r.num_stages - 1} writes the lossy reconstruction from t = 0")
    # the checksum has been verified (or the images are a labelled reconstruction): only now write
    if len(targets) > 1 or not args.output.lower().endswith(".png"):
        Path(args.output).mkdir(parents=True, exist_ok=True)
    for target, image in zip(targets, r.images):
        write_png(target, image, force=args.force)
    report = progressive_decode_report(r, args, h, targets, len(data)) if progressive else {
        "file": args.file, "num_images": len(r.images), "outputs": targets,
        "sizes": [[int(im.shape[0]), int(im.shape[1])] for im in r.images], "verified": True,
        "num_steps": h.num_steps, "device": r.device, "encoded_on": h.device, "seconds": r.seconds,
        "cpu_seconds": r.cpu_seconds}
    where = targets[0] if len(targets) == 1 else f"{args.output}/ ({len(targets)} PNGs)"
    if progressive and r.damage:
        if args.json:
            print(json.dumps(report, indent=2))
        t = "t=0" if r.timestep == 0 else f"t={r.timestep}"
        print(f"diffcodec: error: {args.file}: the file is damaged ({r.damage}); wrote the lossy reconstruction "
              f"from its {r.stages} intact stage(s) of {r.num_stages} ({t}) -> {where}", file=sys.stderr)
        return EXIT_DAMAGED
    if args.json:
        print(json.dumps(report, indent=2))
    elif progressive:
        print(format_progressive_decode(report, r, where, args))
    else:
        print(f"{args.file}: {len(targets)} image(s) decoded and verified -> {where}; "
              f"{h.num_steps} steps, {r.seconds:.1f} s on {r.device}")
    return 0


def progressive_decode_report(r, args: argparse.Namespace, h, targets: list[str], file_bytes: int) -> dict:
    dims = sum(int(im.size) for im in r.images)
    complete = r.header_bits + r.payload_bits_total if r.payload_bits_total else None
    return {"file": args.file, "mode": "progressive", "num_images": len(r.images), "outputs": targets,
            "verified": r.verified, "lossless": r.verified, "reconstruction": r.reconstruction,
            "damaged": bool(r.damage), "damage": r.damage or None,
            "stages": r.stages, "num_stages": r.num_stages, "file_stages": r.file_stages, "timestep": r.timestep,
            "truncated": r.truncated, "length_recorded": r.length_recorded, "file_bytes": file_bytes,
            "complete_file_bytes": complete // 8 if complete is not None else None,
            "bits_available": r.file_bits, "bits_used": r.bits_used, "header_bits": r.header_bits,
            "bits_per_dim_used": r.bits_used / dims, "complete_file_bits": complete,
            "device": r.device, "encoded_on": h.device, "seconds": r.seconds}


def lossy_reason(report: dict, r, args: argparse.Namespace) -> str:
    """Why a progressive decode is lossy: cut short, a prefix asked for, or a lossy file."""
    if r.truncated:
        if r.length_recorded:
            return f"the file is cut short ({report['file_bytes']:,} of {report['complete_file_bytes']:,} bytes)"
        return ("the stream stops before its end: the file is cut short, or damaged near its end (a format 4 "
                "file does not record its length)")
    if args.bits is not None and r.file_bits < 8 * report["file_bytes"]:
        return f"the first {r.file_bits:,} bits (--bits)"
    if args.upto is not None and args.upto < (r.file_stages or r.num_stages):
        return f"--upto {args.upto}"
    if r.file_stages and r.file_stages < r.num_stages:
        return f"a lossy file: it ends at stage {r.file_stages} (cut, or encoded with a rate target)"
    return "the lossless stage is not used"


def format_progressive_decode(report: dict, r, where: str, args: argparse.Namespace) -> str:
    if r.verified:
        what = "lossless, checksum verified"
    else:
        t = "t=0" if r.timestep == 0 else f"t={r.timestep}"
        what = (f"lossy: stage {r.stages} of {r.num_stages} ({t}), {r.reconstruction} reconstruction; "
                + lossy_reason(report, r, args))
    complete = report["complete_file_bits"]
    return (f"{report['file']}: {report['num_images']} image(s) -> {where}; {what}; used {r.bits_used:,} of "
            f"{r.file_bits:,} bits ({report['bits_per_dim_used']:.4f} bits/dim; complete file "
            + (f"{complete:,} bits)" if complete is not None else "length unknown)"))


# ------------------------------------------------------------------------------ shard sets


def encode_shard_set(args: argparse.Namespace, images: list, names: list[str], settings: dict,
                     world) -> int:
    """`diffcodec encode --shards S` (or under torchrun): ``settings`` are `api.encode`'s."""
    from diffcodec import distributed, shardset
    from diffcodec.codec import api

    num_shards = args.shards or world.size
    with distributed.stage(world):
        if not shardset.is_shard_set(args.output):
            raise DiffcodecError(f"{args.output}: {num_shards} shards make a shard set; name its index "
                                 f"OUT{shardset.SUFFIX}")
        shardset.shard_ranges(len(images), num_shards)
    if num_shards % world.size and world.is_main:
        print(f"diffcodec: note: {num_shards} shards on {world.size} processes: some processes code one shard "
              f"more while the others wait (up to {distributed.ENV_TIMEOUT} = {distributed.timeout_seconds():g} s); "
              "a multiple of the process count balances the work", file=sys.stderr)
    shards = shardset.encode_set(images, names, index_path=args.output, num_shards=num_shards, force=args.force,
                                 world=world, encode=lambda ims, nms: api.encode(ims, nms, **settings))
    if shards is None:
        return 0
    report = shardset.set_report(args.output, shards)
    print(json.dumps(report, indent=2) if args.json else shardset.format_set_report(report))
    return 0


def decode_shard_set(args: argparse.Namespace) -> int:
    """`diffcodec decode OUT.dfcset -o DIR` (shards shared out among ranks under torchrun)."""
    from diffcodec import distributed, shardset
    from diffcodec.codec import api
    from diffcodec.runtime import pick_device, prepare_cuda_determinism

    world = distributed.init(distributed.local_device(pick_device(args.device)))
    if not shardset.is_shard_set(args.file):
        raise DiffcodecError(f"{args.file}: one .dfc file is decoded by one process; run decode without torchrun "
                             f"(a shard set's {shardset.SUFFIX} index decodes on many)")
    if args.bits is not None:
        raise DiffcodecError("--bits applies to one progressive file, not to a shard set (--upto applies to each shard)")
    shard_set = shardset.read_index(args.file)
    distributed.ready(world)
    prepare_cuda_determinism()
    with ProgressBars(args.quiet or not world.is_main) as bars:
        targets = shardset.decode_set(
            shard_set, args.output, force=args.force, lossy_ok=args.upto is not None, world=world,
            decode=lambda data, where: api.decode(data, checkpoint=args.checkpoint, device=args.device, where=where,
                                                  upto=args.upto, reconstruction=args.reconstruction, progress=bars,
                                                  batch_size=args.batch_size))
    if targets is None:
        return 0
    lossy = [f for i, f in enumerate(shard_set.files) if is_lossy_file(shardset.read_shard(shard_set, i), f)]
    report = {"file": args.file, "num_shards": len(shard_set.files), "num_images": len(targets), "outputs": targets,
              "verified": args.upto is None and not lossy, "lossy_shards": lossy, "world_size": world.size}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        where = targets[0] if len(targets) == 1 else f"{args.output}/ ({len(targets)} PNGs)"
        print(f"{args.file}: {len(targets)} image(s) from {len(shard_set.files)} shard(s) -> {where}"
              + (f"; up to stage {args.upto} of each shard" if args.upto is not None else
                 f"; {len(lossy)} lossy file(s) (a rate target or a cut): reconstructions" if lossy else
                 "; checksums verified"))
    return 0


def is_lossy_file(data: bytes, where: str) -> bool:
    """Whether a file is a progressive file that ends before its lossless stage (format 5)."""
    from diffcodec.codec import api
    from diffcodec.codec.container import MODE_PROGRESSIVE

    h = api.read_header(data, where)
    return h.mode == MODE_PROGRESSIVE and 0 < h.stages <= h.num_steps
