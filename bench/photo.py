"""One photo through the codecs as a user runs them: wall time, peak memory, bits per pixel,
and how close each run comes to the network-bound limit.

    python -m bench.photo [IMAGE] [--crop N] [--modes default,lossless,progressive]
                          [--checkpoint F] [--threads T] [--out reports/photo.json]

IMAGE defaults to kodim01 (768x512) from ../shared/data/kodak; ``--crop N`` codes its central
N x N pixels instead. Modes, each with the `diffcodec` CLI's defaults (exact arithmetic):

- ``default``: ``diffcodec encode IMAGE`` with no flags (progressive, ending at the first
  checked stage boundary that reaches 40 dB), then ``decode``: the decoded PNG must have the
  PSNR the encoder reported, to the last digit (it decodes to the encoder's reconstruction);
- ``lossless``: ``encode --lossless --no-bound`` (bits-back; the bound is an estimate, not
  part of the file, and would double the network calls), then ``decode``: pixels equal;
- ``progressive``: ``encode --progressive`` (the whole progressive stream), then ``decode``:
  pixels equal.

Each command runs in its own child process (this script with ``--child``), which calls the
CLI in-process, so the operating system's figures are that command's alone: wall seconds,
CPU seconds and peak resident memory (``wait4``). Inside the child every call of the network
is timed where it happens: the codec's own calls, at its own batch sizes, in the same run.
Their sum is the network-bound limit of that command (a codec that did nothing but run its
network would take that long), and ``network share`` = network seconds / wall seconds is the
fraction of that limit the command reaches. Start-up (the interpreter, imports, reading the
model) counts in the wall time, as a user waits for it; ``codec seconds`` (the time inside
`api.encode` / `api.decode`: the exact network's build, the coding, the checks) and ``codec
network share`` = network seconds / codec seconds leave it out: a few seconds that matter on
a small image only. Run it on a quiet machine: one command at a time, nothing else busy.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.common import (
    REPORTS_DIR,
    SHARED_DATA,
    module_command,
    provenance,
    read_json,
    run_main,
    write_report,
)
from diffcodec.errors import DiffcodecError
from diffcodec.runtime import cpu_name

KODIM01 = SHARED_DATA / "kodak" / "kodim01.png"
MODES = {  # mode: the encode flags besides IMAGE -o OUT
    "default": [],
    "lossless": ["--lossless", "--no-bound"],
    "progressive": ["--progressive"],
}


# ------------------------------------------------------------------------------ the child


def _timed_network(network, calls: list[tuple[str, int, float]]):
    """`runtime.network` whose ModelFns record (arithmetic, batch, seconds) of every call."""
    import torch

    def make(*args, **kwargs):
        fn = network(*args, **kwargs)
        kind = "exact" if kwargs.get("exact") else ("float64" if kwargs.get("float64") else "float32")

        def call(x_t, t):
            start = time.perf_counter()
            out = fn(x_t, t)
            if out.device.type == "cuda":
                torch.cuda.synchronize(out.device)
            calls.append((kind, int(x_t.shape[0]), time.perf_counter() - start))
            return out

        return call

    return make


def _timed(fn, seconds: list[float]):
    """``fn`` adding the seconds of each call to ``seconds``."""

    def call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    return call


def child(record: str, argv: list[str]) -> int:
    """Run ``diffcodec ARGV`` in this process with every network call timed; write what it
    printed (its --json report) and the calls to ``record``."""
    from diffcodec import cli
    from diffcodec.codec import api
    from diffcodec.codec.bitsback import file as bitsback_file

    calls: list[tuple[str, int, float]] = []
    api.network = _timed_network(api.network, calls)
    bitsback_file.network = _timed_network(bitsback_file.network, calls)
    codec: list[float] = []  # seconds inside api.encode / api.decode: the codec, without start-up
    for name in ("encode", "decode"):
        setattr(api, name, _timed(getattr(api, name), codec))
    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = cli.main(argv)
    wall = time.perf_counter() - start
    Path(record).write_text(json.dumps({"exit": code, "stdout": out.getvalue(), "wall_seconds_in_process": wall,
                                        "calls": calls, "codec_seconds": sum(codec)}))
    return code


# ------------------------------------------------------------------------------ the parent


def run_child(argv: list[str], threads: int | None) -> dict[str, Any]:
    """One CLI command in a child process: its report, network calls and the OS's figures."""
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "record.json"
        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        start = time.perf_counter()
        with open(Path(tmp) / "stderr.txt", "w+") as stderr:  # a file, not a pipe: no limit on what it says
            proc = subprocess.Popen([sys.executable, "-m", "bench.photo", "--child", str(record), "--", *argv],
                                    env=env, cwd=Path(__file__).resolve().parents[1], stderr=stderr)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - start
            stderr.seek(0)
            err = stderr.read()
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0 or not record.is_file():
            raise DiffcodecError(f"`diffcodec {' '.join(argv)}` failed (exit {proc.returncode}): "
                                 f"{err.strip().splitlines()[-1] if err.strip() else 'no message'}")
        got = json.loads(record.read_text())
    calls = got["calls"]
    network_s = sum(c[2] for c in calls)
    return {
        "command": "diffcodec " + " ".join(argv),
        "report": json.loads(got["stdout"]),
        "wall_seconds": wall,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "network_calls": len(calls),
        "network_image_forwards": int(sum(c[1] for c in calls)),
        "network_max_batch": max((c[1] for c in calls), default=0),
        "network_seconds": network_s,
        "network_seconds_by_arithmetic": {k: sum(c[2] for c in calls if c[0] == k) for k in {c[0] for c in calls}},
        "network_share": network_s / wall if wall > 0 else None,
        "codec_seconds": got["codec_seconds"],
        "codec_network_share": network_s / got["codec_seconds"] if got["codec_seconds"] > 0 else None,
    }


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def run_mode(mode: str, image_path: Path, work: Path, threads: int | None, model_args: list[str],
             revision: dict[str, Any]) -> dict[str, Any]:
    original = np.asarray(Image.open(image_path).convert("RGB"))
    coded, decoded = work / f"{mode}.dfc", work / f"{mode}.png"
    enc = run_child(["encode", str(image_path), "-o", str(coded), "--json", "-q", *MODES[mode], *model_args], threads)
    dec = run_child(["decode", str(coded), "-o", str(decoded), "--json", "-q", *model_args], threads)
    for side in (enc, dec):  # the temporary folder's name says nothing
        side["command"] = side["command"].replace(str(work), "WORK")
    back = np.asarray(Image.open(decoded).convert("RGB"))
    file_bytes = coded.stat().st_size
    pixels = original.shape[0] * original.shape[1]
    row: dict[str, Any] = {"mode": mode, "commit": revision, "file_bytes": file_bytes, "bits_per_pixel": 8 * file_bytes / pixels,
                           "bits_per_dim": 8 * file_bytes / (3 * pixels), "encode": enc, "decode": dec,
                           "psnr_db": psnr_db(original, back), "lossless": bool(np.array_equal(back, original))}
    if not enc["report"].get("lossless", True):  # a progressive file that ends early (the default)
        row["encoder_psnr_db"] = enc["report"]["psnr_db"][0]
        row["round_trip"] = row["encoder_psnr_db"] is not None and abs(row["encoder_psnr_db"] - row["psnr_db"]) < 1e-9
    else:
        row["round_trip"] = row["lossless"]
    if not row["round_trip"]:
        raise DiffcodecError(f"{mode}: the decoded image is not what the encoder made "
                             f"(PSNR {row['psnr_db']:.4f} dB, lossless {row['lossless']})")
    return row


def render(r: dict[str, Any]) -> str:
    p = r["provenance"]
    lines = [
        f"# A photo through the codecs: {r['image']} ({r['width']}x{r['height']}, {r['tiles']} tiles)", "",
        f"`{p['command']}` on {r['cpu']}, {r['threads']}; commit {str(p['git']['commit'])[:10]}"
        f"{' (dirty)' if p['git']['dirty'] else ''}. Each command in its own process, one after the other; wall and "
        "CPU seconds and peak resident memory from the OS (start-up included); network seconds: every network "
        "call of that command, timed where it ran (its network-bound limit); network share = network seconds / "
        "wall seconds; codec seconds: inside `api.encode` / `api.decode` (no start-up), codec network share = "
        "network seconds / codec seconds (–: not recorded by that row's commit).", "",
        "| mode | command | bits/pixel | PSNR dB | wall s | CPU s | peak MiB | network calls (max batch) | network s "
        "| network share | codec s | codec network share | encode / decode | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        for side in ("encode", "decode"):
            c = row[side]
            psnr = "lossless" if row["lossless"] else f"{row['psnr_db']:.2f}"
            lines.append(f"| {row['mode']} {side} | `{c['command']}` | {row['bits_per_pixel']:.4f} | {psnr} "
                         f"| {c['wall_seconds']:.1f} | {c['cpu_seconds']:.1f} | {c['peak_rss_mib']:.0f} "
                         f"| {c['network_calls']} ({c['network_max_batch']}) | {c['network_seconds']:.1f} "
                         f"| {100 * c['network_share']:.0f}% "
                         + (f"| {c['codec_seconds']:.1f} | {100 * c['codec_network_share']:.0f}% "
                            if c.get("codec_seconds") else "| – | – ") +
                         f"| {row['encode']['wall_seconds'] / row['decode']['wall_seconds']:.2f} "
                         f"| {str(row['commit']['commit'])[:10]}{' (dirty)' if row['commit']['dirty'] else ''} |")
    lines += ["", "Every decoded image was checked against the input: `lossless` rows equal it pixel for pixel, "
              "the `default` row has the PSNR its encoder reported (it decodes to the encoder's reconstruction).", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.photo", description=__doc__.splitlines()[0])
    p.add_argument("image", nargs="?", help="the photo (default: kodim01 from ../shared/data/kodak)")
    p.add_argument("--crop", type=int, help="code the central N x N pixels instead of the whole photo")
    p.add_argument("--modes", default="default,lossless,progressive",
                   help="comma-separated, from " + ", ".join(MODES) + " (default: all, in that order)")
    p.add_argument("--checkpoint", "-c", help="checkpoint (default: the embedded default model)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the commands (default: the CLI's choice)")
    p.add_argument("--out", default=str(REPORTS_DIR / "photo.json"), help="output JSON (default reports/photo.json)")
    p.add_argument("--update", action="store_true",
                   help="keep the rows of the modes not run from an existing --out of the same image (each row "
                        "records the commit that measured it)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    modes = args.modes.split(",")
    for mode in modes:
        if mode not in MODES:
            raise DiffcodecError(f"--modes: unknown mode {mode!r}; known: {', '.join(MODES)}")
    image_path = Path(args.image) if args.image else KODIM01
    if not image_path.is_file():
        raise DiffcodecError(f"{image_path}: no such image" + ("" if args.image else
                             " (the Kodak images live in ../shared/data/kodak beside the repo; pass a path)"))
    model_args = ["-c", args.checkpoint] if args.checkpoint else []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = image_path
        image = Image.open(image_path).convert("RGB")
        if args.crop:
            w, h = image.size
            n = min(args.crop, w, h)
            left, top = (w - n) // 2, (h - n) // 2
            image = image.crop((left, top, left + n, top + n))
            source = work / f"{image_path.stem}_crop{n}.png"
            image.save(source)
        from diffcodec.checkpoint import load_checkpoint

        tile = load_checkpoint(args.checkpoint).model_config.image_size
        w, h = image.size
        result: dict[str, Any] = {
            "provenance": provenance(args, command=module_command("bench.photo", argv)),
            "image": image_path.name + (f" central {image.size[0]}x{image.size[1]}" if args.crop else ""),
            "width": w, "height": h, "tiles": math.ceil(h / tile) * math.ceil(w / tile),
            "cpu": cpu_name(), "threads": f"OMP_NUM_THREADS={args.threads}" if args.threads else "the CLI's threads",
            "rows": [],
        }
        kept = []
        if args.update and (old := read_json(args.out)) is not None:
            if (old.get("image"), old.get("width"), old.get("height")) != (result["image"], w, h):
                raise DiffcodecError(f"--update: {args.out} holds another image ({old.get('image')})")
            kept = [row for row in old["rows"] if row["mode"] not in modes and "commit" in row]
        for mode in modes:
            print(f"bench.photo: {mode} ...", file=sys.stderr, flush=True)
            # the code's revision as the run started (the reports it writes later make the tree dirty)
            result["rows"].append(run_mode(mode, source, work, args.threads, model_args, result["provenance"]["git"]))
            order = list(MODES)
            result["rows"] = sorted(kept + [r for r in result["rows"] if r not in kept], key=lambda r: order.index(r["mode"]))
            write_report(args.out, result, render)  # after each mode: a long run keeps what it measured
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        rest = sys.argv[3:]
        sys.exit(child(sys.argv[2], rest[1:] if rest[:1] == ["--"] else rest))
    sys.exit(run_main(main))
