// MoE++ layers on the host (issue 3): zero/copy/constant experts, the gating residual, MoE++ capacities
// and the heterogeneous LBL. Forward against the naive double reference (moepp_reference.hpp) and
// gradients against central finite differences.
#include <doctest/doctest.h>

#include "moepp_fixture.hpp"


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