#pragma once
#include <concepts>

#include "moekit/core/config.hpp"
#include "moekit/core/parameter.hpp"
#include "moekit/experts/zero_computation.hpp"

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
  static constexpr void declare_parameters(ParameterFamilies& f) {
    f.ffn = true;
    f.ffn_gated = Act::gated;
  }
};

// MoE++ zero-computation experts Zero, Copy, Constant (arXiv 2410.07348): experts/zero_computation.hpp,
// with their functors.

namespace detail {
template <class T, class... Ts>
inline constexpr bool contains = (std::same_as<T, Ts> || ...);
template <class T>
inline constexpr bool is_ffn = false;
template <class A>
inline constexpr bool is_ffn<Ffn<A>> = true;
}  // namespace detail

// A heterogeneous set: one Ffn<Act> first, then any of Zero, Copy, Constant; counts come from MoeConfig.
template <class FfnExpert, class... ZeroComputation>
struct Set {
  static_assert(detail::is_ffn<FfnExpert>, "experts::Set<...>: the first member must be experts::Ffn<Act>");
  static_assert(((std::same_as<ZeroComputation, Zero> || std::same_as<ZeroComputation, Copy> ||
                  std::same_as<ZeroComputation, Constant>) && ...),
                "experts::Set<Ffn<Act>, ...>: the other members must be experts::Zero, experts::Copy or experts::Constant");
  using activation = typename FfnExpert::activation;
  static constexpr bool has_zero = detail::contains<Zero, ZeroComputation...>;
  static constexpr bool has_copy = detail::contains<Copy, ZeroComputation...>;
  static constexpr bool has_constant = detail::contains<Constant, ZeroComputation...>;
  // The FFN experts' tensors, and the constant experts' Wc and v (zero and copy experts have none).
  static constexpr void declare_parameters(ParameterFamilies& f) {
    FfnExpert::declare_parameters(f);
    f.constant = f.constant || has_constant;
  }
};

template <class E>
concept ExpertPolicy = requires(ParameterFamilies& f) {
  typename E::activation;
  E::declare_parameters(f);
};

// Which zero-computation kinds a policy admits (none for a bare Ffn<Act>).
template <class E>
struct zc_kinds {
  static constexpr bool zero = false, copy = false, constant = false;
};
template <class F, class... Z>
struct zc_kinds<Set<F, Z...>> {
  static constexpr bool zero = Set<F, Z...>::has_zero, copy = Set<F, Z...>::has_copy,
                        constant = Set<F, Z...>::has_constant;
};
}  // namespace moekit::experts
