#pragma once
#include <cmath>
#include <concepts>
#include <cstdint>

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
  // w1 and w3 share a region (one GEMM computes both), listed per expert with w2.
  static void declare_parameters(ParamDecls& d, const MoeConfig& c) {
    const std::int64_t e = c.num_ffn_experts, f = c.d_expert, m = c.d_model;
    const double bd = 1.0 / std::sqrt(double(m)), bf = 1.0 / std::sqrt(double(f));
    d.add({"w1", "experts.{}.w1.weight", e, {f, m}, ParamShard::kExpertRows, "w13", "experts", bd, false});
    d.add({"w2", "experts.{}.w2.weight", e, {m, f}, ParamShard::kExpertCols, "w2", "experts", bf, false});
    if (Act::gated) d.add({"w3", "experts.{}.w3.weight", e, {f, m}, ParamShard::kExpertRows, "w13", "experts", bd, false});
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
  static void declare_parameters(ParamDecls& d, const MoeConfig& c) {
    FfnExpert::declare_parameters(d, c);
    if constexpr (has_constant) {
      const std::int64_t n = c.num_constant_experts, m = c.d_model;
      const double bd = 1.0 / std::sqrt(double(m));
      d.add({"const_wc", "constant.{}.wc.weight", n, {2, m}, ParamShard::kReplicated, "", "constant", bd, false});
      d.add({"const_v", "constant.{}.v", n, {m}, ParamShard::kReplicated, "", "constant", bd, false});
    }
  }
};

template <class E>
concept ExpertPolicy = requires(ParamDecls& d, const MoeConfig& c) {
  typename E::activation;
  E::declare_parameters(d, c);
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
