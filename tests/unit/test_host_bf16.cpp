// backend::Host<bf16> against backend::Host<double> (the double reference's twin: test_moe_layer.cpp
// checks it against the naive reference to 1e-12 and against finite differences) run on the
// bf16-rounded inputs and weights, so the routing is the same and only the bf16 intermediates (the
// FFN rows, the activation, y and dx rounded once) differ. Every router, activation, MoE++ expert kind,
// the gating residual, capacity drops and the balance scopes; two micro-batches with gradients
// accumulating; both bf16 GEMM paths (oneDNN where the CPU has bf16 instructions, and the fp32
// conversion every CPU runs). Tolerance: ‖out − ref‖/‖ref‖ ≤ 1e-2 per tensor; routing exact.
#include <doctest/doctest.h>

#include <cmath>
#include <moekit/backend/host/gemm_bf16.hpp>
#include <moekit/moe_layer.hpp>
#include <random>
#include <string>
#include <vector>

#include "../common/compare.hpp"

using namespace moekit;

namespace {

constexpr double kTol = 1e-2;

std::vector<float> rounded(std::vector<float> v) {
  for (auto& x : v) x = float(bf16(x));
  return v;
}
std::vector<bf16> to_bf16(const std::vector<float>& v) {
  std::vector<bf16> b(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) b[i] = bf16(v[i]);
  return b;
}
template <class T>
std::vector<float> to_float(const std::vector<T>& v) {
  std::vector<float> f(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) f[i] = float(v[i]);
  return f;
}

struct Case {
  std::string name;
  MoeConfig cfg;
  std::int64_t tokens = 37;
  unsigned seed = 1;
  double aux_scale = 1.0;
};

MoeConfig small_config(std::int64_t experts, std::int64_t k, RouterKind r, Activation a) {
  MoeConfig c;
  c.d_model = 40;
  c.d_expert = 24;
  c.num_ffn_experts = experts;
  c.top_k = k;
  c.router = r;
  c.activation = a;
  c.lbl_coef = 0.01;
  c.zloss_coef = 0.001;
  return c;
}

// R, E, B: the policies; both layers are MoeLayer<Host<·>, R, E, B>.
template <class R, class E, class B = balance::MicroBatch>
void check(const Case& c) {
  using Oracle = MoeLayer<backend::Host<double>, R, E, B>;
  using Layer = MoeLayer<backend::Host<bf16>, R, E, B>;
  CAPTURE(c.name);
  const auto& cfg = c.cfg;
  const std::int64_t D = cfg.d_model, N = cfg.num_experts(), K = cfg.top_k;
  const bool residual = cfg.gating_residual;

  Oracle host(cfg);
  MoeWeights<float> w = host.parameter_table().template initial<float>(c.seed);
  for (auto& f : w.families) f.values = rounded(f.values);
  host.load_weights(w.as<double>());
  Layer layer(cfg);
  layer.load_weights(w);
  CHECK(moekit_test::rel_err(layer.weights()["w1"], w["w1"]) == 0.0);  // bf16 values round-trip exactly
  std::mt19937 g(c.seed * 7919u + 1);
  std::normal_distribution<float> nd(0.f, 1.f);
  if constexpr (router::router_traits<R>::selection_bias) {
    std::vector<float> b(static_cast<std::size_t>(N));
    for (auto& v : b) v = 0.2f * nd(g);
    host.set_expert_bias(std::vector<double>(b.begin(), b.end()));
    layer.set_expert_bias(b);
  }
  for (int step = 0; step < 2; ++step) {
    CAPTURE(step);
    const std::int64_t T = step == 0 ? c.tokens : c.tokens / 2;
    std::vector<float> x(T * D), dy(T * D), prev(residual ? T * N : 0), dnext(residual ? T * N : 0);
    for (auto* v : {&x, &dy, &prev}) for (auto& e : *v) e = nd(g);
    for (auto& e : dnext) e = 0.1f * nd(g);
    x = rounded(x), dy = rounded(dy);

    const std::vector<double> xd(x.begin(), x.end()), dyd(dy.begin(), dy.end()), prevd(prev.begin(), prev.end()),
        dnextd(dnext.begin(), dnext.end());
    std::vector<double> y_ref(T * D), dx_ref(T * D), dprev_ref(prev.size());
    const auto aux_ref = host.forward({xd.data(), {T, D}}, {y_ref.data(), {T, D}}, {residual ? prevd.data() : nullptr, {T, N}});
    host.backward({dyd.data(), {T, D}}, {dx_ref.data(), {T, D}}, c.aux_scale, {residual ? dnextd.data() : nullptr, {T, N}},
                  {residual ? dprev_ref.data() : nullptr, {T, N}});

    const std::vector<bf16> xb = to_bf16(x), dyb = to_bf16(dy);
    std::vector<bf16> y(T * D, bf16(std::nanf(""))), dx(T * D, bf16(std::nanf("")));
    std::vector<float> dprev(prev.size(), std::nanf(""));
    const auto aux = layer.forward({xb.data(), {T, D}}, {y.data(), {T, D}}, {residual ? prev.data() : nullptr, {T, N}});
    int idx_mismatch = 0, kept_mismatch = 0;
    for (std::int64_t s = 0; s < T * K; ++s) {
      idx_mismatch += layer.topk_indices().data[s] != host.topk_indices().data[s];
      kept_mismatch += layer.slot_kept(s / K, s % K) != host.slot_kept(s / K, s % K);
    }
    CHECK(idx_mismatch == 0);
    CHECK(kept_mismatch == 0);
    CHECK(layer.routed_counts() == host.routed_counts());
    CHECK(layer.expert_gemm_flops() == host.expert_gemm_flops());
    layer.backward({dyb.data(), {T, D}}, {dx.data(), {T, D}}, c.aux_scale, {residual ? dnext.data() : nullptr, {T, N}},
                   {residual ? dprev.data() : nullptr, {T, N}});

    CHECK(moekit_test::rel_err(to_float(y), to_float(y_ref)) <= kTol);
    CHECK(moekit_test::rel_err(to_float(dx), to_float(dx_ref)) <= kTol);
    CHECK(moekit_test::rel_err(std::vector<float>(layer.logits().data, layer.logits().data + T * N),
                               to_float(std::vector<double>(host.logits().data, host.logits().data + T * N))) <= kTol);
    if (residual) CHECK(moekit_test::rel_err(dprev, to_float(dprev_ref)) <= kTol);
    CHECK(std::abs(aux.lbl - aux_ref.lbl) <= kTol * std::max(1.0, std::abs(aux_ref.lbl)));
    CHECK(std::abs(aux.zloss - aux_ref.zloss) <= kTol * std::max(1.0, std::abs(aux_ref.zloss)));
  }
  const MoeWeights<float> got = layer.gradients(), ref = host.gradients().template as<float>();
  moekit_test::for_each_weight(got, ref, [&](const char* name, const std::vector<float>& a, const std::vector<float>& b) {
    CAPTURE(name);
    CHECK(a.size() == b.size());
    if (!b.empty()) CHECK(moekit_test::rel_err(a, b) <= kTol);
  });
  // The parameters: bf16 values, fp32 gradients, the table's names.
  const auto ps = layer.parameters();
  const auto pd = host.parameters();
  REQUIRE(ps.size() == pd.size());
  for (std::size_t i = 0; i < ps.size(); ++i) CHECK(ps[i].name == pd[i].name);
}

void run_all() {
  using Soft = router::TopK<router::Softmax>;
  using Sig = router::TopK<router::Sigmoid>;
  using Mixed = experts::Set<experts::Ffn<act::SwiGLU>, experts::Zero, experts::Copy, experts::Constant>;
  SUBCASE("softmax + SwiGLU, renormalised, ragged T") {
    for (std::int64_t T : {1, 37, 203}) {
      Case c{"softmax-swiglu", small_config(8, 2, RouterKind::kSoftmax, Activation::kSwiGLU), T, 3};
      c.cfg.renormalize = true;
      check<Soft, experts::Ffn<act::SwiGLU>>(c);
    }
  }
  SUBCASE("odd sizes") {
    Case c{"softmax-swiglu-odd", small_config(5, 2, RouterKind::kSoftmax, Activation::kSwiGLU), 61, 17};
    c.cfg.d_model = 41, c.cfg.d_expert = 13;
    check<Soft, experts::Ffn<act::SwiGLU>>(c);
  }
  SUBCASE("sigmoid + GeLU with capacity drops") {
    for (double gamma : {0.5, 1.0, 1.25}) {
      Case c{"sigmoid-gelu-capacity", small_config(16, 4, RouterKind::kSigmoid, Activation::kGeLU), 203, 5};
      c.cfg.capacity_factor = gamma;
      check<Sig, experts::Ffn<act::GeLU>>(c);
    }
  }
  SUBCASE("softmax + ReLU: empty experts, no tokens") {
    check<Soft, experts::Ffn<act::ReLU>>({"relu-empty-experts", small_config(64, 2, RouterKind::kSoftmax, Activation::kReLU), 5, 7});
    check<Soft, experts::Ffn<act::ReLU>>({"relu-no-tokens", small_config(8, 2, RouterKind::kSoftmax, Activation::kReLU), 0, 2});
  }
  SUBCASE("MoE++: zero/copy/constant experts, gating residual, tau, capacities, aux_scale") {
    using GR = router::GatingResidual<Soft>;
    for (double gamma : {0.0, 1.1, 0.6}) {
      Case c{"moepp-residual", small_config(8, 3, RouterKind::kSoftmax, Activation::kSwiGLU), 97, 11};
      c.cfg.num_zero_experts = 1, c.cfg.num_copy_experts = 1, c.cfg.num_constant_experts = 2;
      c.cfg.gating_residual = true, c.cfg.tau = 0.75, c.cfg.capacity_factor = gamma;
      c.aux_scale = 0.5;
      check<GR, Mixed>(c);
    }
  }
  SUBCASE("router::BiasBalanced (softmax and sigmoid)") {
    Case c{"bias-softmax", small_config(8, 2, RouterKind::kSoftmax, Activation::kSwiGLU), 61, 21};
    c.cfg.expert_bias = true, c.cfg.renormalize = true;
    check<router::BiasBalanced<Soft>, experts::Ffn<act::SwiGLU>>(c);
    Case s{"bias-sigmoid", small_config(8, 2, RouterKind::kSigmoid, Activation::kGeLU), 61, 23};
    s.cfg.expert_bias = true;
    check<router::BiasBalanced<Sig>, experts::Ffn<act::GeLU>>(s);
  }
  SUBCASE("GPT-OSS: router bias, clamped SwiGLU with FFN biases") {
    Case c{"gpt-oss", small_config(8, 2, RouterKind::kSoftmax, Activation::kSwiGLUOai), 61, 33};
    c.cfg.renormalize = true, c.cfg.options.set("router_bias", true), c.cfg.options.set("ffn_bias", true);
    c.cfg.options.set("swiglu_limit", 0.5);
    check<router::LinearBias<Soft>, experts::Ffn<act::SwiGLUOai>>(c);
  }
  SUBCASE("global-batch balance") {
    Case c{"global-batch", small_config(8, 2, RouterKind::kSoftmax, Activation::kSwiGLU), 45, 31};
    check<Soft, experts::Ffn<act::SwiGLU>, balance::GlobalBatch>(c);
  }
}

// Runs the battery with the bf16 GEMM path swapped for `path` (restored afterwards).
struct WithBf16Path {
  backend::host::Bf16Gemm saved;
  explicit WithBf16Path(backend::host::Bf16Gemm path) : saved(backend::host::bf16_gemm()) { backend::host::detail::bf16_gemm_state() = path; }
  ~WithBf16Path() { backend::host::detail::bf16_gemm_state() = saved; }
};

}  // namespace

TEST_CASE("host bf16 layer equals the double layer within bf16 rounding: the process's bf16 GEMM") {
  MESSAGE(backend::host::bf16_gemm().line());
  run_all();
}

TEST_CASE("host bf16 layer equals the double layer within bf16 rounding: operands converted to fp32") {
  backend::host::Bf16Gemm fp32;
  fp32.what = "converted to fp32 (test)";
  WithBf16Path with(fp32);
  run_all();
}

TEST_CASE("bf16 GEMM: the product of bf16 operands accumulated in fp32, every transpose, beta") {
  const std::int64_t m = 19, n = 23, k = 37;
  std::mt19937 g(5);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> a(m * k), b(k * n), c0(m * n);
  for (auto* v : {&a, &b, &c0}) for (auto& e : *v) e = nd(g);
  a = rounded(a), b = rounded(b);
  const std::vector<bf16> ab = to_bf16(a), bb = to_bf16(b);
  for (bool ta : {false, true})
    for (bool tb : {false, true})
      for (float beta : {0.f, 1.f}) {
        CAPTURE(ta);
        CAPTURE(tb);
        CAPTURE(beta);
        // a, b hold op(A), op(B) stored transposed when ta / tb: A[i,p] = a[ta ? p*m+i : i*k+p].
        std::vector<double> ref(m * n);
        for (std::int64_t i = 0; i < m; ++i)
          for (std::int64_t j = 0; j < n; ++j) {
            double s = 0;
            for (std::int64_t p = 0; p < k; ++p)
              s += double(a[ta ? p * m + i : i * k + p]) * double(b[tb ? j * k + p : p * n + j]);
            ref[i * n + j] = 0.5 * s + beta * c0[i * n + j];
          }
        std::vector<float> c = c0;
        backend::host::gemm(ta, tb, m, n, k, 0.5f, ab.data(), bb.data(), beta, c.data());
        double worst = 0;
        for (std::int64_t i = 0; i < m * n; ++i) worst = std::max(worst, std::abs(c[i] - ref[i]) / (1 + std::abs(ref[i])));
        CHECK(worst < 1e-5);  // exact bf16 products, fp32 sums: only fp32 rounding
      }
}
