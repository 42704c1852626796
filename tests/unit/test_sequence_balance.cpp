// The balance loss's sequence scope (balance::ScopeOptions, docs/design.md §4; DeepSeek-V3's
// complementary sequence-wise loss, arXiv 2412.19437 eq. 17-20): the tokens are B sequences of S,
// LBL = (1/B) Σ_b N_E Σ_i η_i f_{b,i} P_{b,i} with f and P over each sequence. Checked against that
// formula written here from the layer's own routing and probabilities, against finite differences in
// double (the backward's per-sequence dL/dp), and the options' rules.
#include <doctest/doctest.h>

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

MoeConfig sequence_config(std::int64_t S) {
  MoeConfig c;
  c.d_model = 6, c.d_expert = 5, c.num_ffn_experts = 4, c.top_k = 2;
  c.lbl_coef = 0.5, c.zloss_coef = 0.01;  // a large coefficient: the LBL's gradient is visible
  c.options.set("balance", "sequence"), c.options.set("sequence_length", S);
  return c;
}

using testing::normal_vector;

// (1/B) Σ_b N Σ_i η_i (c_bi / (k S)) (Σ_{t in b} P_ti / S), P the balance loss's probability (softmax p,
// or s / Σ s for sigmoid), from the layer's logits, indices and config.
template <class Layer>
double reference_lbl(const Layer& layer, std::int64_t T, std::int64_t S) {
  const MoeConfig& c = layer.config();
  const std::int64_t n = c.num_experts(), k = c.top_k, B = T / S;
  double lbl = 0;
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t i = 0; i < n; ++i) {
      double count = 0, p = 0;
      for (std::int64_t t = b * S; t < (b + 1) * S; ++t) {
        for (std::int64_t j = 0; j < k; ++j) count += layer.topk_indices()(t, j) == i ? 1 : 0;
        double z = 0, e = 0;
        for (std::int64_t m = 0; m < n; ++m) {
          const double l = layer.logits()(t, m);
          z += c.router == RouterKind::kSoftmax ? std::exp(l) : 1.0 / (1.0 + std::exp(-l));
        }
        const double l = layer.logits()(t, i);
        e = c.router == RouterKind::kSoftmax ? std::exp(l) : 1.0 / (1.0 + std::exp(-l));
        p += e / z;
      }
      const double eta = i < c.num_ffn_experts ? 1.0 : c.tau;
      lbl += double(n) * eta * (count / double(k * S)) * (p / double(S));
    }
  return lbl / double(B);
}

template <class Layer>
void check_sequence_layer(const MoeConfig& c, std::int64_t T, std::int64_t S, unsigned seed) {
  Layer layer(c);
  layer.init_params(seed);
  std::vector<double> x = normal_vector(std::size_t(T * c.d_model), seed + 1), dy = normal_vector(x.size(), seed + 2), y(x.size());
  const AuxLosses aux =
      layer.forward(MatrixView<const double>(x.data(), {T, c.d_model}), MatrixView<double>(y.data(), {T, c.d_model}));
  const double want = reference_lbl(layer, T, S);
  CHECK(aux.lbl == doctest::Approx(want).epsilon(1e-12));
  // Not the micro-batch scope's value (the sequences route differently).
  MoeConfig whole = c;
  whole.options.erase("balance"), whole.options.erase("sequence_length");
  Layer plain(whole);
  plain.load_weights(layer.weights());
  std::vector<double> yp(x.size());
  const AuxLosses ap = plain.forward(MatrixView<const double>(x.data(), {T, c.d_model}), MatrixView<double>(yp.data(), {T, c.d_model}));
  if (S < T) CHECK(std::abs(ap.lbl - aux.lbl) > 1e-6);
  else CHECK(ap.lbl == doctest::Approx(aux.lbl).epsilon(1e-12));  // one sequence: the micro-batch
  CHECK(yp == y);  // the scope changes the loss only
  const testing::FdCount fd = testing::check_layer_gradients(layer, x, dy);
  CHECK(fd.checked > 20 * fd.skipped);
  CHECK(fd.checked > 200);
}

}  // namespace

TEST_CASE("balance sequence: the per-sequence LBL and its gradient through a whole host layer") {
  using Soft = MoeLayer<backend::Host<double>, router::TopK<router::Softmax>, experts::Ffn<act::SwiGLU>>;
  SUBCASE("softmax, 3 sequences of 4") { check_sequence_layer<Soft>(sequence_config(4), 12, 4, 3); }
  SUBCASE("one sequence equals the micro-batch scope") { check_sequence_layer<Soft>(sequence_config(9), 9, 9, 5); }
  SUBCASE("sequences of one token") { check_sequence_layer<Soft>(sequence_config(1), 7, 1, 7); }
  SUBCASE("sigmoid (P = s / Σ s), DeepSeek-V3's scope, with capacity") {
    MoeConfig c = sequence_config(5);
    c.router = RouterKind::kSigmoid, c.capacity_factor = 1.0;
    check_sequence_layer<MoeLayer<backend::Host<double>, router::TopK<router::Sigmoid>, experts::Ffn<act::SwiGLU>>>(c, 15, 5, 9);
  }
  SUBCASE("MoE++ experts (η = τ for the zero-computation ones)") {
    MoeConfig c = sequence_config(3);
    c.activation = Activation::kGeLU, c.num_zero_experts = 1, c.num_copy_experts = 1, c.num_constant_experts = 1, c.tau = 0.5;
    using L = MoeLayer<backend::Host<double>, router::TopK<router::Softmax>,
                       experts::Set<experts::Ffn<act::GeLU>, experts::Zero, experts::Copy, experts::Constant>>;
    check_sequence_layer<L>(c, 12, 3, 11);
  }
}

TEST_CASE("balance sequence: its rules, each a ConfigError naming the key") {
  auto field_of = [](auto&& fn) -> std::string {
    try {
      fn();
    } catch (const ConfigError& e) {
      return e.field();
    }
    return "(none)";
  };
  auto build = [&](const MoeConfig& c) { return field_of([&] { make_moe_layer<backend::Host<float>>(c); }); };
  CHECK(build(sequence_config(4)) == "(none)");
  MoeConfig c = sequence_config(4);
  c.options.erase("sequence_length");
  CHECK(build(c) == "sequence_length");  // the scope needs its length
  c = sequence_config(4), c.options.erase("balance");
  CHECK(build(c) == "sequence_length");  // a length without the scope
  c = sequence_config(4), c.options.set("balance", "global");
  CHECK(build(c) == "balance");
  c = sequence_config(-2);
  CHECK(build(c) == "sequence_length");
  // A GlobalBatch layer refuses it (f comes from the global batch there).
  CHECK(field_of([] {
          MoeLayer<backend::Host<float>, router::TopK<router::Softmax>, experts::Ffn<act::SwiGLU>, balance::GlobalBatch> l(sequence_config(4));
        }) == "balance");
  // T that S does not divide: a ConfigError at a training forward, naming sequence_length.
  auto layer = make_moe_layer<backend::Host<float>>(sequence_config(4));
  layer->init_params(1);
  std::vector<float> x(std::size_t(10 * 6), 0.1f), y(x.size());
  CHECK(field_of([&] { layer->forward(MatrixView<const float>(x.data(), {10, 6}), MatrixView<float>(y.data(), {10, 6})); }) ==
        "sequence_length");
  layer->forward(MatrixView<const float>(x.data(), {8, 6}), MatrixView<float>(y.data(), {8, 6}));  // 2 sequences: fine
  // An evaluation-mode forward of another length (a prompt, a generated token) runs, its LBL over all its
  // tokens as one sequence: the micro-batch scope's value.
  MoeConfig whole = sequence_config(4);
  whole.options.erase("balance"), whole.options.erase("sequence_length");
  auto plain = make_moe_layer<backend::Host<float>>(whole);
  plain->load_weights(layer->weights());
  layer->set_training(false), plain->set_training(false);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = float(std::sin(0.37 * double(i)));
  const AuxLosses a = layer->forward(MatrixView<const float>(x.data(), {10, 6}), MatrixView<float>(y.data(), {10, 6}));
  const AuxLosses b = plain->forward(MatrixView<const float>(x.data(), {10, 6}), MatrixView<float>(y.data(), {10, 6}));
  CHECK(a.lbl == b.lbl);
  CHECK(a.lbl > 0.0);
}
