#pragma once
// What routing hands to dispatch, expert compute and combine, defined once for every backend (each holds
// the plan in its own buffers: host vectors, device arrays):
//   per slot s (a (token, pick) pair of the token-choice routers: s = t·k + j): the expert, the gate, and
//   its row in the expert-contiguous buffers, or kSlotDropped / kSlotZeroComputation;
//   per expert: routed (pre-capacity) and kept counts, and each FFN expert's range of rows.
// Also the rules both backends apply to it: which kind an expert is, the score capacity drops by, the
// eta of the balance loss, and the aux losses from the per-expert sums.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "moekit/balance/loss.hpp"
#include "moekit/balance/policy.hpp"
#include "moekit/core/config.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/macros.hpp"
#include "moekit/core/tensor.hpp"
#include "moekit/router/policy.hpp"
#include "moekit/router/topk.hpp"

namespace moekit {

// Results of the aux losses of the last forward (unscaled by their coefficients).
struct AuxLosses {
  double lbl = 0.0;
  double zloss = 0.0;
};

// The row of a slot, or one of these.
inline constexpr int kSlotDropped = -1;          // dropped by capacity: contributes 0
inline constexpr int kSlotZeroComputation = -2;  // kept, finished in the combine (zero / copy / constant)

enum class ZcKind { kZero, kCopy, kConstant };

// The experts in routing order: FFN [0, ffn), zero, copy, then constant experts.
struct ExpertKinds {
  int ffn = 0, zero = 0, copy = 0, constant = 0;
  static ExpertKinds of(const MoeConfig& c) {
    return {int(c.num_ffn_experts), int(c.num_zero_experts), int(c.num_copy_experts), int(c.num_constant_experts)};
  }
  MOEKIT_HD bool is_ffn(int e) const { return e < ffn; }
  MOEKIT_HD bool any_zc() const { return zero + copy + constant > 0; }
  // The kind of zero-computation expert e (e >= ffn); q = its index among the constant experts.
  MOEKIT_HD ZcKind zc_kind(int e, int& q) const {
    q = e - ffn - zero - copy;
    if (e < ffn + zero) return ZcKind::kZero;
    return e < ffn + zero + copy ? ZcKind::kCopy : ZcKind::kConstant;
  }
};

// The router score a slot was picked by, which capacity drops by (lowest first): p for softmax, the
// unnormalised s = sigmoid(logit) for sigmoid.
template <class Score, class S>
MOEKIT_HD S capacity_score(S logit, S prob) {
  if constexpr (Score::kind == RouterKind::kSigmoid) return router::sigmoid(logit);
  else return prob;
}

// eta_i of the load-balancing loss: 1 for FFN experts, tau for zero-computation experts (MoE++).
template <class S>
std::vector<S> balance_eta(const MoeConfig& c) {
  std::vector<S> eta(std::size_t(c.num_experts()), S(c.tau));
  for (std::int64_t i = 0; i < c.num_ffn_experts; ++i) eta[std::size_t(i)] = S(1);
  return eta;
}

// The aux losses of one forward from its per-expert sums, the same on every backend: f_i from the
// balance scope's routed counts (the micro-batch's, or a GlobalBatch buffer after adding them), P_i
// from prob_sum (Σ_t prob[t, i] of this micro-batch), z from z_sum (Σ_t lse_t²). Fills the scope's
// counts and tokens (backward needs them).
template <class S, class Balance>
AuxLosses aux_losses(const MoeConfig& c, Balance& balance, bool training, const std::vector<std::int64_t>& routed,
                     std::int64_t tokens, const S* prob_sum, S z_sum, const S* eta, std::vector<std::int64_t>& f_counts,
                     std::int64_t& f_tokens) {
  balance::scope_counts(balance, training, routed, tokens, f_counts, f_tokens);
  AuxLosses a;
  a.lbl = double(balance::load_balancing_loss<S>(f_counts.data(), prob_sum, int(c.num_experts()), int(c.top_k), f_tokens,
                                                 tokens, eta));
  a.zloss = tokens > 0 ? double(z_sum / S(tokens)) : 0.0;
  return a;
}

// The argument checks of forward and backward, the same on every backend (ShapeError naming the tensor).
// max_tokens_times_k: the backend's limit on T·k.
template <class X, class Y, class L>
void check_forward_args(const MoeConfig& c, bool residual, MatrixView<X> x, MatrixView<Y> y, MatrixView<L> prev_logits,
                        std::int64_t max_tokens_times_k) {
  const std::int64_t tokens = x.shape[0];
  check_shape(x, "x", {tokens, c.d_model});
  check_shape(y, "y", {tokens, c.d_model});
  if (tokens * c.top_k > max_tokens_times_k)
    throw ShapeError("x has " + std::to_string(tokens) + " tokens; tokens * top_k must be <= " + std::to_string(max_tokens_times_k));
  if (prev_logits.data) {
    if (!residual) throw ShapeError("prev_logits given, but the router has no gating residual (router::GatingResidual)");
    check_shape(prev_logits, "prev_logits", {tokens, c.num_experts()});
  }
}
template <class X, class Y, class L, class M>
void check_backward_args(const MoeConfig& c, bool has_forward, bool has_prev, std::int64_t tokens, MatrixView<X> dy,
                         MatrixView<Y> dx, MatrixView<L> dlogits_next, MatrixView<M> dprev_logits) {
  if (!has_forward) throw std::logic_error("moekit::MoeLayer::backward called before forward");
  check_shape(dy, "dy", {tokens, c.d_model});
  check_shape(dx, "dx", {tokens, c.d_model});
  if (dlogits_next.data) check_shape(dlogits_next, "dlogits_next", {tokens, c.num_experts()});
  if (dprev_logits.data) {
    if (!has_prev) throw ShapeError("dprev_logits asked for, but forward was given no prev_logits");
    check_shape(dprev_logits, "dprev_logits", {tokens, c.num_experts()});
  }
}

}  // namespace moekit
