"""What `diffcodec encode img.png` should do with no flags: both modes and the rate targets on one
small image and on a photo crop, with sizes, PSNRs and seconds.

    python -m bench.default_mode [--cifar-index 0] [--kodak kodim01.png] [--crop 128]
        [--settings lossless,progressive,psnr40,psnr35,bpp1] [--decode lossless,progressive,psnr40]
        [--threads 1] [--out reports/default_mode.json]

Each setting is what the CLI runs for its flags, through `codec.api` with the CLI's defaults
(exact arithmetic, the embedded model unless --checkpoint): ``lossless`` is `encode --lossless`
(bits-back, K = 100, bootstrap; the bound is not computed), ``progressive`` `encode
--progressive` (the whole stream, K = 50), ``psnrD`` `encode --psnr D`, ``bppX`` `encode --bpp X`.
Per image and setting: the file's bytes and bits per pixel (whole file), the stages it holds,
encode seconds (wall and CPU of this process), and for the settings in --decode the decode
seconds and the PSNR of the decoded image (the encoder's own PSNR for the others, which is the
same reconstruction). One torch thread and one candidate-search worker by default, so that the
seconds are comparable on a shared machine (they are still shared-machine seconds).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import REPORTS_DIR, SHARED_DATA, module_command, provenance, resolve_data, run_main, write_report
from bench.progressive import center_crop
from diffcodec.checkpoint import load_checkpoint
from diffcodec.codec import api
from diffcodec.codec.rate import RateTarget, psnr_db
from diffcodec.data import read_images
from diffcodec.errors import DiffcodecError
from diffcodec.images import tile_count

SETTINGS = ("lossless", "progressive", "psnr40", "psnr35", "bpp1")


def setting(name: str) -> dict[str, Any]:
    """`api.encode` keywords of a setting name (module docstring)."""
    if name == "lossless":
        return {"mode": "lossless", "compute_bound": False}
    if name == "progressive":
        return {"mode": "progressive"}
    for kind in ("psnr", "bpp", "size"):
        if name.startswith(kind):
            try:
                return {"mode": "progressive", "target": RateTarget(kind, float(name[len(kind):]))}
            except ValueError:
                break
    raise DiffcodecError(f"unknown setting {name!r}; known: lossless, progressive, psnrD, bppX, sizeB")


def run(loaded, image: np.ndarray, name: str, decode: bool, workers: int) -> dict[str, Any]:
    start, cpu = time.perf_counter(), time.process_time()
    enc = api.encode([image], model=loaded, device="cpu", workers=workers, **setting(name))
    row: dict[str, Any] = {"setting": name, "encode_seconds": time.perf_counter() - start,
                           "encode_cpu_seconds": time.process_time() - cpu, "file_bytes": len(enc.data),
                           "bits_per_pixel": 8.0 * len(enc.data) / (image.shape[0] * image.shape[1])}
    if isinstance(enc, api.ProgressiveEncoding):
        row.update(stages=enc.encoded.stages, num_stages=enc.encoded.params.num_stages,
                   encoder_psnr=enc.psnr[0] if enc.psnr is not None else None)
    if decode:
        start, cpu = time.perf_counter(), time.process_time()
        dec = api.decode(enc.data, model=loaded, device="cpu")
        row.update(decode_seconds=time.perf_counter() - start, decode_cpu_seconds=time.process_time() - cpu,
                   psnr=psnr_db(dec.images[0], image))
    print(f"  {name}: {row['file_bytes']:,} bytes, {row['bits_per_pixel']:.3f} bpp, encode "
          f"{row['encode_seconds']:.1f} s" + (f", decode {row['decode_seconds']:.1f} s, {row['psnr']:.2f} dB"
                                             if decode else ""), file=sys.stderr)
    return row


def markdown(payload: dict[str, Any]) -> str:
    prov = payload["provenance"]
    lines = ["# What `diffcodec encode` does with no flags: both modes and the rate targets", "",
             f"Produced by `{prov['command']}` on {prov['device']} (a shared 2-core machine: the seconds are "
             "contended), model `" + str((prov.get("model") or {}).get("fingerprint")) + "`.", ""]
    for img in payload["images"]:
        lines += [f"## {img['name']} ({img['width']}x{img['height']}, {img['tiles']} tiles)", "",
                  "| setting | bytes | bits per pixel | stages | PSNR (dB) | encode s (CPU s) | decode s |",
                  "|---|---|---|---|---|---|---|"]
        for r in img["rows"]:
            psnr = r.get("psnr", r.get("encoder_psnr"))
            psnr_text = "lossless" if psnr is None or psnr == float("inf") else f"{psnr:.2f}"
            stages = f"{r['stages']} of {r['num_stages']}" if "stages" in r else "–"
            dec = f"{r['decode_seconds']:.1f}" if "decode_seconds" in r else "–"
            lines.append(f"| {r['setting']} | {r['file_bytes']:,} | {r['bits_per_pixel']:.3f} | {stages} | {psnr_text} "
                         f"| {r['encode_seconds']:.1f} ({r['encode_cpu_seconds']:.1f}) | {dec} |")
        lines.append("")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.default_mode", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", "-c")
    p.add_argument("--cifar", default=None, help="CIFAR-10 test data (default ../shared/data/cifar10/test)")
    p.add_argument("--cifar-index", type=int, default=0, help="which test image (default 0)")
    p.add_argument("--kodak", default=str(SHARED_DATA / "kodak" / "kodim01.png"), help="the photo ('none': skip)")
    p.add_argument("--crop", type=int, default=128, help="the photo's central N x N pixels (default 128)")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--decode", default="lossless,progressive,psnr40", help="settings whose files are decoded too")
    p.add_argument("--threads", type=int, default=1, help="torch threads and candidate-search workers (default 1)")
    p.add_argument("--out", default=str(REPORTS_DIR / "default_mode.json"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [s for s in args.settings.split(",") if s]
    decode = set(args.decode.split(","))
    for name in names:
        setting(name)  # refuse unknown names before any work
    torch.set_num_threads(max(1, args.threads))
    loaded = load_checkpoint(args.checkpoint, device="cpu")
    cifar = read_images(resolve_data(args.cifar), limit=args.cifar_index + 1)
    sources = [(f"CIFAR-10 test image {args.cifar_index}", cifar.images[args.cifar_index])]
    if args.kodak != "none":
        photo = read_images(resolve_data(args.kodak)).images[0]
        sources.append((f"{Path(args.kodak).name}, central {args.crop}x{args.crop} crop", center_crop(photo, args.crop)))
    prov = provenance(args, loaded, None, device="cpu", command=module_command("bench.default_mode", argv))
    images = []
    for label, image in sources:
        print(f"{label}:", file=sys.stderr)
        rows = [run(loaded, image, name, name in decode, args.threads) for name in names]
        images.append({"name": label, "height": int(image.shape[0]), "width": int(image.shape[1]),
                       "tiles": tile_count(int(image.shape[0]), int(image.shape[1]), loaded.model_config.image_size),
                       "rows": rows})
    write_report(args.out, {"kind": "default_mode", "provenance": prov, "images": images}, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
