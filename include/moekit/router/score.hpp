#pragma once
// The score functions of the token-choice routers (tags): softmax p = softmax(logits), or sigmoid
// s = sigmoid(logits) (DeepSeek-V3). Their per-token math is router/topk.hpp's.
#include <concepts>

#include "moekit/core/config.hpp"

namespace moekit::router {

struct Softmax {
  static constexpr RouterKind kind = RouterKind::kSoftmax;
};
struct Sigmoid {
  static constexpr RouterKind kind = RouterKind::kSigmoid;
};

template <class S>
concept ScoreFunction = std::same_as<S, Softmax> || std::same_as<S, Sigmoid>;

}  // namespace moekit::router
