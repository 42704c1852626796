#pragma once
// The host backend's stage bodies for MoeLayer (layer/pipeline.hpp): CBLAS GEMMs per expert, OpenMP
// loops over tokens, buffers that grow on demand (DESIGN §1-§5). This is the oracle of the CUDA
// backend and the way everything runs without a GPU. Every loop that adds into a shared value runs in
// one fixed order (gathers, not scatters), so results are deterministic for any thread count.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "moekit/backend/host/blas.hpp"
#include "moekit/backend/host/dispatch.hpp"
#include "moekit/backend/host/exchange_ops.hpp"
#include "moekit/backend/host/ffn.hpp"
#include "moekit/backend/host/policy.hpp"
#include "moekit/balance/loss.hpp"
#include "moekit/core/parameter.hpp"
#include "moekit/core/tensor.hpp"
#include "moekit/experts/activation.hpp"
#include "moekit/experts/zero_computation.hpp"
#include "moekit/layer/moe_layer_decl.hpp"
#include "moekit/layer/parameter_table.hpp"
#include "moekit/layer/routing_plan.hpp"
#include "moekit/parallel/dispatch_plan.hpp"
#include "moekit/parallel/policy.hpp"
#include "moekit/router/policy.hpp"

namespace moekit {
namespace backend::host {

template <class T, class Router, class Experts, bool kDistributed>
class MoeOps {
  using Act = typename Experts::activation;
  using Kinds = experts::zc_kinds<Experts>;
  static constexpr bool kGated = Act::gated;
  static constexpr bool kResidual = Router::residual;
  static constexpr bool kAnyZc = Kinds::zero || Kinds::copy || Kinds::constant;
  using I32 = std::int32_t;
  using I64 = std::int64_t;

 public:
  using value_type = T;
  using logit_type = T;
  using weight_type = T;
  using Exchange = ExchangeOps<T>;
  using Context = typename Exchange::Context;  // nothing: host calls complete when they return
  struct Options {};
  using World = comm::HostCommunicator;
  static constexpr I64 kMaxSlots = INT32_MAX;  // slot rows are int32
  static constexpr bool kGrows = true;         // forward grows the buffers; reserve() is optional

  // The rows one FFN pass reads and writes (the token side's, or the expert side's); the activations
  // live in the ops either way.
  struct Rows {
    T *x, *y, *dy;
  };

  MoeOps(const MoeConfig& cfg, ParameterTable table, const StatsLayout& layout, Options)
      : cfg_(cfg), table_(std::move(table)), layout_(layout) {
    value_.assign(std::size_t(table_.size()), T(0));
    grad_.assign(std::size_t(table_.size()), T(0));
    ints_.assign(std::size_t(layout_.ints), 0);  // sized once: the GlobalBatch hook points into it
    floats_.assign(std::size_t(layout_.floats), T(0));
  }

  // ---- parameters -------------------------------------------------------------------------------
  const ParameterTable& table() const { return table_; }
  std::span<T> flat_values() { return value_; }
  std::span<const T> flat_values() const { return value_; }
  std::span<T> flat_grads() { return grad_; }
  std::span<const T> flat_grads() const { return grad_; }
  T* grad_data() { return grad_.data(); }
  void load_weights(const MoeWeights<T>& full) { table_.pack(full, value_.data()); }
  MoeWeights<T> weights() const { return unpacked(value_); }
  MoeWeights<T> gradients() const { return unpacked(grad_); }
  void zero_grad(Context) { std::fill(grad_.begin(), grad_.end(), T(0)); }
  std::vector<Parameter<T>> parameters(const std::string& prefix) { return table_.parameters(value_.data(), grad_.data(), prefix); }
  // The router state's values (router/state.hpp: a stateful router's per-expert values) for route.
  void set_router_state(std::span<const T> v) { state_.assign(v.begin(), v.end()); }

  // ---- workspace --------------------------------------------------------------------------------
  static void check_config(const MoeConfig&) {}  // no limits beyond MoeConfig's own rules
  I64 workspace_bytes(I64 tokens) const {
    const auto n = cfg_.num_experts(), k = cfg_.top_k, d = cfg_.d_model, f = cfg_.d_expert;
    const I64 rows = tokens * k;
    const I64 vals = tokens * d + tokens * n * (kResidual ? 4 : 3) + tokens * k * 4 + tokens + rows * d * 3 +
                     rows * f * (kGated ? 3 : 2);
    return vals * I64(sizeof(T)) + (tokens * k * 2 + rows) * I64(sizeof(I32));
  }
  // Sizes the saved activations for up to `tokens` tokens; forward calls it too, so buffers only grow.
  // In evaluation mode the buffers only backward needs (the activation a, d rows, dlogits, dgate) are
  // not allocated, and the forward computes a in place of h1.
  void reserve(I64 tokens) {
    const auto n = cfg_.num_experts(), k = cfg_.top_k, d = cfg_.d_model, f = cfg_.d_expert;
    const I64 rows = tokens * k;
    if (tokens > reserved_) {
      for (auto* v : {&logits_, &prob_}) v->resize(tokens * n);
      if constexpr (kResidual) prev_.resize(tokens * n);
      for (auto* v : {&gate_, &mix_}) v->resize(tokens * k * (v == &mix_ ? 2 : 1));
      lse_.resize(tokens);
      idx_.resize(tokens * k);
      slot_row_.resize(tokens * k);
      row_slot_.resize(rows);
      x_.resize(tokens * d);
      for (auto* v : {&xp_, &yp_}) v->resize(rows * d);
      h1_.resize(rows * f);
      if constexpr (kGated) h3_.resize(rows * f);
      reserved_ = tokens;
    }
    if (training_ && tokens > reserved_backward_) {
      dlogits_.resize(tokens * n);
      dgate_.resize(tokens * k);
      dyp_.resize(rows * d);
      a_.resize(rows * f);
      reserved_backward_ = tokens;
    }
  }
  void prepare(I64 tokens) { reserve(tokens); }
  void set_training(bool on) { training_ = on; }
  // Bytes of the buffers this layer holds now (parameters and gradients included).
  std::size_t buffer_bytes() const {
    std::size_t b = 0;
    for (const auto* v : {&value_, &grad_, &floats_, &x_, &prev_, &logits_, &prob_, &dlogits_, &gate_, &dgate_, &mix_, &lse_, &xp_,
                          &yp_, &dyp_, &h1_, &h3_, &a_, &xe_, &ye_, &dye_, &state_})
      b += v->capacity() * sizeof(T);
    for (const auto* v : {&ints_, &idx_, &slot_row_, &row_slot_}) b += v->capacity() * sizeof(I32);
    return b;
  }
  I64 reserved_tokens() const { return reserved_; }
  I64 capacity_rows() const { return INT32_MAX; }  // the expert side grows on demand
  void reserve_expert_side(I64) {}

  // ---- statistics (computed on the host: no synchronisation) --------------------------------------
  I32* stats_ints() { return ints_.data(); }
  const I32* stats_ints_host() const { return ints_.data(); }
  const T* stats_floats_host() const { return floats_.data(); }
  void sync_stats(Context) {}

  // ---- forward ----------------------------------------------------------------------------------
  void begin(const T* x, const T* prev, I64 tokens, Context) {
    tokens_ = tokens;
    slots_ = SlotLayout::token_choice(int(tokens), int(cfg_.top_k));  // the token-choice routers' [T, k] slots
    std::copy_n(x, tokens * cfg_.d_model, x_.data());
    if constexpr (kResidual)
      if (prev) std::copy_n(prev, tokens * cfg_.num_experts(), prev_.data());
  }

  // Logits (x W_r^T, + prev W_g^T), routing per token (the router policy's functor, with its state),
  // routed counts, the lowest non-finite token, and the aux sums Σ_t p[t, :] and Σ_t lse².
  // A non-finite token routes to experts 0..k-1 with zero gates: the forward stops after the
  // statistics anyway, and its rows stay in range until then.
  void route(bool has_prev, Context) {
    const auto n = cfg_.num_experts(), k = cfg_.top_k, d = cfg_.d_model;
    has_prev_ = has_prev;
    const Weights w = W();
    gemm<T>(false, true, tokens_, n, d, T(1), x_.data(), w.router, T(0), logits_.data());
    if constexpr (kResidual)
      if (has_prev_) gemm<T>(false, true, tokens_, n, n, T(1), prev_.data(), w.gate_residual, T(1), logits_.data());
    int bad = kNoBadToken;
#pragma omp parallel for schedule(static) if (tokens_ * n >= MOEKIT_OMP_MIN_WORK)
    for (I64 t = 0; t < tokens_; ++t) {
      const T* l = &logits_[t * n];
      bool finite = true;
      for (I64 i = 0; i < n; ++i) finite = finite && std::isfinite(l[i]);
      if (!finite) {
#pragma omp critical
        bad = std::min(bad, int(t));
        for (I64 j = 0; j < k; ++j) idx_[t * k + j] = int(j), gate_[t * k + j] = T(0);
        std::fill_n(&prob_[t * n], n, T(0));
        lse_[t] = T(0);
        continue;
      }
      lse_[t] = Router::route(l, int(n), int(k), cfg_.renormalize, &prob_[t * n], &idx_[t * k], &gate_[t * k],
                              state_.empty() ? nullptr : state_.data());
    }
    I32* routed = &ints_[layout_.routed];
    std::fill_n(routed, n, 0);
    for (I64 s = 0; s < slots_.slots; ++s) ++routed[idx_[s]];
    ints_[layout_.bad] = bad;
    T* prob_sum = &floats_[layout_.prob_sum];
    std::fill_n(prob_sum, n, T(0));
    T z = 0;
    for (I64 t = 0; t < tokens_; ++t) {
      for (I64 i = 0; i < n; ++i) prob_sum[i] += prob_[t * n + i];
      z += lse_[t] * lse_[t];
    }
    floats_[layout_.z_sum] = z;
  }

  // Capacity drops (lowest router score first), the kept counts, and each kept FFN slot's row:
  // chunk-major (token chunk, then expert, then slot order), so results are deterministic
  // (backend/host/dispatch.hpp). Then the x rows of my chunk (the only ones this rank sends).
  void plan(const balance::Capacities& caps, int chunks, int my_chunk, Context) {
    const auto nf = cfg_.num_ffn_experts, d = cfg_.d_model;
    I32* offsets = &ints_[layout_.offsets];
    assign_rows(slots_, idx_.data(), &ints_[layout_.routed], caps, nf, cfg_.num_experts(), chunks,
                [&](int s) { return score_of(s); }, slot_row_.data(), row_slot_.data(), &ints_[layout_.kept], offsets);
    gather_token_rows(plan_view(), x_.data(), d, offsets[my_chunk * nf], offsets[(my_chunk + 1) * nf], xp_.data());
  }

  Rows token_rows() { return {xp_.data(), yp_.data(), dyp_.data()}; }
  Rows expert_rows(I64 rows) {
    const std::size_t need = std::size_t(rows * cfg_.d_model);
    for (auto* v : {&xe_, &ye_, &dye_}) v->resize(std::max(v->size(), need));
    return {xe_.data(), ye_.data(), dye_.data()};
  }

  // The FFN over rows.x (activations kept for backward) into rows.y. Returns the GEMM FLOPs.
  // Evaluation mode: a in place of h1 (nothing is kept for backward).
  I64 ffn_forward(const Rows& rows, std::span<const I64> offsets, Context) {
    const auto s = shapes(offsets);
    const std::size_t n = std::size_t(s.rows()), f = std::size_t(s.f);
    h1_.resize(std::max(h1_.size(), n * f));
    if (training_) a_.resize(std::max(a_.size(), n * f));
    if constexpr (kGated) h3_.resize(std::max(h3_.size(), n * f));
    const Weights w = W();
    return backend::host::ffn_forward<Act>(s, w.w13, w.w2, rows.x, h1_.data(), h3_.data(), training_ ? a_.data() : h1_.data(),
                                           rows.y);
  }
  void drop_activations() { h1_.clear(), h3_.clear(), a_.clear(); }
  // rows.dy (gate·dy) -> rows.dy (d of the x rows), the weight gradients added.
  void ffn_backward(const Rows& rows, std::span<const I64> offsets, Context) {
    const Weights w = W(), g = G();
    backend::host::ffn_backward<Act>(shapes(offsets), w.w13, w.w2, rows.x, h1_.data(), h3_.data(), a_.data(), rows.dy, g.w13, g.w2);
  }

  // y = Σ over kept FFN slots of gate · expert row, then the zero-computation experts on the token's
  // own row (no GEMM, no travel).
  void combine(T* y, Context) {
    gather_slot_rows(plan_view(), yp_.data(), cfg_.d_model, /*gate_weighted=*/true, y);
    if constexpr (kAnyZc) zero_computation_forward(y);
  }

  // ---- backward ---------------------------------------------------------------------------------
  // dgate for every slot, and d(expert rows) = gate · dy for FFN slots.
  void combine_backward(const T* dy, Context) {
    const auto d = cfg_.d_model;
    const T* const_v = W().const_v;
    const ExpertKinds kinds = ExpertKinds::of(cfg_);
    [[maybe_unused]] const I64 work = I64(slots_.slots) * d;  // read by the OpenMP clause only
#pragma omp parallel for schedule(static) if (work >= MOEKIT_OMP_MIN_WORK)
    for (I64 t = 0; t < tokens_; ++t) {
      const T* dyt = dy + t * d;
      const T* xt = &x_[t * d];
      for (I64 s = slots_.begin(int(t)); s < slots_.end(int(t)); ++s) {
        const I32 row = slot_row_[s];
        T dg = 0;
        if (row >= 0) {
          const T* src = &yp_[I64(row) * d];
          T* dst = &dyp_[I64(row) * d];
          for (I64 c = 0; c < d; ++c) {
            dg += dyt[c] * src[c];
            dst[c] = gate_[s] * dyt[c];
          }
        } else if (row == kSlotZeroComputation) {
          int q = 0;
          const ZcKind kind = kinds.zc_kind(idx_[s], q);
          if (kind == ZcKind::kCopy) {
            for (I64 c = 0; c < d; ++c) dg += dyt[c] * xt[c];
          } else if (kind == ZcKind::kConstant) {
            const T* v = &const_v[I64(q) * d];
            for (I64 c = 0; c < d; ++c) dg += dyt[c] * (mix_[2 * s] * xt[c] + mix_[2 * s + 1] * v[c]);
          }
        }
        dgate_[s] = dg;  // dropped slots and zero experts do not reach y: 0
      }
    }
  }
  // dx = Σ over kept FFN slots of the x rows' gradient, then the copy / constant experts.
  void token_backward(const T* dy, T* dx, Context) {
    gather_slot_rows(plan_view(), dyp_.data(), cfg_.d_model, /*gate_weighted=*/false, dx);
    if constexpr (kAnyZc) zero_computation_backward(dy, dx);
  }
  // dlogits from dgate, the balance loss's dprob and the z-loss (router/topk.hpp), plus dlogits_next;
  // then the router's (and gating residual's) weight gradients and dx += dlogits W_r.
  void router_backward(const T* dprob, T zscale, const T* dlogits_next, T* dprev, T* dx, bool has_prev, Context) {
    const auto n = cfg_.num_experts(), k = cfg_.top_k, d = cfg_.d_model;
#pragma omp parallel if (tokens_ * n >= MOEKIT_OMP_MIN_WORK)
    {
      std::vector<T> scratch(n);
#pragma omp for schedule(static)
      for (I64 t = 0; t < tokens_; ++t) {
        T* dl = &dlogits_[t * n];
        Router::route_backward(&logits_[t * n], int(n), int(k), cfg_.renormalize, &prob_[t * n], &idx_[t * k], &gate_[t * k],
                               &dgate_[t * k], dprob, zscale * lse_[t], scratch.data(), dl);
        if (dlogits_next)
          for (I64 i = 0; i < n; ++i) dl[i] += dlogits_next[t * n + i];
      }
    }
    const Weights w = W(), g = G();
    gemm<T>(true, false, n, d, tokens_, T(1), dlogits_.data(), x_.data(), T(1), g.router);
    gemm<T>(false, false, tokens_, d, n, T(1), dlogits_.data(), w.router, T(1), dx);
    if constexpr (kResidual)
      if (has_prev) {
        gemm<T>(true, false, n, n, tokens_, T(1), dlogits_.data(), prev_.data(), T(1), g.gate_residual);
        if (dprev) gemm<T>(false, false, tokens_, n, n, T(1), dlogits_.data(), w.gate_residual, T(0), dprev);
      }
  }

  // ---- views of the last forward ------------------------------------------------------------------
  MatrixView<const T> logits() const { return {logits_.data(), {tokens_, cfg_.num_experts()}}; }
  MatrixView<const T> probs() const { return {prob_.data(), {tokens_, cfg_.num_experts()}}; }
  MatrixView<const I32> topk_indices() const { return {idx_.data(), {tokens_, cfg_.top_k}}; }
  MatrixView<const T> topk_gates() const { return {gate_.data(), {tokens_, cfg_.top_k}}; }
  bool slot_kept(I64 t, I64 j) const { return slot_row_[t * cfg_.top_k + j] != kSlotDropped; }

 private:
  // The families of a flat buffer (values or gradients).
  struct Weights {
    T *router, *w13, *w2, *const_wc, *const_v, *gate_residual;
  };
  Weights weights_in(std::vector<T>& flat) {
    const auto& o = table_.offsets();
    T* b = flat.data();
    return {b + o.router, b + o.w13, b + o.w2, b + o.const_wc, b + o.const_v, b + o.gate_residual};
  }
  Weights W() { return weights_in(value_); }
  Weights G() { return weights_in(grad_); }
  MoeWeights<T> unpacked(const std::vector<T>& flat) const {
    MoeWeights<T> w;
    table_.unpack(flat.data(), w);
    return w;
  }
  FfnShapes<T> shapes(std::span<const I64> offsets) const {
    return {cfg_.d_model, table_.local_d_expert(), offsets.data(), table_.local_experts(), table_.w13_rows()};
  }
  // The router score a slot was picked by (capacity drops go lowest first).
  T score_of(int s) const {
    const I64 at = I64(slots_.token(s)) * cfg_.num_experts() + idx_[s];
    return Router::capacity_score(logits_[at], prob_[at]);
  }
  RoutingPlan<T> plan_view() const { return {slots_, idx_.data(), gate_.data(), slot_row_.data(), row_slot_.data()}; }
  // Calls fn(slot, kind, constant index) for each kept zero-computation slot of token t.
  template <class F>
  void for_each_zc_slot(I64 t, F&& fn) const {
    const ExpertKinds kinds = ExpertKinds::of(cfg_);
    for (I64 s = slots_.begin(int(t)); s < slots_.end(int(t)); ++s)
      if (slot_row_[s] == kSlotZeroComputation) {
        int q = 0;
        const ZcKind kind = kinds.zc_kind(idx_[s], q);
        fn(s, kind, I64(q));
      }
  }
  void zero_computation_forward(T* y) {
    const auto d = cfg_.d_model;
    const Weights w = W();
    [[maybe_unused]] const I64 work = I64(slots_.slots) * d;  // read by the OpenMP clause only
#pragma omp parallel for schedule(static) if (work >= MOEKIT_OMP_MIN_WORK)
    for (I64 t = 0; t < tokens_; ++t) {
      const T* xt = &x_[t * d];
      T* yt = y + t * d;
      for_each_zc_slot(t, [&](I64 s, ZcKind kind, I64 q) {
        const T g = gate_[s];
        if (kind == ZcKind::kCopy) {
          for (I64 c = 0; c < d; ++c) yt[c] += g * xt[c];
        } else if (kind == ZcKind::kConstant) {
          T a1, a2;
          experts::Constant::mix(&w.const_wc[q * 2 * d], xt, int(d), a1, a2);
          mix_[2 * s] = a1;
          mix_[2 * s + 1] = a2;
          const T* v = &w.const_v[q * d];
          for (I64 c = 0; c < d; ++c) yt[c] += g * (a1 * xt[c] + a2 * v[c]);
        }
      });
    }
  }
  // Copy and constant experts' input gradients and the constant experts' weight gradients, in token
  // order: the work is small, and one fixed order keeps the weight gradients deterministic.
  void zero_computation_backward(const T* dy, T* dx) {
    const auto d = cfg_.d_model;
    const Weights w = W(), gw = G();
    std::vector<T> de(d);
    for (I64 t = 0; t < tokens_; ++t) {
      const T* dyt = dy + t * d;
      T* dxt = dx + t * d;
      for_each_zc_slot(t, [&](I64 s, ZcKind kind, I64 q) {
        const T g = gate_[s];
        if (kind == ZcKind::kCopy) {
          for (I64 c = 0; c < d; ++c) dxt[c] += g * dyt[c];
        } else if (kind == ZcKind::kConstant) {
          for (I64 c = 0; c < d; ++c) de[c] = g * dyt[c];
          experts::Constant::backward(&w.const_wc[q * 2 * d], &x_[t * d], &w.const_v[q * d], mix_[2 * s], mix_[2 * s + 1],
                                     de.data(), int(d), dxt, &gw.const_v[q * d], &gw.const_wc[q * 2 * d]);
        }
      });
    }
  }

  MoeConfig cfg_;
  ParameterTable table_;
  StatsLayout layout_;
  std::vector<T> value_, grad_, state_;  // flat, laid out by table_; the router state's values
  std::vector<I32> ints_;
  std::vector<T> floats_;
  I64 reserved_ = 0, reserved_backward_ = 0, tokens_ = 0;
  SlotLayout slots_;  // of the last forward's plan
  bool has_prev_ = false, training_ = true;
  std::vector<T> x_, prev_, logits_, prob_, dlogits_, gate_, dgate_, mix_, lse_;
  std::vector<I32> idx_, slot_row_, row_slot_;
  std::vector<T> xp_, yp_, dyp_, h1_, h3_, a_;
  std::vector<T> xe_, ye_, dye_;  // the expert side's rows (distributed only)
};

}  // namespace backend::host

template <class T, class Router, class Experts, class Balance, parallel::StrategyPolicy P>
struct layer_ops<backend::Host<T>, Router, Experts, Balance, P> {
  using type = backend::host::MoeOps<T, Router, Experts, P::distributed>;
};

}  // namespace moekit
