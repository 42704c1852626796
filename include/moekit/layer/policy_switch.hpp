#pragma once
// The one runtime switch from a MoeConfig to the policy types (docs/architecture.md, "The runtime
// switch"). It lists, once:
//   kRouterChoices  the runtime choices that add a wrapper to the router chain, and how a config asks
//                   for each (a MoeConfig field or a policy option);
//   RouterRows      every router chain a program can choose at run time, one line each;
//   ExpertRows      every expert set, one line each.
// with_policies(cfg, f) calls f(std::type_identity<Router>{}, std::type_identity<Experts>{}) for the
// row the config asks for; the layer types a program instantiates are the rows' product, filtered by
// a Filter it chooses (AllRows, Slice<i, n> to spread them over n translation units, or its own).
// A config that no row matches is a ConfigError naming what it asks for. The same lists check a
// compile-time layer against its config (check_policies) and the option keys a config may carry.
#include <cstddef>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "moekit/core/config.hpp"
#include "moekit/core/error.hpp"
#include "moekit/balance/policy.hpp"
#include "moekit/core/options.hpp"
#include "moekit/experts/policy.hpp"
#include "moekit/router/bias_balanced.hpp"
#include "moekit/router/group_limited.hpp"
#include "moekit/router/linear_bias.hpp"
#include "moekit/router/policy.hpp"

namespace moekit {

template <class... T>
struct type_list {
  static constexpr std::size_t size = sizeof...(T);
};

// A boolean policy option (false when absent; a ConfigError when it is not a bool).
inline bool option_flag(const MoeConfig& c, const char* key) {
  const PolicyOptions::Value* v = c.options.find(key);
  if (!v) return false;
  if (!std::holds_alternative<bool>(*v)) throw ConfigError(key, option_text(*v), "must be true or false");
  return std::get<bool>(*v);
}

// The choices that add a wrapper to the router chain: its key (router_traits' list_choices) and
// whether a config asks for it.
struct RouterChoice {
  const char* key;
  bool (*asked)(const MoeConfig&);
};
inline constexpr RouterChoice kRouterChoices[] = {
    {"gating_residual", [](const MoeConfig& c) { return c.gating_residual; }},     // router::GatingResidual
    {"expert_bias", [](const MoeConfig& c) { return c.expert_bias; }},             // router::BiasBalanced
    {"n_group", [](const MoeConfig& c) { return c.options.has("n_group"); }},      // router::GroupLimited
    {"router_bias", [](const MoeConfig& c) { return option_flag(c, "router_bias"); }},  // router::LinearBias
};

// Every router chain the runtime switch builds: the score function (MoeConfig::router) and the
// wrappers the choices above ask for.
using RouterRows = type_list<
    router::TopK<router::Softmax>, router::TopK<router::Sigmoid>,
    router::GatingResidual<router::TopK<router::Softmax>>, router::GatingResidual<router::TopK<router::Sigmoid>>,
    router::BiasBalanced<router::TopK<router::Softmax>>, router::BiasBalanced<router::TopK<router::Sigmoid>>,
    router::BiasBalanced<router::GatingResidual<router::TopK<router::Softmax>>>,
    router::BiasBalanced<router::GatingResidual<router::TopK<router::Sigmoid>>>,
    router::GroupLimited<router::TopK<router::Softmax>>,                                // DeepSeek-V2
    router::GroupLimited<router::TopK<router::Sigmoid>>,
    router::BiasBalanced<router::GroupLimited<router::TopK<router::Sigmoid>>>,          // DeepSeek-V3
    router::LinearBias<router::TopK<router::Softmax>>>;                                 // GPT-OSS

// Every expert set: the activation (MoeConfig::activation), with MoE++'s zero-computation experts
// when the config has any. (The FFN experts' biases, ffn_bias, are a run-time option of every row.)
template <class A>
using ZcSet = experts::Set<experts::Ffn<A>, experts::Zero, experts::Copy, experts::Constant>;
using ExpertRows = type_list<experts::Ffn<act::SwiGLU>, experts::Ffn<act::GeLU>, experts::Ffn<act::ReLU>, ZcSet<act::SwiGLU>,
                             ZcSet<act::GeLU>, ZcSet<act::ReLU>,
                             experts::Ffn<act::SwiGLUOai>>;  // GPT-OSS

// The runtime choices of a router chain (its wrappers' keys).
template <class R>
std::vector<std::string> router_choices() {
  std::vector<std::string> keys;
  R::list_choices(keys);
  return keys;
}

namespace detail {
template <class T, class... Ts>
inline constexpr bool list_contains = (std::is_same_v<T, Ts> || ...);

// Whether row R is what cfg asks for: its score function and exactly the choices asked.
template <class R>
bool router_matches(const MoeConfig& c) {
  if (c.router != R::score::kind) return false;
  const std::vector<std::string> mine = router_choices<R>();
  for (const RouterChoice& ch : kRouterChoices) {
    bool has = false;
    for (const auto& k : mine) has = has || k == ch.key;
    if (has != ch.asked(c)) return false;
  }
  return true;
}
template <class E>
bool experts_match(const MoeConfig& c) {
  constexpr bool zc = experts::zc_kinds<E>::any;
  return c.activation == E::activation::kind && zc == (c.num_zc_experts() > 0);
}

// The options structs of a router chain and an expert set (for the keys a config may carry).
template <class R>
void router_option_keys(std::vector<std::string>& keys) {
  router::for_each_router_layer<R>([&]<class P>(std::type_identity<P>) {
    for (auto& k : option_keys<options_t<P>>()) keys.push_back(k);
  });
}

template <class E>
void expert_option_keys(std::vector<std::string>& keys) {
  experts::for_each_expert_part<E>([&]<class P>(std::type_identity<P>) {
    for (auto& k : option_keys<options_t<P>>()) keys.push_back(k);
  });
}

// What a config asks for, in words (for the messages).
inline std::string asked_text(const MoeConfig& c) {
  std::string s = std::string("router \"") + to_string(c.router) + "\"";
  for (const RouterChoice& ch : kRouterChoices)
    if (ch.asked(c)) s += std::string(", ") + ch.key;
  s += std::string(", activation \"") + to_string(c.activation) + "\"";
  if (c.num_zc_experts() > 0) s += ", zero-computation experts";
  return s;
}
}  // namespace detail

// Every option key a config may carry for the rows of the switch: the choices' and every policy's
// options (in the order met, each once; not MoeConfig's own fields), for the readers of JSON configs.
inline std::vector<std::string> policy_option_keys() {
  std::vector<std::string> keys;
  auto add = [&](const std::string& k) {
    bool field = false;
    for_each_config_field([&](const auto& f) { field = field || k == f.name; });
    for (const auto& have : keys)
      if (have == k) return;
    if (!field) keys.push_back(k);
  };
  for (const RouterChoice& ch : kRouterChoices) add(ch.key);
  [&]<class... R>(type_list<R...>) {
    (..., [&] {
      std::vector<std::string> k;
      detail::router_option_keys<R>(k);
      for (auto& x : k) add(x);
    }());
  }(RouterRows{});
  [&]<class... E>(type_list<E...>) {
    (..., [&] {
      std::vector<std::string> k;
      detail::expert_option_keys<E>(k);
      for (auto& x : k) add(x);
    }());
  }(ExpertRows{});
  for (auto& x : option_keys<balance::ScopeOptions>()) add(x);
  return keys;
}

// Filters: which rows a program instantiates. keep<Row, Router, Experts>; Row = router row · |ExpertRows|
// + expert row.
struct AllRows {
  template <std::size_t Row, class R, class E>
  static constexpr bool keep = true;
};
// Rows with Row % N == I: n translation units each instantiate one slice (nvcc's time per unit).
template <std::size_t I, std::size_t N>
struct Slice {
  static_assert(I < N, "Slice<I, N>: I must be < N");
  template <std::size_t Row, class R, class E>
  static constexpr bool keep = Row % N == I;
};

// The routers with a selection bias (router::BiasBalanced), or the others: a program may split the
// rows over two translation units this way (BiasVariants::kUnbiased / kBiased; kBoth: every row).
template <bool kBiased>
struct BiasHalf {
  template <std::size_t Row, class R, class E>
  static constexpr bool keep = router::router_traits<R>::selection_bias == kBiased;
};
namespace BiasVariants {
using kBoth = AllRows;
using kUnbiased = BiasHalf<false>;
using kBiased = BiasHalf<true>;
}  // namespace BiasVariants

// The row the config asks for (router row, expert row), or a ConfigError naming what it asks for.
inline std::pair<std::size_t, std::size_t> policy_row(const MoeConfig& c) {
  std::size_t r = 0, found_r = RouterRows::size, e = 0, found_e = ExpertRows::size;
  [&]<class... R>(type_list<R...>) { (..., (found_r == RouterRows::size && detail::router_matches<R>(c) ? void(found_r = r) : void(), ++r)); }(RouterRows{});
  [&]<class... E>(type_list<E...>) { (..., (found_e == ExpertRows::size && detail::experts_match<E>(c) ? void(found_e = e) : void(), ++e)); }(ExpertRows{});
  if (found_r == RouterRows::size)
    throw ConfigError("router", detail::asked_text(c),
                      "is a combination the runtime switch does not build (layer/policy_switch.hpp lists them); "
                      "instantiate MoeLayer<Backend, Router, Experts> with your own policies");
  if (found_e == ExpertRows::size) throw ConfigError("activation", field_text(c.activation), "has no expert set in the runtime switch");
  return {found_r, found_e};
}

namespace detail {
template <class L>
struct as_tuple;
template <class... T>
struct as_tuple<type_list<T...>> {
  using type = std::tuple<T...>;
};
template <std::size_t I, class L>
using row_t = std::tuple_element_t<I, typename as_tuple<L>::type>;

template <class Filter, class F, std::size_t Row>
decltype(auto) call_row(F& f) {
  using R = row_t<Row / ExpertRows::size, RouterRows>;
  using E = row_t<Row % ExpertRows::size, ExpertRows>;
  return f(std::type_identity<R>{}, std::type_identity<E>{});
}
template <class Filter, class F, class Result, std::size_t Row>
Result dispatch_row(std::size_t row, F& f) {
  if constexpr (Row == RouterRows::size * ExpertRows::size) {
    throw std::logic_error("with_policies: row " + std::to_string(row) + " out of range");
  } else {
    using R = row_t<Row / ExpertRows::size, RouterRows>;
    using E = row_t<Row % ExpertRows::size, ExpertRows>;
    if (row != Row) return dispatch_row<Filter, F, Result, Row + 1>(row, f);
    if constexpr (Filter::template keep<Row, R, E>) {
      return call_row<Filter, F, Row>(f);
    } else {
      throw std::logic_error("with_policies: this translation unit does not instantiate the layer the config asks for (" +
                             std::string("row ") + std::to_string(Row) + ": check keeps<Filter>(cfg) and call the unit that does)");
    }
  }
}
// The first row a filter keeps (its call's type is the result type of every row).
template <class Filter, std::size_t Row = 0>
constexpr std::size_t first_kept() {
  if constexpr (Row == RouterRows::size * ExpertRows::size) {
    return Row;
  } else if constexpr (Filter::template keep<Row, row_t<Row / ExpertRows::size, RouterRows>, row_t<Row % ExpertRows::size, ExpertRows>>) {
    return Row;
  } else {
    return first_kept<Filter, Row + 1>();
  }
}
}  // namespace detail

// Whether a filter keeps the row cfg asks for (which of a program's slices handles it).
template <class Filter>
bool keeps(const MoeConfig& c) {
  const auto [r, e] = policy_row(c);
  const std::size_t row = r * ExpertRows::size + e;
  return [&]<std::size_t... I>(std::index_sequence<I...>) {
    return (... || (I == row && Filter::template keep<I, detail::row_t<I / ExpertRows::size, RouterRows>,
                                                       detail::row_t<I % ExpertRows::size, ExpertRows>>));
  }(std::make_index_sequence<RouterRows::size * ExpertRows::size>{});
}

// f(std::type_identity<Router>{}, std::type_identity<Experts>{}) for the row cfg asks for; every kept
// row's call must return the same type.
template <class Filter = AllRows, class F>
decltype(auto) with_policies(const MoeConfig& cfg, F&& f) {
  constexpr std::size_t first = detail::first_kept<Filter>();
  static_assert(first < RouterRows::size * ExpertRows::size, "with_policies: the filter keeps no row");
  using Result = decltype(detail::call_row<Filter, F, first>(f));
  const auto [r, e] = policy_row(cfg);
  return detail::dispatch_row<Filter, F, Result, 0>(r * ExpertRows::size + e, f);
}

// The checks of a layer with compile-time policies Router and Experts against its config: the
// router chain's own checks, no choice asked that the chain lacks, the options (each policy's read and
// validated, and no key that neither the layer's policies nor the runtime switch knows).
template <class Router, class Experts>
void check_policies(const MoeConfig& cfg) {
  Router::check(cfg);
  const std::vector<std::string> mine = router_choices<Router>();
  for (const RouterChoice& ch : kRouterChoices) {
    bool has = false;
    for (const auto& k : mine) has = has || k == ch.key;
    if (ch.asked(cfg) && !has)
      throw ConfigError(ch.key, cfg.options.has(ch.key) ? option_text(*cfg.options.find(ch.key)) : "true",
                        "must match the layer's compile-time policy (its router has no " + std::string(ch.key) + ")");
  }
  std::vector<std::string> known;
  detail::router_option_keys<Router>(known);
  detail::expert_option_keys<Experts>(known);
  for (auto& x : option_keys<balance::ScopeOptions>()) known.push_back(x);  // every layer's balance scope
  for (const RouterChoice& ch : kRouterChoices) known.push_back(ch.key);
  for (const auto& [key, value] : cfg.options.entries()) {
    bool ok = false;
    for (const auto& k : known) ok = ok || k == key;
    if (!ok) {
      std::string list;
      for (const auto& k : known) list += (list.empty() ? "" : ", ") + k;
      throw ConfigError(key, option_text(value), "is not an option of this layer's policies (options: " + list + ")");
    }
  }
  (void)Router(cfg);  // reads and validates every router option
  experts::read_expert_options<Experts>(cfg);
  (void)read_options<balance::ScopeOptions>(cfg);
}

}  // namespace moekit
