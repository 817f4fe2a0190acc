"""What `bench/gpu_measure.sh` brought back, checked here on the CPU: every .dfc the GPU wrote is
decoded on this machine (GPU -> CPU portability), the photo's pixels compared with the PNG the
GPU decoded, and the GPU's step times, photo times and bits per pixel gathered into one report.

    python -m bench.gpu_files FILES_AT [--out reports/gpu_measure.md] [--device-name NAME]

FILES_AT is the device call's ``files_at`` folder (or any copy of its $OUT). A file that does
not decode, or decodes to other pixels than the GPU's, is reported as such and makes the exit
status 1: the report is written either way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import provenance
from diffcodec.errors import DiffcodecError

FILES = (  # (file, what it is, the GPU's decoded image or None)
    ("gpu-photo.dfc", "the photo as the CLI codes it by default (40 dB)", "gpu-photo.png"),
    ("gpu-prog.dfc", "8 CIFAR-10 test images, the whole progressive stream", None),
    ("gpu-k100.dfc", "CIFAR-10 test images, bits-back at K = 100", None),
)


def _json(path: Path) -> dict | None:
    """The first JSON document in ``path`` (the CLI's --json report; None if there is none)."""
    try:
        return json.JSONDecoder().raw_decode(path.read_text().lstrip())[0]
    except (OSError, ValueError):
        return None


def check_file(path: Path, gpu_png: Path | None) -> dict:
    """Decode ``path`` on the CPU: bytes, seconds, whether it verified, and whether its pixels
    equal the GPU's decoded PNG (None: no PNG to compare)."""
    from PIL import Image

    from diffcodec.codec import api

    data = path.read_bytes()
    start = time.perf_counter()
    try:
        r = api.decode(data, device="cpu", where=path.name)
    except DiffcodecError as e:
        return {"file": path.name, "bytes": len(data), "error": str(e)}
    stages = getattr(r, "stages", None)
    lossy = stages is not None and stages < r.num_stages  # a file that ends before its lossless end
    row = {"file": path.name, "bytes": len(data), "cpu_decode_s": time.perf_counter() - start,
           "verified": bool(getattr(r, "verified", True)),  # a bits-back file's checksum always holds
           "lossy": lossy, "images": len(r.images), "same_as_gpu": None}
    if gpu_png is not None and gpu_png.exists():
        gpu = np.asarray(Image.open(gpu_png).convert("RGB"))
        row["same_as_gpu"] = len(r.images) == 1 and np.array_equal(r.images[0], gpu)
    return row


def report(folder: Path, rows: list[dict], device_name: str) -> str:
    steps = (folder / "steps.txt").read_text().strip() if (folder / "steps.txt").exists() else "(no steps.txt)"
    enc, dec = _json(folder / "photo-encode.json"), _json(folder / "photo-decode.json")
    here = provenance()
    lines = [f"# GPU measurements brought back ({device_name})", "",
             f"`python -m bench.gpu_files {folder}` (commit {here['git'].get('commit', '?')[:10]}, this CPU: "
             f"{here['device']})", "",
             "The device call's steps (`bench/gpu_measure.sh`: exit status, wall seconds with start-up, limit):",
             "", "```", steps, "```", ""]
    if enc is not None:
        secs = enc.get("seconds", {})
        lines += [f"The photo: {enc.get('num_tiles')} tiles, {enc.get('bits_per_pixel', 0):.4f} bits per pixel at "
                  f"{enc.get('min_psnr_db', float('nan')):.2f} dB ({enc.get('target')}), encoded on "
                  f"{enc.get('device')}: codec {secs.get('total', float('nan')):.1f} s (network "
                  f"{secs.get('network', float('nan')):.1f} s, candidate search {secs.get('candidates', float('nan')):.1f} s)"
                  + (f"; decoded there: network {dec.get('seconds', {}).get('network', float('nan')):.1f} s" if dec else "")
                  + ".", ""]
    lines += ["Decoded here on the CPU (verified: the lossless pixels checked; a lossy file ends before them):", "",
              "| file | what | bytes | CPU decode s | verified | pixels as the GPU decoded |",
              "|---|---|---|---|---|---|"]
    what = {name: text for name, text, _ in FILES}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['file']} | {what.get(r['file'], '')} | {r['bytes']:,} | – | refused: {r['error']} | – |")
            continue
        same = {None: "–", True: "yes", False: "**no**"}[r["same_as_gpu"]]
        verified = "lossy" if r["lossy"] else "yes" if r["verified"] else "**no**"
        lines.append(f"| {r['file']} | {what.get(r['file'], '')} | {r['bytes']:,} | {r['cpu_decode_s']:.1f} | "
                     f"{verified} | {same} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_files", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="the device call's files_at (gpu_measure.sh's $OUT)")
    p.add_argument("--out", type=Path, default=Path("reports/gpu_measure.md"))
    p.add_argument("--device-name", default="the GPU named in steps.txt")
    args = p.parse_args(argv)
    if not args.folder.is_dir():
        print(f"bench.gpu_files: no folder {args.folder}", file=sys.stderr)
        return 2
    rows = []
    for name, _, png in FILES:
        path = args.folder / name
        if path.exists():
            rows.append(check_file(path, args.folder / png if png else None))
            print(json.dumps(rows[-1]))
    if not rows:
        print(f"bench.gpu_files: {args.folder} holds none of {', '.join(n for n, _, _ in FILES)}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(args.folder, rows, args.device_name))
    print(f"wrote {args.out}")
    bad = [r for r in rows if "error" in r or not (r["verified"] or r["lossy"]) or r["same_as_gpu"] is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
