// AnyMoeLayer (layer/any_layer.hpp): the type-erased layer of the one runtime switch gives bit for bit
// what the layer type it stands for gives (forward, backward, gradients, routing views, bias state),
// and refuses the expert-bias calls on a layer without router::BiasBalanced.
#include <doctest/doctest.h>

#include <cstdint>
#include <moekit/layer/any_layer.hpp>
#include <moekit/moe_layer.hpp>
#include <random>
#include <stdexcept>
#include <vector>

#include "../common/random.hpp"

using namespace moekit;

namespace {

using moekit_test::random_vec;

// Forward and backward of `any` and of `direct` (the same type, the same seed) on the same data.
template <class Direct>
void check_same(AnyMoeLayer<backend::Host<float>>& any, Direct& direct) {
  const MoeConfig& c = any.config();
  const std::int64_t T = 9, d = c.d_model, n = c.num_experts();
  any.init_params(5), direct.init_params(5);
  const auto x = random_vec(std::size_t(T * d), 1), dy = random_vec(std::size_t(T * d), 2);
  std::vector<float> y1(x.size()), y2(x.size()), dx1(x.size()), dx2(x.size());
  const AuxLosses a1 = any.forward(MatrixView<const float>(x.data(), {T, d}), MatrixView<float>(y1.data(), {T, d}));
  const AuxLosses a2 = direct.forward(MatrixView<const float>(x.data(), {T, d}), MatrixView<float>(y2.data(), {T, d}));
  CHECK(y1 == y2);
  CHECK(a1.lbl == a2.lbl);
  CHECK(a1.zloss == a2.zloss);
  const ForwardViews<float> v = any.views();
  CHECK_FALSE(v.on_device);
  CHECK(std::vector<float>(v.logits, v.logits + T * n) == std::vector<float>(direct.logits().data, direct.logits().data + T * n));
  CHECK(std::vector<int>(v.topk_indices, v.topk_indices + T * c.top_k) ==
        std::vector<int>(direct.topk_indices().data, direct.topk_indices().data + T * c.top_k));
  CHECK(any.routed_counts() == direct.routed_counts());
  CHECK(any.ffn_rows() == direct.ffn_rows());
  CHECK(any.gemm_stats().strategy == "cblas");
  CHECK(any.gemm_stats().fallbacks == 0);
  any.backward(MatrixView<const float>(dy.data(), {T, d}), MatrixView<float>(dx1.data(), {T, d}));
  direct.backward(MatrixView<const float>(dy.data(), {T, d}), MatrixView<float>(dx2.data(), {T, d}));
  CHECK(dx1 == dx2);
  const auto g1 = any.parameters(), g2 = direct.parameters();
  REQUIRE(g1.size() == g2.size());
  for (std::size_t i = 0; i < g1.size(); ++i) {
    CHECK(g1[i].name == g2[i].name);
    CHECK(std::vector<float>(g1[i].grad, g1[i].grad + g1[i].numel()) == std::vector<float>(g2[i].grad, g2[i].grad + g2[i].numel()));
  }
}

}  // namespace

TEST_CASE("make_moe_layer: the erased layer equals the layer type the config selects") {
  MoeConfig c;
  c.d_model = 8, c.d_expert = 6, c.num_ffn_experts = 4, c.top_k = 2, c.lbl_coef = 0.01, c.zloss_coef = 0.001;
  SUBCASE("softmax, SwiGLU") {
    auto any = make_moe_layer<backend::Host<float>, balance::MicroBatch, BiasVariants::kUnbiased>(c);
    MoeLayer<backend::Host<float>, router::TopK<router::Softmax>, experts::Ffn<act::SwiGLU>> direct(c);
    CHECK_FALSE(any->biased());
    CHECK_FALSE(any->distributed());
    check_same(*any, direct);
    CHECK_THROWS_AS(any->expert_bias(), std::logic_error);
    CHECK_THROWS_AS(any->expert_bias_update(), std::logic_error);
  }
  SUBCASE("sigmoid, gating residual, GeLU, MoE++ experts") {
    c.router = RouterKind::kSigmoid, c.gating_residual = true, c.activation = Activation::kGeLU;
    c.num_zero_experts = 1, c.num_copy_experts = 1, c.num_constant_experts = 1;
    auto any = make_moe_layer<backend::Host<float>, balance::MicroBatch, BiasVariants::kUnbiased>(c);
    MoeLayer<backend::Host<float>, router::GatingResidual<router::TopK<router::Sigmoid>>,
             experts::Set<experts::Ffn<act::GeLU>, experts::Zero, experts::Copy, experts::Constant>>
        direct(c);
    check_same(*any, direct);
  }
}

TEST_CASE("erase<Layer>: a program's own layer type behind the interface, with its bias state") {
  MoeConfig c;
  c.d_model = 8, c.d_expert = 6, c.num_ffn_experts = 4, c.top_k = 2, c.expert_bias = true, c.bias_update_rate = 0.5;
  using Biased = MoeLayer<backend::Host<float>, router::BiasBalanced<router::TopK<router::Softmax>>, experts::Ffn<act::SwiGLU>>;
  auto any = erase<Biased>(c);
  Biased direct(c);
  CHECK(any->biased());
  const std::vector<float> b = {0.5f, -0.5f, 0.f, 1.f};
  any->set_expert_bias(b), direct.set_expert_bias(b);
  check_same(*any, direct);
  CHECK(any->expert_bias_update() == direct.expert_bias_update());
  any->end_step(), direct.end_step();
  const auto b1 = any->expert_bias(), b2 = direct.expert_bias();
  CHECK(std::vector<float>(b1.begin(), b1.end()) == std::vector<float>(b2.begin(), b2.end()));
  CHECK(std::vector<float>(b1.begin(), b1.end()) != b);  // the hook ran
  // A wrong config is the layer's error, through the switch as well.
  MoeConfig bad = c;
  bad.top_k = 9;
  CHECK_THROWS_AS(make_moe_layer<backend::Host<float>>(bad), ConfigError);
}
