"""Hostile model files for ``--checkpoint``: a valid tiny diffusers folder written without the
diffusers package, helpers to edit its JSON and its safetensors header, and a runner that runs
every case in ONE fresh Python process (``python -m tests.hostile CASES.json``), so that each
refusal's seconds and the process's peak resident memory after it are measured, which an
in-process test cannot do (tests/test_external_hostile.py, tests/test_fuzz_external.py).

A case is ``{"argv": [...]}`` (``diffcodec.cli.main``, stdout and stderr captured) or
``{"load": path}`` (``load_checkpoint``: the fingerprint, or the error). A result adds
``seconds`` and ``peak_mb`` (the process's peak resident memory after the case; with torch
imported it starts at ~250 MB) and, for an exception other than DiffcodecError, ``crash``.
"""

from __future__ import annotations

import io
import json
import os
import resource
import struct
import subprocess
import sys
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

# A tiny paper-like UNet2DModel config with every key diffusers 0.2x writes (single-head
# attention at the second level, GroupNorm eps 1e-6, end-padded downsampling, [sin, cos]).
TINY_UNET = {
    "_class_name": "UNet2DModel", "_diffusers_version": "0.24.0", "act_fn": "silu", "add_attention": True,
    "attention_head_dim": None, "attn_norm_num_groups": None, "block_out_channels": [32, 64],
    "center_input_sample": False, "class_embed_type": None, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "downsample_padding": 0, "downsample_type": "conv", "dropout": 0.0, "flip_sin_to_cos": False, "freq_shift": 1,
    "in_channels": 3, "layers_per_block": 1, "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32,
    "num_class_embeds": None, "num_train_timesteps": None, "out_channels": 3, "resnet_time_scale_shift": "default",
    "sample_size": 16, "time_embedding_dim": None, "time_embedding_type": "positional",
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "upsample_type": "conv",
}
TINY_SCHEDULER = {
    "_class_name": "DDPMScheduler", "_diffusers_version": "0.24.0", "beta_end": 0.02, "beta_schedule": "linear",
    "beta_start": 0.0001, "clip_sample": True, "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.995,
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0, "steps_offset": 0, "thresholding": False, "timestep_spacing": "leading",
    "trained_betas": None, "variance_type": "fixed_large",
}
UNET_CONFIG = "unet/config.json"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def write_json(path: Path, value: dict) -> None:
    """As diffusers' save_pretrained writes a config: sorted keys, indent 2, a final newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def write_tiny_diffusers_folder(folder: Path, seed: int = 0) -> Path:
    """A pipeline folder of TINY_UNET (every tensor drawn from N(0, 0.1^2), seeded) and
    TINY_SCHEDULER; diffusers' own UNet2DModel reads it (tests/test_external_diffusers.py)."""
    from safetensors.torch import save_file

    from diffcodec.external.diffusers import model_config_from_unet, source_shapes
    from diffcodec.unet import parameter_shapes

    config, attn = model_config_from_unet(TINY_UNET, folder / UNET_CONFIG)
    rng = np.random.default_rng(seed)
    shapes = source_shapes(config, attn, parameter_shapes(config))
    tensors = {name: torch.from_numpy(rng.normal(0.0, 0.1, shape).astype(np.float32))
               for name, shape in sorted(shapes.items())}
    write_json(folder / UNET_CONFIG, TINY_UNET)
    write_json(folder / SCHEDULER_CONFIG, TINY_SCHEDULER)
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    return folder


def copy_folder(src: Path, dst: Path, replace: dict[str, bytes] | None = None) -> Path:
    """A copy of the folder ``src`` (hard links: nothing is written twice) with the files in
    ``replace`` (relative path -> bytes) written in its place."""
    replace = replace or {}
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src).as_posix()
        target = dst / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif rel not in replace:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
    for rel, data in replace.items():
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).write_bytes(data)
    return dst


def safetensors_parts(path: Path) -> tuple[str, bytes]:
    """(the header's JSON text, the data after it) of a safetensors file."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return data[8:8 + n].decode(), data[8 + n:]


def safetensors_bytes(header: str | bytes, body: bytes) -> bytes:
    raw = header.encode() if isinstance(header, str) else header
    return struct.pack("<Q", len(raw)) + raw + body


def peak_mb() -> float:
    """This process's peak resident memory: VmHWM, which starts afresh at exec (ru_maxrss does
    not: a child spawned by a 600 MB pytest worker would start at 600 MB)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024
    except (OSError, StopIteration):  # not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(case: dict) -> dict:
    """One case in this process (see the module docstring)."""
    from diffcodec.checkpoint import load_checkpoint
    from diffcodec.cli import main
    from diffcodec.errors import DiffcodecError

    result: dict = {}
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    try:
        if "argv" in case:
            with redirect_stdout(out), redirect_stderr(err):
                result["code"] = main(case["argv"])
        else:
            result["fingerprint"] = load_checkpoint(case["load"]).fingerprint
    except DiffcodecError as e:
        result["error"] = str(e)
    except BaseException as e:  # noqa: BLE001 - what the tests look for: a traceback
        result["crash"] = "".join(traceback.format_exception_only(type(e), e))[-500:]
    result |= {"out": out.getvalue(), "err": err.getvalue(), "seconds": time.perf_counter() - start,
               "peak_mb": peak_mb()}
    return result


def run_isolated(cases: list[dict], workdir: Path, timeout: float = 150) -> list[dict]:
    """``cases`` run one after another in one fresh process (one torch thread); their results."""
    spec = workdir / "cases.json"
    spec.write_text(json.dumps(cases))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "tests.hostile", str(spec)], cwd=REPO, env=env, timeout=timeout,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    assert len(results) == len(cases)
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps([run_case(case) for case in json.loads(Path(sys.argv[1]).read_text())]))
