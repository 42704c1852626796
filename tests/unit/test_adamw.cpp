// AdamW against the textbook formula written out in the test, hand-worked steps, gradient clipping
// and the warmup + cosine schedule.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <moekit/train/adamw.hpp>
#include <string>
#include <vector>

using namespace moekit;

namespace {

// torch.optim.AdamW's documented algorithm, written independently of the code under test:
//   p <- p (1 - lr wd);  m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2
//   mhat = m / (1 - b1^t);  vhat = v / (1 - b2^t);  p <- p - lr mhat / (sqrt(vhat) + eps)
struct ReferenceAdamW {
  double b1, b2, eps, wd;
  std::vector<double> m, v;
  int t = 0;
  void step(std::vector<double>& p, const std::vector<double>& g, double lr) {
    if (m.empty()) m.assign(p.size(), 0.0), v.assign(p.size(), 0.0);
    ++t;
    for (std::size_t i = 0; i < p.size(); ++i) {
      p[i] *= 1.0 - lr * wd;
      m[i] = b1 * m[i] + (1 - b1) * g[i];
      v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i];
      const double mhat = m[i] / (1 - std::pow(b1, t)), vhat = v[i] / (1 - std::pow(b2, t));
      p[i] -= lr * mhat / (std::sqrt(vhat) + eps);
    }
  }
};

}  // namespace

TEST_CASE("AdamW: one parameter, two steps worked by hand") {
  // lr 0.1, wd 0.1, betas (0.9, 0.999), eps 0, p0 = 1.
  // Step 1, g = 0.5:  p = 0.99; m = 0.05, v = 0.00025; mhat = 0.5, vhat = 0.25; p = 0.99 - 0.1 = 0.89
  // Step 2, g = -1:   p = 0.8811; m = -0.055, v = 0.00124975; mhat = -0.055/0.19, vhat = 0.00124975/0.001999
  //                   p = 0.8811 + 0.1 * 0.2894737 / 0.7906881 = 0.9177103527
  double p = 1.0, g = 0.5;
  train::AdamWConfig cfg;
  cfg.lr = 0.1;
  cfg.weight_decay = 0.1;
  cfg.eps = 0.0;
  train::AdamW<double> opt({{"p", &p, &g, {1}}}, cfg);
  opt.step();
  CHECK(p == doctest::Approx(0.89).epsilon(1e-12));
  g = -1.0;
  opt.step();
  CHECK(p == doctest::Approx(0.9177103527035841).epsilon(1e-12));
  CHECK(opt.steps_taken() == 2);
}

TEST_CASE("AdamW<float> follows the reference formula over a 3-element vector (two steps, two lrs)") {
  const std::vector<double> p0 = {0.5, -1.25, 2.0};
  const std::vector<std::vector<double>> grads = {{0.1, -0.3, 2.0}, {-0.2, -0.1, 0.5}};
  const double lrs[2] = {1e-2, 5e-3};

  ReferenceAdamW ref{0.9, 0.95, 1e-8, 0.1, {}, {}};
  std::vector<double> expect = p0;
  for (int s = 0; s < 2; ++s) ref.step(expect, grads[s], lrs[s]);

  std::vector<float> p(p0.begin(), p0.end()), g(3);
  train::AdamWConfig cfg;
  cfg.beta1 = 0.9;
  cfg.beta2 = 0.95;
  cfg.eps = 1e-8;
  cfg.weight_decay = 0.1;
  train::AdamW<float> opt({{"w", p.data(), g.data(), {3}}}, cfg);
  for (int s = 0; s < 2; ++s) {
    for (int i = 0; i < 3; ++i) g[i] = float(grads[s][i]);
    opt.step(lrs[s]);
  }
  // fp32 arithmetic: relative 1e-6 of the parameter (the updates are ~1e-2, so this checks them to ~1e-4).
  for (int i = 0; i < 3; ++i) {
    INFO("element " << i);
    CHECK(double(p[i]) == doctest::Approx(expect[i]).epsilon(1e-6));
    // The moments are the reference's too.
    CHECK(double(opt.exp_avg(0)[i]) == doctest::Approx(ref.m[i]).epsilon(1e-6));
    CHECK(double(opt.exp_avg_sq(0)[i]) == doctest::Approx(ref.v[i]).epsilon(1e-6));
  }
  // The update itself, not just the parameter, must agree (p - p0 is ~1e-2).
  for (int i = 0; i < 3; ++i) CHECK(double(p[i]) - p0[i] == doctest::Approx(expect[i] - p0[i]).epsilon(1e-4));
}

TEST_CASE("AdamW<double> matches the reference over many steps and several parameters") {
  std::vector<double> a = {0.3, -0.7}, b = {1.0, 2.0, -3.0, 0.25}, ga(2), gb(4);
  std::vector<double> ea = a, eb = b;
  ReferenceAdamW ra{0.9, 0.999, 1e-8, 0.01, {}, {}}, rb = ra;
  train::AdamWConfig cfg;  // torch defaults: betas (0.9, 0.999), eps 1e-8, wd 1e-2
  train::AdamW<double> opt({{"a", a.data(), ga.data(), {2}}, {"b", b.data(), gb.data(), {2, 2}}}, cfg);
  for (int s = 0; s < 20; ++s) {
    for (int i = 0; i < 2; ++i) ga[i] = std::sin(0.7 * s + i);
    for (int i = 0; i < 4; ++i) gb[i] = std::cos(1.3 * s - i) * (i + 1);
    const double lr = 1e-2 * (1.0 + 0.1 * s);
    ra.step(ea, ga, lr);
    rb.step(eb, gb, lr);
    opt.step(lr);
  }
  for (int i = 0; i < 2; ++i) CHECK(a[i] == doctest::Approx(ea[i]).epsilon(1e-12));
  for (int i = 0; i < 4; ++i) CHECK(b[i] == doctest::Approx(eb[i]).epsilon(1e-12));
}

TEST_CASE("AdamW: the decay rule exempts parameters from weight decay only") {
  // Zero gradients: the Adam step is 0 / (0 + eps) = 0, so only the decay moves p.
  std::vector<float> w = {2.0f, -4.0f}, gw = {0, 0}, bias = {2.0f}, gb = {0};
  train::AdamWConfig cfg;
  cfg.lr = 0.5;
  cfg.weight_decay = 0.2;
  train::AdamW<float> opt({{"w", w.data(), gw.data(), {1, 2}}, {"bias", bias.data(), gb.data(), {1}}}, cfg,
                          [](const Parameter<float>& p) { return p.shape.size() >= 2; });
  opt.step();
  CHECK(w[0] == doctest::Approx(2.0 * 0.9));
  CHECK(w[1] == doctest::Approx(-4.0 * 0.9));
  CHECK(bias[0] == 2.0f);
  CHECK(opt.decays(0));
  CHECK_FALSE(opt.decays(1));
  gw = {1, 1};
  opt.zero_grad();
  CHECK(gw[0] == 0.0f);
}

TEST_CASE("AdamW rejects a bad configuration") {
  float p = 0, g = 0;
  train::AdamWConfig cfg;
  cfg.beta1 = 1.0;
  CHECK_THROWS_AS(train::AdamW<float>({{"p", &p, &g, {1}}}, cfg), ConfigError);
  cfg = {};
  cfg.weight_decay = -1;
  CHECK_THROWS_AS(train::AdamW<float>({{"p", &p, &g, {1}}}, cfg), ConfigError);
  train::AdamW<float> ok({{"p", &p, &g, {1}}});
  CHECK_THROWS_AS(ok.step(std::nan("")), ConfigError);
}

TEST_CASE("clip_grad_norm: global norm over all parameters, scaled only above max_norm") {
  std::vector<float> v1 = {0, 0}, g1 = {3, 4}, v2 = {0}, g2 = {12};  // norm sqrt(9 + 16 + 144) = 13
  std::vector<Parameter<float>> ps = {{"a", v1.data(), g1.data(), {2}}, {"b", v2.data(), g2.data(), {1}}};
  CHECK(train::global_grad_norm(ps) == doctest::Approx(13.0));
  // Below the threshold nothing changes.
  CHECK(train::clip_grad_norm(ps, 20.0) == doctest::Approx(13.0));
  CHECK(g1[0] == 3.0f);
  CHECK(g2[0] == 12.0f);
  // Above it every gradient is multiplied by max_norm / (13 + 1e-6); the pre-clip norm is returned.
  const double coef = 6.5 / (13.0 + 1e-6);
  CHECK(train::clip_grad_norm(ps, 6.5) == doctest::Approx(13.0));
  CHECK(g1[0] == doctest::Approx(3.0 * coef));
  CHECK(g1[1] == doctest::Approx(4.0 * coef));
  CHECK(g2[0] == doctest::Approx(12.0 * coef));
  CHECK(train::global_grad_norm(ps) == doctest::Approx(6.5).epsilon(1e-6));
}

TEST_CASE("clip_grad_norm: large parameters (several blocks) and non-finite gradients") {
  const std::int64_t n = 100000;  // more than one 16384-element block of the parallel sum
  std::vector<double> v(n), g(n, 0.5);
  std::vector<Parameter<double>> ps = {{"big", v.data(), g.data(), {n}}};
  CHECK(train::global_grad_norm(ps) == doctest::Approx(0.5 * std::sqrt(double(n))).epsilon(1e-12));
  g[777] = std::numeric_limits<double>::infinity();
  try {
    train::clip_grad_norm(ps, 1.0);
    FAIL("expected NumericError");
  } catch (const NumericError& e) {
    CHECK(std::string(e.what()).find("big") != std::string::npos);
  }
  CHECK_THROWS_AS(train::clip_grad_norm(ps, 0.0), ConfigError);
}

TEST_CASE("CosineSchedule: linear warmup, cosine decay, then min_lr") {
  train::CosineSchedule s{1.0, 0.1, 10, 110};
  s.validate();
  CHECK(s(0) == doctest::Approx(0.1));   // (0 + 1) / 10
  CHECK(s(4) == doctest::Approx(0.5));   // (4 + 1) / 10
  CHECK(s(9) == doctest::Approx(1.0));   // last warmup step reaches max_lr
  CHECK(s(10) == doctest::Approx(1.0));  // cosine starts at max_lr
  CHECK(s(35) == doctest::Approx(0.1 + 0.9 * 0.5 * (1 + std::cos(M_PI * 0.25))));  // = 0.868198...
  CHECK(s(35) == doctest::Approx(0.8681980515339464));
  CHECK(s(60) == doctest::Approx(0.55));  // half way: the mean of max and min
  CHECK(s(110) == doctest::Approx(0.1));
  CHECK(s(1000) == doctest::Approx(0.1));
  // Monotone non-increasing after warmup.
  for (int i = 10; i < 120; ++i) CHECK(s(i + 1) <= s(i) + 1e-15);
  train::CosineSchedule bad{1.0, 2.0, 0, 10};
  CHECK_THROWS_AS(bad.validate(), ConfigError);
  train::CosineSchedule bad2{1.0, 0.0, 20, 10};
  CHECK_THROWS_AS(bad2.validate(), ConfigError);
}
