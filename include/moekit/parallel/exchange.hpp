#pragma once
// The exchange a distributed strategy puts between the token side (the rows this rank routed) and the
// expert side (the rows of the experts this rank holds), written once for every backend over a small
// row-operations adapter `Ops` (backend/host/exchange_ops.hpp, backend/cuda/exchange_ops.cuh):
//
//   to_experts:   my chunk's rows --all-to-all-v over ep--> (with duplicate token dropping: all-gather
//                 over tp) --block permutation--> expert-major rows
//   from_experts: expert-major partial rows (each tp rank's slice of d_expert) --block permutation-->
//                 summed over tp (reduce-scatter with DTD, all-reduce without) --all-to-all-v back-->
//                 my chunk's rows (with DTD: all-gather over tp of every chunk)
//
// The bookkeeping (who sends how many rows where) is the DispatchPlan; the rank grid and the
// sub-communicators are parallel/grid.hpp's. sync_gradients reduces a flat gradient buffer laid out by
// the parameter table: the expert slices over dp, the tensor slices (the shared experts') over the ep·dp
// shards, the replicated tensors over the world, each divided to the mean over the ep·dp shards. parallel::None has no exchange (the token side is the expert side).
//
// Ops provides: value_type, Comm, Context (the stream, or an empty struct), Buffer, ensure(buffer, n)
// (grow on the host; on the device a check against what reserve() made), data(buffer),
// copy(dst, src, n, ctx), and the collectives a2a / all_gather_v / reduce_scatter_v / all_reduce with
// the communicator's argument order plus ctx, and scale(values, n, factor, ctx).
#include <algorithm>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "moekit/layer/parameter_table.hpp"
#include "moekit/parallel/comm/communicator.hpp"
#include "moekit/parallel/dispatch_plan.hpp"
#include "moekit/parallel/grid.hpp"

namespace moekit::parallel {

template <class Ops>
class ExpertExchange {
 public:
  using T = typename Ops::value_type;
  using Comm = typename Ops::Comm;
  using Ctx = typename Ops::Context;
  using I64 = std::int64_t;

  ExpertExchange() = default;
  // Splits the six sub-communicators of `world` (collective: every rank, same order).
  template <class World, class Split>
  ExpertExchange(World& world, const ParallelGrid& g, Split&& split) : g_(g), groups_(world, g, std::forward<Split>(split)) {}

  const ParallelGrid& grid() const { return g_; }
  Comm& group(RankGroup r) const { return groups_[r]; }
  // Duplicate token dropping over tp (every rank of the world must agree).
  void set_duplicate_token_dropping(bool on) { dtd_ = on; }
  bool duplicate_token_dropping() const { return dtd_; }
  int chunks() const { return dtd_ ? g_.tp : 1; }
  int my_chunk() const { return dtd_ ? g_.t : 0; }

  DispatchPlan& plan() { return plan_; }
  const DispatchPlan& plan() const { return plan_; }

  // The exchange buffers for up to `rows` expert-side rows and `token_rows` token-side rows of d values
  // (the device adapter allocates here, never in forward; the host one also grows on demand).
  void reserve(I64 rows, I64 token_rows, I64 d) {
    Ops::reserve(recv_, std::size_t(rows * d));
    Ops::reserve(gathered_, std::size_t(rows * d));
    Ops::reserve(mine_, std::size_t(token_rows * d));
  }

  // My chunk's rows of `rows` (token side, chunk-major) -> expert-major rows `out` (expert side).
  void to_experts(const T* rows, T* out, Ctx ctx) {
    const I64 d = plan_.d_model();
    T* recv = Ops::ensure(recv_, std::size_t(plan_.recv_elements()));
    Ops::a2a(group(RankGroup::kEp), rows + plan_.chunk_row(plan_.my_chunk()) * d, plan_.send().data(), recv,
             plan_.recv().data(), ctx);
    const T* gathered = recv;
    if (dtd_ && g_.tp > 1) {
      T* all = Ops::ensure(gathered_, std::size_t(plan_.expert_rows() * d));
      Ops::all_gather_v(group(RankGroup::kTp), recv, plan_.gather().data(), all, ctx);
      gathered = all;
    }
    permute_blocks(gathered, out, /*to_expert_major=*/true, ctx);
  }

  // Expert-major rows `in` (partial sums over the tp slices) -> my chunk's rows of `rows`, summed over
  // tp; with DTD then every chunk's rows (all-gather over tp). `in` may be overwritten.
  void from_experts(T* in, T* rows, Ctx ctx) {
    const I64 d = plan_.d_model();
    T* gathered = Ops::ensure(gathered_, std::size_t(plan_.expert_rows() * d));
    permute_blocks(in, gathered, /*to_expert_major=*/false, ctx);
    const T* back = gathered;
    if (g_.tp > 1 && dtd_) {
      T* recv = Ops::ensure(recv_, std::size_t(plan_.recv_elements()));
      Ops::reduce_scatter_v(group(RankGroup::kTp), gathered, plan_.gather().data(), recv, ctx);
      back = recv;
    } else if (g_.tp > 1) {
      Ops::all_reduce(group(RankGroup::kTp), gathered, std::size_t(plan_.expert_rows() * d), ctx);
    }
    T* mine = rows + plan_.chunk_row(plan_.my_chunk()) * d;
    Ops::a2a(group(RankGroup::kEp), back, plan_.recv().data(), mine, plan_.send().data(), ctx);
    if (dtd_ && g_.tp > 1) {  // all-gather's send may not alias its receive buffer
      T* copy = Ops::ensure(mine_, std::size_t(plan_.my_rows() * d));
      Ops::copy(copy, mine, std::size_t(plan_.my_rows() * d), ctx);
      Ops::all_gather_v(group(RankGroup::kTp), copy, plan_.chunk_elements().data(), rows, ctx);
    }
  }

  // Once per optimizer step, before it: the data-parallel reduction of a flat gradient buffer laid out
  // by `t`, by each tensor's shard kind (never by where it lies): expert slices summed over dp (their
  // ep rank saw every token routed to them); tensor slices summed over the ep·dp shards (each saw its
  // own tokens); the replicated tensors summed over the whole world (tp replicas hold equal gradients:
  // one communicator gives every replica the same bits, so they never drift apart); each divided to the
  // mean over the ep·dp shards. Neighbouring tensors of one kind go in one collective: the expert ones
  // first, then the tensor slices, then the replicated ones, each in buffer order.
  template <class G>
  void sync_gradients(const ParameterTable& t, G* grads, Ctx ctx) {
    enum Kind { kExpert, kTensor, kDense };
    const RankGroup over[] = {RankGroup::kDp, RankGroup::kShards, RankGroup::kWorld};
    const double mean[] = {1.0 / double(g_.shards()), 1.0 / double(g_.shards()), 1.0 / double(g_.shards() * g_.tp)};
    struct Run {
      Kind kind;
      I64 begin, end;
    };
    std::vector<const ParamSpec*> by_offset;
    for (const auto& s : t.specs()) by_offset.push_back(&s);
    std::sort(by_offset.begin(), by_offset.end(), [](const ParamSpec* a, const ParamSpec* b) { return a->offset < b->offset; });
    std::vector<Run> runs;
    for (const ParamSpec* s : by_offset) {
      const Kind k = expert_shard(s->shard) ? kExpert : tp_split(s->shard) ? kTensor : kDense;
      if (!runs.empty() && runs.back().kind == k && runs.back().end == s->offset) runs.back().end += s->numel();
      else runs.push_back({k, s->offset, s->offset + s->numel()});
    }
    for (Kind pass : {kExpert, kTensor, kDense})
      for (const Run& r : runs) {
        if (r.kind != pass || r.end == r.begin) continue;
        Ops::all_reduce(group(over[pass]), grads + r.begin, std::size_t(r.end - r.begin), ctx);
        Ops::scale(grads + r.begin, r.end - r.begin, mean[pass], ctx);
      }
  }

  // Bytes and calls of every collective, summed over the groups; the all-to-all alone.
  comm::ByteCounters counters() const {
    comm::ByteCounters s;
    groups_.for_each([&](const Comm& c) {
      for (std::size_t i = 0; i < s.bytes.size(); ++i) s.bytes[i] += c.counters().bytes[i], s.calls[i] += c.counters().calls[i];
    });
    return s;
  }
  const comm::ByteCounters& ep_counters() const { return group(RankGroup::kEp).counters(); }

 private:
  void permute_blocks(const T* src, T* dst, bool to_expert_major, Ctx ctx) const {
    const I64 d = plan_.d_model();
    plan_.for_each_block(to_expert_major, [&](I64 from, I64 to, I64 n) { Ops::copy(dst + to * d, src + from * d, std::size_t(n * d), ctx); });
  }

  ParallelGrid g_;
  RankGroups<Comm> groups_;
  DispatchPlan plan_;
  bool dtd_ = true;
  typename Ops::Buffer recv_, gathered_, mine_;
};

}  // namespace moekit::parallel
