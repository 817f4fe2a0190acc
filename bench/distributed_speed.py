"""`diffcodec nll` on 1 process and on P processes (torchrun, one torch thread each): speed and sameness.

    python -m bench.distributed_speed [--data DIR] [--checkpoint F] [--num-images 32] [--steps 100]
                                      [--t-samples N] [--batch-size 8] [--procs 1,2]
                                      [--out reports/distributed_speed.json]

For each process count P the script runs the real command, in a subprocess with
OMP_NUM_THREADS=1 (one torch thread per process):

    P = 1:  python -m diffcodec nll DATA -n N -k K -b B --device cpu --json --save-terms terms_1.npz
            (--device cuda: one GPU per process)
    P > 1:  python -m torch.distributed.run --standalone --nproc-per-node P -m diffcodec nll ... terms_P.npz

and records two times: ``bound_seconds``, what `nll` reports (from the start of the bound to
the per-image terms gathered on rank 0: the part that is shared out), and ``wall_seconds``,
the whole command (Python and torch start-up, reading the data and the model, torchrun's
rendezvous). Speedups are against P = 1. It also checks what the issue asks of the
distributed path: every P gives the per-image terms of P = 1 bit for bit (`identical`;
``-b`` is the same, so the batches are, and each image's noise depends only on the seed and
its index).

Expected on a 2-core CPU: near 2x at P = 2 when nothing else runs (each process takes one
core); on a shared machine the number says more about the neighbours than about diffcodec.
The batches are shared out in contiguous blocks, so ``--num-images`` / ``--batch-size``
batches should be a multiple of each P for balance (the defaults give 4 batches).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import CIFAR10_TEST, REPO_ROOT, REPORTS_DIR, int_list, module_command, provenance, write_report
from diffcodec.errors import DiffcodecError

TERMS = ("prior_bits", "terms_bits", "xstart_mse", "num_dims")


def nll_command(procs: int, args: argparse.Namespace, terms: Path) -> list[str]:
    """The command that evaluates the bound on ``procs`` processes."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
    head = launcher + ["-m", "diffcodec"] if procs > 1 else [sys.executable, "-m", "diffcodec"]
    cmd = head + ["nll", str(args.data), "-n", str(args.num_images), "-k", str(args.steps), "-b", str(args.batch_size),
                  "--device", args.device, "--json", "-q", "--save-terms", str(terms)]
    if args.checkpoint:
        cmd += ["-c", str(args.checkpoint)]
    if args.t_samples:
        cmd += ["--t-samples", str(args.t_samples)]
    return cmd


def run_one(procs: int, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    terms = folder / f"terms_{procs}.npz"
    cmd = nll_command(procs, args, terms)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO_ROOT), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise DiffcodecError(f"{procs} process(es): nll exited with {done.returncode}: {tail[:200]}")
    report = json.loads(done.stdout)
    return {"procs": procs, "bound_seconds": report["seconds"], "wall_seconds": wall,
            "images_per_second": report["images_per_second"], "bits_per_dim": report["bits_per_dim"],
            "world_size": report["world_size"], "device_name": report["device_name"],
            "command": " ".join(["python", *cmd[1:]]).replace(str(terms), f"terms_{procs}.npz"), "terms": str(terms)}


def same_terms(a: Path, b: Path) -> bool:
    """Bit-for-bit equal per-image arrays (NaN where both have NaN)."""
    x, y = np.load(a), np.load(b)
    return all(np.array_equal(x[k], y[k], equal_nan=True) for k in TERMS)


def largest_difference_bpd(a: Path, b: Path) -> float:
    """The largest per-image difference of total bits/dim between two runs."""
    x, y = np.load(a), np.load(b)
    total = [(z["prior_bits"] + z["terms_bits"].sum(1)) / z["num_dims"] for z in (x, y)]
    return float(np.abs(total[0] - total[1]).max())


def render(payload: dict[str, Any]) -> str:
    rows = payload["rows"]
    lines = [
        f"# nll on 1 vs P processes (torchrun, {payload['backend']}"
        + (", one torch thread each)" if payload.get("device", "cpu") == "cpu" else ", one GPU each)"),
        "",
        f"{payload['num_images']} images, {payload['steps']}-step chain"
        + (f", {payload['t_samples']} drawn timesteps per image" if payload.get("t_samples") else ", every term summed")
        + f", batch {payload['batch_size']}; {payload['cpu']}; `{payload['provenance']['command']}`",
        "",
        "| processes | bound s | speedup | wall s (with start-up) | wall speedup | images/s | per-image terms = 1 process |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['procs']} | {r['bound_seconds']:.1f} | {r['speedup']:.2f}x | {r['wall_seconds']:.1f} | "
                     f"{r['wall_speedup']:.2f}x | {r['images_per_second']:.2f} | "
                     + ("bit for bit" if r["identical"] else f"no: up to {r['max_abs_difference_bpd']:.2e} bits/dim")
                     + " |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.distributed_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(CIFAR10_TEST), help="images (default: the shared CIFAR-10 test shards)")
    p.add_argument("--checkpoint", "-c", help="checkpoint (default: the embedded default model)")
    p.add_argument("--num-images", "-n", type=int, default=32)
    p.add_argument("--steps", "-k", type=int, default=100, help="chain length K (default 100)")
    p.add_argument("--t-samples", type=int, help="as nll --t-samples (default: every term summed)")
    p.add_argument("--batch-size", "-b", type=int, default=8)
    p.add_argument("--procs", default="1,2", help="process counts, comma-separated; 1 first (default 1,2)")
    p.add_argument("--device", default="cpu",
                   help="cpu (default: one thread per process) or cuda (one GPU per process: cuda:LOCAL_RANK)")
    p.add_argument("--out", default=str(REPORTS_DIR / "distributed_speed.json"))
    p.add_argument("--keep-terms", metavar="DIR", help="keep each run's --save-terms file (terms_P.npz) in DIR")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    procs = int_list(args.procs, "--procs")
    if procs[0] != 1:
        raise DiffcodecError("--procs must start with 1 (the reference)")
    command = module_command("bench.distributed_speed", argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep_terms or tmp)
        for p in procs:
            rows.append(run_one(p, args, folder))
            print(f"{p} process(es): {rows[-1]['bound_seconds']:.1f} s bound, {rows[-1]['wall_seconds']:.1f} s wall",
                  file=sys.stderr)
        for r in rows:
            r["identical"] = same_terms(Path(rows[0]["terms"]), Path(r["terms"]))
            r["max_abs_difference_bpd"] = largest_difference_bpd(Path(rows[0]["terms"]), Path(r["terms"]))
            r["speedup"] = rows[0]["bound_seconds"] / r["bound_seconds"]
            r["wall_speedup"] = rows[0]["wall_seconds"] / r["wall_seconds"]
    for r in rows:
        del r["terms"]
    payload = {
        "kind": "distributed_speed",
        "num_images": args.num_images, "steps": args.steps, "t_samples": args.t_samples,
        "batch_size": args.batch_size, "device": args.device,
        "threads_per_process": 1 if args.device == "cpu" else None,
        "backend": "gloo" if args.device == "cpu" else "gloo (objects) + nccl",
        "cpu": rows[0]["device_name"], "cores": os.cpu_count(),
        "rows": rows,
        "provenance": provenance(args, None, 0, device="cpu", command=command),
    }
    write_report(args.out, payload, render)
    if args.device == "cpu" and not all(r["identical"] for r in rows):  # GPU kernels need not be deterministic
        raise DiffcodecError("the per-image terms differ between process counts (see the JSON)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DiffcodecError as e:
        print(f"bench.distributed_speed: error: {e}", file=sys.stderr)
        sys.exit(2)
