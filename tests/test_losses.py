"""The likelihood primitives against independent references: sampling, scipy, closed forms."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from diffcodec.losses import (
    BIN_HALF_WIDTH,
    LN2,
    NUM_LEVELS,
    discretized_gaussian_log_likelihood_nats,
    flat_mean,
    flat_sum,
    normal_kl_nats,
)


def test_normal_kl_matches_a_sampled_estimate():
    g = torch.Generator().manual_seed(0)
    m1, lv1, m2, lv2 = 0.3, math.log(0.5), -0.2, math.log(1.7)
    z = m1 + math.exp(lv1 / 2) * torch.randn(1_000_000, generator=g, dtype=torch.float64)
    log_q = -0.5 * (lv1 + (z - m1) ** 2 / math.exp(lv1))
    log_p = -0.5 * (lv2 + (z - m2) ** 2 / math.exp(lv2))
    sampled = float((log_q - log_p).mean())
    se = float((log_q - log_p).std()) / 1000
    closed = float(normal_kl_nats(*(torch.tensor(v, dtype=torch.float64) for v in (m1, lv1, m2, lv2))))
    assert closed == pytest.approx(sampled, abs=4 * se)
    assert float(normal_kl_nats(torch.tensor(0.1), torch.tensor(0.2), torch.tensor(0.1), torch.tensor(0.2))) == 0.0


def discretized_gaussian_probs(mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """The 256 bin probabilities of each element: [...] -> [..., 256] (float64)."""
    levels = torch.linspace(-1.0, 1.0, NUM_LEVELS, dtype=torch.float64)
    log_p = discretized_gaussian_log_likelihood_nats(
        levels.expand(*mean.shape, NUM_LEVELS), mean=mean.double().unsqueeze(-1), log_scale=log_scale.double().unsqueeze(-1)
    )
    return torch.exp(log_p)


@pytest.mark.parametrize("mean,std_levels", [(0.0, 0.94), (0.99, 0.5), (-1.3, 3.0), (0.2, 1e-3), (0.5, 400.0)])
def test_decoder_probabilities_sum_to_one_and_match_scipy(mean, std_levels):
    log_scale = torch.tensor(math.log(std_levels / 127.5), dtype=torch.float64)
    probs = discretized_gaussian_probs(torch.tensor(mean, dtype=torch.float64), log_scale)
    assert probs.shape == (256,)
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-9)
    edges = (np.arange(1, 256) - 128) / 127.5  # level i sits at (i - 127.5) / 127.5; boundaries halfway
    cdf = norm.cdf(edges, loc=mean, scale=std_levels / 127.5)
    expected = np.diff(np.r_[0.0, cdf, 1.0])
    assert np.allclose(probs.numpy(), expected, atol=1e-12)


def test_decoder_log_likelihood_is_accurate_far_in_the_tails():
    # a bin 40 standard deviations from the mean: the naive cdf difference underflows to 0
    x = torch.tensor([0.5], dtype=torch.float64)
    mean = torch.tensor([0.5 - 40 * 0.01], dtype=torch.float64)
    log_p = discretized_gaussian_log_likelihood_nats(x, mean=mean, log_scale=torch.log(torch.tensor([0.01], dtype=torch.float64)))
    expected = norm.logsf((x - 1 / 255 - mean).item() / 0.01) + np.log1p(-np.exp(norm.logsf((x + 1 / 255 - mean).item() / 0.01) - norm.logsf((x - 1 / 255 - mean).item() / 0.01)))
    assert float(log_p) == pytest.approx(expected, rel=1e-6)


def test_decoder_log_likelihood_is_differentiable_in_mean_and_scale():
    x = torch.tensor([-1.0, 0.2, 1.0], dtype=torch.float64)
    mean = torch.tensor([-0.9, 0.25, 0.8], dtype=torch.float64, requires_grad=True)
    log_scale = torch.full((3,), math.log(0.05), dtype=torch.float64, requires_grad=True)
    log_p = discretized_gaussian_log_likelihood_nats(x, mean=mean, log_scale=log_scale)
    log_p.sum().backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(log_scale.grad).all()
    assert mean.grad[1] < 0  # the mean 0.25 moves toward x = 0.2


def test_constants_and_flat_reductions():
    assert NUM_LEVELS == 256 and BIN_HALF_WIDTH == pytest.approx(1 / 255) and LN2 == pytest.approx(math.log(2))
    x = torch.arange(24, dtype=torch.float64).reshape(2, 3, 2, 2)
    assert flat_sum(x).tolist() == [66.0, 210.0]
    assert flat_mean(x).tolist() == [5.5, 17.5]
