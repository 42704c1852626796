#pragma once
// Before a distributed layer moves any data: local validation of the config against the policy and the
// world, then one fixed-size all-gather that every rank makes whatever its config, so that a config that
// is invalid or differs on some rank fails on every rank (ConfigError naming the field and both values)
// instead of leaving the others waiting in a collective. (A rank's shard of the weights comes from the
// parameter table: layer/parameter_table.hpp.)
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>
#include <utility>
#include <vector>

#include "moekit/layer/moe_layer_decl.hpp"
#include "moekit/parallel/dispatch_plan.hpp"

namespace moekit {

namespace detail {
// Local checks, then one fixed-size all-gather that every rank makes whatever its config, so that a
// config that is invalid or differs on some rank fails on every rank with a message, never a hang.
// all_gather(const int64* mine, size_t n, int64* all): the communicator's all-gather of n values.
// extra: more (name, value) pairs that must agree across ranks (e.g. the balance scope).
template <class Router, class Experts, class P, class AllGather>
MoeConfig agreed_config(const MoeConfig& cfg, int world_size, int world_rank, AllGather&& all_gather,
                        const std::vector<std::pair<std::string, std::int64_t>>& extra = {}) {
  std::exception_ptr local;
  try {
    validate_layer_config<Router, Experts>(cfg);
    auto allowed = [](const char* field, std::int64_t v, bool ok) {
      if (v > 1 && !ok) throw ConfigError(field, std::to_string(v), std::string("must be 1 with ") + P::name);
    };
    allowed("tp", cfg.tp, P::allows_tp);
    allowed("ep", cfg.ep, P::allows_ep);
    allowed("dp", cfg.dp, P::allows_dp);
    if (cfg.tp * cfg.ep * cfg.dp != world_size)
      throw ConfigError("tp * ep * dp", std::to_string(cfg.tp * cfg.ep * cfg.dp), "must equal the world size " + std::to_string(world_size));
    if (cfg.num_ffn_experts % cfg.ep != 0)
      throw ConfigError("num_ffn_experts", std::to_string(cfg.num_ffn_experts), "must be divisible by ep = " + std::to_string(cfg.ep));
    if (cfg.d_expert % cfg.tp != 0)
      throw ConfigError("d_expert", std::to_string(cfg.d_expert), "must be divisible by tp = " + std::to_string(cfg.tp));
  } catch (const ConfigError&) {
    local = std::current_exception();
  }
  // Every field of MoeConfig, from its one table (core/config.hpp): a new field is checked too.
  std::vector<std::string> names;
  std::vector<std::int64_t> mine;
  for_each_config_field([&](const auto& f) {
    names.push_back(f.name);
    mine.push_back(field_bits(cfg.*f.member));
  });
  for (const auto& [name, value] : extra) names.push_back(name), mine.push_back(value);
  names.push_back("(valid)"), mine.push_back(local ? 0 : 1);
  const std::size_t kFields = mine.size();
  std::vector<std::int64_t> all(kFields * std::size_t(world_size));
  all_gather(mine.data(), kFields, all.data());
  if (local) std::rethrow_exception(local);
  for (int r = 0; r < world_size; ++r)
    if (all[std::size_t(r) * kFields + kFields - 1] == 0)
      throw ConfigError("rank " + std::to_string(r), "invalid configuration", "every rank must pass validation (see rank " +
                                                                                  std::to_string(r) + "'s error)");
  for (std::size_t f = 0; f + 1 < kFields; ++f)
    for (int r = 0; r < world_size; ++r)
      if (all[std::size_t(r) * kFields + f] != mine[f])
        throw ConfigError(names[f], "rank " + std::to_string(r) + " has " + std::to_string(all[std::size_t(r) * kFields + f]) +
                                        ", rank " + std::to_string(world_rank) + " has " + std::to_string(mine[f]),
                          "must be the same on every rank");
  return cfg;
}
}  // namespace detail


}  // namespace moekit
