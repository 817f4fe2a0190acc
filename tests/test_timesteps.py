"""Tests for diffcodec.timesteps: one integer rule per spacing, respaced chains, the legacy rule."""

import numpy as np
import pytest

from diffcodec.errors import DiffcodecError
from diffcodec.schedule import make_schedule
from diffcodec.timesteps import SPACINGS, chain_schedule, kept_timesteps, respace


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


def test_bad_spacing_arguments_are_user_errors():
    with pytest.raises(DiffcodecError, match="between 1 and T"):
        kept_timesteps(10, 11)
    with pytest.raises(DiffcodecError, match="unknown spacing"):
        kept_timesteps(10, 5, "cubic")


def test_quadratic_respacing_is_dense_near_zero_and_keeps_the_ends():
    base = make_schedule("cosine", 1000)
    for k in (2, 10, 50, 100, 999, 1000):
        ts = kept_timesteps(1000, k, "quadratic")
        assert len(ts) == k and ts[0] == 0 and ts[-1] == 999 and np.all(np.diff(ts) >= 1)
    q = respace(base, 100, "quadratic")
    u = respace(base, 100, "uniform")
    assert np.sum(q.timesteps < 100) > 3 * np.sum(u.timesteps < 100)
    # kept alpha-bars are the original ones, so the chain ends where the original does
    assert np.allclose(q.alphas_cumprod, base.alphas_cumprod[q.timesteps])
    with pytest.raises(DiffcodecError):
        respace(base, 10, "cubic")


def test_uniform_is_the_integer_rule_and_the_legacy_rule_differs_only_at_ties():
    """uniform: k (T-1)/(K-1) rounded half up, in integers; numpy's rounded linspace (what
    bits-back files of diffcodec 0.1 recorded as code 0) rounds ties to even, after float error."""
    for T, K in [(1000, 7), (1000, 13), (1000, 25), (1000, 10), (1000, 100), (4000, 31)]:
        k = np.arange(K)
        exact = k * (T - 1) / (K - 1)
        ts = kept_timesteps(T, K, "uniform")
        assert np.array_equal(ts, np.floor(exact + 0.5).astype(np.int64))
        legacy = kept_timesteps(T, K, "uniform-linspace")
        assert np.array_equal(legacy, np.round(np.linspace(0, T - 1, K)).astype(np.int64))
        differ = ts != legacy
        assert np.all(np.abs(ts - legacy) <= 1) and np.all(exact[differ] % 1 == 0.5)
    assert not np.array_equal(kept_timesteps(1000, 7), kept_timesteps(1000, 7, "uniform-linspace"))
    for K in (10, 20, 50, 100, 1000):  # the chains the reports used are the same under both
        assert np.array_equal(kept_timesteps(1000, K), kept_timesteps(1000, K, "uniform-linspace"))


@pytest.mark.parametrize("spacing", SPACINGS)
def test_every_spacing_keeps_distinct_steps_with_both_ends(spacing):
    for T, K in [(1000, 30), (1000, 2), (50, 50), (10, 7), (4000, 4000)]:
        ts = kept_timesteps(T, K, spacing)
        assert len(ts) == K and ts[0] == 0 and ts[-1] == T - 1 and np.all(np.diff(ts) > 0)
    assert np.array_equal(kept_timesteps(1000, 1, spacing), [999])
    s = chain_schedule("cosine", 1000, 30, spacing)
    assert np.array_equal(s.timesteps, kept_timesteps(1000, 30, spacing)) and chain_schedule("cosine", 1000).num_steps == 1000
