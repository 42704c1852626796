#pragma once
// router::BiasBalanced<Inner>: aux-loss-free load balancing (DeepSeek-V3, arXiv 2412.19437 §2.1.2).
// Each expert has a bias b_i: state, not a trainable parameter. The top-k selection ranks
// score_i + b_i (score = the inner router's softmax p or sigmoid s); the gate weights use the unbiased
// scores, normalised as the inner router does, and the balance loss's P_i never sees the bias. After
// each optimizer step (the layer's end_step()):
//   b_i += u · sign(mean_j c_j − c_i),   sign(0) = 0,
// with c the routed (pre-capacity) counts of the whole step, summed over the micro-batches and over
// every rank that holds different tokens, and u = MoeConfig::bias_update_rate. Overloaded experts lose
// bias, idle ones gain it, so the load evens out without an auxiliary loss in the gradient.
//
// Inner: router::TopK<Softmax|Sigmoid>, or router::GatingResidual<TopK<...>>. This header is the whole
// router: its functors (route_token with the bias, the inner router's backward and capacity score) and
// its step hook; the backends call them through the policy (router/policy.hpp) and keep the biases in
// the layer's router::RouterState (router/state.hpp).
#include <algorithm>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "moekit/core/error.hpp"

#include "moekit/router/policy.hpp"

namespace moekit::router {

// The update the step's counts apply to the biases: delta_i = u · sign(mean_j c_j − c_i). The mean
// is compared exactly (Σ c against N·c_i in integers), so ties give 0 on every platform.
inline std::vector<double> bias_update(const std::vector<std::int64_t>& counts, double rate);

template <class Inner>
struct BiasBalanced : InnerRouting<Inner> {
  static_assert(RouterPolicy<Inner> && !Inner::stateful,
                "router::BiasBalanced<Inner>: Inner must be router::TopK<...> or router::GatingResidual<TopK<...>>");
  using score = typename Inner::score;
  using inner = Inner;
  static constexpr RouterKind kind = Inner::kind;
  static constexpr bool residual = Inner::residual;
  static constexpr bool biased = true;
  static constexpr bool stateful = true;  // the values of its RouterState are the biases b [N_E]

  // Biased selection, unbiased gates and P: route_token with the biases (router/topk.hpp).
  template <class S>
  MOEKIT_HD static S route(const S* logit, int n, int k, bool renormalize, S* prob, int* idx, S* gate, const S* bias) {
    return route_token(score{}, logit, n, k, renormalize, prob, idx, gate, bias);
  }
  // route_backward and capacity_score: the inner router's (InnerRouting): the selection is a constant of
  // the forward and the gates depend on the unbiased scores only.

  // After each optimizer step: b += u · sign(mean c − c), c the step's counts summed over the ranks.
  template <class S>
  static void end_step(std::span<S> bias, const std::vector<std::int64_t>& step_counts, const MoeConfig& cfg) {
    const std::vector<double> d = bias_update(step_counts, cfg.bias_update_rate);
    for (std::size_t i = 0; i < bias.size(); ++i) bias[i] += S(d[i]);
  }
  // The update end_step would apply for these counts.
  template <class S>
  static std::vector<S> step_update(const std::vector<std::int64_t>& step_counts, const MoeConfig& cfg) {
    const std::vector<double> d = bias_update(step_counts, cfg.bias_update_rate);
    return std::vector<S>(d.begin(), d.end());
  }
};

inline std::vector<double> bias_update(const std::vector<std::int64_t>& counts, double rate) {
  const auto n = std::int64_t(counts.size());
  std::int64_t total = 0;
  for (auto c : counts) total += c;
  std::vector<double> delta(counts.size(), 0.0);
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t diff = total - n * counts[std::size_t(i)];  // n · (mean − c_i)
    delta[std::size_t(i)] = diff > 0 ? rate : diff < 0 ? -rate : 0.0;
  }
  return delta;
}

}  // namespace moekit::router
