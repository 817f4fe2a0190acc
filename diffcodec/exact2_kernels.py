"""The elementwise kernels of exact-arithmetic contract 2 (`exact_net2`).

Contract 2 computes every convolution and linear layer from exact integer sums of its
quantized input (14-bit integers, |a| <= `QMAX`) and weights (the products themselves and the
weights' 10 bits: `exact2_products`). Around the
products, each layer's elementwise work (quantizing an input, GroupNorm's statistics, its
affine map and SiLU, the epilogue that scales the integer sums, the attention's softmax
weights) is written here once per kernel, twice: a C kernel for the CPU
(diffcodec/csrc/exact2.c, loaded by `native`: one pass over memory, threads over
independent outputs) and a torch twin (the same operations in the same order: for a GPU, and
for a CPU without the compiled library). Both use only integer arithmetic and IEEE-754
binary32 / binary64 + - x / sqrt and rint / floor (round half to even), one operation at a
time: no libm transcendental (SiLU's exponential is `exact.exp`'s polynomial, ported
operation for operation), no fused multiply-add (the C is compiled with -ffp-contract=off,
never fast-math: tests/test_exact2_kernels.py checks the machine code), no sum whose rounding
depends on its order (GroupNorm's sums are int64 sums of fixed-point integers; maxima are
order-free). So the C kernels, at every instruction-set level and thread count, and their
twins give the same bits.

An integer operand comes in one of two forms (`exact2_products` picks one per layer for
speed; the integers, hence the results, are the same):

- PLANES, uint8 [2, B, P, C]: each integer as two parts a = 128 a_hi + a_lo with a_hi in
  [-63, 63] and a_lo in [-64, 63], stored as a_hi + 64 (plane 0) and a_lo + 64 (plane 1):
  each plane an input of oneDNN's int8 convolution (zero point 64);
- VALUES, binary64 [B, P, C]: the integers themselves, for a binary64 matrix product.

Tensors: activations are binary32 [B, P, C] (channels-last: P pixels, C channels); per-image
values are [B].
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from diffcodec import exact, native

QMAX = 8063
"""Largest magnitude of a quantized activation or weight: 128 a_hi + a_lo with a_hi in
[-63, 63] and a_lo in [-64, 63] covers [-8128, 8127]; 8063 = 63 x 128 - 1 keeps
a_hi = floor((a + 64) / 128) within [-63, 63] for every |a| <= QMAX."""
PART_BITS = 7
PART_SCALE = 1 << PART_BITS  # a = PART_SCALE a_hi + a_lo
ZERO_POINT = 64  # a PLANES part p is stored as the uint8 p + 64, in [1, 127]
PLANES, VALUES = "planes", "values"
SILU_MIN = -0.27846454276107380  # min over y of y sigmoid(y) (at y = -1.27846454276...), a literal
SILU_ARGMIN = -1.2784645427610738

# SiLU in binary32 (`silu32`): y / (1 + e^-y), e^t by Cody-Waite reduction t = k ln2 + r,
# |r| <= ln2 / 2, and the Taylor series of e^r to r^7 (truncation below 6e-9, under binary32's
# half ulp), times 2^k built from its bits; -y clamped to [-87, 87] so 2^k stays normal.
_F32 = np.float32
LN2_HI_F32 = _F32(0.693145751953125)  # ln 2 with 9 trailing zero bits: k LN2_HI_F32 is exact for |k| < 2^9
LN2_LO_F32 = _F32(1.4286068203094173e-06)  # ln 2 - LN2_HI_F32
INV_LN2_F32 = _F32(1.4426950408889634)
EXP32_ARG_LIMIT = _F32(87.0)
EXP32_COEFFS = tuple(_F32(c) for c in exact._INV_FACTORIAL[:8])  # 1/n!, n = 0..7
SILU_MIN_F32, SILU_ARGMIN_F32 = _F32(SILU_MIN), _F32(SILU_ARGMIN)

# ------------------------------------------------------------------------- the C kernels

NATIVE_ON = native.library("exact2") is not None
"""Whether the C kernels run (csrc/exact2.c built and loaded: `native.library`; tests switch
them off to run the twins)."""


def use_native(t: torch.Tensor) -> bool:
    """The C kernels run on CPU tensors when `NATIVE_ON`."""
    return NATIVE_ON and t.is_cpu


class _Lib:
    """csrc/exact2.c's functions in ``lib`` (one level's library), bound with ctypes; each
    raises MemoryError where its C function returns -1 (its scratch arrays not allocated)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        P, I, F = native.ptr, native.i64, native.f64

        def fn(symbol: str, *argtypes):
            f = native.bind(lib, symbol, *argtypes, restype=ctypes.c_int)

            def call(*args) -> None:
                if f(*args) != 0:
                    raise MemoryError(f"exact2 kernel {symbol}: out of memory for its scratch arrays")
            return call

        forms = (PLANES, VALUES)
        self.absmax_f32 = fn("dc_absmax_f32", P, I, I, I, I, P, I)
        self.quantize = {(dt, form): fn(f"dc_quantize_{dt}_{form}", P, P, P, I, I, I, I, I)
                         for dt in ("f32", "f64") for form in forms}
        self.quantize_dynamic = {(dt, form): fn(f"dc_quantize_dynamic_{dt}_{form}", P, P, P, I, I, I, I, I)
                                 for dt in ("f32", "f64") for form in forms}
        self.group_stats = fn("dc_group_stats", P, P, I, I, I, I, P, P, P, P, I)
        self.norm_coefficients = fn("dc_norm_coefficients", P, P, P, P, P, I, I, I, I, P, P, F, P, P, I, I,
                                    P, P, P, P)
        self.norm_act = {(silu, form): fn(f"dc_norm_act{'_silu' if silu else ''}_{form}", P, P, P, P, P, I, I, I, I, I)
                         for silu in (True, False) for form in forms}
        self.group_norm = {(silu, form): fn(f"dc_group_norm{'_silu' if silu else ''}_{form}", P, I, I, P, P, F, P, P,
                                            I, P, P, I, I, I, I, I)
                           for silu in (True, False) for form in forms}
        self.epilogue = fn("dc_epilogue", P, P, P, P, P, P, P, I, I, I, P, I, P, P, P, P, I, P, I)
        self.epilogue64 = fn("dc_epilogue_f64", P, P, P, P, P, P, P, I, I, I, P, I, P, P, P, I)
        self.softmax_weights = fn("dc_softmax_weights", P, P, I, I, F, P, I)
        self.quantize_heads = fn("dc_quantize_heads", P, I, I, I, I, I, P, P, I)
        self.silu64 = fn("dc_silu64", P, P, I, I)
        self.silu32 = fn("dc_silu32", P, P, I, I)
        self.im2col_planes = fn("dc_im2col_planes", P, I, I, I, I, I, I, I, I, I, I, P, I)
        self.constants = native.bind(lib, "dc_exact2_constants", P, restype=native.i64)


_C = _Lib(native.library("exact2")) if NATIVE_ON else None
_ptr = native.address


def _chunks(total: int) -> int:
    return max(1, min(total, 64))


def _nchunk(pixels: int) -> int:
    """Jobs per image of a pixel loop (each a range of pixels; the chunking fixes no result)."""
    return _chunks(pixels // 64 + 1)


# ------------------------------------------------------------------------- the kernels


def absmax(x: torch.Tensor) -> torch.Tensor:
    """max |x| of each image: x [B, P, C] float32 (C kernel) or any [B, ...] -> [B] (order-free)."""
    if use_native(x) and x.dtype == torch.float32 and x.dim() == 3:
        x = x.contiguous()
        b, p, c = x.shape
        out = torch.empty(b, dtype=torch.float32)
        _C.absmax_f32(_ptr(x), b, p, c, _nchunk(p), _ptr(out), native.threads(x.numel()))
        return out
    flat = x.reshape(x.shape[0], -1)
    return flat.abs().amax(dim=1) if flat.shape[1] else flat.new_zeros(flat.shape[0])


def inverse_scales(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, s) per image from a max |value| m [B]: r = QMAX / m multiplies a value into
    [-QMAX, QMAX], s = m / QMAX is one integer's value; both 0 where m == 0 (binary64)."""
    m64 = m.to(torch.float64)
    zero = m64 == 0
    safe = torch.where(zero, torch.ones_like(m64), m64)
    r = torch.where(zero, torch.zeros_like(m64), exact.divide(torch.full_like(m64, float(QMAX)), safe))
    s = torch.where(zero, torch.zeros_like(m64), exact.divide(m64, float(QMAX)))
    return r, s


def split(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 a in [-QMAX, QMAX] -> int64 (a_hi, a_lo) = (floor((a + 64) / 128), a - 128 a_hi)."""
    hi = torch.div(a + 64, PART_SCALE, rounding_mode="floor")
    return hi, a - hi * PART_SCALE


_FLOAT_NAMES = {torch.float32: "f32", torch.float64: "f64"}


def _quantize_torch(v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """clamp(rint(v r), +-QMAX) as int64, v and r binary64 (r broadcast); NaN -> QMAX."""
    a = torch.round(v * r)
    a = torch.where(a < QMAX, a, float(QMAX))
    return torch.where(a > -QMAX, a, float(-QMAX)).to(torch.int64)


def _as_form(a: torch.Tensor, form: str) -> torch.Tensor:
    if form == VALUES:
        return a.to(torch.float64)
    return torch.stack(split(a)).add_(ZERO_POINT).to(torch.uint8)


def _empty_form(shape: tuple[int, int, int], form: str) -> torch.Tensor:
    b, p, c = shape
    return torch.empty((2, b, p, c), dtype=torch.uint8) if form == PLANES else torch.empty(shape, dtype=torch.float64)


def grid(operand: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """An operand [..., P, C] in either form (P = h w pixels) viewed as [..., h, w, C]."""
    return operand.view(*operand.shape[:-2], h, w, operand.shape[-1])


def im2col(values: torch.Tensor, k: int, stride: int, pads: tuple[int, int, int, int],
           pad_value: int = 0) -> torch.Tensor:
    """[B, H, W, C] -> the column matrix [B Ho Wo, k k C] (columns: kernel row, kernel
    column, channel) of a k x k convolution with padding ``pads`` = (top, left, bottom,
    right) of ``pad_value``. Data movement only (the VALUES products' operand, and
    `im2col_planes`' twin)."""
    b, h, w, c = values.shape
    top, left, bottom, right = pads
    out_h, out_w = (h + top + bottom - k) // stride + 1, (w + left + right - k) // stride + 1
    src = torch.nn.functional.pad(values, (0, 0, left, right, top, bottom), value=pad_value)
    cols = torch.cat([src[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
                      for i in range(k) for j in range(k)], dim=3)
    return cols.reshape(b * out_h * out_w, k * k * c)


def im2col_planes(planes: torch.Tensor, k: int, stride: int, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """An operand in the PLANES form [2, B, H, W, C] -> its k x k windows [2, B Ho Wo, k k C]
    (`im2col` of each plane), padding ``pads`` = (top, left, bottom, right) of the zero point
    (a part 0). One C pass on the CPU."""
    _, b, h, w, c = planes.shape
    top, left, bottom, right = pads
    out_h, out_w = (h + top + bottom - k) // stride + 1, (w + left + right - k) // stride + 1
    if use_native(planes) and planes.dtype == torch.uint8:
        planes = planes.contiguous()
        out = torch.empty((2, b * out_h * out_w, k * k * c), dtype=torch.uint8)
        _C.im2col_planes(_ptr(planes), 2 * b, h, w, c, k, stride, top, left, out_h, out_w, _ptr(out),
                         native.threads(out.numel()))
        return out
    return im2col(planes.reshape(2 * b, h, w, c), k, stride, pads, ZERO_POINT).view(2, b * out_h * out_w, k * k * c)


def quantize(x: torch.Tensor, r: torch.Tensor, form: str) -> torch.Tensor:
    """x [B, P, C] (binary32 or binary64) -> the integers clamp(rint(x r_b), +-QMAX) in ``form``."""
    if use_native(x) and x.dtype in _FLOAT_NAMES:
        x = x.contiguous()
        b, p, c = x.shape
        out = _empty_form((b, p, c), form)
        r = r.to(torch.float64).contiguous()  # exact; the twin multiplies in binary64 too
        _C.quantize[_FLOAT_NAMES[x.dtype], form](_ptr(x), _ptr(r), _ptr(out), b, p, c, _nchunk(p),
                                                 native.threads(x.numel()))
        return out
    return _as_form(_quantize_torch(x.to(torch.float64), r.reshape(-1, 1, 1)), form)


def quantize_dynamic(x: torch.Tensor, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, P, C] (binary32 or binary64) quantized per image by its max |x|: (the integers
    clamp(rint(x r_b), +-QMAX) in ``form``, s [B]) with (r, s) = `inverse_scales`(max |x_b|)."""
    if use_native(x) and x.dtype in _FLOAT_NAMES:
        x = x.contiguous()
        b, p, c = x.shape
        out = _empty_form((b, p, c), form)
        s = torch.empty(b, dtype=torch.float64)
        _C.quantize_dynamic[_FLOAT_NAMES[x.dtype], form](_ptr(x), _ptr(out), _ptr(s), b, p, c, _nchunk(p),
                                                         native.threads(x.numel()))
        return out, s
    r, s = inverse_scales(absmax(x))
    return quantize(x, r, form), s


def quantize_heads(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention's q, k and v from qkv [B, T, P, H, d] (binary32; P = 3 parts, H heads, T
    tokens): each part quantized per image by its max |value| as `quantize_dynamic` in the
    VALUES form quantizes qkv[:, :, p] laid out [B, H, T, d]: (the integers in binary64
    [P, B, H, T, d], s [P, B]). One C pass on the CPU; else one `quantize_dynamic` per part."""
    b, t, parts, h, d = qkv.shape
    if use_native(qkv) and qkv.dtype == torch.float32:
        qkv = qkv.contiguous()
        out = torch.empty((parts, b, h, t, d), dtype=torch.float64)
        s = torch.empty((parts, b), dtype=torch.float64)
        _C.quantize_heads(_ptr(qkv), b, t, parts, h, d, _ptr(out), _ptr(s), native.threads(qkv.numel()))
        return out, s
    pieces = [quantize_dynamic(qkv[:, :, i].permute(0, 2, 1, 3).reshape(b, h * t, d), VALUES) for i in range(parts)]
    return (torch.stack([v.view(b, h, t, d) for v, _ in pieces]), torch.stack([s_i for _, s_i in pieces]))


def group_stats(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per image and channel of x [B, P, C] float32, with q = rint(x scale_b) (scale a power
    of two, so q is exact): (sum q, sum q^2) int64 [B, C] and (min x, max x) float32 [B, C]."""
    if use_native(x) and x.dtype == torch.float32:
        x = x.contiguous()
        b, p, c = x.shape
        scale = scale.to(torch.float64).contiguous()
        t1, t2 = torch.empty((b, c), dtype=torch.int64), torch.empty((b, c), dtype=torch.int64)
        mn, mx = torch.empty((b, c), dtype=torch.float32), torch.empty((b, c), dtype=torch.float32)
        _C.group_stats(_ptr(x), _ptr(scale), b, p, c, _nchunk(p), _ptr(t1), _ptr(t2), _ptr(mn), _ptr(mx),
                       native.threads(x.numel()))
        return t1, t2, mn, mx
    q = torch.round(x.to(torch.float64) * scale.reshape(-1, 1, 1)).to(torch.int64)
    return q.sum(dim=1), (q * q).sum(dim=1), x.amin(dim=1), x.amax(dim=1)


def norm_plan(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float, silu: bool,
              scale: torch.Tensor | None = None, shift: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupNorm of x [B, P, C] binary32 as y = x a + c, and the next layer's input scale:
    returns (a, c) binary32 [B, C] (rounded from binary64), r binary32 [B] and s binary64 [B]
    (`inverse_scales` of the bound on max |f(y)| over each image, f = `silu32` or the
    identity; ``scale``/``shift`` [B, C]: the scale-shift ResBlock's norm(h) (1 + scale) +
    shift, folded into a and c).

    The statistics are exact: per image q = rint(x 2^e), e from the image's max |x| and the
    group size n so that n 2^(2 bits - 2) <= 2^53 (`exact.operand_bits`'s rule), group sums of
    q and q^2 in int64; mean and variance by binary64 operations (`_norm_coefficients_torch`).
    y is monotone in x, so each channel's extreme inputs give y's extremes exactly; for SiLU
    the bound adds |min SiLU| where y's range holds its minimum."""
    b, p, c = x.shape
    n = (c // groups) * p
    bits = (exact.MANTISSA_LIMIT_BITS + 2 - exact.ceil_log2(n)) // 2
    shift_e = (bits - 1 - exact.frexp_exponent(absmax(x))).clamp(-1000, 1000)
    s1, s2, lo, hi = group_stats(x, exact.pow2(shift_e))
    if use_native(x) and x.dtype == torch.float32:
        weight, bias, scale64, shift64 = _f64_args(weight, bias, scale, shift)
        shift_e = shift_e.contiguous()
        a, c0 = torch.empty((b, c), dtype=torch.float32), torch.empty((b, c), dtype=torch.float32)
        r, s = torch.empty(b, dtype=torch.float32), torch.empty(b, dtype=torch.float64)
        _C.norm_coefficients(_ptr(s1), _ptr(s2), _ptr(lo), _ptr(hi), _ptr(shift_e), b, c, n, groups,
                             _ptr(weight), _ptr(bias), float(eps), _opt_ptr(scale64), _opt_ptr(shift64),
                             scale is not None, bool(silu), _ptr(a), _ptr(c0), _ptr(r), _ptr(s))
        return a, c0, r, s
    return _norm_coefficients_torch(s1, s2, lo, hi, shift_e, n, groups, weight, bias, eps, scale, shift, silu)


def _norm_coefficients_torch(s1, s2, lo, hi, shift_e, n, groups, weight, bias, eps, scale, shift, silu):
    b, c = s1.shape
    total = s1.view(b, groups, c // groups).sum(2).to(torch.float64)  # exact int64 sums, below 2^53
    squares = s2.view(b, groups, c // groups).sum(2).to(torch.float64)
    mean_q = exact.divide(total, float(n))
    var_q = exact.divide(squares, float(n)) - mean_q * mean_q
    var_q = torch.where(var_q > 0.0, var_q, 0.0)
    inv = exact.pow2(-shift_e)[:, None]
    mean, var = mean_q * inv, var_q * inv * inv
    rstd = exact.divide(torch.ones_like(var), exact.sqrt(var + eps))
    a = rstd.repeat_interleave(c // groups, dim=1) * weight
    cc = bias - mean.repeat_interleave(c // groups, dim=1) * a
    if scale is not None:
        one_plus = 1.0 + scale.to(torch.float64)
        a, cc = a * one_plus, cc * one_plus + shift.to(torch.float64)
    a32, c32 = a.to(torch.float32), cc.to(torch.float32)
    y1, y2 = lo * a32 + c32, hi * a32 + c32
    y_lo, y_hi = torch.where(y1 < y2, y1, y2), torch.where(y1 < y2, y2, y1)
    if silu:
        u1, u2 = silu32(y_lo).abs(), silu32(y_hi).abs()
        bound = torch.where(u1 > u2, u1, u2)
        holds_min = (y_lo < SILU_ARGMIN_F32) & (y_hi > SILU_ARGMIN_F32) & (bound < -SILU_MIN_F32)
        bound = torch.where(holds_min, -SILU_MIN_F32, bound)
    else:
        u1, u2 = y_lo.abs(), y_hi.abs()
        bound = torch.where(u1 > u2, u1, u2)
    r, s = inverse_scales(bound.amax(dim=1).to(torch.float64))
    return a32, c32, r.to(torch.float32), s


def _f64_args(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Contiguous binary64 copies (views when they already are) of a kernel's small arguments
    (binary32 ones convert exactly: the twins compute with them in binary64 too)."""
    return tuple(None if t is None else t.to(torch.float64).contiguous() for t in tensors)


def _opt_ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else _ptr(t)


def silu64(x: torch.Tensor) -> torch.Tensor:
    """`exact.silu` (binary64 in, binary64 out), by the C kernel on the CPU (the timestep
    MLP's few values: a call costs a few us instead of ~60)."""
    if use_native(x) and x.dtype == torch.float64:
        x = x.contiguous()
        out = torch.empty_like(x)
        _C.silu64(_ptr(x), _ptr(out), x.numel(), native.threads(x.numel()))
        return out
    return exact.silu(x)


def silu32(y: torch.Tensor) -> torch.Tensor:
    """y sigmoid(y) of binary32 y by binary32 operations in a fixed order (module constants):
    t = clamp(-y, +-87), k = rint(t / ln 2), r = (t - k LN2_HI) - k LN2_LO, e^r by Horner to
    r^7, times 2^k from its bits; y / (e + 1). The C kernels' `silu32` does the same."""
    t = (-y).clamp_(-EXP32_ARG_LIMIT, EXP32_ARG_LIMIT)
    k = torch.round(t * INV_LN2_F32)
    r = t - k * LN2_HI_F32
    r = r - k * LN2_LO_F32
    p = r * EXP32_COEFFS[7] + EXP32_COEFFS[6]
    for coeff in EXP32_COEFFS[5::-1]:
        p = p * r + coeff
    e = p * ((k.to(torch.int32) + 127) << 23).view(torch.float32)
    return y / (e + 1.0)


def norm_act(x: torch.Tensor, a: torch.Tensor, c: torch.Tensor, silu: bool, r: torch.Tensor, form: str
             ) -> torch.Tensor:
    """GroupNorm's affine map, SiLU and quantization in one pass: x [B, P, C] float32 -> the
    integers clamp(rint(f(x a_bc + c_bc) r_b), +-QMAX) in ``form``, in binary32 (a, c [B, C],
    r [B]; f = `silu32` or the identity)."""
    if use_native(x) and all(t.dtype == torch.float32 for t in (x, a, c, r)):
        x, a, c, r = x.contiguous(), a.contiguous(), c.contiguous(), r.contiguous()
        b, p, ch = x.shape
        out = _empty_form((b, p, ch), form)
        _C.norm_act[bool(silu), form](_ptr(x), _ptr(a), _ptr(c), _ptr(r), _ptr(out), b, p, ch, _nchunk(p),
                                      native.threads(x.numel()))
        return out
    y = x * a[:, None, :] + c[:, None, :]  # binary32
    if silu:
        y = silu32(y)
    q = torch.round(y * r.reshape(-1, 1, 1))
    q = torch.where(q < QMAX, q, float(QMAX))
    return _as_form(torch.where(q > -QMAX, q, float(-QMAX)).to(torch.int64), form)


def group_norm_operand(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                       silu: bool, form: str, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm (+ SiLU) of x [B, P, C] binary32 as the next layer's integer operand in
    ``form``, and the value of one integer per image [B]: `norm_plan` then `norm_act` (one
    C call on the CPU)."""
    if not (use_native(x) and x.dtype == torch.float32):
        a, c, r, s = norm_plan(x, groups, weight, bias, eps, silu, scale, shift)
        return norm_act(x, a, c, silu, r, form), s
    x = x.contiguous()
    b, p, ch = x.shape
    n = (ch // groups) * p
    out = _empty_form((b, p, ch), form)
    s = torch.empty(b, dtype=torch.float64)
    weight, bias, scale64, shift64 = _f64_args(weight, bias, scale, shift)
    _C.group_norm[bool(silu), form](
        _ptr(x), groups, (exact.MANTISSA_LIMIT_BITS + 2 - exact.ceil_log2(n)) // 2, _ptr(weight), _ptr(bias),
        float(eps), _opt_ptr(scale64), _opt_ptr(shift64), scale is not None, _ptr(out), _ptr(s), b, p, ch,
        _nchunk(p), native.threads(x.numel()))
    return out, s


Sums = torch.Tensor | tuple[torch.Tensor, ...]
"""A layer's integer sums as `epilogue` takes them (`exact2_products`): the sums v themselves
(binary64 [M, N]); two int8 products (Gh [M, 2N], Gl [M, N]) in binary32; or the same two as
int32 matrix products of the planes' bytes, with the zero point's share of each to subtract
(Ih [M, 2N], Il [M, N], Zh [2N], Zl [N]: Gh = Ih - Zh, Gl = Il - Zl)."""


def _product_parts(G: Sums) -> tuple[torch.Tensor | None, ...]:
    """G as (v, Gh, Gl, Ih, Il, Zh, Zl), the forms it is not as None; checks the shapes."""
    if not isinstance(G, tuple):
        return (G, None, None, None, None, None, None)
    m, n = G[1].shape
    if G[0].shape != (m, 2 * n) or (len(G) == 4 and (G[2].shape != (2 * n,) or G[3].shape != (n,))):
        raise ValueError(f"epilogue: products {[tuple(g.shape) for g in G]} do not match")
    if len(G) == 2:
        return (None, *G, None, None, None, None)
    if len(G) == 4:
        if any(g.dtype != torch.int32 for g in G):
            raise ValueError(f"epilogue: int32 products and shares, not {[g.dtype for g in G]}")
        return (None, None, None, *G)
    raise ValueError(f"epilogue: {len(G)} product tensors (2 or 4)")


def epilogue(G: Sums, pixels: int, s_x: torch.Tensor, s_w: torch.Tensor, bias: torch.Tensor,
             *, add: torch.Tensor | None = None, residual: torch.Tensor | None = None,
             float64: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """A layer's output rows [M, N] from its products G (`Sums`): the sums v [M, N]
    themselves (binary64), or the int8 products (Gh [M, 2N], Gl [M, N]: a_hi's with w_hi and
    with 16 w_lo, a_lo's with w_hi; binary32 integers, or int32 less their zero point's
    shares) whose sum is v = 1024 Gh[:, :N] + 8 (Gh[:, N:] + Gl). With b = row // pixels
    and the binary64 scale S = s_x[b] s_w[n] (the values of one input and one weight
    integer): y = fl32(v S) + bias[n]; then y + add[b, n] (``add``) or residual[row, n] + y
    (``residual``), each one binary32 rounding. ``float64``: y = v S + bias[n] in binary64
    (the output layer; no add or residual). ``out``: a contiguous [M, N] tensor of the output's
    dtype to write the rows into (returned)."""
    if add is not None and residual is not None:
        raise ValueError("epilogue: add or residual, not both")
    forms = _product_parts(G)
    tensors = [g for g in forms if g is not None]
    m, n = (forms[0] if forms[0] is not None else tensors[1]).shape
    out_dtype = torch.float64 if float64 else torch.float32
    if out is not None and (out.shape != (m, n) or out.dtype != out_dtype or not out.is_contiguous()):
        raise ValueError(f"epilogue: out must be a contiguous {out_dtype} [{m}, {n}], got "
                         f"{out.dtype} {tuple(out.shape)}")
    wanted = (torch.float64, torch.float32, torch.float32, torch.int32, torch.int32, torch.int32, torch.int32)
    if s_x.dtype != torch.float64 or s_w.dtype != torch.float64:
        s_x, s_w = s_x.to(torch.float64), s_w.to(torch.float64)
    first = tensors[0]
    if (use_native(first) and all(g is None or g.dtype == d for g, d in zip(forms, wanted))
            and (float64 or all(t is None or t.dtype == torch.float32 for t in (bias, add, residual)))):
        nb = s_x.shape[0]
        if m > nb * pixels or (add is not None and add.shape != (nb, n)) or (
                residual is not None and residual.shape != (m, n)):
            raise ValueError(f"epilogue: {m} rows of {pixels} pixels, {nb} scales, add "
                             f"{None if add is None else tuple(add.shape)}, residual "
                             f"{None if residual is None else tuple(residual.shape)}")
        forms = [None if g is None else g.contiguous() for g in forms]  # (held by a name until the call returns)
        pointers = [_opt_ptr(g) for g in forms]
        s_x, s_w = s_x.contiguous(), s_w.contiguous()
        threads = native.threads(m * n * (1 if forms[0] is not None else 3))
        out = torch.empty((m, n), dtype=out_dtype) if out is None else out
        if float64:
            bias = bias.to(torch.float64).contiguous()
            _C.epilogue64(*pointers, m, n, pixels, _ptr(s_x), nb, _ptr(s_w), _ptr(bias), _ptr(out), threads)
            return out
        mode = 1 if add is not None else 2 if residual is not None else 0
        bias = bias.contiguous()
        add = None if add is None else add.contiguous()
        residual = None if residual is None else residual.contiguous()
        _C.epilogue(*pointers, m, n, pixels, _ptr(s_x), nb, _ptr(s_w), _ptr(bias), _opt_ptr(add),
                    _opt_ptr(residual), mode, _ptr(out), threads)
        return out
    v = sums(G)
    rows = torch.arange(m, device=first.device) // pixels
    S = s_x[rows][:, None] * s_w[None, :]
    if float64:
        y = v * S + bias
    else:
        y = (v * S).to(torch.float32) + bias
        if add is not None:
            y = y + add[rows]
        elif residual is not None:
            y = residual + y
    return y if out is None else out.copy_(y)


def sums(G: Sums) -> torch.Tensor:
    """The sums v [M, N] of `epilogue`'s products, in binary64 (exact: integers below 2^53)."""
    if not isinstance(G, tuple):
        return G.to(torch.float64)
    if len(G) == 4:  # int32 products less the zero point's shares: exact int32 differences
        G = (G[0] - G[2], G[1] - G[3])
    hi, lo = G[0].to(torch.float64), G[1].to(torch.float64)
    n = lo.shape[1]
    return hi[:, :n] * 1024.0 + (hi[:, n:] + lo) * 8.0


def softmax_weights(scores: torch.Tensor, c: torch.Tensor, weight_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [R, T] exact integers (binary64), c [R] binary64 -> (weights rint(2^P e^((s - max_row s) c_row)),
    integers in [0, 2^P], in place; their row sums [R], exact), P = ``weight_bits``; the
    exponent's argument clamped to [-700, 700] as `exact.exp` clamps it (the C kernel: a NaN
    argument, from a NaN or infinite score or c, to -700)."""
    scale = float(2**weight_bits)
    if use_native(scores) and scores.dtype == torch.float64 and scores.is_contiguous() and scores.shape[1]:
        r, t = scores.shape
        den = torch.empty(r, dtype=torch.float64)
        c = c.to(torch.float64).contiguous()
        _C.softmax_weights(_ptr(scores), _ptr(c), r, t, scale, _ptr(den), native.threads(scores.numel()))
        return scores, den
    t = (scores - scores.amax(dim=-1, keepdim=True)) * c[:, None]
    w = exact.exp(t.clamp_(min=-exact.EXP_ARG_LIMIT)).mul_(scale).round_()
    return w, w.sum(dim=-1)
