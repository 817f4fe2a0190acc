"""What regions cost in bits: one image's whole progressive stream in one region and in
regions, under several seeds, paired (issue 28, item 4).

    python -m bench.regions_cost [IMAGE] [--crop 256] [--region-tiles 16] [--seeds 0,1,2]
        [--steps 50] [--out reports/regions_cost.json]

IMAGE defaults to kodim01 (../shared/data/kodak); ``--crop N`` codes its central N x N pixels
(256: 64 tiles, 4 regions of 16). For each seed the image is encoded (`api.encode`, mode
progressive, the default exact arithmetic, the whole stream) with region_tiles 0 (one region:
the stream before regions) and with ``--region-tiles``, one after the other. A seed draws
other candidates, so other latents and other bits in both: the cost of regions is the paired
difference of the file sizes, and of each file against the bound of its own trajectory
(`Encoded.kl_bits`: the prior KL, the KL terms, -log2 p(x_0 | y_0)), averaged over the seeds.
Each file is decoded (`api.decode`) and must give the image back, or the run stops.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPORTS_DIR, SHARED_DATA, int_list, module_command, provenance, run_main, write_report
from bench.progressive import center_crop
from diffcodec.checkpoint import load_checkpoint
from diffcodec.codec import api
from diffcodec.codec.progressive.params import ProgressiveParams
from diffcodec.data import read_images
from diffcodec.errors import DiffcodecError
from diffcodec.runtime import cpu_name


def code_once(loaded, image: np.ndarray, params: ProgressiveParams) -> dict[str, Any]:
    """Encode and decode ``image`` as one whole progressive stream: bytes, bound, seconds."""
    start = time.perf_counter()
    encoding = api.encode([image], model=loaded, mode="progressive", progressive_params=params)
    seconds = time.perf_counter() - start
    dec = api.decode(encoding.data, model=loaded, device="cpu")
    if not dec.verified or not np.array_equal(dec.images[0], image):
        raise DiffcodecError(f"region_tiles {params.region_tiles}, seed {params.seed}: the file did not decode "
                             "to the image")
    enc = encoding.encoded
    bound_bits = float(np.sum(enc.kl_bits))
    return {"region_tiles": params.region_tiles, "seed": params.seed, "file_bytes": len(encoding.data), "bound_bits": bound_bits,
            "file_over_bound": 8.0 * len(encoding.data) / bound_bits, "encode_seconds": seconds,
            "encode_split": dict(enc.seconds)}


def summary(rows: list[dict[str, Any]], region_tiles: int) -> dict[str, Any]:
    """Paired per seed: regions' file bytes and file / bound against one region's."""
    by = {(r["seed"], r["region_tiles"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    size = np.array([by[s, region_tiles]["file_bytes"] / by[s, 0]["file_bytes"] - 1.0 for s in seeds])
    over = np.array([by[s, region_tiles]["file_over_bound"] - by[s, 0]["file_over_bound"] for s in seeds])

    def mean_se(v: np.ndarray) -> dict[str, float]:
        return {"mean": float(v.mean()), "se": float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None}

    return {"seeds": seeds, "file_bytes_change": mean_se(size), "file_over_bound_change": mean_se(over)}


def markdown(payload: dict[str, Any]) -> str:
    s = payload["summary"]
    lines = [f"# What regions cost: {payload['image']} ({payload['tiles']} tiles), one region against regions of "
             f"{payload['region_tiles']} tiles ({payload['regions']} regions)", "",
             f"`{payload['provenance']['command']}` on {payload['cpu']}; commit "
             f"{payload['provenance']['git']['commit'][:10]}. The whole progressive stream (K = "
             f"{payload['steps']}, exact arithmetic), each file decoded back to the image.", "",
             "| seed | regions | file bytes | bound bits | file / bound | encode s |", "|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        regions = payload["regions"] if r["region_tiles"] else 1
        lines.append(f"| {r['seed']} | {regions} | {r['file_bytes']:,} | {r['bound_bits']:,.0f} | "
                     f"{r['file_over_bound']:.4f} | {r['encode_seconds']:.1f} |")
    size, over = s["file_bytes_change"], s["file_over_bound_change"]
    se = (lambda v: "" if v is None else f" ± {100 * v:.2f}")
    lines += ["", f"Regions against one region, paired over seeds {s['seeds']}: file bytes "
              f"{100 * size['mean']:+.2f}%{se(size['se'])}; file / bound {100 * over['mean']:+.2f} points"
              f"{se(over['se'])} (mean ± standard error).", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.regions_cost", description=__doc__.splitlines()[0])
    p.add_argument("image", nargs="?", default=None, help="the photo (default: kodim01 from ../shared/data/kodak)")
    p.add_argument("--crop", type=int, default=256, help="code the central N x N pixels (default 256; 0: all)")
    p.add_argument("--region-tiles", type=int, default=16, help="tiles per region (default 16)")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated stream seeds (default 1,2,3)")
    p.add_argument("--steps", type=int, default=ProgressiveParams().num_steps, help="coded steps K (default 50)")
    p.add_argument("--checkpoint", "-c", default=None, help="checkpoint (default: the embedded default model)")
    p.add_argument("--out", default=str(REPORTS_DIR / "regions_cost.json"), help="output JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = module_command("bench.regions_cost", argv)
    path = Path(args.image) if args.image else SHARED_DATA / "kodak" / "kodim01.png"
    if not path.is_file():
        raise DiffcodecError(f"{path}: no such image")
    image = read_images(str(path)).images[0]
    if args.crop:
        image = center_crop(image, args.crop)
    if args.region_tiles < 1:
        raise DiffcodecError("--region-tiles must be at least 1")
    loaded = load_checkpoint(args.checkpoint)
    tile = loaded.model_config.image_size
    tiles = -(-image.shape[0] // tile) * -(-image.shape[1] // tile)
    if tiles <= args.region_tiles:
        raise DiffcodecError(f"{tiles} tiles make one region of {args.region_tiles}: nothing to compare")
    rows = []
    for seed in int_list(args.seeds, "--seeds"):
        for region_tiles in (0, args.region_tiles):
            params = ProgressiveParams(num_steps=args.steps, seed=seed, region_tiles=region_tiles)
            rows.append(code_once(loaded, image, params))
            print(f"seed {seed}, region_tiles {region_tiles}: {rows[-1]['file_bytes']:,} bytes", file=sys.stderr)
    payload = {"provenance": provenance(args, loaded, command=command), "image": path.name + (
        f" central {args.crop}x{args.crop}" if args.crop else ""), "tiles": tiles, "region_tiles": args.region_tiles,
        "regions": -(-tiles // args.region_tiles), "steps": args.steps, "cpu": cpu_name(), "rows": rows,
        "summary": summary(rows, args.region_tiles)}
    write_report(args.out, payload, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
