// Zero-computation kinds are an open set (experts/zero_computation.hpp): a kind written in a test,
// TanhScale (tests/unit/zc_tanh_scale.hpp), through a whole host layer beside MoE++'s own kinds:
// its forward against the formula computed here, every gradient by finite differences, its tensors and
// count option by their rules; and MyCopy, Copy's arithmetic as a kind of its own, equal to Copy bit for bit.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <moekit/moe_layer.hpp>

#include "layer_fd.hpp"
#include "zc_tanh_scale.hpp"

using namespace moekit;
using moekit_test::MyCopy;
using moekit_test::TanhScale;

namespace {

using Soft = router::TopK<router::Softmax>;
using TanhSet = experts::Set<experts::Ffn<act::SwiGLU>, TanhScale, experts::Zero, experts::Constant>;

MoeConfig tanh_config(std::int64_t n_tanh) {
  MoeConfig c;
  c.d_model = 6, c.d_expert = 5, c.num_ffn_experts = 3, c.top_k = 3;
  c.num_zero_experts = 1, c.num_constant_experts = 1;
  c.lbl_coef = 0.05, c.zloss_coef = 0.01, c.tau = 0.75;
  c.options.set("num_tanh_zc_experts", n_tanh);
  return c;
}

using testing::normal_vector;

}  // namespace

TEST_CASE("a zero-computation kind of one's own: N_E, routing order, tensors") {
  const MoeConfig c = tanh_config(2);
  CHECK(c.num_experts() == 3 + 1 + 1 + 2);
  CHECK(c.num_zc_experts() == 4);
  // Zero, Copy, Constant first, whatever the set's order; then the others in the set's order.
  static_assert(std::is_same_v<TanhSet::zc_kinds, std::tuple<experts::Zero, experts::Constant, TanhScale>>);
  const ExpertKinds k = ExpertKinds::of(c);
  int q = -1;
  CHECK(k.zc_kind(3, q) == ZcKind::kZero);
  CHECK(k.zc_kind(4, q) == ZcKind::kConstant);
  CHECK(q == 0);
  CHECK(k.zc_kind(6, q) == ZcKind::kCustom);
  CHECK(q == 1);
  MoeLayer<backend::Host<double>, Soft, TanhSet> layer(c);
  const auto w = layer.weights();
  REQUIRE(w.has("tanh_u"));
  CHECK(w["tanh_u"].size() == std::size_t(2 * c.d_model));
  bool named = false;
  for (const auto& p : layer.parameters()) named = named || p.name == "tanh.1.u";
  CHECK(named);
}

TEST_CASE("a zero-computation kind of one's own: forward by its formula, gradients by finite differences") {
  using Layer = MoeLayer<backend::Host<double>, Soft, TanhSet>;
  for (double gamma : {0.0, 1.2}) {
    CAPTURE(gamma);
    MoeConfig c = tanh_config(2);
    c.capacity_factor = gamma;
    Layer layer(c);
    layer.init_params(7);
    const std::int64_t T = 13, D = c.d_model, K = c.top_k, N = c.num_experts();
    std::vector<double> x = normal_vector(std::size_t(T * D), 8), dy = normal_vector(x.size(), 9), y(x.size());
    layer.forward(MatrixView<const double>(x.data(), {T, D}), MatrixView<double>(y.data(), {T, D}));
    const std::vector<int> idx(layer.topk_indices().data, layer.topk_indices().data + T * K);
    const std::vector<double> gates(layer.topk_gates().data, layer.topk_gates().data + T * K);

    // The same layer with u = 0 routes the same way and its tanh experts add a · x = 0: the
    // difference is Σ over the token's tanh slots of gate · tanh(u · x) · x.
    const auto w = layer.weights();
    Layer zeroed(c);
    auto zw = w;
    for (auto& f : zw.families)
      if (f.key == "tanh_u") std::fill(f.values.begin(), f.values.end(), 0.0);
    zeroed.load_weights(zw);
    std::vector<double> y0(x.size());
    zeroed.forward(MatrixView<const double>(x.data(), {T, D}), MatrixView<double>(y0.data(), {T, D}));
    CHECK(std::memcmp(idx.data(), zeroed.topk_indices().data, idx.size() * sizeof(int)) == 0);
    int tanh_slots = 0;
    double size = 0;
    for (std::int64_t t = 0; t < T; ++t) {
      std::vector<double> expect(std::size_t(D), 0.0);
      for (std::int64_t j = 0; j < K; ++j) {
        const int e = idx[std::size_t(t * K + j)];
        if (e < N - 2) continue;
        const double g = gates[std::size_t(t * K + j)];
        tanh_slots += g != 0.0;
        double z = 0;
        for (std::int64_t i = 0; i < D; ++i) z += w["tanh_u"][std::size_t((e - (N - 2)) * D + i)] * x[std::size_t(t * D + i)];
        for (std::int64_t i = 0; i < D; ++i) expect[std::size_t(i)] += g * std::tanh(z) * x[std::size_t(t * D + i)];
      }
      for (std::int64_t i = 0; i < D; ++i) {
        size += std::abs(expect[std::size_t(i)]);
        CHECK(y[std::size_t(t * D + i)] == doctest::Approx(y0[std::size_t(t * D + i)] + expect[std::size_t(i)]).epsilon(1e-12));
      }
    }
    CHECK(tanh_slots >= 4);
    CHECK(size > 0.05);

    const testing::FdCount fd = testing::check_layer_gradients(layer, x, dy);
    CHECK(fd.checked > 10 * fd.skipped);
    CHECK(fd.checked > 300);
  }
}

TEST_CASE("a zero-computation kind of one's own: Copy's arithmetic as a kind of its own equals Copy bit for bit") {
  using CopyLayer = MoeLayer<backend::Host<float>, Soft, experts::Set<experts::Ffn<act::GeLU>, experts::Copy>>;
  using MineLayer = MoeLayer<backend::Host<float>, Soft, experts::Set<experts::Ffn<act::GeLU>, MyCopy>>;
  MoeConfig a;
  a.d_model = 8, a.d_expert = 4, a.num_ffn_experts = 4, a.top_k = 2, a.activation = Activation::kGeLU;
  a.lbl_coef = 0.01, a.capacity_factor = 1.0, a.tau = 0.5;
  MoeConfig b = a;
  a.num_copy_experts = 2;
  b.options.set("num_mycopy_zc_experts", 2);
  CopyLayer lc(a);
  MineLayer lm(b);
  lc.init_params(3);
  lm.load_weights(lc.weights());
  const std::int64_t T = 29, D = a.d_model;
  std::vector<float> x(std::size_t(T * D)), dy(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = float(std::sin(0.37 * double(i))), dy[i] = float(std::cos(0.11 * double(i)));
  std::vector<float> yc(x.size()), ym(x.size()), dxc(x.size()), dxm(x.size());
  const AuxLosses ac = lc.forward(MatrixView<const float>(x.data(), {T, D}), MatrixView<float>(yc.data(), {T, D}));
  const AuxLosses am = lm.forward(MatrixView<const float>(x.data(), {T, D}), MatrixView<float>(ym.data(), {T, D}));
  CHECK(ac.lbl == am.lbl);
  CHECK(std::memcmp(yc.data(), ym.data(), yc.size() * sizeof(float)) == 0);
  lc.backward(MatrixView<const float>(dy.data(), {T, D}), MatrixView<float>(dxc.data(), {T, D}));
  lm.backward(MatrixView<const float>(dy.data(), {T, D}), MatrixView<float>(dxm.data(), {T, D}));
  CHECK(std::memcmp(dxc.data(), dxm.data(), dxc.size() * sizeof(float)) == 0);
  const auto gc = lc.gradients(), gm = lm.gradients();
  CHECK(gc["router"] == gm["router"]);
  int copy_slots = 0;
  for (std::int64_t s = 0; s < T * 2; ++s) copy_slots += lc.topk_indices().data[s] >= 4;
  CHECK(copy_slots > 5);
}

TEST_CASE("a zero-computation kind of one's own: float against double, bf16 host against float") {
  MoeConfig c = tanh_config(2);
  const std::int64_t T = 17, D = c.d_model;
  MoeLayer<backend::Host<double>, Soft, TanhSet> ld(c);
  MoeLayer<backend::Host<float>, Soft, TanhSet> lf(c);
  MoeLayer<backend::Host<bf16>, Soft, TanhSet> lb(c);
  ld.init_params(11);
  const auto wd = ld.weights();
  MoeWeights<float> wf;
  for (const auto& f : wd.families) {
    auto g = f;
    wf.families.push_back({g.key, std::vector<float>(g.values.begin(), g.values.end())});
  }
  lf.load_weights(wf), lb.load_weights(wf);
  const std::vector<double> xd = normal_vector(std::size_t(T * D), 12);
  const std::vector<float> xf(xd.begin(), xd.end());
  std::vector<bf16> xb(xf.size());
  for (std::size_t i = 0; i < xf.size(); ++i) xb[i] = bf16(xf[i]);
  std::vector<double> yd(xd.size());
  std::vector<float> yf(xf.size());
  std::vector<bf16> yb(xf.size());
  ld.forward(MatrixView<const double>(xd.data(), {T, D}), MatrixView<double>(yd.data(), {T, D}));
  lf.forward(MatrixView<const float>(xf.data(), {T, D}), MatrixView<float>(yf.data(), {T, D}));
  lb.forward(MatrixView<const bf16>(xb.data(), {T, D}), MatrixView<bf16>(yb.data(), {T, D}));
  double worst_f = 0, worst_b = 0;
  for (std::size_t i = 0; i < yd.size(); ++i) {
    worst_f = std::max(worst_f, std::abs(double(yf[i]) - yd[i]));
    worst_b = std::max(worst_b, std::abs(double(float(yb[i])) - double(yf[i])));
  }
  CHECK(worst_f < 1e-5);
  CHECK(worst_b < 5e-2);
}

TEST_CASE("a zero-computation kind of one's own: its count option by the rules") {
  using Layer = MoeLayer<backend::Host<double>, Soft, TanhSet>;
  MoeConfig c = tanh_config(2);
  c.options.set("num_tanh_zc_experts", std::int64_t(-1));
  CHECK_THROWS_AS(c.validate(), ConfigError);
  c.options.set("num_tanh_zc_experts", "two");
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("num_tanh_zc_experts"), ConfigError);
  CHECK(c.num_experts() == 5);  // a value that is not a count adds nothing before validate refuses it
  // A count key no kind of the layer reads: refused by name.
  MoeConfig other = tanh_config(0);
  other.options.set("num_other_zc_experts", 2);
  CHECK_THROWS_WITH_AS(Layer{other}, doctest::Contains("num_other_zc_experts"), ConfigError);
  // A layer without TanhScale does not take its count.
  MoeConfig plain = tanh_config(2);
  using NoTanh = MoeLayer<backend::Host<double>, Soft, experts::Set<experts::Ffn<act::SwiGLU>, experts::Zero, experts::Constant>>;
  CHECK_THROWS_WITH_AS(NoTanh{plain}, doctest::Contains("num_tanh_zc_experts"), ConfigError);
  // Zero of them: the layer is MoE++'s three kinds alone.
  Layer none(tanh_config(0));
  CHECK(none.config().num_experts() == 5);
  CHECK(none.weights()["tanh_u"].empty());
}
