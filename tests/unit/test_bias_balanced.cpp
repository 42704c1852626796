// router::BiasBalanced (DeepSeek-V3's aux-loss-free balancing): the update rule worked by hand, the
// per-step hook, and a skewed layer brought into balance by the bias updates alone (lbl 0). The forward
// against an independent reference and the gradients against finite differences are in
// test_moe_layer.cpp (the biased routers are in its layer lists), moekit-layer's in test_harness.cpp.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <moekit/moe_layer.hpp>
#include <vector>

using namespace moekit;

TEST_CASE("bias update: u · sign(mean − c_i), sign(0) = 0") {
  // counts 5, 1, 3, 3: mean 3 -> the first loses u, the second gains u, the others stay.
  const auto d = router::bias_update({5, 1, 3, 3}, 0.25);
  REQUIRE(d.size() == 4);
  CHECK(d[0] == -0.25);
  CHECK(d[1] == 0.25);
  CHECK(d[2] == 0.0);
  CHECK(d[3] == 0.0);
  // A mean that is not an integer: counts 2, 1, 1 (mean 4/3): 2 is above, the 1s below.
  const auto e = router::bias_update({2, 1, 1}, 1.0);
  CHECK(e == std::vector<double>{-1.0, 1.0, 1.0});
  CHECK(router::bias_update({0, 0}, 1.0) == std::vector<double>{0.0, 0.0});
}

namespace {
using Biased = MoeLayer<backend::Host<float>, router::BiasBalanced<router::TopK<router::Softmax>>, experts::Ffn<act::SwiGLU>,
                        balance::GlobalBatch>;

MoeConfig skewed_config(double rate) {
  MoeConfig c;
  c.d_model = 8, c.d_expert = 4, c.num_ffn_experts = 16, c.top_k = 2;
  c.expert_bias = true, c.bias_update_rate = rate, c.lbl_coef = 0.0;
  return c;
}
// Router weights that send about half of the slots to two of the sixteen experts (an eighth): every token
// has x[0] = 1, and those experts' first weight is large.
template <class Layer>
std::vector<float> skew(Layer& layer, std::int64_t tokens) {
  auto w = layer.weights();
  const std::int64_t d = layer.config().d_model;
  for (std::int64_t e = 0; e < 2; ++e) w["router"][e * d] = 0.5f;
  layer.load_weights(w);
  SplitMix64 rng(5);
  std::vector<float> x(tokens * d);
  for (auto& v : x) v = float(rng.uniform(-1, 1));
  for (std::int64_t t = 0; t < tokens; ++t) x[t * d] = 1.0f;
  return x;
}
// max_i |c_i − mean| / mean of the routed counts, and the two hot experts' share.
struct Load {
  double worst, hot_share;
};
Load load_of(const std::vector<std::int64_t>& c) {
  double total = 0, worst = 0;
  for (auto v : c) total += double(v);
  const double mean = total / double(c.size());
  for (auto v : c) worst = std::max(worst, std::abs(double(v) - mean) / mean);
  return {worst, double(c[0] + c[1]) / total};
}
}  // namespace

TEST_CASE("bias balancing: end_step applies the step's training counts, evaluation forwards do not count") {
  MoeConfig c = skewed_config(0.5);
  Biased layer(c);
  layer.init_params(1);
  const std::int64_t T = 32;
  std::vector<float> x = skew(layer, T), y(x.size());
  const MatrixView<const float> xv(x.data(), {T, c.d_model});
  const MatrixView<float> yv(y.data(), {T, c.d_model});
  layer.forward(xv, yv);
  const std::vector<std::int64_t> first = layer.routed_counts();
  layer.forward(xv, yv);  // a second micro-batch of the step
  layer.set_training(false);
  layer.forward(xv, yv);  // evaluation: not counted
  layer.set_training(true);
  std::vector<std::int64_t> want(first.size());
  for (std::size_t i = 0; i < want.size(); ++i) want[i] = 2 * first[i];
  CHECK(layer.step_counts() == want);
  CHECK(layer.balance().tokens() == 2 * T);  // the GlobalBatch buffer holds both training micro-batches
  const std::vector<float> upd = layer.expert_bias_update();
  layer.end_step();
  const auto delta = router::bias_update(want, 0.5);
  for (std::size_t i = 0; i < delta.size(); ++i) {
    CHECK(layer.expert_bias()[i] == float(delta[i]));
    CHECK(upd[i] == float(delta[i]));
  }
  CHECK(layer.expert_bias()[0] < 0.0f);  // the hot expert lost bias
  for (auto v : layer.step_counts()) CHECK(v == 0);
  CHECK(layer.balance().tokens() == 0);  // and end_step reset the buffer
}

// 300 updates of u = 5e-4 on one batch of 512 tokens (sign updates of every bias at once oscillate by
// about u; the load settled within 10 % here, the bound is 20 %).
TEST_CASE("bias balancing: a skewed layer reaches every expert within 20 % of the mean load without an aux loss") {
  const std::int64_t T = 512;
  for (bool update : {false, true}) {
    CAPTURE(update);
    MoeConfig c = skewed_config(5e-4);
    Biased layer(c);
    layer.init_params(2);
    std::vector<float> x = skew(layer, T), y(x.size());
    const MatrixView<const float> xv(x.data(), {T, c.d_model});
    const MatrixView<float> yv(y.data(), {T, c.d_model});
    layer.forward(xv, yv);
    const Load before = load_of(layer.routed_counts());
    CHECK(before.hot_share > 0.4);  // about half of the slots on an eighth of the experts
    for (int step = 0; step < 300; ++step) {
      layer.forward(xv, yv);
      if (update) layer.end_step();
    }
    layer.forward(xv, yv);
    const Load after = load_of(layer.routed_counts());
    if (update) {
      CHECK(after.worst <= 0.2);
      CHECK(after.hot_share < 0.2);
    } else {
      CHECK(after.worst > 0.2);  // without the updates nothing moves
      CHECK(after.hot_share == doctest::Approx(before.hot_share));
    }
  }
}

TEST_CASE("bias balancing: a config with expert_bias needs the BiasBalanced policy, and the reverse") {
  MoeConfig c = skewed_config(1e-3);
  using Plain = MoeLayer<backend::Host<float>, router::TopK<router::Softmax>, experts::Ffn<act::SwiGLU>>;
  CHECK_THROWS_WITH_AS(Plain{c}, doctest::Contains("expert_bias"), ConfigError);
  c.expert_bias = false;
  CHECK_THROWS_WITH_AS(Biased{c}, doctest::Contains("expert_bias"), ConfigError);
  c.expert_bias = true, c.bias_update_rate = -1;
  CHECK_THROWS_WITH_AS(Biased{c}, doctest::Contains("bias_update_rate"), ConfigError);
  c.bias_update_rate = 1e-3;
  Biased ok(c);
  std::vector<float> wrong(3);
  CHECK_THROWS_AS(ok.set_expert_bias(wrong), ShapeError);
}

TEST_CASE("with_layer_type picks router::BiasBalanced for expert_bias, and a half switch refuses the other half") {
  MoeConfig c = skewed_config(1e-3);
  bool biased = false;
  with_layer_type<backend::Host<float>>(c, [&]<class L>(std::type_identity<L>) {
    biased = router::router_traits<typename L::router_type>::selection_bias;
  });
  CHECK(biased);
  c.gating_residual = true;
  with_layer_type<backend::Host<float>>(c, [&]<class L>(std::type_identity<L>) {
    biased = router::router_traits<typename L::router_type>::selection_bias &&
             router::router_traits<typename L::router_type>::reads_prev_logits;
  });
  CHECK(biased);
  auto unbiased_only = [](const MoeConfig& cfg) {
    return with_layer_type<backend::Host<float>, balance::MicroBatch, BiasVariants::kUnbiased>(
        cfg, []<class L>(std::type_identity<L>) { return router::router_traits<typename L::router_type>::selection_bias; });
  };
  CHECK_THROWS_AS(unbiased_only(c), std::logic_error);
  c.expert_bias = false;
  CHECK(unbiased_only(c) == false);
}
