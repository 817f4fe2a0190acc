/* The elementwise kernels of exact-arithmetic contract 2 (diffcodec/exact2_kernels.py: each
 * kernel's torch twin there is its specification, operation for operation).
 *
 * Tensors are contiguous, channels-last: activations x [B, P, C] (binary32, or binary64 where
 * said), per-image values [B]. An integer operand is written in one of two forms:
 *   PLANES, uint8 [2, B, P, C]: a = 128 a_hi + a_lo, a_hi = (a + 64) >> 7 in [-63, 63] stored
 *     as a_hi + 64 in plane 0, a_lo = a - 128 a_hi in [-64, 63] stored as a_lo + 64 in plane 1;
 *   VALUES, binary64 [B, P, C]: the integers themselves.
 * The pixel loops run as B x nchunk jobs (image job / nchunk, its chunk job % nchunk of
 * ceil(P / nchunk) pixels) on `threads` threads; per-job partial results (maxima, int64 sums)
 * are combined in a fixed order afterwards, and are order-free anyway.
 *
 * kernels.h's rules hold: binary32 where the twin computes in binary32, binary64 where it
 * does, one rounding per operation (no FMA: -ffp-contract=off), nearbyint for torch.round
 * (rint's value, round half to even; GCC vectorises it where it folds an (int) rint into an
 * lrint it does not), clamps as bit selects (`sel32`), no libm
 * transcendental (e^x is exact.exp's polynomial, below); the constants are exact.py's and
 * exact2_kernels.py's, written as hex literals (`dc_exact2_constants` returns them for the
 * tests to compare). Each kernel returns 0, or -1 when its scratch memory could not be
 * allocated. */
#include "kernels.h"

#include <stdlib.h>

#define QMAX 8063.0
#define QMAX_F 8063.0f

/* exact.py: e^t = 2^k e^r, t = k ln2 + r (Cody-Waite), e^r by Taylor's series to r^13 */
#define INV_LN2 0x1.71547652b82fep+0
#define LN2_HI 0x1.62e42fee00000p-1
#define LN2_LO 0x1.a39ef35793c76p-33
#define EXP_ARG_LIMIT 0x1.5ep+9 /* 700 */
#define C0 0x1p+0
#define C1 0x1p+0
#define C2 0x1p-1
#define C3 0x1.5555555555555p-3
#define C4 0x1.5555555555555p-5
#define C5 0x1.1111111111111p-7
#define C6 0x1.6c16c16c16c17p-10
#define C7 0x1.a01a01a01a01ap-13
#define C8 0x1.a01a01a01a01ap-16
#define C9 0x1.71de3a556c734p-19
#define C10 0x1.27e4fb7789f5cp-22
#define C11 0x1.ae64567f544e4p-26
#define C12 0x1.1eed8eff8d898p-29
#define C13 0x1.6124613a86d09p-33

/* exact2_kernels.py's binary32 SiLU (`silu32`): e^t with t clamped to [-87, 87], to r^7 */
#define LN2_HI_F32 0x1.62e4p-1f
#define LN2_LO_F32 0x1.7f7d1cp-20f
#define INV_LN2_F32 0x1.715476p+0f
#define EXP32_ARG_LIMIT 0x1.5cp+6f /* 87 */
#define C32_0 0x1p+0f
#define C32_1 0x1p+0f
#define C32_2 0x1p-1f
#define C32_3 0x1.555556p-3f
#define C32_4 0x1.555556p-5f
#define C32_5 0x1.111112p-7f
#define C32_6 0x1.6c16c2p-10f
#define C32_7 0x1.a01a02p-13f
#define SILU_MIN_F32 (-0x1.1d25dp-2f)
#define SILU_ARGMIN_F32 (-0x1.474974p+0f)

/* The constants above in a fixed order, as binary64 (tests/test_exact2_kernels.py compares
 * them with the Python ones): QMAX, INV_LN2, LN2_HI, LN2_LO, EXP_ARG_LIMIT, C0..C13,
 * LN2_HI_F32, LN2_LO_F32, INV_LN2_F32, EXP32_ARG_LIMIT, C32_0..C32_7, SILU_MIN_F32,
 * SILU_ARGMIN_F32: 33 values. Returns the count. */
DC_EXPORT int64_t dc_exact2_constants(double *out) {
    const double values[] = {QMAX, INV_LN2, LN2_HI, LN2_LO, EXP_ARG_LIMIT,
                             C0, C1, C2, C3, C4, C5, C6, C7, C8, C9, C10, C11, C12, C13,
                             LN2_HI_F32, LN2_LO_F32, INV_LN2_F32, EXP32_ARG_LIMIT,
                             C32_0, C32_1, C32_2, C32_3, C32_4, C32_5, C32_6, C32_7,
                             SILU_MIN_F32, SILU_ARGMIN_F32};
    int64_t n = (int64_t)(sizeof(values) / sizeof(values[0]));
    for (int64_t i = 0; i < n; i++) out[i] = values[i];
    return n;
}

/* ------------------------------------------------------------------ scalar building blocks */

DC_INLINE int64_t f64_bits(double v) {
    int64_t bits;
    memcpy(&bits, &v, 8);
    return bits;
}

/* c ? a : b by bit masks: the same value as the select, but no branch for GCC's tree PRE to
 * split (it moves an operation on a clamped value into the clamp's constant arm, and the loop
 * then has control flow and is not vectorised) and no libm fmin (not vectorised either) */
DC_INLINE float sel32(int c, float a, float b) {
    int32_t m = -(int32_t)(c != 0);
    return dc_f32_from_bits((dc_f32_bits(a) & m) | (dc_f32_bits(b) & ~m));
}
DC_INLINE double sel64(int c, double a, double b) {
    int64_t m = -(int64_t)(c != 0);
    return dc_f64_from_bits((f64_bits(a) & m) | (f64_bits(b) & ~m));
}

/* t < L ? t : L and t > L ? t : L (a NaN t gives L) */
DC_INLINE double min64(double t, double L) { return sel64(t < L, t, L); }
DC_INLINE double max64(double t, double L) { return sel64(t > L, t, L); }
DC_INLINE float min32(float t, float L) { return sel32(t < L, t, L); }
DC_INLINE float max32(float t, float L) { return sel32(t > L, t, L); }

#define DC_ROUND_MAGIC 0x1.8p52 /* 2^52 + 2^51: for an integer |k| < 2^51, k + it is exact, its low bits k */

/* 2^k for an integer-valued binary64 k in [-1022, 1023], from its bits (exact.pow2):
 * ((int64) k + 1023) << 52, the integer k read off the bits of k + 2^52 + 2^51 (vector code
 * without AVX-512's binary64 -> int64 conversion; the shift drops the magic's bits) */
DC_INLINE double pow2_of(double k) {
    uint64_t bits = (uint64_t)f64_bits(k + DC_ROUND_MAGIC);
    return dc_f64_from_bits((int64_t)((bits + 1023u) << 52));
}

/* exact._exp_of_clamped for one binary64 t in [-700, 700], operation for operation */
DC_INLINE double exp_clamped(double t) {
    double k = nearbyint(t * INV_LN2);
    double r = t - k * LN2_HI;
    r = r - k * LN2_LO;
    double p = r * C13 + C12;
    p = p * r + C11;
    p = p * r + C10;
    p = p * r + C9;
    p = p * r + C8;
    p = p * r + C7;
    p = p * r + C6;
    p = p * r + C5;
    p = p * r + C4;
    p = p * r + C3;
    p = p * r + C2;
    p = p * r + C1;
    p = p * r + C0;
    return p * pow2_of(k);
}

/* exact.silu: y / (1 + e^-y), -y clamped to [-700, 700] */
DC_INLINE double silu64(double y) {
    double t = max64(min64(-y, EXP_ARG_LIMIT), -EXP_ARG_LIMIT);
    return y / (exp_clamped(t) + 1.0);
}

/* exact2_kernels.silu32 for one binary32 y */
DC_INLINE float silu32(float y) {
    float t = max32(min32(-y, EXP32_ARG_LIMIT), -EXP32_ARG_LIMIT);
    float k = nearbyintf(t * INV_LN2_F32);
    float r = t - k * LN2_HI_F32;
    r = r - k * LN2_LO_F32;
    float p = r * C32_7 + C32_6;
    p = p * r + C32_5;
    p = p * r + C32_4;
    p = p * r + C32_3;
    p = p * r + C32_2;
    p = p * r + C32_1;
    p = p * r + C32_0;
    float e = p * dc_f32_from_bits((int32_t)((uint32_t)((int32_t)k + 127) << 23));
    return y / (e + 1.0f);
}

/* clamp(nearbyint(v r), +-QMAX) in binary64 as int32 (NaN -> QMAX, as the torch twin) */
DC_INLINE int32_t quantize64(double v, double r) {
    return (int32_t)max64(min64(nearbyint(v * r), QMAX), -QMAX);
}

/* clamp(nearbyint(v r), +-QMAX) in binary32 (v, r binary32) as int32 */
DC_INLINE int32_t quantize32(float v, float r) {
    return (int32_t)max32(min32(nearbyintf(v * r), QMAX_F), -QMAX_F);
}

/* inverse_scales for one max |value| m: (QMAX / m, m / QMAX), (0, 0) for m == 0 */
DC_INLINE void scales(double m, double *r, double *s) {
    if (m == 0.0) {
        *r = 0.0;
        *s = 0.0;
    } else {
        *r = QMAX / m;
        *s = m / QMAX;
    }
}

/* a_hi + 64 and a_lo + 64 of an integer a (a_hi = floor((a + 64) / 128): an arithmetic shift) */
DC_INLINE uint8_t part_hi(int32_t q) { return (uint8_t)(((q + 64) >> 7) + 64); }
DC_INLINE uint8_t part_lo(int32_t q) { return (uint8_t)(q - ((q + 64) >> 7) * 128 + 64); }

/* One job's pixel range: image b, pixels [p0, p1) */
DC_INLINE void job_range(int64_t job, int64_t nchunk, int64_t P, int64_t *b, int64_t *p0, int64_t *p1) {
    int64_t bb = job / nchunk, k = job - bb * nchunk, step = (P + nchunk - 1) / nchunk;
    int64_t end = (k + 1) * step;
    *b = bb;
    *p0 = k * step;
    *p1 = end < P ? end : P;
}

/* A software prefetch of a stream's ``bytes`` next bytes DC_PREFETCH bytes ahead of ``p``
 * (one per cache line), for the epilogue's rows: on the machine measured (AMD EPYC, a VM) it
 * ran up to 2x faster with it over 16+ MiB of products (the pixel loops, which read less per
 * element, ran slower with it). A prefetch never faults (past an array's end included). */
#define DC_PREFETCH 4096
DC_INLINE void prefetch_ahead(const void *p, int64_t bytes) {
#if defined(__GNUC__) && !defined(DC_NO_PREFETCH)
    const char *c = (const char *)p + DC_PREFETCH;
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i);
#else
    (void)p;
    (void)bytes;
#endif
}

/* x [B, P, C] binary32 (is64 = 0) or binary64 (is64 = 1), element i as binary64 */
DC_INLINE double load(const void *x, int64_t i, int is64) {
    return is64 ? ((const double *)x)[i] : (double)((const float *)x)[i];
}

/* A parallel loop's body runs in a function OpenMP outlines before inlining, so each loop over
 * jobs below sits in a function of its own per specialisation (the macros), calling an inline
 * body with literal flags: inlined there, each flag's branch folds and the inner loops
 * vectorise. */
#define DC_FOR_JOBS(threads, n, job) DC_PARALLEL_FOR(threads) for (int64_t job = 0; job < (n); job++)

/* ------------------------------------------------------------------------------ absmax */

/* One job's running maximum of |x| per channel into acc [C] (zeros first; NaN skipped) */
DC_INLINE void absmax_job(const void *x, int is64, int64_t P, int64_t C, int64_t nchunk, int64_t job, void *acc) {
    int64_t b, p0, p1;
    job_range(job, nchunk, P, &b, &p0, &p1);
    for (int64_t p = p0; p < p1; p++) {
        if (is64) {
            const double *restrict xp = (const double *)x + (b * P + p) * C;
            double *restrict m = (double *)acc;
            for (int64_t c = 0; c < C; c++) {
                double v = fabs(xp[c]);
                m[c] = v > m[c] ? v : m[c];
            }
        } else {
            const float *restrict xp = (const float *)x + (b * P + p) * C;
            float *restrict m = (float *)acc;
            for (int64_t c = 0; c < C; c++) {
                float v = fabsf(xp[c]);
                m[c] = v > m[c] ? v : m[c];
            }
        }
    }
}

/* max |x[b]| over each image of x [B, P, C] into m [B] (x's type): a running maximum per
 * channel and job, then over the jobs' maxima (order-free) */
#define DC_ABSMAX(name, T, is64)                                                                                  \
    static int name(const T *x, int64_t B, int64_t P, int64_t C, int64_t nchunk, T *m, int64_t threads) {         \
        T *part = calloc((size_t)(B * nchunk * C) + 1, sizeof(T)); /* all-zero bits: 0.0 */                       \
        if (part == NULL) return -1;                                                                              \
        DC_FOR_JOBS(threads, B * nchunk, job) absmax_job(x, is64, P, C, nchunk, job, part + job * C);             \
        for (int64_t b = 0; b < B; b++) {                                                                         \
            T out = 0;                                                                                            \
            for (int64_t i = b * nchunk * C; i < (b + 1) * nchunk * C; i++) out = part[i] > out ? part[i] : out;  \
            m[b] = out;                                                                                           \
        }                                                                                                         \
        free(part);                                                                                               \
        return 0;                                                                                                 \
    }
DC_ABSMAX(absmax_f32, float, 0)
DC_ABSMAX(absmax_f64, double, 1)

/* max |x[b]| of x [B, P, C] binary32 -> out [B] binary32 */
DC_EXPORT int dc_absmax_f32(const float *x, int64_t B, int64_t P, int64_t C, int64_t nchunk, float *out,
                            int64_t threads) {
    return absmax_f32(x, B, P, C, nchunk, out, threads);
}

/* ---------------------------------------------------------------------------- quantize */

/* A pixel's integers q [C] in the PLANES form: o [C] in plane 0, o + plane in plane 1 */
#define DC_STORE_PLANES(o, plane, C, q_of_c)                                                                      \
    for (int64_t c = 0; c < (C); c++) {                                                                           \
        int32_t q = (q_of_c);                                                                                     \
        (o)[c] = part_hi(q);                                                                                      \
        (o)[(plane) + c] = part_lo(q);                                                                            \
    }

/* One job's integers clamp(rint(x r_b), +-QMAX) (binary64), PLANES (uint8 [2, B, P, C]) or
 * VALUES (binary64 [B, P, C]) */
DC_INLINE void quantize_job(const void *x, int is64, const double *r, void *out, int planes, int64_t B, int64_t P,
                            int64_t C, int64_t nchunk, int64_t job) {
    int64_t b, p0, p1;
    job_range(job, nchunk, P, &b, &p0, &p1);
    double rb = r[b];
    for (int64_t p = p0; p < p1; p++) {
        int64_t row = b * P + p;
        if (planes) {
            uint8_t *restrict o = (uint8_t *)out + row * C;
            DC_STORE_PLANES(o, B * P * C, C, quantize64(load(x, row * C + c, is64), rb))
        } else {
            double *restrict o = (double *)out + row * C;
            for (int64_t c = 0; c < C; c++) o[c] = (double)quantize64(load(x, row * C + c, is64), rb);
        }
    }
}

#define DC_QUANTIZE(name, T, is64, planes, OUT)                                                                   \
    DC_EXPORT int name(const T *x, const double *r, OUT *out, int64_t B, int64_t P, int64_t C, int64_t nchunk,    \
                       int64_t threads) {                                                                         \
        DC_FOR_JOBS(threads, B * nchunk, job) quantize_job(x, is64, r, out, planes, B, P, C, nchunk, job);        \
        return 0;                                                                                                 \
    }
/* x [B, P, C] binary32 / binary64, r [B] binary64 -> the integers in the PLANES / VALUES form */
DC_QUANTIZE(dc_quantize_f32_planes, float, 0, 1, uint8_t)
DC_QUANTIZE(dc_quantize_f32_values, float, 0, 0, double)
DC_QUANTIZE(dc_quantize_f64_planes, double, 1, 1, uint8_t)
DC_QUANTIZE(dc_quantize_f64_values, double, 1, 0, double)

/* Per image: m = max |x| (in x's type), (r, s) = scales(m), the integers clamp(rint(x r)) in
 * ``out``'s form; s [B] binary64 */
#define DC_QUANTIZE_DYNAMIC(name, T, is64, planes, OUT)                                                           \
    DC_EXPORT int name(const T *x, OUT *out, double *s, int64_t B, int64_t P, int64_t C, int64_t nchunk,          \
                       int64_t threads) {                                                                         \
        double *r = malloc((size_t)(B + 1) * sizeof(double));                                                     \
        T *m = malloc((size_t)(B + 1) * sizeof(T));                                                               \
        int rc = r == NULL || m == NULL ? -1 : absmax_##T(x, B, P, C, nchunk, m, threads);                        \
        if (rc == 0) {                                                                                            \
            for (int64_t b = 0; b < B; b++) scales((double)m[b], &r[b], &s[b]);                                   \
            DC_FOR_JOBS(threads, B * nchunk, job) quantize_job(x, is64, r, out, planes, B, P, C, nchunk, job);    \
        }                                                                                                         \
        free(r);                                                                                                  \
        free(m);                                                                                                  \
        return rc;                                                                                                \
    }
#define absmax_float absmax_f32
#define absmax_double absmax_f64
/* x [B, P, C] binary32 / binary64 -> the integers in the PLANES / VALUES form and s [B] */
DC_QUANTIZE_DYNAMIC(dc_quantize_dynamic_f32_planes, float, 0, 1, uint8_t)
DC_QUANTIZE_DYNAMIC(dc_quantize_dynamic_f32_values, float, 0, 0, double)
DC_QUANTIZE_DYNAMIC(dc_quantize_dynamic_f64_planes, double, 1, 1, uint8_t)
DC_QUANTIZE_DYNAMIC(dc_quantize_dynamic_f64_values, double, 1, 0, double)

/* ------------------------------------------------------------------------------ GroupNorm */

/* One job's per-channel q = rint(x scale_b) as int64 (x binary32): sums of q and q^2 (int64,
 * wrapping as numba's), min and max x (v < m ? v : m, as numba's min) into u1, u2, ul, uh [C] */
DC_INLINE void stats_job(const float *x, const double *scale, int64_t P, int64_t C, int64_t nchunk, int64_t job,
                         int64_t *restrict u1, int64_t *restrict u2, float *restrict ul, float *restrict uh) {
    int64_t b, p0, p1;
    job_range(job, nchunk, P, &b, &p0, &p1);
    for (int64_t c = 0; c < C; c++) {
        u1[c] = 0;
        u2[c] = 0;
        ul[c] = INFINITY;
        uh[c] = -INFINITY;
    }
    double sb = scale[b];
    for (int64_t p = p0; p < p1; p++) {
        const float *restrict xp = x + (b * P + p) * C;
        /* nearbyint: rint's value (it only leaves the inexact flag alone); GCC turns an
         * (int64) rint into lrint, which it does not vectorise */
#if defined(__AVX512DQ__)
        for (int64_t c = 0; c < C; c++) {
            float v = xp[c];
            int64_t q = (int64_t)nearbyint((double)v * sb);
            u1[c] = (int64_t)((uint64_t)u1[c] + (uint64_t)q);
            u2[c] = (int64_t)((uint64_t)u2[c] + (uint64_t)q * (uint64_t)q);
            ul[c] = v < ul[c] ? v : ul[c];
            uh[c] = v > uh[c] ? v : uh[c];
        }
#else
        for (int64_t c = 0; c < C; c++) {
            float v = xp[c];
            ul[c] = v < ul[c] ? v : ul[c];
            uh[c] = v > uh[c] ? v : uh[c];
        }
        /* no vector binary64 -> int64 conversion before AVX-512: q read off the bits of
         * q + 2^52 + 2^51 where every |q| of the pixel is below 2^51 (always, in GroupNorm's
         * fixed point), else the scalar conversion */
        int big = 0;
        for (int64_t c = 0; c < C; c++) big |= !(fabs(nearbyint((double)xp[c] * sb)) < 0x1p51);
        if (!big) {
            for (int64_t c = 0; c < C; c++) {
                uint64_t q = (uint64_t)f64_bits(nearbyint((double)xp[c] * sb) + DC_ROUND_MAGIC)
                             - (uint64_t)f64_bits(DC_ROUND_MAGIC);
                u1[c] = (int64_t)((uint64_t)u1[c] + q);
                u2[c] = (int64_t)((uint64_t)u2[c] + q * q);
            }
        } else {
            for (int64_t c = 0; c < C; c++) {
                int64_t q = (int64_t)nearbyint((double)xp[c] * sb);
                u1[c] = (int64_t)((uint64_t)u1[c] + (uint64_t)q);
                u2[c] = (int64_t)((uint64_t)u2[c] + (uint64_t)q * (uint64_t)q);
            }
        }
#endif
    }
}

/* Per image and channel of x [B, P, C] binary32, q = rint(x scale_b) as int64: t1 = sum q,
 * t2 = sum q^2 (int64 [B, C]), mn = min x, mx = max x (binary32 [B, C]); per job, then the
 * jobs in order (sums and extremes: order-free) */
static int stats_into(const float *x, const double *scale, int64_t B, int64_t P, int64_t C, int64_t nchunk,
                      int64_t *t1, int64_t *t2, float *mn, float *mx, int64_t threads) {
    size_t n = (size_t)(B * nchunk * C) + 1;
    int64_t *s1 = malloc(2 * n * sizeof(int64_t));
    float *lo = malloc(2 * n * sizeof(float));
    if (s1 == NULL || lo == NULL) {
        free(s1);
        free(lo);
        return -1;
    }
    int64_t *s2 = s1 + n;
    float *hi = lo + n;
    DC_FOR_JOBS(threads, B * nchunk, job)
    stats_job(x, scale, P, C, nchunk, job, s1 + job * C, s2 + job * C, lo + job * C, hi + job * C);
    for (int64_t b = 0; b < B; b++) {
        int64_t *restrict o1 = t1 + b * C, *restrict o2 = t2 + b * C;
        float *restrict omn = mn + b * C, *restrict omx = mx + b * C;
        for (int64_t c = 0; c < C; c++) {
            o1[c] = 0;
            o2[c] = 0;
            omn[c] = INFINITY;
            omx[c] = -INFINITY;
        }
        for (int64_t k = 0; k < nchunk; k++) {
            int64_t off = (b * nchunk + k) * C;
            for (int64_t c = 0; c < C; c++) {
                o1[c] = (int64_t)((uint64_t)o1[c] + (uint64_t)s1[off + c]);
                o2[c] = (int64_t)((uint64_t)o2[c] + (uint64_t)s2[off + c]);
                omn[c] = lo[off + c] < omn[c] ? lo[off + c] : omn[c];
                omx[c] = hi[off + c] > omx[c] ? hi[off + c] : omx[c];
            }
        }
    }
    free(s1);
    free(lo);
    return 0;
}

/* exact2_kernels.group_stats: x [B, P, C] binary32, scale [B] binary64 -> t1, t2 int64 [B, C],
 * mn, mx binary32 [B, C] */
DC_EXPORT int dc_group_stats(const float *x, const double *scale, int64_t B, int64_t P, int64_t C, int64_t nchunk,
                             int64_t *t1, int64_t *t2, float *mn, float *mx, int64_t threads) {
    return stats_into(x, scale, B, P, C, nchunk, t1, t2, mn, mx, threads);
}

/* `_norm_coefficients_torch`'s operations in its order, per image: the group's mean and
 * variance from the int64 sums, y = x a + c (a, c0 binary32 [B, C]), and r binary32 [B],
 * s binary64 [B] from the bound on |f(y)| (f = silu32 or the identity). scale, shift
 * (binary64 [B, C]) are read only when has_scale. */
DC_INLINE void coefficients_into(const int64_t *s1, const int64_t *s2, const float *lo, const float *hi,
                                 const int64_t *shift_e, int64_t B, int64_t C, int64_t n, int64_t groups,
                                 const double *weight, const double *bias, double eps, const double *scale,
                                 const double *shift, int has_scale, int silu, float *a, float *c0, float *r,
                                 double *s) {
    int64_t cg = C / groups;
    for (int64_t b = 0; b < B; b++) {
        double inv = dc_f64_from_bits((int64_t)((uint64_t)(-shift_e[b] + 1023) << 52));
        float m = 0.0f;
        for (int64_t g = 0; g < groups; g++) {
            int64_t total = 0, squares = 0;
            for (int64_t ch = g * cg; ch < (g + 1) * cg; ch++) {
                total = (int64_t)((uint64_t)total + (uint64_t)s1[b * C + ch]);
                squares = (int64_t)((uint64_t)squares + (uint64_t)s2[b * C + ch]);
            }
            double mean_q = (double)total / (double)n;
            double var_q = (double)squares / (double)n - mean_q * mean_q;
            var_q = var_q > 0.0 ? var_q : 0.0;
            double mean = mean_q * inv;
            double var = var_q * inv * inv;
            double rstd = 1.0 / sqrt(var + eps);
            for (int64_t ch = g * cg; ch < (g + 1) * cg; ch++) {
                double ab = rstd * weight[ch];
                double cb = bias[ch] - mean * ab;
                if (has_scale) {
                    double one_plus = 1.0 + scale[b * C + ch];
                    ab = ab * one_plus;
                    cb = cb * one_plus + shift[b * C + ch];
                }
                float a32 = (float)ab, c32 = (float)cb;
                a[b * C + ch] = a32;
                c0[b * C + ch] = c32;
                float y1 = lo[b * C + ch] * a32 + c32;
                float y2 = hi[b * C + ch] * a32 + c32;
                float y_lo = y1 < y2 ? y1 : y2;
                float y_hi = y1 < y2 ? y2 : y1;
                float bound;
                if (silu) {
                    float u1 = fabsf(silu32(y_lo)), u2 = fabsf(silu32(y_hi));
                    bound = u1 > u2 ? u1 : u2;
                    if (y_lo < SILU_ARGMIN_F32 && y_hi > SILU_ARGMIN_F32 && bound < -SILU_MIN_F32) bound = -SILU_MIN_F32;
                } else {
                    float u1 = fabsf(y_lo), u2 = fabsf(y_hi);
                    bound = u1 > u2 ? u1 : u2;
                }
                m = bound > m ? bound : m;
            }
        }
        double rb;
        scales((double)m, &rb, &s[b]);
        r[b] = (float)rb;
    }
}

/* exact2_kernels.norm_plan's coefficients from group_stats' sums (shift_e int64 [B]): a, c0
 * binary32 [B, C], r binary32 [B], s binary64 [B]; serial (B x C values) */
DC_EXPORT int dc_norm_coefficients(const int64_t *s1, const int64_t *s2, const float *lo, const float *hi,
                                   const int64_t *shift_e, int64_t B, int64_t C, int64_t n, int64_t groups,
                                   const double *weight, const double *bias, double eps, const double *scale,
                                   const double *shift, int64_t has_scale, int64_t silu, float *a, float *c0,
                                   float *r, double *s) {
    if (silu)
        coefficients_into(s1, s2, lo, hi, shift_e, B, C, n, groups, weight, bias, eps, scale, shift, has_scale != 0,
                          1, a, c0, r, s);
    else
        coefficients_into(s1, s2, lo, hi, shift_e, B, C, n, groups, weight, bias, eps, scale, shift, has_scale != 0,
                          0, a, c0, r, s);
    return 0;
}

#define DC_BLOCK 256 /* channels per block of the VALUES form's int32 buffer */

/* One job's integers clamp(rint(f(x a + c) r_b)) (binary32; f = silu32 or the identity) of x
 * [B, P, C] binary32, PLANES or VALUES */
DC_INLINE void apply_job(const float *x, const float *a, const float *c0, const float *r, void *out, int silu,
                         int planes, int64_t B, int64_t P, int64_t C, int64_t nchunk, int64_t job) {
    int64_t b, p0, p1;
    job_range(job, nchunk, P, &b, &p0, &p1);
    float rb = r[b];
    const float *restrict ab = a + b * C, *restrict cb = c0 + b * C;
    for (int64_t p = p0; p < p1; p++) {
        int64_t row = b * P + p;
        const float *restrict xp = x + row * C;
        if (planes) {
            uint8_t *restrict o = (uint8_t *)out + row * C;
            if (silu) {
                DC_STORE_PLANES(o, B * P * C, C, quantize32(silu32(xp[c] * ab[c] + cb[c]), rb))
            } else {
                DC_STORE_PLANES(o, B * P * C, C, quantize32(xp[c] * ab[c] + cb[c], rb))
            }
        } else {
            double *restrict o = (double *)out + row * C;
            for (int64_t c0 = 0; c0 < C; c0 += DC_BLOCK) {
                int32_t q[DC_BLOCK];
                int64_t n = C - c0 < DC_BLOCK ? C - c0 : DC_BLOCK;
                if (silu) {
                    for (int64_t c = 0; c < n; c++) q[c] = quantize32(silu32(xp[c0 + c] * ab[c0 + c] + cb[c0 + c]), rb);
                } else {
                    for (int64_t c = 0; c < n; c++) q[c] = quantize32(xp[c0 + c] * ab[c0 + c] + cb[c0 + c], rb);
                }
                for (int64_t c = 0; c < n; c++) o[c0 + c] = (double)q[c];
            }
        }
    }
}

#define DC_NORM_ACT(name, silu, planes, OUT)                                                                      \
    DC_EXPORT int name(const float *x, const float *a, const float *c0, const float *r, OUT *out, int64_t B,      \
                       int64_t P, int64_t C, int64_t nchunk, int64_t threads) {                                   \
        DC_FOR_JOBS(threads, B * nchunk, job) apply_job(x, a, c0, r, out, silu, planes, B, P, C, nchunk, job);    \
        return 0;                                                                                                 \
    }
/* exact2_kernels.norm_act: x [B, P, C], a, c0 [B, C], r [B] binary32 -> the integers */
DC_NORM_ACT(dc_norm_act_silu_planes, 1, 1, uint8_t)
DC_NORM_ACT(dc_norm_act_silu_values, 1, 0, double)
DC_NORM_ACT(dc_norm_act_planes, 0, 1, uint8_t)
DC_NORM_ACT(dc_norm_act_values, 0, 0, double)

/* norm_plan in one call: max |x|, the fixed-point shift (bits - 1 - frexp's exponent of
 * max |x|, clamped to +-1000), the exact statistics, the coefficients a, c0 [B, C] and the
 * scales r [B] (binary32), s [B] (binary64); ``mem`` (from group_norm_memory) holds them */
static size_t group_norm_memory(int64_t B, int64_t C) {
    return (size_t)B * (8 + 8 + 4 + 4) + (size_t)(B * C) * (8 + 8 + 4 + 4 + 4 + 4) + 64;
}

static int group_norm_plan(const float *x, int64_t groups, int64_t bits, const double *weight, const double *bias,
                           double eps, const double *scale, const double *shift, int has_scale, int silu, double *s,
                           int64_t B, int64_t P, int64_t C, int64_t nchunk, int64_t threads, char *mem, float **a,
                           float **c0, float **r) {
    size_t bc = (size_t)(B * C);
    int64_t *shift_e = (int64_t *)mem, *s1 = shift_e + B, *s2 = s1 + bc;
    double *scale_e = (double *)(s2 + bc);
    float *m = (float *)(scale_e + B), *rr = m + B, *lo = rr + B, *hi = lo + bc, *aa = hi + bc, *cc = aa + bc;
    if (absmax_f32(x, B, P, C, nchunk, m, threads) != 0) return -1;
    for (int64_t b = 0; b < B; b++) {
        int e = 0;
        if (m[b] != 0.0f) frexp((double)m[b], &e);
        int64_t se = bits - 1 - (int64_t)e;
        se = se < 1000 ? se : 1000;
        se = se > -1000 ? se : -1000;
        shift_e[b] = se;
        scale_e[b] = dc_f64_from_bits((int64_t)((uint64_t)(se + 1023) << 52));
    }
    if (stats_into(x, scale_e, B, P, C, nchunk, s1, s2, lo, hi, threads) != 0) return -1;
    if (silu)
        coefficients_into(s1, s2, lo, hi, shift_e, B, C, (C / groups) * P, groups, weight, bias, eps, scale, shift,
                          has_scale, 1, aa, cc, rr, s);
    else
        coefficients_into(s1, s2, lo, hi, shift_e, B, C, (C / groups) * P, groups, weight, bias, eps, scale, shift,
                          has_scale, 0, aa, cc, rr, s);
    *a = aa;
    *c0 = cc;
    *r = rr;
    return 0;
}

#define DC_GROUP_NORM(name, silu, planes, OUT)                                                                    \
    DC_EXPORT int name(const float *x, int64_t groups, int64_t bits, const double *weight, const double *bias,    \
                       double eps, const double *scale, const double *shift, int64_t has_scale, OUT *out,         \
                       double *s, int64_t B, int64_t P, int64_t C, int64_t nchunk, int64_t threads) {             \
        char *mem = malloc(group_norm_memory(B, C));                                                              \
        float *a, *c0, *r;                                                                                        \
        int rc = mem == NULL ? -1                                                                                 \
                             : group_norm_plan(x, groups, bits, weight, bias, eps, scale, shift, has_scale != 0,  \
                                               silu, s, B, P, C, nchunk, threads, mem, &a, &c0, &r);              \
        if (rc == 0)                                                                                              \
            DC_FOR_JOBS(threads, B * nchunk, job)                                                                 \
                apply_job(x, a, c0, r, out, silu, planes, B, P, C, nchunk, job);                                  \
        free(mem);                                                                                                \
        return rc;                                                                                                \
    }
/* exact2_kernels.group_norm_operand (norm_plan then norm_act): x [B, P, C] binary32, weight,
 * bias [C] binary64, scale, shift [B, C] binary64 (read when has_scale) -> the integers, s [B] */
DC_GROUP_NORM(dc_group_norm_silu_planes, 1, 1, uint8_t)
DC_GROUP_NORM(dc_group_norm_silu_values, 1, 0, double)
DC_GROUP_NORM(dc_group_norm_planes, 0, 1, uint8_t)
DC_GROUP_NORM(dc_group_norm_values, 0, 0, double)

/* ---------------------------------------------------------------------------- epilogues */

/* The sums of an output row: VALUES, gv [N] holds v (binary64); PARTS, the int8 products
 * gh [2N] (a_hi's with w_hi, then with 16 w_lo) and gl [N] (a_lo's with w_hi), binary32
 * integers: v = 1024 gh[n] + 8 (gh[N + n] + gl[n]), each step exact in binary64; or the
 * same products as int32 (ih, il: the matrix products of the planes' bytes, zero point
 * included) less the zero point's share of each (zh [2N], zl [N]): gh = ih - zh, gl = il - zl,
 * exact int32 differences, the same integers */
typedef struct {
    const double *restrict gv;
    const float *restrict gh, *restrict gl;
    const int32_t *restrict ih, *restrict il, *restrict zh, *restrict zl;
} dc_sums;

enum { SUMS_VALUES, SUMS_F32, SUMS_I32 }; /* the form, a constant where the row loops are made */

DC_INLINE double combine(dc_sums g, int64_t n, int64_t N, int form) {
    if (form == SUMS_VALUES) return g.gv[n];
    if (form == SUMS_I32)
        return (double)(g.ih[n] - g.zh[n]) * 1024.0 + ((double)(g.ih[N + n] - g.zh[N + n]) + (double)(g.il[n] - g.zl[n])) * 8.0;
    return (double)g.gh[n] * 1024.0 + ((double)g.gh[N + n] + (double)g.gl[n]) * 8.0;
}

/* A layer's sums in one of the three forms above (the others NULL) */
typedef struct {
    const double *G;
    const float *Gh, *Gl;
    const int32_t *Ih, *Il, *Zh, *Zl;
} dc_products;

DC_INLINE int sums_form(dc_products p) { return p.G != NULL ? SUMS_VALUES : p.Ih != NULL ? SUMS_I32 : SUMS_F32; }

/* Row ``row`` of the sums (prefetching it) */
DC_INLINE dc_sums sums_row(dc_products p, int64_t N, int64_t row, int form) {
    dc_sums g = {NULL, NULL, NULL, NULL, NULL, NULL, NULL};
    if (form == SUMS_VALUES) {
        g.gv = p.G + row * N;
        prefetch_ahead(g.gv, N * 8);
    } else if (form == SUMS_I32) {
        g.ih = p.Ih + row * 2 * N;
        g.il = p.Il + row * N;
        g.zh = p.Zh;
        g.zl = p.Zl;
        prefetch_ahead(g.ih, N * 8);
        prefetch_ahead(g.il, N * 4);
    } else {
        g.gh = p.Gh + row * 2 * N;
        g.gl = p.Gl + row * N;
        prefetch_ahead(g.gh, N * 8);
        prefetch_ahead(g.gl, N * 4);
    }
    return g;
}

/* S[b, n] = s_x[b] s_w[n] (binary64, one product each), or NULL */
static double *scale_table(const double *s_x, int64_t nb, const double *s_w, int64_t N) {
    double *S = malloc((size_t)(nb * N) * sizeof(double) + 8);
    if (S != NULL)
        for (int64_t b = 0; b < nb; b++)
            for (int64_t n = 0; n < N; n++) S[b * N + n] = s_x[b] * s_w[n];
    return S;
}

/* Output row ``row`` [N] binary32: y = fl32(v S[row / P, n]) + bias[n], then (mode 1)
 * y + add[row / P, n] or (mode 2) residual[row, n] + y, one binary32 rounding each */
DC_INLINE void epilogue_row(dc_products p, int64_t N, int64_t P, const double *S,
                            const float *restrict bias, const float *add, const float *residual, int form, int mode,
                            float *out, int64_t row) {
    int64_t b = row / P;
    dc_sums g = sums_row(p, N, row, form);
    const double *restrict Sb = S + b * N;
    float *restrict o = out + row * N;
    if (mode) prefetch_ahead(mode == 1 ? add + b * N : residual + row * N, mode == 1 ? 0 : N * 4);
    if (mode == 1) {
        const float *restrict ad = add + b * N;
        for (int64_t n = 0; n < N; n++) o[n] = ((float)(combine(g, n, N, form) * Sb[n]) + bias[n]) + ad[n];
    } else if (mode == 2) {
        const float *restrict re = residual + row * N;
        for (int64_t n = 0; n < N; n++) o[n] = re[n] + ((float)(combine(g, n, N, form) * Sb[n]) + bias[n]);
    } else {
        for (int64_t n = 0; n < N; n++) o[n] = (float)(combine(g, n, N, form) * Sb[n]) + bias[n];
    }
}

/* Output row ``row`` [N] binary64: v S[row / P, n] + bias[n] (the output layer) */
DC_INLINE void epilogue64_row(dc_products p, int64_t N, int64_t P, const double *S, const double *restrict bias,
                              int form, double *out, int64_t row) {
    dc_sums g = sums_row(p, N, row, form);
    const double *restrict Sb = S + (row / P) * N;
    double *restrict o = out + row * N;
    for (int64_t n = 0; n < N; n++) o[n] = combine(g, n, N, form) * Sb[n] + bias[n];
}

/* exact2_kernels.epilogue: the sums as G [M, N] binary64 (VALUES), as the int8 products
 * Gh [M, 2N] and Gl [M, N] binary32, or as Ih [M, 2N] and Il [M, N] int32 with the zero
 * point's shares Zh [2N] and Zl [N] (one form given, the others NULL); s_x [nb], s_w [N]
 * binary64; P pixels per image (row / P < nb); bias, add [nb, N], residual [M, N] binary32
 * (read in mode 1 / 2 only), mode 0 plain / 1 add / 2 residual, out [M, N] binary32 */
DC_EXPORT int dc_epilogue(const double *G, const float *Gh, const float *Gl, const int32_t *Ih, const int32_t *Il,
                          const int32_t *Zh, const int32_t *Zl, int64_t M, int64_t N, int64_t P, const double *s_x,
                          int64_t nb, const double *s_w, const float *bias, const float *add, const float *residual,
                          int64_t mode, float *out, int64_t threads) {
    dc_products p = {G, Gh, Gl, Ih, Il, Zh, Zl};
    double *S = scale_table(s_x, nb, s_w, N);
    if (S == NULL) return -1;
    int form = sums_form(p);
/* one loop per (form, mode), each a constant there */
#define DC_EPILOGUE_JOBS(FORM, MODE) \
    DC_FOR_JOBS(threads, M, row) epilogue_row(p, N, P, S, bias, add, residual, FORM, MODE, out, row)
#define DC_EPILOGUE_MODES(FORM)          \
    if (mode == 1) {                     \
        DC_EPILOGUE_JOBS(FORM, 1);       \
    } else if (mode == 2) {              \
        DC_EPILOGUE_JOBS(FORM, 2);       \
    } else {                             \
        DC_EPILOGUE_JOBS(FORM, 0);       \
    }
    if (form == SUMS_VALUES) {
        DC_EPILOGUE_MODES(SUMS_VALUES)
    } else if (form == SUMS_I32) {
        DC_EPILOGUE_MODES(SUMS_I32)
    } else {
        DC_EPILOGUE_MODES(SUMS_F32)
    }
#undef DC_EPILOGUE_MODES
#undef DC_EPILOGUE_JOBS
    free(S);
    return 0;
}

/* The same sums, bias [N] binary64 -> out [M, N] binary64 */
DC_EXPORT int dc_epilogue_f64(const double *G, const float *Gh, const float *Gl, const int32_t *Ih,
                              const int32_t *Il, const int32_t *Zh, const int32_t *Zl, int64_t M, int64_t N, int64_t P,
                              const double *s_x, int64_t nb, const double *s_w, const double *bias, double *out,
                              int64_t threads) {
    dc_products p = {G, Gh, Gl, Ih, Il, Zh, Zl};
    double *S = scale_table(s_x, nb, s_w, N);
    if (S == NULL) return -1;
    int form = sums_form(p);
    if (form == SUMS_VALUES) {
        DC_FOR_JOBS(threads, M, row) epilogue64_row(p, N, P, S, bias, SUMS_VALUES, out, row);
    } else if (form == SUMS_I32) {
        DC_FOR_JOBS(threads, M, row) epilogue64_row(p, N, P, S, bias, SUMS_I32, out, row);
    } else {
        DC_FOR_JOBS(threads, M, row) epilogue64_row(p, N, P, S, bias, SUMS_F32, out, row);
    }
    free(S);
    return 0;
}

/* ------------------------------------------------------------------------------ attention */

#define DC_LANES 8 /* independent partial maxima / sums: the compiler vectorises across them */

/* exact2_kernels.softmax_weights' row ``row`` of scores [R, T] (exact integers, binary64), in
 * place: rint(weight_scale e^t), t = (s - max s) c_row clamped to [-700, 700] (a NaN t to
 * -700); its sum (integers below 2^53: exact in any order, summed in DC_LANES partial sums).
 * The maximum per lane, then over the lanes: order-free (a NaN first score gives NaN, later
 * ones are skipped, as by a running `s > m ? s : m`; +-0 give the same weights). */
DC_INLINE double softmax_row(double *scores, const double *c, int64_t T, double weight_scale, int64_t row) {
    double *restrict s = scores + row * T;
    double lane[DC_LANES];
    for (int l = 0; l < DC_LANES; l++) lane[l] = s[0];
    int64_t j = 0;
    for (; j + DC_LANES <= T; j += DC_LANES)
        for (int l = 0; l < DC_LANES; l++) lane[l] = s[j + l] > lane[l] ? s[j + l] : lane[l];
    double m = s[0];
    for (; j < T; j++) m = s[j] > m ? s[j] : m;
    for (int l = 0; l < DC_LANES; l++) m = lane[l] > m ? lane[l] : m;
    double cr = c[row];
    for (j = 0; j < T; j++) {
        double t = min64(max64((s[j] - m) * cr, -EXP_ARG_LIMIT), EXP_ARG_LIMIT);
        s[j] = nearbyint(exp_clamped(t) * weight_scale);
    }
    for (int l = 0; l < DC_LANES; l++) lane[l] = 0.0;
    for (j = 0; j + DC_LANES <= T; j += DC_LANES)
        for (int l = 0; l < DC_LANES; l++) lane[l] += s[j + l];
    double total = 0.0;
    for (; j < T; j++) total += s[j];
    for (int l = 0; l < DC_LANES; l++) total += lane[l];
    return total;
}

/* exact2_kernels.softmax_weights: scores [R, T] (T >= 1) in place, den [R] the row sums */
DC_EXPORT int dc_softmax_weights(double *scores, const double *c, int64_t R, int64_t T, double weight_scale,
                                 double *den, int64_t threads) {
    DC_FOR_JOBS(threads, R, row) den[row] = softmax_row(scores, c, T, weight_scale, row);
    return 0;
}

/* One (part p, image b) job of quantize_heads: the max |value| of qkv[b, :, p] (per lane of
 * acc [H d], then over them), scales, the integers into out[p, b] [H, T, d] */
DC_INLINE void heads_job(const float *qkv, int64_t B, int64_t T, int64_t parts, int64_t H, int64_t d, double *out,
                         double *s, float *restrict acc, int64_t job) {
    int64_t hd = H * d, p = job / B, b = job - p * B;
    for (int64_t i = 0; i < hd; i++) acc[i] = 0.0f;
    for (int64_t t = 0; t < T; t++) {
        const float *restrict row = qkv + ((b * T + t) * parts + p) * hd;
        for (int64_t i = 0; i < hd; i++) {
            float v = fabsf(row[i]);
            acc[i] = v > acc[i] ? v : acc[i];
        }
    }
    float m = 0.0f;
    for (int64_t i = 0; i < hd; i++) m = acc[i] > m ? acc[i] : m;
    double r;
    scales((double)m, &r, &s[p * B + b]);
    for (int64_t h = 0; h < H; h++)
        for (int64_t t = 0; t < T; t++) {
            const float *restrict src = qkv + ((b * T + t) * parts + p) * hd + h * d;
            double *restrict dst = out + (((p * B + b) * H + h) * T + t) * d;
            for (int64_t i = 0; i < d; i++) dst[i] = (double)quantize64((double)src[i], r);
        }
}

/* exact2_kernels.quantize_heads: qkv [B, T, parts, H, d] binary32 -> out [parts, B, H, T, d]
 * binary64, s [parts, B]: each part quantized per image by its max |value| (as
 * quantize_dynamic in the VALUES form); one job per (part, image) */
DC_EXPORT int dc_quantize_heads(const float *qkv, int64_t B, int64_t T, int64_t parts, int64_t H, int64_t d,
                                double *out, double *s, int64_t threads) {
    float *acc = malloc((size_t)(parts * B * H * d) * sizeof(float) + 4);
    if (acc == NULL) return -1;
    DC_FOR_JOBS(threads, parts * B, job) heads_job(qkv, B, T, parts, H, d, out, s, acc + job * H * d, job);
    free(acc);
    return 0;
}

/* ------------------------------------------------------------------------------ im2col */

/* exact2_kernels.im2col_planes: planes [2 B, H, W, C] uint8 (the PLANES form, both planes as
 * 2B images) -> cols [2 B Ho Wo, k k C] (kernel row, kernel column, channel), each output
 * pixel's window; outside the image the zero point (a part 0). Data movement only. */
DC_EXPORT int dc_im2col_planes(const uint8_t *x, int64_t images, int64_t H, int64_t W, int64_t C, int64_t k,
                               int64_t stride, int64_t top, int64_t left, int64_t Ho, int64_t Wo, uint8_t *out,
                               int64_t threads) {
    int64_t pixels = Ho * Wo;
    DC_FOR_JOBS(threads, images * pixels, row) {
        int64_t image = row / pixels, pix = row - image * pixels, oy = pix / Wo, ox = pix - oy * Wo;
        uint8_t *o = out + row * k * k * C;
        for (int64_t i = 0; i < k; i++)
            for (int64_t j = 0; j < k; j++, o += C) {
                int64_t iy = oy * stride - top + i, ix = ox * stride - left + j;
                if (iy >= 0 && iy < H && ix >= 0 && ix < W)
                    memcpy(o, x + ((image * H + iy) * W + ix) * C, (size_t)C);
                else
                    memset(o, 64, (size_t)C);
            }
    }
    return 0;
}

/* ---------------------------------------------------------------------------------- SiLU */

/* exact.silu elementwise: x [n] binary64 -> out [n] */
DC_EXPORT int dc_silu64(const double *restrict x, double *restrict out, int64_t n, int64_t threads) {
    DC_FOR_JOBS(threads, n, i) out[i] = silu64(x[i]);
    return 0;
}

/* exact2_kernels.silu32 elementwise: x [n] binary32 -> out [n] */
DC_EXPORT int dc_silu32(const float *restrict x, float *restrict out, int64_t n, int64_t threads) {
    DC_FOR_JOBS(threads, n, i) out[i] = silu32(x[i]);
    return 0;
}
