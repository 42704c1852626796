#pragma once
// The routing columns of bench_moe_layer (host and CUDA rows): the share of routed slots on the "hot"
// first max(1, N_FFN/8) experts (what skewed routing aims at), and on zero-computation experts.
#include <algorithm>
#include <cstdint>
#include <vector>

struct RoutingShares {
  double hot = 0, zc = 0;
};

inline RoutingShares routing_shares(const std::vector<std::int64_t>& routed, std::int64_t ffn_experts) {
  std::int64_t hot = 0, zc = 0, all = 0;
  for (std::int64_t e = 0; e < std::int64_t(routed.size()); ++e) {
    all += routed[e];
    if (e < std::max<std::int64_t>(1, ffn_experts / 8)) hot += routed[e];
    if (e >= ffn_experts) zc += routed[e];
  }
  const double denom = double(std::max<std::int64_t>(all, 1));
  return {double(hot) / denom, double(zc) / denom};
}
