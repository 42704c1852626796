// nn::Rotary and nn::CausalSelfAttention against references written here from scratch in double (scalar
// loops, own cos/sin), gradients against central finite differences of that reference, and the error
// paths.
//
// Tolerances (largest error seen on x86-64 with OpenBLAS in brackets):
//   Rotary<double>, forward in double  |got - ref| <= 1e-12 * max|ref|   [7e-17, 5e-16]
//   Rotary<float>                      |got - ref| <= 1e-6 * max|ref|    [6e-8]
//   forward in float                   |got - ref| <= 1e-5 * max|ref|    [4e-7]
//   gradients: L = sum(y * R), R fixed random (so dy = R), h = 1e-5,
//     |analytic - (L(p+h) - L(p-h)) / 2h| <= 1e-7 * max(1, |analytic|) for every element of Wqkv, Wo
//     and x [8e-9]. |L| reaches 70 here (its terms more), so h = 1e-6 leaves a rounding error of
//     ~1e-16 * |L| / h ~ 1e-8 (seen: 7e-8); at h = 1e-5 it is ~1e-9 and the truncation O(h^2) ~ 1e-10.
#include <doctest/doctest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <moekit/nn/attention.hpp>
#include <moekit/nn/rotary.hpp>
#include <random>
#include <string>
#include <vector>

#include "../common/random.hpp"

using namespace moekit;

namespace {

constexpr double kStep = 1e-5;
constexpr double kGradTol = 1e-7;

using moekit_test::dot;
std::vector<double> randn(std::size_t n, std::mt19937_64& g, double scale = 1.0) { return moekit_test::random_vec(n, g, scale); }

// max_i |got[i] - ref[i]| <= tol * max_i |ref[i]|.
template <class G>
void check_close(const char* what, const std::vector<G>& got, const std::vector<double>& ref, double tol) {
  REQUIRE(got.size() >= ref.size());
  double scale = 0, worst = 0;
  std::size_t at = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    scale = std::max(scale, std::abs(ref[i]));
    const double e = std::abs(double(got[i]) - ref[i]);
    if (!(e <= worst)) worst = e, at = i;  // a NaN becomes the worst
  }
  INFO(what << ": worst element " << at << ": " << double(got[at]) << " vs reference " << ref[at] << ", |ref| max "
            << scale);
  CHECK(scale > 0);
  CHECK(worst <= tol * scale);
}

// Checks analytic[i] against the central difference of loss() in p[i], for every i < n.
void check_fd(const char* what, double* p, const double* analytic, std::int64_t n, const std::function<double()>& loss) {
  INFO(what);
  double worst = 0;
  std::int64_t at = 0;
  double fd_at = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const double keep = p[i];
    p[i] = keep + kStep;
    const double up = loss();
    p[i] = keep - kStep;
    const double down = loss();
    p[i] = keep;
    const double fd = (up - down) / (2 * kStep);
    const double e = std::abs(analytic[i] - fd) / std::max(1.0, std::abs(analytic[i]));
    if (!(e <= worst)) worst = e, at = i, fd_at = fd;
  }
  INFO("worst element " << at << ": analytic " << analytic[at] << " vs finite difference " << fd_at);
  CHECK(worst <= kGradTol);
}

// ---- The reference: scalar loops in double, nothing shared with the code under test. ----

// Rotates one head vector v[0, hd) at position pos, pairs (i, i + hd/2), by sign * pos / theta^(2i/hd).
void ref_rotate(double* v, std::int64_t hd, std::int64_t pos, double theta, double sign = 1.0) {
  const std::int64_t half = hd / 2;
  for (std::int64_t i = 0; i < half; ++i) {
    const double angle = sign * double(pos) / std::pow(theta, double(2 * i) / double(hd));
    const double a = v[i], b = v[i + half];
    v[i] = a * std::cos(angle) - b * std::sin(angle);
    v[i + half] = a * std::sin(angle) + b * std::cos(angle);
  }
}

struct Shape {
  std::int64_t d_model, heads, kv_heads, seq, batch;
  std::int64_t hd() const { return d_model / heads; }
  std::int64_t rows() const { return seq * batch; }
  std::int64_t qkv_rows() const { return (heads + 2 * kv_heads) * hd(); }
};

// y = attention(x) with wqkv [(H + 2KV) hd, D] (q heads, k groups, v groups) and wo [D, H hd].
std::vector<double> ref_attention(const Shape& s, double theta, const std::vector<double>& x,
                                  const std::vector<double>& wqkv, const std::vector<double>& wo) {
  const std::int64_t D = s.d_model, H = s.heads, KV = s.kv_heads, hd = s.hd(), N = s.rows(), L = s.seq;
  // Projections, one head vector at a time: q[n][h][e], k[n][g][e], v[n][g][e].
  std::vector<double> q(N * H * hd), k(N * KV * hd), v(N * KV * hd);
  for (std::int64_t n = 0; n < N; ++n) {
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t e = 0; e < hd; ++e) {
        double acc = 0;
        for (std::int64_t c = 0; c < D; ++c) acc += x[n * D + c] * wqkv[(h * hd + e) * D + c];
        q[(n * H + h) * hd + e] = acc;
      }
    for (std::int64_t g = 0; g < KV; ++g)
      for (std::int64_t e = 0; e < hd; ++e) {
        double ak = 0, av = 0;
        for (std::int64_t c = 0; c < D; ++c) {
          ak += x[n * D + c] * wqkv[((H + g) * hd + e) * D + c];
          av += x[n * D + c] * wqkv[((H + KV + g) * hd + e) * D + c];
        }
        k[(n * KV + g) * hd + e] = ak;
        v[(n * KV + g) * hd + e] = av;
      }
    for (std::int64_t h = 0; h < H; ++h) ref_rotate(&q[(n * H + h) * hd], hd, n % L, theta);
    for (std::int64_t g = 0; g < KV; ++g) ref_rotate(&k[(n * KV + g) * hd], hd, n % L, theta);
  }
  std::vector<double> out(N * H * hd, 0.0), p(L);
  for (std::int64_t b = 0; b < s.batch; ++b)
    for (std::int64_t h = 0; h < H; ++h) {
      const std::int64_t g = h / (H / KV);
      for (std::int64_t i = 0; i < L; ++i) {
        const std::int64_t ni = b * L + i;
        double m = -std::numeric_limits<double>::infinity();
        for (std::int64_t j = 0; j <= i; ++j) {
          double sc = 0;
          for (std::int64_t e = 0; e < hd; ++e) sc += q[(ni * H + h) * hd + e] * k[((b * L + j) * KV + g) * hd + e];
          p[j] = sc / std::sqrt(double(hd));
          m = std::max(m, p[j]);
        }
        double z = 0;
        for (std::int64_t j = 0; j <= i; ++j) z += (p[j] = std::exp(p[j] - m));
        for (std::int64_t e = 0; e < hd; ++e) {
          double acc = 0;
          for (std::int64_t j = 0; j <= i; ++j) acc += p[j] / z * v[((b * L + j) * KV + g) * hd + e];
          out[ni * H * hd + h * hd + e] = acc;
        }
      }
    }
  std::vector<double> y(N * D);
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t c = 0; c < D; ++c) {
      double acc = 0;
      for (std::int64_t m = 0; m < H * hd; ++m) acc += out[n * H * hd + m] * wo[c * H * hd + m];
      y[n * D + c] = acc;
    }
  return y;
}

// Copies wqkv and wo into the module through parameters(), checking their names and shapes.
template <class T>
void set_params(nn::CausalSelfAttention<T>& attn, const Shape& s, const std::vector<double>& wqkv,
                const std::vector<double>& wo) {
  auto ps = attn.parameters("blk.");
  REQUIRE(ps.size() == 2);
  CHECK(ps[0].name == "blk.qkv_proj.weight");
  CHECK(ps[0].shape == std::vector<std::int64_t>{s.qkv_rows(), s.d_model});
  CHECK(ps[1].name == "blk.o_proj.weight");
  CHECK(ps[1].shape == std::vector<std::int64_t>{s.d_model, s.heads * s.hd()});
  REQUIRE(ps[0].numel() == std::int64_t(wqkv.size()));
  REQUIRE(ps[1].numel() == std::int64_t(wo.size()));
  std::copy(wqkv.begin(), wqkv.end(), ps[0].value);
  std::copy(wo.begin(), wo.end(), ps[1].value);
}

const Shape kShapes[] = {
    {12, 3, 3, 5, 2},  // plain multi-head, odd head count and seq
    {16, 4, 2, 7, 3},  // grouped-query
    {8, 2, 1, 6, 2},   // multi-query
    {8, 2, 2, 1, 3},   // seq 1: each token attends to itself only
    {24, 6, 3, 4, 1},  // one sequence
};

std::string shape_name(const Shape& s) {
  return "d_model " + std::to_string(s.d_model) + " heads " + std::to_string(s.heads) + " kv " +
         std::to_string(s.kv_heads) + " seq " + std::to_string(s.seq) + " batch " + std::to_string(s.batch);
}

}  // namespace

TEST_CASE("nn::Rotary matches the rotate-half formula, and by hand") {
  // By hand: hd 4, theta 100, position 1: pair 0 turns by 1 rad, pair 1 by 100^(-1/2) = 0.1 rad.
  nn::Rotary<double> small(4, 3, 100.0);
  std::vector<double> e = {1, 0, 0, 2};  // pair 0 = (1, 0), pair 1 = (0, 2)
  std::vector<double> two(8, 0.0);       // rows 0, 1 = positions 0, 1 of one sequence
  std::copy(e.begin(), e.end(), two.begin() + 4);
  small.apply(two.data(), 2, 2, 1, 4);
  const std::vector<double> expect = {0, 0, 0, 0, std::cos(1.0), -2 * std::sin(0.1), std::sin(1.0), 2 * std::cos(0.1)};
  for (int i = 0; i < 8; ++i) CHECK(two[i] == doctest::Approx(expect[i]).epsilon(1e-15));

  // Against ref_rotate: 3 sequences of 5, 3 heads of 6, rows padded to 20 (the padding is left alone).
  std::mt19937_64 g(21);
  const std::int64_t hd = 6, heads = 3, seq = 5, rows = 15, stride = 20;
  const double theta = 500.0;
  const auto x = randn(rows * stride, g);
  auto ref = x;
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t h = 0; h < heads; ++h) ref_rotate(&ref[r * stride + h * hd], hd, r % seq, theta);
  nn::Rotary<double> rd(hd, 8, theta);
  auto yd = x;
  rd.apply(yd.data(), rows, seq, heads, stride);
  check_close("Rotary<double>", yd, ref, 1e-12);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = heads * hd; c < stride; ++c) CHECK(yd[r * stride + c] == x[r * stride + c]);
  nn::Rotary<float> rf(hd, 8, theta);
  std::vector<float> yf(x.begin(), x.end());
  std::vector<double> ref_f(x.size());  // the reference on the float-rounded input
  for (std::size_t i = 0; i < x.size(); ++i) ref_f[i] = double(float(x[i]));
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t h = 0; h < heads; ++h) ref_rotate(&ref_f[r * stride + h * hd], hd, r % seq, theta);
  rf.apply(yf.data(), rows, seq, heads, stride);
  check_close("Rotary<float>", yf, ref_f, 1e-6);
}

TEST_CASE("nn::Rotary: position 0 is the identity, inverse undoes apply") {
  std::mt19937_64 g(22);
  const std::int64_t hd = 8, heads = 2, seq = 7, rows = 21;
  nn::Rotary<double> rope(hd, 16);
  const auto x = randn(rows * heads * hd, g, 3.0);
  auto y = x;
  rope.apply(y.data(), rows, seq, heads, heads * hd);
  for (std::int64_t r = 0; r < rows; r += seq)
    for (std::int64_t c = 0; c < heads * hd; ++c) CHECK(y[r * heads * hd + c] == x[r * heads * hd + c]);
  CHECK(y[heads * hd + 1] != x[heads * hd + 1]);  // position 1 does turn
  rope.apply(y.data(), rows, seq, heads, heads * hd, /*inverse=*/true);
  check_close("apply then inverse", y, x, 1e-12);
  // The inverse alone is the reference's rotation by -angle.
  auto ref = x;
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t h = 0; h < heads; ++h) ref_rotate(&ref[(r * heads + h) * hd], hd, r % seq, 10000.0, -1.0);
  y = x;
  rope.apply(y.data(), rows, seq, heads, heads * hd, true);
  check_close("inverse", y, ref, 1e-12);
}

TEST_CASE("nn::Rotary rejects bad configs and shapes, naming them") {
  auto field_of = [](auto make) -> std::string {
    try {
      make();
    } catch (const ConfigError& e) {
      return e.field();
    }
    return "(no throw)";
  };
  CHECK(field_of([] { nn::Rotary<float>(5, 4); }) == "head_dim");
  CHECK(field_of([] { nn::Rotary<float>(0, 4); }) == "head_dim");
  CHECK(field_of([] { nn::Rotary<float>(4, 0); }) == "max_seq");
  CHECK(field_of([] { nn::Rotary<float>(4, 4, 1.0); }) == "theta");
  CHECK(field_of([] { nn::Rotary<float>(4, 4, std::nan("")); }) == "theta");
  CHECK(field_of([] { nn::Rotary<float>(4, 4, std::numeric_limits<double>::infinity()); }) == "theta");
  nn::Rotary<float> rope(4, 4);
  std::vector<float> x(64);
  auto msg = [&](std::int64_t rows, std::int64_t seq, std::int64_t heads, std::int64_t stride) -> std::string {
    try {
      rope.apply(x.data(), rows, seq, heads, stride);
    } catch (const ShapeError& e) {
      return e.what();
    }
    return "(no throw)";
  };
  CHECK(msg(6, 4, 1, 4).find("rows = 6") != std::string::npos);
  CHECK(msg(10, 5, 1, 4).find("max_seq = 4") != std::string::npos);
  CHECK(msg(4, 0, 1, 4).find("seq = 0") != std::string::npos);
  CHECK(msg(4, 4, 2, 7).find("row_stride = 7") != std::string::npos);
  CHECK(msg(8, 4, 2, 8) == "(no throw)");
}

TEST_CASE("nn::CausalSelfAttention forward matches the reference (double and float)") {
  std::uint64_t seed = 30;
  for (const Shape& s : kShapes) {
    CAPTURE(shape_name(s));
    std::mt19937_64 g(++seed);
    const double theta = 10000.0;
    // Weights of scale 0.5 (not the init's 1/sqrt(D)) so that the softmax is far from uniform.
    const auto x = randn(s.rows() * s.d_model, g);
    const auto wqkv = randn(s.qkv_rows() * s.d_model, g, 0.5);
    const auto wo = randn(s.d_model * s.heads * s.hd(), g, 0.5);
    const auto ref = ref_attention(s, theta, x, wqkv, wo);

    nn::CausalSelfAttention<double> ad(s.d_model, s.heads, s.kv_heads, s.seq + 3, theta);
    CHECK(ad.head_dim() == s.hd());
    set_params(ad, s, wqkv, wo);
    std::vector<double> yd(x.size(), std::nan(""));
    ad.forward(MatrixView<const double>(x.data(), {s.rows(), s.d_model}), s.seq,
               MatrixView<double>(yd.data(), {s.rows(), s.d_model}));
    check_close("double", yd, ref, 1e-12);

    // float: the reference on the float-rounded inputs, so only the arithmetic differs.
    auto rounded = [](const std::vector<double>& v) {
      std::vector<double> r(v.size());
      for (std::size_t i = 0; i < v.size(); ++i) r[i] = double(float(v[i]));
      return r;
    };
    const auto xr = rounded(x), wqkvr = rounded(wqkv), wor = rounded(wo);
    const auto ref_f = ref_attention(s, theta, xr, wqkvr, wor);
    nn::CausalSelfAttention<float> af(s.d_model, s.heads, s.kv_heads, s.seq, theta);
    set_params(af, s, wqkvr, wor);
    const std::vector<float> xf(xr.begin(), xr.end());
    std::vector<float> yf(x.size(), std::nanf(""));
    af.forward(MatrixView<const float>(xf.data(), {s.rows(), s.d_model}), s.seq,
               MatrixView<float>(yf.data(), {s.rows(), s.d_model}));
    check_close("float", yf, ref_f, 1e-5);
  }
}

TEST_CASE("nn::CausalSelfAttention is causal: a later token never changes an earlier output") {
  const Shape s{16, 4, 2, 9, 2};
  std::mt19937_64 g(40);
  nn::CausalSelfAttention<double> attn(s.d_model, s.heads, s.kv_heads, s.seq);
  attn.init_params(41);
  auto x = randn(s.rows() * s.d_model, g);
  const MatrixView<const double> xv(x.data(), {s.rows(), s.d_model});
  std::vector<double> y0(x.size()), y1(x.size());
  attn.forward(xv, s.seq, MatrixView<double>(y0.data(), {s.rows(), s.d_model}));
  for (std::int64_t t : {1, 4, 8}) {
    CAPTURE(t);
    const std::int64_t row = s.seq + t;  // position t of sequence 1
    auto keep = x;
    for (std::int64_t c = 0; c < s.d_model; ++c) x[row * s.d_model + c] += 1.0 + double(c);
    attn.forward(xv, s.seq, MatrixView<double>(y1.data(), {s.rows(), s.d_model}));
    // Sequence 0 and positions < t of sequence 1: bitwise equal. Position t itself: changed.
    for (std::int64_t i = 0; i < row * s.d_model; ++i) REQUIRE(y1[i] == y0[i]);
    bool changed = false;
    for (std::int64_t c = 0; c < s.d_model; ++c) changed |= y1[row * s.d_model + c] != y0[row * s.d_model + c];
    CHECK(changed);
    x = keep;
  }
}

TEST_CASE("nn::CausalSelfAttention gradients match finite differences of the reference") {
  std::uint64_t seed = 50;
  for (const Shape& s : kShapes) {
    CAPTURE(shape_name(s));
    std::mt19937_64 g(++seed);
    const double theta = 300.0;  // a low theta: every pair turns noticeably at these short lengths
    auto x = randn(s.rows() * s.d_model, g);
    auto wqkv = randn(s.qkv_rows() * s.d_model, g, 0.5);
    auto wo = randn(s.d_model * s.heads * s.hd(), g, 0.5);
    const auto r = randn(s.rows() * s.d_model, g);
    auto loss = [&] { return dot(ref_attention(s, theta, x, wqkv, wo), r); };

    nn::CausalSelfAttention<double> attn(s.d_model, s.heads, s.kv_heads, s.seq, theta);
    set_params(attn, s, wqkv, wo);
    attn.zero_grad();
    const MatrixView<const double> xv(x.data(), {s.rows(), s.d_model});
    std::vector<double> y(x.size()), dx(x.size(), std::nan(""));
    attn.forward(xv, s.seq, MatrixView<double>(y.data(), {s.rows(), s.d_model}));
    attn.backward(xv, MatrixView<const double>(r.data(), {s.rows(), s.d_model}),
                  MatrixView<double>(dx.data(), {s.rows(), s.d_model}));
    auto ps = attn.parameters();
    check_fd("qkv_proj.weight", wqkv.data(), ps[0].grad, ps[0].numel(), loss);
    check_fd("o_proj.weight", wo.data(), ps[1].grad, ps[1].numel(), loss);
    check_fd("x", x.data(), dx.data(), std::int64_t(x.size()), loss);
  }
}

TEST_CASE("nn::CausalSelfAttention accumulates weight gradients over backward calls, overwrites dx") {
  const Shape s{16, 4, 2, 5, 2};
  std::mt19937_64 g(60);
  const std::int64_t N = s.rows(), D = s.d_model;
  const auto x1 = randn(N * D, g), x2 = randn(N * D, g), r1 = randn(N * D, g), r2 = randn(N * D, g);
  nn::CausalSelfAttention<double> attn(D, s.heads, s.kv_heads, s.seq);
  attn.init_params(61, 0.5);
  std::vector<double> y(N * D), dx(N * D);
  // Gradients of micro-batch (x, r) alone, starting from zero.
  auto grads_of = [&](const std::vector<double>& x, const std::vector<double>& r, bool zero) {
    if (zero) attn.zero_grad();
    attn.forward(MatrixView<const double>(x.data(), {N, D}), s.seq, MatrixView<double>(y.data(), {N, D}));
    attn.backward(MatrixView<const double>(x.data(), {N, D}), MatrixView<const double>(r.data(), {N, D}),
                  MatrixView<double>(dx.data(), {N, D}));
    std::vector<std::vector<double>> gs;
    for (const auto& p : attn.parameters()) gs.emplace_back(p.grad, p.grad + p.numel());
    return gs;
  };
  const auto g1 = grads_of(x1, r1, true);
  const auto dx1 = dx;
  const auto g2 = grads_of(x2, r2, true);
  const auto dx2 = dx;
  grads_of(x1, r1, true);
  CHECK(dx == dx1);  // dx is overwritten: the second call's equals a fresh one's
  const auto sum = grads_of(x2, r2, false);
  CHECK(dx == dx2);
  for (std::size_t t = 0; t < sum.size(); ++t)
    for (std::size_t i = 0; i < sum[t].size(); ++i) REQUIRE(sum[t][i] == doctest::Approx(g1[t][i] + g2[t][i]).epsilon(1e-13));
  // The same backward twice: twice the gradient.
  const auto twice = [&] {
    attn.zero_grad();
    attn.forward(MatrixView<const double>(x1.data(), {N, D}), s.seq, MatrixView<double>(y.data(), {N, D}));
    for (int k = 0; k < 2; ++k)
      attn.backward(MatrixView<const double>(x1.data(), {N, D}), MatrixView<const double>(r1.data(), {N, D}), {});
    std::vector<std::vector<double>> gs;
    for (const auto& p : attn.parameters()) gs.emplace_back(p.grad, p.grad + p.numel());
    return gs;
  }();
  for (std::size_t t = 0; t < twice.size(); ++t)
    for (std::size_t i = 0; i < twice[t].size(); ++i) REQUIRE(twice[t][i] == doctest::Approx(2 * g1[t][i]).epsilon(1e-13));
}

TEST_CASE("nn::CausalSelfAttention init_params: torch's bounds, out_scale on o_proj") {
  nn::CausalSelfAttention<double> attn(32, 4, 2, 8);
  attn.init_params(70, 0.25);
  auto ps = attn.parameters();
  auto check_bound = [](const Parameter<double>& p, double bound) {
    CAPTURE(p.name);
    double mx = 0;
    for (std::int64_t i = 0; i < p.numel(); ++i) mx = std::max(mx, std::abs(p.value[i]));
    CHECK(mx <= bound);
    CHECK(mx > 0.9 * bound);  // uniform over the whole range, not a narrower one
  };
  check_bound(ps[0], 1.0 / std::sqrt(32.0));
  check_bound(ps[1], 0.25 / std::sqrt(32.0));
  // Same seed, same weights.
  nn::CausalSelfAttention<double> again(32, 4, 2, 8);
  again.init_params(70, 0.25);
  auto qs = again.parameters();
  CHECK(std::equal(ps[0].value, ps[0].value + ps[0].numel(), qs[0].value));
  CHECK(std::equal(ps[1].value, ps[1].value + ps[1].numel(), qs[1].value));
  CHECK_THROWS_AS(attn.init_params(1, 0.0), ConfigError);
}

TEST_CASE("nn::CausalSelfAttention rejects bad configs and shapes, naming them") {
  auto field_of = [](std::int64_t d, std::int64_t h, std::int64_t kv, std::int64_t max_seq, double theta) -> std::string {
    try {
      nn::CausalSelfAttention<float>(d, h, kv, max_seq, theta);
    } catch (const ConfigError& e) {
      return e.field();
    }
    return "(no throw)";
  };
  CHECK(field_of(12, 5, 5, 4, 1e4) == "d_model");   // 12 % 5 != 0
  CHECK(field_of(16, 4, 3, 4, 1e4) == "heads");     // 4 % 3 != 0
  CHECK(field_of(16, 4, 0, 4, 1e4) == "kv_heads");
  CHECK(field_of(12, 4, 2, 4, 1e4) == "head_dim");  // 3
  CHECK(field_of(16, 4, 2, 0, 1e4) == "max_seq");
  CHECK(field_of(16, 4, 2, 4, 0.5) == "rope_theta");
  CHECK(field_of(0, 4, 2, 4, 1e4) == "d_model");
  CHECK(field_of(16, 0, 1, 4, 1e4) == "heads");
  CHECK(field_of(16, 4, 4, 4, 1e4) == "(no throw)");

  const std::int64_t D = 8;
  nn::CausalSelfAttention<float> attn(D, 2, 1, 4);
  attn.init_params(80);
  std::vector<float> x(12 * D, 0.5f), y(12 * D), dx(12 * D);
  auto mv = [](std::vector<float>& v, std::int64_t r, std::int64_t c) { return MatrixView<float>(v.data(), {r, c}); };
  auto what = [](auto f) -> std::string {
    try {
      f();
    } catch (const ShapeError& e) {
      return e.what();
    }
    return "(no throw)";
  };
  CHECK(what([&] { attn.backward(mv(x, 8, D), mv(y, 8, D), mv(dx, 8, D)); }).find("no forward") != std::string::npos);
  CHECK(what([&] { attn.forward(mv(x, 6, D), 4, mv(y, 6, D)); }).find("seq = 4") != std::string::npos);
  CHECK(what([&] { attn.forward(mv(x, 10, D), 5, mv(y, 10, D)); }).find("max_seq = 4") != std::string::npos);
  CHECK(what([&] { attn.forward(mv(x, 8, D), 0, mv(y, 8, D)); }).find("seq = 0") != std::string::npos);
  CHECK(what([&] { attn.forward(mv(x, 8, D + 1), 4, mv(y, 8, D)); }).find("x has shape") != std::string::npos);
  CHECK(what([&] { attn.forward(mv(x, 8, D), 4, mv(y, 4, D)); }).find("y has shape") != std::string::npos);
  attn.forward(mv(x, 8, D), 4, mv(y, 8, D));
  attn.zero_grad();
  CHECK(what([&] { attn.backward(mv(x, 12, D), mv(y, 12, D), mv(dx, 12, D)); }).find("last forward had 8") != std::string::npos);
  CHECK(what([&] { attn.backward(mv(x, 8, D), mv(y, 4, D), mv(dx, 8, D)); }).find("dy has shape") != std::string::npos);
  CHECK(what([&] { attn.backward(mv(x, 8, D), mv(y, 8, D), mv(dx, 8, 2 * D)); }).find("dx has shape") != std::string::npos);
  // A rejected backward accumulated nothing.
  for (const auto& p : attn.parameters())
    CHECK(std::all_of(p.grad, p.grad + p.numel(), [](float v) { return v == 0.0f; }));
  CHECK(what([&] { attn.backward(mv(x, 8, D), mv(y, 8, D), mv(dx, 8, D)); }) == "(no throw)");
}

TEST_CASE_TEMPLATE("nn::CausalSelfAttention forward and backward are bitwise equal on 1 and 2 threads", T, float, double) {
  // Large enough that both parallel regions run: batch * heads * seq^2 * hd = 3 * 4 * 24^2 * 8 > 2^15.
  const Shape s{32, 4, 2, 24, 3};
  std::mt19937_64 g(90);
  const std::int64_t N = s.rows(), D = s.d_model;
  const auto xd = randn(N * D, g), rd = randn(N * D, g);
  const std::vector<T> x(xd.begin(), xd.end()), r(rd.begin(), rd.end());
  struct Run {
    std::vector<T> y, dx, gqkv, go;
  };
  auto run = [&](int threads) {
    omp_set_num_threads(threads);
    int seen = 0;
#pragma omp parallel
#pragma omp single
    seen = omp_get_num_threads();
    CHECK(seen == threads);
    nn::CausalSelfAttention<T> attn(D, s.heads, s.kv_heads, s.seq);
    attn.init_params(91);
    Run out{std::vector<T>(N * D), std::vector<T>(N * D), {}, {}};
    attn.zero_grad();
    attn.forward(MatrixView<const T>(x.data(), {N, D}), s.seq, MatrixView<T>(out.y.data(), {N, D}));
    attn.backward(MatrixView<const T>(x.data(), {N, D}), MatrixView<const T>(r.data(), {N, D}),
                  MatrixView<T>(out.dx.data(), {N, D}));
    auto ps = attn.parameters();
    out.gqkv.assign(ps[0].grad, ps[0].grad + ps[0].numel());
    out.go.assign(ps[1].grad, ps[1].grad + ps[1].numel());
    return out;
  };
  const int keep = omp_get_max_threads();
  const Run one = run(1), two = run(2);
  omp_set_num_threads(keep);
  auto same = [](const std::vector<T>& a, const std::vector<T>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
  };
  CHECK(same(one.y, two.y));
  CHECK(same(one.dx, two.dx));
  CHECK(same(one.gqkv, two.gqkv));
  CHECK(same(one.go, two.go));
  CHECK(std::any_of(one.dx.begin(), one.dx.end(), [](T v) { return v != T(0); }));
}
