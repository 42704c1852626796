// MoeConfig's one field table: validation, JSON and the cross-rank agreement all cover every field.
#include <doctest/doctest.h>

#include <cstdint>
#include <moekit/io/config_json.hpp>
#include <moekit/moe_layer.hpp>
#include <moekit/parallel/sharding.hpp>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

using namespace moekit;

namespace {
MoeConfig base() {
  MoeConfig c;
  c.d_model = 8, c.d_expert = 16, c.num_ffn_experts = 4, c.top_k = 2;
  return c;
}
// Another valid value of the same field (for the agreement check).
template <class M>
M other(const M& v) {
  if constexpr (std::is_same_v<M, bool>) return !v;
  else if constexpr (std::is_same_v<M, RouterKind>) return v == RouterKind::kSoftmax ? RouterKind::kSigmoid : RouterKind::kSoftmax;
  else if constexpr (std::is_same_v<M, Activation>) return v == Activation::kSwiGLU ? Activation::kGeLU : Activation::kSwiGLU;
  else if constexpr (std::is_same_v<M, std::optional<bool>>) return v ? std::optional<bool>() : std::optional<bool>(true);
  else if constexpr (std::is_same_v<M, PolicyOptions>) {
    PolicyOptions o = v;
    o.set("routed_scaling_factor", 2.5);
    return o;
  } else return v + M(1);
}
using Policy = parallel::Data;
using R = router::TopK<router::Softmax>;
using E = experts::Ffn<act::SwiGLU>;
}  // namespace

TEST_CASE("config table: one row per member, distinct names, keys by scope") {
  std::set<std::string> names;
  int rows = 0;
  for_each_config_field([&](const auto& f) { names.insert(f.name), ++rows; });
  CHECK(rows == 21);  // MoeConfig has 21 members today (counted again by a static_assert in config.hpp)
  CHECK(names.size() == std::size_t(rows));
  const auto layer = config_keys(FieldScope::kLayer), par = config_keys(FieldScope::kParallel);
  CHECK(layer.size() + par.size() + config_keys(FieldScope::kPolicy).size() == std::size_t(rows));
  CHECK(config_keys(FieldScope::kPolicy) == std::vector<std::string>{"options"});  // the policies' own keys
  CHECK(par == std::vector<std::string>{"tp", "ep", "dp"});
  CHECK(layer.front() == "d_model");
}

TEST_CASE("config table: JSON read and write by key") {
  nlohmann::json j = {{"d_model", 12},  {"d_expert", 5},          {"num_ffn_experts", 3}, {"top_k", 2},
                      {"router", "sigmoid"}, {"activation", "relu"}, {"tau", 0.25},        {"gating_residual", true},
                      {"num_copy_experts", 1}};
  MoeConfig c;
  read_config_fields(j, c);
  CHECK(c.d_model == 12);
  CHECK(c.d_expert == 5);
  CHECK(c.num_ffn_experts == 3);
  CHECK(c.num_copy_experts == 1);
  CHECK(c.router == RouterKind::kSigmoid);
  CHECK(c.activation == Activation::kReLU);
  CHECK(c.tau == 0.25);
  CHECK(c.gating_residual);
  CHECK(c.capacity_factor == 0.0);  // absent: the default
  nlohmann::json out;
  write_config_fields(c, out);
  CHECK(out["router"] == "sigmoid");
  CHECK(out["d_expert"] == 5);
  CHECK(out.size() == config_keys(FieldScope::kLayer).size());
  CHECK(!out.contains("tp"));
  MoeConfig back;
  read_config_fields(out, back);
  CHECK(back.d_model == 12);
  CHECK(back.activation == Activation::kReLU);
  CHECK(back.num_copy_experts == 1);
  // Errors name the key.
  auto fails = [](nlohmann::json bad, const std::string& key, const std::string& rule) {
    MoeConfig x;
    try {
      read_config_fields(bad, x);
      FAIL("no error for " << key);
    } catch (const ConfigError& e) {
      CHECK(e.field() == key);
      CHECK(std::string(e.what()).find(rule) != std::string::npos);
    }
  };
  fails({{"d_expert", 1}, {"num_ffn_experts", 1}, {"top_k", 1}}, "d_model", "required");
  fails({{"d_model", 1.5}, {"d_expert", 1}, {"num_ffn_experts", 1}, {"top_k", 1}}, "d_model", "integer");
  fails({{"d_model", 1}, {"d_expert", 1}, {"num_ffn_experts", 1}, {"top_k", 1}, {"renormalize", 1}}, "renormalize", "true or false");
  fails({{"d_model", 1}, {"d_expert", 1}, {"num_ffn_experts", 1}, {"top_k", 1}, {"router", "argmax"}}, "router", "softmax");
  fails({{"d_model", 1}, {"d_expert", 1}, {"num_ffn_experts", 1}, {"top_k", 1}, {"tau", "x"}}, "tau", "number");
}

TEST_CASE("config table: validation covers tau and the parallel degrees") {
  MoeConfig c = base();
  c.tau = 0;
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("tau = 0 violates: must be finite and > 0"), ConfigError);
  c = base();
  c.ep = 0;
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("ep = 0 violates: must be > 0"), ConfigError);
  c = base();
  c.num_zero_experts = -1;
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("num_zero_experts = -1"), ConfigError);
}

// Two simulated ranks: rank 1's config differs from rank 0's in one field. Every field of the table
// must be caught, by name, on the rank that runs the check.
TEST_CASE("config table: the cross-rank agreement catches a difference in every field") {
  int checked = 0;
  for_each_config_field([&](const auto& f) {
    const std::string name = f.name;
    if (name == "tp" || name == "ep" || name == "dp" || name == "router" || name == "activation" ||
        name == "gating_residual" || name == "expert_bias")
      return;  // these must match the policy or the world: covered by the tests of the distributed layers
    MoeConfig mine = base(), theirs = base();
    mine.dp = 2, theirs.dp = 2;
    theirs.*f.member = other(theirs.*f.member);
    auto gather = [&](const std::int64_t* v, std::size_t n, std::int64_t* all) {
      std::vector<std::int64_t> other_bits;
      for_each_config_field([&](const auto& g) { other_bits.push_back(field_bits(theirs.*g.member)); });
      for (std::size_t i = 0; i < n; ++i) all[i] = v[i];
      for (std::size_t i = 0; i < n; ++i) all[n + i] = i < other_bits.size() ? other_bits[i] : v[i];
    };
    try {
      detail::agreed_config<R, E, Policy>(mine, 2, 0, gather);
      FAIL("field " << name << " differs across ranks but passed");
    } catch (const ConfigError& e) {
      CHECK_MESSAGE(e.field() == name, "field " << name << " reported as " << e.field());
    }
    ++checked;
  });
  CHECK(checked == 14);  // 13 fields and the policies' options
}
