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
#include <algorithm>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "moekit/core/error.hpp"

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

// A layer's router state, the same on every backend: the biases b (host values; a CUDA layer mirrors
// them on the device) and the routed counts of the current step's training forwards.
template <class S>
class BiasState {
 public:
  void resize(std::size_t experts, bool biased) {
    bias_.assign(biased ? experts : 0, S(0));
    counts_.assign(experts, 0);
  }
  const std::vector<S>& bias() const { return bias_; }
  const std::vector<std::int64_t>& step_counts() const { return counts_; }
  void count(const std::vector<std::int64_t>& routed) {
    for (std::size_t e = 0; e < counts_.size() && e < routed.size(); ++e) counts_[e] += routed[e];
  }
  void set(std::span<const S> b) {
    if (b.size() != bias_.size())
      throw ShapeError("expert bias has " + std::to_string(b.size()) + " values, expected num_experts() = " +
                       std::to_string(bias_.size()));
    std::copy(b.begin(), b.end(), bias_.begin());
  }
  // The update this rank's counts alone would apply.
  std::vector<S> preview(double rate) const {
    const std::vector<double> d = bias_update(counts_, rate);
    return std::vector<S>(d.begin(), d.end());
  }
  // b += u · sign(mean c − c) with c the step's counts summed over the ranks (`summed`); a new step.
  void apply(const std::vector<std::int64_t>& summed, double rate) {
    const std::vector<double> d = bias_update(summed, rate);
    for (std::size_t i = 0; i < bias_.size(); ++i) bias_[i] += S(d[i]);
    std::fill(counts_.begin(), counts_.end(), 0);
  }

 private:
  std::vector<S> bias_;
  std::vector<std::int64_t> counts_;
};

}  // namespace moekit::router
