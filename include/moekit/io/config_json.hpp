#pragma once
// MoeConfig <-> JSON, from the one field table in core/config.hpp: every key, its JSON type and the
// messages come from that table. Needs nlohmann_json (link nlohmann_json::nlohmann_json).
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <variant>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>

#include "moekit/core/config.hpp"

namespace moekit {

// The JSON keys of MoeConfig fields of a scope (in table order).
inline std::vector<std::string> config_keys(FieldScope scope) {
  std::vector<std::string> keys;
  for_each_config_field([&](const auto& f) {
    if (f.scope == scope) keys.push_back(f.name);
  });
  return keys;
}

// Reads the fields of `scope` present in j into c (absent ones keep c's value; a required one that is
// absent is a ConfigError). Wrong JSON types are ConfigErrors naming the key. Does not validate: call
// c.validate() once the whole config is read. Keys that are not fields are left to the caller.
inline void read_config_fields(const nlohmann::json& j, MoeConfig& c, FieldScope scope = FieldScope::kLayer) {
  for_each_config_field([&](const auto& f) {
    if (f.scope != scope) return;
    using M = typename std::decay_t<decltype(f)>::type;
    if (!j.contains(f.name)) {
      if (f.required) throw ConfigError(f.name, "(missing)", "is required");
      return;
    }
    const nlohmann::json& v = j[f.name];
    M& out = c.*f.member;
    if constexpr (std::is_same_v<M, bool>) {
      if (!v.is_boolean()) throw ConfigError(f.name, v.dump(), "must be true or false");
      out = v.get<bool>();
    } else if constexpr (std::is_enum_v<M>) {
      if (!v.is_string()) throw ConfigError(f.name, v.dump(), "must be a JSON string");
      out = parse_enum<M>(f.name, v.get<std::string>());
    } else if constexpr (std::is_same_v<M, double>) {
      if (!v.is_number()) throw ConfigError(f.name, v.dump(), "must be a JSON number");
      out = v.get<double>();
    } else if constexpr (std::is_same_v<M, std::optional<bool>>) {  // null: the default
      if (v.is_null()) out.reset();
      else if (v.is_boolean()) out = v.get<bool>();
      else throw ConfigError(f.name, v.dump(), "must be true or false (or null: the router's default)");
    } else if constexpr (std::is_same_v<M, PolicyOptions>) {
      // the policies' keys are read by read_policy_options
    } else {
      if (!v.is_number_integer()) throw ConfigError(f.name, v.dump(), "must be a JSON integer");
      if (v.is_number_unsigned() && v.get<std::uint64_t>() > std::uint64_t(std::numeric_limits<std::int64_t>::max()))
        throw ConfigError(f.name, v.dump(), "must fit in a signed 64-bit integer");
      out = v.get<std::int64_t>();
    }
  });
}

// Every field of `scope`, spelled out (enums as their names).
inline void write_config_fields(const MoeConfig& c, nlohmann::json& j, FieldScope scope = FieldScope::kLayer) {
  for_each_config_field([&](const auto& f) {
    if (f.scope != scope) return;
    using M = typename std::decay_t<decltype(f)>::type;
    if constexpr (std::is_enum_v<M>) j[f.name] = to_string(c.*f.member);
    else if constexpr (std::is_same_v<M, std::optional<bool>>) j[f.name] = c.*f.member ? nlohmann::json(*(c.*f.member)) : nlohmann::json();
    else if constexpr (!std::is_same_v<M, PolicyOptions>) j[f.name] = c.*f.member;
  });
}

// The policies' options (MoeConfig::options): every key of `keys` that j has, as JSON gives it (a
// bool, an integer, a number or a string; anything else is a ConfigError naming the key). The values'
// types and rules are each policy's to check (core/options.hpp's read_options).
inline void read_policy_options(const nlohmann::json& j, MoeConfig& c, const std::vector<std::string>& keys) {
  for (const auto& key : keys) {
    if (!j.contains(key)) continue;
    const nlohmann::json& v = j[key];
    if (v.is_boolean()) c.options.set(key, v.get<bool>());
    else if (v.is_number_integer() && !v.is_number_unsigned()) c.options.set(key, v.get<std::int64_t>());
    else if (v.is_number_unsigned() && v.get<std::uint64_t>() <= std::uint64_t(std::numeric_limits<std::int64_t>::max()))
      c.options.set(key, std::int64_t(v.get<std::uint64_t>()));
    else if (v.is_number_float()) c.options.set(key, v.get<double>());
    else if (v.is_string()) c.options.set(key, v.get<std::string>());
    else throw ConfigError(key, v.dump(), "must be a JSON boolean, number or string");
  }
}
inline void write_policy_options(const MoeConfig& c, nlohmann::json& j) {
  for (const auto& [key, value] : c.options.entries()) std::visit([&](const auto& x) { j[key] = x; }, value);
}

}  // namespace moekit
