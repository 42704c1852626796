#pragma once
// The dense modules' GEMM (nn::Linear, nn::CausalSelfAttention, a tied LM head) with a chosen operand
// precision, as cuBLAS's compute types or torch.autocast choose one:
//   kNative: backend/host/blas.hpp's gemm in T (fp32 or fp64);
//   kBf16:   A and B rounded to bf16 (nearest even), multiplied with fp32 accumulation into fp32 C
//            (backend/host/gemm_bf16.hpp: oneDNN's bf16 kernels where the CPU has bf16 instructions,
//            else the rounded values multiplied by sgemm). The caller keeps fp32 values (the AdamW
//            masters) and fp32 activations; only what enters a product is rounded, which is where the
//            CUDA backend's bf16 storage rounds them too.
// Row-major, strided (lda, ldb, ldc: row strides of the stored matrices), as backend::host::gemm.
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "moekit/backend/host/blas.hpp"
#include "moekit/backend/host/convert.hpp"
#include "moekit/backend/host/gemm_bf16.hpp"
#include "moekit/core/bf16.hpp"
#include "moekit/core/error.hpp"

namespace moekit::backend::host {

enum class MatmulPrecision { kNative, kBf16 };

inline const char* precision_name(MatmulPrecision p) { return p == MatmulPrecision::kBf16 ? "bf16" : "native"; }

// Refuses kBf16 for a T other than float (the double modules are the finite-difference oracles).
template <class T>
MatmulPrecision checked_precision(MatmulPrecision p, const char* who) {
  if (p == MatmulPrecision::kBf16 && !std::is_same_v<T, float>)
    throw ConfigError("precision", "bf16", std::string(who) + ": bf16 products need T = float (fp32 masters)");
  return p;
}

namespace detail {
// The stored matrix [rows, cols] at row stride ld, rounded to bf16 into a per-thread buffer (slot 0 or
// 1: the two operands), contiguous (row stride cols).
template <class E>
E* rounded_copy(int slot, const float* src, std::int64_t rows, std::int64_t cols, std::int64_t ld) {
  thread_local std::vector<E> buf[2];
  auto& b = buf[slot];
  if (b.size() < std::size_t(rows * cols)) b.resize(std::size_t(rows * cols));
  E* out = b.data();  // the calling thread's buffer, shared with the team below
#pragma omp parallel for schedule(static) if (rows * cols >= 4 * MOEKIT_OMP_MIN_WORK)
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * ld;
    E* d = out + r * cols;
    for (std::int64_t c = 0; c < cols; ++c) {
      if constexpr (std::is_same_v<E, bf16>) d[c] = bf16(s[c]);
      else d[c] = float(bf16(s[c]));  // bf16's value, kept as fp32 for sgemm
    }
  }
  return out;
}
}  // namespace detail

// C[m,n] = alpha op(A)[m,kk] op(B)[kk,n] + beta C at precision p.
template <class T>
void matmul(MatmulPrecision p, bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t kk, T alpha,
            const T* a, std::int64_t lda, const T* b, std::int64_t ldb, T beta, T* c, std::int64_t ldc) {
  if constexpr (std::is_same_v<T, float>) {
    if (p == MatmulPrecision::kBf16 && m > 0 && n > 0 && kk > 0) {
      const std::int64_t a_rows = trans_a ? kk : m, a_cols = trans_a ? m : kk;
      const std::int64_t b_rows = trans_b ? n : kk, b_cols = trans_b ? kk : n;
      const Bf16Gemm& g = bf16_gemm();
      if (g.fn) {
        const bf16* ab = detail::rounded_copy<bf16>(0, a, a_rows, a_cols, lda);
        const bf16* bb = detail::rounded_copy<bf16>(1, b, b_rows, b_cols, ldb);
        // dnnl_success is 0; any other status left C unwritten (see gemm_bf16.hpp): convert instead.
        if (g.fn(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', m, n, kk, alpha, reinterpret_cast<const std::uint16_t*>(ab),
                 a_cols, reinterpret_cast<const std::uint16_t*>(bb), b_cols, beta, c, ldc) == 0)
          return;
      }
      const float* af = detail::rounded_copy<float>(0, a, a_rows, a_cols, lda);
      const float* bf = detail::rounded_copy<float>(1, b, b_rows, b_cols, ldb);
      gemm<float>(trans_a, trans_b, m, n, kk, alpha, af, a_cols, bf, b_cols, beta, c, ldc);
      return;
    }
  } else {
    (void)checked_precision<T>(p, "backend::host::matmul");
  }
  gemm<T>(trans_a, trans_b, m, n, kk, alpha, a, lda, b, ldb, beta, c, ldc);
}
// Contiguous matrices.
template <class T>
void matmul(MatmulPrecision p, bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t kk, T alpha,
            const T* a, const T* b, T beta, T* c) {
  matmul<T>(p, trans_a, trans_b, m, n, kk, alpha, a, trans_a ? m : kk, b, trans_b ? kk : n, beta, c, n);
}

}  // namespace moekit::backend::host
