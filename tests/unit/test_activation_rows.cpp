// backend/host/activation_rows.hpp: the row kernels (libmvec's 16-lane expf on AVX-512, else the scalar
// functors) against the formulas computed here in double, forward and backward, with ragged tails,
// outputs aliasing inputs (as ffn.hpp calls them), and every activation.
#include <doctest/doctest.h>

#include <cmath>
#include <moekit/backend/host/activation_rows.hpp>
#include <random>
#include <vector>

using namespace moekit;
using backend::host::activation_backward_row;
using backend::host::activation_row;

namespace {
double sig(double x) { return 1.0 / (1.0 + std::exp(-x)); }
}  // namespace

TEST_CASE("activation rows: SwiGLU forward and backward against double formulas, tails and aliasing") {
  MESSAGE("vector expf: " << (backend::host::detail::vector_expf() ? "libmvec, 16 lanes" : "scalar"));
  std::mt19937 g(3);
  std::normal_distribution<float> nd(0.f, 3.f);
  for (std::int64_t n : {1, 15, 16, 17, 37, 128}) {
    CAPTURE(n);
    std::vector<float> h1(n), h3(n), da(n), a(n), g1(n), g3(n);
    for (auto* v : {&h1, &h3, &da}) for (auto& e : *v) e = nd(g);
    h1[0] = 80.f;  // exp(-h) underflows
    if (n > 1) h1[1] = -80.f;  // exp(-h) is huge: silu -> -0
    activation_row<act::SwiGLU>(h1.data(), h3.data(), a.data(), n);
    activation_backward_row<act::SwiGLU>(h1.data(), h3.data(), da.data(), g1.data(), g3.data(), n);
    double worst = 0;
    for (std::int64_t i = 0; i < n; ++i) {
      const double x = h1[i], y = h3[i], d = da[i], s = sig(x);
      const double want_a = x * s * y, want_g1 = d * y * s * (1 + x * (1 - s)), want_g3 = d * x * s;
      for (auto [got, want] : {std::pair{double(a[i]), want_a}, {double(g1[i]), want_g1}, {double(g3[i]), want_g3}}) {
        REQUIRE(std::isfinite(got));
        worst = std::max(worst, std::abs(got - want) / (1e-30 + std::abs(want) + 1e-6));
      }
    }
    CHECK(worst < 2e-6);
    // In place, as ffn.hpp's backward writes dH1 over h1 and dH3 over h3: the same values.
    std::vector<float> ih1 = h1, ih3 = h3;
    activation_backward_row<act::SwiGLU>(ih1.data(), ih3.data(), da.data(), ih1.data(), ih3.data(), n);
    CHECK(ih1 == g1);
    CHECK(ih3 == g3);
    std::vector<float> ia = h1;
    activation_row<act::SwiGLU>(ia.data(), h3.data(), ia.data(), n);
    CHECK(ia == a);
  }
}

TEST_CASE("activation rows: non-gated activations take the scalar functors") {
  std::vector<float> h = {-2.f, -0.5f, 0.f, 0.5f, 3.f}, a(h.size()), da(h.size(), 1.f), g(h.size());
  activation_row<act::ReLU>(h.data(), h.data(), a.data(), std::int64_t(h.size()));
  CHECK(a == std::vector<float>{0.f, 0.f, 0.f, 0.5f, 3.f});
  activation_backward_row<act::ReLU>(h.data(), h.data(), da.data(), g.data(), static_cast<float*>(nullptr), std::int64_t(h.size()));
  CHECK(g == std::vector<float>{0.f, 0.f, 0.f, 1.f, 1.f});
  activation_row<act::GeLU>(h.data(), h.data(), a.data(), std::int64_t(h.size()));
  for (std::size_t i = 0; i < h.size(); ++i)
    CHECK(a[i] == doctest::Approx(0.5 * h[i] * (1 + std::erf(h[i] / std::sqrt(2.0)))).epsilon(1e-6));
}
