#pragma once
// router::BiasBalanced<Inner>: aux-loss-free load balancing (DeepSeek-V3, arXiv 2412.19437 §2.1.2).
// Each expert has a bias b_i: state, not a trainable parameter. The selection ranks score_i + b_i
// (score = the inner router's softmax p or sigmoid s), then hands the biased scores to the inner
// router's selection (so BiasBalanced<GroupLimited<...>> scores its groups on s + b, as DeepSeek-V3's
// router does); the gate weights use the unbiased scores, and the balance loss's P_i never sees the
// bias. After each optimizer step (the layer's end_step()):
//   b_i += u · sign(mean_j c_j − c_i),   sign(0) = 0,
// with c the routed (pre-capacity) counts of the whole step, summed over the micro-batches and over
// every rank that holds different tokens, and u = MoeConfig::bias_update_rate. Overloaded experts lose
// bias, idle ones gain it, so the load evens out without an auxiliary loss in the gradient.
//
// Inner: any stateless router (router::TopK<...>, GatingResidual<...>, GroupLimited<...>, LinearBias<...>).
// The backends keep the biases in the layer's router::RouterState (router/state.hpp) and hand them to
// select() as `state`.
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
struct BiasBalanced : Inner {
  static_assert(RouterPolicy<Inner> && !router_traits<Inner>::stateful,
                "router::BiasBalanced<Inner>: Inner must be a stateless router such as router::TopK<...>, "
                "router::GatingResidual<TopK<...>> or router::GroupLimited<TopK<...>>");
  using inner = Inner;
  using options = NoOptions;  // its rate is MoeConfig::bias_update_rate
  static constexpr bool stateful = true;        // the values of its RouterState are the biases b [N_E]
  static constexpr bool selection_bias = true;
  static constexpr const char* choice = "expert_bias";

  BiasBalanced() = default;
  explicit BiasBalanced(const MoeConfig& c) : Inner(c) {}
  static void check(const MoeConfig& c) {
    Inner::check(c);
    if (!c.expert_bias) throw ConfigError("expert_bias", "false", "must match the layer's compile-time policy (true)");
    require_token_choice(routing_of(Inner(c)), "expert_bias (router::BiasBalanced)");
  }
  static void list_choices(std::vector<std::string>& keys) {
    Inner::list_choices(keys);
    keys.push_back(choice);
  }

  // sel_i += b_i, then the inner router's selection.
  template <class S>
  MOEKIT_HD void select(S* sel, int n, int* idx, const S* bias) const {
    for (int i = 0; i < n; ++i) sel[i] += bias[i];
    Inner::select(sel, n, idx, bias);
  }

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
