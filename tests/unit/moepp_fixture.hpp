#pragma once
// Shared fixture of the MoE++ host tests (test_moepp.cpp, test_moepp_cases.cpp): layer types by
// spec, configs, problems, and the forward/gradient checks against moepp_reference.hpp.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <moekit/moe_layer.hpp>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "moepp_reference.hpp"

using namespace moekit;

namespace {

template <class A>
using AllZc = experts::Set<experts::Ffn<A>, experts::Zero, experts::Copy, experts::Constant>;

// A layer type from plain flags, so the test (and the oracle) never reads the policies' own traits.
template <class T, bool Sigmoid, bool Residual, int ActIndex>
struct Spec {
  using value_type = T;
  using Score = std::conditional_t<Sigmoid, router::Sigmoid, router::Softmax>;
  using Router = std::conditional_t<Residual, router::GatingResidual<router::TopK<Score>>, router::TopK<Score>>;
  using Act = std::conditional_t<ActIndex == 0, act::SwiGLU, std::conditional_t<ActIndex == 1, act::GeLU, act::ReLU>>;
  using Layer = MoeLayer<backend::Host<T>, Router, AllZc<Act>>;
  static constexpr bool sigmoid = Sigmoid, residual = Residual;
  static constexpr int act = ActIndex;
};

struct Problem {
  refpp::Cfg rc;
  refpp::Weights w;
  bool residual = false;
  int T = 0;
  std::vector<double> x, prev;  // prev empty: no previous layer's logits
  const std::vector<double>* prev_ptr() const { return prev.empty() ? nullptr : &prev; }
};

MoeConfig to_config(const refpp::Cfg& r, bool residual) {
  MoeConfig c;
  c.d_model = r.D;
  c.d_expert = r.F;
  c.num_ffn_experts = r.n_ffn;
  c.num_zero_experts = r.n_zero;
  c.num_copy_experts = r.n_copy;
  c.num_constant_experts = r.n_const;
  c.top_k = r.K;
  c.router = r.sigmoid ? RouterKind::kSigmoid : RouterKind::kSoftmax;
  c.gating_residual = residual;
  if (r.renorm) c.renormalize = true;  // unset: the router's default (the sigmoid router normalises)
  c.activation = r.act == 0 ? Activation::kSwiGLU : r.act == 1 ? Activation::kGeLU : Activation::kReLU;
  c.capacity_factor = r.gamma;
  c.tau = r.tau;
  c.lbl_coef = 0.3;
  c.zloss_coef = 0.05;
  return c;
}

// 3 FFN + 1 zero + 1 copy + 2 constant experts.
refpp::Cfg mixed_cfg(bool sigmoid, int act, int K, double gamma, double tau, bool renorm) {
  refpp::Cfg r;
  r.D = 6;
  r.F = 5;
  r.n_ffn = 3;
  r.n_zero = 1;
  r.n_copy = 1;
  r.n_const = 2;
  r.K = K;
  r.sigmoid = sigmoid;
  r.renorm = renorm;
  r.act = act;
  r.gamma = gamma;
  r.tau = tau;
  return r;
}

// Values rounded to T first, so the fp32 layer and the double reference see the same numbers.
template <class T>
void round_to(std::vector<double>& v) {
  for (auto& x : v) x = double(T(x));
}

template <class T>
Problem make_problem(const refpp::Cfg& rc, bool residual, bool give_prev, int tokens, std::uint64_t seed) {
  std::mt19937_64 g(seed);
  Problem p;
  p.rc = rc;
  p.residual = residual;
  p.T = tokens;
  p.w = refpp::random_weights(rc, g, residual);
  p.x = refpp::random_vec(size_t(tokens) * rc.D, g);
  if (give_prev) p.prev = refpp::random_vec(size_t(tokens) * rc.E(), g, 1.0);
  for (auto* v : {&p.w.router, &p.w.w1, &p.w.w2, &p.w.w3, &p.w.wc, &p.w.v, &p.w.wg, &p.x, &p.prev}) round_to<T>(*v);
  return p;
}

// Copies the weights into the layer by parameter name, checking the names and shapes of the spec.
template <class Layer>
void load(Layer& layer, const Problem& p) {
  const std::string err = refpp::load_named(layer, refpp::named_weights(p.rc, p.w, p.residual));
  INFO(err);
  REQUIRE(err.empty());
}

template <class Layer, class T = typename Layer::value_type>
AuxLosses run_forward(Layer& layer, const Problem& p, const std::vector<T>& x, const std::vector<T>& prev, std::vector<T>& y) {
  const std::int64_t n = p.rc.E(), d = p.rc.D, t = p.T;
  y.assign(size_t(t * d), T(std::nan("")));  // poisoned: every element must be written
  MatrixView<const T> pv;
  if (!prev.empty()) pv = MatrixView<const T>(prev.data(), {t, n});
  return layer.forward(MatrixView<const T>(x.data(), {t, d}), MatrixView<T>(y.data(), {t, d}), pv);
}

double rel_err(const std::vector<double>& ref, const auto* got, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    num += (double(got[i]) - ref[i]) * (double(got[i]) - ref[i]);
    den += ref[i] * ref[i];
  }
  if (!(num == num)) return std::numeric_limits<double>::infinity();  // NaN
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
}

struct Coverage {  // over several forwards: did every kind get routed, and did drops happen
  std::int64_t ffn_drops = 0, zc_drops = 0, zero = 0, copy = 0, constant = 0;
};

// Everything the layer reports after a forward against the reference.
template <class Layer>
void compare_forward(Layer& layer, const Problem& p, const refpp::Out& expect, const AuxLosses& aux,
                     const std::vector<typename Layer::value_type>& y, double tol, Coverage* cov = nullptr) {
  const auto& rc = p.rc;
  const int E = rc.E(), K = rc.K;
  CHECK(rel_err(expect.y, y.data(), y.size()) < tol);
  CHECK(rel_err(expect.logits, layer.logits().data, expect.logits.size()) < tol);
  CHECK(rel_err(expect.probs, layer.probs().data, expect.probs.size()) < tol);
  CHECK(rel_err(expect.gates, layer.topk_gates().data, expect.gates.size()) < tol);
  for (int s = 0; s < p.T * K; ++s) {
    CHECK(layer.topk_indices().data[s] == expect.idx[s]);
    CHECK(layer.slot_kept(s / K, s % K) == bool(expect.kept[s]));
  }
  REQUIRE(layer.routed_counts().size() == size_t(E));
  for (int e = 0; e < E; ++e) {
    CHECK(layer.expert_counts().data[e] == expect.kept_count[e]);
    CHECK(layer.routed_counts()[e] == expect.routed[e]);
  }
  CHECK(aux.lbl == doctest::Approx(expect.lbl).epsilon(tol));
  CHECK(aux.zloss == doctest::Approx(expect.zloss).epsilon(tol));
  CHECK(layer.aux().lbl == aux.lbl);
  if (cov) {
    for (int e = 0; e < E; ++e) {
      const auto dropped = expect.routed[e] - expect.kept_count[e];
      (rc.kind(e) == refpp::Kind::kFfn ? cov->ffn_drops : cov->zc_drops) += dropped;
      if (rc.kind(e) == refpp::Kind::kZero) cov->zero += expect.kept_count[e];
      if (rc.kind(e) == refpp::Kind::kCopy) cov->copy += expect.kept_count[e];
      if (rc.kind(e) == refpp::Kind::kConstant) cov->constant += expect.kept_count[e];
    }
  }
}

template <class S>
void check_forward(const Problem& p, double tol, Coverage* cov) {
  using T = typename S::value_type;
  const refpp::Out expect = refpp::forward(p.rc, p.x, p.w, p.T, p.prev_ptr());
  typename S::Layer layer(to_config(p.rc, p.residual));
  load(layer, p);
  const std::vector<T> x(p.x.begin(), p.x.end()), prev(p.prev.begin(), p.prev.end());
  std::vector<T> y;
  const AuxLosses aux = run_forward(layer, p, x, prev, y);
  compare_forward(layer, p, expect, aux, y, tol, cov);
  if (p.rc.gamma > 0) {
    // Kept counts never exceed the MoE++ capacities and equal min(routed, C).
    for (int e = 0; e < p.rc.E(); ++e) {
      const std::int64_t cap = p.rc.kind(e) == refpp::Kind::kFfn ? expect.cap_ffn : expect.cap_zc;
      CHECK(layer.expert_counts().data[e] <= cap);
      CHECK(layer.expert_counts().data[e] == std::min<std::int64_t>(layer.routed_counts()[e], cap));
    }
  }
}

// ---- finite differences --------------------------------------------------------------------------

struct Routing {
  std::vector<int> idx;
  std::vector<char> kept;
  bool operator==(const Routing&) const = default;
};

struct FdInputs {
  std::vector<double> dy, dlogits_next;
  double aux_scale = 1.0;
};

// L = sum(y * dy) + aux_scale * (lbl_coef * LBL + zloss_coef * zloss) + sum(logits * dlogits_next).
template <class Layer>
double loss_of(Layer& layer, const Problem& p, const std::vector<double>& x, const std::vector<double>& prev,
               const FdInputs& in, Routing* r) {
  std::vector<double> y;
  const AuxLosses aux = run_forward(layer, p, x, prev, y);
  const auto& c = layer.config();
  double l = in.aux_scale * (c.lbl_coef * aux.lbl + c.zloss_coef * aux.zloss);
  for (size_t i = 0; i < y.size(); ++i) l += y[i] * in.dy[i];
  for (size_t i = 0; i < in.dlogits_next.size(); ++i) l += layer.logits().data[i] * in.dlogits_next[i];
  if (r) {
    const int K = p.rc.K;
    r->idx.assign(layer.topk_indices().data, layer.topk_indices().data + p.T * K);
    r->kept.resize(size_t(p.T) * K);
    for (int s = 0; s < p.T * K; ++s) r->kept[s] = layer.slot_kept(s / K, s % K);
  }
  return l;
}

struct FdStats {
  int checked = 0, skipped = 0;
  std::map<std::string, double> max_grad;  // per parameter (and "x", "prev_logits"): largest |analytic|
};

// Central differences in double, eps = 1e-6, on every element of x, prev_logits and every parameter.
// Tolerance |analytic - numeric| <= 1e-6 + 1e-5 |numeric|. A coordinate whose perturbation changes the
// routing or the capacity drops (a discontinuity) is skipped and counted.
template <class Layer>
void check_gradients(const Problem& p0, double aux_scale, bool use_dlogits_next, FdStats& st, std::uint64_t seed) {
  Problem p = p0;
  std::mt19937_64 g(seed);
  FdInputs in;
  in.aux_scale = aux_scale;
  in.dy = refpp::random_vec(p.x.size(), g);
  if (use_dlogits_next) in.dlogits_next = refpp::random_vec(size_t(p.T) * p.rc.E(), g, 0.5);
  const std::int64_t t = p.T, d = p.rc.D, n = p.rc.E();

  Layer layer(to_config(p.rc, p.residual));
  load(layer, p);
  Routing r0;
  const double l0 = loss_of(layer, p, p.x, p.prev, in, &r0);
  REQUIRE(std::isfinite(l0));
  layer.zero_grad();
  std::vector<double> dx(p.x.size(), std::nan("")), dprev(p.prev.size(), std::nan(""));
  MatrixView<const double> dln;
  if (use_dlogits_next) dln = MatrixView<const double>(in.dlogits_next.data(), {t, n});
  MatrixView<double> dpv;
  if (!p.prev.empty()) dpv = MatrixView<double>(dprev.data(), {t, n});
  layer.backward(MatrixView<const double>(in.dy.data(), {t, d}), MatrixView<double>(dx.data(), {t, d}), aux_scale, dln, dpv);

  const double eps = 1e-6;
  auto probe = [&](double* v, double analytic, const std::string& what, size_t i) {
    st.max_grad[what] = std::max(st.max_grad[what], std::abs(analytic));
    const double keep = *v;
    Routing ra, rb;
    *v = keep + eps;
    const double lp = loss_of(layer, p, p.x, p.prev, in, &ra);
    *v = keep - eps;
    const double lm = loss_of(layer, p, p.x, p.prev, in, &rb);
    *v = keep;
    if (!(ra == r0) || !(rb == r0)) {
      ++st.skipped;
      return;
    }
    const double numeric = (lp - lm) / (2 * eps);
    INFO(what << "[" << i << "] analytic " << analytic << " numeric " << numeric);
    CHECK(std::abs(analytic - numeric) <= 1e-6 + 1e-5 * std::abs(numeric));
    ++st.checked;
  };
  for (size_t i = 0; i < p.x.size(); ++i) probe(&p.x[i], dx[i], "x", i);
  for (size_t i = 0; i < p.prev.size(); ++i) probe(&p.prev[i], dprev[i], "prev_logits", i);
  for (auto& prm : layer.parameters()) {
    const std::vector<double> grad(prm.grad, prm.grad + prm.numel());
    if (prm.name == "gate_residual.weight" && p.prev.empty())
      for (double gr : grad) CHECK(gr == 0.0);  // the first MoE layer's logits do not depend on W_g
    for (std::int64_t i = 0; i < prm.numel(); ++i) probe(&prm.value[i], grad[size_t(i)], prm.name, size_t(i));
  }
}

#define MOEPP_SPECS(T)                                                                                   \
  Spec<T, false, false, 0>, Spec<T, false, true, 0>, Spec<T, true, false, 1>, Spec<T, true, true, 0>, \
      Spec<T, false, true, 2>

}  // namespace

