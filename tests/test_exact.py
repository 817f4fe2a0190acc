"""exact: the arithmetic contract's building blocks (basic-operation exp, log, sin/cos, silu;
power-of-two scales; per-slice fixed point; operand bit widths; tensor-by-tensor division),
checked against Python's math / numpy and against exact Python integer arithmetic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffcodec import exact


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))


# ------------------------------------------------------------------ transcendentals


def test_exp_is_accurate_to_a_few_ulps_on_minus_50_to_50():
    """exp agrees with libm (math.exp) to relative error < 1e-15 on a dense grid and random
    points of [-50, 50], and its error is at most 2 ulps (measured: ~1)."""
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-50.0, 50.0, 100_001), rng.uniform(-50.0, 50.0, 50_000),
                        rng.uniform(-1e-3, 1e-3, 10_000)])
    y = exact.exp(_t(x)).numpy()
    ref = np.array([math.exp(v) for v in x])
    assert np.all(np.abs(y - ref) / ref < 1e-15)
    assert np.all(np.abs(y - ref) <= 2 * np.spacing(ref))


def test_exp_over_the_whole_clamped_range_and_at_its_edges():
    """exp is accurate far from zero too (|x| <= 700, where 2^k is built from bits), and
    saturates at e^(+-700) beyond: it never returns 0, inf or nan."""
    x = np.linspace(-700.0, 700.0, 20_001)
    y = exact.exp(_t(x)).numpy()
    ref = np.array([math.exp(v) for v in x])
    assert np.all(np.abs(y - ref) / ref < 1e-15)
    edges = exact.exp(_t(np.array([-1e9, -800.0, -700.0, 700.0, 800.0, 1e9]))).numpy()
    assert edges[0] == edges[1] == edges[2] == exact.exp(_t(np.array([-700.0]))).item() > 0
    assert edges[3] == edges[4] == edges[5] == exact.exp(_t(np.array([700.0]))).item() < math.inf
    assert np.all(np.isfinite(edges))


def test_exp_special_values():
    """exp(0) is exactly 1 (the attention softmax relies on it: the max logit's integer
    weight is exactly 2^P), exp(1) is e to an ulp, and float32 inputs give float64 results."""
    assert exact.exp(torch.zeros(3, dtype=torch.float64)).tolist() == [1.0, 1.0, 1.0]
    assert exact.exp(torch.tensor([-0.0], dtype=torch.float64)).item() == 1.0
    assert abs(exact.exp(torch.tensor([1.0], dtype=torch.float64)).item() - math.e) <= np.spacing(math.e)
    out = exact.exp(torch.tensor([0.5], dtype=torch.float32))
    assert out.dtype == torch.float64 and abs(out.item() - math.exp(0.5)) <= np.spacing(math.exp(0.5))


def test_log_is_accurate_over_the_whole_positive_range():
    """log agrees with libm to 3 ulps from subnormals to 1e300, near 1 (where log is tiny and
    cancellation would show), and log(1) == 0, log(2^k) = k ln 2 to an ulp."""
    rng = np.random.default_rng(1)
    x = np.concatenate([np.exp(rng.uniform(-700.0, 690.0, 50_000)), np.linspace(0.5, 2.0, 50_001),
                        1.0 + np.linspace(-1e-6, 1e-6, 2001), np.array([5e-324, 1e-310, 2.2e-308, 1.7e308])])
    y = exact.log(_t(x)).numpy()
    ref = np.array([math.log(v) for v in x])
    assert np.all(np.abs(y - ref) <= 3 * np.spacing(np.abs(ref)) + (ref == 0))
    near_one = np.abs(x - 1.0) < 1e-5
    assert np.all(np.abs(y - ref)[near_one] <= 2 * np.spacing(np.abs(ref[near_one])))
    assert exact.log(torch.ones(1, dtype=torch.float64)).item() == 0.0
    k = np.arange(-1074, 1024)
    y2 = exact.log(_t(np.ldexp(1.0, k))).numpy()
    assert np.all(np.abs(y2 - k * math.log(2.0)) <= np.spacing(np.abs(k * math.log(2.0)) + 1.0))


def test_sin_cos_are_accurate_for_arguments_up_to_1000():
    """sin and cos agree with numpy to absolute error < 1e-14 for |x| <= 1000 (the timestep
    embedding's range: t <= 999 times frequencies <= 1), across all four quadrants."""
    rng = np.random.default_rng(2)
    x = np.concatenate([np.linspace(-1000.0, 1000.0, 200_001), rng.uniform(-1000.0, 1000.0, 50_000),
                        np.arange(-636, 637) * (math.pi / 2)])  # quadrant boundaries
    s, c = exact.sin_cos(_t(x))
    assert np.max(np.abs(s.numpy() - np.sin(x))) < 1e-14
    assert np.max(np.abs(c.numpy() - np.cos(x))) < 1e-14
    s0, c0 = exact.sin_cos(torch.zeros(1, dtype=torch.float64))
    assert s0.item() == 0.0 and c0.item() == 1.0


def test_silu_is_accurate_and_saturates_cleanly():
    """silu(x) = x / (1 + e^-x) to relative error < 1e-15 on [-40, 40]; exactly x for large
    x (e^-x vanishes against 1); a tiny negative number (not nan) for very negative x."""
    x = np.linspace(-40.0, 40.0, 80_001)
    y = exact.silu(_t(x)).numpy()
    ref = np.array([v / (1.0 + math.exp(-v)) for v in x])
    nz = ref != 0
    assert np.all(np.abs(y - ref)[nz] / np.abs(ref[nz]) < 1e-15) and np.all(y[~nz] == 0)
    big = np.array([40.0, 100.0, 1e6])
    assert np.array_equal(exact.silu(_t(big)).numpy(), big)
    very_negative = exact.silu(_t(np.array([-800.0, -1e9]))).numpy()
    assert np.all(very_negative < 0) and np.all(very_negative > -1e-290)


def test_transcendentals_do_not_depend_on_the_tensor_layout():
    """Elementwise: the same value gives the same bits alone, inside a long (vectorised) tensor,
    at an odd offset and in a non-contiguous view (no SIMD-tail or layout differences)."""
    rng = np.random.default_rng(3)
    x = rng.uniform(-30.0, 30.0, 1027)
    big = _t(x)
    for fn in (exact.exp, exact.silu, lambda v: exact.sin_cos(v)[0], lambda v: exact.log(v.abs() + 1e-3)):
        whole = fn(big).numpy()
        one_by_one = np.array([fn(big[i:i + 1]).item() for i in range(0, 1027, 37)])
        assert np.array_equal(whole[::37], one_by_one)
        strided = fn(big[1::3]).numpy()
        assert np.array_equal(whole[1::3], strided)


# ------------------------------------------------------------------ fixed point


def test_pow2_is_exact_over_the_whole_normal_range():
    """pow2(k) is exactly 2.0**k for every k in [-1022, 1023], from int or float tensors."""
    k = torch.arange(-1022, 1024)
    expected = [2.0**int(v) for v in k]
    assert exact.pow2(k).tolist() == expected
    assert exact.pow2(k.to(torch.float64)).tolist() == expected
    assert exact.pow2(k).dtype == torch.float64


def test_frexp_exponent_brackets_its_argument():
    """m < 2^e <= 2m for positive m (powers of two, their neighbours, subnormals), 0 for 0."""
    m = np.array([1.0, 2.0, 3.0, 0.75, np.nextafter(1.0, 0.0), np.nextafter(1.0, 2.0), 5e-324, 1e-310, 1e300])
    e = exact.frexp_exponent(_t(m)).numpy()
    assert np.all(m < np.ldexp(1.0, e)) and np.all(np.ldexp(1.0, e) <= 2 * m)
    assert exact.frexp_exponent(torch.zeros(1, dtype=torch.float64)).item() == 0


@pytest.mark.parametrize("bits", [2, 8, 21, 26, 27])
def test_quantize_bounds_integers_and_per_slice_scales(bits):
    """quantize gives integer-valued q with |q| <= 2^(bits-1), the tightest power-of-two
    scale per slice (a nonzero slice's max |x| 2^shift is in [2^(bits-2), 2^(bits-1))) unless
    the shift hits its clamp (1000, for slices below ~2^-1000), q 2^-shift within half a step
    of x, all-zero slices as zeros with a finite shift, and slices independent of each other
    (changing one slice changes nothing in the others)."""
    rng = np.random.default_rng(bits)
    scales = np.array([1.0, 1e-30, 1e30, 0.0, 3.7, 2.0**-600, 1e-300, 2.0**40])
    x = rng.standard_normal((8, 3, 5, 4)) * scales[:, None, None, None]
    x[2, 0, 0, 0] = 1e30 * 7.0  # a dominant element
    q, shift = exact.quantize(_t(x), bits, dims=(1, 2, 3))
    q, shift = q.numpy(), shift.numpy()
    assert shift.shape == (8, 1, 1, 1) and shift.dtype == np.int64
    assert np.array_equal(q, np.round(q))
    assert np.max(np.abs(q)) <= 2.0 ** (bits - 1)
    slice_max = np.abs(x * np.ldexp(1.0, shift)).reshape(8, -1).max(axis=1)  # before rounding
    clamped = shift.reshape(8) == 1000
    unclamped_shift = bits - 1 - np.frexp(np.abs(x).reshape(8, -1).max(axis=1))[1]
    assert np.array_equal(clamped, unclamped_shift > 1000)
    assert clamped[6] == (bits > 4)  # the 1e-300 slice (~2^-997)
    nonzero = scales != 0
    assert np.all(slice_max[nonzero & ~clamped] >= 2.0 ** (bits - 2))
    assert np.all(slice_max < 2.0 ** (bits - 1))
    assert np.all(slice_max[clamped] < 2.0 ** (bits - 2))
    assert np.all(q[~nonzero] == 0) and np.all(np.abs(shift) <= 1000)
    step = np.ldexp(1.0, -shift)
    assert np.all(np.abs(q * step - x) <= step / 2)
    # Slices are independent: rescaling slice 0 leaves every other slice's q and shift alone.
    x2 = x.copy()
    x2[0] *= 1e10
    q2, shift2 = exact.quantize(_t(x2), bits, dims=(1, 2, 3))
    assert np.array_equal(q2.numpy()[1:], q[1:]) and np.array_equal(shift2.numpy()[1:], shift[1:])
    assert not np.array_equal(shift2.numpy()[0], shift[0])


def test_quantize_can_reach_but_never_exceed_the_bound():
    """A slice max just below a power of two rounds up to exactly 2^(bits-1): the bound is
    attained (so the bit-width arithmetic must allow it) and never exceeded."""
    bits = 8
    x = torch.tensor([[1.0 - 2.0**-40, -(1.0 - 2.0**-40), 0.25]], dtype=torch.float64)
    q, shift = exact.quantize(x, bits, dims=(1,))
    assert q.tolist() == [[128.0, -128.0, 32.0]] and shift.item() == 7


def test_quantize_per_row_matches_a_direct_reimplementation():
    """For dims=(1,) (the linear layers and the weights' per-output-channel scales), q and shift
    equal round-half-even(x 2^(bits-1-e)) with e = the frexp exponent of the row's max |x|."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 33)) * np.exp(rng.uniform(-20, 20, (6, 1)))
    x[3, 5] = 0.5  # exact half-steps appear after scaling: ties go to even
    bits = 12
    q, shift = exact.quantize(_t(x), bits, dims=(1,))
    e = np.frexp(np.abs(x).max(axis=1, keepdims=True))[1]
    expected_shift = bits - 1 - e
    assert np.array_equal(shift.numpy(), expected_shift)
    assert np.array_equal(q.numpy(), np.round(x * np.ldexp(1.0, expected_shift)))


def test_operand_bits_keep_every_dot_product_below_2_53():
    """For any fan-in, operands of a and w bits (|a| <= 2^(a-1), |w| <= 2^(w-1)) give
    fan_in 2^(a-1) 2^(w-1) <= 2^53 (exact integer arithmetic), the split uses the whole budget
    (one more bit would break it, for fan-in >= 2), and the split is even (a <= w <= a + 1)."""
    fan_ins = list(range(1, 70)) + [127, 128, 129, 576, 1152, 1728, 2304, 4095, 4096, 4097, 10**6, 2**30 + 1]
    for f in fan_ins:
        a = exact.operand_bits(f)
        w = exact.operand_bits(f, a)
        assert a >= 2 and w >= a and w <= a + 1, f
        assert f * 2 ** (a - 1) * 2 ** (w - 1) <= 2**53, f
        if f >= 2:
            assert f * 2 ** (a - 1) * 2 ** w > 2**53, f
        for other in (10, 20):
            assert exact.operand_bits(f, other) + other == a + w


def test_worst_case_dot_products_at_the_bit_limits_are_exact_in_binary64():
    """Integer operands at the operand_bits limits (all at the bound, and random signs) give a
    torch float64 matmul equal to the exact Python-integer dot product, whatever the BLAS."""
    rng = np.random.default_rng(11)
    for f in (9, 576, 1152, 2304):
        a, w = exact.operand_bits(f), exact.operand_bits(f, exact.operand_bits(f))
        act = np.full((4, f), 2 ** (a - 1), dtype=np.int64)
        act[1:] = rng.integers(-(2 ** (a - 1)), 2 ** (a - 1) + 1, (3, f))
        wt = np.full((f, 5), 2 ** (w - 1), dtype=np.int64)
        wt[:, 1:] = rng.integers(-(2 ** (w - 1)), 2 ** (w - 1) + 1, (f, 4))
        got = torch.matmul(torch.from_numpy(act.astype(np.float64)), torch.from_numpy(wt.astype(np.float64)))
        exact_sum = [[sum(int(x) * int(y) for x, y in zip(act[i], wt[:, j])) for j in range(5)] for i in range(4)]
        assert [[int(v) for v in row] for row in got.tolist()] == exact_sum
        assert exact_sum[0][0] == f * 2 ** (a + w - 2) <= 2**53


def test_divide_is_the_correctly_rounded_quotient_by_a_tensor():
    """divide(a, python float) is a / b correctly rounded (numpy's IEEE quotient), not a times
    the reciprocal (which differs for many a: e.g. 3 * (1/10) != 3 / 10), on a's device and
    dtype; a tensor divisor broadcasts."""
    a = torch.arange(1, 2001, dtype=torch.float64)
    for b in (10.0, 3.0, 49.0, 1e-5 + 1.0):
        got = exact.divide(a, b).numpy()
        assert np.array_equal(got, a.numpy() / b)
        assert not np.array_equal(got, a.numpy() * (1.0 / b))  # the reciprocal differs somewhere
    out = exact.divide(a, 10.0)
    assert out.dtype == a.dtype and out.device == a.device and out.shape == a.shape
    den = torch.tensor([[3.0], [7.0]], dtype=torch.float64)
    num = torch.arange(1, 11, dtype=torch.float64).reshape(2, 5)
    assert np.array_equal(exact.divide(num, den).numpy(), num.numpy() / den.numpy())


def test_divide_hands_torch_a_tensor_divisor(monkeypatch):
    """The division torch sees is tensor / tensor (never tensor / python scalar, which CUDA
    turns into a multiplication by the reciprocal)."""
    seen = []
    real = torch.Tensor.__truediv__

    def spy(self, other):
        seen.append(type(other))
        return real(self, other)

    monkeypatch.setattr(torch.Tensor, "__truediv__", spy)
    exact.divide(torch.ones(3, dtype=torch.float64), 7.0)
    exact.divide(torch.ones(3, dtype=torch.float64), 7)
    assert seen == [torch.Tensor, torch.Tensor]


def test_literal_constants_are_the_constants_they_name():
    """The literals used instead of libm at import are the correctly rounded values (checked
    here with libm, once): the Cody-Waite splits sum to ln 2 and pi/2, and their high parts
    have enough trailing zero bits that k * HI is exact for the k each reduction can meet."""
    assert exact.LN2_HI + exact.LN2_LO == math.log(2.0)
    assert exact.PIO2_HI + exact.PIO2_LO == math.pi / 2
    assert exact.INV_LN2 == 1.0 / math.log(2.0)
    assert exact.TWO_OVER_PI == 2.0 / math.pi
    assert exact.SQRT_HALF == math.sqrt(0.5)
    # Trailing zeros: the mantissa of LN2_HI fits in 53 - 11 bits (k <= 1100 needs 11 bits),
    # that of PIO2_HI in 53 - 20 bits (|k| < 2^20).
    for hi, k_bits in ((exact.LN2_HI, 11), (exact.PIO2_HI, 20)):
        mantissa, _ = math.frexp(hi)
        assert (int(mantissa * 2**53) % 2**k_bits) == 0


# ------------------------------------------------------------------ rule 1 on this machine


def _operands(n: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(21)
    a = rng.standard_normal(n) * np.exp(rng.uniform(-30.0, 30.0, n))
    b = rng.standard_normal(n) * np.exp(rng.uniform(-30.0, 30.0, n))
    return a, b


def test_torch_basic_operations_are_correctly_rounded_on_this_cpu():
    """Rule 1 of the contract, checked where this package relies on torch for it: float64
    + - x / (tensor by tensor), round (half to even) and frexp on CPU tensors equal numpy's
    IEEE results on 200k operands spread over 26 decades."""
    a, b = _operands()
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    assert np.array_equal((ta + tb).numpy(), a + b)
    assert np.array_equal((ta - tb).numpy(), a - b)
    assert np.array_equal((ta * tb).numpy(), a * b)
    assert np.array_equal((ta / tb).numpy(), a / b)
    assert np.array_equal(torch.round(ta * 1e6).numpy(), np.round(a * 1e6))
    assert np.array_equal(torch.round(torch.arange(-10, 11) + 0.5).numpy(), np.round(np.arange(-10, 11) + 0.5))
    m, e = torch.frexp(ta)
    nm, ne = np.frexp(a)
    assert np.array_equal(m.numpy(), nm) and np.array_equal(e.numpy(), ne)


def test_exact_sqrt_is_correctly_rounded():
    """Rule 1 names sqrt among the correctly rounded operations: `exact.sqrt` of float64 CPU
    tensors equals numpy's (IEEE, hardware) square root bit for bit. (torch.sqrt does not on
    MKL builds: about 0.4% of values 1 ulp off on the AVX-512 path, 1.6% on the AVX2 / SSE4.2
    paths, which also disagree with each other; measured on this project's CPU.)"""
    a, _ = _operands()
    x = np.abs(a)
    assert np.array_equal(exact.sqrt(torch.from_numpy(x)).numpy(), np.sqrt(x))
    assert exact.ceil_log2(1) == 0 and exact.ceil_log2(2) == 1 and exact.ceil_log2(2304) == 12
