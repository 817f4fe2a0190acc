"""Files of the exact contracts against same-machine float32 files: size, time, round trip.

    python -m bench.exact_sizes [DATA] [--lossless-images 8] [--progressive-images 2] [--threads 1]
                                [--repeats 1] [--arithmetics float32,exact1,exact2]
                                [--out reports/exact_sizes.json]

The first CIFAR-10 test images are coded losslessly (K = 100, the default, bootstrap
included) and progressively (K = 50) with ``arithmetic="float32"`` and under each exact
contract (1: `exact_net`, 2: `exact_net2`, the default), each decoded back on the CPU
(``--threads`` torch threads, as many search workers): the file size, bits/dim, encode /
decode wall and CPU seconds, and whether the pixels came back exactly. The issue's targets:
contract 2's files within 0.1% of float32's size; its lossless encode and decode CPU time
within 1.1x of float32's; a progressive 32x32 tile decoded in <= 1.5 s with 2 threads.

``--repeats R`` codes everything R times, the arithmetics in turn within each repeat (so that
a slower spell of a shared machine falls on all of them alike), and reports each time's
median (every repeat's times are kept); the files are the same every time (checked). The
ratios are those of the medians, and (``paired``) the median of each repeat's own ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import REPORTS_DIR, module_command, provenance, resolve_data, run_main, write_json
from diffcodec.checkpoint import load_checkpoint
from diffcodec.codec import api
from diffcodec.data import read_images
from diffcodec.errors import DiffcodecError
from diffcodec.runtime import use_threads

ARITHMETICS = (("float32", "float32", None), ("exact1", "exact", 1), ("exact2", "exact", 2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.exact_sizes", description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="?", help="CIFAR-10 test shards (default ../shared/data/cifar10/test)")
    p.add_argument("--checkpoint", "-c", help="checkpoint (default: the embedded default model)")
    p.add_argument("--lossless-images", type=int, default=8)
    p.add_argument("--progressive-images", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads and search workers (default 1)")
    p.add_argument("--repeats", type=int, default=1, help="code everything R times, report medians (default 1)")
    p.add_argument("--arithmetics", default=",".join(name for name, _, _ in ARITHMETICS),
                   help="comma-separated, of float32, exact1, exact2 (default all)")
    p.add_argument("--out", default=str(REPORTS_DIR / "exact_sizes.json"))
    return p


TIMES = ("encode_s", "decode_s", "encode_cpu_s", "decode_cpu_s")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    chosen = [a for a in ARITHMETICS if a[0] in args.arithmetics.split(",")]
    if args.threads < 1 or args.lossless_images < 0 or args.progressive_images < 0 or args.repeats < 1:
        raise DiffcodecError("--threads and --repeats must be positive and the image counts at least 0")
    if len(chosen) != len(args.arithmetics.split(",")):
        raise DiffcodecError(f"--arithmetics: known are {', '.join(name for name, _, _ in ARITHMETICS)}")
    use_threads(args.threads)
    model = load_checkpoint(args.checkpoint)
    images = read_images(resolve_data(args.data), limit=max(args.lossless_images, args.progressive_images)).images
    runs: dict[str, dict] = {}
    for repeat in range(args.repeats):
        for mode, n, steps in (("lossless", args.lossless_images, 100), ("progressive", args.progressive_images, 50)):
            if not n:
                continue
            batch = list(images[:n])
            for name, arithmetic, contract in chosen:
                extra = {"workers": args.threads} if mode == "progressive" else {}
                if contract is not None:
                    extra["contract"] = contract
                w0, c0 = time.perf_counter(), time.process_time()
                enc = api.encode(batch, model=model, mode=mode, steps=steps, arithmetic=arithmetic,
                                 compute_bound=False, **extra)
                w1, c1 = time.perf_counter(), time.process_time()
                dec = api.decode(enc.data, model=model, device="cpu")
                w2, c2 = time.perf_counter(), time.process_time()
                times = dict(zip(TIMES, (w1 - w0, w2 - w1, c1 - c0, c2 - c1)))
                rec = runs.setdefault(f"{mode}-{name}", {
                    "mode": mode, "arithmetic": name, "images": n, "steps": steps, "bytes": len(enc.data),
                    "bpd": 8 * len(enc.data) / (n * 3072), "exact_round_trip": True,
                    "repeats": {t: [] for t in TIMES}})
                if len(enc.data) != rec["bytes"]:
                    raise DiffcodecError(f"{mode} {name}: repeat {repeat + 1} wrote {len(enc.data)} bytes, "
                                         f"the first {rec['bytes']}")
                rec["exact_round_trip"] &= all(np.array_equal(a, b) for a, b in zip(batch, dec.images))
                for t, v in times.items():
                    rec["repeats"][t].append(v)
                    rec[t] = float(np.median(rec["repeats"][t]))
                print(mode, name, f"repeat {repeat + 1}:", {t: round(v, 2) for t, v in times.items()},
                      file=sys.stderr, flush=True)
    ratios = {}
    for mode in ("lossless", "progressive"):
        f32, c2 = runs.get(f"{mode}-float32"), runs.get(f"{mode}-exact2")
        if f32 and c2:
            ratios[mode] = {"bytes": c2["bytes"] / f32["bytes"],
                            "encode_cpu": c2["encode_cpu_s"] / f32["encode_cpu_s"],
                            "decode_cpu": c2["decode_cpu_s"] / f32["decode_cpu_s"],
                            "decode_s_per_image": c2["decode_s"] / c2["images"],
                            "paired": _paired(f32, c2)}
    payload = {"kind": "exact_sizes", "threads": args.threads, "repeats": args.repeats, "runs": runs,
               "contract2_vs_float32": ratios,
               "provenance": provenance(args, model, 0, device="cpu",
                                        command=module_command("bench.exact_sizes", argv))}
    write_json(Path(args.out), payload)
    return 0


def _paired(f32: dict, c2: dict) -> dict:
    """Each repeat's own ratios (contract 2 over float32, coded minutes apart at most) and
    their medians: on a machine whose speed drifts between repeats, steadier than the ratio
    of the medians."""
    out = {}
    for t in ("encode_cpu_s", "decode_cpu_s"):
        per = [a / b for a, b in zip(c2["repeats"][t], f32["repeats"][t])]
        out[t.removesuffix("_s")] = {"per_repeat": per, "median": float(np.median(per))}
    return out


if __name__ == "__main__":
    sys.exit(run_main(main))
