#pragma once
// An example trainer under mpirun (--parallel data|expert|tensor|hybrid, --tp, --ep): the distributed
// MoE layers behind moe_block.hpp's MoeBlock, and the trainer's side of the data parallelism. Nothing
// here needs MPI: it works on any comm::HostCommunicator (a trainer's main.cpp passes comm::Mpi's world).
//
// The world is tp x ep x dp ranks, tp fastest: rank = t + tp·(e + ep·d), as in the library's layers.
// Ranks of one tp group (same e, d) hold the same tokens; the S = ep·dp "shards" (index e + ep·d) hold
// different tokens. Parameters:
//   dense (embedding, norms, head; train_lm: attention too): replicated on every rank. Their gradients are all-reduced over the S
//     ranks with this rank's tp index (split by color t) and divided by S, here.
//   MoE router, gating residual, constant experts: replicated; FFN experts: rank (t, e, d) holds experts
//     [e·E/ep, (e+1)·E/ep), each the t-th 1/tp slice of d_expert, the same slice on every d. The layer's
//     sync_gradients() averages them over the shards.
// After both, every gradient is the gradient of the mean of the shards' losses, the same on every rank
// that holds the parameter, and the global gradient norm counts every parameter of the full model once:
//   |g|^2 = sum over replicated parameters (this rank's copy) + sum over the tp x ep ranks of this rank's
//           dp index of their expert slices (one all-reduce),
// which every rank computes alike, so all clip by the same factor.
#include <array>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include <moekit/parallel/comm/communicator.hpp>
#include <moekit/parallel/host_moe_layer.hpp>
#include <moekit/parallel/policy.hpp>
#include <moekit/train/checkpoint.hpp>
#include <moekit/train/trainer.hpp>

#include "moe_block.hpp"

enum class Parallel { kNone, kData, kExpert, kTensor, kHybrid };

inline const char* parallel_name(Parallel p) {
  switch (p) {
    case Parallel::kNone: return "none";
    case Parallel::kData: return "data";
    case Parallel::kExpert: return "expert";
    case Parallel::kTensor: return "tensor";
    case Parallel::kHybrid: return "hybrid";
  }
  return "?";
}

// Which degrees the strategy may raise above 1: the library's policy tags say (parallel/policy.hpp).
template <class P>
constexpr std::array<bool, 2> tp_ep_allowed() {
  return {P::allows_tp, P::allows_ep};
}
inline std::array<bool, 2> allowed_degrees(Parallel p) {
  namespace par = moekit::parallel;
  switch (p) {
    case Parallel::kNone: return tp_ep_allowed<par::None>();
    case Parallel::kData: return tp_ep_allowed<par::Data>();
    case Parallel::kExpert: return tp_ep_allowed<par::Expert>();
    case Parallel::kTensor: return tp_ep_allowed<par::Tensor>();
    case Parallel::kHybrid: return tp_ep_allowed<par::Hybrid>();
  }
  return {false, false};
}

inline bool parse_parallel(const std::string& s, Parallel& p) {
  for (Parallel q : {Parallel::kNone, Parallel::kData, Parallel::kExpert, Parallel::kTensor, Parallel::kHybrid})
    if (s == parallel_name(q)) {
      p = q;
      return true;
    }
  return false;
}

// A distributed layer for the config's degrees (mc.tp, mc.ep, mc.dp): the same router x experts x
// balance types as make_moe_block (TrainerRows), as MoeLayer<..., parallel::Hybrid>. The policy tag of
// a distributed host layer only limits which degrees may exceed 1 (its code is the same for Data,
// Expert, Tensor and Hybrid), and the trainers enforce --parallel's limits with the tags' own
// allows_tp/allows_ep before any layer is built; instantiating all four tags would compile four times
// the distributed types (measured with the 8 classic rows: 40 s instead of 24 s for main.cpp on 2 cores).
template <class T>
std::unique_ptr<MoeBlock<T>> make_parallel_moe_block(const moekit::MoeConfig& mc, bool global_balance,
                                                     moekit::comm::HostCommunicator& world) {
  return make_moe_block<T, moekit::parallel::Hybrid>(mc, global_balance, world);
}

// This rank's place in the grid and the trainer's collectives. Construct on every rank, in the same
// order relative to the model (communicator splits are collective).
class Ranks {
 public:
  Ranks(moekit::comm::HostCommunicator& world, int tp, int ep) : world_(world) {
    const int n = world.size(), r = world.rank();
    if (tp < 1 || ep < 1 || n % (tp * ep) != 0)
      throw moekit::ConfigError("tp * ep", std::to_string(tp) + " * " + std::to_string(ep),
                                "must divide the number of ranks " + std::to_string(n) + " (dp = ranks / (tp * ep))");
    g_ = moekit::ParallelGrid::of(tp, ep, n / (tp * ep), r);
    auto split = [&](moekit::RankGroup group) {
      const auto s = g_.split_of(group);
      return world.split(s.color, s.key);
    };
    shards_ = split(moekit::RankGroup::kShards);  // the S ranks with different tokens
    slices_ = split(moekit::RankGroup::kTpEp);    // the tp x ep distinct expert slices
    tp_ = split(moekit::RankGroup::kTp);          // the tp slices of the same experts (checkpoints)
  }

  const moekit::ParallelGrid& grid() const { return g_; }
  int rank() const { return world_.rank(); }
  int size() const { return world_.size(); }
  moekit::comm::HostCommunicator& world() { return world_; }
  // Checkpoints: the world, and the ranks holding the other tp slices of this rank's experts.
  moekit::train::CheckpointRanks checkpoint_ranks() { return {&world_, tp_.get()}; }

  // A layer config with this run's degrees (tp, ep, dp).
  moekit::MoeConfig with_degrees(const moekit::MoeConfig& base) const {
    moekit::MoeConfig mc = base;
    mc.tp = g_.tp, mc.ep = g_.ep, mc.dp = g_.dp;
    return mc;
  }

  // The model's MoE layers: distributed host layers, with this run's degrees, over the world. (With
  // --backend cuda, main.cpp builds the distributed CUDA layers from with_degrees() instead.)
  template <class T>
  MoeBlockFactory<T> moe_blocks() {
    return [this](const moekit::MoeConfig& base, bool global_balance) {
      return make_parallel_moe_block<T>(with_degrees(base), global_balance, world_);
    };
  }

  // The trainer's sums over ranks: interval statistics over the shards, the expert slices' part of the
  // gradient norm over the ranks that hold different ones.
  moekit::train::Reductions reductions() {
    moekit::train::Reductions red;
    red.shards = g_.shards();
    red.sum_over_shards = [this](double* v, std::size_t n) { sum_over_shards(v, n); };
    red.sum_over_expert_slices = [this](double* v, std::size_t n) { sum_over_expert_slices(v, n); };
    red.sum_over_tensor_slices = [this](double* v, std::size_t n) { tp_->all_reduce_sum(v, n); };
    return red;
  }

  // Sums v over the shards (the ranks holding different tokens; tp replicas are not counted twice).
  void sum_over_shards(double* v, std::size_t n) { shards_->all_reduce_sum(v, n); }

  // Dense gradients: the mean over the shards, in one all-reduce.
  template <class T>
  void average_over_shards(const std::vector<moekit::Parameter<T>>& dense) {
    std::size_t n = 0;
    for (const auto& p : dense) n += std::size_t(p.numel());
    buf_.resize(n);
    std::size_t at = 0;
    for (const auto& p : dense)
      for (std::int64_t i = 0; i < p.numel(); ++i) buf_[at++] = double(p.grad[i]);
    shards_->all_reduce_sum(buf_.data(), n);
    const double inv = 1.0 / double(g_.shards());
    at = 0;
    for (const auto& p : dense)
      for (std::int64_t i = 0; i < p.numel(); ++i) p.grad[i] = T(buf_[at++] * inv);
  }

  // Sums v over the ranks that hold different expert slices (the tp x ep group of this dp index): the
  // expert slices' part of the global gradient norm (train::clip_grad_norm's distributed form).
  void sum_over_expert_slices(double* v, std::size_t n) { slices_->all_reduce_sum(v, n); }

  // Parameters of the full model: replicated ones once, expert slices summed over a dp index, tensor
  // slices over the tp ranks.
  template <class T>
  std::int64_t full_parameter_count(const std::vector<moekit::Parameter<T>>& params) {
    moekit::NormSquares n;
    for (const auto& p : params) n.add(p.shard, double(p.numel()));
    slices_->all_reduce_sum(&n.expert_slices, 1);
    tp_->all_reduce_sum(&n.tensor_slices, 1);
    return std::int64_t(n.total());
  }

 private:
  moekit::comm::HostCommunicator& world_;
  moekit::ParallelGrid g_;
  std::unique_ptr<moekit::comm::HostCommunicator> shards_, slices_, tp_;
  std::vector<double> buf_;
};
