/* What every kernel file shares: exact-width types, bit casts, the thread loop.
 *
 * Arithmetic rules (the exact arithmetic contract, diffcodec/exact.py): IEEE-754 binary32 /
 * binary64 + - * / sqrt one operation at a time, rint (round half to even, the default
 * rounding mode) and floor, integer arithmetic; no libm transcendental, no fused multiply-add
 * (setup.py compiles with -ffp-contract=off, never fast-math), no sum whose rounding depends
 * on its order. Loops may run on any number of threads in any order: each output element is
 * written by one iteration, and reductions are integer sums or maxima (order-free). */
#ifndef DIFFCODEC_KERNELS_H
#define DIFFCODEC_KERNELS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(_MSC_VER)
#define DC_EXPORT __declspec(dllexport)
#define DC_INLINE static __forceinline
#else
#define DC_EXPORT __attribute__((visibility("default")))
#define DC_INLINE static inline __attribute__((always_inline))
#endif

#ifdef _OPENMP
#include <omp.h>
#define DC_STR(x) #x
/* `for` over [0, n) on `threads` threads (1: the caller's thread, no parallel region) */
#define DC_PARALLEL_FOR(threads) _Pragma(DC_STR(omp parallel for num_threads(threads) schedule(static) if((threads) > 1)))
#else
#define DC_PARALLEL_FOR(threads)
#endif

DC_INLINE double dc_f64_from_bits(int64_t bits) { double v; memcpy(&v, &bits, 8); return v; }
DC_INLINE float dc_f32_from_bits(int32_t bits) { float v; memcpy(&v, &bits, 4); return v; }
DC_INLINE int32_t dc_f32_bits(float v) { int32_t bits; memcpy(&bits, &v, 4); return bits; }

#endif
