// The expert policies of today's open MoE models (docs/design.md §3): GPT-OSS's clamped SwiGLU
// (act::SwiGLUOai) and the FFN experts' biases (experts::FfnOptions::ffn_bias). Each is checked against
// formulas written here: the activation element by element, a whole host layer in double against a
// reference forward from the layer's own routing and against finite differences, the parameter table's
// names, shapes and tp slices, and the options' rules.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <moekit/layer/any_layer.hpp>
#include <moekit/moe_layer.hpp>
#include <random>
#include <string>
#include <vector>

#include "layer_fd.hpp"

using namespace moekit;

namespace {

// sigmoid through tanh: not the code's 1 / (1 + exp(-v)).
double ref_sigmoid(double v) { return 0.5 * (1.0 + std::tanh(0.5 * v)); }
double ref_oai(double gate, double up, double alpha, double limit) {
  gate = std::min(gate, limit);
  up = std::clamp(up, -limit, limit);
  return (up + 1.0) * gate * ref_sigmoid(alpha * gate);
}
double ref_act(Activation a, double h1, double h3, double alpha, double limit) {
  switch (a) {
    case Activation::kSwiGLU: return h1 * ref_sigmoid(h1) * h3;
    case Activation::kGeLU: return 0.5 * h1 * std::erfc(-h1 / std::sqrt(2.0));
    case Activation::kReLU: return std::max(h1, 0.0);
    case Activation::kSwiGLUOai: return ref_oai(h1, h3, alpha, limit);
  }
  return 0;
}

MoeConfig ffn_config(Activation a, bool bias) {
  MoeConfig c;
  c.d_model = 6, c.d_expert = 5, c.num_ffn_experts = 4, c.top_k = 2;
  c.activation = a;
  c.lbl_coef = 0.05, c.zloss_coef = 0.01;
  if (bias) c.options.set("ffn_bias", true);
  return c;
}

// y_t = Σ_j gate_tj (W2 act(W1 x_t + b1, W3 x_t + b3) + b2) over the layer's own routing, from its
// full-size weights; then every gradient by central differences.
template <class Act>
void check_ffn_layer(const MoeConfig& c, double alpha, double limit, unsigned seed) {
  using Layer = MoeLayer<backend::Host<double>, router::TopK<router::Softmax>, experts::Ffn<Act>>;
  Layer layer(c);
  layer.init_params(seed);
  std::mt19937_64 g(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  const std::int64_t tokens = 9, D = c.d_model, F = c.d_expert;
  std::vector<double> x(std::size_t(tokens * D)), dy(x.size()), y(x.size());
  for (auto& v : x) v = nd(g);
  for (auto& v : dy) v = nd(g);
  layer.forward(MatrixView<const double>(x.data(), {tokens, D}), MatrixView<double>(y.data(), {tokens, D}));

  const auto w = layer.weights();
  const bool bias = w.has("b1"), gated = is_gated(c.activation);
  CHECK(bias == option_flag(c, "ffn_bias"));
  CHECK(w.has("b3") == (bias && gated));
  for (std::int64_t t = 0; t < tokens; ++t)
    for (std::int64_t i = 0; i < D; ++i) {
      double want = 0;
      for (std::int64_t j = 0; j < c.top_k; ++j) {
        const std::int64_t e = layer.topk_indices()(t, j);
        double out = bias ? w["b2"][std::size_t(e * D + i)] : 0.0;
        for (std::int64_t f = 0; f < F; ++f) {
          double h1 = bias ? w["b1"][std::size_t(e * F + f)] : 0.0, h3 = bias && gated ? w["b3"][std::size_t(e * F + f)] : 0.0;
          for (std::int64_t m = 0; m < D; ++m) {
            h1 += w["w1"][std::size_t((e * F + f) * D + m)] * x[std::size_t(t * D + m)];
            if (gated) h3 += w["w3"][std::size_t((e * F + f) * D + m)] * x[std::size_t(t * D + m)];
          }
          out += w["w2"][std::size_t((e * D + i) * F + f)] * ref_act(c.activation, h1, h3, alpha, limit);
        }
        want += layer.topk_gates()(t, j) * out;
      }
      CHECK(y[std::size_t(t * D + i)] == doctest::Approx(want).epsilon(1e-12));
    }

  const testing::FdCount fd = testing::check_layer_gradients(layer, x, dy);
  CHECK(fd.checked > 20 * fd.skipped);
  CHECK(fd.checked > 300);
}

}  // namespace

TEST_CASE("act::SwiGLUOai: GPT-OSS's clamped SwiGLU and its derivative, element by element") {
  MoeConfig c;
  c.options.set("swiglu_alpha", 1.5), c.options.set("swiglu_limit", 2.0);
  const act::SwiGLUOai a(c);
  CHECK(a.alpha == 1.5);
  CHECK(a.limit == 2.0);
  const act::SwiGLUOai defaults;  // GPT-OSS's: alpha 1.702, limit 7
  CHECK(defaults.alpha == 1.702);
  CHECK(defaults.limit == 7.0);
  CHECK(act::make_activation<act::SwiGLUOai>(MoeConfig{}).limit == 7.0);
  int clamped_gate = 0, clamped_up = 0;
  for (double gate = -4.05; gate < 4.0; gate += 0.37)
    for (double up = -3.95; up < 4.0; up += 0.41) {
      CAPTURE(gate);
      CAPTURE(up);
      const double want = ref_oai(gate, up, 1.5, 2.0);
      CHECK(a.apply(gate, up) == doctest::Approx(want).epsilon(1e-14));
      CHECK(double(a.apply(float(gate), float(up))) == doctest::Approx(ref_oai(float(gate), float(up), 1.5, 2.0)).epsilon(1e-5));
      double g1 = -1, g3 = -1;
      a.backward(gate, up, 0.7, g1, g3);
      const double eps = 1e-6;
      const double n1 = 0.7 * (ref_oai(gate + eps, up, 1.5, 2.0) - ref_oai(gate - eps, up, 1.5, 2.0)) / (2 * eps);
      const double n3 = 0.7 * (ref_oai(gate, up + eps, 1.5, 2.0) - ref_oai(gate, up - eps, 1.5, 2.0)) / (2 * eps);
      CHECK(std::abs(g1 - n1) <= 1e-8 + 1e-6 * std::abs(n1));
      CHECK(std::abs(g3 - n3) <= 1e-8 + 1e-6 * std::abs(n3));
      if (gate > 2.0) {
        CHECK(g1 == 0.0);
        ++clamped_gate;
      }
      if (std::abs(up) > 2.0) {
        CHECK(g3 == 0.0);
        ++clamped_up;
      }
    }
  CHECK(clamped_gate > 10);  // the grid reaches both clamps
  CHECK(clamped_up > 10);
  // On a bound no gradient passes: torch.clamp's rule with number bounds (torch 2.15: x.clamp(max=7)
  // at x = 7 has gradient 0), which transformers' GPT-OSS experts use. Just inside, the derivative.
  double g1 = -1, g3 = -1;
  a.backward(2.0, 2.0, 1.0, g1, g3);
  CHECK(g1 == 0.0);
  CHECK(g3 == 0.0);
  a.backward(1.0, -2.0, 1.0, g1, g3);
  CHECK(g3 == 0.0);
  a.backward(1.0, 1.0, 1.0, g1, g3);
  const double s = ref_sigmoid(1.5);
  CHECK(g1 == doctest::Approx(2.0 * (s + 1.5 * s * (1 - s))).epsilon(1e-12));
  CHECK(g3 == doctest::Approx(s).epsilon(1e-12));
}

TEST_CASE("ffn_bias and swiglu_oai through a whole host layer: reference forward and finite differences") {
  SUBCASE("GPT-OSS: clamped SwiGLU with biases (a limit the pre-activations cross)") {
    MoeConfig c = ffn_config(Activation::kSwiGLUOai, true);
    c.options.set("swiglu_alpha", 1.3), c.options.set("swiglu_limit", 0.9);
    check_ffn_layer<act::SwiGLUOai>(c, 1.3, 0.9, 3);
  }
  SUBCASE("clamped SwiGLU at GPT-OSS's defaults, without biases") {
    check_ffn_layer<act::SwiGLUOai>(ffn_config(Activation::kSwiGLUOai, false), 1.702, 7.0, 5);
  }
  SUBCASE("SwiGLU with biases") { check_ffn_layer<act::SwiGLU>(ffn_config(Activation::kSwiGLU, true), 0, 0, 7); }
  SUBCASE("GeLU with biases (ungated: b1 and b2 only)") { check_ffn_layer<act::GeLU>(ffn_config(Activation::kGeLU, true), 0, 0, 9); }
  SUBCASE("MoE++ experts beside biased FFN experts") {
    MoeConfig c = ffn_config(Activation::kReLU, true);
    c.num_zero_experts = 1, c.num_copy_experts = 1, c.num_constant_experts = 2;
    using Layer = MoeLayer<backend::Host<double>, router::TopK<router::Softmax>,
                           experts::Set<experts::Ffn<act::ReLU>, experts::Zero, experts::Copy, experts::Constant>>;
    Layer layer(c);
    layer.init_params(11);
    std::mt19937_64 g(11);
    std::normal_distribution<double> nd(0.0, 1.0);
    std::vector<double> x(std::size_t(13 * c.d_model)), dy(x.size());
    for (auto& v : x) v = nd(g);
    for (auto& v : dy) v = nd(g);
    const testing::FdCount fd = testing::check_layer_gradients(layer, x, dy);
    CHECK(fd.checked > 20 * fd.skipped);
    CHECK(fd.checked > 300);
  }
}

TEST_CASE("ffn_bias: the tensors, their names and shapes, and their tp slices") {
  MoeConfig c = ffn_config(Activation::kSwiGLUOai, true);
  c.d_model = 8, c.d_expert = 6, c.tp = 2, c.ep = 2;
  using R = router::TopK<router::Softmax>;
  using E = experts::Ffn<act::SwiGLUOai>;
  // Rank t = 1, e = 1: experts 2 and 3, the second half of their rows (w1, w3, b1, b3) and columns (w2, b2).
  const ParallelGrid grid = ParallelGrid::of(2, 2, 1, 3);
  const ParameterTable t = ParameterTable::of<R, E>(c, grid);
  std::vector<std::string> names;
  for (const auto& s : t.specs()) names.push_back(s.name);
  CHECK(names == std::vector<std::string>{"gate.weight",         "experts.2.w1.weight", "experts.2.w2.weight", "experts.2.w3.weight",
                                          "experts.2.w1.bias",   "experts.2.w3.bias",   "experts.2.w2.bias",   "experts.3.w1.weight",
                                          "experts.3.w2.weight", "experts.3.w3.weight", "experts.3.w1.bias",   "experts.3.w3.bias",
                                          "experts.3.w2.bias"});
  const ParamSpec &b1 = t.find("experts.3.w1.bias"), &b3 = t.find("experts.3.w3.bias"), &b2 = t.find("experts.3.w2.bias");
  CHECK(b1.shape == std::vector<std::int64_t>{6});
  CHECK(b1.local_shape == std::vector<std::int64_t>{3});
  CHECK(b2.shape == std::vector<std::int64_t>{8});
  CHECK(b2.local_shape == std::vector<std::int64_t>{4});
  CHECK(b1.shard == ParamShard::kExpertRows);
  CHECK(b2.shard == ParamShard::kExpertCols);
  // b1 and b3 of one expert lie side by side, as a row of [h1 | h3]: region b13 = [expert][b1 | b3].
  CHECK(b3.offset == b1.offset + 3);
  CHECK(t.region("b13").stride == 6);
  CHECK(t.region("b2").stride == 4);
  CHECK(t.find("experts.2.w1.bias").offset + 6 == b1.offset);
  // pack takes each rank's slice of the full tensors: b2's columns [4, 8), b1's rows [3, 6).
  MoeWeights<double> full = t.full<double>();
  for (auto& f : full.families)
    for (std::size_t i = 0; i < f.values.size(); ++i) f.values[i] = double(i);
  std::vector<double> flat(std::size_t(t.size()));
  t.pack(full, flat.data());
  for (int j = 0; j < 4; ++j) CHECK(flat[std::size_t(b2.offset + j)] == double(3 * 8 + 4 + j));
  for (int j = 0; j < 3; ++j) CHECK(flat[std::size_t(b1.offset + j)] == double(3 * 6 + 3 + j));
  for (int j = 0; j < 3; ++j) CHECK(flat[std::size_t(b3.offset + j)] == double(3 * 6 + 3 + j));
  // b2 splits d_model over tp: a d_model tp does not divide is a ConfigError naming the family.
  c.d_model = 7;
  auto table = [&] { return ParameterTable::of<R, E>(c, grid); };
  CHECK_THROWS_AS(table(), ConfigError);
}

TEST_CASE("expert options: swiglu_alpha, swiglu_limit and ffn_bias by their rules, and only where a policy has them") {
  auto build = [](const MoeConfig& c) -> std::string {
    try {
      make_moe_layer<backend::Host<float>>(c);
    } catch (const ConfigError& e) {
      return e.field();
    }
    return "(none)";
  };
  MoeConfig c = ffn_config(Activation::kSwiGLUOai, true);
  CHECK(build(c) == "(none)");
  c.options.set("swiglu_limit", 0.0);
  CHECK(build(c) == "swiglu_limit");
  c.options.set("swiglu_limit", 7.0), c.options.set("swiglu_alpha", -1.0);
  CHECK(build(c) == "swiglu_alpha");
  c.options.erase("swiglu_alpha"), c.options.set("ffn_bias", 1.0);
  CHECK(build(c) == "ffn_bias");
  MoeConfig s = ffn_config(Activation::kSwiGLU, false);
  s.options.set("swiglu_alpha", 1.702);  // an option of swiglu_oai only
  CHECK(build(s) == "swiglu_alpha");
  // The runtime switch picks GPT-OSS's experts for "swiglu_oai".
  MoeConfig o = ffn_config(Activation::kSwiGLUOai, false);
  const bool oai = with_layer_type<backend::Host<float>>(
      o, []<class L>(std::type_identity<L>) { return std::is_same_v<typename L::experts_type, experts::Ffn<act::SwiGLUOai>>; });
  CHECK(oai);
}
