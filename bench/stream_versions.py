"""Progressive stream versions side by side: the candidate search, encode and decode times and
the file size against the bound, each version on the same images in one run.

    python -m bench.stream_versions [--cifar N] [--kodak NAME[,NAME]] [--crop 128]
        [--versions 5,6] [--steps 50] [--threads T] [--out reports/stream_versions.json]

Images: the first ``--cifar`` CIFAR-10 test images (32x32) and the central ``--crop`` x crop
pixels of each named Kodak image (../shared/data/kodak), each coded alone with
`api.encode` (mode progressive, the default exact arithmetic) once per stream version, then
decoded with `api.decode`; the file must verify (the lossless end), or the run stops. Per
image and version it records the encoder's wall seconds and their split (``candidates``: the
candidate search and the sent samples; ``network``; ``entropy``), the decoder's, the file's
bytes (header included) and the bound of the same stages along the encoder's trajectory
(`Encoded.kl_bits`: the prior KL, the KL terms, -log2 p(x_0 | y_0)), and what the sent
latents deliver (log2 q/p over the KL). One untimed warm-up (a tile, K = 3, each version)
loads the network and its kernels first. Versions run one after the other on each image, so a
neighbour's burst on a shared CPU hits both alike as far as it can; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.common import REPORTS_DIR, int_list, module_command, provenance, resolve_data, run_main, write_json, write_text
from bench.progressive import center_crop
from diffcodec.checkpoint import load_checkpoint
from diffcodec.codec import api
from diffcodec.codec.progressive.params import ProgressiveParams, default_pad_bits
from diffcodec.data import read_images
from diffcodec.errors import DiffcodecError
from diffcodec.runtime import cpu_name

KODAK = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kodak"


def for_version(base: ProgressiveParams, version: int, **changes: Any) -> ProgressiveParams:
    """``base`` as stream ``version`` writes it by default (its pad: `default_pad_bits`)."""
    return dataclasses.replace(base, version=version, pad_bits=default_pad_bits(version), **changes)


def run_one(loaded, image: np.ndarray, params: ProgressiveParams) -> dict[str, Any]:
    start = time.perf_counter()
    encoding = api.encode([image], model=loaded, mode="progressive", progressive_params=params)
    enc_seconds = time.perf_counter() - start
    data, enc = encoding.data, encoding.encoded
    start = time.perf_counter()
    dec = api.decode(data, model=loaded, device="cpu")
    dec_seconds = time.perf_counter() - start
    if not dec.verified or not np.array_equal(dec.images[0], image):
        raise DiffcodecError(f"stream version {params.version}: the file did not decode to the image")
    bound = float(np.sum(enc.kl_bits))
    rcc_kl = float(np.sum(enc.kl_bits[1:-1]))
    return {
        "version": params.version,
        "file_bytes": len(data),
        "file_bits_per_dim": 8 * len(data) / image.size,
        "bound_bits_per_dim": bound / image.size,
        "file_over_bound": 8 * len(data) / bound,
        "sample_over_kl": float(np.sum(enc.sample_bits[1:])) / rcc_kl if rcc_kl > 0 else None,
        "encode_seconds": enc_seconds,
        "encode_breakdown": enc.seconds,
        "candidate_share_of_encode": enc.seconds.get("candidates", 0.0) / enc_seconds,
        "decode_seconds": dec_seconds,
        "decode_breakdown": dec.seconds,
        "encode_over_decode": enc_seconds / dec_seconds,
    }


def markdown(payload: dict[str, Any]) -> str:
    lines = [
        "# Progressive stream versions: search, encode and decode times, size against the bound",
        "",
        f"`{payload['provenance']['command']}` on {payload['device']}, torch threads {payload['threads']}; "
        f"K = {payload['params']['num_steps']}, the default exact arithmetic; each image coded alone, "
        "each version after the other in one run; every file decoded and verified. search: the encoder's "
        "candidate search and sent samples (`candidates` of its clock); bound: the analytic rate of the same "
        "stages along the encoder's own trajectory (prior KL, KL terms, -log2 p(x_0 | y_0)), which the file can "
        "undercut where the sent latents deliver less than their KL (sample / KL below 1); file sizes include "
        "the header.",
        "",
        "| image | tiles | version | search s | encode s | search share | decode s | encode / decode "
        "| file bits/dim | bound bits/dim | file / bound | sample / KL |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in payload["rows"]:
        for r in row["versions"]:
            lines.append(
                f"| {row['image']} | {row['tiles']} | {r['version']} | {r['encode_breakdown'].get('candidates', 0):.2f} "
                f"| {r['encode_seconds']:.1f} | {100 * r['candidate_share_of_encode']:.0f}% | {r['decode_seconds']:.1f} "
                f"| {r['encode_over_decode']:.2f} | {r['file_bits_per_dim']:.4f} | {r['bound_bits_per_dim']:.4f} "
                f"| {r['file_over_bound']:.4f} | {r['sample_over_kl']:.3f} |")
    lines += ["", "Each version against the first listed, on the same image (search and encode: old / new seconds):",
              ""]
    for row in payload["rows"]:
        for c in row.get("comparisons", []):
            lines.append(f"- {row['image']}, version {c['versions'][1]} against {c['versions'][0]}: search "
                         f"{c['search_speedup']:.2f}x, encode {c['encode_speedup']:.2f}x, file "
                         f"{100 * c['size_change']:+.2f}% ({c['bytes'][0]} -> {c['bytes'][1]} bytes)")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.stream_versions", description=__doc__.split("\n\n")[0])
    p.add_argument("--cifar", type=int, default=1, help="first N CIFAR-10 test images (default 1)")
    p.add_argument("--cifar-data", help="CIFAR-10 test shards (default ../shared/data/cifar10/test)")
    p.add_argument("--kodak", default="kodim01", help="comma-separated Kodak names ('' for none; default kodim01)")
    p.add_argument("--kodak-dir", default=str(KODAK), help="the Kodak folder (default ../shared/data/kodak)")
    p.add_argument("--crop", type=int, default=128, help="central crop of the Kodak images (default 128)")
    p.add_argument("--versions", default="5,6", help="stream versions, the first the baseline (default 5,6)")
    p.add_argument("--steps", "-k", type=int, default=ProgressiveParams().num_steps)
    p.add_argument("--checkpoint", "-c", help="checkpoint (default: the embedded default model)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=str(REPORTS_DIR / "stream_versions.json"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = module_command("bench.stream_versions", argv)
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    loaded = load_checkpoint(args.checkpoint)
    versions = int_list(args.versions, "--versions")
    images: list[tuple[str, np.ndarray]] = []
    if args.cifar:
        cifar = read_images(resolve_data(args.cifar_data), limit=args.cifar).images
        images += [(f"CIFAR-10 test {i}", im) for i, im in enumerate(cifar)]
    for name in filter(None, args.kodak.split(",")):
        im = np.asarray(Image.open(Path(args.kodak_dir) / f"{name}.png").convert("RGB"))
        images.append((f"{name} central {args.crop}x{args.crop}", center_crop(im, args.crop)))
    base = ProgressiveParams(num_steps=args.steps)
    tile = loaded.model_config.image_size
    for version in versions:  # warm-up: the first calls set up the kernels, untimed
        run_one(loaded, images[0][1][:tile, :tile], for_version(base, version, num_steps=3))
    rows = []
    for name, image in images:
        row = {"image": name, "shape": list(image.shape),
               "tiles": -(-image.shape[0] // tile) * -(-image.shape[1] // tile), "versions": []}
        for version in versions:
            r = run_one(loaded, image, for_version(base, version))
            row["versions"].append(r)
            print(f"{name} v{version}: search {r['encode_breakdown'].get('candidates', 0):.1f} s, encode "
                  f"{r['encode_seconds']:.1f} s, decode {r['decode_seconds']:.1f} s, {r['file_bytes']} bytes, "
                  f"file/bound {r['file_over_bound']:.4f}", file=sys.stderr)
        old = row["versions"][0]
        row["comparisons"] = [{  # each later version against the first listed
            "versions": [old["version"], new["version"]],
            "search_speedup": old["encode_breakdown"]["candidates"] / new["encode_breakdown"]["candidates"],
            "encode_speedup": old["encode_seconds"] / new["encode_seconds"],
            "size_change": new["file_bytes"] / old["file_bytes"] - 1.0,
            "bytes": [old["file_bytes"], new["file_bytes"]],
        } for new in row["versions"][1:]]
        rows.append(row)
    device = f"{cpu_name()}, CPU, {torch.get_num_threads()} torch threads"
    payload = {"kind": "stream_versions", "device": device, "threads": torch.get_num_threads(),
               "params": {"num_steps": base.num_steps, "chunk_bits": base.chunk_bits,
                          "pad_bits": {v: for_version(base, v).pad_bits for v in versions},
                          "log2_candidates": base.log2_candidates},
               "provenance": provenance(args, loaded, 0, command=command), "rows": rows}
    out = Path(args.out)
    write_json(out, payload)
    write_text(out.with_suffix(".md"), markdown(payload))
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
