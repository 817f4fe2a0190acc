"""The `nll` job: the bound of a set of images under a checkpoint, batched, with progress.

Images whose size is not the model's are cut into model-size tiles (`images.to_tiles`,
edge padding at the bottom/right); an image's bits are the sum over its tiles and its
bits/dim divide by its real dimensions, so padding costs bits but adds no dimensions —
what a codec that sends the tiles pays.

Under ``torchrun`` (`distributed`) the batches are shared out in contiguous blocks, one per
rank, and the per-image results gathered on rank 0. Each tile's noise depends only on the
seed and its (image, tile) index (`likelihood.ImageNoise`), and the batches are the same
whatever the number of ranks, so every rank count gives the same numbers, bit for bit, as
one process with the same ``--batch-size`` (with another batch size: the same noise, and
float network outputs that may differ in the last bits).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from diffcodec import distributed
from diffcodec.checkpoint import LoadedModel
from diffcodec.data import ImageSet
from diffcodec.images import image_tiles, to_model_input
from diffcodec.likelihood import (
    BoundResult,
    evaluate_bound,
    importance_proposal,
    merge_rows,
    pilot_steps,
    pilot_terms_bits,
    tile_keys,
)
from diffcodec.runtime import device_string, network
from diffcodec.schedule import Schedule
from diffcodec.timesteps import chain_schedule

PILOT_IMAGES = 16  # tiles whose mean L_t shapes the proposal of --t-samples
PILOT_STEPS = 48  # code steps the pilot measures (dense near t = 0)
PILOT_SEED_OFFSET = 1_000_003  # the pilot's noise: one generator seeded seed + this (the images' are per tile)


def model_schedule(loaded: LoadedModel, steps: int | None, spacing: str = "uniform") -> Schedule:
    """The model's schedule, respaced to ``steps`` when given (`timesteps.respace`)."""
    dc = loaded.diffusion_config
    return chain_schedule(dc.schedule, dc.num_timesteps, steps, spacing)


@dataclass(frozen=True)
class NllRun:
    result: BoundResult | None  # one row per image (None on ranks other than 0)
    schedule: Schedule
    num_tiles: int
    seconds: float
    device: str  # 'cpu', 'cuda:0'
    device_name: str  # `device_string`: 'cpu: <model> (2 cores, 1 torch thread)', 'cuda:0: <GPU name>'
    t_samples: int | None = None  # KL terms drawn per image (None: the whole chain summed)
    world_size: int = 1  # processes that shared the work (torchrun)


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
    world: distributed.World = distributed.SINGLE,
) -> NllRun:
    """The bound of every image in ``images`` (see the module docstring); under torchrun,
    ``world`` shares the batches out, and only rank 0 gets the result.

    With ``t_samples`` = n, each image's KL terms are estimated without bias from n drawn
    steps (``likelihood``, Monte Carlo over timesteps) after a pilot on the first
    ``PILOT_IMAGES`` tiles at ``PILOT_STEPS`` steps: 1 + n network calls per image, not K.
    """
    schedule = model_schedule(loaded, steps, spacing)
    tiles, groups, dims = image_tiles(images.images, loaded.model_config.image_size)
    keys = tile_keys(groups, len(tiles))
    starts = range(0, len(tiles), batch_size)
    mine = distributed.shard(len(starts), world)  # this rank's batches: rows lo..hi-1
    lo, hi = (starts[mine.start], min(starts[mine.stop - 1] + batch_size, len(tiles))) if len(mine) else (0, 0)
    batches = [to_model_input(tiles[i : i + batch_size]) for i in range(lo, hi, batch_size)]
    model_fn = network(loaded.model, bf16=bf16)
    var_type = loaded.diffusion_config.var_type
    sampled = t_samples is not None and schedule.num_steps > 1
    grid = pilot_steps(schedule.num_steps, PILOT_STEPS) if sampled and world.is_main else np.zeros(0, dtype=np.int64)
    calls_per_batch = 1 + t_samples if sampled else schedule.num_steps
    start = time.perf_counter()
    with tqdm(total=len(batches) * calls_per_batch + len(grid), unit="call", desc="nll",
              disable=not (progress and world.is_main),
              dynamic_ncols=True, leave=False, mininterval=0.1 if sys.stderr.isatty() else 10.0) as bar:
        proposal = None
        if sampled:  # rank 0's pilot shapes every rank's proposal
            if world.is_main:
                pilot = to_model_input(tiles[:PILOT_IMAGES]).to(device)
                generator = torch.Generator(device=device).manual_seed(seed + PILOT_SEED_OFFSET)
                grid_bits = pilot_terms_bits(model_fn, schedule, pilot, grid, var_type=var_type, generator=generator,
                                             on_step=lambda: bar.update(1))
                proposal = importance_proposal(grid, grid_bits, schedule.num_steps)
            proposal = distributed.broadcast(proposal, world)
        part = evaluate_bound(
            model_fn, schedule, batches, var_type=var_type, seed=seed, device=device,
            on_step=lambda: bar.update(1), proposal=proposal, num_samples=t_samples or 0, keys=keys[lo:hi],
        ) if batches else None
    if device.type == "cuda":
        torch.cuda.synchronize()
    parts = distributed.gather(part, world)
    seconds = time.perf_counter() - start
    if parts is None:
        return NllRun(None, schedule, len(tiles), seconds, str(device), device_string(device),
                      t_samples if sampled else None, world.size)
    result = BoundResult.concatenate([p for p in parts if p is not None])
    per_image = merge_rows(result, groups, dims)
    return NllRun(per_image, schedule, len(tiles), seconds, str(device), device_string(device),
                  t_samples if sampled else None, world.size)


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
