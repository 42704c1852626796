#pragma once
// C[m, n] = alpha · A[m, k] · B[n, k]^T + beta · C for a few rows m (decode: the tokens an expert
// receives) against a large weight matrix B whose rows are contiguous: the FFN's forward GEMMs
// (x W13^T, a W2^T) when T is small. Such a product reads each weight once and is bound by memory
// bandwidth. The BLAS libraries pack B first, which costs more than the product here: at m = 1..16
// against [2048 × 512] weights (cold, 2 threads, Zen 5) OpenBLAS 0.3.21 reached 7-11 GB/s, BLIS
// 7-12 and oneDNN's sgemm 4-17, of 27 GB/s read bandwidth (docs/benchmarks.md, "Decode"). This kernel
// streams B once: 4 rows of B against up to 4 rows of A per register block, 16 lanes (AVX-512).
// Without AVX-512, or with MOEKIT_SKINNY_GEMM=off, blas.hpp keeps the BLAS.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "moekit/backend/host/gemm_library.hpp"  // CpuFeatures

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__)
#include <immintrin.h>
#define MOEKIT_HOST_SKINNY_GEMM 1
#endif

namespace moekit::backend::host {

#ifndef MOEKIT_SKINNY_AHEAD
#define MOEKIT_SKINNY_AHEAD 8  // B rows: measured best of 4 and 8 on Zen 5
#endif
inline constexpr std::int64_t kSkinnyMaxRows = 16;  // beyond it the BLAS's packed kernels win (measured)

// Whether C = A B^T of this shape takes the skinny kernel: AVX-512, m <= kSkinnyMaxRows, and B big
// enough (>= 64 KiB) that reading it is the cost.
inline bool skinny_gemm_enabled() {
#if defined(MOEKIT_HOST_SKINNY_GEMM)
  static const bool on = [] {
    const char* v = std::getenv("MOEKIT_SKINNY_GEMM");
    return !(v && std::string(v) == "off") && CpuFeatures::detect().avx512;
  }();
  return on;
#else
  return false;
#endif
}
inline bool use_skinny_gemm(std::int64_t m, std::int64_t n, std::int64_t k) {
  return m >= 1 && m <= kSkinnyMaxRows && n * k >= 16384 && skinny_gemm_enabled();
}

#if defined(MOEKIT_HOST_SKINNY_GEMM)
namespace detail {

// One register block: MB rows of A (pointers a[0..MB)) against 4 rows of B (b[0..4), clamped
// duplicates where n ends), dot products over k, written to c[p * ldc + q] for q < nb.
template <int MB, bool kMasked>
__attribute__((target("avx512f,fma"), always_inline)) inline void skinny_steps(const float* const* a, const float* const* b, std::int64_t x0,
                                                               std::int64_t x1, __mmask16 mask, std::int64_t ahead, __m512 (&acc)[MB][4]) {
  for (std::int64_t x = x0; x < x1; x += 16) {
    __m512 bv[4];
    if (ahead)  // the next block's B rows: each row here is too short a stream for the hardware prefetcher
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) _mm_prefetch(reinterpret_cast<const char*>(b[q] + ahead + x), _MM_HINT_T0);
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) bv[q] = kMasked ? _mm512_maskz_loadu_ps(mask, b[q] + x) : _mm512_loadu_ps(b[q] + x);
#pragma GCC unroll 4
    for (int p = 0; p < MB; ++p) {
      const __m512 av = kMasked ? _mm512_maskz_loadu_ps(mask, a[p] + x) : _mm512_loadu_ps(a[p] + x);
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) acc[p][q] = _mm512_fmadd_ps(av, bv[q], acc[p][q]);
    }
  }
}

// Σ of the 16 lanes, in full-width shuffles. The all-ones masked forms name their source: GCC 12's
// unmasked ones (and _mm512_reduce_add_ps) warn of an uninitialised value inside its own header.
__attribute__((target("avx512f"), always_inline)) inline float lane_sum(__m512 v) {
  v = _mm512_add_ps(v, _mm512_mask_shuffle_f32x4(v, 0xFFFF, v, v, 0x4E));  // swap the 256-bit halves
  v = _mm512_add_ps(v, _mm512_mask_shuffle_f32x4(v, 0xFFFF, v, v, 0xB1));  // swap neighbouring 128-bit lanes
  v = _mm512_add_ps(v, _mm512_mask_permute_ps(v, 0xFFFF, v, 0x4E));
  v = _mm512_add_ps(v, _mm512_mask_permute_ps(v, 0xFFFF, v, 0xB1));
  return _mm512_cvtss_f32(v);
}

template <int MB>
__attribute__((target("avx512f,fma"))) inline void skinny_tile(std::int64_t k, float alpha, const float* const* ap, const float* const* bp,
                                                              std::int64_t ahead, float beta, float* c, std::int64_t ldc, int nb) {
  // Local copies: the accumulators and pointers must live in registers (at -O2 too).
  const float* a[MB];
  const float* b[4];
#pragma GCC unroll 4
  for (int p = 0; p < MB; ++p) a[p] = ap[p];
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) b[q] = bp[q];
  __m512 acc[MB][4];
#pragma GCC unroll 4
  for (int p = 0; p < MB; ++p)
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) acc[p][q] = _mm512_setzero_ps();
  const std::int64_t kv = k & ~std::int64_t(15);
  skinny_steps<MB, false>(a, b, 0, kv, __mmask16(0xffff), ahead, acc);
  if (kv < k) skinny_steps<MB, true>(a, b, kv, kv + 16, __mmask16((1u << (k - kv)) - 1u), ahead, acc);
  float r[MB][4];
#pragma GCC unroll 4
  for (int p = 0; p < MB; ++p)
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) r[p][q] = alpha * lane_sum(acc[p][q]);
  for (int p = 0; p < MB; ++p)
    for (int q = 0; q < nb; ++q) {
      float* o = &c[p * ldc + q];
      *o = beta == 0.f ? r[p][q] : r[p][q] + beta * *o;  // beta 0 never reads C (it may be garbage)
    }
}

// Columns [j0, j1) of C.
inline void skinny_columns(std::int64_t m, std::int64_t j0, std::int64_t j1, std::int64_t k, float alpha, const float* a, std::int64_t lda,
                           const float* b, std::int64_t ldb, float beta, float* c, std::int64_t ldc) {
  for (std::int64_t j = j0; j < j1; j += 4) {
    const int nb = int(std::min<std::int64_t>(4, j1 - j));
    const float* bp[4];
    for (int q = 0; q < 4; ++q) bp[q] = b + (j + std::min(q, nb - 1)) * ldb;
    for (std::int64_t i = 0; i < m; i += 4) {
      const float* ap[4];
      const int mb = int(std::min<std::int64_t>(4, m - i));
      for (int p = 0; p < mb; ++p) ap[p] = a + (i + p) * lda;
      float* ct = c + i * ldc + j;
      // Prefetch the next block of B while the first rows of A pass over this one.
      const std::int64_t ahead = i == 0 && j + 4 < j1 ? MOEKIT_SKINNY_AHEAD * ldb : 0;
      switch (mb) {
        case 1: skinny_tile<1>(k, alpha, ap, bp, ahead, beta, ct, ldc, nb); break;
        case 2: skinny_tile<2>(k, alpha, ap, bp, ahead, beta, ct, ldc, nb); break;
        case 3: skinny_tile<3>(k, alpha, ap, bp, ahead, beta, ct, ldc, nb); break;
        default: skinny_tile<4>(k, alpha, ap, bp, ahead, beta, ct, ldc, nb); break;
      }
    }
  }
}

}  // namespace detail
#endif

// C = alpha A B^T + beta C (row-major; A [m, k] with row stride lda, B [n, k] with ldb, C with ldc),
// k >= 1. Callers check use_skinny_gemm first. Inside a parallel region (experts spread over the
// threads) it runs on the calling thread; outside it splits C's columns over the threads.
inline void skinny_gemm_nt(std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const float* a, std::int64_t lda, const float* b,
                           std::int64_t ldb, float beta, float* c, std::int64_t ldc) {
#if defined(MOEKIT_HOST_SKINNY_GEMM)
  const std::int64_t tiles = (n + 3) / 4;
  if (omp_in_parallel() || omp_get_max_threads() == 1 || tiles < 2) {
    detail::skinny_columns(m, 0, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
#pragma omp parallel
  {
    const std::int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    const std::int64_t t0 = tiles * t / nt, t1 = tiles * (t + 1) / nt;
    if (t1 > t0) detail::skinny_columns(m, 4 * t0, std::min(n, 4 * t1), k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
#else
  (void)m, (void)n, (void)k, (void)alpha, (void)a, (void)lda, (void)b, (void)ldb, (void)beta, (void)c, (void)ldc;
#endif
}

}  // namespace moekit::backend::host
