"""Forward passes per second of the exact networks (contracts 1 and 2) against float32 and float64.

    python -m bench.exact_speed [--checkpoint F] [--device cpu|cuda] [--batch-sizes 1,16]
                                [--threads 1,2] [--repeats 5] [--profile] [--memory]
                                [--out reports/exact_speed.json]

Four networks from one checkpoint, each called as the codecs call it (`runtime.network`,
inference mode): the float32 model, its float64 copy, contract 1's exact network
(`exact_net`, binary64 products of up to 27-bit integers) and contract 2's (`exact_net2`,
the default: int8 convolutions of the two parts of 14-bit integers, C kernels). Each is
timed on seeded [B, C, S, S] inputs at the model's tile size and random timesteps,
``--repeats`` calls per batch size and thread count after two warm-up calls; the networks
are called in turn within each repeat, so a neighbour's burst on a shared CPU hits all of
them alike. Reported per thread count, batch size and network: the median and fastest
seconds per call and image-forwards per second (from the median); and the ratios the
issue sets targets for: contract 2 / float32 speed (>= 1.0 at batch 16, >= 0.8 at batch
1) and contract 2 / contract 1.

``--profile`` adds where the time goes at the largest batch size and the first thread
count: contract 1 and float32 per layer kind (forward hooks: convolution, GroupNorm, SiLU,
attention, linear), contract 2 per kernel (its products, GroupNorm, epilogues,
quantization, softmax weights; the rest is Python and small torch operations).
``--memory`` measures each network's peak resident memory in its own process (load,
build, one call at the largest batch size), against the float32 network's, and where it goes
(`memory_breakdown`: after the build, after a first batch-1 call, the batch call's own peak;
float32 and contract 2, also with DIFFCODEC_NO_NATIVE=1 and with DIFFCODEC_NO_INT8=1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import REPO_ROOT, REPORTS_DIR, int_list, module_command, provenance, run_main, write_json
from diffcodec.checkpoint import load_checkpoint
from diffcodec.errors import DiffcodecError
from diffcodec.runtime import ModelFn, device_string, network, pick_device, use_threads

NETWORKS = ("float32", "float64", "exact1", "exact2")
LABELS = {"float32": "float32", "float64": "float64", "exact1": "exact, contract 1", "exact2": "exact, contract 2",
          "bf16": "bf16 autocast"}
TARGETS = {1: 0.8, 16: 1.0}  # contract 2 / float32 speed, per batch size (issue 27)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_networks(model: torch.nn.Module, device: torch.device) -> dict[str, ModelFn]:
    """The four networks, each a ``ModelFn`` on ``device`` (the model itself is untouched);
    on a GPU also bf16 autocast (the fastest float path there)."""
    fns = {
        "float32": network(model, device=device),
        "float64": network(model, float64=True, device=device),
        "exact1": network(model, exact=True, contract=1, device=device),
        "exact2": network(model, exact=True, contract=2, device=device),
    }
    if device.type == "cuda":
        fns["bf16"] = network(model, bf16=True, device=device)
    return fns


def _inputs(batch_size: int, in_channels: int, image_size: int, num_timesteps: int, device: torch.device,
            seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, in_channels, image_size, image_size, generator=g).to(device)
    return x, torch.randint(0, num_timesteps, (batch_size,), generator=g).to(device)


def time_networks(fns: dict[str, ModelFn], batch_size: int, *, in_channels: int, image_size: int,
                  num_timesteps: int, repeats: int, device: torch.device, seed: int = 0) -> dict[str, dict[str, float]]:
    """Seconds per call of each network on one seeded batch (interleaved repeats, two warm-ups).
    The float64 network is given the batch in float64 (converted before timing); the others
    take it in float32 (the exact networks quantize any float input)."""
    x32, t = _inputs(batch_size, in_channels, image_size, num_timesteps, device, seed)
    inputs = {name: x32.double() if name == "float64" else x32 for name in fns}
    for name, fn in fns.items():
        for _ in range(2):  # warm-up: allocations, kernel selection for this shape
            fn(inputs[name], t)
    _sync(device)
    calls: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(inputs[name], t)
            _sync(device)
            calls[name].append(time.perf_counter() - start)
    out = {}
    for name, seconds in calls.items():
        median, fastest = float(np.median(seconds)), float(np.min(seconds))
        out[name] = {"seconds_per_call": median, "seconds_per_call_min": fastest, "repeats": repeats,
                     "image_forwards_per_second": batch_size / median,
                     "image_forwards_per_second_best": batch_size / fastest}
    return out


# ----------------------------------------------------------------------------- profile

_LAYER_KINDS = {"Conv2d": "convolution", "ExactConv2d": "convolution", "GroupNorm": "GroupNorm",
                "ExactGroupNorm": "GroupNorm", "SiLU": "SiLU", "ExactSiLU": "SiLU", "Attention": "attention",
                "ExactAttention": "attention", "Linear": "linear", "ExactLinear": "linear"}
_CONTRACT2_PARTS = {"products": ("diffcodec.exact2_products", "IntConv", "products"),
                    "GroupNorm + SiLU + quantize": ("diffcodec.exact2_kernels", None, "group_norm_operand"),
                    "epilogues": ("diffcodec.exact2_kernels", None, "epilogue"),
                    "quantize (other inputs)": ("diffcodec.exact2_kernels", None, "quantize_dynamic"),
                    "softmax weights": ("diffcodec.exact2_kernels", None, "softmax_weights")}


@contextmanager
def _timed_functions(acc: dict[str, float]):
    """Wrap contract 2's kernels so that each call's wall time adds to ``acc[part]``."""
    import importlib

    saved = []
    for part, (module_name, cls_name, attr) in _CONTRACT2_PARTS.items():
        owner = importlib.import_module(module_name)
        owner = getattr(owner, cls_name) if cls_name else owner
        original = getattr(owner, attr)

        def wrapper(*args, _f=original, _part=part, **kwargs):
            start = time.perf_counter()
            try:
                return _f(*args, **kwargs)
            finally:
                acc[_part] += time.perf_counter() - start

        setattr(owner, attr, wrapper)
        saved.append((owner, attr, original))
    try:
        yield
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)


@contextmanager
def _timed_layers(net: torch.nn.Module, acc: dict[str, float]):
    """Forward hooks adding each leaf layer's wall time to ``acc[layer kind]``."""
    starts: dict[int, float] = {}
    handles = []
    for module in net.modules():
        kind = _LAYER_KINDS.get(type(module).__name__)
        if kind is None:
            continue
        handles.append(module.register_forward_pre_hook(lambda m, a: starts.__setitem__(id(m), time.perf_counter())))
        handles.append(module.register_forward_hook(
            lambda m, a, o, k=kind: acc.__setitem__(k, acc[k] + time.perf_counter() - starts.pop(id(m)))))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def profile(model: torch.nn.Module, batch_size: int, *, in_channels: int, image_size: int, num_timesteps: int,
            repeats: int, device: torch.device) -> dict[str, Any]:
    """Where each network's time goes (module docstring): seconds per call by part."""
    from diffcodec.runtime import exact_network_of

    x, t = _inputs(batch_size, in_channels, image_size, num_timesteps, device, 0)
    nets = {"float32": model.to(device).eval(), "exact1": exact_network_of(model, 1).to(device),
            "exact2": exact_network_of(model, 2).to(device)}
    out: dict[str, Any] = {}
    with torch.inference_mode():
        for name, net in nets.items():
            arg = x.double() if name != "float32" else x
            net(arg, t)
            acc: dict[str, float] = defaultdict(float)
            ctx = _timed_functions(acc) if name == "exact2" else _timed_layers(net, acc)
            with ctx:
                _sync(device)
                start = time.perf_counter()
                for _ in range(repeats):
                    net(arg, t)
                _sync(device)
                total = (time.perf_counter() - start) / repeats
            parts = {k: v / repeats for k, v in sorted(acc.items(), key=lambda kv: -kv[1])}
            parts["other (Python, small torch operations, attention products)" if name == "exact2" else "other"] = \
                max(0.0, total - sum(parts.values()))
            out[name] = {"seconds_per_call": total, "parts": parts}
    return out


def format_profile(prof: dict[str, Any]) -> str:
    lines = []
    for name, rec in prof.items():
        total = rec["seconds_per_call"]
        lines.append(f"{LABELS[name]}: {total * 1e3:.1f} ms per call")
        lines += [f"  {part:<40} {sec * 1e3:8.1f} ms  {100 * sec / total:5.1f}%" for part, sec in rec["parts"].items()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ memory

_MEMORY_SCRIPT = r"""
import json, sys, torch
from diffcodec.checkpoint import load_checkpoint
from diffcodec.runtime import network
name, batch, checkpoint = sys.argv[1], int(sys.argv[2]), sys.argv[3] or None
def peak_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
loaded = load_checkpoint(checkpoint)
kw = {"float32": {}, "float64": {"float64": True}, "exact1": {"exact": True, "contract": 1},
      "exact2": {"exact": True, "contract": 2}}[name]
fn = network(loaded.model, **kw)
mc = loaded.model_config
x = torch.randn(batch, mc.in_channels, mc.image_size, mc.image_size)
x = x.double() if name == "float64" else x
before = peak_mib()
fn(x, torch.randint(0, 1000, (batch,)))
print(json.dumps({"peak_mib": peak_mib(), "peak_mib_before_call": before}))
"""


# Where the memory goes (Linux, glibc): resident memory after the build and after a first
# batch-1 call, each read after malloc_trim (so that freed heap memory glibc keeps does not
# count), then the peak of one call at the batch size over a reset peak (/proc/self/clear_refs).
_BREAKDOWN_SCRIPT = r"""
import ctypes, json, sys, torch
from diffcodec.checkpoint import load_checkpoint
from diffcodec.runtime import network
name, batch, checkpoint = sys.argv[1], int(sys.argv[2]), sys.argv[3] or None
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
def resident():
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return status("VmRSS:")
loaded = load_checkpoint(checkpoint)
fn = network(loaded.model, **({} if name == "float32" else {"exact": True, "contract": 2}))
mc = loaded.model_config
x = lambda b: torch.randn(b, mc.in_channels, mc.image_size, mc.image_size)
built = resident()
fn(x(1), torch.randint(0, 1000, (1,)))
first = resident()
open("/proc/self/clear_refs", "w").write("5")
fn(x(batch), torch.randint(0, 1000, (batch,)))
print(json.dumps({"built_mib": built, "after_first_call_mib": first, "call_peak_mib": status("VmHWM:")}))
"""
BREAKDOWN_RUNS = {"float32": {}, "exact2": {}, "exact2, DIFFCODEC_NO_NATIVE=1": {"DIFFCODEC_NO_NATIVE": "1"},
                  "exact2, DIFFCODEC_NO_INT8=1": {"DIFFCODEC_NO_INT8": "1"}}


def _run_script(script: str, args: list[str], env: dict[str, str], what: str) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise DiffcodecError(f"memory of {what}: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory(batch_size: int, checkpoint: str | None, threads: int) -> dict[str, dict[str, float]]:
    """Peak resident memory (MiB) of each network in a fresh process: load, build, one call."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO_ROOT)}
    out = {name: _run_script(_MEMORY_SCRIPT, [name, str(batch_size), checkpoint or ""], env, name)
           for name in NETWORKS}
    base = out["float32"]["peak_mib"]
    for rec in out.values():
        rec["ratio_vs_float32"] = rec["peak_mib"] / base
    return out


def memory_breakdown(batch_size: int, checkpoint: str | None, threads: int) -> dict[str, dict[str, float]]:
    """`_BREAKDOWN_SCRIPT` for float32 and contract 2 (also without the C kernels, and without the int8
    products), one fresh process each; {} where /proc/self/clear_refs is missing (not Linux)."""
    if not Path("/proc/self/clear_refs").exists():
        return {}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO_ROOT)}
    return {name: _run_script(_BREAKDOWN_SCRIPT, ["float32" if name == "float32" else "exact2", str(batch_size),
                                                  checkpoint or ""], {**env, **extra}, name)
            for name, extra in BREAKDOWN_RUNS.items()}


# ------------------------------------------------------------------------------- output


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per (threads, batch): image-forwards/s of each network and the ratios."""
    names = list(rows[0]["networks"]) if rows else list(NETWORKS)
    head = f"{'threads':>7} {'batch':>5}  " + "  ".join(f"{name + ' fwd/s':>13}" for name in names) + \
        f"  {'c2/float32':>10}  {'c2/c1':>6}"
    lines = [head, "-" * len(head)]
    for row in rows:
        rates = "  ".join(f"{row['networks'][name]['image_forwards_per_second']:>13.2f}" for name in names)
        lines.append(f"{row['threads']:>7} {row['batch_size']:>5}  {rates}  "
                     f"{row['contract2_speed_vs_float32']:>10.2f}  {row['contract2_speed_vs_contract1']:>6.2f}")
    return "\n".join(lines)


def markdown(payload: dict[str, Any]) -> str:
    names = list(payload["rows"][0]["networks"]) if payload["rows"] else list(NETWORKS)
    lines = ["<!-- generated by bench/exact_speed.py; do not edit -->",
             f"Device: {payload['device']}; torch {payload['torch']}; {payload['image_size']}x"
             f"{payload['image_size']} inputs. Command: `{payload['provenance'].get('command')}`", "",
             "| threads | batch | " + " | ".join(f"{LABELS[n]} (fwd/s)" for n in names) +
             " | contract 2 / float32 (target) | contract 2 / contract 1 |",
             "|---" * (len(names) + 4) + "|"]
    for row in payload["rows"]:
        target = TARGETS.get(row["batch_size"])
        ratio = row["contract2_speed_vs_float32"]
        mark = "" if target is None else f" (>= {target}: {'met' if ratio >= target else 'not met'})"
        lines.append(f"| {row['threads']} | {row['batch_size']} | " +
                     " | ".join(f"{row['networks'][n]['image_forwards_per_second']:.2f}" for n in names) +
                     f" | **{ratio:.2f}**{mark} | {row['contract2_speed_vs_contract1']:.2f}x |")
    if payload.get("profile"):
        lines += ["", f"Where the time goes (batch {payload['profile_batch_size']}, "
                      f"{payload['profile_threads']} thread(s), ms per call):", "", "```",
                  format_profile(payload["profile"]), "```"]
    if payload.get("memory"):
        lines += ["", f"Peak resident memory, one process per network (load, build, one call at batch "
                      f"{payload['memory_batch_size']}):", "",
                  "| network | peak MiB | / float32 |", "|---|---|---|"]
        lines += [f"| {LABELS[n]} | {rec['peak_mib']:.0f} | {rec['ratio_vs_float32']:.2f} |"
                  for n, rec in payload["memory"].items()]
    if payload.get("memory_breakdown"):
        lines += ["", "Where it goes (one process each; resident MiB after glibc's malloc_trim, then the peak of "
                      f"one batch {payload['memory_batch_size']} call):", "",
                  "| network | after the build | after a first batch-1 call | batch call's peak |", "|---|---|---|---|"]
        lines += [f"| {n} | {r['built_mib']:.0f} | {r['after_first_call_mib']:.0f} | {r['call_peak_mib']:.0f} |"
                  for n, r in payload["memory_breakdown"].items()]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.exact_speed", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", "-c", help="checkpoint (default: the embedded default model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--batch-sizes", "--batch-size", dest="batch_sizes", default="1,16",
                   help="comma-separated batch sizes (default 1,16)")
    p.add_argument("--threads", default=None, help="comma-separated torch CPU thread counts (default: torch's)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per network and batch size (default 5)")
    p.add_argument("--profile", action="store_true", help="also break each network's time down by part")
    p.add_argument("--memory", action="store_true", help="also measure each network's peak memory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPORTS_DIR / "exact_speed.json"),
                   help="output JSON (default reports/exact_speed.json; the markdown table beside it)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = module_command("bench.exact_speed", argv)
    batch_sizes = int_list(args.batch_sizes, "--batch-sizes")
    threads = int_list(args.threads, "--threads") if args.threads else [torch.get_num_threads()]
    if min(batch_sizes) < 1 or args.repeats < 1 or min(threads) < 1:
        raise DiffcodecError("batch sizes, thread counts and --repeats must be positive")
    device = pick_device(args.device)
    loaded = load_checkpoint(args.checkpoint, device=device)
    mc = loaded.model_config
    fns = build_networks(loaded.model, device)
    shape = {"in_channels": mc.in_channels, "image_size": mc.image_size,
             "num_timesteps": loaded.diffusion_config.num_timesteps}
    rows: list[dict[str, Any]] = []
    for n_threads in threads:
        use_threads(n_threads)
        for b in batch_sizes:
            nets = time_networks(fns, b, repeats=args.repeats, device=device, seed=args.seed, **shape)
            speed = {name: rec["image_forwards_per_second"] for name, rec in nets.items()}
            rows.append({"threads": n_threads, "batch_size": b, "networks": nets,
                         "contract2_speed_vs_float32": speed["exact2"] / speed["float32"],
                         "contract2_speed_vs_contract1": speed["exact2"] / speed["exact1"],
                         "target_vs_float32": TARGETS.get(b)})
            print(f"threads {n_threads}, B={b}: " +
                  ", ".join(f"{name} {speed[name]:.2f}" for name in nets) + " image-forwards/s", file=sys.stderr)
    payload = {"kind": "exact_speed", "image_size": mc.image_size, "device": device_string(device),
               "torch": torch.__version__, "rows": rows}
    if args.profile:
        use_threads(threads[0])
        payload.update(profile_batch_size=max(batch_sizes), profile_threads=threads[0],
                       profile=profile(loaded.model, max(batch_sizes), repeats=args.repeats, device=device, **shape))
    if args.memory:
        payload.update(memory_batch_size=max(batch_sizes), memory=memory(max(batch_sizes), args.checkpoint, threads[0]),
                       memory_breakdown=memory_breakdown(max(batch_sizes), args.checkpoint, threads[0]))
    payload["provenance"] = provenance(args, loaded, args.seed, device=device, command=command)
    print(format_table(rows))
    if args.profile:
        print(format_profile(payload["profile"]))
    out = write_json(Path(args.out), payload)
    Path(out).with_suffix(".md").write_text(markdown(payload))
    print(f"wrote {out} and its .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
