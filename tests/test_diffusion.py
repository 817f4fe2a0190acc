"""The Gaussian algebra against closed forms, Monte-Carlo and Bayes' rule (float64)."""

import numpy as np
import pytest
import torch

from diffcodec.diffusion import (
    fixed_log_variance,
    p_mean_variance,
    predict_eps_from_xstart,
    predict_xstart_from_eps,
    q_posterior_mean_variance,
    q_sample,
)
from diffcodec.schedule import make_schedule


def test_q_sample_matches_iterating_the_forward_chain():
    """q(x_t | x_0) in closed form against t steps of q(x_t | x_{t-1}), by Monte-Carlo."""
    s = make_schedule("linear", 1000)
    g = torch.Generator().manual_seed(0)
    n, k = 200_000, 300
    x0 = torch.full((n, 1, 1, 1), 0.7, dtype=torch.float64)
    x = x0.clone()
    for step in range(k + 1):
        x = np.sqrt(1 - s.betas[step]) * x + np.sqrt(s.betas[step]) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    t = torch.full((n,), k)
    direct = q_sample(s, x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    mean, var = np.sqrt(s.alphas_cumprod[k]) * 0.7, 1 - s.alphas_cumprod[k]
    se_mean = np.sqrt(var / n)
    for sample in (x, direct):
        assert float(sample.mean()) == pytest.approx(mean, abs=5 * se_mean)
        assert float(sample.var()) == pytest.approx(var, rel=5 * np.sqrt(2 / n))


def test_posterior_matches_bayes_rule_on_a_grid():
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0), integrated numerically."""
    s = make_schedule("linear", 1000)
    k, x0_val, xt_val = 40, -0.3, 0.25
    grid = np.linspace(-3, 3, 600_001)
    beta, abar_prev = s.betas[k], s.alphas_cumprod[k - 1]
    log_lik = -((xt_val - np.sqrt(1 - beta) * grid) ** 2) / (2 * beta)
    log_prior = -((grid - np.sqrt(abar_prev) * x0_val) ** 2) / (2 * (1 - abar_prev))
    w = np.exp(log_lik + log_prior - (log_lik + log_prior).max())
    w /= w.sum()
    mean_bayes = (w * grid).sum()
    var_bayes = (w * (grid - mean_bayes) ** 2).sum()
    t = torch.tensor([k])
    mean, var, log_var = q_posterior_mean_variance(
        s, torch.full((1, 1, 1, 1), x0_val, dtype=torch.float64), torch.full((1, 1, 1, 1), xt_val, dtype=torch.float64), t
    )
    assert float(mean) == pytest.approx(mean_bayes, abs=1e-9)
    assert float(var) == pytest.approx(var_bayes, rel=1e-6)
    assert float(log_var) == pytest.approx(np.log(var_bayes), abs=1e-6)


def test_xstart_and_eps_predictions_invert_q_sample():
    s = make_schedule("cosine", 100)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 5, 50, 99])
    x_t = q_sample(s, x0, t, eps)
    assert torch.allclose(predict_xstart_from_eps(s, x_t, t, eps), x0, atol=1e-9)
    assert torch.allclose(predict_eps_from_xstart(s, x_t, t, x0), eps, atol=1e-9)


def test_true_eps_gives_the_posterior_and_each_variance_type():
    s = make_schedule("linear", 1000)
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(3, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 999])
    x_t = q_sample(s, x0, t, eps)
    q_mean, _, _ = q_posterior_mean_variance(s, x0, x_t, t)
    for var_type, expected in [
        ("fixedsmall", s.posterior_log_variance_clipped[t.numpy()]),
        ("fixedlarge", np.log(np.r_[s.posterior_variance[1], s.betas[1], s.betas[999]])),
    ]:
        p = p_mean_variance(s, eps, x_t, t, var_type=var_type, clip_denoised=False)
        assert torch.allclose(p.mean, q_mean, atol=1e-9)
        assert np.allclose(p.log_variance[:, 0, 0, 0].numpy(), expected)
    assert np.allclose(fixed_log_variance(s, "fixedlarge")[2:], np.log(s.betas[2:]))
    # learned_range: v = -1 gives the posterior variance, v = +1 gives beta_t
    for v, expected in [(-1.0, s.posterior_log_variance_clipped), (1.0, np.log(s.betas))]:
        out = torch.cat([eps, torch.full_like(eps, v)], dim=1)
        p = p_mean_variance(s, out, x_t, t, var_type="learned_range", clip_denoised=False)
        assert np.allclose(p.log_variance[:, 0, 0, 0].numpy(), expected[t.numpy()])


def test_clip_denoised_clips_the_xstart_prediction():
    s = make_schedule("linear", 1000)
    x_t = torch.full((1, 3, 2, 2), 3.0)
    p = p_mean_variance(s, torch.zeros_like(x_t), x_t, torch.tensor([10]), var_type="fixedlarge")
    assert float(p.pred_xstart.max()) == 1.0
    with pytest.raises(ValueError, match="output channels"):
        p_mean_variance(s, torch.zeros(1, 6, 2, 2), x_t, torch.tensor([10]), var_type="fixedlarge")
