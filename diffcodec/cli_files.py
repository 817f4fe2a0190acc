"""The `diffcodec info` and `diffcodec cut` commands: arguments in, `codec.fileinfo` calls, reports out.

Parsing and printing only: what a file holds and where it can be cut is `codec.fileinfo`'s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from diffcodec.cli_codec import EXIT_DAMAGED, add_model_args, arithmetic_name, positive_int
from diffcodec.errors import DiffcodecError

# ------------------------------------------------------------------------------ info


def add_info_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="what a .dfc file holds: mode, versions, model, images, steps, and a progressive file's cut points",
        description="Describe a .dfc file without decoding it (no network call): its mode, container format, "
                    "arithmetic contract and stream versions, model identity, images and their sizes, coded steps; "
                    "for a progressive file whether it is whole or cut short, and every checked stage boundary "
                    "with its byte offset and bits per pixel: the places it can be cut (diffcodec cut). The "
                    "steps and cut points need the file's model (the embedded default model unless --checkpoint).",
        epilog="exit status: 0 described; 2 not a readable .dfc file; 3 a progressive file whose symbols show "
               "damage (a failed integrity check, or a full-length file whose stages stop early)",
    )
    p.add_argument("file", metavar="FILE.dfc", help="the file to describe")
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print the description as JSON on stdout")
    p.set_defaults(run=run_info_command)


def run_info_command(args: argparse.Namespace) -> int:
    from diffcodec.checkpoint import load_checkpoint
    from diffcodec.codec.fileinfo import describe
    from diffcodec.data import read_file_bytes
    from diffcodec.runtime import pick_device

    data = read_file_bytes(args.file)
    info = describe(data, load_checkpoint(args.checkpoint, device=pick_device(args.device)), args.file)
    report = {"file": args.file, **asdict(info),
              "arithmetic": arithmetic_name(info.contract, info.network_float64)}
    report["images"] = [{"name": n, "height": h, "width": w} for n, h, w in info.images]
    print(json.dumps(report, indent=2) if args.json else format_info(report))
    if info.damage:
        print(f"diffcodec: error: {args.file}: the file is damaged ({info.damage})", file=sys.stderr)
        return EXIT_DAMAGED
    return 0


def format_info(r: dict) -> str:
    sizes = ", ".join(f"{im['name'] or '(unnamed)'} {im['width']}x{im['height']}" for im in r["images"][:8])
    more = f", ... ({len(r['images'])} images)" if len(r["images"]) > 8 else ""
    lines = [
        f"{r['file']}: {r['mode']} file, {r['file_bytes']:,} bytes, format {r['version']}"
        + (f", progressive stream version {r['stream_version']}" if r["stream_version"] else ""),
        f"  arithmetic  {r['arithmetic']}" + (f", probe {r['probe']}" if r["probe"] else ""),
        f"  model       identity {r['model_id']}: {r['model_note']}",
        f"  images      {sizes}{more}; {r['pixels']:,} pixels",
        f"  header      {r['header_bytes']:,} bytes; payload {r['payload_bytes']:,} bytes"
        + (f" = {8 * r['file_bytes'] / r['pixels']:.4f} bits per pixel (whole file)" if r["pixels"] else ""),
    ]
    if r["num_steps"]:
        lines.append(f"  steps       {r['num_steps']} coded ({r['spacing']} spacing)"
                     + (f", {r['chunks']} bits-back chunk(s), {r['bootstrap_tiles']} bootstrap tile(s)"
                        if r["mode"] != "progressive" else f", {r['num_stages']} stages"
                        + (f", each in {r['regions']} regions of {r['region_tiles']} tiles" if r["regions"] > 1
                           else "")))
    if r["mode"] != "progressive" or not r["model_matches"]:
        return "\n".join(lines)
    if r["cut_short"]:
        state = f"cut short: {r['file_bytes']:,} of {r['declared_bytes']:,} bytes"
    elif r["file_stages"] < r["num_stages"]:
        state = f"lossy: whole, ends at stage {r['file_stages']} of {r['num_stages']}"
    else:
        state = "whole stream (lossless at full length)"
    if r["damage"]:
        state += f"; DAMAGED: {r['damage']}"
    lines.append(f"  stream      {state}; {r['stages_held']} latent stage(s) checked" + (
        f"; {r['note']}" if r["note"] else ""))
    lines.append("  cut points  stages (last latent): offset in this file, size and bits per pixel of the cut file")
    for p in r["cut_points"]:
        t = "x_0, lossless" if p["timestep"] < 0 else f"t={p['timestep']}"
        lines.append(f"    {p['stages']:4d} ({t:>13}): offset {p['offset']:>9,}  {p['cut_bytes']:>9,} bytes  "
                     f"{p['bits_per_pixel']:8.4f} bpp")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- cut


def add_cut_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cut",
        help="cut a progressive .dfc file at a checked stage boundary: a valid, smaller, lossy file",
        description="Write a shorter progressive file that ends on a checked stage boundary (diffcodec info lists "
                    "them): --stage N (the file then delivers N stages, decode's 'stage N of K + 1'), or the "
                    "largest cut of at most --size BYTES or --bpp X bits per pixel (header included, over all the "
                    "images' pixels). The cut file records its length and stage count (format 5) and decodes to "
                    "the same image as `decode --bits` of FILE at the bits it keeps. No network call.",
        epilog="exit status: 0 written; 2 refused, nothing written (not a progressive file, a damaged file, a "
               "point that is no boundary, a target no cut meets, or one at or past the file's end)",
    )
    p.add_argument("file", metavar="FILE.dfc", help="a progressive .dfc file (whole, lossy, or cut short)")
    p.add_argument("--output", "-o", required=True, metavar="OUT.dfc", help="the file to write")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--stage", type=positive_int, metavar="N", help="keep the first N stages (a cut point)")
    where.add_argument("--size", type=positive_int, metavar="BYTES", help="the largest cut of at most BYTES bytes")
    where.add_argument("--bpp", type=float, metavar="X", help="the largest cut of at most X bits per pixel")
    add_model_args(p)
    p.add_argument("--force", action="store_true", help="overwrite OUT.dfc if it exists")
    p.add_argument("--json", action="store_true", help="print the cut as JSON on stdout")
    p.set_defaults(run=run_cut_command)


def run_cut_command(args: argparse.Namespace) -> int:
    from diffcodec.checkpoint import load_checkpoint
    from diffcodec.codec.fileinfo import cut
    from diffcodec.codec.rate import RateTarget
    from diffcodec.data import read_file_bytes
    from diffcodec.outputs import check_output_file, write_bytes_atomic
    from diffcodec.runtime import pick_device

    target = None
    if args.size is not None:
        target = RateTarget("size", args.size)
    elif args.bpp is not None:
        target = RateTarget("bpp", args.bpp)
    if os.path.exists(args.output) and os.path.exists(args.file) and os.path.samefile(args.output, args.file):
        raise DiffcodecError(f"{args.output}: is the file being cut; give another -o")
    check_output_file(args.output, force=args.force)
    data = read_file_bytes(args.file)
    result = cut(data, load_checkpoint(args.checkpoint, device=pick_device(args.device)), stages=args.stage,
                 target=target, where=args.file)
    write_bytes_atomic(args.output, result.data, force=args.force)
    p = result.point
    report = {"file": args.file, "output": args.output, "original_bytes": result.original_bytes,
              "file_bytes": len(result.data), "stages": p.stages, "timestep": p.timestep,
              "bits_per_pixel": p.bits_per_pixel, "payload_bytes": p.payload_bytes,
              "decode_bits_equivalent": result.bits_equivalent}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        t = "t=0" if p.timestep == 0 else f"t={p.timestep}"
        print(f"{args.output}: {len(result.data):,} bytes ({p.bits_per_pixel:.4f} bpp) of {result.original_bytes:,}; "
              f"ends at stage {p.stages} ({t}); the same image as `diffcodec decode {args.file} --bits "
              f"{result.bits_equivalent}`")
    return 0
