"""The elementwise and data-movement kernels of exact-arithmetic contract 2 (`exact_net2`).

Contract 2 computes every matrix product on integers of at most 14 bits (|a| <= `QMAX`),
each stored as two int8 parts a = 128 a_hi + a_lo with both parts in [-64, 63]:

- the parts go through int8 x int8 -> int32 matrix products (`int_products`, oneDNN's VNNI /
  AMX kernels on the CPU): with every operand in [-64, 63], even the AVX2 / AVX-512 kernels
  without VNNI, which add pairs of u8 x s8 products in int16 with saturation (and shift a
  signed operand by 128 to make it unsigned), cannot saturate (2 x 191 x 64 < 2^15), and each
  int32 sum stays below K 2^12 (K < 2^19). So the four part products are exact integers
  whatever the library, ISA, blocking or thread count; `epilogue` recombines them into the
  exact dot product v = 2^14 G_hh + 2^7 (G_hl + G_lh) + G_ll (an int64);
- everything around the products is written here once per kernel, twice: a numba kernel for
  the CPU (one pass over memory, threads over independent outputs) and a torch twin (the same
  operations in the same order, for a GPU, and for a CPU without numba). Both use only
  integer arithmetic and IEEE-754 binary32 / binary64 + - x / and rint / floor (round half to
  even), one operation at a time: no libm call (SiLU's exponential is `exact.exp`'s
  polynomial, ported operation for operation in `_silu64`), no fused multiply-add (numba
  compiles without fast-math, so LLVM forms none; tests/test_exact2_kernels.py checks the
  machine code), no sum whose rounding depends on its order (GroupNorm's sums are int64 sums
  of fixed-point integers; maxima are order-free).

Tensors: activations are float32 [B, P, C] (channels-last: P pixels, C channels); int8
parts are [2, B, P, C] (part 0 the high part); per-image values are [B].
"""

from __future__ import annotations

import os

import numpy as np
import torch

from diffcodec import exact

QMAX = 8063
"""Largest magnitude of a quantized activation or weight: 128 a_hi + a_lo with a_hi in
[-63, 63] and a_lo in [-64, 63] covers [-8128, 8127]; 8063 = 63 x 128 - 1 keeps
a_hi = floor((a + 64) / 128) within [-63, 63] for every |a| <= QMAX."""
PART_BITS = 7
PART_SCALE = 1 << PART_BITS  # a = PART_SCALE a_hi + a_lo
SILU_MIN = -0.27846454276107380  # min over y of y sigmoid(y) (at y = -1.27846454276...), a literal
SILU_ARGMIN = -1.2784645427610738

try:  # the CPU kernels; without numba the torch twins run instead (same bits, slower)
    import numba
    from llvmlite import ir as _llvm_ir
    from numba import prange, types as _nb_types
    from numba.core.extending import intrinsic as _intrinsic
except ImportError:  # pragma: no cover - numba is a dependency; this keeps a broken install usable
    numba = None
else:
    if "NUMBA_THREADING_LAYER" not in os.environ:
        # numba's own thread pool: its OpenMP layer would share (and reset) torch's OpenMP
        # runtime's thread count, and spin beside torch's threads
        numba.config.THREADING_LAYER = "workqueue"


def numba_available() -> bool:
    return numba is not None and os.environ.get("DIFFCODEC_NO_NUMBA", "") == ""


def use_numba(t: torch.Tensor) -> bool:
    """The numba kernels run on CPU tensors when numba is installed (DIFFCODEC_NO_NUMBA=1: never)."""
    return t.device.type == "cpu" and numba_available()


def sync_threads() -> None:
    """numba's CPU kernels use as many threads as torch's (`runtime.use_threads` sets torch's)."""
    if numba_available():
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


# ------------------------------------------------------------------------ exact.exp, scalar

_EXP_COEFFS = tuple(exact._INV_FACTORIAL)  # 1/n!, n = 0..13, as exact.exp uses them

if numba is not None:
    _C = _EXP_COEFFS

    def njit(*args, **kwargs):
        """numba.njit without Python's division-by-zero checks (IEEE results instead, as
        torch's), which would keep LLVM from vectorising; never fast-math."""
        return numba.njit(*args, error_model="numpy", **kwargs)

    @_intrinsic
    def _f64_from_bits(typingctx, bits):
        """The binary64 whose bits are an int64 (a bitcast; exact.pow2 builds 2^k so)."""
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], _llvm_ir.DoubleType())
        return _nb_types.float64(_nb_types.int64), codegen

    @njit(inline="always")
    def _exp_clamped(t):
        """exact._exp_of_clamped for one binary64 t in [-700, 700], operation for operation."""
        k = np.rint(t * exact.INV_LN2)
        r = t - k * exact.LN2_HI
        r = r - k * exact.LN2_LO
        p = r * _C[13] + _C[12]
        p = p * r + _C[11]
        p = p * r + _C[10]
        p = p * r + _C[9]
        p = p * r + _C[8]
        p = p * r + _C[7]
        p = p * r + _C[6]
        p = p * r + _C[5]
        p = p * r + _C[4]
        p = p * r + _C[3]
        p = p * r + _C[2]
        p = p * r + _C[1]
        p = p * r + _C[0]
        return p * _f64_from_bits((np.int64(k) + 1023) << 52)  # exact.pow2(k)

    @njit(inline="always")
    def _silu64(y):
        """exact.silu for one binary64 y: y / (1 + e^-y), -y clamped to [-700, 700]."""
        t = -y
        t = t if t < exact.EXP_ARG_LIMIT else exact.EXP_ARG_LIMIT
        t = t if t > -exact.EXP_ARG_LIMIT else -exact.EXP_ARG_LIMIT
        return y / (_exp_clamped(t) + 1.0)

    @njit(inline="always")
    def _split_store(a, out, b, p, c):
        h = (a + 64) >> 7
        out[0, b, p, c] = h
        out[1, b, p, c] = a - (h << 7)

    @njit(inline="always")
    def _quantize_scalar(v, r):
        a = np.rint(v * r)
        a = a if a < QMAX else np.float64(QMAX)  # NaN -> QMAX, as the torch twin
        return np.int64(a if a > -QMAX else np.float64(-QMAX))

    def _chunks(total: int) -> int:
        return max(1, min(total, 64))

    @njit(inline="always")
    def _job_range(job, nchunk, P):
        """(image, first pixel, end pixel) of one parallel job: image job // nchunk, its chunk job % nchunk."""
        b = job // nchunk
        k = job - b * nchunk
        step = (P + nchunk - 1) // nchunk
        return b, k * step, min(P, (k + 1) * step)

    @njit(parallel=True, cache=True)
    def _absmax_nb(x, nchunk):
        """max |x| per image of x [B, P, C]: a running max per channel (vectorisable), then over chunks."""
        B, P, C = x.shape
        part = np.zeros((B, nchunk, C), np.float32)
        for job in prange(B * nchunk):
            b, p0, p1 = _job_range(job, nchunk, P)
            m = part[b, job - b * nchunk]
            for p in range(p0, p1):
                for c in range(C):
                    v = abs(x[b, p, c])
                    m[c] = v if v > m[c] else m[c]
        out = np.zeros(B, np.float32)
        for b in range(B):
            for k in range(nchunk):
                for c in range(C):
                    if part[b, k, c] > out[b]:
                        out[b] = part[b, k, c]
        return out

    @njit(parallel=True, cache=True)
    def _quantize_parts_nb(x, r, out, nchunk):
        B, P, C = x.shape
        for job in prange(B * nchunk):
            b, p0, p1 = _job_range(job, nchunk, P)
            rb = r[b]
            for p in range(p0, p1):
                for c in range(C):
                    _split_store(_quantize_scalar(np.float64(x[b, p, c]), rb), out, b, p, c)

    @njit(parallel=True, cache=True)
    def _quantize_values_nb(x, r, out, nchunk):
        B, P, C = x.shape
        for job in prange(B * nchunk):
            b, p0, p1 = _job_range(job, nchunk, P)
            rb = r[b]
            for p in range(p0, p1):
                for c in range(C):
                    out[b, p, c] = np.float64(_quantize_scalar(np.float64(x[b, p, c]), rb))

    @njit(parallel=True, cache=True)
    def _group_stats_nb(x, scale, nchunk):
        B, P, C = x.shape
        s1 = np.zeros((B, nchunk, C), np.int64)
        s2 = np.zeros((B, nchunk, C), np.int64)
        lo = np.full((B, nchunk, C), np.inf, np.float32)
        hi = np.full((B, nchunk, C), -np.inf, np.float32)
        for job in prange(B * nchunk):
            b, p0, p1 = _job_range(job, nchunk, P)
            k = job - b * nchunk
            sb = scale[b]
            t1, t2, mn, mx = s1[b, k], s2[b, k], lo[b, k], hi[b, k]
            for p in range(p0, p1):
                for c in range(C):
                    v = x[b, p, c]
                    q = np.int64(np.rint(np.float64(v) * sb))
                    t1[c] += q
                    t2[c] += q * q
                    mn[c] = v if v < mn[c] else mn[c]
                    mx[c] = v if v > mx[c] else mx[c]
        t1 = np.zeros((B, C), np.int64)
        t2 = np.zeros((B, C), np.int64)
        mn = np.full((B, C), np.inf, np.float32)
        mx = np.full((B, C), -np.inf, np.float32)
        for b in range(B):
            for k in range(nchunk):
                for c in range(C):
                    t1[b, c] += s1[b, k, c]
                    t2[b, c] += s2[b, k, c]
                    mn[b, c] = min(mn[b, c], lo[b, k, c])
                    mx[b, c] = max(mx[b, c], hi[b, k, c])
        return t1, t2, mn, mx

    @njit(inline="always")
    def _scales(m):
        """inverse_scales for one max |value|: (QMAX / m, m / QMAX), (0, 0) for m == 0."""
        if m == 0.0:
            return 0.0, 0.0
        return np.float64(QMAX) / m, m / np.float64(QMAX)

    @njit(cache=True)
    def _norm_coefficients_nb(s1, s2, lo, hi, shift_e, n, groups, weight, bias, eps, scale, shift, has_scale,
                              silu):
        """The binary64 operations of `_norm_coefficients_torch`, in the same order."""
        B, C = s1.shape
        cg = C // groups
        a = np.empty((B, C), np.float64)
        c0 = np.empty((B, C), np.float64)
        r = np.empty(B, np.float64)
        s = np.empty(B, np.float64)
        for b in range(B):
            inv = _f64_from_bits((np.int64(-shift_e[b]) + 1023) << 52)
            m = 0.0
            for g in range(groups):
                total = np.int64(0)
                squares = np.int64(0)
                for ch in range(g * cg, (g + 1) * cg):
                    total += s1[b, ch]
                    squares += s2[b, ch]
                mean_q = np.float64(total) / np.float64(n)
                var_q = np.float64(squares) / np.float64(n) - mean_q * mean_q
                var_q = var_q if var_q > 0.0 else 0.0
                mean = mean_q * inv
                var = var_q * inv * inv
                rstd = 1.0 / np.sqrt(var + eps)
                for ch in range(g * cg, (g + 1) * cg):
                    ab = rstd * weight[ch]
                    cb = bias[ch] - mean * ab
                    if has_scale:
                        one_plus = 1.0 + np.float64(scale[b, ch])
                        ab = ab * one_plus
                        cb = cb * one_plus + np.float64(shift[b, ch])
                    a[b, ch] = ab
                    c0[b, ch] = cb
                    y1 = np.float64(lo[b, ch]) * ab + cb
                    y2 = np.float64(hi[b, ch]) * ab + cb
                    y_lo = y1 if y1 < y2 else y2
                    y_hi = y2 if y1 < y2 else y1
                    if silu:
                        u1 = abs(_silu64(y_lo))
                        u2 = abs(_silu64(y_hi))
                        bound = u1 if u1 > u2 else u2
                        if y_lo < SILU_ARGMIN and y_hi > SILU_ARGMIN and bound < -SILU_MIN:
                            bound = -SILU_MIN
                    else:
                        u1 = abs(y_lo)
                        u2 = abs(y_hi)
                        bound = u1 if u1 > u2 else u2
                    m = bound if bound > m else m
            r[b], s[b] = _scales(m)
        return a, c0, r, s

    @njit(inline="always")
    def _affine_silu(x, a, c):
        return _silu64(np.float64(x) * a + c)

    @njit(inline="always")
    def _affine(x, a, c):
        return np.float64(x) * a + c

    @njit(parallel=True, cache=True)
    def _norm_silu_parts_nb(x, a, c0, r, out, nchunk):
        B, P, C = x.shape
        for job in prange(B * nchunk):
            b, p0, p1 = _job_range(job, nchunk, P)
            rb, ab, cb = r[b], a[b], c0[b]
            for p in range(p0, p1):
                for c in range(C):
                    _split_store(_quantize_scalar(_affine_silu(x[b, p, c], ab[c], cb[c]), rb), out, b, p, c)

    @njit(parallel=True, cache=True)
    def _norm_parts_nb(x, a, c0, r, out, nchunk):
        B, P, C = x.shape
        for job in prange(B * nchunk):
            b, p0, p1 = _job_range(job, nchunk, P)
            rb, ab, cb = r[b], a[b], c0[b]
            for p in range(p0, p1):
                for c in range(C):
                    _split_store(_quantize_scalar(_affine(x[b, p, c], ab[c], cb[c]), rb), out, b, p, c)

    @njit(parallel=True, cache=True)
    def _norm_silu_values_nb(x, a, c0, r, out, nchunk):
        B, P, C = x.shape
        for job in prange(B * nchunk):
            b, p0, p1 = _job_range(job, nchunk, P)
            rb, ab, cb = r[b], a[b], c0[b]
            for p in range(p0, p1):
                for c in range(C):
                    out[b, p, c] = np.float64(_quantize_scalar(_affine_silu(x[b, p, c], ab[c], cb[c]), rb))

    @njit(parallel=True, cache=True)
    def _norm_values_nb(x, a, c0, r, out, nchunk):
        B, P, C = x.shape
        for job in prange(B * nchunk):
            b, p0, p1 = _job_range(job, nchunk, P)
            rb, ab, cb = r[b], a[b], c0[b]
            for p in range(p0, p1):
                for c in range(C):
                    out[b, p, c] = np.float64(_quantize_scalar(_affine(x[b, p, c], ab[c], cb[c]), rb))

    @njit(parallel=True, cache=True)
    def _im2col_nb(parts, k, stride, pad_top, pad_left, up, out_h, out_w, out):
        """Flat byte copies: where a kernel row's k taps lie side by side inside the input
        (stride 1, no upsampling, not at a border) one copy of k C bytes, else tap by tap."""
        _, B, H, W, C = parts.shape
        hu, wu = H * up, W * up  # the (nearest-)upsampled grid the kernel slides over
        flat_in = parts.reshape(2, B, H, W * C)
        flat_out = out.reshape(out.shape[0], out.shape[1] * out.shape[2])
        width = k * k * C
        for job in prange(2 * B * out_h):
            part = job // (B * out_h)
            rest = job - part * B * out_h
            b = rest // out_h
            oy = rest - b * out_h
            src_part = flat_in[part, b]
            dst = flat_out[part]
            for ox in range(out_w):
                start = ((b * out_h + oy) * out_w + ox) * width
                x0 = ox * stride - pad_left
                for i in range(k):
                    yy = oy * stride + i - pad_top
                    base = start + i * k * C
                    if yy < 0 or yy >= hu:
                        for e in range(k * C):
                            dst[base + e] = 0
                    elif up == 1 and x0 >= 0 and x0 + k <= W:
                        src = src_part[yy]
                        s0 = x0 * C
                        for e in range(k * C):
                            dst[base + e] = src[s0 + e]
                    else:
                        src = src_part[yy // up]
                        for j in range(k):
                            xx = x0 + j
                            if xx < 0 or xx >= wu:
                                for e in range(C):
                                    dst[base + j * C + e] = 0
                            else:
                                s0 = (xx // up) * C
                                for e in range(C):
                                    dst[base + j * C + e] = src[s0 + e]

    @njit(inline="always")
    def _combine(G, m, row, n, N):
        hh = np.int64(G[row, n])
        hl = np.int64(G[row, N + n])
        lh = np.int64(G[m + row, n])
        ll = np.int64(G[m + row, N + n])
        return (hh * PART_SCALE + hl + lh) * PART_SCALE + ll

    @njit(inline="always")
    def _finish_row(y, n, mode, add, residual, b, row):
        """y + add[b, n] (mode 1) or residual[row, n] + y (mode 2), one binary32 addition."""
        if mode == 1:
            return y + add[b, n]
        if mode == 2:
            return residual[row, n] + y
        return y

    @njit(parallel=True, cache=True)
    def _epilogue_parts_nb(G, P, S, bias, add, residual, mode, out):
        M, N = out.shape
        for row in prange(M):
            b = row // P
            for n in range(N):
                y = np.float32(np.float64(_combine(G, M, row, n, N)) * S[b, n]) + bias[n]
                out[row, n] = _finish_row(y, n, mode, add, residual, b, row)

    @njit(parallel=True, cache=True)
    def _epilogue_values_nb(V, P, S, bias, add, residual, mode, out):
        M, N = out.shape
        for row in prange(M):
            b = row // P
            for n in range(N):
                y = np.float32(V[row, n] * S[b, n]) + bias[n]
                out[row, n] = _finish_row(y, n, mode, add, residual, b, row)

    @njit(parallel=True, cache=True)
    def _epilogue64_parts_nb(G, P, S, bias, out):
        M, N = out.shape
        for row in prange(M):
            b = row // P
            for n in range(N):
                out[row, n] = np.float64(_combine(G, M, row, n, N)) * S[b, n] + bias[n]

    @njit(parallel=True, cache=True)
    def _softmax_weights_nb(scores, c, weight_scale):
        """scores [R, T] exact integers (binary64) -> integer weights rint(2^P e^((s - max) c_row)) in place, and
        row sums."""
        R, T = scores.shape
        den = np.zeros(R, np.float64)
        for row in prange(R):
            s = scores[row]
            m = s[0]
            for j in range(1, T):
                m = s[j] if s[j] > m else m
            cr = c[row]
            for j in range(T):
                t = (s[j] - m) * cr
                t = t if t > -exact.EXP_ARG_LIMIT else -exact.EXP_ARG_LIMIT
                s[j] = np.rint(_exp_clamped(t) * weight_scale)
            total = 0.0
            for j in range(T):
                total += s[j]  # integers below 2^53: exact in any order
            den[row] = total
        return den


# ------------------------------------------------------------------------- the kernels
#
# An integer operand of a product comes in one of two forms, chosen per layer for speed
# (the same integers either way, so the choice changes no bit): PARTS, int8 [2, B, P, C]
# for the int8 products, or VALUES, the integers themselves in binary64 [B, P, C] for a
# binary64 matrix product (exact: every dot product of 14-bit integers over K < 2^25 terms
# stays below 2^53), which is faster where the fan-in is small or on a GPU.

PARTS, VALUES = "parts", "values"


def _nchunk(pixels: int) -> int:
    return _chunks(pixels // 64 + 1)


def absmax(x: torch.Tensor) -> torch.Tensor:
    """max |x| of each image: x [B, P, C] float32 (numba) or any [B, ...] -> [B] (order-free)."""
    if use_numba(x) and x.dtype == torch.float32 and x.dim() == 3:
        x = x.contiguous()
        return torch.from_numpy(_absmax_nb(x.numpy(), _nchunk(x.shape[1])))
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


def _split_torch(a: torch.Tensor) -> torch.Tensor:
    """int64 a in [-QMAX, QMAX] -> int8 [2, ...]: (floor((a + 64) / 128), a - 128 hi)."""
    hi = torch.div(a + 64, PART_SCALE, rounding_mode="floor")
    return torch.stack([hi, a - hi * PART_SCALE]).to(torch.int8)


def _quantize_torch(v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """clamp(rint(v r), +-QMAX) as int64, v and r binary64 (r broadcast); NaN -> QMAX."""
    a = torch.round(v * r)
    a = torch.where(a < QMAX, a, float(QMAX))
    return torch.where(a > -QMAX, a, float(-QMAX)).to(torch.int64)


def _as_form(a: torch.Tensor, form: str) -> torch.Tensor:
    return _split_torch(a) if form == PARTS else a.to(torch.float64)


def _empty_form(shape: tuple[int, ...], form: str) -> torch.Tensor:
    return torch.empty((2, *shape), dtype=torch.int8) if form == PARTS else torch.empty(shape, dtype=torch.float64)


def quantize(x: torch.Tensor, r: torch.Tensor, form: str) -> torch.Tensor:
    """x [B, P, C] (binary32 or binary64) -> the integers clamp(rint(x r_b), +-QMAX) in ``form``."""
    if use_numba(x):
        x = x.contiguous()
        out = _empty_form(tuple(x.shape), form)
        kernel = _quantize_parts_nb if form == PARTS else _quantize_values_nb
        kernel(x.numpy(), r.contiguous().numpy(), out.numpy(), _nchunk(x.shape[1]))
        return out
    return _as_form(_quantize_torch(x.to(torch.float64), r.reshape(-1, 1, 1)), form)


def group_stats(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per image and channel of x [B, P, C] float32, with q = rint(x scale_b) (scale a power
    of two, so q is exact): (sum q, sum q^2) int64 [B, C] and (min x, max x) float32 [B, C]."""
    if use_numba(x):
        x = x.contiguous()
        out = _group_stats_nb(x.numpy(), scale.contiguous().numpy(), _nchunk(x.shape[1]))
        return tuple(torch.from_numpy(o) for o in out)
    q = torch.round(x.to(torch.float64) * scale.reshape(-1, 1, 1)).to(torch.int64)
    return q.sum(dim=1), (q * q).sum(dim=1), x.amin(dim=1), x.amax(dim=1)


def norm_plan(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float, silu: bool,
              scale: torch.Tensor | None = None, shift: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupNorm of x [B, P, C] binary32 as y = x a + c, and the next layer's input scale:
    returns (a, c) binary64 [B, C] and (r, s) binary64 [B] (`inverse_scales` of the bound on
    max |f(y)| over each image, f = SiLU or the identity; ``scale``/``shift`` [B, C]: the
    scale-shift ResBlock's norm(h) (1 + scale) + shift, folded into a and c).

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
    has_scale = scale is not None
    if use_numba(x):
        dummy = np.zeros((1, 1), np.float32)
        out = _norm_coefficients_nb(s1.numpy(), s2.numpy(), lo.numpy(), hi.numpy(), shift_e.numpy(), n, groups,
                                    weight.numpy(), bias.numpy(), float(eps),
                                    scale.contiguous().numpy() if has_scale else dummy,
                                    shift.contiguous().numpy() if has_scale else dummy, has_scale, bool(silu))
        return tuple(torch.from_numpy(o) for o in out)
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
    y1 = lo.to(torch.float64) * a + cc
    y2 = hi.to(torch.float64) * a + cc
    y_lo, y_hi = torch.where(y1 < y2, y1, y2), torch.where(y1 < y2, y2, y1)
    if silu:
        u1, u2 = exact.silu(y_lo).abs(), exact.silu(y_hi).abs()
        bound = torch.where(u1 > u2, u1, u2)
        holds_min = (y_lo < SILU_ARGMIN) & (y_hi > SILU_ARGMIN) & (bound < -SILU_MIN)
        bound = torch.where(holds_min, -SILU_MIN, bound)
    else:
        u1, u2 = y_lo.abs(), y_hi.abs()
        bound = torch.where(u1 > u2, u1, u2)
    r, s = inverse_scales(bound.amax(dim=1))
    return a, cc, r, s


def norm_act(x: torch.Tensor, a: torch.Tensor, c: torch.Tensor, silu: bool, r: torch.Tensor, form: str
             ) -> torch.Tensor:
    """GroupNorm's affine map, SiLU and quantization in one pass: x [B, P, C] float32 -> the
    integers clamp(rint(f(x a_bc + c_bc) r_b), +-QMAX) in ``form``, f = exact.silu or the
    identity; a, c binary64 [B, C], r binary64 [B]."""
    if use_numba(x):
        x = x.contiguous()
        out = _empty_form(tuple(x.shape), form)
        kernel = {(True, PARTS): _norm_silu_parts_nb, (False, PARTS): _norm_parts_nb,
                  (True, VALUES): _norm_silu_values_nb, (False, VALUES): _norm_values_nb}[(bool(silu), form)]
        kernel(x.numpy(), a.contiguous().numpy(), c.contiguous().numpy(), r.contiguous().numpy(), out.numpy(),
               _nchunk(x.shape[1]))
        return out
    y = x.to(torch.float64) * a[:, None, :] + c[:, None, :]
    if silu:
        y = exact.silu(y)
    return _as_form(_quantize_torch(y, r.reshape(-1, 1, 1)), form)


def im2col(operand: torch.Tensor, k: int, stride: int, pads: tuple[int, int, int, int], up: int = 1
           ) -> tuple[torch.Tensor, int, int]:
    """An operand [2, B, H, W, C] (parts) or [B, H, W, C] (values) -> the column matrix of a
    k x k convolution, rows the output pixels (for parts, [2 B Ho Wo, k k C], part 0's rows
    first), columns (kernel row, kernel column, channel), over the input upsampled ``up``
    times (nearest) and zero-padded by ``pads`` = (top, left, bottom, right); returns
    (columns, Ho, Wo). Data movement only."""
    parts = operand.dtype == torch.int8
    src = operand if parts else operand.unsqueeze(0)
    _, b, h, w, c = src.shape
    top, left, bottom, right = pads
    out_h = (h * up + top + bottom - k) // stride + 1
    out_w = (w * up + left + right - k) // stride + 1
    rows = (2 if parts else 1) * b * out_h * out_w
    if use_numba(operand) and parts:
        out = torch.empty((2, b * out_h * out_w, k * k * c), dtype=torch.int8)
        unit = next(dt for dt, size in ((torch.int64, 8), (torch.int32, 4), (torch.int8, 1)) if c % size == 0)
        _im2col_nb(src.contiguous().view(unit).numpy(), k, stride, top, left, up, out_h, out_w,
                   out.view(unit).numpy())  # copied in units of up to 8 bytes: several times faster than bytes
        return out.view(rows, k * k * c), out_h, out_w
    if up > 1:
        src = src.repeat_interleave(up, dim=2).repeat_interleave(up, dim=3)
    src = torch.nn.functional.pad(src, (0, 0, left, right, top, bottom))
    cols = torch.cat([src[:, :, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
                      for i in range(k) for j in range(k)], dim=4)
    return cols.reshape(rows, k * k * c), out_h, out_w


def split_weights(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float weights [N, K] -> (int8 parts [K, 2N]: each row's clamp(rint(w QMAX / max |w_row|)),
    high parts in columns 0..N-1, stored column-major for the product; the same integers in
    binary64 [K, N]; the value of one integer per row, binary64 [N])."""
    w64 = w.detach().to("cpu", torch.float64)
    r, s = inverse_scales(w64.abs().amax(dim=1))
    ints = _quantize_torch(w64, r[:, None])  # [N, K]
    parts = _split_torch(ints)  # [2, N, K]
    return torch.cat([parts[0], parts[1]], dim=0).T, ints.to(torch.float64).T.contiguous(), s


def products(cols: torch.Tensor, w_parts: torch.Tensor, w_values: torch.Tensor) -> torch.Tensor:
    """The exact integer products of a column matrix and a layer's weights: for int8 parts
    [2M, K], the four part products [2M, 2N] (int32, oneDNN's int8 kernels on the CPU; binary64
    on a GPU); for values [M, K], the dot products themselves [M, N] in binary64."""
    if cols.dtype != torch.int8:
        return torch.mm(cols, w_values)
    if cols.device.type == "cpu":
        return torch._int_mm(cols, w_parts)
    return torch.mm(cols.to(torch.float64), w_parts.to(torch.float64))


def epilogue(G: torch.Tensor, parts: bool, pixels: int, S: torch.Tensor, bias: torch.Tensor, *,
             add: torch.Tensor | None = None, residual: torch.Tensor | None = None,
             float64: bool = False) -> torch.Tensor:
    """A layer's output rows [M, N] from `products`' G (``parts``: the four part products;
    else the dot products v): y = fl32(v S[b, n]) + bias[n] with b = row // pixels; then
    y + add[b, n] (``add``) or residual[row, n] + y (``residual``), each one binary32 rounding.
    ``float64``: y = v S[b, n] + bias[n] in binary64 (the output layer; no add or residual)."""
    if add is not None and residual is not None:
        raise ValueError("epilogue: add or residual, not both")
    m, n = (G.shape[0] // 2, G.shape[1] // 2) if parts else G.shape
    if use_numba(G) and (G.dtype == torch.int32 if parts else G.dtype == torch.float64):
        if float64:
            out = torch.empty((m, n), dtype=torch.float64)
            if parts:
                _epilogue64_parts_nb(G.numpy(), pixels, S.contiguous().numpy(), bias.contiguous().numpy(), out.numpy())
                return out
        else:
            out = torch.empty((m, n), dtype=torch.float32)
            mode = 1 if add is not None else 2 if residual is not None else 0
            dummy = np.zeros((1, 1), np.float32)
            kernel = _epilogue_parts_nb if parts else _epilogue_values_nb
            kernel(G.numpy(), pixels, S.contiguous().numpy(), bias.contiguous().numpy(),
                   add.contiguous().numpy() if add is not None else dummy,
                   residual.contiguous().numpy() if residual is not None else dummy, mode, out.numpy())
            return out
    v = _dot_torch(G, parts)
    rows = torch.arange(m, device=G.device) // pixels
    if float64:
        return v * S[rows] + bias
    y = (v * S[rows]).to(torch.float32) + bias
    if add is not None:
        y = y + add[rows]
    elif residual is not None:
        y = residual + y
    return y


def _dot_torch(G: torch.Tensor, parts: bool) -> torch.Tensor:
    """The dot products v in binary64 (exact: below 2^53)."""
    if not parts:
        return G.to(torch.float64)
    g = G.to(torch.int64)
    m, n = g.shape[0] // 2, g.shape[1] // 2
    return ((g[:m, :n] * PART_SCALE + g[:m, n:] + g[m:, :n]) * PART_SCALE + g[m:, n:]).to(torch.float64)


def softmax_weights(scores: torch.Tensor, c: torch.Tensor, weight_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [R, T] exact integers (binary64), c [R] binary64 -> (weights rint(2^P e^((s - max_row s) c_row)),
    integers in [0, 2^P], in place; their row sums [R], exact), P = ``weight_bits``; the
    exponent's argument clamped at -700 as `exact.exp` clamps it."""
    scale = float(2**weight_bits)
    if use_numba(scores):
        den = _softmax_weights_nb(scores.numpy(), c.contiguous().numpy(), scale)
        return scores, torch.from_numpy(den)
    t = (scores - scores.amax(dim=-1, keepdim=True)) * c[:, None]
    w = exact.exp(t.clamp_(min=-exact.EXP_ARG_LIMIT)).mul_(scale).round_()
    return w, w.sum(dim=-1)
