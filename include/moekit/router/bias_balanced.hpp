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
// Inner: router::TopK<Softmax|Sigmoid>, or router::GatingResidual<TopK<...>>. The router's math is
// router/topk.hpp's route_token with the bias; its backward is the inner router's (the selection is a
// constant of the forward, and the gates depend on the unbiased scores only).
#include <cstdint>
#include <vector>

#include "moekit/router/policy.hpp"

namespace moekit::router {

template <class Inner>
struct BiasBalanced {
  static_assert(RouterPolicy<Inner> && !Inner::biased,
                "router::BiasBalanced<Inner>: Inner must be router::TopK<...> or router::GatingResidual<TopK<...>>");
  using score = typename Inner::score;
  using inner = Inner;
  static constexpr RouterKind kind = Inner::kind;
  static constexpr bool residual = Inner::residual;
  static constexpr bool biased = true;
};

// The update the step's counts apply to the biases: delta_i = u · sign(mean_j c_j − c_i). The mean
// is compared exactly (Σ c against N·c_i in integers), so ties give 0 on every platform.
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
