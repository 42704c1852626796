// MoE++ on the host: capacities and a constant expert against numbers worked by hand, tau = 1 equal to
// the Switch LBL, the expert-GEMM FLOP counter, configuration errors and the runtime type switch.
#include <doctest/doctest.h>

#include "moepp_fixture.hpp"

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
