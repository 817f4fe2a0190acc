import numpy as np
import pytest

from diffcodec.errors import DiffcodecError
from diffcodec.schedule import make_schedule, respace, respaced_timesteps


def test_linear_schedule_is_the_papers():
    s = make_schedule("linear", 1000)
    assert s.num_steps == 1000
    assert s.betas[0] == pytest.approx(1e-4) and s.betas[-1] == pytest.approx(0.02)
    assert s.betas.dtype == np.float64
    # fixedlarge's decoder std at paper t = 1 is sqrt(beta~_2) = 0.9415 pixel levels (DESIGN.md)
    assert np.sqrt(s.posterior_variance[1]) * 127.5 == pytest.approx(0.9415, abs=1e-4)


def test_alphas_cumprod_is_the_product_of_alphas():
    s = make_schedule("cosine", 50)
    assert np.allclose(s.alphas_cumprod, [np.prod(1 - s.betas[: k + 1]) for k in range(50)], rtol=1e-12)
    assert np.all(np.diff(s.alphas_cumprod) < 0)
    assert np.all(s.betas <= 0.999)


def test_posterior_coefficients_match_their_definitions():
    s = make_schedule("linear", 100)
    k = 37
    abar, abar_prev, beta = s.alphas_cumprod[k], s.alphas_cumprod[k - 1], s.betas[k]
    assert s.posterior_variance[k] == pytest.approx(beta * (1 - abar_prev) / (1 - abar), rel=1e-12)
    assert s.posterior_mean_coef1[k] == pytest.approx(beta * np.sqrt(abar_prev) / (1 - abar), rel=1e-12)
    assert s.posterior_mean_coef2[k] == pytest.approx((1 - abar_prev) * np.sqrt(1 - beta) / (1 - abar), rel=1e-12)
    assert s.posterior_variance[0] == 0.0
    assert s.posterior_log_variance_clipped[0] == s.posterior_log_variance_clipped[1]


@pytest.mark.parametrize("k", [1, 2, 10, 100, 999, 1000])
def test_respacing_keeps_alpha_bars_at_the_kept_steps(k):
    s = make_schedule("linear", 1000)
    r = respace(s, k)
    assert r.num_steps == k and r.num_original_timesteps == 1000
    assert np.all(np.diff(r.timesteps) > 0)
    assert np.allclose(r.alphas_cumprod, s.alphas_cumprod[r.timesteps], rtol=1e-12)
    if k > 1:
        assert r.timesteps[0] == 0 and r.timesteps[-1] == 999
    assert r.is_respaced == (k != 1000)


def test_bad_schedule_arguments_are_user_errors():
    with pytest.raises(DiffcodecError, match="unknown noise schedule"):
        make_schedule("quadratic", 10)
    with pytest.raises(DiffcodecError, match="between 1 and T"):
        respaced_timesteps(10, 11)


def test_quadratic_respacing_is_dense_near_zero_and_keeps_the_ends():
    from diffcodec.schedule import quadratic_timesteps, respace

    base = make_schedule("cosine", 1000)
    for k in (2, 10, 50, 100, 999, 1000):
        ts = quadratic_timesteps(1000, k)
        assert len(ts) == k and ts[0] == 0 and ts[-1] == 999 and np.all(np.diff(ts) >= 1)
    q = respace(base, 100, "quadratic")
    u = respace(base, 100, "uniform")
    assert np.sum(q.timesteps < 100) > 3 * np.sum(u.timesteps < 100)
    # kept alpha-bars are the original ones, so the chain ends where the original does
    assert np.allclose(q.alphas_cumprod, base.alphas_cumprod[q.timesteps])
    with pytest.raises(DiffcodecError):
        respace(base, 10, "cubic")
