#pragma once
// Host (CPU) backend of MoeLayer: CBLAS GEMMs per expert, OpenMP loops over tokens (DESIGN §1-§4).
// This is the oracle of the CUDA backend and the way everything runs without a GPU.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include "moekit/backend/host/blas.hpp"
#include "moekit/backend/host/policy.hpp"
#include "moekit/balance/loss.hpp"
#include "moekit/core/parameter.hpp"
#include "moekit/core/tensor.hpp"
#include "moekit/experts/activation.hpp"
#include "moekit/moe_layer.hpp"
#include "moekit/router/topk.hpp"

// Loops with less work than this many elements run on one thread: waking an OpenMP team costs more,
// and idle OpenMP threads spinning after a region slow the (separately threaded) BLAS calls.
#ifndef MOEKIT_OMP_MIN_WORK
#define MOEKIT_OMP_MIN_WORK 32768
#endif

namespace moekit {

// Weights (or their gradients) of one layer, torch Linear layout [out, in], experts contiguous.
template <class T>
struct MoeWeights {
  std::vector<T> router;  // [N_E, D]           gate.weight
  std::vector<T> w1;      // [N_FFN, d_expert, D] experts.{i}.w1.weight
  std::vector<T> w2;      // [N_FFN, D, d_expert] experts.{i}.w2.weight
  std::vector<T> w3;      // [N_FFN, d_expert, D] experts.{i}.w3.weight (gated activations only)

  void resize(const MoeConfig& c, bool gated) {
    const auto e = c.num_ffn_experts, d = c.d_model, f = c.d_expert;
    router.assign(c.num_experts() * d, T(0));
    w1.assign(e * f * d, T(0));
    w2.assign(e * d * f, T(0));
    w3.assign(gated ? e * f * d : 0, T(0));
  }
  void zero() {
    for (auto* v : {&router, &w1, &w2, &w3}) std::fill(v->begin(), v->end(), T(0));
  }
};

template <class T, class Router, class Experts, class Balance>
class MoeLayer<backend::Host<T>, Router, Experts, Balance, parallel::None> {
  static_assert(router::RouterPolicy<Router>, "MoeLayer: Router must be a router policy such as router::TopK<router::Softmax>");
  static_assert(experts::ExpertPolicy<Experts>, "MoeLayer: Experts must be an expert policy such as experts::Ffn<act::SwiGLU>");
  static_assert(balance::BalancePolicy<Balance>, "MoeLayer: Balance must be balance::MicroBatch");

  using Act = typename Experts::activation;
  using Score = typename Router::score;
  static constexpr bool kGated = Act::gated;

 public:
  using value_type = T;

  explicit MoeLayer(const MoeConfig& cfg) : cfg_(cfg) {
    cfg_.validate();
    if (cfg_.router != Router::kind)
      throw ConfigError("router", std::string("\"") + to_string(cfg_.router) + "\"",
                        std::string("must match the layer's compile-time router policy (\"") +
                            to_string(Router::kind) + "\")");
    if (cfg_.activation != Act::kind)
      throw ConfigError("activation", std::string("\"") + to_string(cfg_.activation) + "\"",
                        std::string("must match the layer's compile-time expert policy (\"") +
                            to_string(Act::kind) + "\")");
    params_.resize(cfg_, kGated);
    grads_.resize(cfg_, kGated);
  }

  const MoeConfig& config() const { return cfg_; }
  MoeWeights<T>& params() { return params_; }
  const MoeWeights<T>& params() const { return params_; }
  MoeWeights<T>& grads() { return grads_; }
  const MoeWeights<T>& grads() const { return grads_; }
  void zero_grad() { grads_.zero(); }

  // torch.nn.Linear's default initialisation, deterministic for a seed.
  void init_params(std::uint64_t seed) {
    SplitMix64 rng(seed);
    const double bd = 1.0 / std::sqrt(double(cfg_.d_model)), bf = 1.0 / std::sqrt(double(cfg_.d_expert));
    init_uniform(params_.router.data(), std::int64_t(params_.router.size()), bd, rng);
    init_uniform(params_.w1.data(), std::int64_t(params_.w1.size()), bd, rng);
    init_uniform(params_.w2.data(), std::int64_t(params_.w2.size()), bf, rng);
    init_uniform(params_.w3.data(), std::int64_t(params_.w3.size()), bd, rng);
  }

  // Every parameter with its gradient, named as Mixtral checkpoints name them.
  std::vector<Parameter<T>> parameters(const std::string& prefix = "") {
    const auto d = cfg_.d_model, f = cfg_.d_expert;
    std::vector<Parameter<T>> ps;
    ps.push_back({prefix + "gate.weight", params_.router.data(), grads_.router.data(), {cfg_.num_experts(), d}});
    for (std::int64_t e = 0; e < cfg_.num_ffn_experts; ++e) {
      const std::string p = prefix + "experts." + std::to_string(e) + ".";
      ps.push_back({p + "w1.weight", params_.w1.data() + e * f * d, grads_.w1.data() + e * f * d, {f, d}});
      ps.push_back({p + "w2.weight", params_.w2.data() + e * d * f, grads_.w2.data() + e * d * f, {d, f}});
      if constexpr (kGated)
        ps.push_back({p + "w3.weight", params_.w3.data() + e * f * d, grads_.w3.data() + e * f * d, {f, d}});
    }
    return ps;
  }

  // Bytes this layer keeps for a forward/backward of `tokens` tokens (allocated by reserve()).
  std::int64_t workspace_bytes(std::int64_t tokens) const {
    const auto n = cfg_.num_experts(), k = cfg_.top_k, d = cfg_.d_model, f = cfg_.d_expert;
    const std::int64_t rows = tokens * k;
    const std::int64_t vals = tokens * d + tokens * n * 3 + tokens * k * 2 + tokens + rows * d * 3 + rows * f * (kGated ? 4 : 2);
    return vals * std::int64_t(sizeof(T)) + (tokens * k * 3 + rows * 2) * std::int64_t(sizeof(std::int32_t));
  }
  // Sizes the saved activations for up to `tokens` tokens; forward() calls it, so buffers only grow.
  void reserve(std::int64_t tokens) {
    if (tokens <= reserved_) return;
    const auto n = cfg_.num_experts(), k = cfg_.top_k, d = cfg_.d_model, f = cfg_.d_expert;
    const std::int64_t rows = tokens * k;
    x_.resize(tokens * d);
    logits_.resize(tokens * n);
    prob_.resize(tokens * n);
    dlogits_.resize(tokens * n);
    gate_.resize(tokens * k);
    dgate_.resize(tokens * k);
    lse_.resize(tokens);
    idx_.resize(tokens * k);
    slot_row_.resize(tokens * k);
    row_slot_.resize(rows);
    xp_.resize(rows * d);
    yp_.resize(rows * d);
    dyp_.resize(rows * d);
    h1_.resize(rows * f);
    a_.resize(rows * f);
    if constexpr (kGated) {
      h3_.resize(rows * f);
      dh3_.resize(rows * f);
    }
    reserved_ = tokens;
  }

  // y = MoE(x). x, y: [T, D] contiguous. Saves what backward needs; returns the aux losses.
  AuxLosses forward(MatrixView<const T> x, MatrixView<T> y) {
    const std::int64_t tokens = x.shape[0], d = cfg_.d_model;
    check_shape(x, "x", {tokens, d});
    check_shape(y, "y", {tokens, d});
    if (tokens * cfg_.top_k > std::int64_t(INT32_MAX))
      throw ShapeError("x has " + std::to_string(tokens) + " tokens; tokens * top_k must fit in int32");
    reserve(tokens);
    tokens_ = tokens;
    std::copy_n(x.data, tokens * d, x_.data());
    route(x.data);
    assign_slots();
    expert_forward(x.data);
    gather_slots(yp_.data(), y.data, /*gate_weighted=*/true);
    aux_ = compute_aux();
    has_forward_ = true;
    return aux_;
  }

  // Backward of L = sum(y * dy) + aux_scale * (lbl_coef * LBL + zloss_coef * zloss).
  // Writes dx [T, D]; adds into grads() (so micro-batches accumulate). With gradient accumulation over
  // m micro-batches pass aux_scale = 1/m, as dy is then scaled too.
  void backward(MatrixView<const T> dy, MatrixView<T> dx, double aux_scale = 1.0) {
    if (!has_forward_) throw std::logic_error("moekit::MoeLayer::backward called before forward");
    check_shape(dy, "dy", {tokens_, cfg_.d_model});
    check_shape(dx, "dx", {tokens_, cfg_.d_model});
    combine_backward(dy.data);
    expert_backward(dx.data);
    router_backward(dx.data, T(aux_scale));
  }

  // Results of the last forward.
  std::int64_t num_tokens() const { return tokens_; }
  MatrixView<const T> logits() const { return {logits_.data(), {tokens_, cfg_.num_experts()}}; }
  MatrixView<const T> probs() const { return {prob_.data(), {tokens_, cfg_.num_experts()}}; }
  MatrixView<const std::int32_t> topk_indices() const { return {idx_.data(), {tokens_, cfg_.top_k}}; }
  MatrixView<const T> topk_gates() const { return {gate_.data(), {tokens_, cfg_.top_k}}; }
  // Slots each expert kept after capacity, and the slots routed to it before (the f_i of the LBL).
  VectorView<const std::int32_t> expert_counts() const { return {kept_.data(), {cfg_.num_experts()}}; }
  const std::vector<std::int64_t>& routed_counts() const { return routed_; }
  // True for (token, slot) pairs that were kept (not dropped by capacity).
  bool slot_kept(std::int64_t t, std::int64_t j) const { return slot_row_[t * cfg_.top_k + j] >= 0; }
  AuxLosses aux() const { return aux_; }

 private:
  using I32 = std::int32_t;

  void route(const T* x) {
    const auto n = cfg_.num_experts(), k = cfg_.top_k, d = cfg_.d_model;
    backend::host::gemm<T>(false, true, tokens_, n, d, T(1), x, params_.router.data(), T(0), logits_.data());
    std::int64_t bad = -1;
#pragma omp parallel for schedule(static) if (tokens_ * n >= MOEKIT_OMP_MIN_WORK)
    for (std::int64_t t = 0; t < tokens_; ++t) {
      const T* l = &logits_[t * n];
      bool finite = true;
      for (std::int64_t i = 0; i < n; ++i) finite = finite && std::isfinite(l[i]);
      if (!finite) {
#pragma omp critical
        bad = bad < 0 ? t : std::min(bad, t);
        continue;
      }
      lse_[t] = router::route_token(Score{}, l, int(n), int(k), cfg_.renormalize, &prob_[t * n], &idx_[t * k],
                                    &gate_[t * k]);
    }
    if (bad >= 0)
      throw NumericError("router logits of token " + std::to_string(bad) + " are not finite (check the input x and gate.weight)");
  }

  // Counts, capacity drops (lowest router score first) and each kept slot's row in the
  // expert-contiguous buffers. Rows of one expert are in token order, so results are deterministic.
  void assign_slots() {
    const auto n = cfg_.num_experts(), k = cfg_.top_k;
    routed_.assign(n, 0);
    for (std::int64_t s = 0; s < tokens_ * k; ++s) ++routed_[idx_[s]];
    std::fill(slot_row_.begin(), slot_row_.begin() + tokens_ * k, 0);  // 0 = kept, -1 = dropped
    const std::int64_t cap = balance::expert_capacity(cfg_.capacity_factor, k, tokens_, n);
    if (cap >= 0) {
      std::vector<std::vector<I32>> by_expert(n);
      for (std::int64_t s = 0; s < tokens_ * k; ++s)
        if (routed_[idx_[s]] > cap) by_expert[idx_[s]].push_back(I32(s));
      for (auto& slots : by_expert) {
        if (slots.empty()) continue;
        // Higher router score first; equal scores keep the earlier token (slots are in token order).
        std::stable_sort(slots.begin(), slots.end(), [&](I32 a, I32 b) { return score_of(a) > score_of(b); });
        for (std::size_t r = std::size_t(cap); r < slots.size(); ++r) slot_row_[slots[r]] = -1;
      }
    }
    kept_.assign(n, 0);
    for (std::int64_t s = 0; s < tokens_ * k; ++s)
      if (slot_row_[s] == 0) ++kept_[idx_[s]];
    offset_.assign(n + 1, 0);
    for (std::int64_t e = 0; e < n; ++e) offset_[e + 1] = offset_[e] + kept_[e];
    std::vector<std::int64_t> fill(offset_.begin(), offset_.end() - 1);
    for (std::int64_t s = 0; s < tokens_ * k; ++s) {
      if (slot_row_[s] < 0) continue;
      const std::int64_t row = fill[idx_[s]]++;
      slot_row_[s] = I32(row);
      row_slot_[row] = I32(s);
    }
  }
  // The router score a slot was picked by: p for softmax, s = sigmoid(logit) for sigmoid.
  T score_of(I32 s) const {
    const std::int64_t at = (s / cfg_.top_k) * cfg_.num_experts() + idx_[s];
    if constexpr (Router::kind == RouterKind::kSigmoid) return router::sigmoid(logits_[at]);
    else return prob_[at];
  }

  // Phases, not a loop of per-expert phases: OpenMP loops and (separately threaded) BLAS calls
  // alternate only a few times per call, since each switch makes the two thread pools contend.
  void expert_forward(const T* x) {
    const auto n = cfg_.num_experts(), k = cfg_.top_k, d = cfg_.d_model, f = cfg_.d_expert;
    const std::int64_t rows = offset_[n];
#pragma omp parallel for schedule(static) if (rows * d >= MOEKIT_OMP_MIN_WORK)
    for (std::int64_t r = 0; r < rows; ++r) std::copy_n(x + (row_slot_[r] / k) * d, d, &xp_[r * d]);
    for_each_expert([&](std::int64_t e, std::int64_t r0, std::int64_t m) {
      backend::host::gemm<T>(false, true, m, f, d, T(1), &xp_[r0 * d], &params_.w1[e * f * d], T(0), &h1_[r0 * f]);
      if constexpr (kGated)
        backend::host::gemm<T>(false, true, m, f, d, T(1), &xp_[r0 * d], &params_.w3[e * f * d], T(0), &h3_[r0 * f]);
    });
    const T* h3 = kGated ? h3_.data() : h1_.data();
#pragma omp parallel for schedule(static) if (rows * f >= MOEKIT_OMP_MIN_WORK)
    for (std::int64_t i = 0; i < rows * f; ++i) a_[i] = act::apply(Act{}, h1_[i], h3[i]);
    for_each_expert([&](std::int64_t e, std::int64_t r0, std::int64_t m) {
      backend::host::gemm<T>(false, true, m, d, f, T(1), &a_[r0 * f], &params_.w2[e * d * f], T(0), &yp_[r0 * d]);
    });
  }

  template <class F>
  void for_each_expert(F&& fn) const {
    for (std::int64_t e = 0; e < cfg_.num_ffn_experts; ++e)
      if (offset_[e + 1] > offset_[e]) fn(e, offset_[e], offset_[e + 1] - offset_[e]);
  }

  // out_t = sum over t's kept slots of (gate or 1) * rows[slot's row]: a gather, not a scatter with
  // atomics, so results are deterministic. Combine (gate-weighted) and dx (unweighted) share it.
  void gather_slots(const T* rows, T* out, bool gate_weighted) const {
    const auto k = cfg_.top_k, d = cfg_.d_model;
#pragma omp parallel for schedule(static) if (tokens_ * d * k >= MOEKIT_OMP_MIN_WORK)
    for (std::int64_t t = 0; t < tokens_; ++t) {
      T* ot = out + t * d;
      std::fill_n(ot, d, T(0));
      for (std::int64_t j = 0; j < k; ++j) {
        const I32 row = slot_row_[t * k + j];
        if (row < 0) continue;
        const T g = gate_weighted ? gate_[t * k + j] : T(1);
        const T* src = rows + std::int64_t(row) * d;
        for (std::int64_t c = 0; c < d; ++c) ot[c] += g * src[c];
      }
    }
  }

  AuxLosses compute_aux() {
    const auto n = cfg_.num_experts(), k = cfg_.top_k;
    prob_sum_.assign(n, T(0));
    T z = 0;
    for (std::int64_t t = 0; t < tokens_; ++t) {
      for (std::int64_t i = 0; i < n; ++i) prob_sum_[i] += prob_[t * n + i];
      z += lse_[t] * lse_[t];
    }
    // MicroBatch scope: f_i from this micro-batch's routed (pre-capacity) counts.
    AuxLosses a;
    a.lbl = double(balance::load_balancing_loss<T>(routed_.data(), prob_sum_.data(), int(n), int(k), tokens_, tokens_));
    a.zloss = tokens_ > 0 ? double(z / T(tokens_)) : 0.0;
    return a;
  }

  void combine_backward(const T* dy) {
    const auto k = cfg_.top_k, d = cfg_.d_model;
#pragma omp parallel for schedule(static) if (tokens_ * d * k >= MOEKIT_OMP_MIN_WORK)
    for (std::int64_t t = 0; t < tokens_; ++t) {
      const T* dyt = dy + t * d;
      for (std::int64_t j = 0; j < k; ++j) {
        const I32 row = slot_row_[t * k + j];
        T dg = 0;
        if (row >= 0) {
          const T g = gate_[t * k + j];
          const T* src = &yp_[std::int64_t(row) * d];
          T* dst = &dyp_[std::int64_t(row) * d];
          for (std::int64_t c = 0; c < d; ++c) {
            dg += dyt[c] * src[c];
            dst[c] = g * dyt[c];
          }
        }
        dgate_[t * k + j] = dg;
      }
    }
  }

  void expert_backward(T* dx) {
    const auto n = cfg_.num_experts(), d = cfg_.d_model, f = cfg_.d_expert;
    const std::int64_t rows = offset_[n];
    // a_ is overwritten with dA once dW2 has used it; h1_ with dH1; dyp_ with d(expert rows).
    for_each_expert([&](std::int64_t e, std::int64_t r0, std::int64_t m) {
      backend::host::gemm<T>(true, false, d, f, m, T(1), &dyp_[r0 * d], &a_[r0 * f], T(1), &grads_.w2[e * d * f]);
      backend::host::gemm<T>(false, false, m, f, d, T(1), &dyp_[r0 * d], &params_.w2[e * d * f], T(0), &a_[r0 * f]);
    });
    T* h3 = kGated ? h3_.data() : h1_.data();
    T* dh3 = kGated ? dh3_.data() : h1_.data();
#pragma omp parallel for schedule(static) if (rows * f >= MOEKIT_OMP_MIN_WORK)
    for (std::int64_t i = 0; i < rows * f; ++i) {
      T g1, g3 = 0;
      act::backward(Act{}, h1_[i], h3[i], a_[i], g1, g3);
      h1_[i] = g1;
      if constexpr (kGated) dh3[i] = g3;
    }
    for_each_expert([&](std::int64_t e, std::int64_t r0, std::int64_t m) {
      const T* xe = &xp_[r0 * d];
      T* dxe = &dyp_[r0 * d];
      backend::host::gemm<T>(true, false, f, d, m, T(1), &h1_[r0 * f], xe, T(1), &grads_.w1[e * f * d]);
      backend::host::gemm<T>(false, false, m, d, f, T(1), &h1_[r0 * f], &params_.w1[e * f * d], T(0), dxe);
      if constexpr (kGated) {
        backend::host::gemm<T>(true, false, f, d, m, T(1), &dh3[r0 * f], xe, T(1), &grads_.w3[e * f * d]);
        backend::host::gemm<T>(false, false, m, d, f, T(1), &dh3[r0 * f], &params_.w3[e * f * d], T(1), dxe);
      }
    });
    gather_slots(dyp_.data(), dx, /*gate_weighted=*/false);
  }

  void router_backward(T* dx, T aux_scale) {
    const auto n = cfg_.num_experts(), k = cfg_.top_k, d = cfg_.d_model;
    std::vector<T> dprob(n);
    for (std::int64_t i = 0; i < n; ++i)
      dprob[i] = aux_scale * T(cfg_.lbl_coef) *
                 balance::load_balancing_dprob<T>(routed_[i], int(n), int(k), tokens_, tokens_);
    const T zscale = tokens_ > 0 ? aux_scale * T(cfg_.zloss_coef) * T(2) / T(tokens_) : T(0);
#pragma omp parallel if (tokens_ * n >= MOEKIT_OMP_MIN_WORK)
    {
      std::vector<T> scratch(n);
#pragma omp for schedule(static)
      for (std::int64_t t = 0; t < tokens_; ++t) {
        // Dropped slots do not reach y, so their gate gradient is 0 (set by combine_backward).
        router::route_token_backward(Score{}, &logits_[t * n], int(n), int(k), cfg_.renormalize, &prob_[t * n],
                                     &idx_[t * k], &gate_[t * k], &dgate_[t * k], dprob.data(), zscale * lse_[t],
                                     scratch.data(), &dlogits_[t * n]);
      }
    }
    backend::host::gemm<T>(true, false, n, d, tokens_, T(1), dlogits_.data(), x_.data(), T(1), grads_.router.data());
    backend::host::gemm<T>(false, false, tokens_, d, n, T(1), dlogits_.data(), params_.router.data(), T(1), dx);
  }

  MoeConfig cfg_;
  MoeWeights<T> params_, grads_;
  std::int64_t reserved_ = 0, tokens_ = 0;
  bool has_forward_ = false;
  AuxLosses aux_;
  std::vector<T> logits_, prob_, dlogits_, gate_, dgate_, lse_, prob_sum_;
  std::vector<I32> idx_, slot_row_, row_slot_, kept_;
  std::vector<std::int64_t> routed_, offset_;
  std::vector<T> x_, xp_, yp_, dyp_, h1_, h3_, dh3_, a_;
};

}  // namespace moekit
