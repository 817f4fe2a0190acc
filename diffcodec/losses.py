"""Per-element likelihood primitives: the Gaussian KL and the discretized Gaussian decoder.

Every term of the bound (``likelihood``), of the training losses (``train_losses``) and
of the progressive coder is written from these two equations, in nats, elementwise:

    KL(N(m1, e^lv1) || N(m2, e^lv2)) = 1/2 (-1 + lv2 - lv1 + e^(lv1 - lv2) + (m1 - m2)^2 e^(-lv2))

    log P(x) = log(Phi((x + h - mean) / s) - Phi((x - h - mean) / s)),  h = 1/255, s = e^log_scale

for x on the 256-level grid {-1, -1 + 2/255, ..., 1} of [-1, 1]: bins of width 2h around
each level, the two edge bins taking the whole tails, so the 256 probabilities sum to one.
Shapes are the caller's (broadcast elementwise); ``flat_sum`` / ``flat_mean`` reduce
[B, ...] -> [B]. Divide nats by ``LN2`` for bits.
"""

from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)
NUM_LEVELS = 256
BIN_HALF_WIDTH = 1.0 / (NUM_LEVELS - 1)  # h: half of a pixel bin on the [-1, 1] scale


def normal_kl_nats(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood_nats(
    x: torch.Tensor, *, mean: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """Elementwise log P(x) in nats (float64) for x on the 256-level grid of [-1, 1].

    Bins have width 2/255 around each level; the two edge bins take the whole tails, so the
    256 probabilities sum to one. Uses the exact normal CDF, in float64, in log space.
    """
    x64, mean64 = x.double(), mean.double()
    inv_std = torch.exp(-log_scale.double())
    upper = (x64 - mean64 + BIN_HALF_WIDTH) * inv_std
    lower = (x64 - mean64 - BIN_HALF_WIDTH) * inv_std
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)
    # Middle bins: log(Phi(b) - Phi(a)) = log Phi(b) + log(1 - e^(log Phi(a) - log Phi(b))), on
    # the side of the mean where the CDF is small, so that far tails keep their precision.
    right = lower > 0
    log_hi = torch.where(right, log_sf_lower, log_cdf_upper)
    log_lo = torch.where(right, torch.special.log_ndtr(-upper), torch.special.log_ndtr(lower))
    log_mid = log_hi + torch.log(-torch.expm1(log_lo - log_hi))
    log_p = torch.where(x64 < -0.999, log_cdf_upper, torch.where(x64 > 0.999, log_sf_lower, log_mid))
    return log_p


def flat_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over all but the batch dimension: [B, ...] -> [B]."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def flat_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension: [B, ...] -> [B]."""
    return x.reshape(x.shape[0], -1).mean(dim=1)
