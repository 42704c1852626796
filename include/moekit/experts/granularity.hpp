#pragma once
// Fine-grained experts (Krajewski et al., arXiv 2402.07871): granularity G splits each of E experts of
// hidden size d_ff into G experts of size d_ff / G and routes to G * k_base of them, so active
// parameters per token stay constant.
#include <cstdint>
#include <string>

#include "moekit/core/config.hpp"

namespace moekit {

inline MoeConfig fine_grained_config(MoeConfig base, std::int64_t d_ff, std::int64_t num_experts, std::int64_t granularity,
                                     std::int64_t k_base) {
  if (granularity < 1) throw ConfigError("granularity", std::to_string(granularity), "must be >= 1");
  if (d_ff < 1) throw ConfigError("d_ff", std::to_string(d_ff), "must be > 0");
  if (d_ff % granularity != 0)
    throw ConfigError("granularity", std::to_string(granularity),
                      "must divide d_ff = " + std::to_string(d_ff) + " (experts have d_ff / G hidden units)");
  if (num_experts < 1) throw ConfigError("num_experts", std::to_string(num_experts), "must be > 0");
  if (k_base < 1 || k_base > num_experts)
    throw ConfigError("k_base", std::to_string(k_base), "must be in [1, E = " + std::to_string(num_experts) + "]");
  base.d_expert = d_ff / granularity;
  base.num_ffn_experts = granularity * num_experts;
  base.top_k = granularity * k_base;
  base.validate();
  return base;
}

}  // namespace moekit
