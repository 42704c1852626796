// The routers of today's open MoE models (docs/design.md §2): router::GroupLimited (DeepSeek-V2's max,
// DeepSeek-V3's top-2 sum, composed with router::BiasBalanced), router::LinearBias (GPT-OSS's gate.bias),
// and the gate rule of both score functions (renormalize, routed_scaling_factor). Each is checked
// against a reference written here (sorting, not the library's top-k), and through a whole host layer
// in double against finite differences.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <moekit/moe_layer.hpp>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "layer_fd.hpp"

using namespace moekit;

namespace {

// One token routed by the formulas, independently of router/topk.hpp.
struct RefRoute {
  std::vector<int> idx;
  std::vector<double> gate, prob;
  double lse = 0;
};
struct RefRouter {
  bool sigmoid = false, renorm = false;
  double scale = 1.0;
  int k = 1, n_group = 1, topk_group = 1;
  bool top2 = true;
};
RefRoute ref_route(const RefRouter& r, const std::vector<double>& l, const std::vector<double>& bias) {
  const int n = int(l.size());
  const double m = *std::max_element(l.begin(), l.end());
  double z = 0;
  for (double v : l) z += std::exp(v - m);
  RefRoute out;
  out.lse = m + std::log(z);
  std::vector<double> s(n), sel(n);
  for (int i = 0; i < n; ++i) s[i] = r.sigmoid ? 1.0 / (1.0 + std::exp(-l[i])) : std::exp(l[i] - out.lse);
  for (int i = 0; i < n; ++i) sel[i] = s[i] + (bias.empty() ? 0.0 : bias[i]);
  std::vector<bool> allowed(n, true);
  if (r.n_group > 1) {
    const int size = n / r.n_group;
    std::vector<double> score(r.n_group);
    for (int g = 0; g < r.n_group; ++g) {
      std::vector<double> v(sel.begin() + g * size, sel.begin() + (g + 1) * size);
      std::sort(v.rbegin(), v.rend());
      score[g] = r.top2 ? v[0] + v[1] : v[0];
    }
    std::vector<int> groups(r.n_group);
    std::iota(groups.begin(), groups.end(), 0);
    std::stable_sort(groups.begin(), groups.end(), [&](int a, int b) { return score[a] > score[b]; });
    std::fill(allowed.begin(), allowed.end(), false);
    for (int j = 0; j < r.topk_group; ++j)
      for (int i = groups[j] * size; i < (groups[j] + 1) * size; ++i) allowed[i] = true;
  }
  std::vector<int> order;
  for (int i = 0; i < n; ++i)
    if (allowed[i]) order.push_back(i);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return sel[a] > sel[b]; });
  out.idx.assign(order.begin(), order.begin() + r.k);
  double picked = 0;
  for (int i : out.idx) picked += s[i];
  for (int i : out.idx) out.gate.push_back((r.renorm ? s[i] / picked : s[i]) * r.scale);
  double total = 0;
  for (double v : s) total += v;
  for (int i = 0; i < n; ++i) out.prob.push_back(r.sigmoid ? s[i] / total : s[i]);
  return out;
}

MoeConfig base_config(RouterKind router, std::int64_t experts, std::int64_t k) {
  MoeConfig c;
  c.d_model = 6, c.d_expert = 5, c.num_ffn_experts = experts, c.top_k = k;
  c.router = router;
  c.lbl_coef = 0.05, c.zloss_coef = 0.01;
  return c;
}

// The token-level functor of a router object against the reference, on random logits.
template <class R>
void check_functor(const MoeConfig& c, const RefRouter& ref, bool with_bias, unsigned seed) {
  const R router(c);
  const int n = int(c.num_experts());
  std::mt19937 g(seed);
  std::normal_distribution<double> nd(0.0, 1.5);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<double> l(n), bias(with_bias ? n : 0), prob(n), sel(n), gate(c.top_k);
    std::vector<int> idx(c.top_k);
    for (auto& v : l) v = nd(g);
    for (auto& v : bias) v = 0.3 * nd(g);
    const double lse = router::route_token_choice(router, l.data(), n, prob.data(), sel.data(), idx.data(), gate.data(),
                                                  with_bias ? bias.data() : nullptr);
    const RefRoute want = ref_route(ref, l, bias);
    CAPTURE(trial);
    CHECK(idx == want.idx);
    for (int j = 0; j < c.top_k; ++j) CHECK(gate[j] == doctest::Approx(want.gate[j]).epsilon(1e-12));
    for (int i = 0; i < n; ++i) CHECK(prob[i] == doctest::Approx(want.prob[i]).epsilon(1e-12));
    CHECK(lse == doctest::Approx(want.lse).epsilon(1e-12));
  }
}

// Central differences in double on every input and parameter element (layer_fd.hpp); and the layer's
// routing against the reference, token by token, from its own logits.
template <class Layer>
void check_layer(const MoeConfig& c, const RefRouter& ref, unsigned seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  Layer layer(c);
  layer.init_params(seed);
  std::vector<double> bias;
  if constexpr (router::router_traits<typename Layer::router_type>::selection_bias) {
    bias.resize(std::size_t(c.num_experts()));
    for (auto& v : bias) v = 0.2 * nd(g);
    layer.set_expert_bias(bias);
  }
  const int tokens = 11;
  std::vector<double> x(std::size_t(tokens * c.d_model)), dy(x.size());
  for (auto& v : x) v = nd(g);
  for (auto& v : dy) v = nd(g);
  std::vector<int> idx0;
  testing::layer_loss(layer, x, dy, &idx0);

  // The routing from the layer's own logits (the logits themselves: W_r x (+ b) by hand below).
  const auto weights = layer.weights();
  const int n = int(c.num_experts());
  for (int t = 0; t < tokens; ++t) {
    std::vector<double> l(n);
    for (int e = 0; e < n; ++e) {
      for (int i = 0; i < c.d_model; ++i) l[e] += weights["router"][std::size_t(e * c.d_model + i)] * x[std::size_t(t * c.d_model + i)];
      if (weights.has("router_bias")) l[e] += weights["router_bias"][std::size_t(e)];
      CHECK(layer.logits()(t, e) == doctest::Approx(l[e]).epsilon(1e-12));
    }
    const RefRoute want = ref_route(ref, l, bias);
    for (int j = 0; j < c.top_k; ++j) {
      CHECK(layer.topk_indices()(t, j) == want.idx[std::size_t(j)]);
      CHECK(layer.topk_gates()(t, j) == doctest::Approx(want.gate[std::size_t(j)]).epsilon(1e-12));
    }
  }

  const testing::FdCount fd = testing::check_layer_gradients(layer, x, dy);
  CHECK(fd.checked > 20 * fd.skipped);
  CHECK(fd.checked > 300);
}

using SoftmaxTopK = router::TopK<router::Softmax>;
using SigmoidTopK = router::TopK<router::Sigmoid>;
using Swiglu = experts::Ffn<act::SwiGLU>;

}  // namespace

TEST_CASE("gate rule: renormalize for both score functions, and the routed scaling factor") {
  for (RouterKind kind : {RouterKind::kSoftmax, RouterKind::kSigmoid})
    for (int renorm : {-1, 0, 1})  // unset (the router's default), false, true
      for (double scale : {1.0, 2.5}) {
        MoeConfig c = base_config(kind, 8, 3);
        if (renorm >= 0) c.renormalize = renorm == 1;
        if (scale != 1.0) c.options.set("routed_scaling_factor", scale);
        CAPTURE(to_string(kind));
        CAPTURE(renorm);
        CAPTURE(scale);
        RefRouter ref;
        ref.sigmoid = kind == RouterKind::kSigmoid, ref.k = 3, ref.scale = scale;
        ref.renorm = renorm >= 0 ? renorm == 1 : ref.sigmoid;  // the defaults: softmax no, sigmoid yes
        if (ref.sigmoid) {
          check_functor<SigmoidTopK>(c, ref, false, 3);
          check_layer<MoeLayer<backend::Host<double>, SigmoidTopK, Swiglu>>(c, ref, 5);
        } else {
          check_functor<SoftmaxTopK>(c, ref, false, 3);
          check_layer<MoeLayer<backend::Host<double>, SoftmaxTopK, Swiglu>>(c, ref, 5);
        }
      }
}

TEST_CASE("router::GroupLimited: DeepSeek-V2's max and DeepSeek-V3's top-2 sum, alone and under BiasBalanced") {
  SUBCASE("softmax, group score max (DeepSeek-V2)") {
    MoeConfig c = base_config(RouterKind::kSoftmax, 8, 2);
    c.options.set("n_group", 4), c.options.set("topk_group", 2), c.options.set("group_score", "max");
    RefRouter ref;
    ref.k = 2, ref.n_group = 4, ref.topk_group = 2, ref.top2 = false;
    check_functor<router::GroupLimited<SoftmaxTopK>>(c, ref, false, 7);
    check_layer<MoeLayer<backend::Host<double>, router::GroupLimited<SoftmaxTopK>, Swiglu>>(c, ref, 9);
  }
  SUBCASE("sigmoid, top-2 sum, expert bias and scaling (DeepSeek-V3)") {
    MoeConfig c = base_config(RouterKind::kSigmoid, 8, 3);
    c.expert_bias = true, c.lbl_coef = 0.0;
    c.options.set("n_group", 4), c.options.set("topk_group", 2), c.options.set("routed_scaling_factor", 2.5);
    RefRouter ref;
    ref.sigmoid = true, ref.renorm = true, ref.scale = 2.5, ref.k = 3, ref.n_group = 4, ref.topk_group = 2;
    using V3 = router::BiasBalanced<router::GroupLimited<SigmoidTopK>>;
    check_functor<V3>(c, ref, true, 11);
    check_layer<MoeLayer<backend::Host<double>, V3, Swiglu>>(c, ref, 13);
  }
}

TEST_CASE("router::BiasBalanced<GroupLimited<...>> scores the groups on s + b (its select calls the inner one)") {
  MoeConfig c = base_config(RouterKind::kSigmoid, 4, 1);
  c.expert_bias = true;
  c.options.set("n_group", 2), c.options.set("topk_group", 1), c.options.set("group_score", "max");
  const router::BiasBalanced<router::GroupLimited<SigmoidTopK>> r(c);
  const std::vector<double> l = {2.0, 1.9, 1.0, 0.9};  // group 0 wins on s alone
  std::vector<double> prob(4), sel(4), gate(1);
  std::vector<int> idx(1);
  const std::vector<double> none = {0, 0, 0, 0}, lift = {0, 0, 0.5, 0};  // the bias lifts expert 2 above expert 0
  router::route_token_choice(r, l.data(), 4, prob.data(), sel.data(), idx.data(), gate.data(), none.data());
  CHECK(idx[0] == 0);
  router::route_token_choice(r, l.data(), 4, prob.data(), sel.data(), idx.data(), gate.data(), lift.data());
  CHECK(idx[0] == 2);                  // group 1 now wins, and its best biased expert is picked
  CHECK(gate[0] == doctest::Approx(1.0));  // renormalised over the one pick; the bias never enters the gate
}

TEST_CASE("router::LinearBias: logits = W_r x + b, with b a trainable gate.bias (GPT-OSS)") {
  MoeConfig c = base_config(RouterKind::kSoftmax, 6, 2);
  c.renormalize = true;
  c.options.set("router_bias", true);
  using R = router::LinearBias<SoftmaxTopK>;
  const ParameterTable t = ParameterTable::of<R, Swiglu>(c);
  CHECK(t.specs()[0].name == "gate.weight");
  CHECK(t.specs()[1].name == "gate.bias");  // listed with the router weight
  CHECK(t.specs()[1].local_shape == std::vector<std::int64_t>{6});
  CHECK(t.specs()[1].fp32);  // it meets the fp32 logits: after the storage-typed part
  CHECK(t.specs()[1].offset == t.fp32_begin());
  RefRouter ref;
  ref.renorm = true, ref.k = 2;
  check_layer<MoeLayer<backend::Host<double>, R, Swiglu>>(c, ref, 17);
}

TEST_CASE("the runtime switch picks the routers by their choices, and refuses what it does not build") {
  auto picked = [](const MoeConfig& c) {
    return with_layer_type<backend::Host<float>>(c, []<class L>(std::type_identity<L>) {
      std::vector<std::string> k = router_choices<typename L::router_type>();
      return std::string(to_string(L::router_type::score::kind)) + (k.empty() ? "" : ":") +
             std::accumulate(k.begin(), k.end(), std::string(), [](std::string a, const std::string& b) { return a + b + ","; });
    });
  };
  MoeConfig c = base_config(RouterKind::kSigmoid, 8, 2);
  CHECK(picked(c) == "sigmoid");
  c.options.set("n_group", 4), c.options.set("topk_group", 2);
  CHECK(picked(c) == "sigmoid:n_group,");
  c.expert_bias = true;
  CHECK(picked(c) == "sigmoid:n_group,expert_bias,");
  c.gating_residual = true;  // not a row: a ConfigError naming what the config asks for
  CHECK_THROWS_AS(picked(c), ConfigError);
  MoeConfig b = base_config(RouterKind::kSoftmax, 8, 2);
  b.options.set("router_bias", true);
  CHECK(picked(b) == "softmax:router_bias,");
  b.router = RouterKind::kSigmoid;  // GPT-OSS's bias comes with softmax only
  CHECK_THROWS_AS(picked(b), ConfigError);
}

TEST_CASE("router options: each policy's rules, and keys no policy of the layer has, are ConfigErrors naming the key") {
  auto error_of = [](const MoeConfig& c, auto make) -> std::string {
    try {
      make(c);
    } catch (const ConfigError& e) {
      return e.field();
    }
    return "(none)";
  };
  using Grouped = MoeLayer<backend::Host<float>, router::GroupLimited<SoftmaxTopK>, Swiglu>;
  auto grouped = [](const MoeConfig& c) { Grouped l(c); };
  MoeConfig c = base_config(RouterKind::kSoftmax, 8, 2);
  c.options.set("n_group", 3);  // does not divide 8
  CHECK(error_of(c, grouped) == "n_group");
  c.options.set("n_group", 4), c.options.set("topk_group", 5);
  CHECK(error_of(c, grouped) == "topk_group");
  c.options.set("topk_group", 1), c.top_k = 3;  // > 1 group of 2 experts
  CHECK(error_of(c, grouped) == "top_k");
  c.top_k = 2, c.options.set("group_score", "mean");
  CHECK(error_of(c, grouped) == "group_score");
  c.options.set("group_score", "max"), c.options.set("n_group", 2.5);  // a double where an integer is wanted
  CHECK(error_of(c, grouped) == "n_group");
  c.options.set("n_group", 4);
  CHECK(error_of(c, grouped) == "(none)");
  c.options.set("routed_scaling_factor", 0.0);
  CHECK(error_of(c, grouped) == "routed_scaling_factor");
  c.options.erase("routed_scaling_factor");
  c.options.set("no_such_option", true);
  CHECK(error_of(c, grouped) == "no_such_option");

  using Plain = MoeLayer<backend::Host<float>, SoftmaxTopK, Swiglu>;
  auto plain = [](const MoeConfig& c) { Plain l(c); };
  MoeConfig p = base_config(RouterKind::kSoftmax, 8, 2);
  p.options.set("router_bias", true);  // asks for router::LinearBias, which the layer lacks
  CHECK(error_of(p, plain) == "router_bias");
  p.options.set("router_bias", false);
  CHECK(error_of(p, plain) == "(none)");
  p.options.erase("router_bias"), p.options.set("n_group", 4);  // n_group: GroupLimited's
  CHECK(error_of(p, plain) == "n_group");
}
