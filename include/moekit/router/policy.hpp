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
  static constexpr bool residual = false;
  static constexpr bool biased = false;
};

template <class R>
concept RouterPolicy = requires {
  typename R::score;
  { R::kind } -> std::convertible_to<RouterKind>;
  { R::residual } -> std::convertible_to<bool>;
  { R::biased } -> std::convertible_to<bool>;
};

// MoE++ gating residual (arXiv 2410.07348): logits^j = W^j x^j + W_g^j logits^{j-1}, W_g^j [N_E, N_E].
// The first MoE layer of a model gets no previous logits and uses W x alone.
template <class Inner>
struct GatingResidual {
  static_assert(RouterPolicy<Inner> && !Inner::residual && !Inner::biased,
                "router::GatingResidual<Inner>: Inner must be a plain router such as router::TopK<router::Softmax> "
                "(write router::BiasBalanced<GatingResidual<...>> for both)");
  using score = typename Inner::score;
  using inner = Inner;
  static constexpr RouterKind kind = Inner::kind;
  static constexpr bool residual = true;
  static constexpr bool biased = false;
};

}  // namespace moekit::router
