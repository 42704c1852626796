#pragma once
// MoeConfig: the runtime shapes and coefficients of one MoE layer, and the one table that describes its
// fields. Validation (ConfigError messages), the JSON readers and writers (io/config_json.hpp) and the
// cross-rank agreement check (parallel/sharding.hpp) all walk that table, so a new field cannot be
// forgotten by one of them: a static_assert below counts MoeConfig's members against the table.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "moekit/core/error.hpp"

namespace moekit {

enum class Activation { kSwiGLU, kGeLU, kReLU, kSwiGLUOai };
enum class RouterKind { kSoftmax, kSigmoid };

inline const char* to_string(Activation a) {
  switch (a) {
    case Activation::kSwiGLU: return "swiglu";
    case Activation::kGeLU: return "gelu";
    case Activation::kReLU: return "relu";
    case Activation::kSwiGLUOai: return "swiglu_oai";
  }
  return "?";
}
// Whether an activation multiplies two projections (w1 and w3: SwiGLU and GPT-OSS's clamped SwiGLU).
inline bool is_gated(Activation a) { return a == Activation::kSwiGLU || a == Activation::kSwiGLUOai; }
inline const char* to_string(RouterKind r) { return r == RouterKind::kSoftmax ? "softmax" : "sigmoid"; }

// Every value of an enum field, in order (for parsing and for the messages that list the options).
template <class E>
struct EnumValues;
template <>
struct EnumValues<Activation> {
  static constexpr Activation all[] = {Activation::kSwiGLU, Activation::kGeLU, Activation::kReLU, Activation::kSwiGLUOai};
};
template <>
struct EnumValues<RouterKind> {
  static constexpr RouterKind all[] = {RouterKind::kSoftmax, RouterKind::kSigmoid};
};

// "name" -> enum value, or a ConfigError naming the field and listing the options.
template <class E>
E parse_enum(const char* field, const std::string& s) {
  std::string options;
  for (E e : EnumValues<E>::all) {
    if (s == to_string(e)) return e;
    options += std::string(options.empty() ? "" : ", ") + "\"" + to_string(e) + "\"";
  }
  throw ConfigError(field, "\"" + s + "\"", "must be one of " + options);
}
inline Activation parse_activation(const std::string& s) { return parse_enum<Activation>("activation", s); }
inline RouterKind parse_router(const std::string& s) { return parse_enum<RouterKind>("router", s); }

// The options of the layer's policies by key (router::GroupLimited's n_group, ...): each policy reads
// its own options struct from them through that struct's field table (core/options.hpp), so a new
// policy brings its options without a new MoeConfig field. Values as JSON gives them; kept sorted by key.
// A key ending in "_zc_experts" is the count of a zero-computation kind a policy adds (experts/
// zero_computation.hpp): those counts are part of N_E, so the sum of their integer values is kept here.
class PolicyOptions {
 public:
  using Value = std::variant<bool, std::int64_t, double, std::string>;
  static constexpr const char* kZcCountSuffix = "_zc_experts";
  static bool is_zc_count(const std::string& key) {
    const std::string s = kZcCountSuffix;
    return key.size() > s.size() && key.compare(key.size() - s.size(), s.size(), s) == 0;
  }
  void set(const std::string& key, Value v) {
    auto it = std::lower_bound(entries_.begin(), entries_.end(), key, [](const auto& e, const std::string& k) { return e.first < k; });
    if (it != entries_.end() && it->first == key) it->second = std::move(v);
    else entries_.insert(it, {key, std::move(v)});
    recount();
  }
  // One per type: without them a bool would promote to int, a double convert to it, and a string
  // literal become a bool.
  void set(const std::string& key, bool v) { set(key, Value(v)); }
  void set(const std::string& key, int v) { set(key, Value(std::int64_t(v))); }
  void set(const std::string& key, std::int64_t v) { set(key, Value(v)); }
  void set(const std::string& key, double v) { set(key, Value(v)); }
  void set(const std::string& key, const char* v) { set(key, Value(std::string(v))); }
  void set(const std::string& key, std::string v) { set(key, Value(std::move(v))); }
  const Value* find(const std::string& key) const {
    for (const auto& e : entries_)
      if (e.first == key) return &e.second;
    return nullptr;
  }
  bool has(const std::string& key) const { return find(key) != nullptr; }
  void erase(const std::string& key) {
    entries_.erase(std::remove_if(entries_.begin(), entries_.end(), [&](const auto& e) { return e.first == key; }), entries_.end());
    recount();
  }
  // Σ of the "*_zc_experts" counts (non-integer or negative values count 0; MoeConfig::validate refuses them).
  std::int64_t zc_experts() const { return zc_experts_; }
  bool empty() const { return entries_.empty(); }
  const std::vector<std::pair<std::string, Value>>& entries() const { return entries_; }
  friend bool operator==(const PolicyOptions&, const PolicyOptions&) = default;

 private:
  void recount() {
    zc_experts_ = 0;
    for (const auto& [key, v] : entries_)
      if (is_zc_count(key) && std::holds_alternative<std::int64_t>(v) && std::get<std::int64_t>(v) > 0) zc_experts_ += std::get<std::int64_t>(v);
  }
  std::vector<std::pair<std::string, Value>> entries_;
  std::int64_t zc_experts_ = 0;
};

// Runtime shapes and coefficients of one MoE layer. The compile-time policies of MoeLayer must agree
// with `router`, `activation` and `gating_residual` (checked when a layer is built). Add a field here
// and a row to config_fields() below; the static_assert after the table fails until both agree.
struct MoeConfig {
  std::int64_t d_model = 0;
  std::int64_t d_expert = 0;         // hidden size of each FFN expert
  std::int64_t num_ffn_experts = 0;  // N_FFN
  std::int64_t num_zero_experts = 0;      // MoE++ zero-computation (ZC) experts: E(x) = 0
  std::int64_t num_copy_experts = 0;      //   E(x) = x
  std::int64_t num_constant_experts = 0;  //   E(x) = a1 x + a2 v, [a1, a2] = softmax(Wc x)
  std::int64_t top_k = 1;
  RouterKind router = RouterKind::kSoftmax;
  bool gating_residual = false;      // logits += W_g prev_logits (router::GatingResidual)
  // Renormalise the picked gates to sum to 1; unset: the score function's default (softmax no,
  // sigmoid yes, as DeepSeek-V3).
  std::optional<bool> renormalize;
  Activation activation = Activation::kSwiGLU;
  double capacity_factor = 0.0;      // gamma; 0 = dropless
  double lbl_coef = 0.0;
  double zloss_coef = 0.0;
  double tau = 1.0;                  // MoE++: eta_i of ZC experts in the LBL and the capacities
  bool expert_bias = false;          // router::BiasBalanced: per-expert selection biases (DeepSeek-V3)
  double bias_update_rate = 1e-3;    // u of b_i += u · sign(mean c − c_i), after each optimizer step
  // Parallel degrees (docs/design.md §5): world = tp * ep * dp ranks, tp varying fastest. Checked against the
  // communicator and the parallel policy when a distributed layer is built.
  std::int64_t tp = 1, ep = 1, dp = 1;
  // The policies' own options by key (core/options.hpp): router::GroupLimited's n_group, ...
  PolicyOptions options;

  // N_E: all experts, in the order FFN, zero, copy, constant, then the zero-computation kinds a policy
  // adds (options "*_zc_experts", experts/zero_computation.hpp) in its Set's order (logits, indices, counts).
  std::int64_t num_experts() const { return num_ffn_experts + num_zc_experts(); }
  std::int64_t num_zc_experts() const {
    return num_zero_experts + num_copy_experts + num_constant_experts + options.zc_experts();
  }

  // Throws ConfigError naming the first field that breaks a rule (fields in table order).
  void validate() const;
};

// The rule a field's value must satisfy (checked by validate(), in table order).
enum class FieldRule {
  kNone,            // any value of the type (bools, enums: parsing already restricts them)
  kPositive,        // integer > 0
  kNonNegative,     // integer >= 0
  kTopK,            // integer in [1, num_experts()]
  kFiniteNonNeg,    // finite and >= 0
  kFinitePositive,  // finite and > 0
};
// Where a field is set: the layer itself, the parallel layout (not a key of moekit-layer's JSON,
// which runs one process), or the policies' options (their keys are the policies' own: core/options.hpp).
enum class FieldScope { kLayer, kParallel, kPolicy };

// One row of a field table: the JSON key (also the name in every message), the member, its rule,
// whether a JSON config must give it, and its scope. Owner: MoeConfig, or a policy's options struct
// (core/options.hpp).
template <class M, class Owner = MoeConfig>
struct ConfigField {
  using type = M;
  using owner = Owner;
  using Member = M Owner::*;  // (an alias: nvcc's host output of the plain declarator trips -Wparentheses)
  const char* name;
  Member member;
  FieldRule rule = FieldRule::kNone;
  bool required = false;
  FieldScope scope = FieldScope::kLayer;
};

// THE table of MoeConfig's fields, in declaration order.
inline constexpr auto config_fields() {
  using I = std::int64_t;
  using R = FieldRule;
  return std::make_tuple(
      ConfigField<I>{"d_model", &MoeConfig::d_model, R::kPositive, true},
      ConfigField<I>{"d_expert", &MoeConfig::d_expert, R::kPositive, true},
      ConfigField<I>{"num_ffn_experts", &MoeConfig::num_ffn_experts, R::kPositive, true},
      ConfigField<I>{"num_zero_experts", &MoeConfig::num_zero_experts, R::kNonNegative},
      ConfigField<I>{"num_copy_experts", &MoeConfig::num_copy_experts, R::kNonNegative},
      ConfigField<I>{"num_constant_experts", &MoeConfig::num_constant_experts, R::kNonNegative},
      ConfigField<I>{"top_k", &MoeConfig::top_k, R::kTopK, true},
      ConfigField<RouterKind>{"router", &MoeConfig::router},
      ConfigField<bool>{"gating_residual", &MoeConfig::gating_residual},
      ConfigField<std::optional<bool>>{"renormalize", &MoeConfig::renormalize},
      ConfigField<Activation>{"activation", &MoeConfig::activation},
      ConfigField<double>{"capacity_factor", &MoeConfig::capacity_factor, R::kFiniteNonNeg},
      ConfigField<double>{"lbl_coef", &MoeConfig::lbl_coef, R::kFiniteNonNeg},
      ConfigField<double>{"zloss_coef", &MoeConfig::zloss_coef, R::kFiniteNonNeg},
      ConfigField<double>{"tau", &MoeConfig::tau, R::kFinitePositive},
      ConfigField<bool>{"expert_bias", &MoeConfig::expert_bias},
      ConfigField<double>{"bias_update_rate", &MoeConfig::bias_update_rate, R::kFiniteNonNeg},
      ConfigField<I>{"tp", &MoeConfig::tp, R::kPositive, false, FieldScope::kParallel},
      ConfigField<I>{"ep", &MoeConfig::ep, R::kPositive, false, FieldScope::kParallel},
      ConfigField<I>{"dp", &MoeConfig::dp, R::kPositive, false, FieldScope::kParallel},
      ConfigField<PolicyOptions>{"options", &MoeConfig::options, R::kNone, false, FieldScope::kPolicy});
}

// Calls f(field) for every row of the table, in order.
template <class F>
constexpr void for_each_config_field(F&& f) {
  std::apply([&](const auto&... field) { (f(field), ...); }, config_fields());
}

namespace detail {
// Whether an aggregate can be brace-initialised from N convertible placeholders: true up to its number
// of members, false above it.
struct AnyField {
  template <class T>
  constexpr operator T() const noexcept {
    return T{};
  }
};
template <class A, std::size_t... I>
constexpr bool brace_initialisable(std::index_sequence<I...>) {
  return requires { A{(void(I), AnyField{})...}; };
}
}  // namespace detail

// nvcc's front end accepts too many initialisers in a requires-expression, so the count is checked by
// the host compiler only (every build compiles host translation units with these headers).
#if !defined(__CUDACC__)
static_assert(detail::brace_initialisable<MoeConfig>(std::make_index_sequence<std::tuple_size_v<decltype(config_fields())>>{}) &&
                  !detail::brace_initialisable<MoeConfig>(std::make_index_sequence<std::tuple_size_v<decltype(config_fields())> + 1>{}),
              "MoeConfig: every member needs a row in config_fields() (validation, JSON and the cross-rank "
              "agreement all come from that table)");
#endif

std::string field_text(const PolicyOptions& o);

// The value of a field as text, for messages ("swiglu", "true", "0.5", "8"; "default" for an unset
// optional).
template <class M>
std::string field_text(const M& v) {
  if constexpr (std::is_same_v<M, std::optional<bool>>) return v ? (*v ? "true" : "false") : "default";
  else if constexpr (std::is_same_v<M, bool>) return v ? "true" : "false";
  else if constexpr (std::is_enum_v<M>) return std::string("\"") + to_string(v) + "\"";
  else if constexpr (std::is_floating_point_v<M>) return detail::str(v);
  else return std::to_string(v);
}

// The value of one option as text ("true", "8", "0.5", "\"max\"").
inline std::string option_text(const PolicyOptions::Value& v) {
  return std::visit(
      [](const auto& x) -> std::string {
        using X = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<X, std::string>) return "\"" + x + "\"";
        else return field_text(x);
      },
      v);
}
// Every option, "key value, ..." ("none").
inline std::string field_text(const PolicyOptions& o) {
  std::string s;
  for (const auto& [k, v] : o.entries()) s += (s.empty() ? "" : ", ") + k + " " + option_text(v);
  return s.empty() ? "none" : s;
}

// A field's value as 64 bits (doubles bit for bit; an unset optional -1; the options an FNV-1a hash of
// their text), for the cross-rank agreement check.
template <class M>
std::int64_t field_bits(const M& v) {
  if constexpr (std::is_same_v<M, std::optional<bool>>) {
    return v ? std::int64_t(*v) : -1;
  } else if constexpr (std::is_same_v<M, PolicyOptions>) {
    std::uint64_t h = 1469598103934665603ull;
    for (char ch : field_text(v)) h = (h ^ std::uint64_t(static_cast<unsigned char>(ch))) * 1099511628211ull;
    return std::int64_t(h);
  } else if constexpr (std::is_floating_point_v<M>) {
    const double d = double(v);
    std::int64_t b;
    std::memcpy(&b, &d, sizeof b);
    return b;
  } else {
    return std::int64_t(v);
  }
}

// Checks one field's rule; throws ConfigError(name, value, rule). o: the field's owner (c itself, or a
// policy's options struct); c: the layer's config (kTopK's bound).
template <class M, class Owner>
void check_field(const ConfigField<M, Owner>& f, const Owner& o, const MoeConfig& c) {
  const M& v = o.*f.member;
  auto fail = [&](const std::string& rule) { throw ConfigError(f.name, field_text(v), rule); };
  if constexpr (std::is_same_v<M, std::int64_t>) {
    if (f.rule == FieldRule::kPositive && v <= 0) fail("must be > 0");
    if (f.rule == FieldRule::kNonNegative && v < 0) fail("must be >= 0");
    if (f.rule == FieldRule::kTopK && (v < 1 || v > c.num_experts()))
      fail("must be in [1, number of experts = " + std::to_string(c.num_experts()) + "]");
  } else if constexpr (std::is_same_v<M, double>) {
    if (f.rule == FieldRule::kFiniteNonNeg && (!std::isfinite(v) || v < 0.0)) fail("must be finite and >= 0");
    if (f.rule == FieldRule::kFinitePositive && (!std::isfinite(v) || v <= 0.0)) fail("must be finite and > 0");
  }
}
template <class M>
void check_field(const ConfigField<M>& f, const MoeConfig& c) {
  check_field(f, c, c);
}

inline void MoeConfig::validate() const {
  for_each_config_field([&](const auto& f) { check_field(f, *this); });
  for (const auto& [key, v] : options.entries())  // counts of added zero-computation kinds (N_E reads them first)
    if (PolicyOptions::is_zc_count(key) && !(std::holds_alternative<std::int64_t>(v) && std::get<std::int64_t>(v) >= 0))
      throw ConfigError(key, option_text(v), "must be a non-negative integer (a count of zero-computation experts)");
}

}  // namespace moekit
