#pragma once
// The bodies of MoeLayer's two distributed stages (layer/pipeline.hpp declares them): the exchange of
// the routing statistics between the ranks, and the dispatch plan made from them. Kept apart so the
// pipeline reads as its stages; a single-rank layer never instantiates these.
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "moekit/core/error.hpp"
#include "moekit/layer/pipeline.hpp"

namespace moekit {

// Distributed, before the statistics come to the host (on CUDA, on the stream before its one host
// synchronisation): this rank's chunk counts and its expert-side capacity all-gathered over the tp x
// ep ranks of its dp index, (GlobalBatch) the routed counts summed over the shards, and a
// non-finite-logits flag summed over the world. So a rank with bad input or too small a workspace
// makes every rank it talks to throw together, never one rank alone.
template <class Backend, class Router, class Experts, class Balance, class P>
void MoeLayer<Backend, Router, Experts, Balance, P>::exchange_stats(Context ctx) {
  const int nf = int(cfg_.num_ffn_experts), n = int(cfg_.num_experts());
  std::int32_t* st = ops_.stats_ints();
  std::int32_t *send = st + layout_.send, *global = st + layout_.global;
  X::chunk_counts(st + layout_.offsets, my_chunk(), nf, send, ctx);
  X::set_value(send + nf, std::int32_t(std::min<I64>(ops_.capacity_rows(), INT32_MAX)), ctx);
  X::all_gather(ex_.group(RankGroup::kTpEp), send, std::size_t(nf + 1), st + layout_.gathered, ctx);
  X::copy(global, st + layout_.routed, std::size_t(n), ctx);
  X::set_value(global + n, std::int32_t(tokens_), ctx);
  if constexpr (Balance::global) X::all_reduce(ex_.group(RankGroup::kShards), global, std::size_t(n + 1), ctx);
  X::bad_flag(st + layout_.bad, st + layout_.global_bad, ctx);
  X::all_reduce(ex_.group(RankGroup::kWorld), st + layout_.global_bad, 1, ctx);
  X::wait(ex_.group(RankGroup::kWorld), ctx);  // NCCL errors and timeouts surface here, not as a hang
  ops_.sync_stats(ctx);
  if (ops_.stats_ints_host()[layout_.global_bad] > 0) {
    const std::int32_t bad = ops_.stats_ints_host()[layout_.bad];
    if (bad != kNoBadToken) bad_token_ = bad, throw_if_not_finite();
    throw NumericError("router logits are not finite on another rank (see its error); every rank stops");
  }
}

// The dispatch plan from the synchronised statistics: this rank's rows per (chunk, expert) and the
// all-gathered counts of its tp x ep group; every rank checks every rank's expert-side rows against
// its capacity, so they all throw together.
template <class Backend, class Router, class Experts, class Balance, class P>
void MoeLayer<Backend, Router, Experts, Balance, P>::make_plan() {
  const ParallelGrid& g = ex_.grid();
  const bool dtd = ex_.duplicate_token_dropping();
  const I64 nf = cfg_.num_ffn_experts, nc = chunks(), group = I64(g.tp) * g.ep, el = ops_.table().local_experts();
  DispatchPlan& plan = ex_.plan();
  plan.reset(g, dtd, nf, cfg_.d_model);
  std::vector<I64> cnt(std::size_t(nc * nf));
  for (I64 i = 0; i < nc * nf; ++i) cnt[std::size_t(i)] = offsets_[std::size_t(i + 1)] - offsets_[std::size_t(i)];
  plan.set_token_counts(cnt);
  const std::int32_t* gathered = ops_.stats_ints_host() + layout_.gathered;  // per rank: counts [N_FFN], capacity [1]
  std::vector<I64> all(std::size_t(group * nf));
  for (I64 r = 0; r < group; ++r) std::copy_n(gathered + r * (nf + 1), nf, all.begin() + r * nf);
  for (I64 r = 0; r < group; ++r) {
    const I64 t = r % g.tp, e = r / g.tp;
    I64 rows = 0;
    for (I64 src = 0; src < group; ++src)
      if (dtd || src % g.tp == t)
        for (I64 le = 0; le < el; ++le) rows += all[std::size_t(src * nf + e * el + le)];
    if (rows > gathered[r * (nf + 1) + nf])
      throw ShapeError("rank " + std::to_string(r) + " of the tp x ep group would receive " + std::to_string(rows) +
                       " expert rows but reserved " + std::to_string(gathered[r * (nf + 1) + nf]) +
                       " (every rank must reserve() the largest token count any rank uses)");
  }
  plan.set_all_counts(all);
}

}  // namespace moekit
