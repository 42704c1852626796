// Expert-choice routing (router/expert_choice.hpp, docs/design.md §2; Zhou et al., arXiv 2202.09368):
// S = softmax over the experts of the logits; expert e takes the C_e tokens with the largest S[t, e]
// (ties to the lower token), y_t = Σ over the experts that took t of c · S[t, e] · E_e(x_t). Checked
// against a reference written here (its own softmax, sort and FFN loops over the full-size tensors),
// finite differences in double on every input and parameter, the ties, the counts, and the rules.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <moekit/moe_layer.hpp>
#include <numeric>
#include <string>
#include <vector>

#include "layer_fd.hpp"

using namespace moekit;

namespace {

using testing::normal_vector;

MoeConfig ec_config(double capacity_factor) {
  MoeConfig c;
  c.d_model = 6, c.d_expert = 5, c.num_ffn_experts = 4, c.top_k = 2;
  c.capacity_factor = capacity_factor, c.zloss_coef = 0.01;
  c.options.set("routing", std::string("expert_choice"));
  return c;
}

double ref_silu(double v) { return v / (1.0 + std::exp(-v)); }
double ref_gelu(double v) { return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0))); }

// y of the reference: logits x W_r^T (+ b), softmax, each expert's C_e best tokens by a stable sort,
// the experts by loops (FFN with optional biases; zero, copy and constant experts of MoE++).
std::vector<double> reference_y(const MoeConfig& c, const MoeWeights<double>& w, const std::vector<double>& x, std::int64_t tokens,
                                double scale, std::int64_t cap_ffn, std::int64_t cap_zc, std::vector<int>* taken_count) {
  const std::int64_t D = c.d_model, F = c.d_expert, N = c.num_experts(), NF = c.num_ffn_experts;
  std::vector<double> p(std::size_t(tokens * N));
  for (std::int64_t t = 0; t < tokens; ++t) {
    double m = -1e300;
    for (std::int64_t e = 0; e < N; ++e) {
      double l = w.has("router_bias") ? w["router_bias"][std::size_t(e)] : 0.0;
      for (std::int64_t i = 0; i < D; ++i) l += w["router"][std::size_t(e * D + i)] * x[std::size_t(t * D + i)];
      p[std::size_t(t * N + e)] = l;
      m = std::max(m, l);
    }
    double z = 0;
    for (std::int64_t e = 0; e < N; ++e) z += std::exp(p[std::size_t(t * N + e)] - m);
    for (std::int64_t e = 0; e < N; ++e) p[std::size_t(t * N + e)] = std::exp(p[std::size_t(t * N + e)] - m) / z;
  }
  std::vector<double> y(x.size(), 0.0);
  taken_count->assign(std::size_t(tokens), 0);
  for (std::int64_t e = 0; e < N; ++e) {
    std::vector<std::int64_t> order(static_cast<std::size_t>(tokens));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) { return p[std::size_t(a * N + e)] > p[std::size_t(b * N + e)]; });
    const std::int64_t cap = e < NF ? cap_ffn : cap_zc;
    for (std::int64_t r = 0; r < cap; ++r) {
      const std::int64_t t = order[std::size_t(r)];
      ++(*taken_count)[std::size_t(t)];
      const double g = scale * p[std::size_t(t * N + e)];
      const double* xt = &x[std::size_t(t * D)];
      std::vector<double> out(std::size_t(D), 0.0);
      if (e < NF) {
        std::vector<double> a(static_cast<std::size_t>(F));
        for (std::int64_t f = 0; f < F; ++f) {
          double h1 = w.has("b1") ? w["b1"][std::size_t(e * F + f)] : 0.0, h3 = w.has("b3") ? w["b3"][std::size_t(e * F + f)] : 0.0;
          for (std::int64_t i = 0; i < D; ++i) {
            h1 += w["w1"][std::size_t((e * F + f) * D + i)] * xt[i];
            if (w.has("w3")) h3 += w["w3"][std::size_t((e * F + f) * D + i)] * xt[i];
          }
          a[std::size_t(f)] = c.activation == Activation::kGeLU ? ref_gelu(h1) : ref_silu(h1) * h3;
        }
        for (std::int64_t i = 0; i < D; ++i) {
          double s = w.has("b2") ? w["b2"][std::size_t(e * D + i)] : 0.0;
          for (std::int64_t f = 0; f < F; ++f) s += w["w2"][std::size_t((e * D + i) * F + f)] * a[std::size_t(f)];
          out[std::size_t(i)] = s;
        }
      } else if (e < NF + c.num_zero_experts) {  // zero: nothing
      } else if (e < NF + c.num_zero_experts + c.num_copy_experts) {
        for (std::int64_t i = 0; i < D; ++i) out[std::size_t(i)] = xt[i];
      } else {  // constant: a1 x + a2 v, [a1, a2] = softmax(W_c x)
        const std::int64_t q = e - NF - c.num_zero_experts - c.num_copy_experts;
        double z1 = 0, z2 = 0;
        for (std::int64_t i = 0; i < D; ++i) {
          z1 += w["const_wc"][std::size_t(q * 2 * D + i)] * xt[i];
          z2 += w["const_wc"][std::size_t(q * 2 * D + D + i)] * xt[i];
        }
        const double a1 = 1.0 / (1.0 + std::exp(z2 - z1)), a2 = 1.0 - a1;
        for (std::int64_t i = 0; i < D; ++i) out[std::size_t(i)] = a1 * xt[i] + a2 * w["const_v"][std::size_t(q * D + i)];
      }
      for (std::int64_t i = 0; i < D; ++i) y[std::size_t(t * D + i)] += g * out[std::size_t(i)];
    }
  }
  return y;
}

template <class Layer>
void check_expert_choice_layer(const MoeConfig& c, double scale, std::int64_t cap_ffn, std::int64_t cap_zc, unsigned seed) {
  Layer layer(c);
  layer.init_params(seed);
  REQUIRE(layer.routing() == Routing::kExpertChoice);
  const std::int64_t tokens = 11, D = c.d_model, N = c.num_experts();
  std::vector<double> x = normal_vector(std::size_t(tokens * D), seed + 1), dy = normal_vector(x.size(), seed + 2), y(x.size());
  const AuxLosses aux = layer.forward(MatrixView<const double>(x.data(), {tokens, D}), MatrixView<double>(y.data(), {tokens, D}));
  std::vector<int> taken;
  const std::vector<double> yr = reference_y(c, layer.weights(), x, tokens, scale, cap_ffn, cap_zc, &taken);
  for (std::size_t i = 0; i < y.size(); ++i) CHECK(y[i] == doctest::Approx(yr[i]).epsilon(1e-12));
  // Every expert took exactly its capacity; the plan is by token, in expert order.
  for (std::int64_t e = 0; e < N; ++e) {
    const std::int64_t cap = e < c.num_ffn_experts ? cap_ffn : cap_zc;
    CHECK(layer.expert_counts().data[e] == cap);
    CHECK(layer.routed_counts()[std::size_t(e)] == cap);
  }
  const auto plan = layer.routing_plan();
  CHECK(plan.layout.per_token == 0);
  for (std::int64_t t = 0; t < tokens; ++t) {
    CHECK(plan.layout.end(int(t)) - plan.layout.begin(int(t)) == taken[std::size_t(t)]);
    for (int s = plan.layout.begin(int(t)); s + 1 < plan.layout.end(int(t)); ++s) CHECK(plan.expert[s] < plan.expert[s + 1]);
  }
  CHECK(layer.topk_indices().data == nullptr);  // [T, k] means nothing here
  CHECK(std::isfinite(aux.zloss));
  CHECK(aux.zloss > 0);

  const testing::FdCount fd = testing::check_layer_gradients(layer, x, dy);
  CHECK(fd.checked > 10 * fd.skipped);
  CHECK(fd.checked > 300);
}

}  // namespace

TEST_CASE("expert choice through a whole host layer: reference forward and finite differences") {
  SUBCASE("softmax router, SwiGLU experts, capacity factor 1: C = ceil(k T / N_E)") {
    using Layer = MoeLayer<backend::Host<double>, router::TopK<router::Softmax>, experts::Ffn<act::SwiGLU>>;
    check_expert_choice_layer<Layer>(ec_config(1.0), 1.0, 6, 6, 3);  // ceil(2 · 11 / 4) = 6
  }
  SUBCASE("capacity factor 1.5, a routed scaling factor, the router bias and the FFN biases") {
    MoeConfig c = ec_config(1.5);
    c.options.set("routed_scaling_factor", 1.7);
    c.options.set("router_bias", true);
    c.options.set("ffn_bias", true);
    using Layer = MoeLayer<backend::Host<double>, router::LinearBias<router::TopK<router::Softmax>>, experts::Ffn<act::SwiGLU>>;
    check_expert_choice_layer<Layer>(c, 1.7, 9, 9, 5);  // ceil(1.5 · 2 · 11 / 4) = 9
  }
  SUBCASE("a capacity over T takes every token") {
    using Layer = MoeLayer<backend::Host<double>, router::TopK<router::Softmax>, experts::Ffn<act::SwiGLU>>;
    check_expert_choice_layer<Layer>(ec_config(3.0), 1.0, 11, 11, 7);  // ceil(3 · 2 · 11 / 4) = 17 > 11
  }
  SUBCASE("MoE++'s zero-computation experts take their τ-weighted capacity; GeLU FFN experts") {
    MoeConfig c = ec_config(1.0);
    c.activation = Activation::kGeLU;
    c.num_zero_experts = 1, c.num_copy_experts = 1, c.num_constant_experts = 1, c.tau = 0.5;
    using Layer = MoeLayer<backend::Host<double>, router::TopK<router::Softmax>,
                           experts::Set<experts::Ffn<act::GeLU>, experts::Zero, experts::Copy, experts::Constant>>;
    // C_FFN = ceil(τ k T / (τ N_FFN + N_ZC)) = ceil(11 / 5) = 3, C_ZC = ceil(22 / 5) = 5.
    check_expert_choice_layer<Layer>(c, 1.0, 3, 5, 9);
  }
}

TEST_CASE("expert choice: ties go to the lower token, and float agrees with double") {
  MoeConfig c = ec_config(1.0);
  using Layer = MoeLayer<backend::Host<double>, router::TopK<router::Softmax>, experts::Ffn<act::SwiGLU>>;
  Layer layer(c);
  layer.init_params(1);
  auto w = layer.weights();
  std::fill(w["router"].begin(), w["router"].end(), 0.0);  // every score 1/N_E: all tied
  layer.load_weights(w);
  const std::int64_t tokens = 10, D = c.d_model;  // C = ceil(2 · 10 / 4) = 5
  std::vector<double> x = normal_vector(std::size_t(tokens * D), 2), y(x.size());
  layer.forward(MatrixView<const double>(x.data(), {tokens, D}), MatrixView<double>(y.data(), {tokens, D}));
  const auto plan = layer.routing_plan();
  for (std::int64_t t = 0; t < tokens; ++t) {
    INFO("token " << t);
    CHECK(plan.layout.end(int(t)) - plan.layout.begin(int(t)) == (t < 5 ? 4 : 0));  // tokens 0..4, every expert
    for (int s = plan.layout.begin(int(t)); s < plan.layout.end(int(t)); ++s) CHECK(plan.gate[s] == doctest::Approx(0.25));
  }
  for (std::int64_t i = 5 * D; i < tokens * D; ++i) CHECK(y[std::size_t(i)] == 0.0);  // no expert took them

  using FloatLayer = MoeLayer<backend::Host<float>, router::TopK<router::Softmax>, experts::Ffn<act::SwiGLU>>;
  Layer d(c);
  FloatLayer f(c);
  d.init_params(4), f.init_params(4);
  const std::int64_t T = 32;
  std::vector<double> xd = normal_vector(std::size_t(T * D), 6), yd(xd.size());
  std::vector<float> xf(xd.begin(), xd.end()), yf(xf.size());
  d.forward(MatrixView<const double>(xd.data(), {T, D}), MatrixView<double>(yd.data(), {T, D}));
  f.forward(MatrixView<const float>(xf.data(), {T, D}), MatrixView<float>(yf.data(), {T, D}));
  const auto pd = d.routing_plan();
  const auto pf = f.routing_plan();
  REQUIRE(pd.layout.slots == pf.layout.slots);
  CHECK(pd.layout.slots == 4 * 16);
  int same = 0;
  for (int s = 0; s < pd.layout.slots; ++s) same += pd.layout.token(s) == pf.layout.token(s) && pd.expert[s] == pf.expert[s];
  CHECK(same == pd.layout.slots);  // no near-ties at this seed
  for (std::size_t i = 0; i < yd.size(); ++i) CHECK(double(yf[i]) == doctest::Approx(yd[i]).epsilon(1e-4));
}

TEST_CASE("expert choice: its rules") {
  using Softmax = MoeLayer<backend::Host<double>, router::TopK<router::Softmax>, experts::Ffn<act::SwiGLU>>;
  auto throws_naming = [](auto make, const std::string& field) {
    try {
      make();
      FAIL("no ConfigError for " << field);
    } catch (const ConfigError& e) {
      CHECK(std::string(e.what()).find(field) != std::string::npos);
    }
  };
  throws_naming([] { MoeConfig c = ec_config(0.0); Softmax l(c); }, "capacity_factor");
  throws_naming([] { MoeConfig c = ec_config(1.0); c.lbl_coef = 0.01; Softmax l(c); }, "lbl_coef");
  throws_naming([] { MoeConfig c = ec_config(1.0); c.renormalize = true; Softmax l(c); }, "renormalize");
  throws_naming([] { MoeConfig c = ec_config(1.0); c.options.set("routing", std::string("experts_pick")); Softmax l(c); }, "routing");
  throws_naming([] {
    MoeConfig c = ec_config(1.0);
    c.router = RouterKind::kSigmoid;
    MoeLayer<backend::Host<double>, router::TopK<router::Sigmoid>, experts::Ffn<act::SwiGLU>> l(c);
  }, "routing");
  throws_naming([] {
    MoeConfig c = ec_config(1.0);
    c.expert_bias = true;
    MoeLayer<backend::Host<double>, router::BiasBalanced<router::TopK<router::Softmax>>, experts::Ffn<act::SwiGLU>> l(c);
  }, "routing");
  throws_naming([] {
    MoeConfig c = ec_config(1.0);
    c.options.set("n_group", std::int64_t(2)), c.options.set("topk_group", std::int64_t(1));
    MoeLayer<backend::Host<double>, router::GroupLimited<router::TopK<router::Softmax>>, experts::Ffn<act::SwiGLU>> l(c);
  }, "routing");
  throws_naming([] {
    MoeConfig c = ec_config(1.0);
    c.options.set("balance", std::string("sequence")), c.options.set("sequence_length", std::int64_t(4));
    Softmax l(c);
  }, "balance");
  // Token choice stays the default, and "token_choice" says so.
  MoeConfig c = ec_config(1.0);
  c.options.set("routing", std::string("token_choice"));
  Softmax tc(c);
  CHECK(tc.routing() == Routing::kTokenChoice);
}
