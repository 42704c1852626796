#pragma once
// What routing hands to dispatch, expert compute and combine, defined once for every backend (each holds
// the plan in its own buffers: host vectors, device arrays):
//   per slot s: its token (SlotLayout), the expert, the gate, and its row in the expert-contiguous
//   buffers, or kSlotDropped / kSlotZeroComputation;
//   per expert: routed (pre-capacity) and kept counts, and each FFN expert's range of rows.
// Dispatch, combine and their backward find a slot's token and a token's slots through SlotLayout
// only: the token-choice [T, k] layout of today's routers is one case of it, and a router that picks
// tokens per expert (expert choice: a token gets 0..N_E slots) lists its slots by token instead.
// Also the rules both backends apply to it: which kind an expert is, the eta of the balance loss, and
// the aux losses from the per-expert sums (the score capacity drops by is the router policy's).
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

// The lowest token with a non-finite router logit, or this (what cudaMemset(0x7F) writes).
inline constexpr int kNoBadToken = 0x7F7F7F7F;

// The routing statistics of one forward, in one block of int32 (and one of the logit type) that the
// backend fills where it computes (the device, for CUDA), exchanges between ranks where the strategy
// needs it, and brings to the host once (the CUDA forward's one host synchronisation). Offsets in ints:
//   offsets [tp·N_FFN + 1]   rows of (chunk c, FFN expert e) start at offsets[c·N_FFN + e]; chunk-major
//                            (chunks = tp with duplicate token dropping, else 1), the total at
//                            offsets[chunks·N_FFN]
//   kept [N_E], routed [N_E] slots each expert kept after capacity / was routed before it
//   bad [1]                  kNoBadToken, or the lowest token with a non-finite logit
//   send [N_FFN + 1]         distributed: my chunk's count per FFN expert, then my expert-side capacity
//   gathered [tp·ep·(N_FFN + 1)]  send of every rank of my dp index (tp x ep), in group-rank order
//   global [N_E + 1]         routed counts and tokens (summed over the shards for GlobalBatch)
//   global_bad [1]           ranks of the world whose logits were not finite
// and in the logit type: prob_sum [N_E] (Σ_t p[t, i]), then z_sum [1] (Σ_t lse_t²).
struct StatsLayout {
  std::int64_t nf = 0, n = 0, group = 1;
  std::int64_t offsets = 0, kept = 0, routed = 0, bad = 0, send = 0, gathered = 0, global = 0, global_bad = 0, ints = 0;
  std::int64_t prob_sum = 0, z_sum = 0, floats = 0;
  StatsLayout() = default;
  StatsLayout(std::int64_t ffn_experts, std::int64_t experts, std::int64_t tp, std::int64_t ep)
      : nf(ffn_experts), n(experts), group(tp * ep) {
    kept = offsets + tp * nf + 1;
    routed = kept + n;
    bad = routed + n;
    send = bad + 1;
    gathered = send + nf + 1;
    global = gathered + group * (nf + 1);
    global_bad = global + n + 1;
    ints = global_bad + 1;
    z_sum = prob_sum + n;
    floats = z_sum + 1;
  }
  std::int64_t rows(std::int64_t chunks) const { return offsets + chunks * nf; }  // FFN rows in all
};

// Which token each slot belongs to and which slots each token has. Token choice (every router here):
// token t owns slots [t·k, (t+1)·k). Otherwise (expert choice) the slots are sorted by token: token t
// owns [first[t], first[t + 1]) and token_of[s] names the token of slot s (arrays where the plan lives:
// host memory, or device memory for the CUDA kernels).
struct SlotLayout {
  int tokens = 0, slots = 0;
  int per_token = 0;              // > 0: token choice with this k
  const int* first = nullptr;     // [tokens + 1], when per_token == 0
  const int* token_of = nullptr;  // [slots], when per_token == 0
  static constexpr SlotLayout token_choice(int tokens, int k) { return {tokens, tokens * k, k, nullptr, nullptr}; }
  static constexpr SlotLayout by_token(int tokens, int slots, const int* first, const int* token_of) {
    return {tokens, slots, 0, first, token_of};
  }
  MOEKIT_HD int begin(int t) const { return per_token > 0 ? t * per_token : first[t]; }
  MOEKIT_HD int end(int t) const { return per_token > 0 ? (t + 1) * per_token : first[t + 1]; }
  MOEKIT_HD int token(int s) const { return per_token > 0 ? s / per_token : token_of[s]; }
  // Token choice with k >= 1, or by token with both arrays (or no tokens at all).
  bool valid() const {
    if (tokens < 0 || slots < 0) return false;
    return per_token > 0 ? slots == tokens * per_token : (first != nullptr && token_of != nullptr) || tokens == 0;
  }
};

// One forward's routing plan as the consumers read it (views into the backend's buffers).
template <class G>
struct RoutingPlan {
  SlotLayout layout;
  const int* expert = nullptr;       // [slots]
  const G* gate = nullptr;           // [slots]
  const int* row = nullptr;          // [slots]: row in the expert-contiguous buffers, kSlotDropped, kSlotZeroComputation
  const int* slot_of_row = nullptr;  // [rows]: the inverse, for the FFN rows
};

// What the CUDA kernels do with a zero-computation slot: MoE++'s three kinds in their own code, any
// other kind (kCustom) through its functors (backend/cuda/zero_computation.cuh). The host calls every
// kind's functors (backend/host/zero_computation.hpp).
enum class ZcKind { kZero, kCopy, kConstant, kCustom };

// The experts in routing order: FFN [0, ffn), zero, copy, constant, then the other kinds (custom).
struct ExpertKinds {
  int ffn = 0, zero = 0, copy = 0, constant = 0, custom = 0;
  static ExpertKinds of(const MoeConfig& c) {
    return {int(c.num_ffn_experts), int(c.num_zero_experts), int(c.num_copy_experts), int(c.num_constant_experts),
            int(c.options.zc_experts())};
  }
  MOEKIT_HD bool is_ffn(int e) const { return e < ffn; }
  MOEKIT_HD bool any_zc() const { return zero + copy + constant + custom > 0; }
  MOEKIT_HD int first_custom() const { return ffn + zero + copy + constant; }
  // The kind of zero-computation expert e (e >= ffn); q = its index among the constant experts (or
  // among the custom ones, from first_custom()).
  MOEKIT_HD ZcKind zc_kind(int e, int& q) const {
    q = e - ffn - zero - copy;
    if (e < ffn + zero) return ZcKind::kZero;
    if (e < ffn + zero + copy) return ZcKind::kCopy;
    if (q < constant) return ZcKind::kConstant;
    q -= constant;
    return ZcKind::kCustom;
  }
};

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
