#pragma once
// Row-major GEMM through CBLAS: C[m,n] = alpha * op(A)[m,kk] * op(B)[kk,n] + beta * C. The first call
// sets the library up (backend/host/gemm_library.hpp: OpenBLAS's kernel chosen from the CPU's features).
// fp32 A B^T with a few rows of A (decode) takes backend/host/skinny_gemm.hpp instead.
#include <cblas.h>

#include <cstdint>
#include <type_traits>

#include "moekit/backend/host/gemm_library.hpp"
#include "moekit/backend/host/skinny_gemm.hpp"

namespace moekit::backend::host {

inline void gemm_dispatch(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int m, int n, int kk, float alpha,
                          const float* a, int lda, const float* b, int ldb, float beta, float* c, int ldc) {
  cblas_sgemm(CblasRowMajor, ta, tb, m, n, kk, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void gemm_dispatch(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int m, int n, int kk, double alpha,
                          const double* a, int lda, const double* b, int ldb, double beta, double* c,
                          int ldc) {
  cblas_dgemm(CblasRowMajor, ta, tb, m, n, kk, alpha, a, lda, b, ldb, beta, c, ldc);
}

// trans_a/trans_b say whether A/B are stored transposed (A is [kk,m] / B is [n,kk]); lda, ldb, ldc are
// the row strides of the stored matrices.
template <class T>
void gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t kk, T alpha, const T* a, std::int64_t lda,
          const T* b, std::int64_t ldb, T beta, T* c, std::int64_t ldc) {
  (void)gemm_library();  // once per process: the kernel that fits the CPU
  if (m == 0 || n == 0) return;
  if (kk == 0) {  // BLAS would reject lda = 0; the product is empty
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  if constexpr (std::is_same_v<T, float>)
    if (!trans_a && trans_b && use_skinny_gemm(m, n, kk)) {  // a few rows against a weight matrix (decode)
      skinny_gemm_nt(m, n, kk, alpha, a, lda, b, ldb, beta, c, ldc);
      return;
    }
  gemm_dispatch(trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, int(m), int(n), int(kk), alpha, a,
                int(lda), b, int(ldb), beta, c, int(ldc));
}
// Contiguous matrices.
template <class T>
void gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t kk, T alpha, const T* a,
          const T* b, T beta, T* c) {
  gemm<T>(trans_a, trans_b, m, n, kk, alpha, a, trans_a ? m : kk, b, trans_b ? kk : n, beta, c, n);
}

}  // namespace moekit::backend::host
