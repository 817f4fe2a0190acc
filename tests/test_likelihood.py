"""Bound terms against closed forms: KL, the discretized decoder, an analytic denoiser."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from diffcodec.likelihood import (
    BoundResult,
    bound_bits,
    discretized_gaussian_log_likelihood_nats,
    discretized_gaussian_probs,
    evaluate_bound,
    merge_rows,
    normal_kl_nats,
    prior_bits,
    summarize,
)
from diffcodec.schedule import make_schedule, respace


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


def test_prior_term_closed_form():
    s = make_schedule("linear", 1000)
    x0 = torch.tensor([[[[0.5]]], [[[-1.0]]]], dtype=torch.float64)
    abar = s.alphas_cumprod[-1]
    expected = [0.5 * (abar * v**2 + (1 - abar) - 1 - math.log(1 - abar)) / math.log(2) for v in (0.5, -1.0)]
    assert np.allclose(prior_bits(s, x0).numpy(), expected, rtol=1e-9)


class GaussianDenoiser:
    """The Bayes-optimal eps prediction when every x_0 coordinate is N(m, v) (no clipping)."""

    def __init__(self, s, m, v):
        self.s, self.m, self.v = s, m, v

    def __call__(self, x_t, t):
        abar = torch.from_numpy(self.s.alphas_cumprod)[t].reshape(-1, 1, 1, 1).to(x_t.dtype)
        a, b2 = abar.sqrt(), 1 - abar
        x0_mean = self.m + self.v * a * (x_t - a * self.m) / (abar * self.v + b2)
        return (x_t - a * x0_mean) / b2.sqrt()


@pytest.mark.parametrize("var_type", ["fixedsmall", "fixedlarge"])
def test_bound_of_an_analytic_denoiser_matches_its_closed_form(var_type):
    """E[L_{t-1}] = coef1^2 Var(x_0 | x_t) / (2 sigma_p^2) + Gaussian variance mismatch, per dim."""
    full = make_schedule("linear", 1000)
    s = respace(full, 40)
    m, v = 0.1, 0.09
    g = torch.Generator().manual_seed(3)
    x0 = m + math.sqrt(v) * torch.randn(512, 3, 4, 4, generator=g, dtype=torch.float64)
    # the network is called with ORIGINAL timesteps, so it uses the full schedule's alpha-bars
    result = bound_bits(GaussianDenoiser(full, m, v), s, x0, var_type=var_type, generator=g, clip_denoised=False)
    abar = s.alphas_cumprod
    var_x0_given_xt = v * (1 - abar) / (abar * v + 1 - abar)
    from diffcodec.diffusion import fixed_log_variance

    sigma_p2 = np.exp(fixed_log_variance(s, var_type))[1:]
    ratio = s.posterior_variance[1:] / sigma_p2
    kl = np.zeros(s.num_steps)
    kl[1:] = (s.posterior_mean_coef1[1:] ** 2 * var_x0_given_xt[1:] / (2 * sigma_p2)
              + 0.5 * (ratio - 1 - np.log(ratio)))
    expected_bits = kl * 48 / math.log(2)
    measured = result.terms_bits[:, 1:].mean(axis=0)
    stderr = result.terms_bits[:, 1:].std(axis=0) / math.sqrt(512)
    assert np.all(np.abs(measured - expected_bits[1:]) < 5 * stderr + 1e-9)
    total_kl_se = result.terms_bits[:, 1:].sum(1).std() / math.sqrt(512)
    assert result.terms_bits[:, 1:].sum(1).mean() == pytest.approx(expected_bits.sum(), abs=4 * total_kl_se)
    prior_expected = 0.5 * (abar[-1] * (m**2 + v) + 1 - abar[-1] - 1 - math.log(1 - abar[-1])) * 48 / math.log(2)
    assert result.prior_bits.mean() == pytest.approx(prior_expected, rel=0.05)


def test_total_is_prior_plus_terms_and_the_summary_adds_up():
    s = make_schedule("linear", 1000)
    s = respace(s, 25)

    def zero_eps(x, t):
        return torch.zeros_like(x)

    g = torch.Generator().manual_seed(4)
    x0 = (torch.randint(0, 256, (6, 3, 4, 4), generator=g).double() / 127.5) - 1
    batches = [x0[:4], x0[4:]]
    r = evaluate_bound(zero_eps, s, batches, var_type="fixedlarge", seed=7)
    assert r.terms_bits.shape == (6, 25) and np.all(r.terms_bits >= 0)
    assert np.allclose(r.total_bits, r.prior_bits + r.terms_bits.sum(1))
    summary = summarize(r)
    assert summary.total_bpd == pytest.approx(summary.prior_bpd + summary.kl_bpd + summary.decoder_bpd, rel=1e-12)
    assert summary.total_bpd == pytest.approx((r.total_bits / 48).mean())
    again = evaluate_bound(zero_eps, s, batches, var_type="fixedlarge", seed=7)
    assert np.array_equal(again.terms_bits, r.terms_bits)  # reproducible with a seed
    other = evaluate_bound(zero_eps, s, batches, var_type="fixedlarge", seed=8)
    assert not np.array_equal(other.terms_bits, r.terms_bits)


def test_merge_rows_sums_tiles_and_divides_by_real_dims():
    r = BoundResult(prior_bits=np.array([1.0, 2.0, 3.0]), terms_bits=np.ones((3, 2)), xstart_mse=np.array([[1.0, 2], [3, 4], [5, 6]]),
                    timesteps=np.array([0, 1]), num_dims=np.array([48, 48, 48]))
    m = merge_rows(r, [np.array([0, 1]), np.array([2])], np.array([80, 48]))
    assert np.allclose(m.total_bits, [7.0, 5.0])
    assert np.allclose(m.total_bpd, [7.0 / 80, 5.0 / 48])
    assert np.allclose(m.xstart_mse[0], [2.0, 3.0])
