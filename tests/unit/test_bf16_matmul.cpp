// The dense modules' bf16 products (backend/host/matmul.hpp; train_lm --dtype bf16 on the host):
//   matmul(kBf16)      against a double product of the operands rounded to bf16 here (own rounding:
//                      bit arithmetic, round to nearest even), strided, every transpose, beta, all
//                      three GEMM paths (the process's, the fp32 conversion, oneDNN asked for even
//                      without bf16 instructions, which must fall back where oneDNN refuses).
//                      Tolerance per element: 1e-5 · (Σ_p |a_ip b_pj| + |β c_ij|): fp32 accumulation
//                      of k = 37 terms errs by at most ~k·6e-8 of that sum.
//   nn::Linear         forward, dW (accumulating) and dx the same way; the fp32 weights unchanged.
//   CausalSelfAttention bf16 against the same module in fp32: ‖bf16 − fp32‖/‖fp32‖ ≤ 1e-2 for y, dx,
//                      dWqkv and dWo (seen: 3.6e-3 to 4.7e-3; only what enters a product is rounded,
//                      the activations between stay fp32), and ≥ 1e-5: the products really were rounded.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <moekit/backend/host/matmul.hpp>
#include <moekit/nn/attention.hpp>
#include <moekit/nn/linear.hpp>
#include <random>
#include <vector>

#include "../common/compare.hpp"
#include "../common/random.hpp"

using namespace moekit;
using backend::host::MatmulPrecision;

namespace {

// bf16 round to nearest even by bit arithmetic (finite inputs), independent of core/bf16.hpp.
double bf16_value(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  u &= 0xffff0000u;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

std::vector<float> randf(std::size_t n, unsigned seed, float scale = 1.f) {
  auto v = moekit_test::random_vec(n, seed);
  for (auto& x : v) x *= scale;
  return v;
}

struct WithPath {
  backend::host::Bf16Gemm saved;
  explicit WithPath(backend::host::Bf16Gemm p) : saved(backend::host::bf16_gemm()) { backend::host::detail::bf16_gemm_state() = p; }
  ~WithPath() { backend::host::detail::bf16_gemm_state() = saved; }
};

// The three paths: the process's choice, the fp32 conversion, oneDNN asked for (null fn where
// libdnnl is absent: then it is the conversion again).
std::vector<backend::host::Bf16Gemm> paths() {
  std::vector<backend::host::Bf16Gemm> ps{backend::host::bf16_gemm(), {}};
  ps[1].what = "converted to fp32 (test)";
  const char* old = std::getenv("MOEKIT_BF16_GEMM");
  const std::string keep = old ? old : "";
  setenv("MOEKIT_BF16_GEMM", "onednn", 1);
  ps.push_back(backend::host::detail::setup_bf16_gemm());
  if (old) setenv("MOEKIT_BF16_GEMM", keep.c_str(), 1);
  else unsetenv("MOEKIT_BF16_GEMM");
  return ps;
}

}  // namespace

TEST_CASE("matmul kBf16: the double product of bf16-rounded operands, strided, every transpose, beta, every path") {
  const std::int64_t m = 19, n = 23, k = 37, pad = 3;
  for (const auto& path : paths()) {
    WithPath with(path);
    MESSAGE("bf16 GEMM path: " << path.what);
    for (bool ta : {false, true})
      for (bool tb : {false, true})
        for (float beta : {0.f, 0.5f}) {
          CAPTURE(ta);
          CAPTURE(tb);
          CAPTURE(beta);
          // Stored A is [ta ? k : m, ta ? m : k] at row stride cols + pad; B likewise.
          const std::int64_t ar = ta ? k : m, ac = ta ? m : k, br = tb ? n : k, bc = tb ? k : n;
          const std::int64_t lda = ac + pad, ldb = bc + pad, ldc = n + pad;
          const auto a = randf(ar * lda, 11), b = randf(br * ldb, 12), c0 = randf(m * ldc, 13);
          auto A = [&](std::int64_t i, std::int64_t p) { return ta ? a[p * lda + i] : a[i * lda + p]; };
          auto B = [&](std::int64_t p, std::int64_t j) { return tb ? b[j * ldb + p] : b[p * ldb + j]; };
          std::vector<float> c = c0, c_native = c0;
          backend::host::matmul<float>(MatmulPrecision::kBf16, ta, tb, m, n, k, 1.25f, a.data(), lda, b.data(), ldb, beta,
                                       c.data(), ldc);
          backend::host::matmul<float>(MatmulPrecision::kNative, ta, tb, m, n, k, 1.25f, a.data(), lda, b.data(), ldb, beta,
                                       c_native.data(), ldc);
          double worst = 0, far_from_fp32 = 0;
          for (std::int64_t i = 0; i < m; ++i) {
            for (std::int64_t j = 0; j < n; ++j) {
              double ref = 0, mag = 0;
              for (std::int64_t p = 0; p < k; ++p) {
                const double t = bf16_value(A(i, p)) * bf16_value(B(p, j));
                ref += t, mag += std::abs(t);
              }
              ref = 1.25 * ref + double(beta) * c0[i * ldc + j];
              mag = 1.25 * mag + std::abs(double(beta) * c0[i * ldc + j]);
              worst = std::max(worst, std::abs(c[i * ldc + j] - ref) / mag);
              far_from_fp32 = std::max(far_from_fp32, std::abs(double(c_native[i * ldc + j]) - ref) / mag);
            }
            for (std::int64_t j = n; j < ldc; ++j) REQUIRE(c[i * ldc + j] == c0[i * ldc + j]);  // padding untouched
          }
          CHECK(worst <= 1e-5);
          CHECK(far_from_fp32 > 1e-4);  // the operands really are rounded: fp32 products differ
        }
  }
}

TEST_CASE("nn::Linear with bf16 products: forward, dW (accumulating) and dx; the fp32 weights stay fp32") {
  const std::int64_t in = 33, out = 17, rows = 29;
  nn::Linear<float> lin(in, out, /*bias=*/true);
  lin.init_params(3);
  lin.set_precision(MatmulPrecision::kBf16);
  CHECK(lin.precision() == MatmulPrecision::kBf16);
  const std::vector<float> w(lin.weight(), lin.weight() + in * out), bias(lin.bias(), lin.bias() + out);
  const auto x = randf(rows * in, 21), dy = randf(rows * out, 22);
  std::vector<float> y(rows * out, std::nanf("")), dx(rows * in, std::nanf(""));
  lin.forward(MatrixView<const float>(x.data(), {rows, in}), MatrixView<float>(y.data(), {rows, out}));
  lin.zero_grad();
  for (int rep = 0; rep < 2; ++rep)  // dW accumulates: twice the product
    lin.backward(MatrixView<const float>(x.data(), {rows, in}), MatrixView<const float>(dy.data(), {rows, out}),
                 MatrixView<float>(dx.data(), {rows, in}));
  for (std::int64_t i = 0; i < in * out; ++i) REQUIRE(lin.weight()[i] == w[i]);  // masters not rounded

  auto within = [](double got, double ref, double mag) { return std::abs(got - ref) <= 1e-5 * mag + 1e-30; };
  int bad = 0;
  for (std::int64_t t = 0; t < rows; ++t)
    for (std::int64_t o = 0; o < out; ++o) {
      double ref = 0, mag = 0;
      for (std::int64_t c = 0; c < in; ++c) {
        const double p = bf16_value(x[t * in + c]) * bf16_value(w[o * in + c]);
        ref += p, mag += std::abs(p);
      }
      ref += bias[o], mag += std::abs(bias[o]);  // the bias is added in fp32, not rounded
      bad += !within(y[t * out + o], ref, mag);
    }
  for (std::int64_t o = 0; o < out; ++o)
    for (std::int64_t c = 0; c < in; ++c) {
      double ref = 0, mag = 0;
      for (std::int64_t t = 0; t < rows; ++t) {
        const double p = bf16_value(dy[t * out + o]) * bf16_value(x[t * in + c]);
        ref += p, mag += std::abs(p);
      }
      bad += !within(lin.weight_grad()[o * in + c], 2 * ref, 2 * mag);
    }
  for (std::int64_t t = 0; t < rows; ++t)
    for (std::int64_t c = 0; c < in; ++c) {
      double ref = 0, mag = 0;
      for (std::int64_t o = 0; o < out; ++o) {
        const double p = bf16_value(dy[t * out + o]) * bf16_value(w[o * in + c]);
        ref += p, mag += std::abs(p);
      }
      bad += !within(dx[t * in + c], ref, mag);
    }
  CHECK(bad == 0);
  // The bias gradient is a plain fp32 column sum of dy (twice).
  for (std::int64_t o = 0; o < out; ++o) {
    double s = 0;
    for (std::int64_t t = 0; t < rows; ++t) s += dy[t * out + o];
    CHECK(lin.bias_grad()[o] == doctest::Approx(2 * s).epsilon(1e-5));
  }
}

TEST_CASE("bf16 products need fp32 masters: the double modules refuse them, naming the field") {
  nn::Linear<double> ld(4, 3);
  nn::CausalSelfAttention<double> ad(8, 2, 2, 4);
  for (auto* f : {+[](nn::Linear<double>& l, nn::CausalSelfAttention<double>&) { l.set_precision(MatmulPrecision::kBf16); },
                  +[](nn::Linear<double>&, nn::CausalSelfAttention<double>& a) { a.set_precision(MatmulPrecision::kBf16); }}) {
    try {
      f(ld, ad);
      FAIL("no ConfigError");
    } catch (const ConfigError& e) {
      CHECK(std::string(e.what()).find("precision") != std::string::npos);
      CHECK(std::string(e.what()).find("T = float") != std::string::npos);
    }
  }
  ld.set_precision(MatmulPrecision::kNative);  // allowed
  CHECK(ld.precision() == MatmulPrecision::kNative);
}

TEST_CASE("nn::CausalSelfAttention with bf16 products stays within bf16 rounding of fp32 (MHA, GQA, MQA)") {
  struct S {
    std::int64_t d, heads, kv, seq, batch;
  };
  for (const S s : {S{32, 4, 4, 13, 2}, S{48, 6, 2, 9, 3}, S{32, 2, 1, 16, 2}}) {
    CAPTURE(s.heads);
    CAPTURE(s.kv);
    const std::int64_t rows = s.seq * s.batch;
    nn::CausalSelfAttention<float> f32(s.d, s.heads, s.kv, s.seq), b16(s.d, s.heads, s.kv, s.seq);
    f32.init_params(5, 0.7);
    b16.init_params(5, 0.7);
    b16.set_precision(MatmulPrecision::kBf16);
    CHECK(b16.qkv_proj().precision() == MatmulPrecision::kBf16);
    CHECK(b16.o_proj().precision() == MatmulPrecision::kBf16);
    const auto x = randf(rows * s.d, 31), dy = randf(rows * s.d, 32);
    std::vector<float> y32(rows * s.d), y16(rows * s.d, std::nanf("")), dx32(rows * s.d), dx16(rows * s.d, std::nanf(""));
    const MatrixView<const float> xv(x.data(), {rows, s.d}), dyv(dy.data(), {rows, s.d});
    f32.forward(xv, s.seq, MatrixView<float>(y32.data(), {rows, s.d}));
    b16.forward(xv, s.seq, MatrixView<float>(y16.data(), {rows, s.d}));
    f32.backward(xv, dyv, MatrixView<float>(dx32.data(), {rows, s.d}));
    b16.backward(xv, dyv, MatrixView<float>(dx16.data(), {rows, s.d}));
    auto grads = [](nn::CausalSelfAttention<float>& a, int i) {
      auto p = a.parameters()[i];
      return std::vector<float>(p.grad, p.grad + p.numel());
    };
    const double e_y = moekit_test::rel_err(y16, y32), e_dx = moekit_test::rel_err(dx16, dx32);
    const double e_wqkv = moekit_test::rel_err(grads(b16, 0), grads(f32, 0)), e_wo = moekit_test::rel_err(grads(b16, 1), grads(f32, 1));
    MESSAGE("bf16 vs fp32 attention: y " << e_y << ", dx " << e_dx << ", dWqkv " << e_wqkv << ", dWo " << e_wo);
    CHECK(e_y <= 1e-2);
    CHECK(e_dx <= 1e-2);
    CHECK(e_wqkv <= 1e-2);
    CHECK(e_wo <= 1e-2);
    for (double e : {e_y, e_dx, e_wqkv, e_wo}) CHECK(e >= 1e-5);  // rounded, not fp32 products
  }
}
