"""entropy.py: round trips, bits-back restoration, validation before constriction, costs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from diffcodec.codec.entropy import (
    MAX_DOMAIN_SIZE,
    AnsStack,
    RangeDecoder,
    RangeEncoder,
    check_categorical,
    check_gaussian,
    seeded_words,
)

RNG_SEED = 1234


def gaussian_case(n: int = 500, seed: int = RNG_SEED):
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=n) * 40.0
    std = rng.uniform(0.3, 30.0, size=n)
    symbols = np.clip(np.rint(mean + std * rng.normal(size=n)), -200, 200).astype(np.int32)
    return symbols, mean, std


def test_gaussian_push_pop_round_trip():
    symbols, mean, std = gaussian_case()
    stack = AnsStack()
    stack.push_gaussian(symbols, mean, std, -200, 200)
    again = AnsStack(stack.words())  # through the serialised words
    assert np.array_equal(again.pop_gaussian(mean, std, -200, 200), symbols)
    assert again.num_valid_bits == 0


def test_gaussian_cost_matches_the_model():
    """Bits spent = -log2 of the quantized Gaussian's probabilities (edge bins take the tails)."""
    symbols, mean, std = gaussian_case(4000)
    stack = AnsStack()
    stack.push_gaussian(symbols, mean, std, -200, 200)
    lo, hi = symbols - 0.5, symbols + 0.5
    p = norm.cdf(hi, mean, std) - norm.cdf(lo, mean, std)
    p = np.where(symbols == -200, norm.cdf(-199.5, mean, std), p)
    p = np.where(symbols == 200, norm.sf(199.5, mean, std), p)
    ideal = -np.log2(p).sum()
    assert abs(stack.num_valid_bits - ideal) < 0.002 * ideal + 64


def test_pop_then_push_restores_the_stack_exactly():
    """Bits-back: decode (sample) under q, encode the same symbols back, get the same words."""
    init = seeded_words(3000, 7)
    _, mean, std = gaussian_case(2000)
    stack = AnsStack(init)
    drawn = stack.pop_gaussian(mean, std, -200, 200)
    assert stack.num_words < len(init)
    stack.push_gaussian(drawn, mean, std, -200, 200)
    assert np.array_equal(stack.words(), init)


def test_pops_from_random_words_are_samples_of_the_model():
    stack = AnsStack(seeded_words(20000, 3))
    n = 20000
    drawn = stack.pop_gaussian(np.full(n, 5.25), np.full(n, 12.0), -100, 100)
    assert abs(drawn.mean() - 5.25) < 0.5
    assert abs(drawn.std() - math.sqrt(12.0**2 + 1 / 12)) < 0.4
    # every symbol of the domain keeps >= 2^-24: a pop strays uniformly with prob ~ size x 2^-24
    wide = AnsStack(seeded_words(20000, 3)).pop_gaussian(np.full(n, 5.25), np.full(n, 12.0), -(1 << 20), 1 << 20)
    assert (np.abs(wide - 5) > 200).sum() > 100


def test_windowed_gaussian_round_trip_with_far_symbols():
    rng = np.random.default_rng(5)
    n = 3000
    mean = rng.normal(size=n) * 1e5
    std = rng.uniform(1.0, 50.0, size=n)
    far = rng.random(n) < 0.05  # 5 % of symbols far outside the window: coded as edge + excess
    symbols = np.rint(mean + std * rng.normal(size=n) * np.where(far, 100.0, 1.0)).astype(np.int64)
    stack = AnsStack(seeded_words(64, 1))
    stack.push_gaussian_windowed(symbols, mean, std, 300, std * 3)
    assert np.array_equal(stack.pop_gaussian_windowed(mean, std, 300, std * 3), symbols)
    assert np.array_equal(stack.words(), seeded_words(64, 1))


def test_windowed_pops_stay_within_window_plus_excess_bound():
    stack = AnsStack(seeded_words(50000, 11))
    n = 40000
    mean = np.full(n, 1000.3)
    drawn = stack.pop_gaussian_windowed(mean, np.full(n, 10.0), 80, 80.0, 80)
    assert np.abs(drawn - 1000).max() <= 160  # window 80 + at most max_excess 80
    stack.push_gaussian_windowed(drawn, mean, np.full(n, 10.0), 80, 80.0, 80)
    assert np.array_equal(stack.words(), seeded_words(50000, 11))


def test_windowed_push_refuses_symbols_beyond_max_excess():
    with pytest.raises(ValueError, match="beyond its window"):
        AnsStack().push_gaussian_windowed(np.array([10_000]), np.array([0.0]), np.array([1.0]), 10, 1.0, 100)


def test_scramble_is_undone_by_unscramble_and_changes_the_top():
    init = seeded_words(2000, 9)
    stack = AnsStack(init)
    stack.scramble(500, key=42)
    assert stack.num_words == len(init)
    assert not np.array_equal(stack.words(), init)
    stack.unscramble(500, key=42)
    assert np.array_equal(stack.words(), init)


def test_scramble_decouples_pops_from_the_last_push():
    """Without scrambling, a pop right after a push returns a quantile transform of the pushed
    symbols; with it, the popped values are independent of them."""
    n = 4000
    rng = np.random.default_rng(2)
    pushed = np.rint(rng.normal(size=n) * 3.0).astype(np.int32)  # pushed under a 30x too wide model
    results = {}
    for scramble in (False, True):
        stack = AnsStack(seeded_words(20000, 4))
        stack.push_gaussian(pushed, np.zeros(n), np.full(n, 90.0), -1000, 1000)
        if scramble:
            stack.scramble(n, key=1)
        drawn = stack.pop_gaussian(np.zeros(n), np.full(n, 90.0), -1000, 1000)
        results[scramble] = np.corrcoef(pushed, drawn)[0, 1]
    assert results[False] > 0.9
    assert abs(results[True]) < 0.1


def test_categorical_and_uniform_round_trip():
    rng = np.random.default_rng(3)
    probs = rng.random((300, 7))
    probs[:, 3] = 0.0  # zero-probability entries are allowed (constriction floors them)
    symbols = rng.integers(0, 7, size=300)
    sizes = rng.integers(1, 1000, size=300)
    sizes[:5] = 1  # one-symbol alphabets carry no information (nothing is coded)
    values = (rng.random(300) * sizes).astype(np.int64)
    enc = RangeEncoder()
    enc.encode_categorical(symbols, probs)
    enc.encode_uniform(values, sizes)
    dec = RangeDecoder(enc.words())
    assert np.array_equal(dec.decode_categorical(probs), symbols)
    assert np.array_equal(dec.decode_uniform(sizes, 300), values)


def test_range_coder_is_first_in_first_out():
    symbols, mean, std = gaussian_case(300)
    probs = np.tile([0.5, 0.25, 0.25], (50, 1))
    cats = np.arange(50) % 3
    enc = RangeEncoder()
    enc.encode_gaussian(symbols, mean, std, -200, 200)
    enc.encode_categorical(cats, probs)
    enc.encode_uniform(np.arange(10), 10)
    words = np.frombuffer(enc.words().astype("<u4").tobytes(), dtype="<u4").astype(np.uint32)  # as stored
    dec = RangeDecoder(words)
    assert np.array_equal(dec.decode_gaussian(mean, std, -200, 200), symbols)
    assert np.array_equal(dec.decode_categorical(probs), cats)
    assert np.array_equal(dec.decode_uniform(10, 10), np.arange(10))


@pytest.mark.parametrize(
    "mean, std, match",
    [
        (0.0, 0.0, "std must be > 0"),
        (0.0, -1.0, "std must be > 0"),
        (0.0, float("nan"), "std holds NaN"),
        (0.0, float("inf"), "std holds NaN or infinity"),
        (float("nan"), 1.0, "mean holds NaN"),
        (float("-inf"), 1.0, "mean holds NaN or infinity"),
    ],
)
def test_bad_gaussian_parameters_raise_value_error_before_constriction(mean, std, match):
    """constriction panics (a BaseException) on std <= 0 and accepts NaN silently: we refuse
    both with ValueError, for every entry point."""
    n = 4
    means, stds = np.full(n, mean), np.full(n, std)
    stds[0] = 1.0  # only some entries bad
    means[0] = 0.0
    calls = [
        lambda: AnsStack().push_gaussian(np.zeros(n, np.int32), means, stds, -10, 10),
        lambda: AnsStack(seeded_words(8, 0)).pop_gaussian(means, stds, -10, 10),
        lambda: AnsStack().push_gaussian_windowed(np.zeros(n, np.int64), means, stds, 5, 1.0),
        lambda: AnsStack(seeded_words(8, 0)).pop_gaussian_windowed(means, stds, 5, 1.0),
        lambda: RangeEncoder().encode_gaussian(np.zeros(n, np.int32), means, stds, -10, 10),
        lambda: RangeDecoder(seeded_words(8, 0)).decode_gaussian(means, stds, -10, 10),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=match):
            call()


def test_other_validation():
    with pytest.raises(ValueError, match="symbols must lie in"):
        AnsStack().push_gaussian(np.array([11], np.int32), np.zeros(1), np.ones(1), -10, 10)
    with pytest.raises(ValueError, match="expected 2 values"):
        AnsStack().push_gaussian(np.array([1, 2], np.int32), np.zeros(3), np.ones(2), -10, 10)
    with pytest.raises(ValueError, match="at most"):
        check_gaussian(np.zeros(1), np.ones(1), 0, MAX_DOMAIN_SIZE + 5)
    with pytest.raises(ValueError, match="NaN or infinity"):
        check_categorical(np.array([[0.5, np.nan]]))
    with pytest.raises(ValueError, match=">= 0"):
        check_categorical(np.array([[0.5, -0.1]]))
    with pytest.raises(ValueError, match="positive sum"):
        check_categorical(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="alphabet size"):
        RangeEncoder().encode_uniform(np.array([5]), 5)
    with pytest.raises(ValueError, match="uint32"):
        AnsStack(np.zeros(3, dtype=np.int64))


def test_seeded_words_are_splitmix64_and_end_odd():
    words = seeded_words(5, 0)
    # SplitMix64 from state 0: first output 0xe220a8397b1dcdaf (low word first)
    assert int(words[0]) | (int(words[1]) << 32) == 0xE220A8397B1DCDAF
    assert words[-1] % 2 == 1
    assert np.array_equal(seeded_words(5, 0), words)
    assert not np.array_equal(seeded_words(5, 1), words)
