// Shared experts (experts/shared.hpp, docs/design.md §3): y_t = routed_t + σ_t · FFN_s(x_t), FFN_s a
// SwiGLU FFN of width n · d_shared, σ_t = 1 (DeepSeek) or sigmoid(w_sg · x_t) (Qwen2-MoE). Checked
// against a reference written here (the routed part from a layer without shared experts holding the
// same weights, FFN_s and σ from the full-size tensors), finite differences in double on every input
// and parameter, the parameter table's names, shapes and tp slices, the options' rules, and bf16.
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

double ref_sigmoid(double v) { return 0.5 * (1.0 + std::tanh(0.5 * v)); }  // not the code's 1 / (1 + exp(-v))

MoeConfig shared_config(std::int64_t n, std::int64_t d_shared, bool gate) {
  MoeConfig c;
  c.d_model = 6, c.d_expert = 5, c.num_ffn_experts = 4, c.top_k = 2;
  c.lbl_coef = 0.05, c.zloss_coef = 0.01;
  c.options.set("num_shared_experts", n);
  if (d_shared > 0) c.options.set("d_shared", d_shared);
  if (gate) c.options.set("shared_gate", true);
  return c;
}

// The same config without the shared experts.
MoeConfig routed_only(MoeConfig c) {
  for (const char* k : {"num_shared_experts", "d_shared", "shared_gate"}) c.options.erase(k);
  return c;
}

using testing::normal_vector;

// y = routed + σ · W2s (silu(W1s x) ⊙ W3s x), σ = sigmoid(w_sg · x) or 1; then every gradient by
// central differences.
template <class Layer>
void check_shared_layer(const MoeConfig& c, std::int64_t width, bool gate, unsigned seed) {
  Layer layer(c);
  layer.init_params(seed);
  const std::int64_t tokens = 11, D = c.d_model;
  std::vector<double> x = normal_vector(std::size_t(tokens * D), seed + 1), dy = normal_vector(x.size(), seed + 2), y(x.size());
  layer.forward(MatrixView<const double>(x.data(), {tokens, D}), MatrixView<double>(y.data(), {tokens, D}));

  const auto w = layer.weights();
  REQUIRE(w.has("shared_w1"));
  CHECK(w.has("shared_gate") == gate);
  CHECK(w["shared_w1"].size() == std::size_t(width * D));
  CHECK(w["shared_w2"].size() == std::size_t(D * width));
  // The routed part: a layer without shared experts holding the same other weights.
  Layer routed(routed_only(c));
  auto rw = routed.weights();
  for (auto& f : rw.families) f.values = w[f.key];
  routed.load_weights(rw);
  std::vector<double> yr(x.size());
  routed.forward(MatrixView<const double>(x.data(), {tokens, D}), MatrixView<double>(yr.data(), {tokens, D}));
  double shared_size = 0;
  for (std::int64_t t = 0; t < tokens; ++t) {
    double z = 0;
    if (gate)
      for (std::int64_t m = 0; m < D; ++m) z += w["shared_gate"][std::size_t(m)] * x[std::size_t(t * D + m)];
    const double sigma = gate ? ref_sigmoid(z) : 1.0;
    std::vector<double> a(static_cast<std::size_t>(width));
    for (std::int64_t f = 0; f < width; ++f) {
      double h1 = 0, h3 = 0;
      for (std::int64_t m = 0; m < D; ++m) {
        h1 += w["shared_w1"][std::size_t(f * D + m)] * x[std::size_t(t * D + m)];
        h3 += w["shared_w3"][std::size_t(f * D + m)] * x[std::size_t(t * D + m)];
      }
      a[std::size_t(f)] = h1 * ref_sigmoid(h1) * h3;
    }
    for (std::int64_t i = 0; i < D; ++i) {
      double s = 0;
      for (std::int64_t f = 0; f < width; ++f) s += w["shared_w2"][std::size_t(i * width + f)] * a[std::size_t(f)];
      shared_size += std::abs(s);
      CHECK(y[std::size_t(t * D + i)] == doctest::Approx(yr[std::size_t(t * D + i)] + sigma * s).epsilon(1e-12));
    }
  }
  CHECK(shared_size > 0.1 * double(tokens * D) * 0.01);  // the shared part is not negligible

  const testing::FdCount fd = testing::check_layer_gradients(layer, x, dy);
  CHECK(fd.checked > 20 * fd.skipped);
  CHECK(fd.checked > 400);
}

}  // namespace

TEST_CASE("shared experts through a whole host layer: reference forward and finite differences") {
  using Softmax = MoeLayer<backend::Host<double>, router::TopK<router::Softmax>, experts::Ffn<act::SwiGLU>>;
  SUBCASE("DeepSeek: two shared experts of d_expert, weight 1, beside a scaled sigmoid router") {
    MoeConfig c = shared_config(2, 0, false);
    c.router = RouterKind::kSigmoid;
    c.options.set("routed_scaling_factor", 2.5);  // scales the routed gates only
    check_shared_layer<MoeLayer<backend::Host<double>, router::TopK<router::Sigmoid>, experts::Ffn<act::SwiGLU>>>(c, 10, false, 3);
  }
  SUBCASE("Qwen2-MoE: one shared expert of its own width with its sigmoid gate") {
    check_shared_layer<Softmax>(shared_config(1, 7, true), 7, true, 5);
  }
  SUBCASE("with capacity drops and the FFN experts' biases") {
    MoeConfig c = shared_config(3, 2, true);
    c.capacity_factor = 0.6;
    c.options.set("ffn_bias", true);
    check_shared_layer<Softmax>(c, 6, true, 7);
  }
  SUBCASE("beside MoE++'s zero-computation experts and GeLU FFN experts") {
    MoeConfig c = shared_config(1, 4, true);
    c.activation = Activation::kGeLU;  // the routed experts' activation; the shared FFN is SwiGLU
    c.num_zero_experts = 1, c.num_copy_experts = 1, c.num_constant_experts = 1;
    using Layer = MoeLayer<backend::Host<double>, router::TopK<router::Softmax>,
                           experts::Set<experts::Ffn<act::GeLU>, experts::Zero, experts::Copy, experts::Constant>>;
    check_shared_layer<Layer>(c, 4, true, 9);
  }
}

TEST_CASE("shared experts: the tensors, their names and shapes, their tp slices, and their gradient reduction") {
  MoeConfig c = shared_config(2, 3, true);
  c.d_model = 8, c.d_expert = 4, c.tp = 2, c.ep = 2;
  using R = router::TopK<router::Softmax>;
  using E = experts::Ffn<act::SwiGLU>;
  // Rank t = 1, e = 1: experts 2 and 3; the shared FFN (width 6) on both ep ranks, rows [3, 6) of
  // w1/w3 and columns [3, 6) of w2; the gate whole.
  for (int rank : {1, 3}) {
    const ParallelGrid grid = ParallelGrid::of(2, 2, 1, rank);
    const ParameterTable t = ParameterTable::of<R, E>(c, grid);
    std::vector<std::string> names;
    for (const auto& s : t.specs()) names.push_back(s.name);
    const std::string e0 = rank == 1 ? "0" : "2", e1 = rank == 1 ? "1" : "3";
    CHECK(names == std::vector<std::string>{"gate.weight", "experts." + e0 + ".w1.weight", "experts." + e0 + ".w2.weight",
                                            "experts." + e0 + ".w3.weight", "experts." + e1 + ".w1.weight",
                                            "experts." + e1 + ".w2.weight", "experts." + e1 + ".w3.weight",
                                            "shared_experts.w1.weight", "shared_experts.w2.weight", "shared_experts.w3.weight",
                                            "shared_expert_gate.weight"});
    const ParamSpec &w1 = t.find("shared_experts.w1.weight"), &w2 = t.find("shared_experts.w2.weight"),
                    &w3 = t.find("shared_experts.w3.weight"), &g = t.find("shared_expert_gate.weight");
    CHECK(w1.shape == std::vector<std::int64_t>{6, 8});
    CHECK(w1.local_shape == std::vector<std::int64_t>{3, 8});
    CHECK(w2.shape == std::vector<std::int64_t>{8, 6});
    CHECK(w2.local_shape == std::vector<std::int64_t>{8, 3});
    CHECK(g.local_shape == std::vector<std::int64_t>{1, 8});
    CHECK(w1.shard == ParamShard::kTensorRows);
    CHECK(w2.shard == ParamShard::kTensorCols);
    CHECK(g.shard == ParamShard::kReplicated);
    CHECK(!w1.expert_slice());
    CHECK(w3.offset == w1.offset + 3 * 8);  // [w1; w3]: one GEMM
    // pack takes this rank's slice: rows [3, 6) of w1 and w3, columns [3, 6) of w2, on either ep rank.
    MoeWeights<double> full = t.full<double>();
    for (auto& f : full.families)
      for (std::size_t i = 0; i < f.values.size(); ++i) f.values[i] = double(i);
    std::vector<double> flat(std::size_t(t.size()));
    t.pack(full, flat.data());
    for (int j = 0; j < 3 * 8; ++j) CHECK(flat[std::size_t(w1.offset + j)] == double(3 * 8 + j));
    for (int j = 0; j < 3 * 8; ++j) CHECK(flat[std::size_t(w3.offset + j)] == double(3 * 8 + j));
    for (int r = 0; r < 8; ++r)
      for (int j = 0; j < 3; ++j) CHECK(flat[std::size_t(w2.offset + r * 3 + j)] == double(r * 6 + 3 + j));
    // unpack puts it back where it came from.
    MoeWeights<double> back;
    t.unpack(flat.data(), back);
    CHECK(back["shared_w2"][std::size_t(7 * 6 + 5)] == double(7 * 6 + 5));
    CHECK(back["shared_w2"][std::size_t(7 * 6 + 2)] == 0.0);  // the other tp rank's column
  }
  // The norm's buckets: tensor slices apart from the experts' and the replicated tensors.
  NormSquares sq;
  sq.add(ParamShard::kTensorRows, 2.0), sq.add(ParamShard::kTensorCols, 3.0), sq.add(ParamShard::kExpertCols, 5.0);
  sq.add(ParamShard::kReplicated, 7.0);
  CHECK(sq.tensor_slices == 5.0);
  CHECK(sq.expert_slices == 5.0);
  CHECK(sq.replicated == 7.0);
  CHECK(sq.total() == 17.0);
  // A width tp does not divide is a ConfigError naming d_shared.
  MoeConfig odd = shared_config(1, 3, false);
  odd.tp = 2, odd.d_expert = 6;
  std::string field;
  try {
    read_options<experts::SharedOptions>(odd);
  } catch (const ConfigError& e) {
    field = e.field();
  }
  CHECK(field == "d_shared");
}

TEST_CASE("shared experts: options by their rules, and none unless asked") {
  auto build = [](const MoeConfig& c) -> std::string {
    try {
      make_moe_layer<backend::Host<float>>(c);
    } catch (const ConfigError& e) {
      return e.field();
    }
    return "(none)";
  };
  CHECK(build(shared_config(2, 0, true)) == "(none)");
  CHECK(build(shared_config(-1, 0, false)) == "num_shared_experts");
  MoeConfig c = routed_only(shared_config(0, 0, false));
  c.options.set("d_shared", std::int64_t(4));  // without shared experts
  CHECK(build(c) == "d_shared");
  c = routed_only(c), c.options.set("shared_gate", true);
  CHECK(build(c) == "shared_gate");
  c = routed_only(c), c.options.set("num_shared_experts", 1.5);
  CHECK(build(c) == "num_shared_experts");
  // num_shared_experts 0 is a layer without them: no tensors, the same output as before.
  MoeConfig none = shared_config(0, 0, false);
  {
    using L = MoeLayer<backend::Host<double>, router::TopK<router::Softmax>, experts::Ffn<act::SwiGLU>>;
    L a(none), b(routed_only(none));
    a.init_params(1), b.init_params(1);
    CHECK(a.parameters().size() == b.parameters().size());
    const std::vector<double> x = normal_vector(std::size_t(5 * none.d_model), 4);
    std::vector<double> ya(x.size()), yb(x.size());
    a.forward(MatrixView<const double>(x.data(), {5, none.d_model}), MatrixView<double>(ya.data(), {5, none.d_model}));
    b.forward(MatrixView<const double>(x.data(), {5, none.d_model}), MatrixView<double>(yb.data(), {5, none.d_model}));
    CHECK(ya == yb);
  }
}

TEST_CASE("shared experts: bf16 host layer against double, evaluation mode, and their FLOPs") {
  MoeConfig c = shared_config(2, 8, true);
  c.d_model = 16, c.d_expert = 8;
  using D = MoeLayer<backend::Host<double>, router::TopK<router::Softmax>, experts::Ffn<act::SwiGLU>>;
  using B = MoeLayer<backend::Host<bf16>, router::TopK<router::Softmax>, experts::Ffn<act::SwiGLU>>;
  D ld(c);
  B lb(c);
  ld.init_params(21);
  const auto w = ld.weights();
  MoeWeights<float> wf = w.as<float>();
  for (auto& f : wf.families)
    for (auto& v : f.values) v = float(bf16(v));  // both layers hold the bf16-rounded weights
  lb.load_weights(wf);
  ld.load_weights(wf.as<double>());
  const std::int64_t T = 24, Dm = c.d_model;
  std::vector<double> x = normal_vector(std::size_t(T * Dm), 22), y(x.size());
  std::vector<bf16> xb(x.size()), yb(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) xb[i] = bf16(x[i]), x[i] = double(float(xb[i]));
  ld.forward(MatrixView<const double>(x.data(), {T, Dm}), MatrixView<double>(y.data(), {T, Dm}));
  lb.forward(MatrixView<const bf16>(xb.data(), {T, Dm}), MatrixView<bf16>(yb.data(), {T, Dm}));
  double err = 0, scale = 0;
  for (std::size_t i = 0; i < y.size(); ++i) err = std::max(err, std::abs(double(float(yb[i])) - y[i])), scale = std::max(scale, std::abs(y[i]));
  CHECK(err <= 2e-2 * scale);
  // Evaluation mode computes the same output.
  std::vector<double> ye(x.size());
  ld.set_training(false);
  ld.forward(MatrixView<const double>(x.data(), {T, Dm}), MatrixView<double>(ye.data(), {T, Dm}));
  CHECK(ye == y);
  // The shared FFN's GEMMs count in the expert GEMM FLOPs: 2·T·(2·16)·16 + 2·T·16·16 more.
  D routed(routed_only(c));
  routed.set_training(false);
  auto rw = routed.weights();
  for (auto& f : rw.families) f.values = w[f.key];
  routed.load_weights(rw);
  routed.forward(MatrixView<const double>(x.data(), {T, Dm}), MatrixView<double>(ye.data(), {T, Dm}));
  CHECK(ld.expert_gemm_flops() - routed.expert_gemm_flops() == 2 * T * 32 * 16 + 2 * T * 16 * 16);
}
