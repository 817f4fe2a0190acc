"""The `nll` job: the bound of a set of images under a checkpoint, batched, with progress.

Images whose size is not the model's are cut into model-size tiles (``data.to_tiles``,
edge padding at the bottom/right); an image's bits are the sum over its tiles and its
bits/dim divide by its real dimensions, so padding costs bits but adds no dimensions —
what a codec that sends the tiles pays.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from diffcodec.checkpoint import LoadedModel
from diffcodec.data import ImageSet, to_model_input, to_tiles
from diffcodec.errors import DiffcodecError
from diffcodec.likelihood import (
    BoundResult,
    evaluate_bound,
    importance_proposal,
    merge_rows,
    pilot_steps,
    pilot_terms_bits,
)
from diffcodec.schedule import Schedule, make_schedule, respace


PILOT_IMAGES = 16  # tiles whose mean L_t shapes the proposal of --t-samples
PILOT_STEPS = 48  # code steps the pilot measures (dense near t = 0)
PILOT_SEED_OFFSET = 1_000_003  # the pilot's noise is not any batch's (batch i uses seed + i)


def usable_cores() -> int:
    """CPU cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def cpu_name() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_string(device: torch.device | str = "cpu") -> str:
    """'cpu: AMD EPYC (2 cores, 2 torch threads)' or 'cuda:0: NVIDIA H100 80GB HBM3'."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index}: {torch.cuda.get_device_name(index)}"
    threads = torch.get_num_threads()
    return f"cpu: {cpu_name()} ({usable_cores()} cores, {threads} torch thread{'s' if threads != 1 else ''})"


def pick_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DiffcodecError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DiffcodecError(f"device {name!r} requested but no CUDA GPU is available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise DiffcodecError(f"device type {device.type!r} is not supported; use cpu or cuda")
    return device


def model_schedule(loaded: LoadedModel, steps: int | None, spacing: str = "uniform") -> Schedule:
    """The model's schedule, respaced to ``steps`` when given (``schedule.respace``)."""
    dc = loaded.diffusion_config
    schedule = make_schedule(dc.schedule, dc.num_timesteps)
    return respace(schedule, steps, spacing) if steps is not None else schedule


def model_fn_of(model: torch.nn.Module, *, bf16: bool = False):
    """Wrap a network as the ``ModelFn`` the likelihood code calls, without autograd;
    ``bf16``: under bfloat16 autocast on CUDA, output cast back to float32."""

    @torch.inference_mode()
    def call(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not bf16:
            return model(x_t, t)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(x_t, t).float()

    return call


@dataclass(frozen=True)
class NllRun:
    result: BoundResult  # one row per image
    schedule: Schedule
    num_tiles: int
    seconds: float
    device: str  # 'cpu', 'cuda:0'
    device_name: str  # `device_string`: 'cpu: <model> (2 cores, 1 torch thread)', 'cuda:0: <GPU name>'
    t_samples: int | None = None  # KL terms drawn per image (None: the whole chain summed)


def image_tiles(images: ImageSet, tile: int) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """All tiles uint8 [M, tile, tile, 3], each image's tile rows, each image's real dims."""
    tiles, groups, dims, start = [], [], [], 0
    for img in images.images:
        t = img[None] if img.shape[:2] == (tile, tile) else to_tiles(img, tile)
        tiles.append(t)
        groups.append(np.arange(start, start + len(t)))
        dims.append(img.size)
        start += len(t)
    return np.concatenate(tiles), groups, np.array(dims, dtype=np.int64)


def run_nll(
    loaded: LoadedModel,
    images: ImageSet,
    *,
    steps: int | None = None,
    spacing: str = "uniform",
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device,
    progress: bool = True,
    bf16: bool = False,
    t_samples: int | None = None,
) -> NllRun:
    """The bound of every image in ``images`` (see the module docstring).

    With ``t_samples`` = n, each image's KL terms are estimated without bias from n drawn
    steps (``likelihood``, Monte Carlo over timesteps) after a pilot on the first
    ``PILOT_IMAGES`` tiles at ``PILOT_STEPS`` steps: 1 + n network calls per image, not K.
    """
    schedule = model_schedule(loaded, steps, spacing)
    tiles, groups, dims = image_tiles(images, loaded.model_config.image_size)
    batches = [to_model_input(tiles[i : i + batch_size]) for i in range(0, len(tiles), batch_size)]
    model_fn = model_fn_of(loaded.model, bf16=bf16)
    var_type = loaded.diffusion_config.var_type
    sampled = t_samples is not None and schedule.num_steps > 1
    grid = pilot_steps(schedule.num_steps, PILOT_STEPS) if sampled else np.zeros(0, dtype=np.int64)
    calls_per_batch = 1 + t_samples if sampled else schedule.num_steps
    start = time.perf_counter()
    with tqdm(total=len(batches) * calls_per_batch + len(grid), unit="call", desc="nll", disable=not progress,
              dynamic_ncols=True, leave=False, mininterval=0.1 if sys.stderr.isatty() else 10.0) as bar:
        proposal = None
        if sampled:
            pilot = to_model_input(tiles[:PILOT_IMAGES]).to(device)
            generator = torch.Generator(device=device).manual_seed(seed + PILOT_SEED_OFFSET)
            grid_bits = pilot_terms_bits(model_fn, schedule, pilot, grid, var_type=var_type, generator=generator,
                                         on_step=lambda: bar.update(1))
            proposal = importance_proposal(grid, grid_bits, schedule.num_steps)
        result = evaluate_bound(
            model_fn, schedule, batches, var_type=var_type, seed=seed, device=device,
            on_step=lambda: bar.update(1), proposal=proposal, num_samples=t_samples or 0,
        )
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    per_image = merge_rows(result, groups, dims)
    return NllRun(per_image, schedule, len(tiles), seconds, str(device), device_string(device),
                  t_samples if sampled else None)


TERM_GROUPS = ((0, 1), (1, 10), (10, 100), (100, None))


def grouped_terms_bpd(result: BoundResult) -> dict[str, float]:
    """Mean bits/dim of L_0, L_1..L_9, L_10..L_99, L_100.. and the prior, keyed by name.

    Groups are by ORIGINAL timestep (paper L_k at original step k), so respaced chains are
    comparable with the full one.
    """
    out = {}
    t = result.timesteps
    for lo, hi in TERM_GROUPS:
        cols = (t >= lo) & (t < (hi if hi is not None else np.iinfo(np.int64).max))
        name = "L_0" if (lo, hi) == (0, 1) else f"L_{lo}..L_{hi - 1}" if hi else f"L_{lo}..L_T-1"
        out[name] = float((result.terms_bits[:, cols].sum(axis=1) / result.num_dims).mean())
    out["L_T"] = float((result.prior_bits / result.num_dims).mean())
    return out
