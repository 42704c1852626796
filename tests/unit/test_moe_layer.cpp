// Host MoE layer: forward against the naive double reference, gradients against finite differences,
// for every router x activation combination, with and without renormalisation and capacity.
#include <doctest/doctest.h>

#include <cmath>
#include <moekit/moe_layer.hpp>
#include <random>
#include <vector>

#include "../common/random.hpp"
#include "moe_reference.hpp"

using namespace moekit;
using SoftmaxTopK = router::TopK<router::Softmax>;
using SigmoidTopK = router::TopK<router::Sigmoid>;

namespace {

template <class Layer>
struct Traits;
template <class T, class R, class A>
struct Traits<MoeLayer<backend::Host<T>, R, experts::Ffn<A>>> {
  static constexpr RouterKind router = R::score::kind;
  static constexpr bool biased = router::router_traits<R>::selection_bias;
  static constexpr Activation activation = A::kind;
  static constexpr int act_index = A::kind == Activation::kSwiGLU ? 0 : A::kind == Activation::kGeLU ? 1 : 2;
};

MoeConfig make_config(RouterKind r, Activation a, bool renorm, double gamma, bool biased = false) {
  MoeConfig c;
  c.expert_bias = biased;
  c.d_model = 6;
  c.d_expert = 5;
  c.num_ffn_experts = 5;
  c.top_k = 2;
  c.router = r;
  c.activation = a;
  if (renorm) c.renormalize = true;  // unset: the router's default (the sigmoid router normalises)
  c.capacity_factor = gamma;
  c.lbl_coef = 0.3;
  c.zloss_coef = 0.05;
  return c;
}

using moekit_test::random_vec;

template <class Layer>
void load_weights(Layer& layer, const ref::Weights& w) {
  using T = typename Layer::value_type;
  auto cp = [](std::vector<T>& dst, const std::vector<double>& src) {
    REQUIRE(dst.size() == src.size());
    for (size_t i = 0; i < src.size(); ++i) dst[i] = T(src[i]);
  };
  auto lw = layer.weights();
  cp(lw["router"], w.router);
  cp(lw["w1"], w.w1);
  cp(lw["w2"], w.w2);
  if (lw.has("w3")) cp(lw["w3"], w.w3);
  else REQUIRE(w.w3.empty());
  layer.load_weights(lw);
}

ref::Weights random_weights(const MoeConfig& c, std::mt19937_64& g) {
  ref::Weights w;
  const size_t E = c.num_ffn_experts, D = c.d_model, F = c.d_expert;
  w.router = random_vec(E * D, g, 0.8);
  w.w1 = random_vec(E * F * D, g, 0.5);
  w.w2 = random_vec(E * D * F, g, 0.5);
  if (c.activation == Activation::kSwiGLU) w.w3 = random_vec(E * F * D, g, 0.5);
  return w;
}

double rel_err(const std::vector<double>& ref, const auto* got, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    num += (double(got[i]) - ref[i]) * (double(got[i]) - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
}

// router::BiasBalanced: a bias of the size of the scores' spread, so it changes the selection.
template <class Layer>
std::vector<double> maybe_set_bias(Layer& layer, std::mt19937_64& g) {
  if constexpr (router::router_traits<typename Layer::router_type>::selection_bias) {
    const std::vector<double> b = random_vec(size_t(layer.config().num_experts()), g, 0.3);
    std::vector<typename Layer::value_type> bt(b.begin(), b.end());
    layer.set_expert_bias(bt);
    return b;
  } else {
    return {};
  }
}

ref::Cfg ref_cfg(const MoeConfig& c, int act_index) {
  ref::Cfg r;
  r.D = int(c.d_model);
  r.F = int(c.d_expert);
  r.E = int(c.num_ffn_experts);
  r.K = int(c.top_k);
  r.sigmoid = c.router == RouterKind::kSigmoid;
  r.renorm = c.renormalize.value_or(false);
  r.act = act_index;
  r.gamma = c.capacity_factor;
  return r;
}

// Forward of `Layer` (float or double) against the reference on random data, T = 13 tokens.
template <class Layer>
void check_forward(bool renorm, double gamma, double tol) {
  using T = typename Layer::value_type;
  using Tr = Traits<Layer>;
  const MoeConfig c = make_config(Tr::router, Tr::activation, renorm, gamma, Tr::biased);
  std::mt19937_64 g(1234 + int(renorm) * 7 + int(gamma * 10));
  const int tokens = 13;
  const ref::Weights w = random_weights(c, g);
  const std::vector<double> x = random_vec(size_t(tokens) * c.d_model, g);
  Layer layer(c);
  load_weights(layer, w);
  ref::Cfg rc = ref_cfg(c, Tr::act_index);
  rc.bias = maybe_set_bias(layer, g);
  const ref::Out expect = ref::forward(rc, x, w, tokens);
  if (!rc.bias.empty()) {  // the bias must change some selection, or this would not test it
    const ref::Out unbiased = ref::forward(ref_cfg(c, Tr::act_index), x, w, tokens);
    CHECK(unbiased.idx != expect.idx);
  }
  std::vector<T> xt(x.begin(), x.end()), y(x.size(), T(std::nan("")));
  const AuxLosses aux = layer.forward(MatrixView<const T>(xt.data(), {tokens, c.d_model}),
                                      MatrixView<T>(y.data(), {tokens, c.d_model}));
  CHECK(rel_err(expect.y, y.data(), y.size()) < tol);
  CHECK(rel_err(expect.logits, layer.logits().data, expect.logits.size()) < tol);
  CHECK(rel_err(expect.gates, layer.topk_gates().data, expect.gates.size()) < tol);
  for (size_t s = 0; s < expect.idx.size(); ++s) CHECK(layer.topk_indices().data[s] == expect.idx[s]);
  for (int e = 0; e < c.num_ffn_experts; ++e) CHECK(layer.expert_counts().data[e] == expect.kept_count[e]);
  CHECK(aux.lbl == doctest::Approx(expect.lbl).epsilon(tol));
  CHECK(aux.zloss == doctest::Approx(expect.zloss).epsilon(tol));
  if (gamma > 0) {
    int dropped = 0;
    for (bool k : expect.kept) dropped += !k;
    CHECK(dropped > 0);  // the capacity case must actually drop something to test dropping
  }
}

// L = sum(y * dy) + lbl_coef * LBL + zloss_coef * zloss, evaluated by a forward pass.
template <class Layer>
double loss_of(Layer& layer, const std::vector<double>& x, const std::vector<double>& dy, std::vector<int>* idx = nullptr,
               std::vector<int>* counts = nullptr) {
  const auto& c = layer.config();
  const std::int64_t tokens = std::int64_t(x.size()) / c.d_model;
  std::vector<double> y(x.size());
  const AuxLosses aux = layer.forward(MatrixView<const double>(x.data(), {tokens, c.d_model}),
                                      MatrixView<double>(y.data(), {tokens, c.d_model}));
  double l = c.lbl_coef * aux.lbl + c.zloss_coef * aux.zloss;
  for (size_t i = 0; i < y.size(); ++i) l += y[i] * dy[i];
  if (idx) idx->assign(layer.topk_indices().data, layer.topk_indices().data + tokens * c.top_k);
  if (counts) counts->assign(layer.expert_counts().data, layer.expert_counts().data + c.num_ffn_experts);
  return l;
}

// Central differences in double, eps = 1e-6, on every input and parameter element.
// Tolerance: |analytic - numeric| <= 1e-6 + 1e-5 * |numeric|. Coordinates whose perturbation changes
// the routing or the capacity drops (a discontinuity) are skipped and counted.
template <class Layer>
void check_gradients(bool renorm, double gamma) {
  using Tr = Traits<Layer>;
  const MoeConfig c = make_config(Tr::router, Tr::activation, renorm, gamma, Tr::biased);
  std::mt19937_64 g(99 + int(renorm) + int(gamma * 10));
  const int tokens = 9;
  Layer layer(c);
  load_weights(layer, random_weights(c, g));
  maybe_set_bias(layer, g);
  std::vector<double> x = random_vec(size_t(tokens) * c.d_model, g);
  const std::vector<double> dy = random_vec(x.size(), g);

  std::vector<int> idx0, counts0;
  loss_of(layer, x, dy, &idx0, &counts0);
  layer.zero_grad();
  std::vector<double> dx(x.size());
  layer.backward(MatrixView<const double>(dy.data(), {tokens, c.d_model}), MatrixView<double>(dx.data(), {tokens, c.d_model}));

  const double eps = 1e-6;
  int checked = 0, skipped = 0;
  auto probe = [&](double* v, double analytic, const char* what, size_t i) {
    const double keep = *v;
    std::vector<int> ia, ib, ca, cb;
    *v = keep + eps;
    const double lp = loss_of(layer, x, dy, &ia, &ca);
    *v = keep - eps;
    const double lm = loss_of(layer, x, dy, &ib, &cb);
    *v = keep;
    if (ia != idx0 || ib != idx0 || ca != counts0 || cb != counts0) {
      ++skipped;
      return;
    }
    const double numeric = (lp - lm) / (2 * eps);
    INFO(what << "[" << i << "] analytic " << analytic << " numeric " << numeric);
    CHECK(std::abs(analytic - numeric) <= 1e-6 + 1e-5 * std::abs(numeric));
    ++checked;
  };
  for (size_t i = 0; i < x.size(); ++i) probe(&x[i], dx[i], "x", i);
  for (auto& p : layer.parameters()) {
    // Copy the analytic gradient first: forward passes below do not touch grads, but be explicit.
    const std::vector<double> grad(p.grad, p.grad + p.numel());
    for (std::int64_t i = 0; i < p.numel(); ++i) probe(&p.value[i], grad[i], p.name.c_str(), size_t(i));
  }
  CHECK(checked > 20 * skipped);
  CHECK(checked > 300);
}

}  // namespace

#define MOEKIT_ALL_LAYERS(T)                                                                        \
  MoeLayer<backend::Host<T>, SoftmaxTopK, experts::Ffn<act::SwiGLU>>,                              \
      MoeLayer<backend::Host<T>, SoftmaxTopK, experts::Ffn<act::GeLU>>,                            \
      MoeLayer<backend::Host<T>, SoftmaxTopK, experts::Ffn<act::ReLU>>,                            \
      MoeLayer<backend::Host<T>, SigmoidTopK, experts::Ffn<act::SwiGLU>>,                          \
      MoeLayer<backend::Host<T>, SigmoidTopK, experts::Ffn<act::GeLU>>,                            \
      MoeLayer<backend::Host<T>, SigmoidTopK, experts::Ffn<act::ReLU>>,                            \
      MoeLayer<backend::Host<T>, router::BiasBalanced<SoftmaxTopK>, experts::Ffn<act::SwiGLU>>,    \
      MoeLayer<backend::Host<T>, router::BiasBalanced<SigmoidTopK>, experts::Ffn<act::GeLU>>

TEST_CASE_TEMPLATE("forward matches the double reference (fp32 and fp64)", Layer, MOEKIT_ALL_LAYERS(float),
                   MOEKIT_ALL_LAYERS(double)) {
  const double tol = std::is_same_v<typename Layer::value_type, float> ? 1e-5 : 1e-12;
  for (bool renorm : {false, true})
    for (double gamma : {0.0, 1.0}) {
      CAPTURE(renorm);
      CAPTURE(gamma);
      check_forward<Layer>(renorm, gamma, tol);
    }
}

TEST_CASE_TEMPLATE("gradients match finite differences (fp64)", Layer, MOEKIT_ALL_LAYERS(double)) {
  for (bool renorm : {false, true})
    for (double gamma : {0.0, 1.0}) {
      CAPTURE(renorm);
      CAPTURE(gamma);
      check_gradients<Layer>(renorm, gamma);
    }
}
