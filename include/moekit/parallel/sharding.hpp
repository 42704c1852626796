#pragma once
// Before a distributed layer moves any data: local validation of the config against the policy and the
// world, then one fixed-size all-gather that every rank makes whatever its config, so that a config that
// is invalid or differs on some rank fails on every rank (ConfigError naming the field and both values)
// instead of leaving the others waiting in a collective. Also the slicing of full-size weights into a
// rank's shard, shared by the host and CUDA layers.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>
#include <utility>
#include <vector>

#include "moekit/backend/host/moe_weights.hpp"
#include "moekit/moe_layer.hpp"
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
  auto bits = [](double v) {
    std::int64_t b;
    std::memcpy(&b, &v, sizeof b);
    return b;
  };
  std::vector<std::string> names = {"d_model", "d_expert", "num_ffn_experts", "num_zero_experts", "num_copy_experts",
                                    "num_constant_experts", "top_k", "router", "gating_residual", "renormalize", "activation",
                                    "capacity_factor", "lbl_coef", "zloss_coef", "tau", "tp", "ep", "dp"};
  std::vector<std::int64_t> mine = {cfg.d_model, cfg.d_expert, cfg.num_ffn_experts, cfg.num_zero_experts, cfg.num_copy_experts,
                                    cfg.num_constant_experts, cfg.top_k, std::int64_t(cfg.router), cfg.gating_residual,
                                    cfg.renormalize, std::int64_t(cfg.activation), bits(cfg.capacity_factor), bits(cfg.lbl_coef),
                                    bits(cfg.zloss_coef), bits(cfg.tau), cfg.tp, cfg.ep, cfg.dp};
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


// This rank's shard of full-size weights (or gradients): router, gating residual and constant experts
// whole; FFN experts [e·N/ep, (e+1)·N/ep), each W1/W3 rows and W2 columns [t·f/tp, (t+1)·f/tp).
template <class T>
void slice_moe_weights(const MoeWeights<T>& full, MoeWeights<T>& local, const MoeConfig& cfg, const ParallelGrid& g) {
  using I64 = std::int64_t;
  const bool gated = !full.w3.empty();
  const I64 d = cfg.d_model, f = cfg.d_expert, el = cfg.num_ffn_experts / g.ep, fl = f / g.tp, off = I64(g.t) * fl;
  local.router = full.router, local.const_wc = full.const_wc, local.const_v = full.const_v;
  local.gate_residual = full.gate_residual;
  local.w1.assign(el * fl * d, T(0)), local.w2.assign(el * d * fl, T(0)), local.w3.assign(gated ? el * fl * d : 0, T(0));
  for (I64 le = 0; le < el; ++le) {
    const I64 ge = I64(g.e) * el + le;
    std::copy_n(&full.w1[(ge * f + off) * d], fl * d, &local.w1[le * fl * d]);
    if (gated) std::copy_n(&full.w3[(ge * f + off) * d], fl * d, &local.w3[le * fl * d]);
    for (I64 c = 0; c < d; ++c) std::copy_n(&full.w2[(ge * d + c) * f + off], fl, &local.w2[(le * d + c) * fl]);
  }
}

}  // namespace moekit
