#pragma once
// PolicyOptions: the options of a layer's policies (router, experts, balance scope) by key, and how a
// policy reads its own options struct from them. A policy's options are a small struct with a field
// table, `static constexpr auto fields()` of ConfigField rows owned by the struct (core/config.hpp), and,
// where fields depend on each other or on the layer's shapes, `void validate(const MoeConfig&) const`.
// That one table parses the values, checks their rules, prints them and feeds the cross-rank agreement,
// as MoeConfig's own table does; MoeConfig carries the values in `options`, so a new policy brings its
// options without a new MoeConfig field. Unknown keys are refused where the policies are known: by the
// layer (its own policies' keys) and by the runtime switch (every policy it can build).
#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "moekit/core/config.hpp"
#include "moekit/core/error.hpp"

namespace moekit {

// No options (the default of a policy that declares none).
struct NoOptions {
  static constexpr auto fields() { return std::tuple<>(); }
};

// The options struct a policy declares (`using options = ...`), or NoOptions.
template <class P>
struct options_of {
  using type = NoOptions;
};
template <class P>
  requires requires { typename P::options; }
struct options_of<P> {
  using type = typename P::options;
};
template <class P>
using options_t = typename options_of<P>::type;

// Calls f(field) for every row of options struct O's table.
template <class O, class F>
constexpr void for_each_option_field(F&& f) {
  std::apply([&](const auto&... field) { (f(field), ...); }, O::fields());
}

// The keys of O's table.
template <class O>
std::vector<std::string> option_keys() {
  std::vector<std::string> k;
  for_each_option_field<O>([&](const auto& f) { k.push_back(f.name); });
  return k;
}

// O from the options: every field of O's table that `cfg.options` names, converted (an integer where a
// double is wanted, a string naming an enum value; anything else a ConfigError naming the key), the
// struct's default where it names none; then the table's rules and O::validate(cfg) when O has it.
template <class O>
O read_options(const MoeConfig& cfg) {
  O o{};
  for_each_option_field<O>([&](const auto& f) {
    using M = typename std::decay_t<decltype(f)>::type;
    const PolicyOptions::Value* v = cfg.options.find(f.name);
    if (!v) {
      if (f.required) throw ConfigError(f.name, "(missing)", "is required");
      return;
    }
    M& out = o.*f.member;
    const std::string text = option_text(*v);
    if constexpr (std::is_same_v<M, bool>) {
      if (!std::holds_alternative<bool>(*v)) throw ConfigError(f.name, text, "must be true or false");
      out = std::get<bool>(*v);
    } else if constexpr (std::is_enum_v<M>) {
      if (!std::holds_alternative<std::string>(*v)) throw ConfigError(f.name, text, "must be a string");
      out = parse_enum<M>(f.name, std::get<std::string>(*v));
    } else if constexpr (std::is_same_v<M, double>) {
      if (std::holds_alternative<double>(*v)) out = std::get<double>(*v);
      else if (std::holds_alternative<std::int64_t>(*v)) out = double(std::get<std::int64_t>(*v));
      else throw ConfigError(f.name, text, "must be a number");
    } else {
      if (!std::holds_alternative<std::int64_t>(*v)) throw ConfigError(f.name, text, "must be an integer");
      out = std::get<std::int64_t>(*v);
    }
  });
  for_each_option_field<O>([&](const auto& f) { check_field(f, o, cfg); });
  if constexpr (requires(const O& x) { x.validate(cfg); }) o.validate(cfg);
  return o;
}

// Writes every field of o into opts (so a program can set a policy's options as a struct).
template <class O>
void write_options(const O& o, PolicyOptions& opts) {
  for_each_option_field<O>([&](const auto& f) {
    using M = typename std::decay_t<decltype(f)>::type;
    const M& v = o.*f.member;
    if constexpr (std::is_enum_v<M>) opts.set(f.name, std::string(to_string(v)));
    else if constexpr (std::is_same_v<M, bool>) opts.set(f.name, v);
    else if constexpr (std::is_same_v<M, double>) opts.set(f.name, v);
    else opts.set(f.name, std::int64_t(v));
  });
}

}  // namespace moekit
