// LBL, z-loss, capacity and top-k ties, against numbers worked out by hand in the test.
#include <doctest/doctest.h>

#include <cmath>
#include <moekit/moe_layer.hpp>
#include <vector>

using namespace moekit;

namespace {

// Two experts, D = 2, router weight = identity, so the logits are the inputs themselves:
// x = [[1,0],[0,1],[2,0],[0,0]]. Top-1.
struct TinyCase {
  MoeConfig cfg;
  std::vector<double> x{1, 0, 0, 1, 2, 0, 0, 0};
  explicit TinyCase(RouterKind r, double gamma = 0.0) {
    cfg.d_model = 2;
    cfg.d_expert = 3;
    cfg.num_ffn_experts = 2;
    cfg.top_k = 1;
    cfg.router = r;
    cfg.activation = Activation::kReLU;
    cfg.capacity_factor = gamma;
  }
  template <class Layer>
  void setup(Layer& l) const {
    auto w = l.weights();
    w["router"] = {1, 0, 0, 1};
    // Expert e maps x to a positive vector so a dropped token (y = 0) is visible.
    for (auto& v : w["w1"]) v = 0.5;
    for (auto& v : w["w2"]) v = 1.0;
    l.load_weights(w);
  }
};

double softmax2(double a, double b) { return std::exp(a) / (std::exp(a) + std::exp(b)); }
double sig(double a) { return 1.0 / (1.0 + std::exp(-a)); }

using SoftmaxReLU = MoeLayer<backend::Host<double>, router::TopK<router::Softmax>, experts::Ffn<act::ReLU>>;
using SigmoidReLU = MoeLayer<backend::Host<double>, router::TopK<router::Sigmoid>, experts::Ffn<act::ReLU>>;

}  // namespace

TEST_CASE("softmax router: LBL and z-loss of a worked example") {
  TinyCase tc(RouterKind::kSoftmax);
  SoftmaxReLU layer(tc.cfg);
  tc.setup(layer);
  std::vector<double> y(8);
  const AuxLosses aux = layer.forward(MatrixView<const double>(tc.x.data(), {4, 2}), MatrixView<double>(y.data(), {4, 2}));
  // Picks: t0 -> 0, t1 -> 1, t2 -> 0, t3 -> 0 (0.5 vs 0.5: tie goes to the lower index).
  const int expect_idx[4] = {0, 1, 0, 0};
  for (int t = 0; t < 4; ++t) CHECK(layer.topk_indices()(t, 0) == expect_idx[t]);
  // f = [3/4, 1/4]; P_0 = mean of p_t0.
  const double p0 = (softmax2(1, 0) + softmax2(0, 1) + softmax2(2, 0) + 0.5) / 4;
  const double lbl = 2 * (0.75 * p0 + 0.25 * (1 - p0));
  CHECK(aux.lbl == doctest::Approx(lbl).epsilon(1e-12));
  CHECK(aux.lbl == doctest::Approx(1.0951992695).epsilon(1e-9));  // the same, by Python
  const double l01 = std::log(std::exp(1.0) + 1.0), l2 = std::log(std::exp(2.0) + 1.0), l3 = std::log(2.0);
  CHECK(aux.zloss == doctest::Approx((2 * l01 * l01 + l2 * l2 + l3 * l3) / 4).epsilon(1e-12));
  // Not renormalised: gate is the probability itself.
  CHECK(layer.topk_gates()(0, 0) == doctest::Approx(softmax2(1, 0)));
  CHECK(layer.expert_counts()(0) == 3);
  CHECK(layer.expert_counts()(1) == 1);
}

TEST_CASE("sigmoid router: gates normalised over the picks, P uses s / sum(s)") {
  TinyCase tc(RouterKind::kSigmoid);
  SigmoidReLU layer(tc.cfg);
  tc.setup(layer);
  std::vector<double> y(8);
  const AuxLosses aux = layer.forward(MatrixView<const double>(tc.x.data(), {4, 2}), MatrixView<double>(y.data(), {4, 2}));
  for (int t = 0; t < 4; ++t) CHECK(layer.topk_gates()(t, 0) == doctest::Approx(1.0));  // one pick: s/s
  auto q = [](double a, double b) { return sig(a) / (sig(a) + sig(b)); };
  const double p0 = (q(1, 0) + q(0, 1) + q(2, 0) + 0.5) / 4;
  CHECK(aux.lbl == doctest::Approx(2 * (0.75 * p0 + 0.25 * (1 - p0))).epsilon(1e-12));
}

TEST_CASE("LBL is 1 at perfect balance and N_E when everything goes to one expert") {
  // Uniform probabilities and uniform counts: LBL = N * sum (1/N)(1/N) = 1.
  const int n = 4, k = 2, T = 8;
  std::vector<std::int64_t> counts(n, k * T / n);
  std::vector<double> psum(n, double(T) / n);
  CHECK(balance::load_balancing_loss<double>(counts.data(), psum.data(), n, k, T, T) == doctest::Approx(1.0));
  // All slots and all probability on expert 0 (k = 1): LBL = N * 1 * 1.
  std::vector<std::int64_t> c1{T, 0, 0, 0};
  std::vector<double> p1{double(T), 0, 0, 0};
  CHECK(balance::load_balancing_loss<double>(c1.data(), p1.data(), n, 1, T, T) == doctest::Approx(double(n)));
}

TEST_CASE("capacity: C = ceil(gamma k T / N_E), lowest score dropped, dropped slot gives 0") {
  CHECK(balance::expert_capacity(1.25, 2, 5, 3) == 5);   // 12.5 / 3 = 4.17 -> 5
  CHECK(balance::expert_capacity(1.0, 1, 4, 2) == 2);
  CHECK(balance::expert_capacity(2.0, 8, 4096, 64) == 1024);
  CHECK(balance::expert_capacity(0.0, 2, 100, 4) == -1);  // dropless

  TinyCase tc(RouterKind::kSoftmax, /*gamma=*/1.0);  // C = 2; expert 0 gets t0 (.73), t2 (.88), t3 (.5)
  SoftmaxReLU layer(tc.cfg);
  tc.setup(layer);
  std::vector<double> y(8, std::nan(""));
  const AuxLosses aux = layer.forward(MatrixView<const double>(tc.x.data(), {4, 2}), MatrixView<double>(y.data(), {4, 2}));
  CHECK(layer.expert_counts()(0) == 2);
  CHECK(layer.expert_counts()(1) == 1);
  CHECK_FALSE(layer.slot_kept(3, 0));
  CHECK(layer.slot_kept(0, 0));
  CHECK(layer.slot_kept(2, 0));
  CHECK(y[6] == 0.0);
  CHECK(y[7] == 0.0);
  // Token 0: relu(0.5 * 1) summed over 3 hidden units through w2 = 1, times its gate.
  CHECK(y[0] == doctest::Approx(softmax2(1, 0) * 3 * 0.5));
  // The LBL's f_i counts routed slots, before drops (as GShard/Switch do): same as dropless.
  CHECK(aux.lbl == doctest::Approx(2 * (0.75 * (softmax2(1, 0) + softmax2(0, 1) + softmax2(2, 0) + 0.5) / 4 +
                                        0.25 * (1 - (softmax2(1, 0) + softmax2(0, 1) + softmax2(2, 0) + 0.5) / 4))));
}

TEST_CASE("top-k: ties break towards the lower expert index") {
  const float s[6] = {0.5f, 0.7f, 0.5f, 0.7f, 0.1f, 0.7f};
  int idx[4];
  router::topk_descending(s, 6, 4, idx);
  CHECK(idx[0] == 1);
  CHECK(idx[1] == 3);
  CHECK(idx[2] == 5);
  CHECK(idx[3] == 0);
  const float nan_first[3] = {std::nanf(""), 0.2f, 0.1f};
  router::topk_descending(nan_first, 3, 2, idx);
  CHECK(idx[0] == 1);
  CHECK(idx[1] == 2);

  // Through a layer: zero router weights make every logit equal, so top-3 of 5 is {0, 1, 2}.
  MoeConfig c;
  c.d_model = 4;
  c.d_expert = 4;
  c.num_ffn_experts = 5;
  c.top_k = 3;
  for (RouterKind r : {RouterKind::kSoftmax, RouterKind::kSigmoid}) {
    c.router = r;
    with_layer_type<backend::Host<float>>(c, [&]<class L>(std::type_identity<L>) {
      L layer(c);
      layer.init_params(3);
      auto w = layer.weights();
      std::fill(w["router"].begin(), w["router"].end(), 0.0f);
      layer.load_weights(w);
      std::vector<float> x(7 * 4, 1.0f), y(7 * 4);
      layer.forward(MatrixView<const float>(x.data(), {7, 4}), MatrixView<float>(y.data(), {7, 4}));
      for (int t = 0; t < 7; ++t)
        for (int j = 0; j < 3; ++j) CHECK(layer.topk_indices()(t, j) == j);
    });
  }
}

TEST_CASE("backward accumulates gradients and aux_scale scales only the aux terms") {
  MoeConfig c;
  c.d_model = 4;
  c.d_expert = 6;
  c.num_ffn_experts = 3;
  c.top_k = 2;
  c.lbl_coef = 0.5;
  c.zloss_coef = 0.1;
  using L = MoeLayer<backend::Host<double>, router::TopK<router::Softmax>, experts::Ffn<act::SwiGLU>>;
  L layer(c);
  layer.init_params(11);
  std::vector<double> x(5 * 4), y(20), dy(20, 0.0), dx(20);
  SplitMix64 rng(5);
  for (auto& v : x) v = rng.uniform(-1, 1);
  MatrixView<const double> xv(x.data(), {5, 4}), dyv(dy.data(), {5, 4});
  MatrixView<double> yv(y.data(), {5, 4}), dxv(dx.data(), {5, 4});
  // dy = 0: only the aux losses give router gradients, linear in aux_scale.
  layer.forward(xv, yv);
  layer.zero_grad();
  layer.backward(dyv, dxv, 1.0);
  const std::vector<double> g1 = layer.gradients()["router"];
  layer.zero_grad();
  layer.backward(dyv, dxv, 0.25);
  for (size_t i = 0; i < g1.size(); ++i) CHECK(layer.gradients()["router"][i] == doctest::Approx(0.25 * g1[i]));
  layer.backward(dyv, dxv, 0.75);  // accumulates: 0.25 + 0.75
  for (size_t i = 0; i < g1.size(); ++i) CHECK(layer.gradients()["router"][i] == doctest::Approx(g1[i]));
  bool any = false;
  for (double v : g1) any = any || v != 0.0;
  CHECK(any);
  for (double v : layer.gradients()["w1"]) CHECK(v == 0.0);  // dy = 0: no expert gradient
}

TEST_CASE("zero tokens: forward and backward are no-ops with zero losses") {
  MoeConfig c;
  c.d_model = 4;
  c.d_expert = 4;
  c.num_ffn_experts = 2;
  c.top_k = 1;
  MoeLayer<backend::Host<float>, router::TopK<router::Softmax>, experts::Ffn<act::SwiGLU>> layer(c);
  layer.init_params(1);
  std::vector<float> none;
  const AuxLosses a = layer.forward(MatrixView<const float>(none.data(), {0, 4}), MatrixView<float>(none.data(), {0, 4}));
  CHECK(a.lbl == 0.0);
  CHECK(a.zloss == 0.0);
  layer.backward(MatrixView<const float>(none.data(), {0, 4}), MatrixView<float>(none.data(), {0, 4}));
  for (float v : layer.gradients()["router"]) CHECK(v == 0.0f);
}
