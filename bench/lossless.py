"""Lossless coding: real file sizes of the bits-back codec against the bound and against
classical lossless codecs, CPU seconds, and the peak memory of decoding a Kodak image.

    python -m bench.lossless [CIFAR_DIR] [--kodak DIR] [--checkpoint F] [--num-images 64]
        [--steps 100] [--timing-steps 1000] [--timing-images 4] [--per-image 4]
        [--kodak-steps 10] [--threads 1] [--out reports/lossless.json]

Counting rule: bits/dim = 8 x (bytes of the WHOLE file, header included) / (3 x H x W of the
real image). For the bits-back stream all images share one file (one header, one bootstrap);
"per-image" files code each image alone and pay both every time. Baselines
are one file per image: PNG (Pillow, optimize), WebP lossless (Pillow, method 6, quality
100), JPEG-XL lossless (imagecodecs, effort 9, bare codestream), JPEG-2000 lossless
(imagecodecs, reversible 5/3, bare J2K codestream). Every decode is checked exact.

Times: CPU seconds of the process (time.process_time, all threads) for the coding alone (the
machine is shared, so wall seconds are recorded too but depend on the load).

Measured parts:

* stream: ``--num-images`` CIFAR-10 test images as one stream at ``--steps`` K: file,
  payload, net (payload minus initial bits), the bootstrap tiles and their bits, and the bound (`likelihood.evaluate_bound` on the
  same images and K-step chain), encode/decode CPU seconds, exact decode.
* timing: ``--timing-images`` images as one stream at ``--timing-steps`` (default: the
  model's T): seconds per 32x32 image to encode and decode, file size and bound at that K.
  Without the bootstrap, so that every image goes down the K-step chain (a short stream is
  otherwise all bootstrap, i.e. the progressive codec's 50-step chain).
* network limit (stream and timing runs): the codec cannot beat its network calls — K per
  chunk at that chunk's size, each way, plus the bootstrap's 50 calls on its tiles — timed
  here right after the run (`bench.speed.time_forward`, median of 5 calls per size); the
  record gives those seconds and the codec's share of them (limit / wall seconds; 1.0 = all
  time in the network). ``--add-network-limit REPORT`` adds them to an earlier report.
* per-image: the first ``--per-image`` images, each alone in its own file, with the default
  progressive bootstrap and with ``--no-bootstrap`` (seeded initial words), against the bound.
* kodak: one Kodak image (768x512 = 384 tiles) encoded and decoded in subprocesses through
  the CLI at ``--kodak-steps`` (a small K: at K = T one image takes over an hour on this CPU;
  seconds scale linearly with K, and the extrapolation to T is reported as such), with the
  subprocess's peak resident memory (getrusage ru_maxrss), and the baselines on that image alone.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.common import (
    REPORTS_DIR,
    SHARED_DATA,
    device_string,
    load_json_input,
    module_command,
    provenance,
    resolve_data,
    run_main,
    write_json,
)
from diffcodec.checkpoint import LoadedModel, load_checkpoint
from diffcodec.codec import api
from diffcodec.codec.bitsback.file import BOOTSTRAP_PARAMS
from diffcodec.data import read_images
from diffcodec.errors import DiffcodecError

KODAK = SHARED_DATA / "kodak"


# ----------------------------------------------------------------------------- baselines


def _pillow(fmt: str, **kw) -> tuple[Callable[[np.ndarray], bytes], Callable[[bytes], np.ndarray]]:
    def enc(img: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format=fmt, **kw)
        return buf.getvalue()

    def dec(data: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    return enc, dec


def baseline_codecs() -> dict[str, tuple[Callable, Callable]]:
    """name -> (encode uint8 [H,W,3] -> bytes, decode bytes -> uint8 [H,W,3]); imagecodecs ones
    only when it is installed (the `bench` extra)."""
    codecs = {
        "png": _pillow("PNG", optimize=True),
        "webp_lossless": _pillow("WEBP", lossless=True, method=6, quality=100),
    }
    try:
        import imagecodecs
    except ImportError:
        return codecs
    if imagecodecs.JPEGXL.available:
        codecs["jpegxl_lossless"] = (lambda im: imagecodecs.jpegxl_encode(im, lossless=True, effort=9),
                                     imagecodecs.jpegxl_decode)
    if imagecodecs.JPEG2K.available:
        codecs["jpeg2000_lossless"] = (lambda im: imagecodecs.jpeg2k_encode(im, level=0, reversible=True,
                                                                             codecformat="J2K"),
                                       imagecodecs.jpeg2k_decode)
    return codecs


def run_baselines(images: list[np.ndarray]) -> dict[str, Any]:
    out = {}
    dims = sum(im.size for im in images)
    for name, (enc, dec) in baseline_codecs().items():
        sizes, exact, start = [], True, time.process_time()
        for im in images:
            data = enc(im)
            sizes.append(len(data))
            exact &= bool(np.array_equal(np.asarray(dec(data))[..., :3], im))
        out[name] = {"bits_per_dim": 8.0 * sum(sizes) / dims, "bytes": int(sum(sizes)), "exact": exact,
                     "cpu_seconds": time.process_time() - start}
    return out


# ------------------------------------------------------------------------------ the codec


def code_stream(loaded: LoadedModel, images: list[np.ndarray], steps: int | None, *, bound: bool,
                batch: int, bootstrap: bool = True) -> dict[str, Any]:
    """Encode as one stream, decode, check; sizes in bits/dim of the real pixels."""
    result = api.encode(images, model=loaded, steps=steps, batch_size=batch, compute_bound=bound, bootstrap=bootstrap)
    decoded = api.decode(result.data, model=loaded, device="cpu")
    exact = all(np.array_equal(a, b) for a, b in zip(decoded.images, images))
    n = len(images)
    record = {
        "num_images": n,
        "num_tiles": result.num_tiles,
        "num_steps": result.header.num_steps,
        "spacing": result.params.spacing if result.header.num_steps != result.header.num_timesteps else None,
        "file_bytes": len(result.data),
        "header_bytes": len(result.data) - result.payload_bytes,
        "file_bpd": result.file_bpd,
        "payload_bpd": result.payload_bpd,
        "net_bpd": result.net_bpd,
        "initial_bits": result.initial_bits,
        "initial_bpd": result.initial_bits / result.num_dims,
        "bootstrap_tiles": result.bootstrap_tiles,
        "bootstrap_bits": result.bootstrap_bits,
        "chunks": list(result.params.chunks),
        "exact": exact,
        "encode_wall_seconds": result.seconds,
        "encode_cpu_seconds": result.cpu_seconds,
        "decode_wall_seconds": decoded.seconds,
        "decode_cpu_seconds": decoded.cpu_seconds,
        "encode_cpu_seconds_per_image": result.cpu_seconds / n,
        "decode_cpu_seconds_per_image": decoded.cpu_seconds / n,
    }
    if result.bound is not None:
        per_image = result.bound.total_bpd
        record.update({
            "bound_bpd": result.bound_bpd,
            "bound_bpd_stderr": float(per_image.std(ddof=1) / np.sqrt(n)) if n > 1 else None,
            "bound_cpu_seconds": result.bound_cpu_seconds,
            "overhead_file_pct": 100.0 * (result.file_bpd / result.bound_bpd - 1.0),
            "overhead_net_pct": 100.0 * (result.net_bpd / result.bound_bpd - 1.0),
        })
    return record


def network_limit(loaded: LoadedModel, record: dict[str, Any], repeats: int = 5) -> dict[str, Any]:
    """The network-bound limit of a coded stream (``code_stream``'s record): K calls per
    bits-back chunk at its size and the bootstrap's calls on its tiles, each way, at the median
    call time of this machine; and the codec's wall seconds as a share of it."""
    from bench.speed import time_forward

    sizes_calls = [(b, record["num_steps"]) for b in record["chunks"]]
    if record.get("bootstrap_tiles"):
        sizes_calls.append((record["bootstrap_tiles"], BOOTSTRAP_PARAMS.num_steps))
    per_call = {b: time_forward(loaded, b, repeats=repeats, device=torch.device("cpu"))["seconds_per_call"]
                for b in sorted({b for b, _ in sizes_calls})}
    limit = float(sum(calls * per_call[b] for b, calls in sizes_calls))
    return {
        "network_limit_seconds": limit,  # one way (encode or decode: the same calls)
        "network_seconds_per_call": {str(b): t for b, t in per_call.items()},
        "encode_fraction_of_network_limit": limit / record["encode_wall_seconds"],
        "decode_fraction_of_network_limit": limit / record["decode_wall_seconds"],
    }


def add_network_limit(path: str, loaded: LoadedModel, command: str) -> dict[str, Any]:
    """Time the network limit of an earlier report's stream and timing runs (``--add-network-limit``)."""
    report = load_json_input(path, "a bench.lossless report")
    fingerprint = (report.get("provenance") or {}).get("model", {}).get("fingerprint")
    if fingerprint != loaded.fingerprint:
        raise DiffcodecError(f"{path}: model {fingerprint}, checkpoint {loaded.fingerprint}")
    parts = [k for k in ("stream", "timing_32x32") if isinstance(report.get(k), dict) and "chunks" in report[k]]
    if not parts:
        raise DiffcodecError(f"{path}: no stream with its chunk sizes to time")
    for k in parts:
        report[k].update(network_limit(loaded, report[k]))
    report["provenance"]["network_limit"] = {"command": command, "device": device_string("cpu"),
                                             "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return report


def per_image_files(loaded: LoadedModel, images: list[np.ndarray], steps: int | None, batch: int) -> dict[str, Any]:
    """Each image alone in its own file, as `diffcodec encode` writes it (the progressive
    bootstrap seeds the stack), and started on seeded words instead (``--no-bootstrap``)."""
    out: dict[str, Any] = {}
    for key, bootstrap in (("default", True), ("no_bootstrap", False)):
        rows = [code_stream(loaded, [im], steps, bound=True, batch=batch, bootstrap=bootstrap) for im in images]
        out[key] = {
            "num_images": len(rows),
            "num_steps": rows[0]["num_steps"],
            "file_bpd_mean": float(np.mean([r["file_bpd"] for r in rows])),
            "net_bpd_mean": float(np.mean([r["net_bpd"] for r in rows])),
            "bound_bpd_mean": float(np.mean([r["bound_bpd"] for r in rows])),
            "initial_bpd_mean": float(np.mean([r["initial_bpd"] for r in rows])),
            "header_bytes_mean": float(np.mean([r["header_bytes"] for r in rows])),
            "encode_cpu_seconds_mean": float(np.mean([r["encode_cpu_seconds"] for r in rows])),
            "exact": all(r["exact"] for r in rows),
            "files": rows,
        }
        out[key]["overhead_file_pct"] = 100.0 * (out[key]["file_bpd_mean"] / out[key]["bound_bpd_mean"] - 1.0)
    return out


def _cli_in_subprocess(argv: list[str], threads: int) -> dict[str, Any]:
    """Run `diffcodec ARGV --json` in a fresh interpreter; its JSON plus its peak RSS (MiB)."""
    code = (
        "import json, resource, sys, io, contextlib\n"
        "from diffcodec.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        f"    rc = main({argv!r} + ['--json', '-q'])\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0\n"
        "print(json.dumps({'rc': rc, 'peak_rss_mib': peak, 'report': json.loads(buf.getvalue() or 'null')}))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise DiffcodecError(f"subprocess failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else '?'}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_wall_seconds"] = wall
    return out


def kodak_timing(kodak_dir: Path, checkpoint: str | None, steps: int, threads: int, num_timesteps: int) -> dict:
    names = sorted(p for p in os.listdir(kodak_dir) if p.lower().endswith(".png"))
    if not names:
        raise DiffcodecError(f"{kodak_dir}: no PNG images")
    src = kodak_dir / names[0]
    ckpt = ["-c", checkpoint] if checkpoint else []
    with tempfile.TemporaryDirectory() as tmp:
        dfc, png = Path(tmp) / "k.dfc", Path(tmp) / "k.png"
        enc = _cli_in_subprocess(["encode", str(src), "-o", str(dfc), "-k", str(steps), "--lossless", "--no-bound",
                                  "--device", "cpu", *ckpt], threads)
        dec = _cli_in_subprocess(["decode", str(dfc), "-o", str(png), "--device", "cpu", *ckpt], threads)
        exact = np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(src).convert("RGB")))
    e, d = enc["report"], dec["report"]
    return {
        "image": names[0],
        "baselines_same_image": run_baselines([np.asarray(Image.open(src).convert("RGB"))]),
        "num_tiles": e["num_tiles"],
        "num_steps": steps,
        "file_bpd": e["bits_per_dim"],
        "net_bpd": e["net_bpd"],
        "exact": bool(exact) and d["verified"],
        "encode_wall_seconds": e["seconds"],
        "decode_wall_seconds": d["seconds"],
        "encode_cpu_seconds": e["cpu_seconds"],
        "decode_cpu_seconds": d["cpu_seconds"],
        "encode_peak_rss_mib": enc["peak_rss_mib"],
        "decode_peak_rss_mib": dec["peak_rss_mib"],
        "extrapolated_to_T": {
            "num_steps": num_timesteps,
            "encode_cpu_seconds": e["cpu_seconds"] / steps * num_timesteps,
            "decode_cpu_seconds": d["cpu_seconds"] / steps * num_timesteps,
            "note": "linear extrapolation from the measured K (network and coder cost per step are constant)",
        },
    }


# ---------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.lossless", description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="?", help="CIFAR-10 test shards (default ../shared/data/cifar10/test)")
    p.add_argument("--kodak", default=None, help=f"Kodak PNG folder (default {KODAK}); 'none' to skip")
    p.add_argument("--checkpoint", "-c", help="checkpoint (default: the embedded default model)")
    p.add_argument("--num-images", "-n", type=int, default=64, help="images in the stream (default 64)")
    p.add_argument("--steps", "-k", type=int, default=100, help="K of the stream and per-image runs (default 100)")
    p.add_argument("--timing-steps", type=int, help="K of the timing run (default: the model's T)")
    p.add_argument("--timing-images", type=int, default=4, help="images in the timing run (default 4)")
    p.add_argument("--per-image", type=int, default=4, help="images coded as separate files (default 4)")
    p.add_argument("--kodak-steps", type=int, default=10, help="K of the Kodak timing (default 10)")
    p.add_argument("--kodak-only", action="store_true",
                   help="only the Kodak part (e.g. at the CLI's default K: --kodak-only --kodak-steps 100 "
                        "--out reports/lossless_kodak.json)")
    p.add_argument("--baselines-only", action="store_true",
                   help="only the classical codecs on the first -n test images (cheap: e.g. -n 10000 for the "
                        "whole test set); writes --out (default reports/lossless_baselines.json)")
    p.add_argument("--batch-size", type=int, default=64, help="most tiles per chunk (default 64)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    p.add_argument("--add-network-limit", metavar="REPORT",
                   help="only time the network limit of an earlier report's streams and add it (to --out, "
                        "default: REPORT itself)")
    p.add_argument("--out", help="output JSON (default reports/lossless.json)")
    args = p.parse_args(argv)
    if args.out is None and args.add_network_limit:
        args.out = args.add_network_limit
    if args.out is None:
        args.out = str(REPORTS_DIR / ("lossless_baselines.json" if args.baselines_only else "lossless.json"))
    return args


def cifar_parts(args: argparse.Namespace, loaded: LoadedModel, images: list[np.ndarray], T: int,
                report: dict[str, Any]) -> None:
    print(f"stream: {args.num_images} images at K={args.steps}", file=sys.stderr)
    report["stream"] = code_stream(loaded, images[: args.num_images], args.steps, bound=True, batch=args.batch_size)
    report["stream"].update(network_limit(loaded, report["stream"]))
    print(f"  {json.dumps({k: report['stream'][k] for k in ('file_bpd', 'net_bpd', 'bound_bpd')})}", file=sys.stderr)
    report["baselines_cifar"] = run_baselines(images[: args.num_images])
    print(f"per-image files: {args.per_image} at K={args.steps}", file=sys.stderr)
    report["per_image"] = per_image_files(loaded, images[: args.per_image], args.steps, args.batch_size)
    timing_steps = args.timing_steps or T
    print(f"timing: {args.timing_images} images at K={timing_steps}", file=sys.stderr)
    report["timing_32x32"] = code_stream(loaded, images[: args.timing_images], timing_steps, bound=True,
                                         bootstrap=False, batch=args.batch_size)
    report["timing_32x32"].update(network_limit(loaded, report["timing_32x32"]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_checkpoint(args.checkpoint, device="cpu")
    if args.add_network_limit:
        report = add_network_limit(args.add_network_limit, loaded, module_command("bench.lossless", argv))
        print(f"wrote {write_json(args.out, report)}", file=sys.stderr)
        return 0
    data = resolve_data(args.data)
    need = args.num_images if args.baselines_only else max(args.num_images, args.timing_images, args.per_image)
    images = [] if args.kodak_only else read_images(data, limit=need).images
    T = loaded.diffusion_config.num_timesteps
    report: dict[str, Any] = {
        "provenance": provenance(args, loaded, seed=0, device="cpu", command=module_command("bench.lossless", argv)),
        "counting_rule": "bits/dim = 8 x whole-file bytes (header included) / (3 x H x W real pixels); "
                         "bits-back stream: all images in one file; baselines and per-image files: one file per image",
        "weights_note": f"{loaded.meta.get('preset', '?')} preset, {loaded.meta.get('steps', '?')} training steps, "
                        f"{loaded.meta.get('weights', '?')} weights",
        "threads": args.threads,
    }
    if args.baselines_only:
        report["baselines_cifar"] = {**run_baselines(images), "num_images": len(images)}
        path = write_json(args.out, report)
        print(f"wrote {path}", file=sys.stderr)
        return 0
    if not args.kodak_only:
        cifar_parts(args, loaded, images, T, report)
    if args.kodak != "none":
        kodak = Path(args.kodak) if args.kodak else KODAK
        if kodak.is_dir():
            print(f"kodak: one image at K={args.kodak_steps}", file=sys.stderr)
            report["kodak"] = kodak_timing(kodak, args.checkpoint, args.kodak_steps, args.threads, T)
            kodak_images = read_images(kodak).images
            report["baselines_kodak"] = run_baselines(kodak_images)
            report["baselines_kodak"]["num_images"] = len(kodak_images)
        else:
            report["kodak"] = {"skipped": f"{kodak} not present"}
    path = write_json(args.out, report)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
