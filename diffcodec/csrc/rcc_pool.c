/* The candidate pools of progressive stream versions 4 to 6 (diffcodec/codec/rcc_pool.py):
 * counter-based draws (SplitMix64's output function), their normals (Box-Muller pairs from
 * binary32 polynomials, or version 6's table), the encoder's search rows and minima, and the
 * decoder's samples. Every normal is the bits of `box_muller_np` / `table_normals_np` (the
 * numpy references), operation for operation: uint64 arithmetic wraps, the int32 steps stay
 * within int32 (no overflow, no shift of a negative value), binary32 + - x / sqrt one at a
 * time (-ffp-contract=off: no fused multiply-add; sqrtf is IEEE's, and -fno-math-errno lets
 * its loops vectorize). The constants below are the binary32 roundings of rcc_pool.py's
 * literals (`dc_rcc_constants` gives them back to the test that compares them). Each parallel
 * loop's iterations write disjoint outputs, and the search's minima are exact (an order-free
 * minimum of exact differences), so every thread count and vector width gives the same bits. */
#include <stdlib.h>

#include "kernels.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#define RCC_GAMMA 0x9E3779B97F4A7C15ULL /* SplitMix64's increment */
#define RCC_MIX1 0xBF58476D1CE4E5B9ULL
#define RCC_MIX2 0x94D049BB133111EBULL
#define RCC_TABLE_BITS 16
#define RCC_TABLE_MASK 0xFFFFULL
#define RCC_ROW_ALIGN 64
#define RCC_BM_SQRT2_BITS 0x3FB504F3 /* the binary32 just below sqrt(2) */
#define RCC_SIGN_BIT 0x80000000u     /* a binary32's sign bit */
#define RCC_LANES 16                 /* the pick's minimum: lanes of one run */
#define RCC_BLOCK 256                /* draws per block: a vector loop, then table reads or a scatter */
#define RCC_RUNS_ON_STACK 256        /* runs of ROW_ALIGN rows per block kept on the stack (R <= 2^14) */

/* BM_*: float(np.float32(v)).hex() of rcc_pool.py's values */
#define RCC_BM_ONE 0x1.0000000000000p+0f
#define RCC_BM_HALF 0x1.0000000000000p-1f
#define RCC_BM_TWO 0x1.0000000000000p+1f
#define RCC_BM_LN2 0x1.62e4300000000p-1f
#define RCC_BM_ANGLE 0x1.921fb60000000p-22f
#define RCC_BM_LOG0 0x1.c71c720000000p-4f /* 1/9 */
#define RCC_BM_LOG1 0x1.24924a0000000p-3f /* 1/7 */
#define RCC_BM_LOG2 0x1.99999a0000000p-3f /* 1/5 */
#define RCC_BM_LOG3 0x1.5555560000000p-2f /* 1/3 */
#define RCC_BM_SIN0 0x1.71de3a0000000p-19f /* 1/9! */
#define RCC_BM_SIN1 0x1.a01a020000000p-13f /* 1/7! */
#define RCC_BM_SIN2 0x1.1111120000000p-7f  /* 1/5! */
#define RCC_BM_SIN3 0x1.5555560000000p-3f  /* 1/3! */
#define RCC_BM_COS0 0x1.a01a020000000p-16f /* 1/8! */
#define RCC_BM_COS1 0x1.6c16c20000000p-10f /* 1/6! */
#define RCC_BM_COS2 0x1.5555560000000p-5f  /* 1/4! */

/* Draw i of the stream `key`: mix64(key + (i + 1) gamma), mod 2^64. */
DC_INLINE uint64_t rcc_draw(uint64_t key, uint64_t i) {
    uint64_t z = key + (i + 1u) * RCC_GAMMA;
    z = (z ^ (z >> 30)) * RCC_MIX1;
    z = (z ^ (z >> 27)) * RCC_MIX2;
    return z ^ (z >> 31);
}

/* `box_muller_np` of one draw, operation for operation: (cos part, sin part). */
DC_INLINE void rcc_box_muller(uint64_t z, float *lo, float *hi) {
    int32_t x = (int32_t)(z >> 40) + 1; /* [1, 2^24]: exact in binary32 */
    int32_t bits = dc_f32_bits((float)x);
    int32_t e = (bits >> 23) - 127; /* bits > 0 */
    int32_t mb = (bits & 0x007FFFFF) | 0x3F800000;
    int32_t big = mb > RCC_BM_SQRT2_BITS;
    float m = dc_f32_from_bits(mb - (big << 23));
    e = e + big;
    float s = (m - RCC_BM_ONE) / (m + RCC_BM_ONE);
    float s2 = s * s;
    float p = s2 * RCC_BM_LOG0 + RCC_BM_LOG1;
    p = p * s2 + RCC_BM_LOG2;
    p = p * s2 + RCC_BM_LOG3;
    p = p * s2 + RCC_BM_ONE;
    float lnm = RCC_BM_TWO * s * p;
    float t = (float)(24 - e) * RCC_BM_LN2 - lnm;
    float r = sqrtf(RCC_BM_TWO * t);
    int32_t k = (int32_t)(z & 0xFFFFFFu);
    int32_t o = k >> 21;
    int32_t f = k & 0x1FFFFF;
    int32_t g = f + (o & 1) * (0x200000 - f - f);
    float ph = (float)g * RCC_BM_ANGLE;
    float q = ph * ph;
    float sn = q * RCC_BM_SIN0 - RCC_BM_SIN1;
    sn = sn * q + RCC_BM_SIN2;
    sn = sn * q - RCC_BM_SIN3;
    sn = sn * q * ph + ph;
    float cs = q * RCC_BM_COS0 - RCC_BM_COS1;
    cs = cs * q + RCC_BM_COS2;
    cs = cs * q - RCC_BM_HALF;
    cs = cs * q + RCC_BM_ONE;
    uint32_t swap = 0u - (uint32_t)(((o + 1) >> 1) & 1); /* all ones where sine and cosine trade places */
    uint32_t sb = (uint32_t)dc_f32_bits(sn), cb = (uint32_t)dc_f32_bits(cs);
    uint32_t c1 = ((sb & swap) | (cb & ~swap)) ^ ((uint32_t)(((o + 2) >> 2) & 1) * RCC_SIGN_BIT);
    uint32_t s1 = ((cb & swap) | (sb & ~swap)) ^ ((uint32_t)(o >> 2) * RCC_SIGN_BIT);
    *lo = r * dc_f32_from_bits((int32_t)c1);
    *hi = r * dc_f32_from_bits((int32_t)s1);
}

/* The constants above, for the test that compares them with rcc_pool.py's: f [16] the
 * binary32 ones (ONE, HALF, TWO, LN2, ANGLE, LOG[4], SIN[4], COS[3]), n [8] the integers
 * (GAMMA, MIX1, MIX2 as int64 bits, TABLE_BITS, TABLE_MASK, ROW_ALIGN, SQRT2_BITS, SIGN_BIT as
 * an int32). */
DC_EXPORT void dc_rcc_constants(float *f, int64_t *n) {
    const float fs[16] = {RCC_BM_ONE,  RCC_BM_HALF, RCC_BM_TWO,  RCC_BM_LN2,  RCC_BM_ANGLE, RCC_BM_LOG0,
                          RCC_BM_LOG1, RCC_BM_LOG2, RCC_BM_LOG3, RCC_BM_SIN0, RCC_BM_SIN1,  RCC_BM_SIN2,
                          RCC_BM_SIN3, RCC_BM_COS0, RCC_BM_COS1, RCC_BM_COS2};
    for (int j = 0; j < 16; j++) f[j] = fs[j];
    n[0] = (int64_t)RCC_GAMMA;
    n[1] = (int64_t)RCC_MIX1;
    n[2] = (int64_t)RCC_MIX2;
    n[3] = RCC_TABLE_BITS;
    n[4] = (int64_t)RCC_TABLE_MASK;
    n[5] = RCC_ROW_ALIGN;
    n[6] = RCC_BM_SQRT2_BITS;
    n[7] = -(int64_t)RCC_SIGN_BIT;
}

/* out[j] = draw counters[j] of the stream key (uint64 [n]). */
DC_EXPORT void dc_rcc_draws(uint64_t key, const uint64_t *restrict counters, int64_t n, uint64_t *restrict out) {
    for (int64_t j = 0; j < n; j++) out[j] = rcc_draw(key, counters[j]);
}

/* The Box-Muller pairs of draws z [n]: lo, hi float32 [n] (the tests' view of the transform). */
DC_EXPORT void dc_rcc_box_muller(const uint64_t *restrict z, int64_t n, float *restrict lo, float *restrict hi,
                                 int64_t threads) {
    DC_PARALLEL_FOR(threads)
    for (int64_t j = 0; j < n; j++) rcc_box_muller(z[j], &lo[j], &hi[j]);
}

/* --------------------------------------------------------------------------- samples */

/* lo[i], hi[i] = the pair of draw c0 + i of the stream key, i < len (a vector loop). */
static void rcc_pairs(uint64_t key, uint64_t c0, int64_t len, float *restrict lo, float *restrict hi) {
    for (int64_t i = 0; i < len; i++) rcc_box_muller(rcc_draw(key, c0 + (uint64_t)i), &lo[i], &hi[i]);
}

/* h: draws per pool row, the largest chunk's columns in whole draws of `per_draw` normals. */
static int64_t rcc_draws_per_row(const int64_t *bounds, int64_t m, int64_t per_draw) {
    int64_t d = 0;
    for (int64_t c = 0; c < m; c++) d = bounds[c + 1] - bounds[c] > d ? bounds[c + 1] - bounds[c] : d;
    return (d + per_draw - 1) / per_draw;
}

/* The decoder's sample: out[perm[bounds[c] + j]] = column j (< bounds[c + 1] - bounds[c]) of
 * row indices[c] XOR offsets[c] of pool c / G (its stream keys[c / G]; rows of h draws, h
 * from the largest chunk); Box-Muller: columns 2i, 2i + 1 from the row's draw i (draw
 * row h + i of the stream). Chunks c < m over threads. */
DC_EXPORT void dc_rcc_samples(const uint64_t *restrict keys, int64_t G, const int64_t *restrict indices,
                              const int64_t *restrict offsets, const int64_t *restrict bounds, int64_t m,
                              const int64_t *restrict perm, float *restrict out, int64_t threads) {
    int64_t h = rcc_draws_per_row(bounds, m, 2);
    DC_PARALLEL_FOR(threads)
    for (int64_t c = 0; c < m; c++) {
        uint64_t base = (uint64_t)(indices[c] ^ offsets[c]) * (uint64_t)h, key = keys[c / G];
        int64_t s0 = bounds[c], size = bounds[c + 1] - bounds[c];
        float lo[RCC_BLOCK], hi[RCC_BLOCK];
        for (int64_t i0 = 0; 2 * i0 < size; i0 += RCC_BLOCK) { /* a block of pairs (a vector loop), then its scatter */
            int64_t left = (size + 1) / 2 - i0, len = left < RCC_BLOCK ? left : RCC_BLOCK;
            rcc_pairs(key, base + (uint64_t)i0, len, lo, hi);
            const int64_t *dims = perm + s0 + 2 * i0;
            int64_t cols = size - 2 * i0 < 2 * len ? size - 2 * i0 : 2 * len;
            for (int64_t i = 0; 2 * i + 1 < cols; i++) {
                out[dims[2 * i]] = lo[i];
                out[dims[2 * i + 1]] = hi[i];
            }
            if (cols & 1) out[dims[cols - 1]] = lo[cols / 2];
        }
    }
}

/* `dc_rcc_samples` of version 6: column 4i + j of a row is table[bits 16j.. of its draw i]. */
DC_EXPORT void dc_rcc_table_samples(const uint64_t *restrict keys, int64_t G, const int64_t *restrict indices,
                                    const int64_t *restrict offsets, const int64_t *restrict bounds, int64_t m,
                                    const int64_t *restrict perm, const float *restrict table, float *restrict out,
                                    int64_t threads) {
    int64_t h = rcc_draws_per_row(bounds, m, 4);
    DC_PARALLEL_FOR(threads)
    for (int64_t c = 0; c < m; c++) {
        uint64_t base = (uint64_t)(indices[c] ^ offsets[c]) * (uint64_t)h, key = keys[c / G];
        int64_t s0 = bounds[c], size = bounds[c + 1] - bounds[c];
        uint64_t z[RCC_BLOCK];
        for (int64_t i0 = 0; 4 * i0 < size; i0 += RCC_BLOCK) { /* a block of draws (a vector loop), then its scatter */
            int64_t left = (size + 3) / 4 - i0, len = left < RCC_BLOCK ? left : RCC_BLOCK;
            for (int64_t i = 0; i < len; i++) z[i] = rcc_draw(key, base + (uint64_t)(i0 + i));
            const int64_t *dims = perm + s0 + 4 * i0;
            int64_t cols = size - 4 * i0 < 4 * len ? size - 4 * i0 : 4 * len;
            for (int64_t col = 0; col < cols; col++)
                out[dims[col]] = table[(z[col >> 2] >> (RCC_TABLE_BITS * (col & 3))) & RCC_TABLE_MASK];
        }
    }
}

/* ------------------------------------------------------------------------------ rows */

/* Rows row0 .. row0 + R - 1 of column pair i of one pool: draws c0, c0 + h, ... (a vector loop). */
static void rcc_rows_run(uint64_t key, uint64_t c0, uint64_t h, int64_t R, float *restrict sq0,
                         float *restrict sq1, float *restrict v0, float *restrict v1) {
    for (int64_t n = 0; n < R; n++) {
        float lo, hi;
        rcc_box_muller(rcc_draw(key, c0 + (uint64_t)n * h), &lo, &hi);
        v0[n] = lo;
        v1[n] = hi;
        sq0[n] = lo * lo;
        sq1[n] = hi * hi;
    }
}

/* out[p, 2i + e, n] = u^2 and out[p, 2h + 2i + e, n] = u, u column 2i + e of row row0 + n of
 * pool keys[p] (float32 [P, 4h, R]: the search's [u^2; u] columns); (pool, pair) jobs over threads. */
DC_EXPORT void dc_rcc_rows(const uint64_t *restrict keys, int64_t P, int64_t row0, int64_t h, int64_t R,
                           float *restrict out, int64_t threads) {
    DC_PARALLEL_FOR(threads)
    for (int64_t job = 0; job < P * h; job++) {
        int64_t p = job / h, i = job - p * h;
        float *pool = out + p * 4 * h * R;
        rcc_rows_run(keys[p], (uint64_t)row0 * (uint64_t)h + (uint64_t)i, (uint64_t)h, R, pool + 2 * i * R,
                     pool + (2 * i + 1) * R, pool + (2 * h + 2 * i) * R, pool + (2 * h + 2 * i + 1) * R);
    }
}

/* u[n] = table[idx[n]], sq[n] = u[n]^2, n < len: AVX-512 / AVX2 gathers where the level has
 * them (GCC's generic tuning does not vectorize table reads by itself), exact loads either way. */
DC_INLINE void rcc_lookup(const float *restrict table, const int32_t *restrict idx, int64_t len, float *restrict sq,
                          float *restrict u) {
    int64_t n = 0;
#if defined(__AVX512F__)
    for (; n + 16 <= len; n += 16) {
        __m512 v = _mm512_i32gather_ps(_mm512_loadu_si512((const void *)(idx + n)), table, 4);
        _mm512_storeu_ps(u + n, v);
        _mm512_storeu_ps(sq + n, _mm512_mul_ps(v, v));
    }
#elif defined(__AVX2__)
    for (; n + 8 <= len; n += 8) {
        __m256 v = _mm256_i32gather_ps(table, _mm256_loadu_si256((const __m256i *)(idx + n)), 4);
        _mm256_storeu_ps(u + n, v);
        _mm256_storeu_ps(sq + n, _mm256_mul_ps(v, v));
    }
#endif
    for (; n < len; n++) {
        float v = table[idx[n]];
        u[n] = v;
        sq[n] = v * v;
    }
}

/* Version 6's rows of draw column i of one pool: four table normals per draw, column 4i + j
 * (u^2 at sq + j R, u at v + j R). Blocks of RCC_BLOCK rows: the draws' 16-bit fields (a
 * vector loop), then the table reads. */
static void rcc_table_rows_run(uint64_t key, uint64_t c0, uint64_t h, int64_t R, const float *restrict table,
                               float *restrict sq, float *restrict v) {
    int32_t idx[4][RCC_BLOCK];
    for (int64_t n0 = 0; n0 < R; n0 += RCC_BLOCK) {
        int64_t len = R - n0 < RCC_BLOCK ? R - n0 : RCC_BLOCK;
        uint64_t c = c0 + (uint64_t)n0 * h;
        for (int64_t n = 0; n < len; n++) {
            uint64_t z = rcc_draw(key, c + (uint64_t)n * h);
            idx[0][n] = (int32_t)(z & RCC_TABLE_MASK);
            idx[1][n] = (int32_t)((z >> RCC_TABLE_BITS) & RCC_TABLE_MASK);
            idx[2][n] = (int32_t)((z >> (2 * RCC_TABLE_BITS)) & RCC_TABLE_MASK);
            idx[3][n] = (int32_t)(z >> (3 * RCC_TABLE_BITS));
        }
        for (int j = 0; j < 4; j++) rcc_lookup(table, idx[j], len, sq + j * R + n0, v + j * R + n0);
    }
}

/* `dc_rcc_rows` of version 6: out[p, c, n] = u^2 and out[p, 4h + c, n] = u, u column c = 4i + j
 * of row row0 + n of pool keys[p] (float32 [P, 8h, R]). */
DC_EXPORT void dc_rcc_table_rows(const uint64_t *restrict keys, int64_t P, int64_t row0, int64_t h, int64_t R,
                                 const float *restrict table, float *restrict out, int64_t threads) {
    DC_PARALLEL_FOR(threads)
    for (int64_t job = 0; job < P * h; job++) {
        int64_t p = job / h, i = job - p * h;
        float *pool = out + p * 8 * h * R;
        rcc_table_rows_run(keys[p], (uint64_t)row0 * (uint64_t)h + (uint64_t)i, (uint64_t)h, R, table,
                           pool + 4 * i * R, pool + (4 * h + 4 * i) * R);
    }
}

/* ------------------------------------------------------------------------------ minima */

#if defined(__GNUC__) || defined(__clang__)
/* 16 binary32 lanes (GCC's vector extension: one AVX-512 register, two AVX2 or four SSE2
 * ones; every width gives the same lanes). */
typedef float rcc_v16f __attribute__((vector_size(64)));
typedef int32_t rcc_v16i __attribute__((vector_size(64)));

/* x = lt[0..16) - row[0..16) (unaligned loads) */
#define RCC_DIFF16(x, lt, row)             \
    do {                                   \
        rcc_v16f a_, b_;                   \
        memcpy(&a_, (lt), sizeof a_);      \
        memcpy(&b_, (row), sizeof b_);     \
        (x) = a_ - b_;                     \
    } while (0)

/* min over t < ROW_ALIGN of lt[t] - row[t]: 16 lanes of x < acc ? x : acc (the vector
 * minimum's rule, no fast-math needed), then across the lanes; a minimum of exact
 * differences, so order-free. */
DC_INLINE float rcc_run_min(const float *restrict lt, const float *restrict row) {
    rcc_v16f acc, x;
    RCC_DIFF16(acc, lt, row);
    for (int t0 = RCC_LANES; t0 < RCC_ROW_ALIGN; t0 += RCC_LANES) {
        RCC_DIFF16(x, lt + t0, row + t0);
        rcc_v16i less = x < acc;
        acc = (rcc_v16f)(((rcc_v16i)x & less) | ((rcc_v16i)acc & ~less));
    }
    float m = acc[0];
    for (int lane = 1; lane < RCC_LANES; lane++) m = acc[lane] < m ? acc[lane] : m;
    return m;
}
#else
/* The same lanes in plain C (other compilers). */
DC_INLINE float rcc_run_min(const float *restrict lt, const float *restrict row) {
    float acc[RCC_LANES];
    for (int lane = 0; lane < RCC_LANES; lane++) acc[lane] = lt[lane] - row[lane];
    for (int t0 = RCC_LANES; t0 < RCC_ROW_ALIGN; t0 += RCC_LANES)
        for (int lane = 0; lane < RCC_LANES; lane++) {
            float x = lt[t0 + lane] - row[t0 + lane];
            acc[lane] = x < acc[lane] ? x : acc[lane];
        }
    float m = acc[0];
    for (int lane = 1; lane < RCC_LANES; lane++) m = acc[lane] < m ? acc[lane] : m;
    return m;
}
#endif

/* For chunk first + p stride + j (scores [Q, g, R]: pool p's chunk j, rows row0 ..): the
 * (score, k) minimum of log_times[k] - scores[p, j, n] over k = (row0 + n) XOR r_c below the
 * chunk's count, merged into best_v, best_k (ties: the smaller k). r_c and R are multiples of
 * ROW_ALIGN (or R = N < ROW_ALIGN, r_c = 0), so an aligned run of ROW_ALIGN rows is an aligned
 * run of k, all below the count or none (counts >= ROW_ALIGN), and meets a contiguous run of
 * log_times: vector loops, no gathers; a run's minimum is searched for its index only where it
 * is the chunk's. (pool, chunk) jobs over threads. */
DC_EXPORT void dc_rcc_pick(const float *restrict scores, int64_t Q, int64_t g, int64_t R, int64_t row0,
                           int64_t first, int64_t stride, const int64_t *restrict offsets,
                           const int64_t *restrict counts, const float *restrict log_times, float *restrict best_v,
                           int64_t *restrict best_k, int64_t threads) {
    int64_t runs = R / RCC_ROW_ALIGN;
    DC_PARALLEL_FOR(threads)
    for (int64_t job = 0; job < Q * g; job++) {
        int64_t p = job / g, j = job - p * g;
        int64_t c = first + p * stride + j;
        const float *row = scores + job * R;
        int64_t r = offsets[c], nc = counts[c];
        if (R < RCC_ROW_ALIGN || nc < RCC_ROW_ALIGN) { /* short runs: a plain loop over the valid k */
            float bv = best_v[c];
            int64_t bk = best_k[c];
            for (int64_t n = 0; n < R; n++) {
                int64_t k = (row0 + n) ^ r;
                if (k < nc) {
                    float v = log_times[k] - row[n];
                    if (v < bv || (v == bv && k < bk)) {
                        bv = v;
                        bk = k;
                    }
                }
            }
            best_v[c] = bv;
            best_k[c] = bk;
            continue;
        }
        float stack[RCC_RUNS_ON_STACK] = {0};
        float *run_min = runs <= RCC_RUNS_ON_STACK ? stack : malloc((size_t)runs * sizeof(float));
        if (run_min == NULL) abort();
        for (int64_t b = 0; b < runs; b++) {
            int64_t base = (row0 + b * RCC_ROW_ALIGN) ^ r;
            run_min[b] = base < nc ? rcc_run_min(log_times + base, row + b * RCC_ROW_ALIGN) : INFINITY;
        }
        float vmin = run_min[0];
        for (int64_t b = 1; b < runs; b++) vmin = run_min[b] < vmin ? run_min[b] : vmin;
        if (!(vmin > best_v[c] || vmin == INFINITY)) {
            int64_t bk = vmin == best_v[c] ? best_k[c] : (int64_t)1 << 62;
            for (int64_t b = 0; b < runs; b++) {
                if (run_min[b] != vmin) continue;
                int64_t base = (row0 + b * RCC_ROW_ALIGN) ^ r;
                for (int64_t t = 0; t < RCC_ROW_ALIGN; t++)
                    if (log_times[base + t] - row[b * RCC_ROW_ALIGN + t] == vmin && base + t < bk) bk = base + t;
            }
            best_v[c] = vmin;
            best_k[c] = bk;
        }
        if (run_min != stack) free(run_min);
    }
}
