// nn modules (Embedding, Linear, RMSNorm, softmax cross-entropy): gradients against central finite
// differences in double, values against numbers worked out by hand, and the error paths.
//
// Finite differences: L(p) = sum(y * w) with fixed random w (so dy = w), h = 1e-6, and
// |analytic - (L(p+h) - L(p-h)) / 2h| <= 1e-7 * max(1, |analytic|) for every element. In double the
// truncation error is O(h^2) ~ 1e-12 and the rounding error ~ 1e-16 * |L| / h ~ 1e-9, so 1e-7 only
// fails on a wrong gradient.
#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <moekit/nn/cross_entropy.hpp>
#include <moekit/nn/embedding.hpp>
#include <moekit/nn/linear.hpp>
#include <moekit/nn/rms_norm.hpp>
#include <random>
#include <string>
#include <vector>

#include "../common/random.hpp"

using namespace moekit;

namespace {

constexpr double kStep = 1e-6;
constexpr double kTol = 1e-7;

using moekit_test::dot;
std::vector<double> randn(std::size_t n, std::mt19937_64& g, double scale = 1.0) { return moekit_test::random_vec(n, g, scale); }

// Checks analytic[i] against the central difference of loss() in p[i], for every i < n.
void check_fd(const char* what, double* p, const double* analytic, std::int64_t n, const std::function<double()>& loss) {
  INFO(what);
  for (std::int64_t i = 0; i < n; ++i) {
    const double keep = p[i];
    p[i] = keep + kStep;
    const double up = loss();
    p[i] = keep - kStep;
    const double down = loss();
    p[i] = keep;
    const double fd = (up - down) / (2 * kStep);
    INFO("element " << i << ": analytic " << analytic[i] << " vs finite difference " << fd);
    CHECK(std::abs(analytic[i] - fd) <= kTol * std::max(1.0, std::abs(analytic[i])));
  }
}

}  // namespace

TEST_CASE("nn::Embedding forward looks up rows and sums bags") {
  nn::Embedding<double> emb(5, 3);
  for (int i = 0; i < 15; ++i) emb.weight()[i] = double(i);  // row r = [3r, 3r+1, 3r+2]
  const std::vector<std::int32_t> ids = {4, 0, 4, 2};
  std::vector<double> out(2 * 3, std::nan(""));
  // Bags of two: row 0 = W[4] + W[0], row 1 = W[4] + W[2].
  emb.forward(MatrixView<const std::int32_t>(ids.data(), {2, 2}), MatrixView<double>(out.data(), {2, 3}));
  const std::vector<double> expect = {12 + 0, 13 + 1, 14 + 2, 12 + 6, 13 + 7, 14 + 8};
  for (int i = 0; i < 6; ++i) CHECK(out[i] == expect[i]);
  // Plain lookup.
  std::vector<double> one(4 * 3);
  emb.forward(VectorView<const std::int32_t>(ids.data(), {4}), MatrixView<double>(one.data(), {4, 3}));
  CHECK(one[0] == 12);
  CHECK(one[3] == 0);
  CHECK(one[11] == 8);
}

TEST_CASE("nn::Embedding gradient matches finite differences, repeated ids accumulate") {
  std::mt19937_64 g(1);
  const std::int64_t n = 7, d = 5, rows = 6, bag = 3;
  nn::Embedding<double> emb(n, d);
  emb.init_params(11, 0.5);
  std::vector<std::int32_t> ids(rows * bag);
  for (auto& v : ids) v = std::int32_t(g() % 4);  // ids 0..3 only: repeats are certain, rows 4..6 unused
  const auto w = randn(rows * d, g);
  const MatrixView<const std::int32_t> iv(ids.data(), {rows, bag});
  std::vector<double> out(rows * d);
  auto loss = [&] {
    emb.forward(iv, MatrixView<double>(out.data(), {rows, d}));
    return dot(out, w);
  };
  emb.zero_grad();
  emb.backward(iv, MatrixView<const double>(w.data(), {rows, d}));
  check_fd("embedding table", emb.weight(), emb.grad(), n * d, loss);
  for (std::int64_t i = 4 * d; i < n * d; ++i) CHECK(emb.grad()[i] == 0.0);
  // A second backward adds the same gradient again.
  std::vector<double> once(emb.grad(), emb.grad() + n * d);
  emb.backward(iv, MatrixView<const double>(w.data(), {rows, d}));
  for (std::int64_t i = 0; i < n * d; ++i) CHECK(emb.grad()[i] == doctest::Approx(2 * once[i]));
}

TEST_CASE("nn::Embedding rejects ids out of range, naming the position and value") {
  nn::Embedding<float> emb(4, 2);
  const std::vector<std::int32_t> ids = {1, 3, 4};
  std::vector<float> out(3 * 2);
  try {
    emb.forward(VectorView<const std::int32_t>(ids.data(), {3}), MatrixView<float>(out.data(), {3, 2}));
    FAIL("expected ShapeError");
  } catch (const ShapeError& e) {
    const std::string msg = e.what();
    CHECK(msg.find("ids[2, 0] = 4") != std::string::npos);
    CHECK(msg.find("[0, 4)") != std::string::npos);
  }
  const std::vector<std::int32_t> neg = {-1};
  CHECK_THROWS_AS(emb.backward(VectorView<const std::int32_t>(neg.data(), {1}), MatrixView<const float>(out.data(), {1, 2})),
                  ShapeError);
  CHECK_THROWS_AS(nn::Embedding<float>(0, 3), ConfigError);
}

TEST_CASE("nn::Linear forward is x W^T + b") {
  nn::Linear<double> lin(2, 3);
  const double w[6] = {1, 2, 3, 4, 5, 6};  // rows: [1 2], [3 4], [5 6]
  const double b[3] = {0.5, -1, 2};
  std::copy_n(w, 6, lin.weight());
  std::copy_n(b, 3, lin.bias());
  const std::vector<double> x = {1, -1, 2, 0.5};
  std::vector<double> y(2 * 3, std::nan(""));
  lin.forward(MatrixView<const double>(x.data(), {2, 2}), MatrixView<double>(y.data(), {2, 3}));
  // [1,-1]: 1-2+0.5, 3-4-1, 5-6+2 ; [2,0.5]: 2+1+0.5, 6+2-1, 10+3+2
  const std::vector<double> expect = {-0.5, -2, 1, 3.5, 7, 15};
  for (int i = 0; i < 6; ++i) CHECK(y[i] == doctest::Approx(expect[i]));
}

TEST_CASE("nn::Linear gradients match finite differences (with and without bias)") {
  for (bool bias : {true, false}) {
    CAPTURE(bias);
    std::mt19937_64 g(2 + bias);
    const std::int64_t in = 5, out = 4, rows = 7;
    nn::Linear<double> lin(in, out, bias);
    lin.init_params(3);
    auto x = randn(rows * in, g);
    const auto w = randn(rows * out, g);
    std::vector<double> y(rows * out), dx(rows * in, std::nan(""));
    auto loss = [&] {
      lin.forward(MatrixView<const double>(x.data(), {rows, in}), MatrixView<double>(y.data(), {rows, out}));
      return dot(y, w);
    };
    lin.zero_grad();
    lin.backward(MatrixView<const double>(x.data(), {rows, in}), MatrixView<const double>(w.data(), {rows, out}),
                 MatrixView<double>(dx.data(), {rows, in}));
    check_fd("weight", lin.weight(), lin.weight_grad(), in * out, loss);
    if (bias) check_fd("bias", lin.bias(), lin.bias_grad(), out, loss);
    check_fd("input", x.data(), dx.data(), rows * in, loss);
    CHECK(lin.parameters("head.").size() == (bias ? 2u : 1u));
    CHECK(lin.parameters("head.")[0].name == "head.weight");
  }
}

TEST_CASE("nn::Linear accumulates parameter gradients and may skip dx") {
  std::mt19937_64 g(4);
  nn::Linear<double> lin(3, 2);
  lin.init_params(5);
  const auto x = randn(4 * 3, g), dy = randn(4 * 2, g);
  lin.zero_grad();
  lin.backward(MatrixView<const double>(x.data(), {4, 3}), MatrixView<const double>(dy.data(), {4, 2}), {});
  const std::vector<double> w1(lin.weight_grad(), lin.weight_grad() + 6), b1(lin.bias_grad(), lin.bias_grad() + 2);
  lin.backward(MatrixView<const double>(x.data(), {4, 3}), MatrixView<const double>(dy.data(), {4, 2}), {});
  for (int i = 0; i < 6; ++i) CHECK(lin.weight_grad()[i] == doctest::Approx(2 * w1[i]));
  for (int i = 0; i < 2; ++i) CHECK(lin.bias_grad()[i] == doctest::Approx(2 * b1[i]));
  // b's gradient is the column sum of dy.
  CHECK(b1[0] == doctest::Approx(dy[0] + dy[2] + dy[4] + dy[6]));
  std::vector<float> yf(4 * 3);
  nn::Linear<float> lf(3, 3);
  CHECK_THROWS_AS(lf.forward(MatrixView<const float>(yf.data(), {4, 3}), MatrixView<float>(yf.data(), {3, 4})), ShapeError);
}

TEST_CASE("nn::Linear<float> agrees with nn::Linear<double>") {
  std::mt19937_64 g(6);
  const std::int64_t in = 33, out = 17, rows = 40;
  nn::Linear<double> ld(in, out);
  nn::Linear<float> lf(in, out);
  ld.init_params(7);
  lf.init_params(7);  // same SplitMix64 stream, rounded to float
  const auto x = randn(rows * in, g);
  const std::vector<float> xf(x.begin(), x.end());
  std::vector<double> yd(rows * out);
  std::vector<float> yf(rows * out);
  ld.forward(MatrixView<const double>(x.data(), {rows, in}), MatrixView<double>(yd.data(), {rows, out}));
  lf.forward(MatrixView<const float>(xf.data(), {rows, in}), MatrixView<float>(yf.data(), {rows, out}));
  for (std::int64_t i = 0; i < rows * out; ++i) CHECK(double(yf[i]) == doctest::Approx(yd[i]).epsilon(1e-5).scale(1.0));
}

TEST_CASE("nn::RMSNorm forward matches the formula") {
  nn::RMSNorm<double> norm(4, 1e-6);
  const double gain[4] = {1, 2, 0.5, -1};
  std::copy_n(gain, 4, norm.weight());
  const std::vector<double> x = {1, 2, 3, 4};  // mean(x^2) = 30/4 = 7.5
  std::vector<double> y(4);
  norm.forward(MatrixView<const double>(x.data(), {1, 4}), MatrixView<double>(y.data(), {1, 4}));
  const double r = 1.0 / std::sqrt(7.5 + 1e-6);
  CHECK(y[0] == doctest::Approx(1 * r * 1));
  CHECK(y[1] == doctest::Approx(2 * r * 2));
  CHECK(y[2] == doctest::Approx(3 * r * 0.5));
  CHECK(y[3] == doctest::Approx(4 * r * -1));
}

TEST_CASE("nn::RMSNorm gradients match finite differences") {
  std::mt19937_64 g(8);
  const std::int64_t d = 6, rows = 5;
  nn::RMSNorm<double> norm(d, 1e-5);
  auto gain = randn(d, g, 0.7);
  std::copy(gain.begin(), gain.end(), norm.weight());
  auto x = randn(rows * d, g, 2.0);
  const auto w = randn(rows * d, g);
  std::vector<double> y(rows * d), dx(rows * d, std::nan(""));
  auto loss = [&] {
    norm.forward(MatrixView<const double>(x.data(), {rows, d}), MatrixView<double>(y.data(), {rows, d}));
    return dot(y, w);
  };
  norm.zero_grad();
  norm.backward(MatrixView<const double>(x.data(), {rows, d}), MatrixView<const double>(w.data(), {rows, d}),
                MatrixView<double>(dx.data(), {rows, d}));
  check_fd("gain", norm.weight(), norm.grad(), d, loss);
  check_fd("input", x.data(), dx.data(), rows * d, loss);
}

TEST_CASE("nn::RMSNorm rejects a bad configuration") {
  CHECK_THROWS_AS(nn::RMSNorm<float>(0), ConfigError);
  CHECK_THROWS_AS(nn::RMSNorm<float>(4, 0.0), ConfigError);
}

TEST_CASE("softmax_cross_entropy value against a hand-computed number") {
  // Row 0: logits [1, 2, 3], target 2: log(e + e^2 + e^3) - 3 = log(1 + e^-1 + e^-2) = 0.4076059644443801
  // Row 1: logits [0, 0, 0], target 1: log 3 = 1.0986122886681098
  // Mean: 0.7531091265562450
  const std::vector<double> logits = {1, 2, 3, 0, 0, 0};
  const std::vector<std::int32_t> targets = {2, 1};
  std::vector<double> dl(6, std::nan("")), per(2, std::nan(""));
  const double loss = nn::softmax_cross_entropy<double>(MatrixView<const double>(logits.data(), {2, 3}),
                                                        VectorView<const std::int32_t>(targets.data(), {2}),
                                                        MatrixView<double>(dl.data(), {2, 3}),
                                                        VectorView<double>(per.data(), {2}));
  CHECK(loss == doctest::Approx(0.7531091265562450).epsilon(1e-14));
  CHECK(per[0] == doctest::Approx(0.4076059644443801).epsilon(1e-14));
  CHECK(per[1] == doctest::Approx(1.0986122886681098).epsilon(1e-14));
  // dlogits row 1 = (1/3 - onehot(1)) / 2.
  CHECK(dl[3] == doctest::Approx(1.0 / 6));
  CHECK(dl[4] == doctest::Approx(-1.0 / 3));
  // The float path gives the same value to float precision, and needs no dlogits.
  const std::vector<float> lf(logits.begin(), logits.end());
  const double lossf = nn::softmax_cross_entropy<float>(MatrixView<const float>(lf.data(), {2, 3}),
                                                        VectorView<const std::int32_t>(targets.data(), {2}));
  CHECK(lossf == doctest::Approx(0.7531091265562450).epsilon(1e-6));
}

TEST_CASE("softmax_cross_entropy gradient matches finite differences, with grad_scale") {
  std::mt19937_64 g(9);
  const std::int64_t rows = 6, vocab = 7;
  auto logits = randn(rows * vocab, g, 2.0);
  std::vector<std::int32_t> targets(rows);
  for (auto& t : targets) t = std::int32_t(g() % vocab);
  const double scale = 0.25;
  auto loss = [&] {
    return scale * nn::softmax_cross_entropy<double>(MatrixView<const double>(logits.data(), {rows, vocab}),
                                                     VectorView<const std::int32_t>(targets.data(), {rows}));
  };
  std::vector<double> dl(rows * vocab);
  nn::softmax_cross_entropy<double>(MatrixView<const double>(logits.data(), {rows, vocab}),
                                    VectorView<const std::int32_t>(targets.data(), {rows}),
                                    MatrixView<double>(dl.data(), {rows, vocab}), {}, scale);
  check_fd("logits", logits.data(), dl.data(), rows * vocab, loss);
}

TEST_CASE("softmax_cross_entropy errors: target out of range, non-finite loss") {
  std::vector<float> logits = {0, 1, 2, 3, 4, 5};
  const std::vector<std::int32_t> bad = {0, 3};
  try {
    nn::softmax_cross_entropy<float>(MatrixView<const float>(logits.data(), {2, 3}), VectorView<const std::int32_t>(bad.data(), {2}));
    FAIL("expected ShapeError");
  } catch (const ShapeError& e) {
    CHECK(std::string(e.what()).find("targets[1] = 3") != std::string::npos);
  }
  const std::vector<std::int32_t> ok = {0, 2};
  logits[4] = std::numeric_limits<float>::quiet_NaN();
  try {
    nn::softmax_cross_entropy<float>(MatrixView<const float>(logits.data(), {2, 3}), VectorView<const std::int32_t>(ok.data(), {2}));
    FAIL("expected NumericError");
  } catch (const NumericError& e) {
    CHECK(std::string(e.what()).find("token 1") != std::string::npos);
  }
  logits[4] = std::numeric_limits<float>::infinity();
  CHECK_THROWS_AS(nn::softmax_cross_entropy<float>(MatrixView<const float>(logits.data(), {2, 3}),
                                                   VectorView<const std::int32_t>(ok.data(), {2})),
                  NumericError);
}
