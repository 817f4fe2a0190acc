"""Which of the model's T steps a K-step chain keeps: the one place spacings are defined.

A respaced chain keeps K of the original T steps (``kept_timesteps``, increasing; always
T - 1, and 0 when K > 1) and recomputes its betas so that its alpha-bars equal the
original's at those steps: 1 - beta'_k = abar[t_k] / abar[t_{k-1}] (`keep_timesteps`). The
network is always called with the ORIGINAL timestep t_k. The bound (`likelihood`), both
codecs and the benchmarks respace through `respace` here, so one spacing name means one
set of steps everywhere.

Spacings (integer arithmetic only, so an encoder and a decoder agree exactly):

- ``uniform``:   t_k = floor((k (T - 1) + floor((K - 1) / 2)) / (K - 1)), i.e. k (T-1)/(K-1)
                 rounded half up. Consecutive values differ by at least 1 since T >= K.
- ``quadratic``: t_k = round(k^2 (T - 1) / (K - 1)^2) (half up), then pushed apart to be
                 distinct and at most T - 1: dense near t = 0, where the bits are.

Legacy, decode only (``LEGACY_SPACINGS``): ``uniform-linspace`` is what bits-back files of
diffcodec 0.1 (spacing byte 0) and the bound used for "uniform": numpy's
round(linspace(0, T - 1, K)) in float64, which differs from the integer rule at ties
(T = 1000: K = 7, 13, 19, 25, ...; never at K = 10, 20, 50, 100, 1000). It is kept so that
those files decode exactly; nothing new is written with it.
"""

from __future__ import annotations

import numpy as np

from diffcodec.errors import DiffcodecError
from diffcodec.schedule import Schedule, make_schedule

SPACINGS = ("uniform", "quadratic")  # what a user can choose
LEGACY_SPACINGS = ("uniform-linspace",)  # read from old files only


def kept_timesteps(num_timesteps: int, num_steps: int, spacing: str = "uniform") -> np.ndarray:
    """K increasing original timesteps in 0..T-1 (int64 [K]) for a spacing (module docstring)."""
    if spacing not in SPACINGS + LEGACY_SPACINGS:
        raise DiffcodecError(f"unknown spacing {spacing!r}; known: {', '.join(SPACINGS)}")
    if not 1 <= num_steps <= num_timesteps:
        raise DiffcodecError(f"--steps must be between 1 and T = {num_timesteps}, got {num_steps}")
    if num_steps == 1:
        return np.array([num_timesteps - 1], dtype=np.int64)
    k = np.arange(num_steps, dtype=np.int64)
    last, span = num_steps - 1, num_timesteps - 1
    if spacing == "uniform":
        return (k * span + last // 2) // last
    if spacing == "uniform-linspace":
        return np.round(np.linspace(0, span, num_steps)).astype(np.int64)
    ts = (k**2 * span + last**2 // 2) // last**2
    for i in range(1, num_steps):  # distinct, increasing
        ts[i] = max(ts[i], ts[i - 1] + 1)
    for i in range(num_steps - 1, -1, -1):  # ... and at most T-1, with room for the steps above
        ts[i] = min(ts[i], span - (last - i))
    return ts


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


def respace(schedule: Schedule, num_steps: int, spacing: str = "uniform") -> Schedule:
    """Keep ``num_steps`` of an original schedule's steps with ``spacing`` (the schedule
    itself when num_steps = T)."""
    if schedule.is_respaced:
        raise ValueError("respace an original schedule, not a respaced one")
    return keep_timesteps(schedule, kept_timesteps(schedule.num_steps, num_steps, spacing))


def chain_schedule(name: str, num_timesteps: int, num_steps: int | None = None, spacing: str = "uniform") -> Schedule:
    """The named schedule with T steps, kept at ``num_steps`` of them (all when None)."""
    schedule = make_schedule(name, num_timesteps)
    return schedule if num_steps is None else respace(schedule, num_steps, spacing)
