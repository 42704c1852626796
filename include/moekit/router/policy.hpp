#pragma once
#include <concepts>
#include <type_traits>

#include "moekit/core/config.hpp"

namespace moekit::router {

// Score functions (tags).
struct Softmax {
  static constexpr RouterKind kind = RouterKind::kSoftmax;
};
struct Sigmoid {
  static constexpr RouterKind kind = RouterKind::kSigmoid;
};

template <class S>
concept ScoreFunction = std::same_as<S, Softmax> || std::same_as<S, Sigmoid>;

// Top-k router over all experts; the score function picks probabilities and gates (DESIGN §2).
template <class Score>
struct TopK {
  static_assert(ScoreFunction<Score>, "router::TopK<Score>: Score must be router::Softmax or router::Sigmoid");
  using score = Score;
  static constexpr RouterKind kind = Score::kind;
};

template <class R>
concept RouterPolicy = requires {
  typename R::score;
  { R::kind } -> std::convertible_to<RouterKind>;
};

}  // namespace moekit::router
