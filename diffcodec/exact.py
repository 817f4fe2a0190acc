"""The exact arithmetic contract: what every value that decides a coded symbol is made of.

Every exact-path file header carries the version of the contract it was written under
(``CONTRACT_VERSIONS``); this diffcodec writes ``CONTRACT_VERSION`` and decodes every
version it knows. The versions differ only in the network (`network_for_contract`):

- version 1: `exact_net` (binary64 matrix products of up to 27-bit integers, the layers in
  binary64; about 5x slower than the float32 network on a CPU);
- version 2: `exact_net2` (int8 matrix products of the two parts of 14-bit integers, fused
  C kernels, activations in binary32 between layers; as fast as the float32 network or
  faster, reports/exact.md). Its rules are the same five below, with binary32 allowed
  beside binary64 and int8 -> int32 products counted as integer sums (exact: each operand
  part in [-64, 63], so no kernel of any instruction set can saturate).

The rules, every version:

1. Values are integers, or IEEE-754 binary64 results of + - x / and sqrt (`sqrt`: torch's
   CPU sqrt is not correctly rounded), each correctly rounded (round to nearest, ties to
   even) on every conforming CPU and GPU, applied one
   operation at a time in the order written in this package, to inputs that are themselves
   exact (integers, float32 weights widened to float64, literal constants in the source).
2. No libm transcendental (exp, log, sin, cos, tanh, erf, pow) is ever called: the ones the
   network and the coders need are written below from the basic operations only (`exp`,
   `log`, `sin_cos`, `silu`), so their results are the same bits everywhere, accurate to a
   few ulps.
3. No result depends on summation order: every sum or dot product is taken over
   integer-valued binary64 operands whose every partial sum stays below 2^53 in magnitude
   (exact in any order, on any BLAS, any SIMD width, any thread count, any device); the bit
   widths that guarantee it are chosen from the layer's fan-in (`operand_bits`).
4. Each value depends only on its own image: scales are per sample (`quantize`), never per
   batch.
5. No fused multiply-add is asked for, no TF32, no torch.compile, no reciprocal-square-root
   or approximate division; a division is always tensor by tensor (`divide`): on CUDA, torch
   divides by a Python scalar as a multiplication by its reciprocal, which is not the
   correctly rounded quotient.

What the contract covers in this package: the exact network (`exact_net`, `exact_net2`), the noise
schedule (`schedule`), the reverse-process parameters and their snapping to the coder's grid
(`diffusion`, `codec.coding_params`, `codec.bitsback.chain`), the progressive codec's latents
and its reverse-channel-coding candidates (`codec.rcc`). What it does not cover: the entropy
coder turns the snapped (exact) mean and std of a Gaussian into integer frequencies inside
constriction's compiled code (version pinned in pyproject.toml); that step is outside this
package's arithmetic and is the one remaining dependency of a file on its software.
"""

from __future__ import annotations

import math

import numpy as np
import torch

CONTRACT_VERSION = 2
CONTRACT_VERSIONS = (1, 2)

F64 = torch.float64
MANTISSA_LIMIT_BITS = 53  # integers of magnitude <= 2^53 are exact in binary64

# Literal constants (not computed with libm at import: a literal is the same bits everywhere).
LN2_HI = 6.93147180369123816490e-01  # ln 2, high part with 32 trailing zero bits (k * LN2_HI exact)
LN2_LO = 1.90821492927058770002e-10  # ln 2 - LN2_HI
INV_LN2 = 1.44269504088896338700e00
PIO2_HI = 1.57079632673412561417e00  # pi/2, high part with trailing zeros (k * PIO2_HI exact for |k| < 2^20)
PIO2_LO = 6.07710050650619224932e-11  # pi/2 - PIO2_HI
TWO_OVER_PI = 6.36619772367581382433e-01
SQRT_HALF = 7.07106781186547524401e-01
SQRT_PI = 1.77245385090551602730e00
TWO_OVER_SQRT_PI = 1.12837916709551257390e00
LN2 = 6.93147180559945309417e-01
SQRT2 = 1.41421356237309504880e00

_EXP_TERMS = 13  # Taylor terms of exp(r) for |r| <= ln(2)/2: truncation error below 2e-16
_INV_FACTORIAL = [1.0 / math.factorial(n) for n in range(_EXP_TERMS + 1)]  # exact int -> float, then one division
_SIN_TERMS = 11  # sin/cos Taylor terms for |r| <= pi/4
_LOG_TERMS = 13  # atanh series terms of log(m) for m in [sqrt(1/2), sqrt(2))
EXP_ARG_LIMIT = 700.0  # |x| clamped here, so 2^k stays a normal number


def as_f64(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == F64 else x.to(F64)


def divide(a: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:
    """a / b, correctly rounded on every device: the divisor is always a tensor on a's device."""
    if not isinstance(b, torch.Tensor):
        b = torch.full_like(a, float(b))
    return a / b


def sqrt(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded square root. torch's CPU float64 sqrt is NOT (through MKL's
    vector math it is 1 ulp off for about 0.4% of values, and differently per instruction
    set), so on the CPU this is numpy's, which is the hardware's IEEE square root; CUDA's
    double-precision sqrt is correctly rounded."""
    x = as_f64(x)
    if x.device.type == "cpu":
        return torch.from_numpy(np.sqrt(x.contiguous().numpy()))
    return torch.sqrt(x)


def ceil_log2(n: int) -> int:
    """ceil(log2 n) for an integer n >= 1, by integer arithmetic (no libm)."""
    return (int(n) - 1).bit_length()


def pow2(k: torch.Tensor) -> torch.Tensor:
    """2^k as binary64 for integer-valued k in [-1022, 1023], built from its bits (exact)."""
    return ((k.to(torch.int64) + 1023) << 52).view(F64)


def exp(x: torch.Tensor) -> torch.Tensor:
    """e^x from the basic operations (relative error a few 1e-16); |x| clamped to 700.

    x = k ln2 + r with |r| <= ln2 / 2 (Cody-Waite: k LN2_HI is exact), e^r by its Taylor
    series in Horner form, times 2^k built from bits. Computed block by block (`_blockwise`)."""
    x = as_f64(x)
    out = torch.empty_like(x)
    _blockwise(_exp_block, x, out)
    return out


def _exp_block(x: torch.Tensor, out: torch.Tensor, work: list[torch.Tensor]) -> None:
    """out = e^x (``x`` left untouched): the operations of `exp`, in place in three temporaries.

    The same correctly rounded operations in the same order as the plain form
    ``p = c13; p = p r + c12; ...``: its first step c13 r is computed as r c13 (multiplication
    commutes), which also spares filling p with c13."""
    t, k, r = work[0], work[1], work[2]
    torch.clamp(x, -EXP_ARG_LIMIT, EXP_ARG_LIMIT, out=t)
    _exp_of_clamped(t, out, k, r)


def _exp_of_clamped(t: torch.Tensor, out: torch.Tensor, k: torch.Tensor, r: torch.Tensor) -> None:
    """out = e^t for t already clamped to [-700, 700]; t is overwritten (used as scratch)."""
    torch.mul(t, INV_LN2, out=k).round_()
    torch.sub(t, torch.mul(k, LN2_HI, out=r), out=r)  # x - k LN2_HI (the product is exact)
    r.sub_(torch.mul(k, LN2_LO, out=t))  # (x - k LN2_HI) - k LN2_LO
    p = torch.mul(r, _INV_FACTORIAL[_EXP_TERMS], out=out).add_(_INV_FACTORIAL[_EXP_TERMS - 1])
    for n in range(_EXP_TERMS - 2, -1, -1):
        p.mul_(r).add_(_INV_FACTORIAL[n])  # two roundings per term, never fused
    p.mul_(pow2(k))


def log(x: torch.Tensor) -> torch.Tensor:
    """Natural log of x > 0 from the basic operations (relative error a few 1e-16).

    x = m 2^e with m in [sqrt(1/2), sqrt(2)) (frexp is exact); log m = 2 atanh(f) with
    f = (m - 1) / (m + 1), |f| < 0.172, summed as an odd series in Horner form."""
    x = as_f64(x)
    m, e = torch.frexp(x)  # x = m 2^e, m in [0.5, 1)
    small = m < SQRT_HALF
    m = torch.where(small, m * 2.0, m)
    e = torch.where(small, e - 1, e).to(F64)
    f = divide(m - 1.0, m + 1.0)
    s = f * f
    p = torch.full_like(s, 1.0 / (2 * _LOG_TERMS + 1))
    for n in range(_LOG_TERMS - 1, -1, -1):
        p = p * s + 1.0 / (2 * n + 1)
    log_m = 2.0 * f * p
    return e * LN2_HI + (e * LN2_LO + log_m)


def sin_cos(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sin x, cos x) from the basic operations for |x| < 2^20 (absolute error ~1e-15 at |x| ~ 1e3).

    x = k pi/2 + r with |r| <= pi/4 (Cody-Waite), the Taylor series of sin r and cos r, and
    the quadrant k mod 4 choosing signs and swapping."""
    x = as_f64(x)
    k = torch.round(x * TWO_OVER_PI)
    r = (x - k * PIO2_HI) - k * PIO2_LO
    r2 = r * r
    s = torch.full_like(r, (-1.0) ** _SIN_TERMS / math.factorial(2 * _SIN_TERMS + 1))
    c = torch.full_like(r, (-1.0) ** _SIN_TERMS / math.factorial(2 * _SIN_TERMS))
    for n in range(_SIN_TERMS - 1, -1, -1):
        s = s * r2 + (-1.0) ** n / math.factorial(2 * n + 1)
        c = c * r2 + (-1.0) ** n / math.factorial(2 * n)
    s = s * r
    quadrant = torch.remainder(k.to(torch.int64), 4)
    sin = torch.where(quadrant == 0, s, torch.where(quadrant == 1, c, torch.where(quadrant == 2, -s, -c)))
    cos = torch.where(quadrant == 0, c, torch.where(quadrant == 1, -s, torch.where(quadrant == 2, -c, s)))
    return sin, cos


def silu(x: torch.Tensor) -> torch.Tensor:
    """x sigmoid(x) = x / (1 + e^-x), block by block (`_blockwise`)."""
    x = as_f64(x)
    out = torch.empty_like(x)
    _blockwise(_silu_block, x, out)
    return out


def _silu_block(x: torch.Tensor, out: torch.Tensor, work: list[torch.Tensor]) -> None:
    """out = x / (1 + e^-x): exp(-x) into ``out``, 1 + e (addition commutes), then x / out."""
    t, k, r = work[0], work[1], work[2]
    torch.neg(x, out=t).clamp_(-EXP_ARG_LIMIT, EXP_ARG_LIMIT)
    _exp_of_clamped(t, out, k, r)
    torch.div(x, out.add_(1.0), out=out)  # tensor / tensor: correctly rounded everywhere


# ------------------------------------------------------------------- blockwise evaluation

BLOCK_ELEMENTS = 1 << 16
"""Elements per block of an elementwise chain on the CPU (`_blockwise`): the chain's few
temporaries of this size stay in the core's cache across its dozens of passes, instead of
each pass streaming whole activations through memory (about 3x faster for `silu`). Large
enough that torch still splits each operation over two threads."""


def _flat_in_memory_order(x: torch.Tensor) -> torch.Tensor | None:
    """A 1-D view of a dense tensor's elements in memory order (None if it has gaps or overlaps)."""
    order = sorted(range(x.ndim), key=lambda d: (-x.stride(d), d))
    permuted = x.permute(order)
    return permuted.view(-1) if permuted.is_contiguous() else None


def _blockwise(kernel, x: torch.Tensor, out: torch.Tensor) -> None:
    """Apply an elementwise ``kernel(x_block, out_block, work)`` to x -> out (same shape).

    Every element's result is the same sequence of correctly rounded operations whatever the
    blocking, so blocking changes no bit: on the CPU, x and out (alike in layout) are cut
    into `BLOCK_ELEMENTS` blocks that reuse three scratch tensors (``work``); on a GPU, or
    for a small or oddly laid out tensor, the kernel runs once on the whole tensor."""
    n = x.numel()
    flat_x = flat_out = None
    if x.device.type == "cpu" and n > BLOCK_ELEMENTS and x.stride() == out.stride():
        flat_x, flat_out = _flat_in_memory_order(x), _flat_in_memory_order(out)
    if flat_x is None or flat_out is None:
        kernel(x, out, [torch.empty_like(x) for _ in range(3)])
        return
    work = [x.new_empty(BLOCK_ELEMENTS) for _ in range(3)]
    for start in range(0, n, BLOCK_ELEMENTS):
        size = min(BLOCK_ELEMENTS, n - start)
        blocks = work if size == BLOCK_ELEMENTS else [w[:size] for w in work]
        kernel(flat_x[start:start + size], flat_out[start:start + size], blocks)


# ----------------------------------------------------------------------- fixed point


def operand_bits(fan_in: int, other_bits: int | None = None) -> int:
    """Bits b (sign included) of integer operands |a| <= 2^(b-1), |w| <= 2^(b'-1) whose
    dot products over ``fan_in`` terms stay below 2^53: b + b' <= 55 - ceil(log2 fan_in).
    With ``other_bits`` = b' given, the largest b; otherwise the largest equal split."""
    budget = MANTISSA_LIMIT_BITS + 2 - max(1, ceil_log2(max(fan_in, 1)))
    if other_bits is not None:
        return budget - other_bits
    return budget // 2


def frexp_exponent(m: torch.Tensor) -> torch.Tensor:
    """e with m < 2^e <= 2m for m > 0 (0 for m == 0): the exact binary exponent."""
    return torch.frexp(as_f64(m))[1].to(torch.int64)


def quantize(x: torch.Tensor, bits: int, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slice fixed point: (q, shift) with q = round(x 2^shift) integer-valued binary64,
    |q| <= 2^(bits-1), and one power-of-two scale per slice (the max over ``dims``).

    Exact: the max is order-independent, frexp exact, multiplication by 2^shift exact, and
    round is half to even. ``shift`` is int64 shaped like x with ``dims`` kept as size 1."""
    x = as_f64(x)
    shift = quantize_shift(x, bits, dims)
    return torch.mul(x, pow2(shift)).round_(), shift


def quantize_shift(x: torch.Tensor, bits: int, dims: tuple[int, ...]) -> torch.Tensor:
    """The ``shift`` of `quantize` alone: bits - 1 - e(max |x| over ``dims``), clamped to +-1000.

    When ``dims`` are all but the first (one scale per sample) and each sample's elements lie
    together in memory, max |x| = max(max x, -min x) comes from one `aminmax` pass over a
    [B, N] view (no |x| temporary); the max of a set is one value whatever the order."""
    x = as_f64(x)
    m = None
    if x.ndim > 1 and x.shape[0] > 0 and tuple(dims) == tuple(range(1, x.ndim)):
        flat = _flat_in_memory_order(x)
        if flat is not None and x.stride(0) == max(x.stride()) and x[0].numel() > 0:
            lo, hi = torch.aminmax(flat.view(x.shape[0], -1), dim=1)
            m = torch.maximum(hi, lo.neg()).reshape(-1, *([1] * (x.ndim - 1)))
    if m is None:
        m = x.abs().amax(dim=dims, keepdim=True)
    return (bits - 1 - frexp_exponent(m)).clamp(-1000, 1000)


def normal_cdf(z: torch.Tensor) -> torch.Tensor:
    """Phi(z), the standard normal CDF, from the basic operations (absolute error below 1e-8,
    enough for the index priors that use it: what matters is that it is the same everywhere).

    erf by its Taylor series for |x| <= 3 (x = z / sqrt 2; 60 terms), erfc by its asymptotic
    series beyond, where Phi's tail is below 1.2e-5."""
    x = as_f64(z) * SQRT_HALF
    ax = x.abs()
    small = ax.clamp(max=3.0)
    x2 = small * small
    term, total = small.clone(), small.clone()
    for n in range(1, 60):  # term_n = (-1)^n x^(2n+1) / n!; summed as term_n / (2n + 1)
        term = divide(term * -x2, float(n))
        total = total + divide(term, float(2 * n + 1))
    erf_small = total * TWO_OVER_SQRT_PI
    big = ax.clamp(min=3.0)
    inv2 = divide(torch.ones_like(big), 2.0 * big * big)
    series = 1.0 - inv2 * (1.0 - 3.0 * inv2 * (1.0 - 5.0 * inv2 * (1.0 - 7.0 * inv2)))
    erfc_big = divide(exp(-big * big) * series, big * SQRT_PI)
    erf_abs = torch.where(ax <= 3.0, erf_small.abs(), 1.0 - erfc_big)
    erf = torch.where(x < 0, -erf_abs, erf_abs)
    return 0.5 * (1.0 + erf)
