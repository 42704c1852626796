#pragma once
// Over 600 lines on purpose: the CUDA stage bodies mirror backend/host/layer_ops.hpp one for one; the
// kernels themselves live in their own headers (router, permute, combine, activation, shared_expert).
// The CUDA backend's stage bodies for MoeLayer (layer/pipeline.hpp, docs/design.md §6): the same function as the
// host backend's (backend/host/layer_ops.hpp), for every router, expert set, capacity mode and strategy,
// forward and exact backward, on the caller's stream. Include it (through backend/cuda/moe_layer.cuh)
// from a .cu file built by nvcc; the kernels are instantiated in the including translation unit.
//
// Forward: router GEMM (+ gating residual GEMM) -> fused route_tokens (softmax/sigmoid, top-k, gates,
//   P, lse, routed counts, non-finite check) -> aux sums -> capacity + permutation (CUB radix sorts,
//   chunk-major) -> gather x rows -> [the statistics block to pinned memory: the forward's one host
//   synchronisation] -> expert GEMM (W1|W3 in one) -> fused activation -> expert GEMM (W2) -> combine by
//   gather, with the zero/copy/constant experts and the shared experts (computed on a second stream
//   from the start of the forward: backend/cuda/shared_expert.cuh).
// Backward mirrors it; weight gradients are grouped GEMMs accumulating into fp32 gradients; no host
// synchronisation.
// Memory: parameters and gradients at construction (backend/cuda/parameter_store.cuh); the workspace
// at reserve() (or the caller's, through attach_workspace()); the expert side of a distributed layer
// at reserve() too. forward/backward allocate nothing. Calls of one layer must be ordered on one stream.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "moekit/backend/cuda/activation.cuh"
#include "moekit/backend/cuda/combine.cuh"
#include "moekit/backend/cuda/exchange_ops.cuh"
#include "moekit/backend/cuda/expert_choice.cuh"
#include "moekit/backend/cuda/expert_bias.cuh"
#include "moekit/backend/cuda/grouped_gemm.cuh"
#include "moekit/backend/cuda/memory.cuh"
#include "moekit/backend/cuda/parameter_store.cuh"
#include "moekit/backend/cuda/permute.cuh"
#include "moekit/backend/cuda/policy.hpp"
#include "moekit/backend/cuda/router.cuh"
#include "moekit/backend/cuda/shared_expert.cuh"
#include "moekit/backend/cuda/zero_computation.cuh"
#include "moekit/balance/loss.hpp"
#include "moekit/core/tensor.hpp"
#include "moekit/layer/moe_layer_decl.hpp"
#include "moekit/layer/parameter_table.hpp"
#include "moekit/layer/routing_plan.hpp"
#include "moekit/parallel/policy.hpp"

namespace moekit {
namespace backend::cuda {
inline namespace MOEKIT_CUDA_ABI {

template <class V, class Router, class Experts, bool kDistributed>
class MoeOps {
  using Act = typename Experts::activation;
  static constexpr bool kGated = Act::gated;
  static constexpr bool kResidual = router::router_traits<Router>::reads_prev_logits;
  static constexpr bool kStateful = router::router_traits<Router>::stateful;
  // Zero-computation kinds other than Zero / Copy / Constant run through their functors.
  using CustomKinds = typename experts::custom_zc<experts::zc_kinds_t<Experts>>::type;
  static constexpr bool kCustomZc = experts::ZcList<CustomKinds>::size > 0;
  using S = storage_t<V>;
  using I64 = std::int64_t;

 public:
  using value_type = S;  // float, or __nv_bfloat16 (moekit::bf16's bits)
  using logit_type = float;
  using weight_type = float;
  using Exchange = ExchangeOps<S>;
  using Context = cudaStream_t;
  using Options = GemmStrategy;
  using World = comm::Nccl;
  static constexpr I64 kMaxSlots = I64(1) << 30;
  static constexpr bool kGrows = false;  // reserve() before forward; forward never allocates

  // The rows one FFN pass reads and writes, with their activations (h13: [W1|W3] x per row, a: act).
  struct Rows {
    S *x, *y, *dy, *h13, *a;
  };

  MoeOps(const MoeConfig& cfg, ParameterTable table, const StatsLayout& layout, GemmStrategy gemm)
      : cfg_(cfg), layout_(layout), params_(checked_store(cfg, std::move(table))), router_(cfg), routing_(router::routing_of(router_)),
        act_(act::make_activation<Act>(cfg)) {
    Router::declare_logits(terms_);
    for (const router::LogitTerm& t : terms_) {  // x meets a storage-typed weight, fp32 logits an fp32 one
      const bool want_fp32 = t.input != router::LogitInput::kX;
      for (const auto& f : params_.table().families())
        if (f.key == t.family && f.fp32 != want_fp32)
          throw ConfigError("parameter family " + f.key, f.fp32 ? "fp32" : "storage type",
                            want_fp32 ? "must be fp32 on the CUDA backend (it meets the fp32 logits)"
                                      : "must be in the storage type on the CUDA backend (it meets x)");
    }
    if constexpr (kStateful) {
      state_dev_.resize(std::size_t(cfg_.num_experts()));
      fill_device(state_dev_.data(), 0, std::size_t(cfg_.num_experts()) * sizeof(float));
    }
    gemm_ = std::make_unique<ExpertGemm>(gemm, int(params_.table().local_experts()));
    if (params_.table().has_region("shared_w2")) {  // (the argument `table` was moved from)
      shared_f_ = params_.table().region("shared_w2").stride / cfg_.d_model;
      shared_gate_ = params_.table().has_region("shared_gate");
      side_ = std::make_unique<SideStream>();
    }
    if (has_bias()) offsets_dev_.resize(std::size_t(params_.table().local_experts() + 1));
    if constexpr (kCustomZc) czc_ = CustomZc<S, CustomKinds>(cfg_, params_.table());
    host_stats_.resize(std::size_t(layout_.ints + layout_.floats));  // pinned, sized once: the GlobalBatch hook points into it
    host_dprob_.resize(std::size_t(cfg_.num_experts()));
    MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
  }

  GemmStrategy gemm_strategy() const { return gemm_->strategy(); }
  int gemm_fallbacks() const { return gemm_->grouped_fallbacks(); }
  const GemmPathCounts& gemm_paths() const { return gemm_->path_counts(); }

  // ---- parameters (backend/cuda/parameter_store.cuh) ----------------------------------------------
  const ParameterTable& table() const { return params_.table(); }
  void* flat_values() const { return params_.flat_values(); }
  std::size_t flat_value_bytes() const { return params_.flat_value_bytes(); }
  float* flat_grads() const { return params_.flat_grads(); }
  std::size_t flat_grad_count() const { return params_.flat_grad_count(); }
  float* grad_data() const { return params_.flat_grads(); }
  void load_weights(const MoeWeights<float>& full) { params_.load(full); }
  MoeWeights<float> weights() const { return params_.weights(); }
  MoeWeights<float> gradients() const { return params_.gradients(); }
  void zero_grad(cudaStream_t stream) { params_.zero_grad(stream); }
  std::vector<DeviceParameter> parameters(const std::string& prefix) const { return params_.parameters(prefix); }
  // The router state's values (router/state.hpp), mirrored on the device for route_tokens.
  void set_router_state(std::span<const float> v) {
    copy_to_device(state_dev_.data(), v.data(), v.size() * sizeof(float));
  }

  // ---- workspace --------------------------------------------------------------------------------
  // int kernels and cuBLAS int sizes: every dimension must fit (checked before anything is allocated).
  static void check_config(const MoeConfig& cfg) {
    const std::pair<const char*, I64> dims[] = {{"d_model", cfg.d_model}, {"d_expert", cfg.d_expert}, {"num_experts()", cfg.num_experts()}};
    for (const auto& [field, v] : dims)
      if (v > (I64(1) << 30)) throw ConfigError(field, std::to_string(v), "must be <= 2^30 on the CUDA backend");
  }
  std::size_t workspace_bytes(I64 tokens) const {
    check_token_limits(tokens);
    Buffers b;
    return carve(b, nullptr, tokens);
  }
  // Returns whether the layer now has another workspace (what the last forward saved is gone). The new
  // workspace is allocated before the old one is freed: an allocation that fails (Status::kOutOfMemory from
  // initialize()) leaves the layer as it was, its saved forward included. So growing needs the old and
  // the new size at once; near the memory limit, give the layer caller-owned memory instead.
  bool reserve(I64 tokens) {
    if (reserved_ >= 0 && tokens <= reserved_ && !external_) return false;
    DeviceArray<char> fresh(workspace_bytes(tokens));
    owned_ = std::move(fresh);
    external_ = false;
    bind(owned_.data(), tokens);
    return true;
  }
  void attach_workspace(void* p, std::size_t bytes, I64 tokens)
    requires(!kDistributed)
  {
    const std::size_t need = workspace_bytes(tokens);
    if (reinterpret_cast<std::uintptr_t>(p) % 256 != 0)
      throw ShapeError("attach_workspace: the pointer must be 256-byte aligned (as cudaMalloc's are)");
    if (!p || bytes < need)
      throw ShapeError("attach_workspace: " + std::to_string(bytes) + " bytes given, " + std::to_string(need) +
                       " needed for " + std::to_string(tokens) + " tokens");
    owned_.resize(0);
    bind(static_cast<char*>(p), tokens);
    external_ = true;
  }
  I64 reserved_tokens() const { return reserved_ < 0 ? 0 : reserved_; }
  void prepare(I64 tokens) const {
    if (tokens > reserved_)
      throw ShapeError("x has " + std::to_string(tokens) + " tokens but the workspace holds " + std::to_string(reserved_tokens()) +
                       " (call reserve(" + std::to_string(tokens) + ") first: forward never allocates)");
  }
  // The expert side of a distributed layer: `rows` rows and their activations.
  // All five arrays are allocated before any is replaced: a failure leaves the old ones in place.
  void reserve_expert_side(I64 rows) {
    if (rows <= capacity_rows_ && xe_.size()) return;
    DeviceArray<S> xe(std::size_t(rows * cfg_.d_model)), ye(xe.size()), dye(xe.size());
    DeviceArray<S> h13e(std::size_t(rows * table().w13_rows())), ae(std::size_t(rows * table().local_d_expert()));
    xe_ = std::move(xe), ye_ = std::move(ye), dye_ = std::move(dye), h13e_ = std::move(h13e), ae_ = std::move(ae);
    capacity_rows_ = rows;
  }
  I64 capacity_rows() const { return capacity_rows_; }

  // ---- statistics: computed on the device, brought to pinned memory by sync_stats -------------------
  // The balance loss's sequence scope (balance::ScopeOptions): S tokens per sequence, or 0. Set before
  // the workspace is sized (its per-sequence buffers).
  void set_sequence_length(I64 s) { seq_len_ = s; }
  void use_sequences(bool on) { seq_on_ = on; }  // this forward's: whole sequences (an evaluation forward may have none)
  struct SequenceStats {
    const std::int32_t* counts;  // [B, N_E]
    const float* prob_sums;      // [B, N_E]
  };
  SequenceStats sequence_stats_host() const { return {host_seq_counts_.data(), host_seq_prob_.data()}; }
  std::int32_t* stats_ints() const { return reinterpret_cast<std::int32_t*>(b_.stats); }
  const std::int32_t* stats_ints_host() const { return host_stats_.data(); }
  const float* stats_floats_host() const { return reinterpret_cast<const float*>(host_stats_.data() + layout_.ints); }
  // The forward's one host synchronisation.
  void sync_stats(cudaStream_t stream) {
    MOEKIT_CUDA_CHECK(cudaMemcpyAsync(host_stats_.data(), b_.stats, stats_bytes(), cudaMemcpyDeviceToHost, stream));
    if (seq_len_ > 0 && seq_on_ && tokens_ > 0) {  // the sequence scope's [B, N_E] statistics, in the same synchronisation
      const std::size_t m = std::size_t(tokens_ / seq_len_ * cfg_.num_experts());
      MOEKIT_CUDA_CHECK(cudaMemcpyAsync(host_seq_counts_.data(), b_.seq_counts, m * sizeof(int), cudaMemcpyDeviceToHost, stream));
      MOEKIT_CUDA_CHECK(cudaMemcpyAsync(host_seq_prob_.data(), b_.seq_prob, m * sizeof(float), cudaMemcpyDeviceToHost, stream));
    }
    MOEKIT_CUDA_CHECK(cudaStreamSynchronize(stream));
  }

  // Router replay (router/replay.hpp): the next forward's record [T, k] (checked by the layer; host
  // memory that stays put until the forward's synchronisation), or null.
  void use_replay(const std::int32_t* indices, I64 tokens) {
    replay_on_ = indices != nullptr;
    if (!replay_on_) return;
    const std::size_t n = std::size_t(tokens * cfg_.top_k);
    replay_slots_ = I64(std::count_if(indices, indices + n, [](std::int32_t e) { return e >= 0; }));
    if (n) copy_to_device(b_.replay, indices, n * sizeof(int));
  }

  // ---- forward ----------------------------------------------------------------------------------
  void begin(const S* x, const float* prev, I64 tokens, cudaStream_t stream) {
    tokens_ = tokens;
    if (side_) side_->join(stream);  // a forward that stopped early may have left the shared experts running on x
    MOEKIT_CUDA_CHECK(cudaMemcpyAsync(b_.x, x, std::size_t(tokens * cfg_.d_model) * sizeof(S), cudaMemcpyDeviceToDevice, stream));
    if constexpr (kResidual)
      if (prev)
        MOEKIT_CUDA_CHECK(cudaMemcpyAsync(b_.prev, prev, std::size_t(tokens * cfg_.num_experts()) * sizeof(float),
                                          cudaMemcpyDeviceToDevice, stream));
  }

  // Router logits in fp32 (the router's terms: x W_r^T, + prev W_g^T, + b as ones · b); route_tokens;
  // the aux sums P_i = Σ_t prob[t, i] (prob^T · 1) and Σ_t lse_t².
  void route(bool has_prev, cudaStream_t stream) {
    const int T = int(tokens_), N = int(cfg_.num_experts()), D = int(cfg_.d_model);
    const cudaDataType_t st = data_type<S>();
    cublasHandle_t h = gemm_->handle(stream);
    float beta = 0.f;  // the first term writes the logits, the others add
    for (const router::LogitTerm& term : terms_) {
      if (term.input == router::LogitInput::kX) {
        MOEKIT_CUBLAS_CHECK(gemm_row_major(h, {false, true, st, CUDA_R_32F, 1.f, beta},
                                           {T, N, D, b_.x, D, params_.region(term.family), D, b_.logits, N}));
      } else if (term.input == router::LogitInput::kPrevLogits) {
        if (!kResidual || !has_prev) continue;  // the first MoE layer: no previous logits
        MOEKIT_CUBLAS_CHECK(gemm_row_major(h, {false, true, CUDA_R_32F, CUDA_R_32F, 1.f, beta},
                                           {T, N, N, b_.prev, N, params_.fp32_region(term.family), N, b_.logits, N}));
      } else {
        MOEKIT_CUBLAS_CHECK(gemm_row_major(h, {false, false, CUDA_R_32F, CUDA_R_32F, 1.f, beta},
                                           {T, N, 1, b_.ones, 1, params_.fp32_region(term.family), N, b_.logits, N}));
      }
      beta = 1.f;
    }
    if (routing_ == Routing::kExpertChoice) {  // the experts choose (backend/cuda/expert_choice.cuh)
      const balance::Capacities caps = router::expert_choice_capacities(cfg_, tokens_);
      ExpertChoiceParams ep;
      ep.logits = b_.logits, ep.tokens = T, ep.experts = N, ep.ffn_experts = int(cfg_.num_ffn_experts);
      ep.cap_ffn = int(caps.ffn), ep.cap_zc = int(caps.zc), ep.scale = float(router_.gate_rule().scale);
      ep.prob = b_.prob, ep.lse = b_.lse, ep.bad_token = stats_ints() + layout_.bad, ep.counts = stats_ints() + layout_.routed;
      ep.first = b_.plan_first, ep.token_of = b_.plan_token_of, ep.idx = b_.idx, ep.gate = b_.gate;
      ep.keys = b_.ec_keys, ep.taken = b_.ec_taken, ep.count = b_.plan_count, ep.offsets = b_.ec_offsets;
      MOEKIT_CUDA_CHECK(expert_choice_route(ep, b_.perm, perm_bytes_, stream));
      slot_count_ = I64(caps.ffn) * cfg_.num_ffn_experts + I64(caps.zc) * cfg_.num_zc_experts();
    } else {
      RouteParams rp;
      rp.logits = b_.logits, rp.tokens = T, rp.experts = N, rp.top_k = int(cfg_.top_k), rp.sel = b_.scratch;
      rp.prob = b_.prob, rp.idx = b_.idx, rp.gate = b_.gate, rp.lse = b_.lse;
      rp.counts = stats_ints() + layout_.routed, rp.bad_token = stats_ints() + layout_.bad;
      if constexpr (kStateful) rp.state = state_dev_.data();
      if (replay_on_) {  // the record's experts, by token (router.cuh's route_replay)
        ReplayParams q;
        q.route = rp, q.record = b_.replay, q.first = b_.plan_first, q.token_of = b_.plan_token_of, q.tokens = T;
        MOEKIT_CUDA_CHECK(route_replay(router_, q, b_.plan_count, b_.plan_first, b_.perm, perm_bytes_, stream));
        slot_count_ = replay_slots_;
      } else {
        MOEKIT_CUDA_CHECK(route_tokens(router_, rp, stream));
        slot_count_ = tokens_ * cfg_.top_k;
      }
    }
    float* prob_sum = stats_floats() + layout_.prob_sum;
    if (T > 0) {
      const float one = 1.f, zero = 0.f;
      MOEKIT_CUBLAS_CHECK(cublasSgemv(h, CUBLAS_OP_N, N, T, &one, b_.prob, N, b_.ones, 1, &zero, prob_sum, 1));
    } else {
      MOEKIT_CUDA_CHECK(cudaMemsetAsync(prob_sum, 0, sizeof(float) * std::size_t(N), stream));
    }
    MOEKIT_CUDA_CHECK(sum_squares(b_.lse, T, stats_floats() + layout_.z_sum, stream));
    if (seq_len_ > 0 && seq_on_)
      MOEKIT_CUDA_CHECK(sequence_stats(b_.idx, slots(), b_.prob, int(tokens_ / seq_len_), int(seq_len_), N, b_.seq_counts,
                                       b_.seq_prob, stream));
  }

  // Capacity, permutation (chunk-major), the gather of every FFN row, the constant experts' mix.
  void plan(const balance::Capacities& caps, int chunks, int /*my_chunk: every row is gathered*/, cudaStream_t stream) {
    const int T = int(tokens_), N = int(cfg_.num_experts()), D = int(cfg_.d_model), NC = int(cfg_.num_constant_experts);
    chunks_ = chunks;
    PermuteParams pp;
    pp.idx = b_.idx, pp.slots = slots(), pp.experts = N, pp.ffn_experts = int(cfg_.num_ffn_experts), pp.chunks = chunks;
    pp.cap_ffn = int(std::min<I64>(caps.ffn, INT32_MAX)), pp.cap_zc = int(std::min<I64>(caps.zc, INT32_MAX));
    if (caps.ffn >= 0) {
      MOEKIT_CUDA_CHECK(slot_scores(router_, b_.logits, b_.prob, b_.idx, slots(), N, b_.score, stream));
      pp.score = b_.score;
    }
    pp.slot_of_row = b_.slot_of_row, pp.row_of_slot = b_.row_of_slot;
    pp.offsets = stats_ints() + layout_.offsets, pp.kept_counts = stats_ints() + layout_.kept;
    std::size_t perm_bytes = perm_bytes_;
    MOEKIT_CUDA_CHECK(permute_slots(b_.perm, perm_bytes, pp, stream));
    MOEKIT_CUDA_CHECK(gather_rows(b_.x, b_.slot_of_row, b_.xp, int(slot_count_), slots(), D, stream, rows_dev()));
    if (NC > 0) {  // [a1, a2] of constant experts from one GEMM over all of them
      MOEKIT_CUBLAS_CHECK(gemm_row_major(gemm_->handle(stream), {false, true, data_type<S>(), CUDA_R_32F, 1.f, 0.f},
                                         {T, 2 * NC, D, b_.x, D, params_.const_wc(), D, b_.zc_logits, 2 * NC}));
      MOEKIT_CUDA_CHECK(zc_mix(combine_params(), b_.zc_logits, b_.mix, stream));
    }
  }

  Rows token_rows() const { return {b_.xp, b_.yp, b_.dyp, b_.h13, b_.a}; }
  Rows expert_rows(I64 rows) {
    if (rows > capacity_rows_)
      throw ShapeError("expert side: " + std::to_string(rows) + " rows, " + std::to_string(capacity_rows_) + " reserved");
    return {xe_.data(), ye_.data(), dye_.data(), h13e_.data(), ae_.data()};
  }

  // [W1|W3] x, activation, W2 a over expert-contiguous rows. Returns the GEMM FLOPs.
  I64 ffn_forward(const Rows& r, std::span<const I64> offsets, cudaStream_t stream) {
    const int D = int(cfg_.d_model), F = int(f()), WF = int(wf());
    const I64 d = cfg_.d_model, rows = offsets.empty() ? 0 : offsets.back();
    const GemmSpec fwd{false, true, data_type<S>(), data_type<S>(), 1.f, 0.f};
    const S *w13 = params_.w13(), *w2 = params_.w2();
    gemm_->run(fwd, expert_problems(offsets, [&](int e, I64 off, int m) {
                 return GemmProblem{m, WF, D, r.x + off * D, D, w13 + std::size_t(e) * wf() * d, D, r.h13 + off * WF, WF};
               }), stream);
    const BiasView b = bias(offsets, stream);
    if (b.off) MOEKIT_CUDA_CHECK(add_expert_bias(r.h13, WF, 0, WF, b.off, b.experts, b.max_rows, params_.region("b13"), WF, stream));
    MOEKIT_CUDA_CHECK(activation_forward<Act>(r.h13, kGated ? r.h13 + F : nullptr, r.a, int(rows), F, stream, WF, act_));
    gemm_->run(fwd, expert_problems(offsets, [&](int e, I64 off, int m) {
                 return GemmProblem{m, D, F, r.a + off * F, F, w2 + std::size_t(e) * d * f(), F, r.y + off * D, D};
               }), stream);
    if (b.off) MOEKIT_CUDA_CHECK(add_expert_bias(r.y, D, b.col0, b.cols, b.off, b.experts, b.max_rows, params_.region("b2"), b.cols, stream));
    return rows * 2 * (wf() * d + d * f());
  }
  void drop_activations() {}  // the device buffers are fixed; the recomputation overwrites them
  // dW2 += dY^T A; dA = dY W2 (into a); activation backward in place (h13); dW13 += dH^T X; dX = dH W13 (into dy).
  void ffn_backward(const Rows& r, std::span<const I64> offsets, cudaStream_t stream) {
    const cudaDataType_t st = data_type<S>();
    const int D = int(cfg_.d_model), F = int(f()), WF = int(wf());
    const I64 d = cfg_.d_model, rows = offsets.empty() ? 0 : offsets.back();
    const GemmSpec wgrad{true, false, st, CUDA_R_32F, 1.f, 1.f}, dgrad{false, false, st, st, 1.f, 0.f};
    const S *w13 = params_.w13(), *w2 = params_.w2();
    float *g13 = params_.grad_at(table().offset_or_end("w13")), *g2 = params_.grad_at(table().offset_or_end("w2"));
    const BiasView b = bias(offsets, stream);
    if (b.off)
      MOEKIT_CUDA_CHECK(expert_bias_grad(r.dy, D, b.col0, b.cols, b.off, b.experts, params_.grad_at(table().offset_or_end("b2")), b.cols, stream));
    gemm_->run(wgrad, expert_problems(offsets, [&](int e, I64 off, int m) {
                 return GemmProblem{D, F, m, r.dy + off * D, D, r.a + off * F, F, g2 + std::size_t(e) * d * f(), F};
               }), stream);
    gemm_->run(dgrad, expert_problems(offsets, [&](int e, I64 off, int m) {
                 return GemmProblem{m, F, D, r.dy + off * D, D, w2 + std::size_t(e) * d * f(), F, r.a + off * F, F};
               }), stream);
    MOEKIT_CUDA_CHECK(activation_backward<Act>(r.h13, kGated ? r.h13 + F : nullptr, r.a, r.h13, kGated ? r.h13 + F : nullptr,
                                               int(rows), F, stream, WF, act_));
    if (b.off)
      MOEKIT_CUDA_CHECK(expert_bias_grad(r.h13, WF, 0, WF, b.off, b.experts, params_.grad_at(table().offset_or_end("b13")), WF, stream));
    gemm_->run(wgrad, expert_problems(offsets, [&](int e, I64 off, int m) {
                 return GemmProblem{WF, D, m, r.h13 + off * WF, WF, r.x + off * D, D, g13 + std::size_t(e) * wf() * d, D};
               }), stream);
    gemm_->run(dgrad, expert_problems(offsets, [&](int e, I64 off, int m) {
                 return GemmProblem{m, D, WF, r.h13 + off * WF, WF, w13 + std::size_t(e) * wf() * d, D, r.dy + off * D, D};
               }), stream);
  }

  // ---- the shared experts (experts/shared.hpp) on the side stream: FFN_s on every token -----------
  bool has_shared() const { return shared_f_ > 0; }
  // ys = W2s (silu(W1s x) ⊙ W3s x) (this rank's tp slice: a partial sum over tp), σ = sigmoid(w_sg x).
  // Runs on the side stream until shared_join(). Returns the GEMM FLOPs.
  I64 shared_forward(cudaStream_t stream) {
    if (!has_shared()) return 0;
    const int T = int(tokens_), D = int(cfg_.d_model), FS = int(shared_f_), WFS = 2 * FS;
    const cudaDataType_t st = data_type<S>();
    side_->fork(stream);
    const cudaStream_t s = side_->stream();
    const cublasHandle_t h = side_->handle();
    const GemmSpec fwd{false, true, st, st, 1.f, 0.f};
    MOEKIT_CUBLAS_CHECK(gemm_row_major(h, fwd, {T, WFS, D, b_.x, D, params_.region("shared_w13"), D, b_.sh13, WFS}));
    MOEKIT_CUDA_CHECK(activation_forward<act::SwiGLU>(b_.sh13, b_.sh13 + FS, b_.sha, T, FS, s, WFS, act::SwiGLU{}));
    MOEKIT_CUBLAS_CHECK(gemm_row_major(h, fwd, {T, D, FS, b_.sha, FS, params_.region("shared_w2"), FS, b_.shy, D}));
    if (shared_gate_) MOEKIT_CUDA_CHECK(shared_gate_forward(b_.x, params_.region("shared_gate"), b_.shsig, T, D, s));
    return 2 * tokens_ * I64(WFS) * D + 2 * tokens_ * I64(D) * FS;
  }
  void shared_join(cudaStream_t stream) {
    if (side_) side_->join(stream);
  }
  S* shared_rows() const { return b_.shy; }
  S* shared_dx() const { return b_.shdy; }
  // On the side stream: σ dy and (with the gate) dz = (dy · ys) σ (1 − σ) and w_sg's gradient; then
  // FFN_s's backward: dW2s += (σ dy)^T a, da = (σ dy) W2s, the activation's backward, dW13s += dH^T x,
  // and its input gradient (partial over tp) into shdy, which token_backward adds.
  void shared_backward(const S* dy, cudaStream_t stream) {
    if (!has_shared()) return;
    const int T = int(tokens_), D = int(cfg_.d_model), FS = int(shared_f_), WFS = 2 * FS;
    const cudaDataType_t st = data_type<S>();
    side_->fork(stream);
    const cudaStream_t s = side_->stream();
    const cublasHandle_t h = side_->handle();
    const ParameterTable& t = table();
    MOEKIT_CUDA_CHECK(shared_rows_backward(dy, b_.shy, shared_gate_ ? b_.shsig : nullptr, b_.shdy, b_.shdz, T, D, s));
    if (shared_gate_) MOEKIT_CUDA_CHECK(shared_gate_grad(b_.shdz, b_.x, params_.grad_at(t.region("shared_gate").offset), T, D, s));
    const GemmSpec wgrad{true, false, st, CUDA_R_32F, 1.f, 1.f}, dgrad{false, false, st, st, 1.f, 0.f};
    const S *w13 = params_.region("shared_w13"), *w2 = params_.region("shared_w2");
    float *g13 = params_.grad_at(t.region("shared_w13").offset), *g2 = params_.grad_at(t.region("shared_w2").offset);
    MOEKIT_CUBLAS_CHECK(gemm_row_major(h, wgrad, {D, FS, T, b_.shdy, D, b_.sha, FS, g2, FS}));
    MOEKIT_CUBLAS_CHECK(gemm_row_major(h, dgrad, {T, FS, D, b_.shdy, D, w2, FS, b_.sha, FS}));
    MOEKIT_CUDA_CHECK(activation_backward<act::SwiGLU>(b_.sh13, b_.sh13 + FS, b_.sha, b_.sh13, b_.sh13 + FS, T, FS, s, WFS,
                                                       act::SwiGLU{}));
    MOEKIT_CUBLAS_CHECK(gemm_row_major(h, wgrad, {WFS, D, T, b_.sh13, WFS, b_.x, D, g13, D}));
    MOEKIT_CUBLAS_CHECK(gemm_row_major(h, dgrad, {T, D, WFS, b_.sh13, WFS, w13, D, b_.shdy, D}));
  }

  // y by gather (with the zero-computation experts), then σ · the shared experts' rows (summed over tp
  // and joined by then).
  void combine(S* y, cudaStream_t stream) {
    if constexpr (kCustomZc) {  // their terms into b_.zc_extra, which combine adds
      const float* x32 = nullptr;
      if constexpr (std::is_same_v<S, float>) {
        x32 = b_.x;
      } else {
        MOEKIT_CUDA_CHECK(convert(b_.x, b_.zc_x32, std::size_t(tokens_ * cfg_.d_model), stream));
        x32 = b_.zc_x32;
      }
      czp_ = czc_.params(params_, b_.zc_w32, slots(), b_.idx, b_.row_of_slot, b_.gate, x32, b_.zc_saved, stream);
      MOEKIT_CUDA_CHECK(czc_.forward(czp_, b_.zc_extra, stream));
    }
    MOEKIT_CUDA_CHECK(backend::cuda::combine(combine_params(), y, stream));
    if (has_shared())
      MOEKIT_CUDA_CHECK(add_shared_rows(y, b_.shy, shared_gate_ ? b_.shsig : nullptr, int(tokens_), int(cfg_.d_model), stream));
  }

  // ---- backward ---------------------------------------------------------------------------------
  // dgate of every slot; d rows = gate·dy of every FFN row (into dyp).
  void combine_backward(const S* dy, cudaStream_t stream) {
    const int T = int(tokens_), NC = int(cfg_.num_constant_experts);
    SlotGrads<S> sg;
    sg.dgate = b_.dgate;
    if (NC > 0) {
      sg.dz = b_.dz, sg.coef_z = b_.coef_z, sg.coef_v = b_.coef_v;
      MOEKIT_CUDA_CHECK(cudaMemsetAsync(b_.coef_z, 0, sizeof(S) * std::size_t(T) * 2 * NC, stream));
      MOEKIT_CUDA_CHECK(cudaMemsetAsync(b_.coef_v, 0, sizeof(S) * std::size_t(T) * NC, stream));
    }
    MOEKIT_CUDA_CHECK(backend::cuda::combine_backward(combine_params(), dy, b_.dyp, sg, stream));
    if constexpr (kCustomZc) {  // their dgate, and their input gradients into b_.zc_extra for token_backward
      const float* dy32 = nullptr;
      if constexpr (std::is_same_v<S, float>) {
        dy32 = dy;
      } else {
        MOEKIT_CUDA_CHECK(convert(dy, b_.zc_dy32, std::size_t(tokens_ * cfg_.d_model), stream));
        dy32 = b_.zc_dy32;
      }
      MOEKIT_CUDA_CHECK(czc_.backward(czp_, dy32, b_.dgate, b_.zc_extra, stream));
    }
  }
  // dx by gather + copy/constant experts (fp32 for bf16), the constant experts' weight gradients.
  void token_backward(const S* dy, S* dx, cudaStream_t stream) {
    const int T = int(tokens_), D = int(cfg_.d_model), NC = int(cfg_.num_constant_experts);
    const cudaDataType_t st = data_type<S>();
    cublasHandle_t h = gemm_->handle(stream);
    float* dx32 = b_.dx32 ? b_.dx32 : reinterpret_cast<float*>(dx);
    MOEKIT_CUDA_CHECK(backend::cuda::token_backward(combine_params(), b_.dyp, dy, b_.dz, dx32, stream));
    if (has_shared())  // FFN_s's input gradient (summed over tp and joined by then), σ's part
      MOEKIT_CUDA_CHECK(add_shared_dx(dx32, b_.shdy, shared_gate_ ? b_.shdz : nullptr,
                                      shared_gate_ ? params_.region("shared_gate") : nullptr, T, D, stream));
    if (NC > 0) {
      const ParameterTable& t = table();
      MOEKIT_CUBLAS_CHECK(gemm_row_major(h, {true, false, st, CUDA_R_32F, 1.f, 1.f},
                                         {NC, D, T, b_.coef_v, NC, dy, D, params_.grad_at(t.offset_or_end("const_v")), D}));
      MOEKIT_CUBLAS_CHECK(gemm_row_major(h, {true, false, st, CUDA_R_32F, 1.f, 1.f},
                                         {2 * NC, D, T, b_.coef_z, 2 * NC, b_.x, D, params_.grad_at(t.offset_or_end("const_wc")), D}));
    }
  }
  // dlogits (route_tokens_backward with the balance loss's dprob and the z-loss), + dlogits_next; the
  // router's (and gating residual's) weight gradients; dx += dlogits W_r, converted to the storage type.
  // dprob: one row [N_E], or (dprob_tokens S > 0, the sequence scope) one per sequence of S tokens.
  void router_backward(const float* dprob, I64 dprob_tokens, float zscale, const float* dlogits_next, float* dprev, S* dx, bool has_prev,
                       cudaStream_t stream) {
    const int T = int(tokens_), N = int(cfg_.num_experts()), D = int(cfg_.d_model);
    cublasHandle_t h = gemm_->handle(stream);
    const std::size_t rows = dprob_tokens > 0 ? std::size_t(tokens_ / dprob_tokens) : 1;
    std::copy_n(dprob, rows * std::size_t(N), host_dprob_.data());  // pinned: the copy is asynchronous
    MOEKIT_CUDA_CHECK(cudaMemcpyAsync(b_.dprob, host_dprob_.data(), sizeof(float) * rows * std::size_t(N), cudaMemcpyHostToDevice, stream));
    if (T == 0) return;
    float* dx32 = b_.dx32 ? b_.dx32 : reinterpret_cast<float*>(dx);
    RouteBackwardParams rb;
    rb.logits = b_.logits, rb.prob = b_.prob, rb.idx = b_.idx, rb.gate = b_.gate, rb.dgate = b_.dgate, rb.dprob = b_.dprob;
    rb.lse = b_.lse, rb.zscale = zscale, rb.dprob_tokens = int(dprob_tokens);
    rb.tokens = T, rb.experts = N, rb.top_k = int(cfg_.top_k);
    rb.scratch = b_.scratch, rb.dlogits = b_.dlogits;
    if (slots().per_token == 0) {  // by token (expert choice, replay): each token over its own slots
      ByTokenBackwardParams q;
      q.route = rb, q.first = b_.plan_first, q.tokens = T;
      MOEKIT_CUDA_CHECK(route_by_token_backward(router_, q, stream));
    } else {
      MOEKIT_CUDA_CHECK(route_tokens_backward(router_, rb, stream));
    }
    if (dlogits_next) {
      const float one = 1.f;
      MOEKIT_CUBLAS_CHECK(cublasSaxpy(h, T * N, &one, dlogits_next, 1, b_.dlogits, 1));
    }
    const cudaDataType_t st = data_type<S>();
    const void* dl = b_.dlogits;
    if (b_.dlogits_s) {  // bf16: the GEMMs with x and W_r take one input type
      MOEKIT_CUDA_CHECK(convert(b_.dlogits, b_.dlogits_s, std::size_t(T) * N, stream));
      dl = b_.dlogits_s;
    }
    const ParameterTable& t = table();
    for (const router::LogitTerm& term : terms_) {  // each term's weight gradient and input gradient
      float* g = params_.grad_at(t.offset_or_end(term.family));
      if (term.input == router::LogitInput::kX) {
        MOEKIT_CUBLAS_CHECK(gemm_row_major(h, {true, false, st, CUDA_R_32F, 1.f, 1.f}, {N, D, T, dl, N, b_.x, D, g, D}));
        MOEKIT_CUBLAS_CHECK(gemm_row_major(h, {false, false, st, CUDA_R_32F, 1.f, 1.f},
                                           {T, D, N, dl, N, params_.region(term.family), D, dx32, D}));
      } else if (term.input == router::LogitInput::kPrevLogits) {
        if (!kResidual || !has_prev) continue;
        MOEKIT_CUBLAS_CHECK(gemm_row_major(h, {true, false, CUDA_R_32F, CUDA_R_32F, 1.f, 1.f}, {N, N, T, b_.dlogits, N, b_.prev, N, g, N}));
        if (dprev)
          MOEKIT_CUBLAS_CHECK(gemm_row_major(h, {false, false, CUDA_R_32F, CUDA_R_32F, 1.f, 0.f},
                                             {T, N, N, b_.dlogits, N, params_.fp32_region(term.family), N, dprev, N}));
      } else {  // db += dlogits^T · 1
        const float one = 1.f;
        MOEKIT_CUBLAS_CHECK(cublasSgemv(h, CUBLAS_OP_N, N, T, &one, b_.dlogits, N, b_.ones, 1, &one, g, 1));
      }
    }
    if (b_.dx32) MOEKIT_CUDA_CHECK(convert(b_.dx32, dx, std::size_t(T) * std::size_t(D), stream));
  }

  // ---- device views of the last forward (valid until the next forward) -----------------------------
  const float* logits_device() const { return b_.logits; }
  const float* probs_device() const { return b_.prob; }
  // Token choice's [T, k] (a replayed forward: its record); expert choice: null (routing_plan_device()).
  const int* topk_indices_device() const { return routing_ != Routing::kTokenChoice ? nullptr : replay_on_ ? b_.replay : b_.idx; }
  const float* topk_gates_device() const { return b_.gate; }
  const int* slot_rows_device() const { return b_.row_of_slot; }  // row, or kSlotDropped / kSlotZeroComputation
  // The plan by slot (expert choice: by token; its layout's arrays are device arrays too).
  RoutingPlan<float> routing_plan_device() const { return {slots(), b_.idx, b_.gate, b_.row_of_slot, b_.slot_of_row}; }

 private:
  static ParameterStore<S> checked_store(const MoeConfig& cfg, ParameterTable table) {
    check_config(cfg);
    return ParameterStore<S>(std::move(table));
  }
  I64 f() const { return table().local_d_expert(); }  // hidden units per tp rank
  I64 wf() const { return table().w13_rows(); }       // rows of a [W1|W3] block
  bool has_bias() const { return table().has_region("b13"); }
  // The FFN biases' launch arguments (off null without ffn_bias): the offsets on the device (a pageable
  // copy: the host vector may change once the call returns), and b2's tp slice, this rank's columns.
  struct BiasView {
    const I64* off = nullptr;
    int experts = 0, col0 = 0, cols = 0;
    I64 max_rows = 0;
  };
  BiasView bias(std::span<const I64> offsets, cudaStream_t stream) {
    if (!has_bias() || offsets.size() < 2) return {};
    MOEKIT_CUDA_CHECK(cudaMemcpyAsync(offsets_dev_.data(), offsets.data(), offsets.size() * sizeof(I64), cudaMemcpyHostToDevice, stream));
    BiasView b;
    b.off = offsets_dev_.data(), b.experts = int(offsets.size() - 1);
    b.cols = int(table().region("b2").stride), b.col0 = table().grid().t * b.cols;
    for (std::size_t e = 0; e + 1 < offsets.size(); ++e) b.max_rows = std::max(b.max_rows, offsets[e + 1] - offsets[e]);
    return b;
  }
  float* stats_floats() const { return reinterpret_cast<float*>(b_.stats + 4 * layout_.ints); }
  std::size_t stats_bytes() const { return std::size_t(4 * (layout_.ints + layout_.floats)); }
  const int* rows_dev() const { return stats_ints() + layout_.rows(chunks_); }  // FFN rows in all

  struct Buffers {
    S *x = nullptr, *xp = nullptr, *h13 = nullptr, *a = nullptr, *yp = nullptr, *dyp = nullptr, *dlogits_s = nullptr,
      *coef_z = nullptr, *coef_v = nullptr;
    S *sh13 = nullptr, *sha = nullptr, *shy = nullptr, *shdy = nullptr;  // the shared experts: [h1|h3], a, ys, dys
    float *shsig = nullptr, *shdz = nullptr;                              // σ and σ'·dσ per token
    int* seq_counts = nullptr;                                            // the sequence scope: [B, N_E]
    float* seq_prob = nullptr;
    // Custom zero-computation kinds: their rows [T, d], saved scalars, bf16's fp32 x, dy and tensors.
    float *zc_extra = nullptr, *zc_saved = nullptr, *zc_x32 = nullptr, *zc_dy32 = nullptr, *zc_w32 = nullptr;
    float *prev = nullptr, *logits = nullptr, *prob = nullptr, *dlogits = nullptr, *scratch = nullptr, *gate = nullptr,
          *dgate = nullptr, *lse = nullptr, *score = nullptr, *mix = nullptr, *dz = nullptr, *zc_logits = nullptr,
          *dx32 = nullptr, *ones = nullptr, *dprob = nullptr;
    int *idx = nullptr, *slot_of_row = nullptr, *row_of_slot = nullptr;
    // A plan by token (expert choice, router replay): first [T + 1], token_of [slots], per-token counts
    // [T + 1]; the replayed record [T, k]. Expert choice's sort (backend/cuda/expert_choice.cuh): keys
    // [2, N_E·T], taken [T·N_E], segment offsets [N_E + 1].
    int *plan_first = nullptr, *plan_token_of = nullptr, *plan_count = nullptr, *replay = nullptr;
    unsigned long long* ec_keys = nullptr;
    int *ec_taken = nullptr, *ec_offsets = nullptr;
    void* perm = nullptr;
    char* stats = nullptr;  // the statistics block (layer/routing_plan.hpp StatsLayout): ints, then floats
  };

  // Lays the buffers for `tokens` tokens out from `base` (or only counts with base == nullptr).
  std::size_t carve(Buffers& b, char* base, I64 tokens) const {
    const std::size_t t = std::size_t(tokens), n = std::size_t(cfg_.num_experts()), d = std::size_t(cfg_.d_model),
                      fl = std::size_t(f()), nc = std::size_t(cfg_.num_constant_experts),
                      rows = std::size_t(router::routing_slots(cfg_, routing_, tokens)), wfl = std::size_t(wf());
    constexpr bool kBf16 = !std::is_same_v<S, float>;
    std::size_t at = 0;
    auto take = [&](auto*& p, std::size_t count) {
      using E = std::remove_reference_t<decltype(*p)>;
      p = base ? reinterpret_cast<E*>(base + at) : nullptr;  // valid (unread) even when count is 0
      at += (count * sizeof(E) + 255) / 256 * 256;
    };
    take(b.x, t * d);
    if constexpr (kResidual) take(b.prev, t * n);
    for (float** p : {&b.logits, &b.prob, &b.dlogits, &b.scratch}) take(*p, t * n);
    if constexpr (kBf16) take(b.dlogits_s, t * n);
    for (float** p : {&b.gate, &b.dgate, &b.score}) take(*p, rows);
    for (float** p : {&b.mix, &b.dz}) take(*p, 2 * rows);
    take(b.lse, t);
    for (int** p : {&b.idx, &b.slot_of_row, &b.row_of_slot}) take(*p, rows);
    take(b.xp, rows * d), take(b.h13, rows * wfl), take(b.a, rows * fl), take(b.yp, rows * d), take(b.dyp, rows * d);
    if (nc) take(b.zc_logits, t * 2 * nc), take(b.coef_z, t * 2 * nc), take(b.coef_v, t * nc);
    if (shared_f_ > 0) {
      const std::size_t fs = std::size_t(shared_f_);
      take(b.sh13, t * 2 * fs), take(b.sha, t * fs), take(b.shy, t * d), take(b.shdy, t * d);
      take(b.shsig, t), take(b.shdz, t);
    }
    if constexpr (kBf16) take(b.dx32, t * d);
    take(b.plan_first, t + 1), take(b.plan_token_of, rows), take(b.plan_count, t + 1);
    if (routing_ == Routing::kExpertChoice) take(b.ec_keys, 2 * t * n), take(b.ec_taken, t * n), take(b.ec_offsets, n + 1);
    else take(b.replay, rows);
    take(b.ones, t);
    take(b.dprob, n * dprob_rows(tokens));
    if (seq_len_ > 0) take(b.seq_counts, n * dprob_rows(tokens)), take(b.seq_prob, n * dprob_rows(tokens));
    if constexpr (kCustomZc) {
      take(b.zc_extra, t * d), take(b.zc_saved, rows * std::size_t(CustomZc<S, CustomKinds>::kSaved));
      if constexpr (kBf16) take(b.zc_x32, t * d), take(b.zc_dy32, t * d), take(b.zc_w32, std::size_t(czc_.copy_elements()));
    }
    take(b.stats, stats_bytes());
    char* perm = nullptr;
    take(perm, permute_temp_bytes(tokens));
    b.perm = perm;
    return at;
  }
  // For the most chunks a strategy can use (tp, with duplicate token dropping), so the choice of
  // dropping does not change the workspace.
  // Expert choice's sort and scan, and replay's scan, use the same memory before the permutation does.
  std::size_t permute_temp_bytes(I64 tokens) const {
    std::size_t most = 0;
    if (routing_ == Routing::kExpertChoice) MOEKIT_CUDA_CHECK(expert_choice_temp_bytes(int(tokens), int(cfg_.num_experts()), most));
    else MOEKIT_CUDA_CHECK(route_replay_temp_bytes(int(tokens), most));
    const int slots = int(router::routing_slots(cfg_, routing_, tokens));
    for (int chunks : {1, int(cfg_.tp)}) {
      PermuteParams pp;
      pp.slots = SlotLayout::token_choice(slots, 1), pp.experts = int(cfg_.num_experts());  // only the count matters here
      pp.ffn_experts = int(cfg_.num_ffn_experts), pp.chunks = chunks;
      std::size_t bytes = 0;
      MOEKIT_CUDA_CHECK(permute_slots(nullptr, bytes, pp, nullptr));
      most = std::max(most, bytes);
    }
    return most;
  }
  // int kernels and cuBLAS int sizes: T·k and T·N_E (and T·2·N_const) must fit.
  void check_token_limits(I64 tokens) const {
    if (tokens < 0) throw ShapeError("tokens = " + std::to_string(tokens) + " must be >= 0");
    if (tokens * cfg_.top_k > kMaxSlots)
      throw ShapeError("tokens * top_k = " + std::to_string(tokens * cfg_.top_k) + " exceeds 2^30 on the CUDA backend");
    if (const I64 slots = router::routing_slots(cfg_, routing_, tokens); slots > kMaxSlots)
      throw ShapeError("the experts' tokens under expert choice, " + std::to_string(slots) + ", exceed 2^30 on the CUDA backend");
    const I64 wide = std::max(cfg_.num_experts(), 2 * cfg_.num_constant_experts);
    if (tokens * wide > I64(INT32_MAX))
      throw ShapeError("tokens * num_experts = " + std::to_string(tokens * wide) + " exceeds 2^31 - 1 on the CUDA backend");
  }
  // Rows of the balance loss's dprob: one per sequence of the sequence scope, else one.
  std::size_t dprob_rows(I64 tokens) const { return seq_len_ > 0 ? std::size_t(std::max<I64>(tokens / seq_len_, 1)) : 1; }
  void bind(char* base, I64 tokens) {
    check_token_limits(tokens);
    reserved_ = -1;  // until the buffers are carved and written: a failure below leaves no workspace
    const std::size_t m = dprob_rows(tokens) * std::size_t(cfg_.num_experts());
    if (host_dprob_.size() < m) host_dprob_.resize(m);  // pinned, beside the workspace
    if (seq_len_ > 0 && host_seq_counts_.size() < m) host_seq_counts_.resize(m), host_seq_prob_.resize(m);
    carve(b_, base, tokens);
    perm_bytes_ = permute_temp_bytes(tokens);
    if (tokens > 0) {
      const std::vector<float> ones(std::size_t(tokens), 1.f);
      copy_to_device(b_.ones, ones.data(), ones.size() * sizeof(float));
    }
    reserved_ = tokens;
  }

  // The plan's slots: the token-choice routers' [T, k] (route_tokens writes them so), or expert choice's
  // by token (expert_choice_route writes first and token_of; the count is known on the host).
  SlotLayout slots() const {
    if (routing_ == Routing::kExpertChoice || replay_on_)
      return SlotLayout::by_token(int(tokens_), int(slot_count_), b_.plan_first, b_.plan_token_of);
    return SlotLayout::token_choice(int(tokens_), int(cfg_.top_k));
  }
  CombineParams<S> combine_params() const {
    CombineParams<S> p;
    p.slots = slots(), p.d = int(cfg_.d_model);
    p.gate = b_.gate, p.row_of_slot = b_.row_of_slot, p.slot_of_row = b_.slot_of_row;
    p.num_rows = rows_dev();
    p.y = b_.yp, p.x = b_.x, p.idx = b_.idx;
    p.kinds = ExpertKinds::of(cfg_);
    p.const_v = params_.const_v(), p.const_wc = params_.const_wc(), p.mix = b_.mix;
    p.extra = b_.zc_extra;  // null without custom kinds
    return p;
  }
  // One problem per expert with rows (offsets per expert, on the host).
  template <class F>
  static std::vector<GemmProblem> expert_problems(std::span<const I64> offsets, F&& make) {
    std::vector<GemmProblem> ps;
    for (std::size_t e = 0; e + 1 < offsets.size(); ++e)
      if (offsets[e + 1] > offsets[e]) ps.push_back(make(int(e), offsets[e], int(offsets[e + 1] - offsets[e])));
    return ps;
  }

  MoeConfig cfg_;
  StatsLayout layout_;
  ParameterStore<S> params_;
  CustomZc<S, CustomKinds> czc_;        // zero-computation kinds other than MoE++'s three
  CustomZcParams<CustomKinds> czp_;     // their last forward's launch parameters
  Router router_;             // the router policy with its options (the kernels take it by value)
  Routing routing_;           // its routing (router/expert_choice.hpp)
  router::LogitTerms terms_;  // how its logits are made
  DeviceArray<float> state_dev_;  // a stateful router's values (router::BiasBalanced: b), read by route_tokens
  Act act_;                       // the experts' activation with its options (copied into the kernels)
  DeviceArray<I64> offsets_dev_;  // the FFN biases' expert offsets (ffn_bias only)
  std::unique_ptr<ExpertGemm> gemm_;
  DeviceArray<char> owned_;
  PinnedArray<std::int32_t> host_stats_;  // the statistics block: ints then floats (same 4-byte size)
  PinnedArray<float> host_dprob_;  // [dprob rows, N_E]
  PinnedArray<std::int32_t> host_seq_counts_;  // the sequence scope's statistics
  PinnedArray<float> host_seq_prob_;
  I64 seq_len_ = 0;
  bool seq_on_ = false;
  Buffers b_;
  std::size_t perm_bytes_ = 0;
  I64 reserved_ = -1, tokens_ = 0, capacity_rows_ = 0;  // reserved_ -1: no workspace yet
  I64 slot_count_ = 0;  // the last forward's slots (T·k, the experts' tokens under expert choice, a record's experts)
  I64 replay_slots_ = 0;
  bool replay_on_ = false;  // the last forward replayed a record (router replay)
  int chunks_ = 1;
  bool external_ = false;
  DeviceArray<S> xe_, ye_, dye_, h13e_, ae_;  // the expert side of a distributed layer
  I64 shared_f_ = 0;                          // the shared experts' width on this rank (0: none)
  bool shared_gate_ = false;
  std::unique_ptr<SideStream> side_;          // their stream (shared experts only)
};

}  // namespace MOEKIT_CUDA_ABI
}  // namespace backend::cuda

// Only for this translation unit's architecture tag (backend/cuda/abi.hpp): the layer type, and every
// symbol of its members, then differ between TUs built for different architectures.
template <class V, class Router, class Experts, class Balance, parallel::StrategyPolicy P>
struct layer_ops<backend::Cuda<V, backend::cuda::Abi>, Router, Experts, Balance, P> {
  using type = backend::cuda::MoeOps<V, Router, Experts, P::distributed>;
};

}  // namespace moekit
