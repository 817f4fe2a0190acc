"""Noise schedules: beta_t in float64, the quantities derived from it, and respacing.

Indexing: code step ``t`` is 0-based and paper step ``t`` is code ``t + 1``. So code
``betas[0]`` is the paper's beta_1, the decoder term L_0 = -log p(x_0 | x_1) is evaluated at
code t = 0, and the prior term L_T sits after the last code step T - 1.

A respaced schedule keeps K of the original T steps (``timesteps``, increasing, always
including 0) and recomputes betas so that its alpha-bars equal the original's at those
steps: 1 - beta'_k = abar[timesteps[k]] / abar[timesteps[k-1]]. The network is always called
with the ORIGINAL timestep ``timesteps[k]``.

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


def respaced_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """K evenly spread original timesteps in [0, T-1], including both ends (int64 [K])."""
    if not 1 <= num_steps <= num_timesteps:
        raise DiffcodecError(f"--steps must be between 1 and T = {num_timesteps}, got {num_steps}")
    if num_steps == 1:
        return np.array([num_timesteps - 1], dtype=np.int64)
    ts = np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int64)
    assert len(np.unique(ts)) == num_steps
    return ts


SPACINGS = ("uniform", "quadratic")


def quadratic_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """K increasing original timesteps dense near t = 0, always 0 and T-1 (int64 [K]):
    t_k = round(k^2 (T-1) / (K-1)^2), then pushed apart to be distinct. Integer arithmetic
    only, so an encoder and a decoder agree exactly."""
    if not 1 <= num_steps <= num_timesteps:
        raise DiffcodecError(f"--steps must be between 1 and T = {num_timesteps}, got {num_steps}")
    if num_steps == 1:
        return np.array([num_timesteps - 1], dtype=np.int64)
    k = np.arange(num_steps, dtype=np.int64)
    last, span = num_steps - 1, num_timesteps - 1
    ts = (k**2 * span + last**2 // 2) // last**2
    for i in range(1, num_steps):  # distinct, increasing
        ts[i] = max(ts[i], ts[i - 1] + 1)
    for i in range(num_steps - 1, -1, -1):  # ... and at most T-1, with room for the steps above
        ts[i] = min(ts[i], span - (last - i))
    return ts


def respace(schedule: Schedule, num_steps: int, spacing: str = "uniform") -> Schedule:
    """Keep ``num_steps`` of the schedule's original steps (see the module docstring):
    evenly spread (``uniform``) or dense near t = 0 (``quadratic``, where the bits are)."""
    if schedule.is_respaced:
        raise ValueError("respace an original schedule, not a respaced one")
    if spacing not in SPACINGS:
        raise DiffcodecError(f"unknown spacing {spacing!r}; known: {', '.join(SPACINGS)}")
    if num_steps == schedule.num_steps:
        return schedule
    if spacing == "quadratic":
        kept = quadratic_timesteps(schedule.num_steps, num_steps)
    else:
        kept = respaced_timesteps(schedule.num_steps, num_steps)
    return keep_timesteps(schedule, kept)


def keep_timesteps(schedule: Schedule, kept: np.ndarray) -> Schedule:
    """The chain through the original steps ``kept`` (increasing): its alpha-bars are the
    original's there, its betas 1 - abar_k / abar_{k-1}."""
    if schedule.is_respaced:
        raise ValueError("respace an original schedule, not a respaced one")
    if len(kept) == schedule.num_steps:
        return schedule
    abar = schedule.alphas_cumprod[kept]
    betas = 1.0 - abar / np.append(1.0, abar[:-1])
    return Schedule(schedule.name, betas, np.asarray(kept, dtype=np.int64), schedule.num_original_timesteps)
