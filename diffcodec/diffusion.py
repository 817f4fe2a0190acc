"""Gaussian diffusion algebra as free functions over (schedule, tensors).

No network calls and no hidden randomness: functions take the network's OUTPUT and the
noise they need. Shapes: images are [B, C, H, W]; ``t`` is int64 [B] of CODE steps of the
schedule (0-based, see ``schedule``). Variances are per element, natural log where logged.

Reverse-variance types (``VAR_TYPES``, names written into checkpoints):
- ``fixedlarge``: sigma_t^2 = beta_t, except posterior variance beta~ at the first step
  (the paper's choice; the decoder std at t = 1 is sqrt(beta~_2)).
- ``fixedsmall``: sigma_t^2 = beta~_t (the posterior variance, clipped at t = 1).
- ``learned_range``: Improved DDPM; the network's extra channels v in [-1, 1] interpolate
  log sigma^2 = frac log beta_t + (1 - frac) log beta~_t with frac = (v + 1) / 2.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from diffcodec.schedule import Schedule

VAR_TYPES = ("fixedlarge", "fixedsmall", "learned_range")


_DEVICE_COPIES: dict[tuple[bytes, str], torch.Tensor] = {}


def _on_device(arr: np.ndarray, device: torch.device) -> torch.Tensor:
    """A float64 [K] array as a tensor on ``device``; GPU copies are cached by content, since a
    copy from host memory makes the host wait for the GPU (one wait per call would serialise
    every training and evaluation step)."""
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if device.type == "cpu":
        return torch.from_numpy(arr)
    key = (hashlib.blake2b(arr.tobytes(), digest_size=16).digest(), str(device))
    cached = _DEVICE_COPIES.get(key)
    if cached is None:
        if len(_DEVICE_COPIES) > 512:
            _DEVICE_COPIES.clear()
        cached = _DEVICE_COPIES[key] = torch.from_numpy(arr).to(device)
    return cached


def extract(arr: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """arr[t] gathered from a float64 [K] array, cast to like's dtype/device, shape [B,1,1,1]."""
    values = _on_device(arr, t.device)[t]
    return values.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def q_step_coefficients(s: Schedule, k: int) -> tuple[float, float]:
    """q(x_{k+1} | x_k) = N(sqrt(1 - beta_{k+1}) x_k, beta_{k+1} I) at code step k (paper
    indices): (sqrt(1 - beta), sqrt(beta)) as Python floats (correctly rounded float64)."""
    beta = float(s.betas[k])
    return math.sqrt(1.0 - beta), math.sqrt(beta)


def q_mean_variance(
    s: Schedule, x0: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I): mean, variance, log variance."""
    mean = extract(np.sqrt(s.alphas_cumprod), t, x0) * x0
    var = extract(1.0 - s.alphas_cumprod, t, x0).expand_as(x0)
    log_var = extract(s.log_one_minus_alphas_cumprod, t, x0).expand_as(x0)
    return mean, var, log_var


def q_sample(s: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Draw x_t ~ q(x_t | x_0) as sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
    return (
        extract(np.sqrt(s.alphas_cumprod), t, x0) * x0
        + extract(np.sqrt(1.0 - s.alphas_cumprod), t, x0) * noise
    )


def q_posterior_mean_variance(
    s: Schedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q(x_{t-1} | x_t, x_0) (paper indices): mean, variance, clipped log variance."""
    mean = extract(s.posterior_mean_coef1, t, x_t) * x0 + extract(s.posterior_mean_coef2, t, x_t) * x_t
    var = extract(s.posterior_variance, t, x_t).expand_as(x_t)
    log_var = extract(s.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
    return mean, var, log_var


def predict_xstart_from_eps(
    s: Schedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """x^_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    return (
        extract(np.sqrt(1.0 / s.alphas_cumprod), t, x_t) * x_t
        - extract(np.sqrt(1.0 / s.alphas_cumprod - 1.0), t, x_t) * eps
    )


def predict_eps_from_xstart(
    s: Schedule, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor
) -> torch.Tensor:
    """The eps for which predict_xstart_from_eps gives x0."""
    return (extract(np.sqrt(1.0 / s.alphas_cumprod), t, x_t) * x_t - x0) / extract(
        np.sqrt(1.0 / s.alphas_cumprod - 1.0), t, x_t
    )


def fixed_log_variance(s: Schedule, var_type: str) -> np.ndarray:
    """float64 [K] log sigma_t^2 for the fixed variance types."""
    if var_type == "fixedlarge":
        if s.num_steps == 1:
            return s.log_betas
        return np.append(s.posterior_log_variance_clipped[0], s.log_betas[1:])
    if var_type == "fixedsmall":
        return s.posterior_log_variance_clipped
    raise ValueError(f"{var_type!r} is not a fixed variance type")


def split_model_output(output: torch.Tensor, var_type: str, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Network output [B, C or 2C, H, W] -> (eps [B,C,H,W], v [B,C,H,W] or None)."""
    if var_type == "learned_range":
        if output.shape[1] != 2 * channels:
            raise ValueError(f"learned_range needs {2 * channels} output channels, got {output.shape[1]}")
        return output[:, :channels], output[:, channels:]
    if output.shape[1] != channels:
        raise ValueError(f"{var_type} needs {channels} output channels, got {output.shape[1]}")
    return output, None


@dataclass(frozen=True)
class PMeanVariance:
    """p_theta(x_{t-1} | x_t) (paper indices) and what it was formed from. All [B,C,H,W]."""

    mean: torch.Tensor
    log_variance: torch.Tensor
    pred_xstart: torch.Tensor  # clipped to [-1, 1] when clip_denoised
    eps: torch.Tensor


def p_xstart(s: Schedule, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *, var_type: str,
             clip_denoised: bool = True) -> torch.Tensor:
    """x^_0 from the network's output, clipped to [-1, 1] when ``clip_denoised``: `p_mean_variance`'s
    pred_xstart alone (what a reconstruction needs; none of the step's other D-value arrays)."""
    eps, _ = split_model_output(output, var_type, x_t.shape[1])
    pred_xstart = predict_xstart_from_eps(s, x_t, t, eps)
    return pred_xstart.clamp(-1.0, 1.0) if clip_denoised else pred_xstart


def p_mean_variance(
    s: Schedule,
    output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    *,
    var_type: str,
    clip_denoised: bool = True,
) -> PMeanVariance:
    """The reverse step from the network's output (eps-prediction, with v if learned)."""
    eps, v = split_model_output(output, var_type, x_t.shape[1])
    if var_type == "learned_range":
        min_log = extract(s.posterior_log_variance_clipped, t, x_t)
        max_log = extract(s.log_betas, t, x_t)
        frac = (v + 1.0) / 2.0
        log_variance = frac * max_log + (1.0 - frac) * min_log
    else:
        log_variance = extract(fixed_log_variance(s, var_type), t, x_t).expand_as(x_t)
    pred_xstart = p_xstart(s, output, x_t, t, var_type=var_type, clip_denoised=clip_denoised)
    mean, _, _ = q_posterior_mean_variance(s, pred_xstart, x_t, t)
    return PMeanVariance(mean=mean, log_variance=log_variance, pred_xstart=pred_xstart, eps=eps)
