// Router replay (router/replay.hpp, docs/design.md §2): a forward's record (topk_indices, -1 for a slot
// with no expert) replayed by a later forward instead of its own selection. Checked: a forward's own
// record replays it bit for bit (outputs, aux losses, counts, every gradient), under capacity drops,
// the sigmoid router with bias balancing, groups and MoE++; a foreign record against a reference
// written here (the given experts, gates from the current scores by the router's rule) with finite
// differences through the gates; -1 slots; the record's rules; records as safetensors.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <moekit/io/routing_record.hpp>
#include <moekit/moe_layer.hpp>
#include <string>
#include <vector>

#include <unistd.h>

#include "layer_fd.hpp"

using namespace moekit;

namespace {

using testing::normal_vector;

MoeConfig replay_config() {
  MoeConfig c;
  c.d_model = 6, c.d_expert = 5, c.num_ffn_experts = 6, c.top_k = 2;
  c.lbl_coef = 0.05, c.zloss_coef = 0.01;
  return c;
}

template <class Layer>
struct Pass {
  std::vector<double> y, dx;
  AuxLosses aux;
  std::vector<std::int64_t> routed;
  std::vector<std::int32_t> kept, record;
  std::vector<double> grads;
};

template <class Layer>
Pass<Layer> run(Layer& layer, const std::vector<double>& x, const std::vector<double>& dy, const std::vector<std::int32_t>* replay) {
  const MoeConfig& c = layer.config();
  const std::int64_t T = std::int64_t(x.size()) / c.d_model, D = c.d_model;
  Pass<Layer> p;
  p.y.resize(x.size()), p.dx.resize(x.size());
  if (replay) layer.set_replay(MatrixView<const std::int32_t>(replay->data(), {T, c.top_k}));
  p.aux = layer.forward(MatrixView<const double>(x.data(), {T, D}), MatrixView<double>(p.y.data(), {T, D}));
  p.routed = layer.routed_counts();
  p.kept.assign(layer.expert_counts().data, layer.expert_counts().data + c.num_experts());
  p.record.assign(layer.topk_indices().data, layer.topk_indices().data + T * c.top_k);
  layer.zero_grad();
  layer.backward(MatrixView<const double>(dy.data(), {T, D}), MatrixView<double>(p.dx.data(), {T, D}));
  const auto g = layer.flat_grads();
  p.grads.assign(g.begin(), g.end());
  return p;
}

// Record, then replay the record: the same bits everywhere.
template <class Layer>
void check_bit_exact(MoeConfig c, unsigned seed) {
  Layer layer(c);
  layer.init_params(seed);
  if constexpr (router::router_traits<typename Layer::router_type>::selection_bias) {
    std::vector<double> b = normal_vector(std::size_t(c.num_experts()), seed + 9);
    for (auto& v : b) v *= 0.1;
    layer.set_expert_bias(b);
  }
  const std::int64_t T = 13;
  const std::vector<double> x = normal_vector(std::size_t(T * c.d_model), seed + 1), dy = normal_vector(x.size(), seed + 2);
  const Pass<Layer> a = run(layer, x, dy, nullptr);
  CHECK_FALSE(layer.replay_pending());
  const Pass<Layer> b = run(layer, x, dy, &a.record);
  CHECK(b.record == a.record);  // a replayed forward records its record
  CHECK(b.y == a.y);
  CHECK(b.dx == a.dx);
  CHECK(b.grads == a.grads);
  CHECK(b.aux.lbl == a.aux.lbl);
  CHECK(b.aux.zloss == a.aux.zloss);
  CHECK(b.routed == a.routed);
  CHECK(b.kept == a.kept);
}

double ref_sigmoid(double v) { return 0.5 * (1.0 + std::tanh(0.5 * v)); }

// y of a replayed record by loops: scores of the logits, the record's experts (-1 left out), gates
// c · s / Z (Z over the token's replayed slots when the router renormalises), SwiGLU experts.
std::vector<double> reference_y(const MoeConfig& c, bool sigmoid, bool renormalize, double scale, const MoeWeights<double>& w,
                                const std::vector<double>& x, const std::vector<std::int32_t>& rec) {
  const std::int64_t D = c.d_model, F = c.d_expert, N = c.num_experts(), K = c.top_k, T = std::int64_t(x.size()) / D;
  std::vector<double> y(x.size(), 0.0);
  for (std::int64_t t = 0; t < T; ++t) {
    const double* xt = &x[std::size_t(t * D)];
    std::vector<double> s(static_cast<std::size_t>(N));
    double m = -1e300, z = 0;
    for (std::int64_t e = 0; e < N; ++e) {
      double l = 0;
      for (std::int64_t i = 0; i < D; ++i) l += w["router"][std::size_t(e * D + i)] * xt[i];
      s[std::size_t(e)] = l, m = std::max(m, l);
    }
    for (auto& v : s) z += std::exp(v - m);
    for (auto& v : s) v = sigmoid ? ref_sigmoid(v) : std::exp(v - m) / z;
    double picked = 0;
    for (std::int64_t j = 0; j < K; ++j)
      if (rec[std::size_t(t * K + j)] >= 0) picked += s[std::size_t(rec[std::size_t(t * K + j)])];
    for (std::int64_t j = 0; j < K; ++j) {
      const std::int32_t e = rec[std::size_t(t * K + j)];
      if (e < 0) continue;
      const double g = scale * s[std::size_t(e)] / (renormalize ? picked : 1.0);
      std::vector<double> a(static_cast<std::size_t>(F));
      for (std::int64_t f = 0; f < F; ++f) {
        double h1 = 0, h3 = 0;
        for (std::int64_t i = 0; i < D; ++i)
          h1 += w["w1"][std::size_t((e * F + f) * D + i)] * xt[i], h3 += w["w3"][std::size_t((e * F + f) * D + i)] * xt[i];
        a[std::size_t(f)] = h1 * ref_sigmoid(h1) * h3;
      }
      for (std::int64_t i = 0; i < D; ++i) {
        double o = 0;
        for (std::int64_t f = 0; f < F; ++f) o += w["w2"][std::size_t((e * D + i) * F + f)] * a[std::size_t(f)];
        y[std::size_t(t * D + i)] += g * o;
      }
    }
  }
  return y;
}

}  // namespace

TEST_CASE("router replay: a forward's own record replays it bit for bit") {
  using Soft = router::TopK<router::Softmax>;
  using Swi = experts::Ffn<act::SwiGLU>;
  SUBCASE("softmax, dropless") { check_bit_exact<MoeLayer<backend::Host<double>, Soft, Swi>>(replay_config(), 3); }
  SUBCASE("softmax renormalised with capacity drops") {
    MoeConfig c = replay_config();
    c.renormalize = true, c.capacity_factor = 0.6;
    check_bit_exact<MoeLayer<backend::Host<double>, Soft, Swi>>(c, 5);
  }
  SUBCASE("DeepSeek-V3's router: sigmoid, bias balanced, groups, scaled") {
    MoeConfig c = replay_config();
    c.router = RouterKind::kSigmoid, c.expert_bias = true, c.lbl_coef = 0.0;
    c.options.set("n_group", std::int64_t(3)), c.options.set("topk_group", std::int64_t(2)), c.options.set("routed_scaling_factor", 2.5);
    check_bit_exact<MoeLayer<backend::Host<double>, router::BiasBalanced<router::GroupLimited<router::TopK<router::Sigmoid>>>, Swi>>(c, 7);
  }
  SUBCASE("MoE++ with capacity, a shared expert, the sequence scope") {
    MoeConfig c = replay_config();
    c.num_zero_experts = 1, c.num_copy_experts = 1, c.num_constant_experts = 1, c.tau = 0.5, c.capacity_factor = 1.0;
    c.activation = Activation::kGeLU;
    c.options.set("num_shared_experts", std::int64_t(1)), c.options.set("balance", "sequence");
    c.options.set("sequence_length", std::int64_t(13));
    using Mixed = experts::Set<experts::Ffn<act::GeLU>, experts::Zero, experts::Copy, experts::Constant>;
    check_bit_exact<MoeLayer<backend::Host<double>, Soft, Mixed>>(c, 9);
  }
  SUBCASE("float") {
    MoeConfig c = replay_config();
    c.capacity_factor = 0.8;
    using Layer = MoeLayer<backend::Host<float>, Soft, Swi>;
    Layer layer(c);
    layer.init_params(11);
    const std::int64_t T = 40;
    std::vector<double> xd = normal_vector(std::size_t(T * c.d_model), 12), dyd = normal_vector(xd.size(), 13);
    std::vector<float> x(xd.begin(), xd.end()), y1(x.size()), y2(x.size());
    layer.forward(MatrixView<const float>(x.data(), {T, c.d_model}), MatrixView<float>(y1.data(), {T, c.d_model}));
    const std::vector<std::int32_t> rec(layer.topk_indices().data, layer.topk_indices().data + T * c.top_k);
    layer.set_replay(MatrixView<const std::int32_t>(rec.data(), {T, c.top_k}));
    layer.forward(MatrixView<const float>(x.data(), {T, c.d_model}), MatrixView<float>(y2.data(), {T, c.d_model}));
    CHECK(y1 == y2);
  }
}

TEST_CASE("router replay: another forward's record against a reference, with finite differences") {
  for (bool sigmoid : {false, true}) {
    CAPTURE(sigmoid);
    MoeConfig c = replay_config();
    if (sigmoid) c.router = RouterKind::kSigmoid, c.options.set("routed_scaling_factor", 1.5);
    else c.renormalize = true;
    const std::int64_t T = 9, D = c.d_model, K = c.top_k;
    // The record: a rollout engine's choices, with -1 slots (token 4 has none at all).
    std::vector<std::int32_t> rec(std::size_t(T * K));
    for (std::int64_t t = 0; t < T; ++t) rec[std::size_t(t * K)] = std::int32_t((t * 5) % 6), rec[std::size_t(t * K + 1)] = std::int32_t((t * 5 + 1 + t % 4) % 6);
    rec[2 * K + 1] = -1, rec[4 * K] = -1, rec[4 * K + 1] = -1, rec[7 * K] = -1;
    auto check = [&](auto& layer) {
      layer.init_params(21);
      std::vector<double> x = normal_vector(std::size_t(T * D), 22), dy = normal_vector(x.size(), 23), y(x.size());
      layer.set_replay(MatrixView<const std::int32_t>(rec.data(), {T, K}));
      layer.forward(MatrixView<const double>(x.data(), {T, D}), MatrixView<double>(y.data(), {T, D}));
      const std::vector<double> yr = reference_y(c, sigmoid, true, sigmoid ? 1.5 : 1.0, layer.weights(), x, rec);
      for (std::size_t i = 0; i < y.size(); ++i) CHECK(y[i] == doctest::Approx(yr[i]).epsilon(1e-12));
      for (std::int64_t i = 4 * D; i < 5 * D; ++i) CHECK(y[std::size_t(i)] == 0.0);  // token 4: no expert
      std::int64_t slots = 0;
      for (auto e : rec) slots += e >= 0;
      std::int64_t routed = 0;
      for (auto r : layer.routed_counts()) routed += r;
      CHECK(routed == slots);  // the counts f_i are the replayed slots'
      CHECK(std::vector<std::int32_t>(layer.topk_indices().data, layer.topk_indices().data + T * K) == rec);
      CHECK_FALSE(layer.slot_kept(4, 0));
      CHECK(layer.slot_kept(2, 0));
      const auto set = [&](auto& l) { l.set_replay(MatrixView<const std::int32_t>(rec.data(), {T, K})); };
      const testing::FdCount fd = testing::check_layer_gradients(layer, x, dy, std::function<void(std::remove_reference_t<decltype(layer)>&)>(set));
      CHECK(fd.skipped == 0);  // the record fixes the routing
      CHECK(fd.checked > 300);
    };
    if (sigmoid) {
      MoeLayer<backend::Host<double>, router::TopK<router::Sigmoid>, experts::Ffn<act::SwiGLU>> layer(c);
      check(layer);
    } else {
      MoeLayer<backend::Host<double>, router::TopK<router::Softmax>, experts::Ffn<act::SwiGLU>> layer(c);
      check(layer);
    }
  }
}

TEST_CASE("router replay: the record's rules, and records as safetensors") {
  using Layer = MoeLayer<backend::Host<double>, router::TopK<router::Softmax>, experts::Ffn<act::SwiGLU>>;
  MoeConfig c = replay_config();
  Layer layer(c);
  layer.init_params(1);
  const std::int64_t T = 3, D = c.d_model;
  std::vector<std::int32_t> rec{0, 1, 2, 3, 4, 5};
  auto throws = [&](std::vector<std::int32_t> r, std::int64_t cols, const std::string& what) {
    CAPTURE(what);
    try {
      layer.set_replay(MatrixView<const std::int32_t>(r.data(), {std::int64_t(r.size()) / cols, cols}));
      FAIL("no ShapeError");
    } catch (const ShapeError& e) {
      CHECK(std::string(e.what()).find(what) != std::string::npos);
    }
  };
  throws({0, 1, 2, 3, 4, 5}, 3, "columns");
  throws({0, 1, 2, 6, 4, 5}, 2, "= 6 must be an expert");
  throws({0, 1, 2, -2, 4, 5}, 2, "= -2 must be an expert");
  throws({0, 1, 3, 3, 4, 5}, 2, "expert 3 twice for token 1");
  CHECK_FALSE(layer.replay_pending());
  std::vector<double> x = normal_vector(std::size_t(4 * D), 2), y(x.size());
  layer.set_replay(MatrixView<const std::int32_t>(rec.data(), {T, 2}));
  CHECK_THROWS_AS(layer.forward(MatrixView<const double>(x.data(), {4, D}), MatrixView<double>(y.data(), {4, D})), ShapeError);
  CHECK_FALSE(layer.replay_pending());  // used up
  MoeConfig ec = c;
  ec.capacity_factor = 1.0, ec.lbl_coef = 0.0, ec.options.set("routing", "expert_choice");
  Layer chooser(ec);
  CHECK_THROWS_AS(chooser.set_replay(MatrixView<const std::int32_t>(rec.data(), {T, 2})), ConfigError);

  // Records: one tensor per layer, back as written; a file of something else is refused.
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / ("moekit_replay_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  std::vector<io::RoutingRecord> recs{{3, 2, rec}, {2, 2, {5, -1, -1, -1}}};
  io::save_routing_records(dir / "r.safetensors", recs);
  const auto back = io::load_routing_records(dir / "r.safetensors");
  REQUIRE(back.size() == 2);
  for (std::size_t l = 0; l < 2; ++l) {
    CHECK(back[l].tokens == recs[l].tokens);
    CHECK(back[l].k == recs[l].k);
    CHECK(back[l].indices == recs[l].indices);
  }
  io::SafetensorsWriter other;
  other.add_i32("layers.0.topk.indices", {1, 2}, std::vector<std::int32_t>{0, 1});
  other.write(dir / "o.safetensors");
  CHECK_THROWS_AS(io::load_routing_records(dir / "o.safetensors"), FormatError);
  std::filesystem::remove_all(dir);
}
