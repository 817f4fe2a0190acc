import numpy as np
import pytest

from diffcodec.errors import DiffcodecError
from diffcodec.schedule import make_schedule


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


def test_bad_schedule_name_is_a_user_error():
    with pytest.raises(DiffcodecError, match="unknown noise schedule"):
        make_schedule("quadratic", 10)
