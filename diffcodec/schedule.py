"""Noise schedules: beta_t in float64 and the quantities derived from it.

Indexing: code step ``t`` is 0-based and paper step ``t`` is code ``t + 1``. So code
``betas[0]`` is the paper's beta_1, the decoder term L_0 = -log p(x_0 | x_1) is evaluated at
code t = 0, and the prior term L_T sits after the last code step T - 1.

A respaced schedule (``timesteps.respace``) keeps K of the original T steps: ``timesteps``
holds the ORIGINAL timestep of each code step, the one the network is called with.

Arrays are computed once in float64 numpy; they are cast to the tensor's dtype only when a
value is gathered (see ``diffusion.extract``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from diffcodec.errors import DiffcodecError


def linear_betas(num_timesteps: int) -> np.ndarray:
    """The paper's linear schedule, 1e-4 .. 0.02 at T = 1000, scaled as 1000/T for other T."""
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Improved DDPM's cosine schedule: abar(t) = cos^2(((t/T + s)/(1 + s)) pi/2)."""

    def abar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    steps = np.arange(num_timesteps, dtype=np.float64)
    betas = [
        min(1 - abar((i + 1) / num_timesteps) / abar(i / num_timesteps), max_beta) for i in steps
    ]
    return np.asarray(betas, dtype=np.float64)


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
        log_clipped = np.log(np.append(post_var[1], post_var[1:]) if len(betas) > 1 else betas)
        set_ = object.__setattr__
        set_(self, "betas", betas)
        set_(self, "timesteps", np.asarray(self.timesteps, dtype=np.int64))
        set_(self, "alphas_cumprod", abar)
        set_(self, "alphas_cumprod_prev", abar_prev)
        set_(self, "posterior_variance", post_var)
        set_(self, "posterior_log_variance_clipped", log_clipped)
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
