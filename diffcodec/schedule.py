"""Noise schedules: beta_t in float64 and the quantities derived from it.

Indexing: code step ``t`` is 0-based and paper step ``t`` is code ``t + 1``. So code
``betas[0]`` is the paper's beta_1, the decoder term L_0 = -log p(x_0 | x_1) is evaluated at
code t = 0, and the prior term L_T sits after the last code step T - 1.

A respaced schedule (``timesteps.respace``) keeps K of the original T steps: ``timesteps``
holds the ORIGINAL timestep of each code step, the one the network is called with.

Arrays are computed once in float64 numpy; they are cast to the tensor's dtype only when a
value is gathered (see ``diffusion.extract``). They are under the exact arithmetic contract
(`diffcodec.exact`): the cosine and the logs come from the basic operations, never from
libm, so a coder's decoder on any machine derives the same bits from the schedule's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from diffcodec import exact
from diffcodec.errors import DiffcodecError

PI = 3.141592653589793  # a literal: the same bits everywhere


def exact_log(values: np.ndarray) -> np.ndarray:
    """float64 natural log by `exact.log` (basic operations only)."""
    return exact.log(torch.from_numpy(np.asarray(values, dtype=np.float64))).numpy()


def linear_betas(num_timesteps: int) -> np.ndarray:
    """The paper's linear schedule, 1e-4 .. 0.02 at T = 1000, scaled as 1000/T for other T."""
    scale = 1000.0 / num_timesteps
    start, stop = scale * 1e-4, scale * 0.02
    if num_timesteps == 1:
        return np.array([start])
    betas = start + np.arange(num_timesteps, dtype=np.float64) * ((stop - start) / (num_timesteps - 1))
    betas[-1] = stop
    return betas


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Improved DDPM's cosine schedule: abar(t) = cos^2(((t/T + s)/(1 + s)) pi/2)."""

    u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    _, cos = exact.sin_cos(torch.from_numpy((u + s) / (1 + s) * PI / 2))
    abar = (cos * cos).numpy()
    return np.minimum(1 - abar[1:] / abar[:-1], max_beta)


# Append-only: these names are written into checkpoints and coded files.
SCHEDULES: dict[str, Callable[[int], np.ndarray]] = {
    "linear": linear_betas,
    "cosine": cosine_betas,
}


@dataclass(frozen=True, eq=False)
class Schedule:
    """A (possibly respaced) discrete-time Gaussian diffusion. All arrays are float64 [K]."""

    name: str
    betas: np.ndarray
    timesteps: np.ndarray  # int64 [K]: the original (network) timestep of each code step
    num_original_timesteps: int
    alphas_cumprod: np.ndarray = field(init=False)
    alphas_cumprod_prev: np.ndarray = field(init=False)
    posterior_variance: np.ndarray = field(init=False)
    posterior_log_variance_clipped: np.ndarray = field(init=False)
    log_betas: np.ndarray = field(init=False)
    log_one_minus_alphas_cumprod: np.ndarray = field(init=False)
    posterior_mean_coef1: np.ndarray = field(init=False)  # multiplies x_0
    posterior_mean_coef2: np.ndarray = field(init=False)  # multiplies x_t

    def __post_init__(self) -> None:
        betas = np.asarray(self.betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 1 or not np.all((betas > 0) & (betas <= 1)):
            raise ValueError("betas must be a 1-D array in (0, 1]")
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        # post_var[0] is 0; the clipped log uses post_var[1] there (as the reference code).
        log_clipped = exact_log(np.append(post_var[1], post_var[1:]) if len(betas) > 1 else betas)
        set_ = object.__setattr__
        set_(self, "betas", betas)
        set_(self, "timesteps", np.asarray(self.timesteps, dtype=np.int64))
        set_(self, "alphas_cumprod", abar)
        set_(self, "alphas_cumprod_prev", abar_prev)
        set_(self, "posterior_variance", post_var)
        set_(self, "posterior_log_variance_clipped", log_clipped)
        set_(self, "log_betas", exact_log(betas))
        set_(self, "log_one_minus_alphas_cumprod", exact_log(1.0 - abar))
        set_(self, "posterior_mean_coef1", betas * np.sqrt(abar_prev) / (1.0 - abar))
        set_(self, "posterior_mean_coef2", (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar))

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    @property
    def is_respaced(self) -> bool:
        return self.num_steps != self.num_original_timesteps


def make_schedule(name: str, num_timesteps: int) -> Schedule:
    """The named schedule with T = num_timesteps steps."""
    if name not in SCHEDULES:
        raise DiffcodecError(f"unknown noise schedule {name!r}; known: {', '.join(SCHEDULES)}")
    if num_timesteps < 1:
        raise DiffcodecError(f"number of timesteps must be >= 1, got {num_timesteps}")
    betas = SCHEDULES[name](num_timesteps)
    return Schedule(name, betas, np.arange(num_timesteps), num_timesteps)
