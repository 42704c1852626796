#pragma once
#include <concepts>

#include "moekit/core/config.hpp"

namespace moekit::act {
// Activation tags. `gated` activations (SwiGLU) use a third weight W3.
struct SwiGLU {
  static constexpr Activation kind = Activation::kSwiGLU;
  static constexpr bool gated = true;
};
struct GeLU {  // exact erf form, as torch.nn.GELU()
  static constexpr Activation kind = Activation::kGeLU;
  static constexpr bool gated = false;
};
struct ReLU {
  static constexpr Activation kind = Activation::kReLU;
  static constexpr bool gated = false;
};
template <class A>
concept ActivationPolicy = std::same_as<A, SwiGLU> || std::same_as<A, GeLU> || std::same_as<A, ReLU>;
}  // namespace moekit::act

namespace moekit::experts {
// FFN expert: y = W2 act(W1 x), or W2 (silu(W1 x) * W3 x) for SwiGLU.
template <class Act>
struct Ffn {
  static_assert(act::ActivationPolicy<Act>, "experts::Ffn<Act>: Act must be act::SwiGLU, act::GeLU or act::ReLU");
  using activation = Act;
};

template <class E>
concept ExpertPolicy = requires { typename E::activation; };
}  // namespace moekit::experts
