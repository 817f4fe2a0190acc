"""The early-refusal probe of exact-contract files: one network call both sides can make first.

An exact-contract file (`container`, contract >= 1) carries `container.PROBE_BYTES` of a
hash of what the encoder's exact network and coding arithmetic give on a fixed input: one
tile of seeded pixels at the middle timestep, through the network (`exact_net`), the
reverse-process parameters (`diffusion.p_mean_variance`) and the std the coders use
(`exact.exp`). A decoder computes the same hash before decoding anything: a difference
(another diffcodec's arithmetic, weights changed in memory, a broken kernel) is refused in
about a second with a message that says so, instead of after the whole decode.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from diffcodec import exact
from diffcodec.codec.container import PROBE_BYTES
from diffcodec.config import DiffusionConfig
from diffcodec.diffusion import p_mean_variance
from diffcodec.errors import DiffcodecError
from diffcodec.runtime import ModelFn
from diffcodec.schedule import make_schedule

PROBE_SEED = 0x9E0B5  # the probe input's generator seed


def probe_input(tile_size: int, channels: int = 3) -> torch.Tensor:
    """The fixed probe tile: float64 [1, C, s, s] of exact values k / 128 - 1, k in 0..255."""
    raw = np.random.PCG64(PROBE_SEED).random_raw(channels * tile_size * tile_size) & np.uint64(0xFF)
    return torch.from_numpy(raw.astype(np.float64) / 128.0 - 1.0).reshape(1, channels, tile_size, tile_size)


def probe_digest(model_fn: ModelFn, diffusion: DiffusionConfig, tile_size: int,
                 device: torch.device | str = "cpu") -> bytes:
    """PROBE_BYTES of BLAKE2b over the exact network's output on `probe_input` at t = T // 2,
    the reverse step's mean and log variance, and its std as the coders form it."""
    schedule = make_schedule(diffusion.schedule, diffusion.num_timesteps)
    x = probe_input(tile_size)
    t = torch.tensor([diffusion.num_timesteps // 2], dtype=torch.long)
    output = model_fn(x.to(device), t.to(device)).detach().to("cpu", torch.float64)
    p = p_mean_variance(schedule, output, x, t, var_type=diffusion.var_type, clip_denoised=True)
    h = hashlib.blake2b(digest_size=PROBE_BYTES)
    for value in (output, p.mean, p.log_variance, exact.exp(0.5 * p.log_variance)):
        h.update(value.contiguous().numpy().astype("<f8").tobytes())
    return h.digest()


def check_probe(expected: bytes, model_fn: ModelFn, diffusion: DiffusionConfig, tile_size: int,
                device: torch.device | str, where: str) -> None:
    """Refuse (one line) when this decoder's exact arithmetic does not reproduce the encoder's."""
    got = probe_digest(model_fn, diffusion, tile_size, device)
    if got != expected:
        raise DiffcodecError(
            f"{where}: refused before decoding: this decoder's exact network gives probe {got.hex()}, the encoder's "
            f"gave {expected.hex()} (same model fingerprint, different arithmetic: another diffcodec version, or "
            "weights changed after loading); nothing decoded")
