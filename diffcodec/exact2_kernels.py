"""The elementwise kernels of exact-arithmetic contract 2 (`exact_net2`).

Contract 2 computes every convolution and linear layer from exact integer sums of its
quantized input (14-bit integers, |a| <= `QMAX`) and weights (the products themselves and the
weights' 10 bits: `exact2_products`). Around the
products, each layer's elementwise work (quantizing an input, GroupNorm's statistics, its
affine map and SiLU, the epilogue that scales the integer sums, the attention's softmax
weights) is written here once per kernel, twice: a numba kernel for the CPU (one pass over
memory, threads over independent outputs) and a torch twin (the same operations in the same
order: for a GPU, and for a CPU without numba). Both use only integer arithmetic and
IEEE-754 binary32 / binary64 + - x / sqrt and rint / floor (round half to even), one
operation at a time: no libm call (SiLU's exponential is `exact.exp`'s polynomial, ported
operation for operation in `_silu64`), no fused multiply-add (numba compiles without
fast-math, so LLVM forms none: tests/test_exact2_kernels.py checks the machine code), no
sum whose rounding depends on its order (GroupNorm's sums are int64 sums of fixed-point
integers; maxima are order-free). So the numba kernels and their twins give the same bits.

An integer operand comes in one of two forms (`exact2_products` picks one per layer for
speed; the integers, hence the results, are the same):

- STACKED, uint8 [B, P, 2C]: each integer as two parts a = 128 a_hi + a_lo with a_hi in
  [-63, 63] and a_lo in [-64, 63], stored as a_hi + 64 (channels 0..C-1) and a_lo + 64
  (channels C..2C-1): the input of oneDNN's int8 convolution (zero point 64);
- VALUES, binary64 [B, P, C]: the integers themselves, for a binary64 matrix product.

Tensors: activations are binary32 [B, P, C] (channels-last: P pixels, C channels); per-image
values are [B].
"""

from __future__ import annotations

import math
import os
import types

import numpy as np
import torch

from diffcodec import exact

QMAX = 8063
"""Largest magnitude of a quantized activation or weight: 128 a_hi + a_lo with a_hi in
[-63, 63] and a_lo in [-64, 63] covers [-8128, 8127]; 8063 = 63 x 128 - 1 keeps
a_hi = floor((a + 64) / 128) within [-63, 63] for every |a| <= QMAX."""
PART_BITS = 7
PART_SCALE = 1 << PART_BITS  # a = PART_SCALE a_hi + a_lo
ZERO_POINT = 64  # a STACKED part p is stored as the uint8 p + 64, in [1, 127]
STACKED, VALUES = "stacked", "values"
PARALLEL_MIN_WORK = 1 << 16
"""Elements from which a numba kernel runs on several threads (a launch costs ~50 us)."""
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

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: numba's cache goes without the lock
    fcntl = None

try:  # the CPU kernels; without numba the torch twins run instead (same bits, slower)
    import numba
    from llvmlite import ir as _llvm_ir
    from numba import prange, types as _nb_types
    from numba.core.extending import intrinsic as _intrinsic
except ImportError:  # pragma: no cover - numba is a dependency; this keeps a broken install usable
    numba = None
else:
    if "NUMBA_THREADING_LAYER" not in os.environ and "NUMBA_THREADING_LAYER_PRIORITY" not in os.environ:
        # OpenMP first: where torch's OpenMP runtime is GNU's (Linux CPU builds), numba's OpenMP
        # layer loads the same runtime, so both run on one pool of threads (measured 2x faster
        # at 2 threads than numba's own 'workqueue' pool, whose threads and torch's spin against
        # each other); then TBB, then the workqueue
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]


NUMBA_ON = numba is not None and os.environ.get("DIFFCODEC_NO_NUMBA", "") == ""
"""Whether the numba kernels run: numba is installed and DIFFCODEC_NO_NUMBA was not set when
diffcodec was imported (read once: a lookup per kernel call cost 1-4% of a batch-1 forward,
measured A/B in one process)."""


def numba_available() -> bool:
    return NUMBA_ON


def use_numba(t: torch.Tensor) -> bool:
    """The numba kernels run on CPU tensors when `NUMBA_ON`."""
    return NUMBA_ON and t.is_cpu


_pool_started = False
_numba_threads = 0
"""The thread count `sync_threads` last gave numba (0: not yet; each kernel call then asks
numba, which costs a few microseconds): it only picks a kernel's serial or threaded build,
which give the same bits."""


def sync_threads() -> None:
    """numba's CPU kernels use as many threads as torch's (`runtime.use_threads` sets torch's).
    numba's OpenMP layer sets the OpenMP thread count when it starts, which torch shares:
    torch's is set back once it has started."""
    global _pool_started, _numba_threads
    if not numba_available():
        return
    threads = torch.get_num_threads()
    if not _pool_started:
        from numba.np.ufunc import parallel

        parallel._launch_threads()
        _pool_started = True
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    _numba_threads = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(_numba_threads)


# ------------------------------------------------------------------------ exact.exp, scalar

_EXP_COEFFS = tuple(exact._INV_FACTORIAL)  # 1/n!, n = 0..13, as exact.exp uses them

if numba is not None:
    _C = _EXP_COEFFS
    _I64, _I7, _IZP = np.int32(64), np.int32(PART_BITS), np.int32(ZERO_POINT)  # int32 constants: int32 lanes

    def njit(*args, **kwargs):
        """numba.njit without Python's division-by-zero checks (IEEE results instead, as
        torch's), which would keep LLVM from vectorising; never fast-math. A cached kernel's
        cache is read and written under an inter-process lock (`_locked_cache`)."""
        made = numba.njit(*args, error_model="numpy", **kwargs)
        if kwargs.get("cache") and not args:
            return lambda fn: _locked_cache(made(fn))
        return made

    def _locked_cache(dispatcher):
        """numba's cache files are not safe for processes compiling the same kernel at once
        (two ranks started together on a fresh install): each picks data file numbers from the
        index it read, so one can overwrite the other's entry and a later load get another
        signature's code. (A SIGABRT first blamed on this was the gloo exit race that
        `distributed.finish` now avoids; this race itself was not observed here.) The cache's
        loads and saves hold an exclusive lock on a file in the cache folder, so each save
        re-reads the index under the lock."""
        cache = getattr(dispatcher, "_cache", None)
        if cache is None or not hasattr(cache, "_cache_path") or fcntl is None:
            return dispatcher
        lock_path = os.path.join(cache._cache_path, "diffcodec-numba.lock")

        def locked(method):
            def call(*args, **kwargs):
                try:
                    handle = open(lock_path, "a")
                except OSError:  # an unwritable cache folder: numba then caches nothing anyway
                    return method(*args, **kwargs)
                with handle:
                    fcntl.flock(handle, fcntl.LOCK_EX)
                    try:
                        return method(*args, **kwargs)
                    finally:
                        fcntl.flock(handle, fcntl.LOCK_UN)
            return call

        cache.load_overload = locked(cache.load_overload)
        cache.save_overload = locked(cache.save_overload)
        return dispatcher

    class _Kernel:
        """One kernel body compiled twice (cached): serial, and with its prange loops over
        threads. A parallel launch costs ~50 us, so small work runs serially."""

        def __init__(self, body) -> None:
            serial = types.FunctionType(body.__code__, body.__globals__, body.__name__ + "_serial",
                                        body.__defaults__, body.__closure__)
            serial.__qualname__ = body.__qualname__ + "_serial"  # its own cache file
            self.serial = njit(cache=True)(serial)
            self.parallel = njit(parallel=True, cache=True)(body)
            self.py_func = body

        def __call__(self, work: int, *args):
            threaded = work >= PARALLEL_MIN_WORK and (_numba_threads or numba.get_num_threads()) > 1
            return (self.parallel if threaded else self.serial)(*args)

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

    @_intrinsic
    def _f32_from_bits(typingctx, bits):
        """The binary32 whose bits are an int32."""
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], _llvm_ir.FloatType())
        return _nb_types.float32(_nb_types.int32), codegen

    _C32 = EXP32_COEFFS

    @njit(inline="always")
    def _silu32(y):
        """`silu32` for one binary32 y, operation for operation."""
        t = -y
        t = t if t < EXP32_ARG_LIMIT else EXP32_ARG_LIMIT
        t = t if t > -EXP32_ARG_LIMIT else -EXP32_ARG_LIMIT
        k = np.rint(t * INV_LN2_F32)
        r = t - k * LN2_HI_F32
        r = r - k * LN2_LO_F32
        p = r * _C32[7] + _C32[6]
        p = p * r + _C32[5]
        p = p * r + _C32[4]
        p = p * r + _C32[3]
        p = p * r + _C32[2]
        p = p * r + _C32[1]
        p = p * r + _C32[0]
        e = p * _f32_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))
        return y / (e + _F32(1.0))

    @njit(inline="always")
    def _silu64(y):
        """exact.silu for one binary64 y: y / (1 + e^-y), -y clamped to [-700, 700]."""
        t = -y
        t = t if t < exact.EXP_ARG_LIMIT else exact.EXP_ARG_LIMIT
        t = t if t > -exact.EXP_ARG_LIMIT else -exact.EXP_ARG_LIMIT
        return y / (_exp_clamped(t) + 1.0)

    @njit(inline="always")
    def _store_stacked(out, q, b, p, C):
        """A pixel's integers q [C] in the STACKED form: out[b, p, c] = a_hi + 64,
        out[b, p, C + c] = a_lo + 64 (two plain loops: each vectorises)."""
        o = out[b, p]
        for c in range(C):
            o[c] = ((q[c] + _I64) >> _I7) + _IZP
        for c in range(C):
            o[C + c] = q[c] - (((q[c] + _I64) >> _I7) << _I7) + _IZP

    @njit(inline="always")
    def _store_values(out, q, b, p, C):
        o = out[b, p]
        for c in range(C):
            o[c] = np.float64(q[c])

    @njit(inline="always")
    def _store(out, q, b, p, C, stacked):
        """`_store_stacked` or `_store_values` (``stacked`` a compile-time constant)."""
        if stacked:
            _store_stacked(out, q, b, p, C)
        else:
            _store_values(out, q, b, p, C)

    @njit(inline="always")
    def _quantize_scalar(v, r):
        """clamp(rint(v r), +-QMAX) in binary64, as int32."""
        a = np.rint(v * r)
        a = a if a < QMAX else np.float64(QMAX)  # NaN -> QMAX, as the torch twin
        return np.int32(a if a > -QMAX else np.float64(-QMAX))

    @njit(inline="always")
    def _quantize32(v, r):
        """clamp(rint(v r), +-QMAX) in binary32 (v, r binary32), as int32."""
        a = np.rint(v * r)
        a = a if a < _F32(QMAX) else _F32(QMAX)
        return np.int32(a if a > _F32(-QMAX) else _F32(-QMAX))

    @njit(inline="always")
    def _scales(m):
        """inverse_scales for one max |value|: (QMAX / m, m / QMAX), (0, 0) for m == 0."""
        if m == 0.0:
            return 0.0, 0.0
        return np.float64(QMAX) / m, m / np.float64(QMAX)

    @njit(inline="always")
    def _job_range(job, nchunk, P):
        """(image, first pixel, end pixel) of one job: image job // nchunk, its chunk job % nchunk."""
        b = job // nchunk
        k = job - b * nchunk
        step = (P + nchunk - 1) // nchunk
        return b, k * step, min(P, (k + 1) * step)

    @njit(inline="always")
    def _absmax_into(x, nchunk, out):
        """out[b] = max |x[b]| of x [B, P, C]: a running max per channel (vectorisable) per job."""
        B, P, C = x.shape
        part = np.zeros((B, nchunk, C), x.dtype)
        for job in prange(B * nchunk):
            b, p0, p1 = _job_range(job, nchunk, P)
            m = part[b, job - b * nchunk]
            for p in range(p0, p1):
                for c in range(C):
                    v = abs(x[b, p, c])
                    m[c] = v if v > m[c] else m[c]
        for b in range(B):
            out[b] = 0.0
            for k in range(nchunk):
                for c in range(C):
                    if part[b, k, c] > out[b]:
                        out[b] = part[b, k, c]

    def _absmax_body(x, nchunk):
        out = np.zeros(x.shape[0], np.float32)
        _absmax_into(x, nchunk, out)
        return out

    # The factories below close over plain constants only (bools, ints): numba's cache keys a
    # closure by its pickled cell contents, and a compiled function pickles differently in every
    # process, so a closure over one would be compiled afresh in each (tens of seconds).

    def _make_quantize_dynamic(stacked):
        def quantize_dynamic_body(x, out, nchunk):
            """Per image: m = max |x|, (r, s) = `_scales`(m), the integers clamp(rint(x r))."""
            B, P, C = x.shape
            m = np.empty(B, x.dtype)
            _absmax_into(x, nchunk, m)
            r, s = np.empty(B, np.float64), np.empty(B, np.float64)
            for b in range(B):
                r[b], s[b] = _scales(np.float64(m[b]))
            for job in prange(B * nchunk):
                b, p0, p1 = _job_range(job, nchunk, P)
                rb = r[b]
                q = np.empty(C, np.int32)
                for p in range(p0, p1):
                    xp = x[b, p]
                    for c in range(C):
                        q[c] = _quantize_scalar(np.float64(xp[c]), rb)
                    _store(out, q, b, p, C, stacked)
            return s
        return quantize_dynamic_body

    def _make_quantize(stacked):
        def quantize_body(x, r, out, nchunk):
            B, P, C = x.shape
            for job in prange(B * nchunk):
                b, p0, p1 = _job_range(job, nchunk, P)
                rb = r[b]
                q = np.empty(C, np.int32)
                for p in range(p0, p1):
                    xp = x[b, p]
                    for c in range(C):
                        q[c] = _quantize_scalar(np.float64(xp[c]), rb)
                    _store(out, q, b, p, C, stacked)
        return quantize_body

    @njit(inline="always")
    def _stats_into(x, scale, nchunk, t1, t2, mn, mx):
        """Per image and channel: sums of q = rint(x scale_b) and q^2 (int64, exact), min and max x."""
        B, P, C = x.shape
        s1 = np.zeros((B, nchunk, C), np.int64)
        s2 = np.zeros((B, nchunk, C), np.int64)
        lo = np.full((B, nchunk, C), np.inf, np.float32)
        hi = np.full((B, nchunk, C), -np.inf, np.float32)
        for job in prange(B * nchunk):
            b, p0, p1 = _job_range(job, nchunk, P)
            k = job - b * nchunk
            sb = scale[b]
            u1, u2, ul, uh = s1[b, k], s2[b, k], lo[b, k], hi[b, k]
            for p in range(p0, p1):
                for c in range(C):
                    v = x[b, p, c]
                    q = np.int64(np.rint(np.float64(v) * sb))
                    u1[c] += q
                    u2[c] += q * q
                    ul[c] = v if v < ul[c] else ul[c]
                    uh[c] = v if v > uh[c] else uh[c]
        for b in range(B):
            for c in range(C):
                t1[b, c], t2[b, c], mn[b, c], mx[b, c] = 0, 0, np.inf, -np.inf
                for k in range(nchunk):
                    t1[b, c] += s1[b, k, c]
                    t2[b, c] += s2[b, k, c]
                    mn[b, c] = min(mn[b, c], lo[b, k, c])
                    mx[b, c] = max(mx[b, c], hi[b, k, c])

    def _group_stats_body(x, scale, nchunk):
        B, _, C = x.shape
        t1, t2 = np.empty((B, C), np.int64), np.empty((B, C), np.int64)
        mn, mx = np.empty((B, C), np.float32), np.empty((B, C), np.float32)
        _stats_into(x, scale, nchunk, t1, t2, mn, mx)
        return t1, t2, mn, mx

    @njit(inline="always")
    def _coefficients_into(s1, s2, lo, hi, shift_e, n, groups, weight, bias, eps, scale, shift, has_scale, silu,
                           a, c0, r, s):
        """The operations of `_norm_coefficients_torch`, in the same order: a, c0 binary32 [B, C],
        r binary32 [B], s binary64 [B]."""
        B, C = s1.shape
        cg = C // groups
        for b in range(B):
            inv = _f64_from_bits((np.int64(-shift_e[b]) + 1023) << 52)
            m = _F32(0.0)
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
                    a32, c32 = np.float32(ab), np.float32(cb)
                    a[b, ch] = a32
                    c0[b, ch] = c32
                    y1 = lo[b, ch] * a32 + c32
                    y2 = hi[b, ch] * a32 + c32
                    y_lo = y1 if y1 < y2 else y2
                    y_hi = y2 if y1 < y2 else y1
                    if silu:
                        u1 = abs(_silu32(y_lo))
                        u2 = abs(_silu32(y_hi))
                        bound = u1 if u1 > u2 else u2
                        if y_lo < SILU_ARGMIN_F32 and y_hi > SILU_ARGMIN_F32 and bound < -SILU_MIN_F32:
                            bound = -SILU_MIN_F32
                    else:
                        u1 = abs(y_lo)
                        u2 = abs(y_hi)
                        bound = u1 if u1 > u2 else u2
                    m = bound if bound > m else m
            rb, s[b] = _scales(np.float64(m))
            r[b] = np.float32(rb)

    @njit(inline="always")
    def _apply_into(x, a, c0, r, out, nchunk, silu, stacked):
        """The loop writing the next layer's integers clamp(rint(f(x a + c) r_b)) (binary32), f =
        SiLU or the identity, in the STACKED or VALUES form (``silu``, ``stacked``: compile-time
        constants: one compiled loop per pair, so that each vectorises)."""
        B, P, C = x.shape
        for job in prange(B * nchunk):
            b, p0, p1 = _job_range(job, nchunk, P)
            rb, ab, cb = r[b], a[b], c0[b]
            q = np.empty(C, np.int32)
            for p in range(p0, p1):
                xp = x[b, p]
                for c in range(C):
                    y = xp[c] * ab[c] + cb[c]
                    q[c] = _quantize32(_silu32(y) if silu else y, rb)
                _store(out, q, b, p, C, stacked)

    def _norm_coefficients_body(s1, s2, lo, hi, shift_e, n, groups, weight, bias, eps, scale, shift, has_scale,
                                silu):
        B, C = s1.shape
        a, c0 = np.empty((B, C), np.float32), np.empty((B, C), np.float32)
        r, s = np.empty(B, np.float32), np.empty(B, np.float64)
        _coefficients_into(s1, s2, lo, hi, shift_e, n, groups, weight, bias, eps, scale, shift, has_scale, silu,
                           a, c0, r, s)
        return a, c0, r, s

    def _make_norm_act(silu, stacked):
        def norm_act_body(x, a, c0, r, out, nchunk):
            _apply_into(x, a, c0, r, out, nchunk, silu, stacked)
        return norm_act_body

    def _make_group_norm(silu, stacked):
        def group_norm_body(x, groups, bits, weight, bias, eps, scale, shift, has_scale, out, nchunk):
            """`norm_plan` then `norm_act` in one call: max |x|, the fixed-point shift, the
            exact statistics, the coefficients and the scale, the operand. Returns s [B]."""
            B, P, C = x.shape
            m = np.empty(B, np.float32)
            _absmax_into(x, nchunk, m)
            shift_e = np.empty(B, np.int64)
            scale_e = np.empty(B, np.float64)
            for b in range(B):
                e = np.int64(0)
                if m[b] != 0.0:
                    e = np.int64(math.frexp(np.float64(m[b]))[1])
                se = bits - 1 - e
                se = se if se < 1000 else 1000
                se = se if se > -1000 else -1000
                shift_e[b] = se
                scale_e[b] = _f64_from_bits((se + 1023) << 52)
            s1, s2 = np.empty((B, C), np.int64), np.empty((B, C), np.int64)
            lo, hi = np.empty((B, C), np.float32), np.empty((B, C), np.float32)
            _stats_into(x, scale_e, nchunk, s1, s2, lo, hi)
            a, c0 = np.empty((B, C), np.float32), np.empty((B, C), np.float32)
            r, s = np.empty(B, np.float32), np.empty(B, np.float64)
            _coefficients_into(s1, s2, lo, hi, shift_e, (C // groups) * P, groups, weight, bias, eps, scale, shift,
                               has_scale, silu, a, c0, r, s)
            _apply_into(x, a, c0, r, out, nchunk, silu, stacked)
            return s
        return group_norm_body

    @njit(inline="always")
    def _combine(g, n, N, blocks):
        """The sum v from one output row's int8-convolution blocks g = (G0, G1[, G2]) x N
        (binary32 integers below 2^24): 1024 G0 + 8 (G1 [+ G2]), every step exact in binary64
        (``blocks``: 2 or 3, a compile-time constant; 0: g is the VALUES product's row of sums)."""
        if blocks == 0:
            return g[n]
        if blocks == 2:
            return np.float64(g[n]) * 1024.0 + np.float64(g[N + n]) * 8.0
        return np.float64(g[n]) * 1024.0 + (np.float64(g[N + n]) + np.float64(g[2 * N + n])) * 8.0

    @njit(inline="always")
    def _scale_table(s_x, s_w):
        """S[b, n] = s_x[b] s_w[n]: one binary64 product each, made once per call."""
        S = np.empty((s_x.shape[0], s_w.shape[0]), np.float64)
        for b in range(s_x.shape[0]):
            for n in range(s_w.shape[0]):
                S[b, n] = s_x[b] * s_w[n]
        return S

    @njit(inline="always")
    def _finish_row(y, n, mode, add, residual, b, row):
        """y + add[b, n] (mode 1) or residual[row, n] + y (mode 2), one binary32 addition."""
        if mode == 1:
            return y + add[b, n]
        if mode == 2:
            return residual[row, n] + y
        return y

    def _make_epilogue(blocks):
        def epilogue_body(G, P, s_x, s_w, bias, add, residual, mode, out):
            M, N = out.shape
            S = _scale_table(s_x, s_w)
            for row in prange(M):
                b = row // P
                g, Sb = G[row], S[b]
                for n in range(N):
                    y = np.float32(_combine(g, n, N, blocks) * Sb[n]) + bias[n]
                    out[row, n] = _finish_row(y, n, mode, add, residual, b, row)
        return epilogue_body

    def _make_epilogue64_stacked(blocks):
        def epilogue64_stacked_body(G, P, s_x, s_w, bias, out):
            M, N = out.shape
            S = _scale_table(s_x, s_w)
            for row in prange(M):
                g, Sb = G[row], S[row // P]
                for n in range(N):
                    out[row, n] = _combine(g, n, N, blocks) * Sb[n] + bias[n]
        return epilogue64_stacked_body

    def _softmax_weights_body(scores, c, weight_scale):
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

    def _quantize_heads_body(qkv, out, s):
        """qkv [B, T, P, H, d] binary32 -> out [P, B, H, T, d] binary64, s [P, B]: each part p
        quantized per image by its max |value|, as `quantize_dynamic` (VALUES) quantizes
        qkv[:, :, p] laid out [B, H T, d]."""
        B, T, P, H, d = qkv.shape
        for job in prange(P * B):
            p = job // B
            b = job - p * B
            m = np.float32(0.0)
            for t in range(T):
                for h in range(H):
                    for c in range(d):
                        v = abs(qkv[b, t, p, h, c])
                        m = v if v > m else m
            r, s[p, b] = _scales(np.float64(m))
            for h in range(H):
                for t in range(T):
                    for c in range(d):
                        out[p, b, h, t, c] = np.float64(_quantize_scalar(np.float64(qkv[b, t, p, h, c]), r))

    def _silu64_body(x, out):
        for i in prange(x.size):
            out[i] = _silu64(x[i])

    _absmax_nb = _Kernel(_absmax_body)
    _silu64_nb = _Kernel(_silu64_body)
    _quantize_heads_nb = _Kernel(_quantize_heads_body)
    _group_stats_nb = _Kernel(_group_stats_body)
    _norm_coefficients_nb = njit(cache=True)(_norm_coefficients_body)
    _FORMS = (STACKED, VALUES)
    _quantize_nb = {form: _Kernel(_make_quantize(form == STACKED)) for form in _FORMS}
    _quantize_dynamic_nb = {form: _Kernel(_make_quantize_dynamic(form == STACKED)) for form in _FORMS}
    _KEYS = [(silu, form) for silu in (True, False) for form in _FORMS]
    _norm_act_nb = {key: _Kernel(_make_norm_act(key[0], key[1] == STACKED)) for key in _KEYS}
    _group_norm_nb = {key: _Kernel(_make_group_norm(key[0], key[1] == STACKED)) for key in _KEYS}
    _epilogue_stacked_nb = {blocks: _Kernel(_make_epilogue(blocks)) for blocks in (2, 3)}
    _epilogue_values_nb = _Kernel(_make_epilogue(0))
    _epilogue64_stacked_nb = {blocks: _Kernel(_make_epilogue64_stacked(blocks)) for blocks in (2, 3)}
    _softmax_weights_nb = _Kernel(_softmax_weights_body)


def _chunks(total: int) -> int:
    return max(1, min(total, 64))


# ------------------------------------------------------------------------- the kernels


_NO_ARRAY = np.zeros((1, 1), np.float32)
"""What a kernel gets for an optional array argument it is told not to read (never written)."""


def _nchunk(pixels: int) -> int:
    return _chunks(pixels // 64 + 1)



def absmax(x: torch.Tensor) -> torch.Tensor:
    """max |x| of each image: x [B, P, C] float32 (numba) or any [B, ...] -> [B] (order-free)."""
    if use_numba(x) and x.dtype == torch.float32 and x.dim() == 3:
        x = x.contiguous()
        return torch.from_numpy(_absmax_nb(x.numel(), x.numpy(), _nchunk(x.shape[1])))
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


def _quantize_torch(v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """clamp(rint(v r), +-QMAX) as int64, v and r binary64 (r broadcast); NaN -> QMAX."""
    a = torch.round(v * r)
    a = torch.where(a < QMAX, a, float(QMAX))
    return torch.where(a > -QMAX, a, float(-QMAX)).to(torch.int64)


def _as_form(a: torch.Tensor, form: str) -> torch.Tensor:
    if form == VALUES:
        return a.to(torch.float64)
    hi, lo = split(a)
    return torch.cat([hi, lo], dim=-1).add_(ZERO_POINT).to(torch.uint8)


def _empty_form(shape: tuple[int, int, int], form: str) -> torch.Tensor:
    b, p, c = shape
    return torch.empty((b, p, 2 * c), dtype=torch.uint8) if form == STACKED else torch.empty(shape, dtype=torch.float64)


def quantize(x: torch.Tensor, r: torch.Tensor, form: str) -> torch.Tensor:
    """x [B, P, C] (binary32 or binary64) -> the integers clamp(rint(x r_b), +-QMAX) in ``form``."""
    if use_numba(x):
        x = x.contiguous()
        out = _empty_form(tuple(x.shape), form)
        _quantize_nb[form](x.numel(), x.numpy(), r.contiguous().numpy(), out.numpy(), _nchunk(x.shape[1]))
        return out
    return _as_form(_quantize_torch(x.to(torch.float64), r.reshape(-1, 1, 1)), form)


def quantize_dynamic(x: torch.Tensor, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, P, C] (binary32 or binary64) quantized per image by its max |x|: (the integers
    clamp(rint(x r_b), +-QMAX) in ``form``, s [B]) with (r, s) = `inverse_scales`(max |x_b|)."""
    if use_numba(x):
        x = x.contiguous()
        out = _empty_form(tuple(x.shape), form)
        s = _quantize_dynamic_nb[form](x.numel(), x.numpy(), out.numpy(), _nchunk(x.shape[1]))
        return out, torch.from_numpy(s)
    r, s = inverse_scales(absmax(x))
    return quantize(x, r, form), s


def quantize_heads(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention's q, k and v from qkv [B, T, P, H, d] (binary32; P = 3 parts, H heads, T
    tokens): each part quantized per image by its max |value| as `quantize_dynamic` in the
    VALUES form quantizes qkv[:, :, p] laid out [B, H, T, d]: (the integers in binary64
    [P, B, H, T, d], s [P, B]). One numba pass on the CPU; else one `quantize_dynamic` per part."""
    b, t, parts, h, d = qkv.shape
    if use_numba(qkv) and qkv.dtype == torch.float32:
        qkv = qkv.contiguous()
        out = torch.empty((parts, b, h, t, d), dtype=torch.float64)
        s = torch.empty((parts, b), dtype=torch.float64)
        _quantize_heads_nb(qkv.numel(), qkv.numpy(), out.numpy(), s.numpy())
        return out, s
    pieces = [quantize_dynamic(qkv[:, :, i].permute(0, 2, 1, 3).reshape(b, h * t, d), VALUES) for i in range(parts)]
    return (torch.stack([v.view(b, h, t, d) for v, _ in pieces]), torch.stack([s_i for _, s_i in pieces]))


def group_stats(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per image and channel of x [B, P, C] float32, with q = rint(x scale_b) (scale a power
    of two, so q is exact): (sum q, sum q^2) int64 [B, C] and (min x, max x) float32 [B, C]."""
    if use_numba(x):
        x = x.contiguous()
        out = _group_stats_nb(x.numel(), x.numpy(), scale.contiguous().numpy(), _nchunk(x.shape[1]))
        return tuple(torch.from_numpy(o) for o in out)
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
    has_scale = scale is not None
    if use_numba(x):
        dummy = _NO_ARRAY
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


def silu64(x: torch.Tensor) -> torch.Tensor:
    """`exact.silu` (binary64 in, binary64 out), by the numba kernel on the CPU (the timestep
    MLP's few values: a call costs ~2 us instead of ~60)."""
    if use_numba(x) and x.dtype == torch.float64:
        x = x.contiguous()
        out = torch.empty_like(x)
        _silu64_nb(x.numel(), x.view(-1).numpy(), out.view(-1).numpy())
        return out
    return exact.silu(x)


def silu32(y: torch.Tensor) -> torch.Tensor:
    """y sigmoid(y) of binary32 y by binary32 operations in a fixed order (module constants):
    t = clamp(-y, +-87), k = rint(t / ln 2), r = (t - k LN2_HI) - k LN2_LO, e^r by Horner to
    r^7, times 2^k from its bits; y / (e + 1). The numba kernels' `_silu32` does the same."""
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
    if use_numba(x):
        x = x.contiguous()
        out = _empty_form(tuple(x.shape), form)
        _norm_act_nb[bool(silu), form](x.numel(), x.numpy(), a.contiguous().numpy(), c.contiguous().numpy(),
                                       r.contiguous().numpy(), out.numpy(), _nchunk(x.shape[1]))
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
    numba call on the CPU)."""
    if not use_numba(x):
        a, c, r, s = norm_plan(x, groups, weight, bias, eps, silu, scale, shift)
        return norm_act(x, a, c, silu, r, form), s
    x = x.contiguous()
    b, p, ch = x.shape
    n = (ch // groups) * p
    out = _empty_form(tuple(x.shape), form)
    has_scale = scale is not None
    dummy = _NO_ARRAY
    s = _group_norm_nb[bool(silu), form](
        x.numel(), x.numpy(), groups, (exact.MANTISSA_LIMIT_BITS + 2 - exact.ceil_log2(n)) // 2, weight.numpy(),
        bias.numpy(), float(eps), scale.contiguous().numpy() if has_scale else dummy,
        shift.contiguous().numpy() if has_scale else dummy, has_scale, out.numpy(), _nchunk(p))
    return out, torch.from_numpy(s)


def epilogue(G: torch.Tensor, blocks: int, pixels: int, s_x: torch.Tensor, s_w: torch.Tensor, bias: torch.Tensor,
             *, add: torch.Tensor | None = None, residual: torch.Tensor | None = None,
             float64: bool = False) -> torch.Tensor:
    """A layer's output rows [M, N] from its products G (`exact2_products`): ``blocks`` = 2 or
    3, the int8 convolution's output blocks [M, blocks N] (binary32 integers) whose sum is
    v = 1024 G0 + 8 (G1 [+ G2]); ``blocks`` = 0, the sums v [M, N] themselves (binary64).
    With b = row // pixels and the binary64 scale S = s_x[b] s_w[n] (the values of one input
    and one weight integer): y = fl32(v S) + bias[n]; then y + add[b, n] (``add``) or
    residual[row, n] + y (``residual``), each one binary32 rounding. ``float64``:
    y = v S + bias[n] in binary64 (the output layer; no add or residual)."""
    if add is not None and residual is not None:
        raise ValueError("epilogue: add or residual, not both")
    m, n = (G.shape[0], G.shape[1] // blocks) if blocks else G.shape
    if s_x.dtype != torch.float64 or s_w.dtype != torch.float64:
        s_x, s_w = s_x.to(torch.float64), s_w.to(torch.float64)
    if use_numba(G) and G.dtype == (torch.float32 if blocks else torch.float64):
        args = (G.numel(), G.contiguous().numpy(), pixels, s_x.contiguous().numpy(), s_w.contiguous().numpy(),
                bias.contiguous().numpy())
        if float64:
            if blocks:
                out = torch.empty((m, n), dtype=torch.float64)
                _epilogue64_stacked_nb[blocks](*args, out.numpy())
                return out
        else:
            out = torch.empty((m, n), dtype=torch.float32)
            mode = 1 if add is not None else 2 if residual is not None else 0
            kernel = _epilogue_stacked_nb[blocks] if blocks else _epilogue_values_nb
            kernel(*args, add.contiguous().numpy() if add is not None else _NO_ARRAY,
                   residual.contiguous().numpy() if residual is not None else _NO_ARRAY, mode, out.numpy())
            return out
    v = _sums_torch(G, blocks)
    rows = torch.arange(m, device=G.device) // pixels
    S = s_x[rows][:, None] * s_w[None, :]
    if float64:
        return v * S + bias
    y = (v * S).to(torch.float32) + bias
    if add is not None:
        y = y + add[rows]
    elif residual is not None:
        y = residual + y
    return y


def _sums_torch(G: torch.Tensor, blocks: int) -> torch.Tensor:
    """The sums v in binary64 (exact: integers below 2^53)."""
    if not blocks:
        return G.to(torch.float64)
    g = G.to(torch.float64).chunk(blocks, dim=1)
    return g[0] * 1024.0 + (g[1] if blocks == 2 else g[1] + g[2]) * 8.0


def softmax_weights(scores: torch.Tensor, c: torch.Tensor, weight_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [R, T] exact integers (binary64), c [R] binary64 -> (weights rint(2^P e^((s - max_row s) c_row)),
    integers in [0, 2^P], in place; their row sums [R], exact), P = ``weight_bits``; the
    exponent's argument clamped at -700 as `exact.exp` clamps it."""
    scale = float(2**weight_bits)
    if use_numba(scores):
        den = _softmax_weights_nb(scores.numel(), scores.numpy(), c.contiguous().numpy(), scale)
        return scores, torch.from_numpy(den)
    t = (scores - scores.amax(dim=-1, keepdim=True)) * c[:, None]
    w = exact.exp(t.clamp_(min=-exact.EXP_ARG_LIMIT)).mul_(scale).round_()
    return w, w.sum(dim=-1)
