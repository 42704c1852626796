#pragma once
#include <array>
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

// Zero-computation experts (MoE++'s Zero, Copy, Constant, or a kind of yours): experts/zero_computation.hpp.

namespace detail {
template <class T, class... Ts>
inline constexpr bool contains = (std::same_as<T, Ts> || ...);
template <class T>
inline constexpr bool is_ffn = false;
template <class A>
inline constexpr bool is_ffn<Ffn<A>> = true;
template <class... Ts>
inline constexpr bool distinct = true;
template <class T, class... Ts>
inline constexpr bool distinct<T, Ts...> = !contains<T, Ts...> && distinct<Ts...>;
template <class Z, class... Ks>
using if_present = std::conditional_t<contains<Z, Ks...>, std::tuple<Z>, std::tuple<>>;
}  // namespace detail

// A set's zero-computation kinds in routing order (expert ids after the FFN experts): Zero, Copy,
// Constant when present, then the others in the order the set lists them.
template <class... Kinds>
using zc_routing_order_t =
    decltype(std::tuple_cat(detail::if_present<Zero, Kinds...>{}, detail::if_present<Copy, Kinds...>{},
                            detail::if_present<Constant, Kinds...>{},
                            std::conditional_t<is_builtin_zc<Kinds>, std::tuple<>, std::tuple<Kinds>>{}...));

// A heterogeneous set: one Ffn<Act> first, then zero-computation kinds (Zero, Copy, Constant or any
// ZeroComputationKind); each kind's count comes from the config (Z::count).
template <class FfnExpert, class... Kinds>
struct Set {
  static_assert(detail::is_ffn<FfnExpert>, "experts::Set<...>: the first member must be experts::Ffn<Act>");
  static_assert((ZeroComputationKind<Kinds> && ...),
                "experts::Set<Ffn<Act>, ...>: the other members must be zero-computation kinds (experts::Zero, Copy, "
                "Constant, or a struct with the interface of experts/zero_computation.hpp)");
  static_assert(detail::distinct<Kinds...>, "experts::Set<Ffn<Act>, ...>: a kind may appear once");
  using activation = typename FfnExpert::activation;
  using members = std::tuple<FfnExpert, Kinds...>;
  using zc_kinds = zc_routing_order_t<Kinds...>;
  // The FFN experts' tensors, then each zero-computation kind's in routing order.
  static void declare_parameters(ParamDecls& d, const MoeConfig& c) {
    FfnExpert::declare_parameters(d, c);
    [&]<class... Z>(std::tuple<Z...>*) { (Z::declare_parameters(d, c), ...); }(static_cast<zc_kinds*>(nullptr));
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

// The zero-computation kinds of an expert policy in routing order (none for a bare Ffn<Act>).
template <class E>
struct zc_kinds_of {
  using type = std::tuple<>;
};
template <class E>
  requires requires { typename E::zc_kinds; }
struct zc_kinds_of<E> {
  using type = typename E::zc_kinds;
};
template <class E>
using zc_kinds_t = typename zc_kinds_of<E>::type;

// Compile-time facts of a list of kinds, and f(Z{}) for the m-th (host and device).
template <class List>
struct ZcList;
template <class... Z>
struct ZcList<std::tuple<Z...>> {
  static constexpr int size = int(sizeof...(Z));
  static constexpr bool zero = detail::contains<Zero, Z...>, copy = detail::contains<Copy, Z...>,
                        constant = detail::contains<Constant, Z...>;
  static constexpr bool any = size > 0;
  static constexpr bool custom = ((!is_builtin_zc<Z>) || ... || false);
  static constexpr int max_saved = [] {
    int m = 0;
    ((m = Z::kSaved > m ? Z::kSaved : m), ...);
    return m;
  }();
#if defined(__CUDACC__)
#pragma nv_exec_check_disable  // f is a host lambda on the host, a device one in kernels
#endif
  template <class F>
  MOEKIT_HD static void visit(int m, F&& f) {
    int i = 0;
    ((i++ == m ? (f(Z{}), 0) : 0), ...);
  }
  // Each kind's count, in list order.
  static std::array<std::int64_t, sizeof...(Z)> counts(const MoeConfig& c) { return {Z::count(c)...}; }
};
// The kinds of E that the CUDA backend runs through their functors (all but Zero, Copy and Constant).
template <class List>
struct custom_zc;
template <class... Z>
struct custom_zc<std::tuple<Z...>> {
  using type = decltype(std::tuple_cat(std::conditional_t<is_builtin_zc<Z>, std::tuple<>, std::tuple<Z>>{}...));
};
template <class E>
using zc_kinds = ZcList<zc_kinds_t<E>>;
}  // namespace moekit::experts
