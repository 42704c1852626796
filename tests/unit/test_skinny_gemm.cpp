// backend/host/skinny_gemm.hpp (C = alpha A B^T + beta C for a few rows of A) and its dispatch in
// blas.hpp's gemm<float>, against a product summed here in double: ragged m, n and k (the 4 × 4
// register blocks and the 16-lane tail), row strides, alpha and beta, C poisoned where beta is 0,
// C's padding untouched, and the same bits inside a parallel region as outside.
#include <doctest/doctest.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <moekit/backend/host/blas.hpp>
#include <moekit/backend/host/skinny_gemm.hpp>
#include <random>
#include <vector>

using namespace moekit::backend::host;

namespace {
struct Case {
  std::int64_t m, n, k, lda, ldb, ldc;
  std::vector<float> a, b, c0;
};
Case make(std::int64_t m, std::int64_t n, std::int64_t k, std::mt19937& g) {
  std::normal_distribution<float> nd(0.f, 1.f);
  Case c{m, n, k, k + 3, k + 5, n + 2, {}, {}, {}};
  c.a.resize(std::size_t(m * c.lda));
  c.b.resize(std::size_t(n * c.ldb));
  c.c0.resize(std::size_t(m * c.ldc));
  for (auto* v : {&c.a, &c.b, &c.c0})
    for (auto& e : *v) e = nd(g);
  return c;
}
// max over C of |got - want| / Σ_x |alpha a b| + |beta c| (the error bound's scale), and whether the
// padding columns of C kept their values.
std::pair<double, bool> check(const Case& t, float alpha, float beta, const std::vector<float>& got) {
  double worst = 0;
  bool padding = true;
  for (std::int64_t i = 0; i < t.m; ++i) {
    for (std::int64_t j = 0; j < t.n; ++j) {
      double s = 0, scale = 0;
      for (std::int64_t x = 0; x < t.k; ++x) {
        const double p = double(t.a[i * t.lda + x]) * double(t.b[j * t.ldb + x]);
        s += p, scale += std::abs(p);
      }
      const double c = beta == 0.f ? 0.0 : double(t.c0[i * t.ldc + j]);
      const double want = double(alpha) * s + double(beta) * c;
      const double g = got[std::size_t(i * t.ldc + j)];
      worst = std::max(worst, std::isfinite(g) ? std::abs(g - want) / (std::abs(alpha) * scale + std::abs(beta * c) + 1e-30) : 1e30);
    }
    for (std::int64_t j = t.n; j < t.ldc; ++j) padding = padding && got[std::size_t(i * t.ldc + j)] == t.c0[i * t.ldc + j];
  }
  return {worst, padding};
}
}  // namespace

TEST_CASE("skinny gemm: A B^T against a double product, ragged shapes, strides, alpha and beta") {
  if (!skinny_gemm_enabled()) {
    MESSAGE("skinny gemm off on this machine (no AVX-512, or MOEKIT_SKINNY_GEMM=off): blas.hpp keeps the BLAS; "
            "the dispatch case below still runs");
    return;
  }
  std::mt19937 g(7);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (std::int64_t m : {1, 2, 3, 4, 5, 8, 13, 16})
    for (std::int64_t n : {1, 3, 4, 5, 9, 37})
      for (std::int64_t k : {1, 15, 16, 17, 40, 301}) {
        CAPTURE(m);
        CAPTURE(n);
        CAPTURE(k);
        const Case t = make(m, n, k, g);
        for (auto [alpha, beta] : {std::pair{1.f, 0.f}, {0.5f, 1.5f}, {-2.f, 1.f}}) {
          CAPTURE(alpha);
          CAPTURE(beta);
          std::vector<float> c = t.c0;
          if (beta == 0.f)  // beta 0 must not read C
            for (std::int64_t i = 0; i < m; ++i)
              for (std::int64_t j = 0; j < n; ++j) c[std::size_t(i * t.ldc + j)] = nan;
          skinny_gemm_nt(m, n, k, alpha, t.a.data(), t.lda, t.b.data(), t.ldb, beta, c.data(), t.ldc);
          const auto [worst, padding] = check(t, alpha, beta, c);
          CHECK(worst < 1e-6);  // fp32 sums of <= 301 products: a few ulp of the scale
          CHECK(padding);
          // One thread inside a parallel region (experts spread over the threads) gives the same bits:
          // each C element is one dot product in one order either way.
          std::vector<float> inside = t.c0;
#pragma omp parallel num_threads(2)
#pragma omp single
          skinny_gemm_nt(m, n, k, alpha, t.a.data(), t.lda, t.b.data(), t.ldb, beta, inside.data(), t.ldc);
          std::vector<float> outside = t.c0;
          skinny_gemm_nt(m, n, k, alpha, t.a.data(), t.lda, t.b.data(), t.ldb, beta, outside.data(), t.ldc);
          CHECK(inside == outside);
        }
      }
}

TEST_CASE("skinny gemm: gemm<float> takes it for a few rows against a large B, the BLAS otherwise, same products") {
  std::mt19937 g(11);
  // n·k >= 16384: a weight matrix (decode); m = 17 is past kSkinnyMaxRows, so the BLAS.
  for (std::int64_t m : {1, 6, 16, 17}) {
    CAPTURE(m);
    const Case t = make(m, 300, 130, g);
    CHECK(use_skinny_gemm(m, t.n, t.k) == (skinny_gemm_enabled() && m <= kSkinnyMaxRows));
    std::vector<float> c = t.c0;
    gemm<float>(false, true, m, t.n, t.k, 1.f, t.a.data(), t.lda, t.b.data(), t.ldb, 0.f, c.data(), t.ldc);
    const auto [worst, padding] = check(t, 1.f, 0.f, c);
    CHECK(worst < 1e-6);
    CHECK(padding);
  }
  CHECK_FALSE(use_skinny_gemm(4, 64, 64));  // a small B stays with the BLAS
  CHECK_FALSE(use_skinny_gemm(0, 4096, 4096));
}
