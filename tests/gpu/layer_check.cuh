#pragma once
// MoeLayer<backend::Cuda<T>> against MoeLayer<backend::Host<float>> (the oracle) on the same inputs and
// weights: outputs, every gradient, the aux losses, the routing (indices, counts) exactly.
// For bf16 the host runs on the bf16-rounded inputs and weights, so the routing is the same and only
// the bf16 intermediates differ. Tolerances (‖out − ref‖/‖ref‖ per tensor): fp32 1e-5, bf16 1e-2.
// Device outputs are poisoned (0xFF bytes: NaN) before each run, so an unwritten element fails.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <moekit/backend/cuda/moe_layer.cuh>
#include <moekit/moe_layer.hpp>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "../common/compare.hpp"
#include "device_buffer.cuh"
#include "../unit/zc_tanh_scale.hpp"

namespace layer_check {

namespace mc = moekit::backend::cuda;
using moekit::MatrixView;


struct Case {
  std::string name;
  moekit::MoeConfig cfg;
  std::int64_t tokens = 37;
  unsigned seed = 1;
  bool skew_to_expert0 = false;  // every token's top choice is expert 0
  mc::GemmStrategy gemm = mc::GemmStrategy::kAuto;
  double aux_scale = 1.0;
  bool dlogits_next = false;  // also pass a next layer's dlogits (always with the gating residual)
  bool replay = false;        // router replay: both layers replay the same random record (-1 slots too)
};

template <class S>
std::vector<float> rounded(std::vector<float> v) {
  for (auto& x : v) x = mc::storage_to_float(mc::storage_from_float<S>(x));
  return v;
}

template <class S>
std::vector<float> download(const DeviceBuffer<S>& b, cudaStream_t stream) {
  const auto h = b.download(stream);
  std::vector<float> f(h.size());
  for (std::size_t i = 0; i < h.size(); ++i) f[i] = mc::storage_to_float(h[i]);
  return f;
}

// A user stream that does not synchronise with the legacy default stream: the layer must order all
// its work (side streams included) on it.
struct Stream {
  cudaStream_t s = nullptr;
  Stream() { MOEKIT_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)); }
  ~Stream() { cudaStreamDestroy(s); }
};

// How the expert GEMM phases ran (backend/cuda/grouped_gemm.cuh, GemmPathCounts), so that a "grouped"
// case cannot silently test the streams path: cuBLAS never refuses a phase that passed the host's checks;
// kGrouped in fp32 runs every phase grouped; in bf16 the weight gradients (bf16 x bf16 -> fp32) go to the
// streams path by type, and phases go there by alignment exactly when d_model or d_expert is not a
// multiple of 8 (bf16 rows of 16-byte multiples); kStreams never tries the grouped call.
template <class S>
void check_gemm_paths(const Case& c, mc::GemmStrategy used, const mc::GemmPathCounts& p, bool any_ffn_rows) {
  constexpr bool kBf16 = !std::is_same_v<S, float>;
  INFO("gemm paths: grouped " << p.grouped << ", by_type " << p.by_type << ", by_alignment " << p.by_alignment << ", refused "
                              << p.refused << ", lt_no_algo " << p.lt_no_algo);
  CHECK(p.refused == 0);
  if (used != mc::GemmStrategy::kGrouped) {
    CHECK(p.grouped == 0);
    CHECK(p.by_type == 0);
    CHECK(p.by_alignment == 0);
    if (used == mc::GemmStrategy::kStreams) CHECK(p.lt_no_algo == 0);
    else if (p.lt_no_algo > 0) MESSAGE("kLt: " << p.lt_no_algo << " problems had no Lt algorithm (cublasGemmEx ran them)");
    return;
  }
  CHECK(p.lt_no_algo == 0);
  if (!any_ffn_rows) {
    CHECK(p.grouped + p.by_type + p.by_alignment == 0);
    return;
  }
  const bool aligned = !kBf16 || (c.cfg.d_model % 8 == 0 && c.cfg.d_expert % 8 == 0);
  if (!kBf16) {
    CHECK(p.grouped > 0);
    CHECK(p.by_type == 0);
    CHECK(p.by_alignment == 0);
  } else if (aligned) {
    CHECK(p.grouped > 0);
    CHECK(p.by_type > 0);
    CHECK(p.by_alignment == 0);
  } else {
    CHECK(p.by_alignment > 0);
  }
}

// HostLayer: MoeLayer<Host<float>, R, E, B>; CudaLayer: MoeLayer<Cuda<T>, R, E, B>.
// Two micro-batches (the second smaller than the reserved tokens), gradients accumulating over both,
// compared after each: forward outputs and routing per step, gradients after step 2.
template <class HostLayer, class CudaLayer>
void check(const Case& c) {
  using S = typename CudaLayer::storage_type;
  constexpr bool kBf16 = !std::is_same_v<S, float>;
  const double tol = kBf16 ? 1e-2 : 1e-5;
  CAPTURE(c.name);
  CAPTURE(mc::to_string(c.gemm));
  const auto& cfg = c.cfg;
  const std::int64_t D = cfg.d_model, N = cfg.num_experts(), K = cfg.top_k;
  const bool residual = cfg.gating_residual, with_dnext = residual || c.dlogits_next;

  // Weights: the shared initialisation, rounded to the storage type (gate_residual stays fp32).
  HostLayer host(cfg);
  moekit::MoeWeights<float> w = host.parameter_table().template initial<float>(c.seed);
  if (c.skew_to_expert0) w["router"][0] = 8.f;
  for (const auto& f : host.parameter_table().families())
    if (!f.fp32) w[f.key] = rounded<S>(w[f.key]);
  host.load_weights(w);
  host.zero_grad();
  Stream stream;
  CudaLayer dev(cfg, c.gemm);
  dev.load_weights(w);
  dev.reserve(c.tokens);
  std::mt19937 g(c.seed * 7919u + 1);
  std::normal_distribution<float> nd(0.f, 1.f);
  if constexpr (moekit::router::router_traits<typename HostLayer::router_type>::selection_bias) {  // router::BiasBalanced: the same biases on both
    std::vector<float> b(static_cast<std::size_t>(N));
    for (auto& v : b) v = 0.2f * nd(g);
    host.set_expert_bias(b), dev.set_expert_bias(b);
  }

  bool any_ffn_rows = false;
  for (int step = 0; step < 2; ++step) {
    CAPTURE(step);
    const std::int64_t T = step == 0 ? c.tokens : c.tokens / 2;
    std::vector<float> x(T * D), dy(T * D), prev(residual ? T * N : 0), dnext(with_dnext ? T * N : 0);
    for (auto& v : x) v = nd(g);
    for (auto& v : dy) v = nd(g);
    for (auto& v : prev) v = nd(g);
    for (auto& v : dnext) v = 0.1f * nd(g);
    if (c.skew_to_expert0)
      for (std::int64_t t = 0; t < T; ++t) x[t * D] = 4.f;
    x = rounded<S>(x);
    dy = rounded<S>(dy);

    if (c.replay) {  // k distinct experts per token, about one slot in five -1
      std::vector<std::int32_t> rec(T * K);
      std::uniform_int_distribution<int> pick(0, int(N) - 1);
      for (std::int64_t t = 0; t < T; ++t)
        for (std::int64_t j = 0; j < K; ++j) {
          int e = pick(g);
          while (std::find(rec.begin() + t * K, rec.begin() + t * K + j, e) != rec.begin() + t * K + j) e = (e + 1) % int(N);
          rec[t * K + j] = pick(g) % 5 == 0 ? -1 : e;
        }
      host.set_replay(MatrixView<const std::int32_t>(rec.data(), {T, K}));
      dev.set_replay(MatrixView<const std::int32_t>(rec.data(), {T, K}));
    }
    // Host oracle.
    std::vector<float> y_ref(T * D), dx_ref(T * D), dprev_ref(prev.size());
    const MatrixView<const float> prev_view{prev.empty() ? nullptr : prev.data(), {T, N}};
    const auto aux_ref = host.forward(MatrixView<const float>(x.data(), {T, D}), MatrixView<float>(y_ref.data(), {T, D}), prev_view);
    host.backward(MatrixView<const float>(dy.data(), {T, D}), MatrixView<float>(dx_ref.data(), {T, D}), c.aux_scale,
                  MatrixView<const float>(dnext.empty() ? nullptr : dnext.data(), {T, N}),
                  MatrixView<float>(dprev_ref.empty() ? nullptr : dprev_ref.data(), {T, N}));

    // CUDA layer on the user stream.
    DeviceBuffer<S> dx_in(T * D), ddy(T * D), dy_out(T * D), ddx(T * D);
    DeviceBuffer<float> dprev_in(prev.size()), ddnext(dnext.size()), ddprev(prev.size());
    std::vector<S> xs(T * D), dys(T * D);
    for (std::size_t i = 0; i < xs.size(); ++i) xs[i] = mc::storage_from_float<S>(x[i]), dys[i] = mc::storage_from_float<S>(dy[i]);
    dx_in.upload(xs);
    ddy.upload(dys);
    if (residual) dprev_in.upload(prev);
    if (with_dnext) ddnext.upload(dnext);
    dy_out.poison(), ddx.poison(), ddprev.poison();
    const auto aux = dev.forward(MatrixView<const S>(dx_in.p, {T, D}), MatrixView<S>(dy_out.p, {T, D}),
                                 MatrixView<const float>(residual ? dprev_in.p : nullptr, {T, N}), stream.s);
    // Routing first: the same experts, the same kept slots.
    const bool by_token = host.routing_plan().layout.per_token == 0;  // expert choice, replay: compare the plans
    if (by_token) {
      const auto ref = host.routing_plan();
      const auto got = dev.routing_plan_device();
      REQUIRE(got.layout.slots == ref.layout.slots);
      const std::size_t ns = std::size_t(ref.layout.slots);
      std::vector<int> first(std::size_t(T + 1)), token_of(ns), experts(ns), rows(ns);
      std::vector<float> gates(ns);
      MOEKIT_CUDA_CHECK(cudaMemcpyAsync(first.data(), got.layout.first, sizeof(int) * first.size(), cudaMemcpyDeviceToHost, stream.s));
      if (ns > 0) {
        MOEKIT_CUDA_CHECK(cudaMemcpyAsync(token_of.data(), got.layout.token_of, sizeof(int) * ns, cudaMemcpyDeviceToHost, stream.s));
        MOEKIT_CUDA_CHECK(cudaMemcpyAsync(experts.data(), got.expert, sizeof(int) * ns, cudaMemcpyDeviceToHost, stream.s));
        MOEKIT_CUDA_CHECK(cudaMemcpyAsync(rows.data(), got.row, sizeof(int) * ns, cudaMemcpyDeviceToHost, stream.s));
        MOEKIT_CUDA_CHECK(cudaMemcpyAsync(gates.data(), got.gate, sizeof(float) * ns, cudaMemcpyDeviceToHost, stream.s));
      }
      MOEKIT_CUDA_CHECK(cudaStreamSynchronize(stream.s));
      int plan_mismatch = 0;
      for (std::int64_t t = 0; t <= T; ++t) plan_mismatch += first[std::size_t(t)] != ref.layout.first[t];
      for (std::size_t s = 0; s < ns; ++s) {
        plan_mismatch += token_of[s] != ref.layout.token_of[s] || experts[s] != ref.expert[s] || rows[s] != ref.row[s];
        CHECK(std::abs(gates[s] - ref.gate[s]) <= tol * std::max(1.f, std::abs(ref.gate[s])));
      }
      CHECK(plan_mismatch == 0);
      CHECK((dev.topk_indices_device() == nullptr) == (host.routing() == moekit::Routing::kExpertChoice));
    }
    std::vector<int> idx_dev(by_token ? 0 : T * K), rows_dev(by_token ? 0 : T * K);
    if (T > 0 && !by_token) {
      MOEKIT_CUDA_CHECK(cudaMemcpyAsync(idx_dev.data(), dev.topk_indices_device(), sizeof(int) * idx_dev.size(),
                                        cudaMemcpyDeviceToHost, stream.s));
      MOEKIT_CUDA_CHECK(cudaMemcpyAsync(rows_dev.data(), dev.slot_rows_device(), sizeof(int) * rows_dev.size(),
                                        cudaMemcpyDeviceToHost, stream.s));
      MOEKIT_CUDA_CHECK(cudaStreamSynchronize(stream.s));
    }
    const auto idx_ref = host.topk_indices();
    int idx_mismatch = 0, kept_mismatch = 0;
    for (std::int64_t s = 0; s < (by_token ? 0 : T * K); ++s) {
      idx_mismatch += idx_dev[s] != idx_ref.data[s];
      kept_mismatch += (rows_dev[s] != mc::kDroppedSlot) != host.slot_kept(s / K, s % K);
    }
    CHECK(idx_mismatch == 0);
    CHECK(kept_mismatch == 0);
    CHECK(dev.routed_counts() == host.routed_counts());
    const auto kept_ref = host.expert_counts();
    const auto kept_dev = dev.expert_counts();
    CHECK(std::vector<std::int32_t>(kept_dev.data, kept_dev.data + N) == std::vector<std::int32_t>(kept_ref.data, kept_ref.data + N));
    CHECK(dev.ffn_rows() == host.ffn_rows());
    any_ffn_rows = any_ffn_rows || host.ffn_rows() > 0;
    CHECK(dev.expert_gemm_flops() == host.expert_gemm_flops());

    dev.backward(MatrixView<const S>(ddy.p, {T, D}), MatrixView<S>(ddx.p, {T, D}), c.aux_scale,
                 MatrixView<const float>(with_dnext ? ddnext.p : nullptr, {T, N}),
                 MatrixView<float>(residual ? ddprev.p : nullptr, {T, N}), stream.s);

    CHECK(moekit_test::rel_err(download(dy_out, stream.s), y_ref) <= tol);
    CHECK(moekit_test::rel_err(download(ddx, stream.s), dx_ref) <= tol);
    if (residual) CHECK(moekit_test::rel_err(ddprev.download(stream.s), dprev_ref) <= tol);
    CHECK(std::abs(aux.lbl - aux_ref.lbl) <= tol * std::max(1.0, std::abs(aux_ref.lbl)));
    CHECK(std::abs(aux.zloss - aux_ref.zloss) <= tol * std::max(1.0, std::abs(aux_ref.zloss)));
  }
  if constexpr (moekit::router::router_traits<typename HostLayer::router_type>::selection_bias) {  // the step's counts and the bias update agree
    CHECK(dev.step_counts() == host.step_counts());
    host.end_step(), dev.end_step(stream.s);
    const auto hb = host.expert_bias();
    const auto db = dev.expert_bias();
    CHECK(std::vector<float>(hb.begin(), hb.end()) == std::vector<float>(db.begin(), db.end()));
  }
  check_gemm_paths<S>(c, dev.gemm_strategy(), dev.gemm_paths(), any_ffn_rows);
  // Gradients accumulated over both micro-batches.
  const moekit::MoeWeights<float> grads = dev.gradients();
  const moekit::MoeWeights<float> gr = host.gradients();
  moekit_test::for_each_weight(grads, gr, [&](const char* name, const std::vector<float>& got, const std::vector<float>& ref) {
    CAPTURE(name);
    CHECK(moekit_test::rel_err(got, ref) <= tol);
  });
}

inline moekit::MoeConfig small_config(std::int64_t experts, std::int64_t k, moekit::RouterKind r, moekit::Activation a) {
  moekit::MoeConfig c;
  c.d_model = 40;  // not a multiple of 32: warp loops and GEMM edges see ragged sizes
  c.d_expert = 24;
  c.num_ffn_experts = experts;
  c.top_k = k;
  c.router = r;
  c.activation = a;
  c.lbl_coef = 0.01;
  c.zloss_coef = 0.001;
  return c;
}

// The whole battery for one storage type (instantiated once per TU: fp32 in one, bf16 in the other).
template <class V>
void run_all() {
  using namespace moekit;
  using Soft = router::TopK<router::Softmax>;
  using Sig = router::TopK<router::Sigmoid>;
  using Mixed = experts::Set<experts::Ffn<act::SwiGLU>, experts::Zero, experts::Copy, experts::Constant>;
  using MixedGelu = experts::Set<experts::Ffn<act::GeLU>, experts::Zero, experts::Copy, experts::Constant>;

  SUBCASE("softmax + SwiGLU, renormalised, every GEMM strategy, ragged T") {
    for (auto gemm : {mc::GemmStrategy::kGrouped, mc::GemmStrategy::kStreams, mc::GemmStrategy::kLt})
      for (std::int64_t T : {1, 37, 203}) {
        Case c{"softmax-swiglu", small_config(8, 2, RouterKind::kSoftmax, Activation::kSwiGLU), T, 3};
        c.cfg.renormalize = true;
        c.gemm = gemm;
        c.dlogits_next = T == 37;
        check<MoeLayer<backend::Host<float>, Soft, experts::Ffn<act::SwiGLU>>,
              MoeLayer<backend::Cuda<V>, Soft, experts::Ffn<act::SwiGLU>>>(c);
      }
  }
  SUBCASE("odd sizes: expert rows start at addresses that are not 16-byte aligned") {
    for (auto gemm : {mc::GemmStrategy::kGrouped, mc::GemmStrategy::kStreams, mc::GemmStrategy::kLt}) {
      Case c{"softmax-swiglu-odd", small_config(5, 2, RouterKind::kSoftmax, Activation::kSwiGLU), 61, 17};
      c.cfg.d_model = 41, c.cfg.d_expert = 13;
      c.gemm = gemm;
      check<MoeLayer<backend::Host<float>, Soft, experts::Ffn<act::SwiGLU>>,
            MoeLayer<backend::Cuda<V>, Soft, experts::Ffn<act::SwiGLU>>>(c);
    }
  }
  SUBCASE("sigmoid + GeLU with capacity drops") {
    for (double gamma : {0.5, 1.0, 1.25}) {
      Case c{"sigmoid-gelu-capacity", small_config(16, 4, RouterKind::kSigmoid, Activation::kGeLU), 203, 5};
      c.cfg.capacity_factor = gamma;
      check<MoeLayer<backend::Host<float>, Sig, experts::Ffn<act::GeLU>>, MoeLayer<backend::Cuda<V>, Sig, experts::Ffn<act::GeLU>>>(c);
    }
  }
  SUBCASE("softmax + ReLU: empty experts, all tokens to one expert, no tokens") {
    Case empty{"relu-empty-experts", small_config(64, 2, RouterKind::kSoftmax, Activation::kReLU), 5, 7};
    check<MoeLayer<backend::Host<float>, Soft, experts::Ffn<act::ReLU>>, MoeLayer<backend::Cuda<V>, Soft, experts::Ffn<act::ReLU>>>(empty);
    Case one{"relu-one-expert", small_config(8, 1, RouterKind::kSoftmax, Activation::kReLU), 129, 9};
    one.skew_to_expert0 = true;
    check<MoeLayer<backend::Host<float>, Soft, experts::Ffn<act::ReLU>>, MoeLayer<backend::Cuda<V>, Soft, experts::Ffn<act::ReLU>>>(one);
    Case one_capped = one;
    one_capped.name = "relu-one-expert-capacity";
    one_capped.cfg.capacity_factor = 1.0;
    check<MoeLayer<backend::Host<float>, Soft, experts::Ffn<act::ReLU>>, MoeLayer<backend::Cuda<V>, Soft, experts::Ffn<act::ReLU>>>(
        one_capped);
    Case none{"relu-no-tokens", small_config(8, 2, RouterKind::kSoftmax, Activation::kReLU), 0, 2};
    check<MoeLayer<backend::Host<float>, Soft, experts::Ffn<act::ReLU>>, MoeLayer<backend::Cuda<V>, Soft, experts::Ffn<act::ReLU>>>(none);
  }
  SUBCASE("MoE++: zero/copy/constant experts, gating residual, tau, capacities, aux_scale") {
    using GR = router::GatingResidual<Soft>;
    for (double gamma : {0.0, 1.1, 0.6})
      for (auto gemm : {mc::GemmStrategy::kGrouped, mc::GemmStrategy::kStreams}) {
      Case c{"moepp-residual", small_config(8, 3, RouterKind::kSoftmax, Activation::kSwiGLU), 97, 11};
      c.cfg.num_zero_experts = 1, c.cfg.num_copy_experts = 1, c.cfg.num_constant_experts = 2;
      c.cfg.gating_residual = true, c.cfg.tau = 0.75, c.cfg.capacity_factor = gamma;
      c.aux_scale = 0.5;
      c.gemm = gemm;
      check<MoeLayer<backend::Host<float>, GR, Mixed>, MoeLayer<backend::Cuda<V>, GR, Mixed>>(c);
    }
  }
  SUBCASE("a zero-computation kind of the tests' own (TanhScale) beside Zero and Constant: its functors on the device") {
    using TanhSet = experts::Set<experts::Ffn<act::SwiGLU>, moekit_test::TanhScale, experts::Zero, experts::Constant>;
    for (double gamma : {0.0, 1.1}) {
      Case c{"zc-custom-kind", small_config(6, 3, RouterKind::kSoftmax, Activation::kSwiGLU), 97, 13};
      c.cfg.num_zero_experts = 1, c.cfg.num_constant_experts = 1, c.cfg.tau = 0.75, c.cfg.capacity_factor = gamma;
      c.cfg.options.set("num_tanh_zc_experts", 2);
      check<MoeLayer<backend::Host<float>, Soft, TanhSet>, MoeLayer<backend::Cuda<V>, Soft, TanhSet>>(c);
    }
  }
  SUBCASE("router::BiasBalanced: biased selection, unbiased gates, the per-step update") {
    using BS = router::BiasBalanced<Soft>;
    using BG = router::BiasBalanced<Sig>;
    for (auto gemm : {mc::GemmStrategy::kGrouped, mc::GemmStrategy::kStreams}) {
      Case c{"bias-softmax", small_config(8, 2, RouterKind::kSoftmax, Activation::kSwiGLU), 61, 21};
      c.cfg.expert_bias = true, c.cfg.renormalize = true, c.gemm = gemm;
      check<MoeLayer<backend::Host<float>, BS, experts::Ffn<act::SwiGLU>>, MoeLayer<backend::Cuda<V>, BS, experts::Ffn<act::SwiGLU>>>(c);
    }
    Case s{"bias-sigmoid-global", small_config(16, 4, RouterKind::kSigmoid, Activation::kGeLU), 97, 23};
    s.cfg.expert_bias = true;
    check<MoeLayer<backend::Host<float>, BG, experts::Ffn<act::GeLU>, balance::GlobalBatch>,
          MoeLayer<backend::Cuda<V>, BG, experts::Ffn<act::GeLU>, balance::GlobalBatch>>(s);
  }
  SUBCASE("expert choice: the experts pick their tokens (ties to the lower token), with MoE++ and a scale") {
    for (double gamma : {1.0, 2.0})
      for (std::int64_t T : {37, 203}) {
        Case c{"expert-choice", small_config(8, 2, RouterKind::kSoftmax, Activation::kSwiGLU), T, 41};
        c.cfg.lbl_coef = 0.0, c.cfg.capacity_factor = gamma;
        c.cfg.options.set("routing", "expert_choice");
        c.gemm = T == 37 ? mc::GemmStrategy::kGrouped : mc::GemmStrategy::kStreams;
        check<MoeLayer<backend::Host<float>, Soft, experts::Ffn<act::SwiGLU>>, MoeLayer<backend::Cuda<V>, Soft, experts::Ffn<act::SwiGLU>>>(c);
      }
    Case tie{"expert-choice-ties", small_config(8, 1, RouterKind::kSoftmax, Activation::kSwiGLU), 64, 43};
    tie.cfg.lbl_coef = 0.0, tie.cfg.capacity_factor = 1.0, tie.cfg.options.set("routing", "expert_choice");
    tie.skew_to_expert0 = true;  // many equal scores after the skew saturates
    check<MoeLayer<backend::Host<float>, Soft, experts::Ffn<act::SwiGLU>>, MoeLayer<backend::Cuda<V>, Soft, experts::Ffn<act::SwiGLU>>>(tie);
    using GR = router::GatingResidual<Soft>;
    Case pp{"expert-choice-moepp", small_config(8, 3, RouterKind::kSoftmax, Activation::kSwiGLU), 97, 45};
    pp.cfg.num_zero_experts = 1, pp.cfg.num_copy_experts = 1, pp.cfg.num_constant_experts = 2;
    pp.cfg.gating_residual = true, pp.cfg.tau = 0.75, pp.cfg.capacity_factor = 1.0, pp.cfg.lbl_coef = 0.0;
    pp.cfg.options.set("routing", "expert_choice"), pp.cfg.options.set("routed_scaling_factor", 1.5);
    check<MoeLayer<backend::Host<float>, GR, Mixed>, MoeLayer<backend::Cuda<V>, GR, Mixed>>(pp);
  }
  SUBCASE("router replay: a record with -1 slots, then a forward's own record replayed bit for bit") {
    for (double gamma : {0.0, 1.0}) {
      Case c{"replay", small_config(8, 2, RouterKind::kSoftmax, Activation::kSwiGLU), 61, 47};
      c.cfg.capacity_factor = gamma, c.cfg.renormalize = true, c.replay = true;
      check<MoeLayer<backend::Host<float>, Soft, experts::Ffn<act::SwiGLU>>, MoeLayer<backend::Cuda<V>, Soft, experts::Ffn<act::SwiGLU>>>(c);
    }
    using V3 = router::BiasBalanced<router::GroupLimited<Sig>>;
    Case v3{"replay-deepseek-v3", small_config(8, 3, RouterKind::kSigmoid, Activation::kSwiGLU), 97, 49};
    v3.cfg.expert_bias = true, v3.cfg.lbl_coef = 0.0, v3.replay = true;
    v3.cfg.options.set("n_group", 4), v3.cfg.options.set("topk_group", 2), v3.cfg.options.set("routed_scaling_factor", 2.5);
    check<MoeLayer<backend::Host<float>, V3, experts::Ffn<act::SwiGLU>>, MoeLayer<backend::Cuda<V>, V3, experts::Ffn<act::SwiGLU>>>(v3);
    // On the device alone: record, replay, the same bits.
    using DevLayer = MoeLayer<backend::Cuda<V>, Soft, experts::Ffn<act::SwiGLU>>;
    using S = typename DevLayer::storage_type;  // float, or __nv_bfloat16
    DevLayer dev(small_config(8, 2, RouterKind::kSoftmax, Activation::kSwiGLU));
    dev.init_params(51);
    const std::int64_t T = 77, D = 40;
    dev.reserve(T);
    std::mt19937 g(53);
    std::normal_distribution<float> nd(0.f, 1.f);
    std::vector<S> xs(T * D);
    for (auto& v : xs) v = mc::storage_from_float<S>(nd(g));
    DeviceBuffer<S> x(T * D), y1(T * D), y2(T * D);
    x.upload(xs);
    dev.forward(MatrixView<const S>(x.p, {T, D}), MatrixView<S>(y1.p, {T, D}));
    std::vector<std::int32_t> rec(T * 2);
    MOEKIT_CUDA_CHECK(cudaMemcpy(rec.data(), dev.topk_indices_device(), sizeof(int) * rec.size(), cudaMemcpyDeviceToHost));
    dev.set_replay(MatrixView<const std::int32_t>(rec.data(), {T, 2}));
    dev.forward(MatrixView<const S>(x.p, {T, D}), MatrixView<S>(y2.p, {T, D}));
    MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
    const auto a = y1.download(nullptr), b = y2.download(nullptr);
    int differ = 0;
    for (std::size_t i = 0; i < a.size(); ++i) differ += std::memcmp(&a[i], &b[i], sizeof(S)) != 0;
    CHECK(differ == 0);
  }
  SUBCASE("the open models' routers: groups (DeepSeek-V2/V3), router bias (GPT-OSS), gate rule") {
    using V3 = router::BiasBalanced<router::GroupLimited<Sig>>;
    Case v3{"deepseek-v3-router", small_config(8, 3, RouterKind::kSigmoid, Activation::kSwiGLU), 97, 31};
    v3.cfg.expert_bias = true;
    v3.cfg.options.set("n_group", 4), v3.cfg.options.set("topk_group", 2), v3.cfg.options.set("routed_scaling_factor", 2.5);
    check<MoeLayer<backend::Host<float>, V3, experts::Ffn<act::SwiGLU>>, MoeLayer<backend::Cuda<V>, V3, experts::Ffn<act::SwiGLU>>>(v3);
    using V2 = router::GroupLimited<Soft>;
    Case v2{"deepseek-v2-router", small_config(8, 2, RouterKind::kSoftmax, Activation::kSwiGLU), 61, 33};
    v2.cfg.options.set("n_group", 4), v2.cfg.options.set("topk_group", 2), v2.cfg.options.set("group_score", "max");
    v2.cfg.capacity_factor = 1.0;
    check<MoeLayer<backend::Host<float>, V2, experts::Ffn<act::SwiGLU>>, MoeLayer<backend::Cuda<V>, V2, experts::Ffn<act::SwiGLU>>>(v2);
    using Oss = router::LinearBias<Soft>;
    Case oss{"gpt-oss-router-bias", small_config(8, 2, RouterKind::kSoftmax, Activation::kSwiGLU), 37, 35};
    oss.cfg.renormalize = true, oss.cfg.options.set("router_bias", true);
    check<MoeLayer<backend::Host<float>, Oss, experts::Ffn<act::SwiGLU>>, MoeLayer<backend::Cuda<V>, Oss, experts::Ffn<act::SwiGLU>>>(oss);
    Case unnorm{"sigmoid-unnormalised-scaled", small_config(8, 2, RouterKind::kSigmoid, Activation::kSwiGLU), 37, 37};
    unnorm.cfg.renormalize = false, unnorm.cfg.options.set("routed_scaling_factor", 1.5);
    check<MoeLayer<backend::Host<float>, Sig, experts::Ffn<act::SwiGLU>>, MoeLayer<backend::Cuda<V>, Sig, experts::Ffn<act::SwiGLU>>>(unnorm);
  }
  SUBCASE("the open models' experts: GPT-OSS's clamped SwiGLU with biases, biased GeLU beside MoE++") {
    using Oss = router::LinearBias<Soft>;
    using Oai = experts::Ffn<act::SwiGLUOai>;
    Case oss{"gpt-oss-experts", small_config(8, 2, RouterKind::kSoftmax, Activation::kSwiGLUOai), 61, 39};
    oss.cfg.renormalize = true, oss.cfg.options.set("router_bias", true), oss.cfg.options.set("ffn_bias", true);
    oss.cfg.options.set("swiglu_limit", 0.5);  // the clamps bite at this scale
    check<MoeLayer<backend::Host<float>, Oss, Oai>, MoeLayer<backend::Cuda<V>, Oss, Oai>>(oss);
    Case gelu{"gelu-biases-moepp", small_config(6, 2, RouterKind::kSoftmax, Activation::kGeLU), 45, 41};
    gelu.cfg.num_zero_experts = 1, gelu.cfg.num_copy_experts = 1, gelu.cfg.num_constant_experts = 1;
    gelu.cfg.options.set("ffn_bias", true), gelu.cfg.capacity_factor = 1.0;
    check<MoeLayer<backend::Host<float>, Soft, MixedGelu>, MoeLayer<backend::Cuda<V>, Soft, MixedGelu>>(gelu);
  }
  SUBCASE("shared experts on the second stream: DeepSeek's (weight 1, scaled routed gates), Qwen2-MoE's (gated), beside MoE++") {
    Case ds{"deepseek-shared", small_config(8, 2, RouterKind::kSigmoid, Activation::kSwiGLU), 97, 43};
    ds.cfg.options.set("num_shared_experts", 2), ds.cfg.options.set("routed_scaling_factor", 2.5);
    check<MoeLayer<backend::Host<float>, Sig, experts::Ffn<act::SwiGLU>>, MoeLayer<backend::Cuda<V>, Sig, experts::Ffn<act::SwiGLU>>>(ds);
    for (auto gemm : {mc::GemmStrategy::kGrouped, mc::GemmStrategy::kStreams}) {
      Case qw{"qwen2-shared-gate", small_config(8, 2, RouterKind::kSoftmax, Activation::kSwiGLU), 61, 45};
      qw.cfg.options.set("num_shared_experts", 1), qw.cfg.options.set("d_shared", 24), qw.cfg.options.set("shared_gate", true);
      qw.cfg.capacity_factor = 1.0, qw.gemm = gemm;
      check<MoeLayer<backend::Host<float>, Soft, experts::Ffn<act::SwiGLU>>, MoeLayer<backend::Cuda<V>, Soft, experts::Ffn<act::SwiGLU>>>(qw);
    }
    Case mp{"moepp-shared", small_config(6, 2, RouterKind::kSoftmax, Activation::kGeLU), 45, 47};
    mp.cfg.num_zero_experts = 1, mp.cfg.num_copy_experts = 1, mp.cfg.num_constant_experts = 1;
    mp.cfg.options.set("num_shared_experts", 1), mp.cfg.options.set("shared_gate", true);
    check<MoeLayer<backend::Host<float>, Soft, MixedGelu>, MoeLayer<backend::Cuda<V>, Soft, MixedGelu>>(mp);
  }
  SUBCASE("the balance loss's sequence scope (DeepSeek-V3): per-sequence statistics and dprob rows") {
    Case sq{"sequence-balance-sigmoid", small_config(8, 2, RouterKind::kSigmoid, Activation::kSwiGLU), 96, 49};
    sq.cfg.options.set("balance", "sequence"), sq.cfg.options.set("sequence_length", 8), sq.cfg.lbl_coef = 0.3;
    check<MoeLayer<backend::Host<float>, Sig, experts::Ffn<act::SwiGLU>>, MoeLayer<backend::Cuda<V>, Sig, experts::Ffn<act::SwiGLU>>>(sq);
    Case mp{"sequence-balance-moepp", small_config(6, 2, RouterKind::kSoftmax, Activation::kGeLU), 60, 51};
    mp.cfg.num_zero_experts = 1, mp.cfg.num_copy_experts = 1, mp.cfg.num_constant_experts = 1, mp.cfg.tau = 0.5;
    mp.cfg.options.set("balance", "sequence"), mp.cfg.options.set("sequence_length", 12), mp.cfg.lbl_coef = 0.3;
    check<MoeLayer<backend::Host<float>, Soft, MixedGelu>, MoeLayer<backend::Cuda<V>, Soft, MixedGelu>>(mp);
  }
  SUBCASE("MoE++ with sigmoid routing and GlobalBatch balance") {
    Case c{"moepp-sigmoid-global", small_config(6, 2, RouterKind::kSigmoid, Activation::kGeLU), 64, 13};
    c.cfg.num_zero_experts = 2, c.cfg.num_copy_experts = 1, c.cfg.num_constant_experts = 1, c.cfg.tau = 0.1;
    check<MoeLayer<backend::Host<float>, Sig, MixedGelu, balance::GlobalBatch>,
          MoeLayer<backend::Cuda<V>, Sig, MixedGelu, balance::GlobalBatch>>(c);
  }
}

}  // namespace layer_check
