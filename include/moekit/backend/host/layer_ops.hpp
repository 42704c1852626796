#pragma once
// Over 600 lines on purpose: one class holds every stage body of the host oracle (routing, plan, FFN,
// combine, the zero-computation and shared experts, the backward), so each stage reads beside its buffers.
// The host backend's stage bodies for MoeLayer (layer/pipeline.hpp): CBLAS GEMMs per expert, OpenMP
// loops over tokens, buffers that grow on demand (docs/design.md §1-§5). This is the oracle of the CUDA
// backend and the way everything runs without a GPU. Every loop that adds into a shared value runs in
// one fixed order (gathers, not scatters), so results are deterministic for any thread count.
//
// Storage S (the layer's T) and compute type C (compute_t<S>): the same for float and double. For bf16
// (kMixed): x, the FFN rows, the activation and the weights are bf16; logits, probabilities, gates, the
// pre-activations, every sum and every gradient are fp32 (bf16 GEMMs accumulate in fp32:
// backend/host/gemm_bf16.hpp); y and dx are summed in fp32 and rounded once. One rank only.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "moekit/backend/host/blas.hpp"
#include "moekit/backend/host/convert.hpp"
#include "moekit/backend/host/dispatch.hpp"
#include "moekit/backend/host/exchange_ops.hpp"
#include "moekit/backend/host/ffn.hpp"
#include "moekit/backend/host/gemm_bf16.hpp"
#include "moekit/backend/host/policy.hpp"
#include "moekit/balance/loss.hpp"
#include "moekit/core/parameter.hpp"
#include "moekit/core/tensor.hpp"
#include "moekit/experts/activation.hpp"
#include "moekit/backend/host/zero_computation.hpp"
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
  static constexpr bool kGated = Act::gated;
  static constexpr bool kResidual = router::router_traits<Router>::reads_prev_logits;
  static constexpr bool kAnyZc = experts::zc_kinds<Experts>::any;
  using I32 = std::int32_t;
  using I64 = std::int64_t;
  using S = T;
  using C = compute_t<T>;
  static constexpr bool kMixed = !std::is_same_v<S, C>;
  static_assert(!(kMixed && kDistributed), "backend::Host<bf16> runs on one rank only (parallel::None); use backend::Host<float> "
                                           "or backend::Cuda<bf16> for the distributed strategies");

 public:
  using value_type = S;
  using logit_type = C;
  using weight_type = C;
  using Exchange = ExchangeOps<S>;
  using Context = typename Exchange::Context;  // nothing: host calls complete when they return
  struct Options {};
  using World = comm::HostCommunicator;
  static constexpr I64 kMaxSlots = INT32_MAX;  // slot rows are int32
  static constexpr bool kGrows = true;         // forward grows the buffers; reserve() is optional

  // The rows one FFN pass reads and writes (the token side's, or the expert side's); the activations
  // live in the ops either way.
  struct Rows {
    S *x, *y, *dy;
  };

  MoeOps(const MoeConfig& cfg, ParameterTable table, const StatsLayout& layout, Options)
      : cfg_(cfg), table_(std::move(table)), layout_(layout), router_(cfg), routing_(router::routing_of(router_)),
        act_(act::make_activation<Act>(cfg)) {
    Router::declare_logits(terms_);
    if (table_.has_region("shared_w2")) shared_f_ = table_.region("shared_w2").stride / cfg_.d_model;
    if constexpr (kAnyZc) zc_ = ZcExperts(cfg_, table_);
    value_.assign(std::size_t(table_.size()), S(0));
    ints_.assign(std::size_t(layout_.ints), 0);  // sized once: the GlobalBatch hook points into it
    floats_.assign(std::size_t(layout_.floats), C(0));
  }

  // ---- parameters -------------------------------------------------------------------------------
  const ParameterTable& table() const { return table_; }
  std::span<S> flat_values() { return value_; }
  std::span<const S> flat_values() const { return value_; }
  // The gradients are allocated (zeroed) on first use: a layer that only runs evaluation forwards
  // (inference) never holds them. Pointers into them stay valid once handed out.
  std::span<C> flat_grads() { return grads(); }
  std::span<const C> flat_grads() const { return grads(); }
  C* grad_data() { return grads().data(); }
  // Full-size weights in the compute type (bf16: rounded on the way in).
  void load_weights(const MoeWeights<C>& full) {
    if constexpr (kMixed) {
      std::vector<C> flat(value_.size());
      table_.pack(full, flat.data());
      convert(flat.data(), value_.data(), I64(flat.size()));
    } else {
      table_.pack(full, value_.data());
    }
  }
  MoeWeights<C> weights() const {
    if constexpr (kMixed) {
      std::vector<C> flat(value_.size());
      convert(value_.data(), flat.data(), I64(flat.size()));
      return unpacked(flat);
    } else {
      return unpacked(value_);
    }
  }
  MoeWeights<C> gradients() const { return unpacked(grads()); }
  void zero_grad(Context) { std::fill(grads().begin(), grads().end(), C(0)); }
  std::vector<Parameter<S, C>> parameters(const std::string& prefix) { return table_.parameters(value_.data(), grad_data(), prefix); }
  // The router state's values (router/state.hpp: a stateful router's per-expert values) for route.
  void set_router_state(std::span<const C> v) { state_.assign(v.begin(), v.end()); }

  // ---- workspace --------------------------------------------------------------------------------
  static void check_config(const MoeConfig&) {}  // no limits beyond MoeConfig's own rules
  I64 workspace_bytes(I64 tokens) const {
    const auto n = cfg_.num_experts(), d = cfg_.d_model, f = cfg_.d_expert;
    const I64 rows = router::routing_slots(cfg_, routing_, tokens), k = rows / std::max<I64>(tokens, 1), wf = kGated ? 2 * f : f;
    I64 stored = tokens * d + rows * d * 3 + rows * f;  // x, xp / yp / dyp, a
    I64 computed = tokens * n * (kResidual ? 4 : 3) + tokens * k * 4 + tokens + rows * wf;
    if constexpr (kMixed) {  // x, y / dx and dy in fp32; the GEMMs' fp32 outputs; dH13 in bf16
      computed += tokens * d * 3 + rows * std::max(d, f);
      stored += rows * wf;
    }
    if (shared_f_ > 0) {  // the shared experts: ys, its gradient rows, a; h13, σ, dσ (bf16: dh13, GEMM outputs)
      stored += tokens * (2 * d + shared_f_) + (kMixed ? tokens * 2 * shared_f_ : 0);
      computed += tokens * (2 * shared_f_ + 2) + (kMixed ? tokens * std::max(d, shared_f_) : 0);
    }
    const I64 by_token = tokens + 1 + rows;  // first, token_of
    return stored * I64(sizeof(S)) + computed * I64(sizeof(C)) + (rows * 3 + by_token) * I64(sizeof(I32));
  }
  // Sizes the saved activations for up to `tokens` tokens; forward calls it too, so buffers only grow.
  // In evaluation mode the buffers only backward needs (the activation a, d rows, dlogits, dgate) are
  // not allocated, and the forward computes a in place of h13's h1 half (bf16: a is the next GEMM's
  // bf16 operand, kept in both modes).
  void reserve(I64 tokens) {
    const auto n = cfg_.num_experts(), d = cfg_.d_model, f = cfg_.d_expert;
    const I64 rows = router::routing_slots(cfg_, routing_, tokens);  // slots, and the most FFN rows
    if (tokens > reserved_) {
      for (auto* v : {&logits_, &prob_}) v->resize(tokens * n);
      if constexpr (kResidual) prev_.resize(tokens * n);
      gate_.resize(rows);
      lse_.resize(tokens);
      idx_.resize(rows);
      slot_row_.resize(rows);
      row_slot_.resize(rows);
      first_.resize(tokens + 1), token_of_.resize(rows);  // the plans by token (expert choice, replay)
      x_.resize(tokens * d);
      for (auto* v : {&xp_, &yp_}) v->resize(rows * d);
      h13_.resize(rows * (kGated ? 2 : 1) * f);
      if constexpr (kMixed) {
        for (auto* v : {&x32_, &tok32_}) v->resize(tokens * d);
        a_.resize(rows * f);
        acc_.resize(rows * std::max(d, f));
      }
      reserved_ = tokens;
    }
    if (training_ && tokens > reserved_backward_) {
      dlogits_.resize(tokens * n);
      dgate_.resize(rows);
      dyp_.resize(rows * d);
      a_.resize(rows * f);
      if constexpr (kMixed) {
        dy32_.resize(tokens * d);
        dh13_.resize(rows * (kGated ? 2 : 1) * f);
      }
      reserved_backward_ = tokens;
    }
  }
  void prepare(I64 tokens) { reserve(tokens); }
  void set_training(bool on) { training_ = on; }
  // Bytes of the buffers this layer holds now (parameters and gradients included).
  std::size_t buffer_bytes() const {
    std::size_t b = 0;
    for (const auto* v : {&value_, &x_, &xp_, &yp_, &dyp_, &a_, &dh13_, &xe_, &ye_, &dye_, &ys_, &dys_, &as_, &dhs_})
      b += v->capacity() * sizeof(S);
    for (const auto* v : {&std::as_const(grad_), &floats_, &prev_, &logits_, &prob_, &dlogits_, &gate_, &dgate_, &lse_, &h13_, &state_,
                          &x32_, &tok32_, &dy32_, &acc_, &hs_, &sg_, &dz_, &sacc_})
      b += v->capacity() * sizeof(C);
    b += zc_.bytes();
    b += ec_taken_.capacity();
    for (const auto* v : {&ints_, &idx_, &slot_row_, &row_slot_, &first_, &token_of_}) b += v->capacity() * sizeof(I32);
    return b;
  }
  I64 reserved_tokens() const { return reserved_; }
  I64 capacity_rows() const { return INT32_MAX; }  // the expert side grows on demand
  void reserve_expert_side(I64) {}

  // ---- statistics (computed on the host: no synchronisation) --------------------------------------
  // The balance loss's sequence scope (balance::ScopeOptions): S tokens per sequence, or 0.
  void set_sequence_length(I64 s) { seq_len_ = s; }
  void use_sequences(bool on) { seq_on_ = on; }  // this forward's: whole sequences (an evaluation forward may have none)
  struct SequenceStats {
    const I32* counts;     // [B, N_E] routed slots of each sequence
    const C* prob_sums;    // [B, N_E] Σ over its tokens of prob[t, :]
  };
  SequenceStats sequence_stats_host() const { return {seq_counts_.data(), seq_prob_.data()}; }
  I32* stats_ints() { return ints_.data(); }
  const I32* stats_ints_host() const { return ints_.data(); }
  const C* stats_floats_host() const { return floats_.data(); }
  void sync_stats(Context) {}

  // Router replay (router/replay.hpp): the next forward's record [T, k] (checked by the layer), or null.
  void use_replay(const I32* indices, I64 tokens) {
    if (indices) replay_.assign(indices, indices + tokens * cfg_.top_k);
    replay_on_ = indices != nullptr;
  }

  // ---- forward ----------------------------------------------------------------------------------
  void begin(const S* x, const C* prev, I64 tokens, Context) {
    tokens_ = tokens;
    slots_ = SlotLayout::token_choice(int(tokens), int(cfg_.top_k));  // the token-choice routers' [T, k] slots
    std::copy_n(x, tokens * cfg_.d_model, x_.data());
    // fp32 x for the zero-computation experts and the router's weight gradient
    if constexpr (kMixed) convert(x, x32_.data(), tokens * cfg_.d_model);
    if constexpr (kAnyZc) zc_.begin(value_.data());  // bf16: their weights in fp32 (small)
    if constexpr (kResidual)
      if (prev) std::copy_n(prev, tokens * cfg_.num_experts(), prev_.data());
  }

  // Logits (the router's terms: x W_r^T, + prev W_g^T, + b), routing per token (the router policy,
  // outermost wrapper first, with its state), routed counts, the lowest non-finite token, and the aux
  // sums Σ_t p[t, :] and Σ_t lse². A non-finite token routes to experts 0..k-1 with zero gates: the
  // forward stops after the statistics anyway, and its rows stay in range until then.
  void route(bool has_prev, Context) {
    const auto n = cfg_.num_experts(), k = cfg_.top_k, d = cfg_.d_model;
    const bool ec = routing_ == Routing::kExpertChoice;
    has_prev_ = has_prev;
    if (replay_on_) {  // the record's experts, by token (its -1 slots left out); gates below
      int s = 0;
      for (I64 t = 0; t < tokens_; ++t) {
        first_[t] = s;
        for (I64 j = 0; j < k; ++j)
          if (const I32 e = replay_[std::size_t(t * k + j)]; e >= 0) token_of_[s] = int(t), idx_[s++] = e;
      }
      first_[tokens_] = s;
      slots_ = SlotLayout::by_token(int(tokens_), s, first_.data(), token_of_.data());
    }
    bool first = true;  // the first term writes the logits, the others add
    for (const router::LogitTerm& term : terms_) {
      const S* w = &value_[std::size_t(table_.offset_or_end(term.family))];
      const C beta = first ? C(0) : C(1);
      if (term.input == router::LogitInput::kX) {
        gemm(false, true, tokens_, n, d, C(1), x_.data(), w, beta, logits_.data());
      } else if (term.input == router::LogitInput::kPrevLogits) {
        if constexpr (kResidual) {
          if (!has_prev_) continue;  // the first MoE layer: no previous logits
          gemm(false, true, tokens_, n, n, C(1), prev_.data(), w, beta, logits_.data());
        }
      } else {
        for (I64 t = 0; t < tokens_; ++t)
          for (I64 i = 0; i < n; ++i) logits_[t * n + i] = beta * logits_[t * n + i] + to_compute<C>(w[i]);
      }
      first = false;
    }
    int bad = kNoBadToken;
#pragma omp parallel if (tokens_ * n >= MOEKIT_OMP_MIN_WORK)
    {
      std::vector<C> sel(std::size_t(n), C(0));  // the selection's scratch
#pragma omp for schedule(static)
      for (I64 t = 0; t < tokens_; ++t) {
        const C* l = &logits_[t * n];
        bool finite = true;
        for (I64 i = 0; i < n; ++i) finite = finite && std::isfinite(l[i]);
        if (!finite) {
#pragma omp critical
          bad = std::min(bad, int(t));
          if (replay_on_)
            for (int s = slots_.begin(int(t)); s < slots_.end(int(t)); ++s) gate_[s] = C(0);
          else if (!ec)
            for (I64 j = 0; j < k; ++j) idx_[t * k + j] = int(j), gate_[t * k + j] = C(0);
          std::fill_n(&prob_[t * n], n, C(0));
          lse_[t] = C(0);
          continue;
        }
        if (ec) {  // the scores now, the experts' choice below
          lse_[t] = router::token_scores(router::Softmax{}, l, int(n), &prob_[t * n]);
        } else if (replay_on_) {
          const int s = slots_.begin(int(t));
          lse_[t] = router::route_token_replay(router_, l, int(n), &idx_[s], slots_.end(int(t)) - s, &prob_[t * n], &idx_[s], &gate_[s]);
        } else {
          lse_[t] = router::route_token_choice(router_, l, int(n), &prob_[t * n], sel.data(), &idx_[t * k], &gate_[t * k],
                                               state_.empty() ? nullptr : state_.data());
        }
      }
    }
    if (ec) {  // each expert takes its best tokens; the plan by token (router/expert_choice.hpp)
      const I64 count = router::expert_choice_select(prob_.data(), tokens_, n, cfg_.num_ffn_experts,
                                                     router::expert_choice_capacities(cfg_, tokens_), router_.gate_rule().scale,
                                                     first_.data(), token_of_.data(), idx_.data(), gate_.data(), ec_taken_);
      slots_ = SlotLayout::by_token(int(tokens_), int(count), first_.data(), token_of_.data());
    }
    I32* routed = &ints_[layout_.routed];
    std::fill_n(routed, n, 0);
    for (I64 s = 0; s < slots_.slots; ++s) ++routed[idx_[s]];
    ints_[layout_.bad] = bad;
    C* prob_sum = &floats_[layout_.prob_sum];
    std::fill_n(prob_sum, n, C(0));
    C z = 0;
    for (I64 t = 0; t < tokens_; ++t) {
      for (I64 i = 0; i < n; ++i) prob_sum[i] += prob_[t * n + i];
      z += lse_[t] * lse_[t];
    }
    floats_[layout_.z_sum] = z;
    if (seq_len_ > 0 && seq_on_) {  // each sequence's counts and probability sums, in token order
      const I64 seqs = tokens_ / seq_len_;
      seq_counts_.assign(std::size_t(seqs * n), 0);
      seq_prob_.assign(std::size_t(seqs * n), C(0));
      for (I64 t = 0; t < seqs * seq_len_; ++t) {
        const I64 b = t / seq_len_;
        for (int s = slots_.begin(int(t)); s < slots_.end(int(t)); ++s) ++seq_counts_[std::size_t(b * n + idx_[s])];
        for (I64 i = 0; i < n; ++i) seq_prob_[std::size_t(b * n + i)] += prob_[t * n + i];
      }
    }
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
    h13_.resize(std::max(h13_.size(), n * std::size_t(s.wf)));
    if (training_ || kMixed) a_.resize(std::max(a_.size(), n * f));
    const Weights w = W();
    if constexpr (kMixed) {
      acc_.resize(std::max(acc_.size(), n * std::size_t(std::max(s.d, s.f))));
      return backend::host::ffn_forward<Act>(s, w.w13, w.w2, rows.x, h13_.data(), a_.data(), acc_.data(), rows.y, act_, bias(w, nullptr));
    } else {
      return backend::host::ffn_forward<Act>(s, w.w13, w.w2, rows.x, h13_.data(), training_ ? a_.data() : nullptr, rows.y, act_,
                                             bias(w, nullptr));
    }
  }
  void drop_activations() { h13_.clear(), a_.clear(); }
  // rows.dy (gate·dy) -> rows.dy (d of the x rows), the weight gradients added.
  void ffn_backward(const Rows& rows, std::span<const I64> offsets, Context) {
    const Weights w = W();
    const Grads g = G();
    if constexpr (kMixed) {
      const auto s = shapes(offsets);
      dh13_.resize(std::max(dh13_.size(), std::size_t(s.rows() * s.wf)));
      backend::host::ffn_backward<Act>(s, w.w13, w.w2, rows.x, h13_.data(), a_.data(), dh13_.data(), acc_.data(), rows.dy, g.w13, g.w2,
                                       act_, bias(w, &g));
    } else {
      backend::host::ffn_backward<Act>(shapes(offsets), w.w13, w.w2, rows.x, h13_.data(), a_.data(), rows.dy, g.w13, g.w2, act_,
                                       bias(w, &g));
    }
  }

  // ---- the shared experts (experts/shared.hpp): FFN_s on every token, σ per token ------------------
  bool has_shared() const { return shared_f_ > 0; }
  // ys = FFN_s(x) with this rank's tp slice of it (a partial sum over tp: the layer sums it over the tp
  // group), σ_t = sigmoid(w_sg · x_t) or 1. Returns the GEMM FLOPs.
  I64 shared_forward(Context) {
    if (!has_shared()) return 0;
    const I64 d = cfg_.d_model, fs = shared_f_;
    const std::size_t t = std::size_t(tokens_);
    hs_.resize(std::max(hs_.size(), t * std::size_t(2 * fs)));
    as_.resize(std::max(as_.size(), t * std::size_t(fs)));
    for (auto* v : {&ys_, &dys_}) v->resize(std::max(v->size(), t * std::size_t(d)));
    for (auto* v : {&sg_, &dz_}) v->resize(std::max(v->size(), t));
    const FfnShapes<S> s = shared_shapes();
    const SharedWeights<S> w = shared_families(value_);
    if constexpr (kMixed) {
      sacc_.resize(std::max(sacc_.size(), t * std::size_t(std::max(d, fs))));
      backend::host::ffn_forward<act::SwiGLU>(s, w.w13, w.w2, x_.data(), hs_.data(), as_.data(), sacc_.data(), ys_.data());
    } else {
      backend::host::ffn_forward<act::SwiGLU>(s, w.w13, w.w2, x_.data(), hs_.data(), as_.data(), ys_.data());
    }
    const C* xc = x_compute();
    for (I64 i = 0; i < tokens_; ++i) {
      C z = 0;
      if (w.gate)
        for (I64 c = 0; c < d; ++c) z += xc[i * d + c] * to_compute<C>(w.gate[c]);
      sg_[std::size_t(i)] = w.gate ? C(1) / (C(1) + std::exp(-z)) : C(1);
    }
    return 2 * tokens_ * (2 * fs) * d + 2 * tokens_ * d * fs;
  }
  // ys, for the sum over the tp group (after shared_join()); dys: the input gradient's partial rows.
  void shared_join(Context) {}  // the host computed them already
  S* shared_rows() { return ys_.data(); }
  S* shared_dx() { return dys_.data(); }
  // dσ_t = dy_t · ys_t (ys summed over tp by then) and w_sg's gradient Σ_t σ'_t dσ_t x_t (token order);
  // then FFN_s's backward from σ_t dy_t: its weight gradients, and its input gradient (partial over
  // tp) into dys, which token_backward adds with σ's part.
  void shared_backward(const S* dy_s, Context) {
    if (!has_shared()) return;
    const I64 d = cfg_.d_model;
    const C* dy = nullptr;
    if constexpr (kMixed) dy = dy32_.data();  // combine_backward converted it
    else dy = dy_s;
    const SharedWeights<S> w = shared_families(value_);
    const SharedWeights<C> g = shared_families(grads());
#pragma omp parallel for schedule(static) if (tokens_ * d >= MOEKIT_OMP_MIN_WORK)
    for (I64 i = 0; i < tokens_; ++i) {
      const C sig = sg_[std::size_t(i)];
      C ds = 0;
      for (I64 c = 0; c < d; ++c) {
        if (w.gate) ds += dy[i * d + c] * to_compute<C>(ys_[std::size_t(i * d + c)]);
        dys_[std::size_t(i * d + c)] = from_compute<S>(sig * dy[i * d + c]);
      }
      dz_[std::size_t(i)] = ds * sig * (C(1) - sig);
    }
    if (g.gate) {
      const C* xc = x_compute();
      for (I64 i = 0; i < tokens_; ++i)
        for (I64 c = 0; c < d; ++c) g.gate[c] += dz_[std::size_t(i)] * xc[i * d + c];
    }
    const FfnShapes<S> s = shared_shapes();
    if constexpr (kMixed) {
      dhs_.resize(std::max(dhs_.size(), std::size_t(tokens_ * 2 * shared_f_)));
      backend::host::ffn_backward<act::SwiGLU>(s, w.w13, w.w2, x_.data(), hs_.data(), as_.data(), dhs_.data(), sacc_.data(), dys_.data(),
                                               g.w13, g.w2);
    } else {
      backend::host::ffn_backward<act::SwiGLU>(s, w.w13, w.w2, x_.data(), hs_.data(), as_.data(), dys_.data(), g.w13, g.w2);
    }
  }

  // y = Σ over kept FFN slots of gate · expert row, then the zero-computation experts on the token's
  // own row (no GEMM, no travel), then σ · the shared experts' row (summed over tp by then).
  void combine(S* y, Context) {
    C* yc = compute_rows(y);
    gather_slot_rows(plan_view(), yp_.data(), cfg_.d_model, /*gate_weighted=*/true, yc);
    if constexpr (kAnyZc) zc_.forward(plan_view(), x_compute(), yc);
    if (has_shared()) add_shared_rows(yc);
    if constexpr (kMixed) convert(yc, y, tokens_ * cfg_.d_model);
  }

  // ---- backward ---------------------------------------------------------------------------------
  // dgate for every slot, and d(expert rows) = gate · dy for FFN slots.
  void combine_backward(const S* dy_s, Context) {
    const auto d = cfg_.d_model;
    const C* dy = nullptr;
    if constexpr (kMixed) convert(dy_s, dy32_.data(), tokens_ * d), dy = dy32_.data();
    else dy = dy_s;
    [[maybe_unused]] const C* xc = x_compute();
    [[maybe_unused]] const RoutingPlan<C> plan = plan_view();
    [[maybe_unused]] const I64 work = I64(slots_.slots) * d;  // read by the OpenMP clause only
#pragma omp parallel for schedule(static) if (work >= MOEKIT_OMP_MIN_WORK)
    for (I64 t = 0; t < tokens_; ++t) {
      const C* dyt = dy + t * d;
      [[maybe_unused]] const C* xt = xc + t * d;
      for (I64 s = slots_.begin(int(t)); s < slots_.end(int(t)); ++s) {
        const I32 row = slot_row_[s];
        C dg = 0;
        if (row >= 0) {
          const S* src = &yp_[I64(row) * d];
          S* dst = &dyp_[I64(row) * d];
          for (I64 c = 0; c < d; ++c) {
            dg += dyt[c] * to_compute<C>(src[c]);
            dst[c] = from_compute<S>(gate_[s] * dyt[c]);
          }
        } else if (row == kSlotZeroComputation) {
          if constexpr (kAnyZc) dg = zc_.dgate(plan, s, xt, dyt);
        }
        dgate_[s] = dg;  // dropped slots do not reach y: 0
      }
    }
  }
  // dx = Σ over kept FFN slots of the x rows' gradient, then the copy / constant experts, then the
  // shared experts' (FFN_s's rows, summed over tp by then, and σ's dz_t · w_sg) (bf16: into the fp32
  // dx that router_backward completes and rounds).
  void token_backward(const S* dy, S* dx, Context) {
    C* dxc = compute_rows(dx);
    gather_slot_rows(plan_view(), dyp_.data(), cfg_.d_model, /*gate_weighted=*/false, dxc);
    if constexpr (kAnyZc) {
      const C* dyc = nullptr;
      if constexpr (kMixed) dyc = dy32_.data();
      else dyc = dy;
      zc_.backward(plan_view(), x_compute(), dyc, dxc, grads().data());
    }
    if (has_shared()) {
      const I64 d = cfg_.d_model;
      const S* wg = shared_families(value_).gate;
#pragma omp parallel for schedule(static) if (tokens_ * d >= MOEKIT_OMP_MIN_WORK)
      for (I64 i = 0; i < tokens_; ++i)
        for (I64 c = 0; c < d; ++c)
          dxc[i * d + c] += to_compute<C>(dys_[std::size_t(i * d + c)]) + (wg ? dz_[std::size_t(i)] * to_compute<C>(wg[c]) : C(0));
    }
  }
  // dlogits from dgate, the balance loss's dprob and the z-loss (router/topk.hpp), plus dlogits_next;
  // then the router's (and gating residual's) weight gradients and dx += dlogits W_r. dprob: one row
  // [N_E] for every token, or (dprob_tokens S > 0: the sequence scope) row t / S for token t.
  void router_backward(const C* dprob, I64 dprob_tokens, C zscale, const C* dlogits_next, C* dprev, S* dx, bool has_prev, Context) {
    const auto n = cfg_.num_experts(), d = cfg_.d_model;
#pragma omp parallel if (tokens_ * n >= MOEKIT_OMP_MIN_WORK)
    {
      std::vector<C> scratch(n);
#pragma omp for schedule(static)
      for (I64 t = 0; t < tokens_; ++t) {
        C* dl = &dlogits_[t * n];
        const C* dp = dprob_tokens > 0 ? dprob + (t / dprob_tokens) * n : dprob;
        const I64 s = slots_.begin(int(t));
        if (slots_.per_token == 0)  // by token: expert choice, a replayed routing
          router::route_by_token_backward(router_, &logits_[t * n], int(n), slots_.end(int(t)) - int(s), &prob_[t * n], &idx_[s], &gate_[s],
                                          &dgate_[s], dp, zscale * lse_[t], scratch.data(), dl);
        else
          router::route_token_choice_backward(router_, &logits_[t * n], int(n), &prob_[t * n], &idx_[s], &gate_[s], &dgate_[s], dp,
                                              zscale * lse_[t], scratch.data(), dl);
        if (dlogits_next)
          for (I64 i = 0; i < n; ++i) dl[i] += dlogits_next[t * n + i];
      }
    }
    C* dxc = compute_rows(dx);
    for (const router::LogitTerm& term : terms_) {  // each term's weight gradient and input gradient
      const I64 at = table_.offset_or_end(term.family);
      const S* w = &value_[std::size_t(at)];
      C* g = &grads()[std::size_t(at)];
      if (term.input == router::LogitInput::kX) {
        gemm(true, false, n, d, tokens_, C(1), dlogits_.data(), x_compute(), C(1), g);
        gemm(false, false, tokens_, d, n, C(1), dlogits_.data(), w, C(1), dxc);
      } else if (term.input == router::LogitInput::kPrevLogits) {
        if constexpr (kResidual)
          if (has_prev) {
            gemm(true, false, n, n, tokens_, C(1), dlogits_.data(), prev_.data(), C(1), g);
            if (dprev) gemm(false, false, tokens_, n, n, C(1), dlogits_.data(), w, C(0), dprev);
          }
      } else {
        for (I64 t = 0; t < tokens_; ++t)  // token order: deterministic
          for (I64 i = 0; i < n; ++i) g[i] += dlogits_[t * n + i];
      }
    }
    if constexpr (kMixed) convert(dxc, dx, tokens_ * d);
  }

  // ---- views of the last forward ------------------------------------------------------------------
  MatrixView<const C> logits() const { return {logits_.data(), {tokens_, cfg_.num_experts()}}; }
  MatrixView<const C> probs() const { return {prob_.data(), {tokens_, cfg_.num_experts()}}; }
  // Token choice only ([T, k]; expert choice: views of nothing, see routing_plan()). A replayed forward's
  // indices are its record (-1 for no expert); its gates are by token (routing_plan()).
  MatrixView<const I32> topk_indices() const {
    return {!token_choice() ? nullptr : replay_on_ ? replay_.data() : idx_.data(), {tokens_, cfg_.top_k}};
  }
  MatrixView<const C> topk_gates() const { return {token_choice() && !replay_on_ ? gate_.data() : nullptr, {tokens_, cfg_.top_k}}; }
  bool slot_kept(I64 t, I64 j) const {
    if (!token_choice()) return false;
    if (!replay_on_) return slot_row_[t * cfg_.top_k + j] != kSlotDropped;
    int s = slots_.begin(int(t));  // the record's j-th slot, if it has an expert
    for (I64 i = 0; i < j; ++i) s += replay_[std::size_t(t * cfg_.top_k + i)] >= 0;
    return replay_[std::size_t(t * cfg_.top_k + j)] >= 0 && slot_row_[s] != kSlotDropped;
  }
  RoutingPlan<C> routing_plan() const { return plan_view(); }

 private:
  // The expert families of a flat buffer (values: S; gradients: C); the router's terms find theirs by
  // their family key (route, router_backward).
  template <class E>
  struct Families {
    E *w13, *w2, *b13, *b2;  // b13, b2: null without ffn_bias
  };
  using Weights = Families<S>;
  using Grads = Families<C>;
  template <class E>
  Families<E> families_in(std::vector<E>& flat) {
    const ParameterTable& t = table_;
    E* b = flat.data();
    auto opt = [&](const char* key) { return t.has_region(key) ? b + t.region(key).offset : nullptr; };
    return {b + t.offset_or_end("w13"), b + t.offset_or_end("w2"), opt("b13"), opt("b2")};
  }
  // The FFN biases of w (and their gradients in g), or none: b2's tp slice is this rank's columns.
  FfnBias<S, C> bias(const Weights& w, const Grads* g) const {
    if (!w.b13) return {};
    const I64 cols = table_.region("b2").stride;
    return {w.b13, w.b2, g ? g->b13 : nullptr, g ? g->b2 : nullptr, I64(table_.grid().t) * cols, cols};
  }
  Weights W() { return families_in(value_); }
  // The shared experts' families in a flat buffer ([w1; w3], w2, w_sg: null without shared_gate).
  template <class E>
  struct SharedWeights {
    E *w13, *w2, *gate;
  };
  template <class E>
  SharedWeights<E> shared_families(std::vector<E>& flat) const {
    E* b = flat.data();
    return {b + table_.offset_or_end("shared_w13"), b + table_.offset_or_end("shared_w2"),
            table_.has_region("shared_gate") ? b + table_.region("shared_gate").offset : nullptr};
  }
  // FFN_s as one expert over the T token rows.
  FfnShapes<S> shared_shapes() {
    shared_offsets_[1] = tokens_;
    return {cfg_.d_model, shared_f_, shared_offsets_, 1, 2 * shared_f_, false};
  }
  void add_shared_rows(C* y) const {
    const I64 d = cfg_.d_model;
#pragma omp parallel for schedule(static) if (tokens_ * d >= MOEKIT_OMP_MIN_WORK)
    for (I64 i = 0; i < tokens_; ++i)
      for (I64 c = 0; c < d; ++c) y[i * d + c] += sg_[std::size_t(i)] * to_compute<C>(ys_[std::size_t(i * d + c)]);
  }
  Grads G() { return families_in(grads()); }
  // x in the compute type, and the compute-type rows y / dx are summed in before they are rounded.
  const C* x_compute() const {
    if constexpr (kMixed) return x32_.data();
    else return x_.data();
  }
  C* compute_rows(S* out) {
    if constexpr (kMixed) return tok32_.data();
    else return out;
  }
  MoeWeights<C> unpacked(const std::vector<C>& flat) const {
    MoeWeights<C> w;
    table_.unpack(flat.data(), w);
    return w;
  }
  FfnShapes<S> shapes(std::span<const I64> offsets) const {
    return {cfg_.d_model, table_.local_d_expert(), offsets.data(), table_.local_experts(), table_.w13_rows(),
            spread_experts(table_.local_experts())};
  }
  // The router score a slot was picked by (capacity drops go lowest first).
  C score_of(int s) const {
    const I64 at = I64(slots_.token(s)) * cfg_.num_experts() + idx_[s];
    return router_.capacity_score(logits_[at], prob_[at]);
  }
  bool token_choice() const { return routing_ == Routing::kTokenChoice; }
  RoutingPlan<C> plan_view() const { return {slots_, idx_.data(), gate_.data(), slot_row_.data(), row_slot_.data()}; }
  MoeConfig cfg_;
  ParameterTable table_;
  StatsLayout layout_;
  Router router_;             // the router policy with its options
  Routing routing_;           // its routing (router/expert_choice.hpp)
  Act act_;                   // the experts' activation with its options
  router::LogitTerms terms_;  // how its logits are made
  std::vector<S> value_;  // flat, laid out by table_
  std::vector<C>& grads() const {
    if (grad_.empty()) grad_.assign(std::size_t(table_.size()), C(0));
    return grad_;
  }
  mutable std::vector<C> grad_;  // flat, laid out by table_; allocated by grads()
  std::vector<C> state_;         // the router state's values
  std::vector<I32> ints_;
  std::vector<C> floats_;
  I64 reserved_ = 0, reserved_backward_ = 0, tokens_ = 0;
  SlotLayout slots_;  // of the last forward's plan
  bool has_prev_ = false, training_ = true;
  std::vector<S> x_;
  std::vector<C> prev_, logits_, prob_, dlogits_, gate_, dgate_, lse_;
  std::vector<I32> idx_, slot_row_, row_slot_;
  std::vector<I32> first_, token_of_;  // a plan by token (SlotLayout::by_token): expert choice, replay
  std::vector<unsigned char> ec_taken_;  // expert choice's scratch [T, N_E]
  std::vector<I32> replay_;            // the record this forward replays (router replay), [T, k]
  bool replay_on_ = false;
  std::vector<S> xp_, yp_, dyp_, a_, dh13_;
  std::vector<C> h13_;  // [h1 | h3] per FFN row
  std::vector<S> xe_, ye_, dye_;  // the expert side's rows (distributed only)
  std::vector<C> x32_, tok32_, dy32_, acc_;  // bf16 only: fp32 x, y / dx, dy, GEMM outputs
  using ZcExperts = ZeroComputation<S, C, experts::zc_kinds_t<Experts>>;
  ZcExperts zc_;  // the zero-computation experts (backend/host/zero_computation.hpp)
  // The shared experts: width of this rank's slice (0: none); ys [T, D] (its output, then summed over
  // tp), dys (σ dy, then its input gradient), a; [h1 | h3], σ, σ' dσ; bf16: dH13 and the GEMM outputs.
  I64 shared_f_ = 0;
  I64 shared_offsets_[2] = {0, 0};
  I64 seq_len_ = 0;  // the balance loss's sequence scope: its per-sequence statistics
  bool seq_on_ = false;
  std::vector<I32> seq_counts_;
  std::vector<C> seq_prob_;
  std::vector<S> ys_, dys_, as_, dhs_;
  std::vector<C> hs_, sg_, dz_, sacc_;
};

}  // namespace backend::host

template <class T, class Router, class Experts, class Balance, parallel::StrategyPolicy P>
struct layer_ops<backend::Host<T>, Router, Experts, Balance, P> {
  using type = backend::host::MoeOps<T, Router, Experts, P::distributed>;
};

}  // namespace moekit
