#pragma once
#include <cmath>
#include <concepts>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "moekit/core/config.hpp"
#include "moekit/core/options.hpp"
#include "moekit/core/parameter.hpp"
#include "moekit/experts/activation.hpp"
#include "moekit/experts/shared.hpp"
#include "moekit/experts/zero_computation.hpp"

namespace moekit::experts {
// The FFN experts' options: biases on both projections (GPT-OSS), h = W1 x + b1, y = W2 a + b2.
struct FfnOptions {
  bool ffn_bias = false;
  static constexpr auto fields() { return std::make_tuple(ConfigField<bool, FfnOptions>{"ffn_bias", &FfnOptions::ffn_bias}); }
};

// FFN expert: y = W2 act(W1 x [+ b1]) [+ b2], or W2 act(W1 x, W3 x) for gated activations (SwiGLU:
// silu(W1 x) * W3 x). Act is any act::ActivationPolicy (experts/activation.hpp).
template <class Act>
struct Ffn {
  static_assert(act::ActivationPolicy<Act>, "experts::Ffn<Act>: Act must be an activation (act::ActivationPolicy, experts/activation.hpp)");
  using activation = Act;
  using options = FfnOptions;
  // w1 and w3 share a region (one GEMM computes both), listed per expert with w2; their biases b1 and b3
  // share one too, laid out as a row of [h1 | h3]. b2 [D] is split over tp by columns like w2: each tp
  // rank adds its columns of it to its partial rows, so the tp reduction adds it once.
  static void declare_parameters(ParamDecls& d, const MoeConfig& c) {
    const std::int64_t e = c.num_ffn_experts, f = c.d_expert, m = c.d_model;
    const double bd = 1.0 / std::sqrt(double(m)), bf = 1.0 / std::sqrt(double(f));
    d.add({"w1", "experts.{}.w1.weight", e, {f, m}, ParamShard::kExpertRows, "w13", "experts", bd, false});
    d.add({"w2", "experts.{}.w2.weight", e, {m, f}, ParamShard::kExpertCols, "w2", "experts", bf, false});
    if (Act::gated) d.add({"w3", "experts.{}.w3.weight", e, {f, m}, ParamShard::kExpertRows, "w13", "experts", bd, false});
    if (read_options<FfnOptions>(c).ffn_bias) {
      d.add({"b1", "experts.{}.w1.bias", e, {f}, ParamShard::kExpertRows, "b13", "experts", bd, false});
      if (Act::gated) d.add({"b3", "experts.{}.w3.bias", e, {f}, ParamShard::kExpertRows, "b13", "experts", bd, false});
      d.add({"b2", "experts.{}.w2.bias", e, {m}, ParamShard::kExpertCols, "b2", "experts", bf, false});
    }
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
  using members = std::tuple<FfnExpert, ZeroComputation...>;
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

namespace detail {
template <class E, class F>
void for_each_part(F& f) {
  if constexpr (is_ffn<E>) {
    f(std::type_identity<E>{});
    f(std::type_identity<typename E::activation>{});
  } else if constexpr (requires { typename E::members; }) {
    [&]<class... P>(std::tuple<P...>*) { (for_each_part<P>(f), ...); }(static_cast<typename E::members*>(nullptr));
  } else {
    f(std::type_identity<E>{});
  }
}
}  // namespace detail

// Calls f(std::type_identity<P>{}) for every policy an expert policy is made of: an Ffn<Act>, then its
// activation; a Set's members in order; then the shared experts (every layer may have them). Their
// options are the expert policy's (check_policies, the runtime switch's option keys).
template <class E, class F>
void for_each_expert_part(F&& f) {
  detail::for_each_part<E>(f);
  f(std::type_identity<SharedExperts>{});
}
// The tensors of a layer's experts: the expert policy's, then the shared experts' (none unless asked).
template <class E>
void declare_expert_parameters(ParamDecls& d, const MoeConfig& c) {
  E::declare_parameters(d, c);
  SharedExperts::declare_parameters(d, c);
}
// Reads and validates the options of every part (a ConfigError names the key).
template <class E>
void read_expert_options(const MoeConfig& c) {
  for_each_expert_part<E>([&]<class P>(std::type_identity<P>) { (void)read_options<options_t<P>>(c); });
}

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
