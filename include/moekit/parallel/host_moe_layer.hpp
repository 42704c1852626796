#pragma once
// MoeLayer<backend::Host<T>, ..., P> for P = parallel::Data, Expert, Tensor or Hybrid (DESIGN §5): the
// host layer over a communicator (comm::Mpi between processes, comm::Single for one). The world is
// tp x ep x dp ranks, tp fastest: rank = t + tp·(e + ep·d). Ranks of one tp group hold the same tokens;
// the ep·dp groups of a tp index hold different tokens ("shards", concatenated in shard order e + ep·d).
//
// Forward on each rank (local tokens x [T, D]):
//   router, top-k, capacity (per shard, as DeepSpeed), the zero-computation experts: all local (their
//   weights are replicated), so ZC tokens never travel;
//   Duplicate Token Dropping (DTD, DeepSpeed-TED): the tp ranks of a group hold the same tokens, so tp
//   rank t dispatches only the FFN rows of its 1/tp chunk of tokens;
//   counts: one all-gather of the per-expert row counts over the ranks of this dp index (tp x ep);
//   all-to-all-v over ep to the expert's owner; all-gather over tp (every tp rank computes its slice of
//   d_expert for all rows); local experts' FFN (W1/W3 rows t·f/tp.., W2 columns t·f/tp..); reduce-scatter
//   over tp (sums the slices, each rank keeps its chunk's rows); the reverse all-to-all-v; all-gather over
//   tp of the returned rows; combine by gather. Without DTD every tp rank dispatches all rows and the
//   slices are summed by an all-reduce over tp (tp times the all-to-all volume).
// Backward mirrors it (dgate needs no communication: every rank has all its tokens' expert rows).
// Communication-aware activation checkpointing: with set_activation_checkpointing(true) the forward
// keeps only the dispatched rows (the all-to-all outputs), and backward recomputes the expert
// activations from them without communicating again.
// Gradients accumulate locally over micro-batches; sync_gradients() (once per optimizer step, before
// it) sums expert gradients over dp and dense ones (router, gating residual, constant experts) over the
// world (tp replicas hold equal ones), and divides both to the mean over the ep·dp shards: the gradient
// of the mean of the shards' losses. Every rank must set the same duplicate token dropping.
// balance::GlobalBatch all-reduces the routed counts over the ep·dp ranks of this tp index (tp
// replicas counted once).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "moekit/backend/host/moe_layer.hpp"
#include "moekit/parallel/comm/communicator.hpp"
#include "moekit/parallel/dispatch_plan.hpp"
#include "moekit/parallel/grid.hpp"
#include "moekit/parallel/sharding.hpp"
#include "moekit/parallel/policy.hpp"

namespace moekit {

template <class T, class Router, class Experts, class Balance, parallel::DistributedPolicy P>
class MoeLayer<backend::Host<T>, Router, Experts, Balance, P>
    : public MoeLayer<backend::Host<T>, Router, Experts, Balance, parallel::None> {
  using Base = MoeLayer<backend::Host<T>, Router, Experts, Balance, parallel::None>;
  using Act = typename Experts::activation;
  static constexpr bool kGated = Act::gated;
  using I64 = std::int64_t;

 public:
  MoeLayer(const MoeConfig& cfg, comm::HostCommunicator& world)
      : Base(detail::agreed_config<Router, Experts, P>(
            cfg, world.size(), world.rank(),
            [&](const std::int64_t* mine, std::size_t n, std::int64_t* all) { world.all_gather(mine, n, all); },
            {{"balance (GlobalBatch)", Balance::global}})) {
    g_ = ParallelGrid::of(cfg.tp, cfg.ep, cfg.dp, world.rank());
    groups_ = RankGroups<comm::HostCommunicator>(world, g_, [](comm::HostCommunicator& w, int color, int key) { return w.split(color, key); });
    this->set_parameter_table(ParameterTable(this->cfg_, kGated, Router::residual, g_));  // the local shard only
    el_ = this->table_.local_experts();
    fl_ = this->table_.local_d_expert();
    if constexpr (Balance::global) {
      comm::HostCommunicator* shards = &groups_[RankGroup::kShards];
      this->balance_.set_all_reduce([shards](std::int64_t* data, std::size_t n) { shards->all_reduce_sum(data, n); });
    }
  }

  const ParallelGrid& grid() const { return g_; }
  // Local experts [first_expert(), first_expert() + local_experts()), each a d_expert/tp slice.
  I64 first_expert() const { return this->table_.first_expert(); }
  I64 local_experts() const { return el_; }
  // Duplicate token dropping over tp (default on; off dispatches every row from every tp rank).
  void set_duplicate_token_dropping(bool on) { dtd_ = on; }
  // Communication-aware activation checkpointing: recompute expert activations in backward from the
  // saved all-to-all outputs.
  void set_activation_checkpointing(bool on) { recompute_ = on; }
  I64 recomputations() const { return recomputations_; }

  AuxLosses forward(MatrixView<const T> x, MatrixView<T> y, MatrixView<const T> prev_logits = {}) {
    this->begin_forward(x, y, prev_logits);
    this->route();
    this->assign_slots();
    relayout();
    exchange_counts();
    dispatch_forward();
    return this->finish_forward(y.data);
  }

  void backward(MatrixView<const T> dy, MatrixView<T> dx, double aux_scale = 1.0, MatrixView<const T> dlogits_next = {},
                MatrixView<T> dprev_logits = {}) {
    this->begin_backward(dy, dx, dlogits_next, dprev_logits);
    this->combine_backward(dy.data);
    dispatch_backward();
    this->gather_slots(this->dyp_.data(), dx.data, /*gate_weighted=*/false);
    this->finish_backward(dy.data, dx.data, aux_scale, dlogits_next.data, dprev_logits.data);
  }

  // Once per optimizer step: the data-parallel reduction of the accumulated gradients. Expert shards:
  // summed over dp. Dense weights: summed over the whole world (the tp replicas hold equal gradients, so
  // that is tp times the sum over shards) rather than over each tp index's shards, so every replica gets
  // the very same bits and the replicas never drift apart. Both divided to the mean over the shards.
  void sync_gradients() {
    const T expert = T(1) / T(g_.shards()), dense = T(1) / T(g_.shards() * g_.tp);
    auto reduce = [&](comm::HostCommunicator& c, T* v, I64 n, T scale) {
      if (n == 0) return;
      c.all_reduce_sum(v, std::size_t(n));
      for (I64 i = 0; i < n; ++i) v[i] *= scale;
    };
    // The flat layout keeps the expert slices in one range [w13, const_wc) and the replicated tensors
    // around it: two all-reduces per group, chosen by the table's offsets.
    const auto& o = this->table_.offsets();
    T* g = this->grad_.data();
    reduce(groups_[RankGroup::kDp], g + o.w13, o.const_wc - o.w13, expert);
    reduce(groups_[RankGroup::kWorld], g + o.router, o.w13 - o.router, dense);
    reduce(groups_[RankGroup::kWorld], g + o.const_wc, o.end - o.const_wc, dense);
  }

  // Bytes and calls of every collective this layer made, summed over its groups.
  comm::ByteCounters comm_counters() const {
    comm::ByteCounters s;
    groups_.for_each([&](const comm::HostCommunicator& c) {
      for (std::size_t i = 0; i < s.bytes.size(); ++i) s.bytes[i] += c.counters().bytes[i], s.calls[i] += c.counters().calls[i];
    });
    return s;
  }
  // The all-to-all traffic alone (the volume DTD divides by tp).
  const comm::ByteCounters& ep_counters() const { return groups_[RankGroup::kEp].counters(); }

 private:
  // Rows in the plan's chunk-major order (chunk, expert, token); the token-side counts.
  void relayout() {
    const I64 k = this->cfg_.top_k, nf = this->cfg_.num_ffn_experts, tokens = this->tokens_;
    plan_.reset(g_, dtd_, nf, this->cfg_.d_model);
    const I64 nc = plan_.chunks();
    std::vector<I64> cnt(std::size_t(nc * nf), 0), fill(std::size_t(nc * nf), 0);
    for (I64 s = 0; s < tokens * k; ++s)
      if (this->slot_row_[s] >= 0) ++cnt[DispatchPlan::chunk_of(s / k, tokens, nc) * nf + this->idx_[s]];
    plan_.set_token_counts(cnt);
    for (I64 c = 0, at = 0; c < nc; ++c)
      for (I64 e = 0; e < nf; ++e) fill[c * nf + e] = at, at += cnt[c * nf + e];
    for (I64 s = 0; s < tokens * k; ++s) {
      if (this->slot_row_[s] < 0) continue;
      const I64 row = fill[DispatchPlan::chunk_of(s / k, tokens, nc) * nf + this->idx_[s]]++;
      this->slot_row_[s] = std::int32_t(row);
      this->row_slot_[row] = std::int32_t(s);
    }
  }

  // The per-expert counts of every rank of this dp index (tp x ep): the expert side's layout.
  void exchange_counts() {
    const I64 nf = this->cfg_.num_ffn_experts;
    std::vector<I64> all(std::size_t(g_.tp * g_.ep * nf));
    groups_[RankGroup::kTpEp].all_gather(plan_.my_counts(), std::size_t(nf), all.data());
    plan_.set_all_counts(all);
  }

  void permute_blocks(const T* src, T* dst, bool to_expert_major) const {
    const I64 d = this->cfg_.d_model;
    plan_.for_each_block(to_expert_major, [&](I64 from, I64 to, I64 rows) { std::copy_n(src + from * d, rows * d, dst + to * d); });
  }

  // My chunk's rows of `rows` -> expert-major rows at the expert side.
  void to_experts(const T* rows, std::vector<T>& out) {
    const I64 d = this->cfg_.d_model;
    recv_buf_.resize(std::size_t(plan_.recv_elements()));
    groups_[RankGroup::kEp].all_to_all_v(rows + plan_.chunk_row(plan_.my_chunk()) * d, plan_.send().data(), recv_buf_.data(), plan_.recv().data());
    gathered_.resize(std::size_t(plan_.expert_rows() * d));
    if (dtd_ && g_.tp > 1) groups_[RankGroup::kTp].all_gather_v(recv_buf_.data(), plan_.gather().data(), gathered_.data());
    else std::copy(recv_buf_.begin(), recv_buf_.end(), gathered_.begin());
    out.resize(std::size_t(plan_.expert_rows() * d));
    permute_blocks(gathered_.data(), out.data(), true);
  }

  // Expert-major rows (partial sums over the tp slices) -> my chunk's rows of `rows`, summed; then, with
  // DTD, every chunk's rows (all-gather over tp).
  void from_experts(const std::vector<T>& in, T* rows) {
    const I64 d = this->cfg_.d_model;
    gathered_.resize(std::size_t(plan_.expert_rows() * d));
    permute_blocks(in.data(), gathered_.data(), false);
    recv_buf_.resize(std::size_t(plan_.recv_elements()));
    if (g_.tp > 1 && dtd_) {
      groups_[RankGroup::kTp].reduce_scatter_v(gathered_.data(), plan_.gather().data(), recv_buf_.data());
    } else {
      if (g_.tp > 1) groups_[RankGroup::kTp].all_reduce_sum(gathered_.data(), gathered_.size());
      std::copy(gathered_.begin(), gathered_.end(), recv_buf_.begin());
    }
    T* mine = rows + plan_.chunk_row(plan_.my_chunk()) * d;
    groups_[RankGroup::kEp].all_to_all_v(recv_buf_.data(), plan_.recv().data(), mine, plan_.send().data());
    if (dtd_ && g_.tp > 1) {
      mine_.assign(mine, mine + plan_.my_rows() * d);  // all-gather's send may not alias its receive buffer
      groups_[RankGroup::kTp].all_gather_v(mine_.data(), plan_.chunk_elements().data(), rows);
    }
  }

  backend::host::FfnShapes<T> shapes() const {
    return {this->cfg_.d_model, fl_, plan_.expert_offsets().data(), el_, this->table_.w13_rows()};
  }
  void expert_forward_local() {
    const auto rows = std::size_t(plan_.expert_rows());
    h1_.resize(rows * fl_), a_.resize(rows * fl_), ye_.resize(rows * this->cfg_.d_model);
    if constexpr (kGated) h3_.resize(rows * fl_);
    const auto w = this->W();
    this->gemm_flops_ = backend::host::ffn_forward<Act>(shapes(), w.w13, w.w2, xe_.data(), h1_.data(), h3_.data(), a_.data(),
                                                        ye_.data());
  }

  void dispatch_forward() {
    const I64 k = this->cfg_.top_k, d = this->cfg_.d_model;
    for (I64 r = plan_.chunk_row(plan_.my_chunk()); r < plan_.chunk_row(plan_.my_chunk() + 1); ++r)  // x rows of my chunk
      std::copy_n(&this->x_[(this->row_slot_[r] / k) * d], d, &this->xp_[r * d]);
    to_experts(this->xp_.data(), xe_);  // xe_ is kept for backward: the all-to-all outputs
    expert_forward_local();
    from_experts(ye_, this->yp_.data());
    has_activations_ = !recompute_;
    if (recompute_) h1_.clear(), h3_.clear(), a_.clear();  // keep only the dispatched rows
  }

  void dispatch_backward() {
    to_experts(this->dyp_.data(), dye_);
    if (!has_activations_) {  // recompute from the saved all-to-all outputs: no communication
      expert_forward_local();
      ++recomputations_;
    }
    const auto w = this->W(), g = this->G();
    backend::host::ffn_backward<Act>(shapes(), w.w13, w.w2, xe_.data(), h1_.data(), h3_.data(), a_.data(), dye_.data(), g.w13,
                                     g.w2);
    has_activations_ = false;  // consumed
    from_experts(dye_, this->dyp_.data());
  }

  ParallelGrid g_;
  DispatchPlan plan_;
  RankGroups<comm::HostCommunicator> groups_;
  I64 el_ = 0, fl_ = 0, recomputations_ = 0;
  bool dtd_ = true, recompute_ = false, has_activations_ = false;
  std::vector<T> recv_buf_, gathered_, mine_, xe_, dye_, h1_, h3_, a_, ye_;
};

}  // namespace moekit
