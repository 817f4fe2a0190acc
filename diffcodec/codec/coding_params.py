"""From the network's output to the numbers the entropy coder sees: snapped coding parameters.

Encoder and decoder must hand the coder identical means and stds, so each parameter is
computed in float64 and then snapped to a grid of 2^snap_log2 (`snap`): two machines whose
float64 results differ far below the grid then agree exactly (rarely at a grid boundary
they do not). Under the exact contract (`diffcodec.exact`) the values snapped are the same
bits on every machine to begin with, so the snap only sets the coder's resolution.

The pixel stage, x_0 given x_1, is the paper's discretized Gaussian decoder L_0
(`losses.discretized_gaussian_log_likelihood_nats`): bins of width 2/255 around the 256
levels of [-1, 1], the edge bins taking the tails. The coder's `entropy` QuantizedGaussian
on the integers 0..255 is that decoder when its mean and std are in level units,
(mean + 1) 127.5 and std 127.5 (`pixel_params`). Each codec's file format fixes the clip
range of the mean and the floor of the std (`PixelRule`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from diffcodec import exact
from diffcodec.losses import NUM_LEVELS

HALF_LEVELS = (NUM_LEVELS - 1) / 2.0  # 127.5: [-1, 1] <-> 0..255, a bin of width 2/255 <-> one level


def snap(values: np.ndarray, log2_step: int) -> np.ndarray:
    """float64 values rounded (half to even) to the nearest multiple of 2^log2_step.

    Exact in float64 while |values| * 2^-log2_step < 2^52; used so that encoder and decoder
    pass identical parameters to the coder even if the values came from float32 arithmetic.
    """
    scale = float(2.0 ** (-log2_step))
    return np.rint(np.asarray(values, dtype=np.float64) * scale) / scale


def snapped_std(std: np.ndarray, snap_log2: int, floor: float) -> np.ndarray:
    """A std snapped to its grid, never below ``floor`` (a coder needs std > 0)."""
    return np.maximum(snap(std, snap_log2), floor)


def levels_to_unit(levels: np.ndarray) -> np.ndarray:
    """Integer levels 0..255 -> float64 on [-1, 1] (level / 127.5 - 1)."""
    return levels.astype(np.float64) / HALF_LEVELS - 1.0


@dataclass(frozen=True)
class PixelRule:
    """What a file format fixes about its pixel stage: the clip range of the snapped mean
    and the floor of the snapped std, in level units."""

    mean_lo: float
    mean_hi: float
    std_floor: float | None  # None: 2^snap_log2, one step of the snap grid


def std_of(log_variance: torch.Tensor, exact_contract: bool) -> torch.Tensor:
    """exp(log_variance / 2) in float64 on the CPU: by `exact.exp` under the exact contract,
    else torch's exp (files written without the contract decode as they were written)."""
    half = 0.5 * log_variance.detach().to(device="cpu", dtype=torch.float64)
    return exact.exp(half) if exact_contract else torch.exp(half)


def pixel_params(mean: torch.Tensor, log_variance: torch.Tensor, snap_log2: int,
                 rule: PixelRule, *, exact_contract: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """p_theta(x_0 | x_1) as the coder's QuantizedGaussian on 0..255: float64 [D] mean and
    std in level units, snapped, clipped and floored by ``rule`` (tensors [B,C,H,W] in
    the [-1, 1] scale, any dtype or device; computed in float64 on the CPU)."""
    mean64 = mean.detach().to(device="cpu", dtype=torch.float64)
    std64 = std_of(log_variance, exact_contract)
    level_mean = snap((mean64.numpy().ravel() + 1.0) * HALF_LEVELS, snap_log2)
    floor = 2.0**snap_log2 if rule.std_floor is None else rule.std_floor
    return np.clip(level_mean, rule.mean_lo, rule.mean_hi), snapped_std(std64.numpy().ravel() * HALF_LEVELS,
                                                                        snap_log2, floor)
