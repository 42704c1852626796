#pragma once
// A layer's router state, the same on every backend: the per-expert values of a stateful router (for
// router::BiasBalanced its biases; host values, which a CUDA layer mirrors on the device) and the routed
// (pre-capacity) counts of the current step's training forwards, which every router keeps (the
// stateful ones' step hook reads them). The router policy says what the values mean and how its
// end_step hook changes them (router/policy.hpp).
#include <algorithm>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "moekit/core/error.hpp"

namespace moekit::router {

template <class S>
class RouterState {
 public:
  void resize(std::size_t experts, bool stateful) {
    values_.assign(stateful ? experts : 0, S(0));
    counts_.assign(experts, 0);
  }
  std::span<S> values() { return values_; }
  std::span<const S> values() const { return values_; }
  const std::vector<std::int64_t>& step_counts() const { return counts_; }
  void count(const std::vector<std::int64_t>& routed) {
    for (std::size_t e = 0; e < counts_.size() && e < routed.size(); ++e) counts_[e] += routed[e];
  }
  void set(std::span<const S> v, const char* what) {
    if (v.size() != values_.size())
      throw ShapeError(std::string(what) + " has " + std::to_string(v.size()) + " values, expected num_experts() = " +
                       std::to_string(values_.size()));
    std::copy(v.begin(), v.end(), values_.begin());
  }
  void new_step() { std::fill(counts_.begin(), counts_.end(), 0); }

 private:
  std::vector<S> values_;
  std::vector<std::int64_t> counts_;
};

}  // namespace moekit::router
