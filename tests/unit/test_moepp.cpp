// MoE++ layers on the host (issue 3): zero/copy/constant experts, the gating residual, MoE++ capacities
// and the heterogeneous LBL. Forward against the naive double reference (moepp_reference.hpp), gradients
// against central finite differences, capacities and a constant expert against numbers worked by hand,
// the expert-GEMM FLOP counter, and the configuration errors.
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
  c.renormalize = r.renorm;
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

TEST_CASE_TEMPLATE("MoE++ forward matches the double reference (fp32 and fp64)", S, MOEPP_SPECS(float),
                   MOEPP_SPECS(double)) {
  using T = typename S::value_type;
  const double tol = std::is_same_v<T, float> ? 1e-5 : 1e-12;
  Coverage cov;
  int cases = 0;
  for (int K : {2, 3})
    for (bool give_prev : {false, true})
      for (double gamma : {0.0, 0.7})
        for (bool renorm : {false, true}) {
          if (give_prev && !S::residual) continue;
          if (renorm && S::sigmoid) continue;  // sigmoid gates are always normalised
          CAPTURE(K);
          CAPTURE(give_prev);
          CAPTURE(gamma);
          CAPTURE(renorm);
          const refpp::Cfg rc = mixed_cfg(S::sigmoid, S::act, K, gamma, 0.75, renorm);
          const Problem p = make_problem<T>(rc, S::residual, give_prev, 13, 1000 + 17 * cases);
          check_forward<S>(p, tol, &cov);
          ++cases;
        }
  // The cases must exercise every expert kind and drops in both FFN and ZC experts.
  CHECK(cov.zero > 0);
  CHECK(cov.copy > 0);
  CHECK(cov.constant > 0);
  CHECK(cov.ffn_drops > 0);
  CHECK(cov.zc_drops > 0);
}

TEST_CASE_TEMPLATE("MoE++ gradients match finite differences (fp64)", S, MOEPP_SPECS(double)) {
  FdStats st;
  struct Case {
    int K;
    bool give_prev;
    double gamma, tau, aux_scale;
    bool renorm, dln;
  };
  const Case cases[] = {
      {2, true, 0.0, 0.75, 1.0, false, true},
      {3, true, 0.7, 1.3, 0.7, true, true},
      {2, false, 0.0, 0.75, 1.0, false, false},
      {3, false, 0.9, 0.5, 1.0, false, true},
  };
  int i = 0;
  for (const Case& c : cases) {
    CAPTURE(i);
    const refpp::Cfg rc = mixed_cfg(S::sigmoid, S::act, c.K, c.gamma, c.tau, c.renorm && !S::sigmoid);
    const Problem p = make_problem<double>(rc, S::residual, c.give_prev && S::residual, 12, 500 + 31 * i);
    check_gradients<typename S::Layer>(p, c.aux_scale, c.dln, st, 77 + i);
    ++i;
  }
  INFO("checked " << st.checked << " skipped " << st.skipped);
  CHECK(st.checked > 10 * st.skipped);
  CHECK(st.checked > 1000);
  // Every parameter (and input) must have had a nonzero gradient somewhere, or its check proved nothing.
  std::vector<std::string> must = {"x", "gate.weight", "experts.0.w1.weight", "experts.2.w2.weight",
                                   "constant.0.wc.weight", "constant.0.v", "constant.1.wc.weight", "constant.1.v"};
  if (S::residual) {
    must.push_back("prev_logits");
    must.push_back("gate_residual.weight");
  }
  for (const auto& name : must) {
    INFO(name);
    CHECK(st.max_grad[name] > 1e-6);
  }
}

TEST_CASE("MoE++ gradients with every token on zero-computation experts (fp64)") {
  using S = Spec<double, false, true, 0>;
  refpp::Cfg rc = mixed_cfg(false, 0, 2, 0.0, 0.75, false);
  Problem p = make_problem<double>(rc, true, true, 10, 4242);
  for (auto& v : p.x) v = 0.5 + std::abs(v) * 0.3;  // positive inputs
  for (int e = 0; e < rc.n_ffn; ++e)
    for (int i = 0; i < rc.D; ++i) p.w.router[size_t(e) * rc.D + i] = -20.0;
  for (auto& v : p.prev) v *= 0.1;
  const refpp::Out expect = refpp::forward(rc, p.x, p.w, p.T, p.prev_ptr());
  for (int s = 0; s < p.T * rc.K; ++s) REQUIRE(expect.idx[s] >= rc.n_ffn);
  FdStats st;
  check_gradients<S::Layer>(p, 1.0, true, st, 9);
  CHECK(st.checked > 10 * st.skipped);
  CHECK(st.max_grad["experts.0.w1.weight"] == 0.0);  // no FFN expert saw a token
  CHECK(st.max_grad["constant.0.v"] + st.max_grad["constant.1.v"] > 1e-6);
}

// The heterogeneous LBL with tau = 1 and no ZC experts is the Switch LBL N_E sum_i f_i P_i.
TEST_CASE("tau = 1 and N_ZC = 0: the LBL is the Switch loss") {
  refpp::Cfg rc;
  rc.D = 6;
  rc.F = 4;
  rc.n_ffn = 5;
  rc.K = 2;
  rc.act = 0;
  const int T = 11;
  for (double tau : {1.0, 0.5}) {  // tau weighs only ZC experts: with none, any tau gives the Switch loss
    rc.tau = tau;
    CAPTURE(tau);
    std::mt19937_64 g(31);
    Problem p;
    p.rc = rc;
    p.T = T;
    p.w = refpp::random_weights(rc, g, false);
    p.x = refpp::random_vec(size_t(T) * rc.D, g);
    auto check = [&](auto& layer) {
      load(layer, p);
      std::vector<double> y;
      const AuxLosses aux = run_forward(layer, p, p.x, {}, y);
      // f_i = c_i / (k T) from the routed picks, P_i = mean softmax prob, computed here.
      const int E = rc.n_ffn;
      std::vector<double> f(E, 0.0), P(E, 0.0);
      for (int t = 0; t < T; ++t) {
        for (int j = 0; j < rc.K; ++j) f[layer.topk_indices()(t, j)] += 1.0 / (rc.K * T);
        for (int e = 0; e < E; ++e) P[e] += layer.probs()(t, e) / T;
      }
      double switch_lbl = 0;
      for (int e = 0; e < E; ++e) switch_lbl += f[e] * P[e];
      switch_lbl *= E;
      CHECK(aux.lbl == doctest::Approx(switch_lbl).epsilon(1e-12));
      CHECK(aux.lbl == doctest::Approx(refpp::forward(rc, p.x, p.w, T).lbl).epsilon(1e-12));
    };
    MoeConfig c = to_config(rc, false);
    MoeLayer<backend::Host<double>, router::TopK<router::Softmax>, experts::Ffn<act::SwiGLU>> plain(c);
    check(plain);
    MoeLayer<backend::Host<double>, router::TopK<router::Softmax>, AllZc<act::SwiGLU>> set_without_zc(c);
    check(set_without_zc);
  }
}

// gamma = 1.1, tau = 0.75, k = 2, T = 10, N_FFN = 4, N_ZC = 2 (1 zero + 1 copy):
//   tau N_FFN + N_ZC = 0.75 * 4 + 2 = 5
//   C_FFN = ceil(gamma tau k T / 5) = ceil(1.1 * 0.75 * 2 * 10 / 5) = ceil(16.5 / 5) = ceil(3.3) = 4
//   C_ZC  = ceil(gamma k T / 5)     = ceil(1.1 * 2 * 10 / 5)        = ceil(22 / 5)   = ceil(4.4) = 5
TEST_CASE("MoE++ capacities worked by hand") {
  refpp::Cfg rc;
  rc.D = 2;
  rc.F = 3;
  rc.n_ffn = 4;
  rc.n_zero = 1;
  rc.n_copy = 1;
  rc.K = 2;
  rc.act = 2;
  rc.gamma = 1.1;
  rc.tau = 0.75;
  const int T = 10;
  CHECK(refpp::capacity(rc, T, true) == 4);
  CHECK(refpp::capacity(rc, T, false) == 5);
  using Layer = MoeLayer<backend::Host<double>, router::TopK<router::Softmax>,
                         experts::Set<experts::Ffn<act::ReLU>, experts::Zero, experts::Copy>>;

  SUBCASE("random routing: kept = min(routed, C)") {
    for (int seed = 0; seed < 6; ++seed) {
      CAPTURE(seed);
      const Problem p = make_problem<double>(rc, false, false, T, 300 + seed);
      Layer layer(to_config(rc, false));
      load(layer, p);
      std::vector<double> y;
      const AuxLosses aux = run_forward(layer, p, p.x, {}, y);
      compare_forward(layer, p, refpp::forward(rc, p.x, p.w, T), aux, y, 1e-12);
      for (int e = 0; e < rc.E(); ++e) {
        const std::int64_t cap = e < rc.n_ffn ? 4 : 5;
        CHECK(layer.expert_counts()(e) <= cap);
        CHECK(layer.expert_counts()(e) == std::min<std::int64_t>(layer.routed_counts()[e], cap));
      }
    }
  }

  // Every token picks FFN expert 0 first and the zero expert (index 4) second: router rows e0 = [3, 1],
  // e4 = [1.5, -1], others 0, and x_t = [1, u_t] with u_t in [-0.5, 0.5], so logits are 3 + u_t,
  // 1.5 - u_t and 0. p_0 = 1 / (1 + e^(-1.5-2u) + 4 e^(-3-u)) grows with u_t and
  // p_4 = 1 / (e^(1.5+2u) + 1 + 4 e^(u-1.5)) shrinks with it: expert 0 keeps the 4 tokens of largest u,
  // the zero expert the 5 of smallest u.
  SUBCASE("all tokens on two experts: the lowest scores are dropped") {
    Problem p;
    p.rc = rc;
    p.T = T;
    std::mt19937_64 g(5);
    p.w = refpp::random_weights(rc, g, false);
    p.w.router = {3, 1, 0, 0, 0, 0, 0, 0, 1.5, -1, 0, 0};
    const double u[T] = {0.31, -0.12, 0.44, -0.47, 0.05, 0.22, -0.33, 0.18, -0.02, 0.39};
    for (int t = 0; t < T; ++t) p.x.insert(p.x.end(), {1.0, u[t]});
    Layer layer(to_config(rc, false));
    load(layer, p);
    std::vector<double> y;
    const AuxLosses aux = run_forward(layer, p, p.x, {}, y);
    compare_forward(layer, p, refpp::forward(rc, p.x, p.w, T), aux, y, 1e-12);
    CHECK(layer.routed_counts()[0] == 10);
    CHECK(layer.routed_counts()[4] == 10);
    CHECK(layer.expert_counts()(0) == 4);
    CHECK(layer.expert_counts()(4) == 5);
    // u sorted: 0.44(t2) 0.39(t9) 0.31(t0) 0.22(t5) | 0.18(t7) 0.05(t4) -0.02(t8) -0.12(t1) -0.33(t6) -0.47(t3)
    const bool keep0[T] = {true, false, true, false, false, true, false, false, false, true};
    const bool keep4[T] = {false, true, false, true, true, false, true, false, true, false};
    for (int t = 0; t < T; ++t) {
      CAPTURE(t);
      REQUIRE(layer.topk_indices()(t, 0) == 0);
      REQUIRE(layer.topk_indices()(t, 1) == 4);
      CHECK(layer.slot_kept(t, 0) == keep0[t]);
      CHECK(layer.slot_kept(t, 1) == keep4[t]);
      if (!keep0[t])  // the zero expert adds nothing and the FFN slot was dropped
        for (int i = 0; i < rc.D; ++i) CHECK(y[size_t(t) * rc.D + i] == 0.0);
    }
  }

  // Identical tokens (exact logits: x = [1, 0], dyadic router) have equal scores: the later tokens are
  // dropped, so expert 0 keeps tokens 0..3 and the zero expert tokens 0..4.
  SUBCASE("equal scores: later tokens are dropped") {
    Problem p;
    p.rc = rc;
    p.T = T;
    std::mt19937_64 g(6);
    p.w = refpp::random_weights(rc, g, false);
    p.w.router = {2, 0, 0, 0, 0, 0, 0, 0, 1.5, 0, 0, 0};
    for (int t = 0; t < T; ++t) p.x.insert(p.x.end(), {1.0, 0.0});
    Layer layer(to_config(rc, false));
    load(layer, p);
    std::vector<double> y;
    const AuxLosses aux = run_forward(layer, p, p.x, {}, y);
    compare_forward(layer, p, refpp::forward(rc, p.x, p.w, T), aux, y, 1e-12);
    for (int t = 0; t < T; ++t) {
      CAPTURE(t);
      CHECK(layer.slot_kept(t, 0) == (t < 4));
      CHECK(layer.slot_kept(t, 1) == (t < 5));
    }
  }
}

// D = 2, Wc = [[1, 1], [0, 0]], v = [2, -4]; top-1 with renormalisation, so the gate is 1 and y = E(x).
//   x = [0.5, 0.5]:   Wc x = [1, 0], [a1, a2] = [e/(e+1), 1/(e+1)] = [0.7310585786, 0.2689414214]
//                     y = a1 x + a2 v = [0.9034121320549926, -0.710236396164978]
//   x = [0.25, -0.25]: Wc x = [0, 0], [a1, a2] = [0.5, 0.5], y = [0.125 + 1, -0.125 - 2] = [1.125, -2.125]
// The router (gate.weight = [[0, 0], [4, 0]]) sends both tokens to the constant expert (logit 2 or 1 > 0).
TEST_CASE("constant expert output worked by hand") {
  refpp::Cfg rc;
  rc.D = 2;
  rc.F = 1;
  rc.n_ffn = 1;
  rc.n_const = 1;
  rc.K = 1;
  rc.renorm = true;
  rc.act = 0;
  Problem p;
  p.rc = rc;
  p.T = 2;
  p.w.router = {0, 0, 4, 0};
  p.w.w1 = {0.3, -0.2};
  p.w.w2 = {0.5, 0.1};
  p.w.w3 = {0.7, 0.4};
  p.w.wc = {1, 1, 0, 0};
  p.w.v = {2, -4};
  p.x = {0.5, 0.5, 0.25, -0.25};
  const std::vector<double> expect_y = {0.9034121320549926, -0.710236396164978, 1.125, -2.125};
  const refpp::Out r = refpp::forward(rc, p.x, p.w, p.T);
  for (int i = 0; i < 4; ++i) CHECK(r.y[i] == doctest::Approx(expect_y[i]).epsilon(1e-14));
  MoeLayer<backend::Host<double>, router::TopK<router::Softmax>, experts::Set<experts::Ffn<act::SwiGLU>, experts::Constant>>
      layer(to_config(rc, false));
  load(layer, p);
  std::vector<double> y;
  run_forward(layer, p, p.x, {}, y);
  CHECK(layer.topk_indices()(0, 0) == 1);
  CHECK(layer.topk_indices()(1, 0) == 1);
  for (int i = 0; i < 4; ++i) CHECK(y[i] == doctest::Approx(expect_y[i]).epsilon(1e-14));
  CHECK(layer.expert_gemm_flops() == 0);
  CHECK(layer.ffn_rows() == 0);
}

TEST_CASE_TEMPLATE("expert GEMM FLOPs: none when every token goes to zero-computation experts", S,
                   Spec<double, false, false, 0>, Spec<double, true, true, 1>, Spec<float, false, true, 2>) {
  using T = typename S::value_type;
  for (int K : {2, 3}) {
    CAPTURE(K);
    const refpp::Cfg rc = mixed_cfg(S::sigmoid, S::act, K, 0.0, 0.75, false);
    Problem p = make_problem<T>(rc, S::residual, S::residual, 12, 900 + K);
    // Positive inputs and FFN router rows of -20: FFN logits near -20 * sum(x) are never among the top k.
    for (auto& v : p.x) v = double(T(0.5 + 0.3 * std::abs(v)));
    for (int e = 0; e < rc.n_ffn; ++e)
      for (int i = 0; i < rc.D; ++i) p.w.router[size_t(e) * rc.D + i] = -20.0;
    for (auto& v : p.prev) v = double(T(0.1 * v));
    const refpp::Out expect = refpp::forward(rc, p.x, p.w, p.T, p.prev_ptr());
    for (int s = 0; s < p.T * K; ++s) REQUIRE(expect.idx[s] >= rc.n_ffn);
    typename S::Layer layer(to_config(rc, S::residual));
    load(layer, p);
    const std::vector<T> x(p.x.begin(), p.x.end()), prev(p.prev.begin(), p.prev.end());
    std::vector<T> y;
    const AuxLosses aux = run_forward(layer, p, x, prev, y);
    compare_forward(layer, p, expect, aux, y, std::is_same_v<T, float> ? 1e-5 : 1e-12);
    CHECK(layer.expert_gemm_flops() == 0);
    CHECK(layer.ffn_rows() == 0);
    // Backward runs and leaves the FFN weights' gradients at 0.
    layer.zero_grad();
    std::vector<T> dy(y.size(), T(1)), dx(y.size(), T(std::nan("")));
    layer.backward(MatrixView<const T>(dy.data(), {p.T, rc.D}), MatrixView<T>(dx.data(), {p.T, rc.D}));
    for (T v : dx) CHECK(std::isfinite(double(v)));
    for (auto& prm : layer.parameters())
      if (prm.name.rfind("experts.", 0) == 0)
        for (std::int64_t i = 0; i < prm.numel(); ++i) CHECK(prm.grad[i] == T(0));
  }
}

TEST_CASE_TEMPLATE("expert GEMM FLOPs counted from the FFN rows", S, Spec<double, false, false, 0>,
                   Spec<double, false, true, 1>, Spec<double, true, false, 2>, Spec<float, true, true, 0>) {
  using T = typename S::value_type;
  int n = 0;
  for (double gamma : {0.0, 0.7})
    for (int K : {2, 3}) {
      CAPTURE(gamma);
      CAPTURE(K);
      const refpp::Cfg rc = mixed_cfg(S::sigmoid, S::act, K, gamma, 0.75, false);
      const Problem p = make_problem<T>(rc, S::residual, S::residual, 13, 700 + n++);
      const refpp::Out expect = refpp::forward(rc, p.x, p.w, p.T, p.prev_ptr());
      std::int64_t rows = 0;
      for (int e = 0; e < rc.n_ffn; ++e) rows += expect.kept_count[e];
      REQUIRE(rows > 0);
      typename S::Layer layer(to_config(rc, S::residual));
      load(layer, p);
      const std::vector<T> x(p.x.begin(), p.x.end()), prev(p.prev.begin(), p.prev.end());
      std::vector<T> y;
      run_forward(layer, p, x, prev, y);
      CHECK(layer.ffn_rows() == rows);
      // SwiGLU: W1, W3 [rows x D -> F] and W2 [rows x F -> D]: 3 GEMMs of 2 rows D F; GeLU/ReLU: 2.
      const std::int64_t gemms = S::act == 0 ? 3 : 2;
      CHECK(layer.expert_gemm_flops() == 2 * layer.ffn_rows() * rc.D * rc.F * gemms);
      CHECK(layer.expert_gemm_flops() == 2 * rows * rc.D * rc.F * gemms);
    }
}

TEST_CASE("MoE++ configuration errors") {
  using SoftmaxTopK = router::TopK<router::Softmax>;
  using Residual = router::GatingResidual<SoftmaxTopK>;
  using PlainFfn = MoeLayer<backend::Host<double>, SoftmaxTopK, experts::Ffn<act::SwiGLU>>;
  using Mixed = MoeLayer<backend::Host<double>, SoftmaxTopK, AllZc<act::SwiGLU>>;
  using MixedResidual = MoeLayer<backend::Host<double>, Residual, AllZc<act::SwiGLU>>;
  const MoeConfig base = to_config(mixed_cfg(false, 0, 2, 0.0, 0.75, false), false);
  auto names = [](const ConfigError& e, const std::string& field) {
    return std::string(e.what()).find(field) != std::string::npos;
  };

  SUBCASE("a zero-computation count with experts::Ffn alone, or a kind missing from the Set") {
    MoeConfig c = base;
    c.num_zero_experts = c.num_copy_experts = c.num_constant_experts = 0;
    CHECK_NOTHROW(PlainFfn{c});
    for (int kind = 0; kind < 3; ++kind) {
      MoeConfig z = c;
      const char* field = kind == 0 ? "num_zero_experts" : kind == 1 ? "num_copy_experts" : "num_constant_experts";
      (kind == 0 ? z.num_zero_experts : kind == 1 ? z.num_copy_experts : z.num_constant_experts) = 1;
      CAPTURE(field);
      CHECK_THROWS_AS(PlainFfn{z}, ConfigError);
      try {
        PlainFfn l(z);
      } catch (const ConfigError& e) {
        CHECK(names(e, field));
      }
    }
    MoeConfig copy = c;
    copy.num_copy_experts = 1;
    using ZeroOnly = MoeLayer<backend::Host<double>, SoftmaxTopK, experts::Set<experts::Ffn<act::SwiGLU>, experts::Zero>>;
    CHECK_THROWS_AS(ZeroOnly{copy}, ConfigError);
    MoeConfig zero = c;
    zero.num_zero_experts = 2;
    CHECK_NOTHROW(ZeroOnly{zero});
  }

  SUBCASE("tau must be finite and > 0") {
    for (double tau : {0.0, -0.5, std::nan(""), std::numeric_limits<double>::infinity()}) {
      CAPTURE(tau);
      MoeConfig c = base;
      c.tau = tau;
      CHECK_THROWS_AS(Mixed{c}, ConfigError);
      try {
        Mixed l(c);
      } catch (const ConfigError& e) {
        CHECK(e.field() == "tau");
        CHECK(names(e, "tau"));
      }
    }
    MoeConfig ok = base;
    ok.tau = 1e-3;
    CHECK_NOTHROW(Mixed{ok});
  }

  SUBCASE("gating_residual must match the router policy") {
    MoeConfig c = base;
    c.gating_residual = true;
    CHECK_THROWS_AS(Mixed{c}, ConfigError);
    try {
      Mixed l(c);
    } catch (const ConfigError& e) {
      CHECK(names(e, "gating_residual"));
    }
    c.gating_residual = false;
    CHECK_THROWS_AS(MixedResidual{c}, ConfigError);
    c.gating_residual = true;
    CHECK_NOTHROW(MixedResidual{c});
  }

  SUBCASE("prev_logits must be [T, N_E]") {
    MoeConfig c = base;
    c.gating_residual = true;
    MixedResidual layer(c);
    layer.init_params(3);
    const std::int64_t T = 4, D = c.d_model, N = c.num_experts();
    std::vector<double> x(size_t(T * D), 0.1), y(size_t(T * D)), prev(size_t((T + 1) * (N + 1)), 0.2);
    const MatrixView<const double> xv(x.data(), {T, D});
    const MatrixView<double> yv(y.data(), {T, D});
    CHECK_THROWS_AS(layer.forward(xv, yv, MatrixView<const double>(prev.data(), {T, N + 1})), ShapeError);
    CHECK_THROWS_AS(layer.forward(xv, yv, MatrixView<const double>(prev.data(), {T - 1, N})), ShapeError);
    CHECK_THROWS_AS(layer.forward(xv, yv, MatrixView<const double>(prev.data(), {T + 1, N})), ShapeError);
    CHECK_NOTHROW(layer.forward(xv, yv, MatrixView<const double>(prev.data(), {T, N})));
    CHECK_NOTHROW(layer.forward(xv, yv));  // the first MoE layer: no previous logits
    // A layer without the gating residual has no use for prev_logits.
    Mixed plain(base);
    CHECK_THROWS(plain.forward(xv, yv, MatrixView<const double>(prev.data(), {T, N})));
  }
}

TEST_CASE("with_layer_type picks the expert set and the gating residual") {
  MoeConfig c = to_config(mixed_cfg(true, 1, 2, 0.0, 0.75, false), true);
  bool hit = false;
  with_layer_type<backend::Host<double>>(c, [&]<class L>(std::type_identity<L>) {
    hit = std::is_same_v<L, MoeLayer<backend::Host<double>, router::GatingResidual<router::TopK<router::Sigmoid>>,
                                     AllZc<act::GeLU>, balance::MicroBatch>>;
  });
  CHECK(hit);
  c = to_config(mixed_cfg(false, 2, 2, 0.0, 0.75, false), false);
  c.num_zero_experts = c.num_copy_experts = c.num_constant_experts = 0;
  hit = false;
  with_layer_type<backend::Host<float>>(c, [&]<class L>(std::type_identity<L>) {
    hit = std::is_same_v<L, MoeLayer<backend::Host<float>, router::TopK<router::Softmax>, experts::Ffn<act::ReLU>,
                                     balance::MicroBatch>>;
  });
  CHECK(hit);
  c.num_copy_experts = 1;
  hit = false;
  with_layer_type<backend::Host<float>, balance::GlobalBatch>(c, [&]<class L>(std::type_identity<L>) {
    hit = std::is_same_v<L, MoeLayer<backend::Host<float>, router::TopK<router::Softmax>, AllZc<act::ReLU>,
                                     balance::GlobalBatch>>;
  });
  CHECK(hit);
}
