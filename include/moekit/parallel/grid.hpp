#pragma once
// The rank grid of the parallel strategies (docs/design.md §5), computed in this one place: the world is
// tp x ep x dp ranks with tp varying fastest, rank = t + tp·(e + ep·d). Ranks of one tp group hold the
// same tokens; the ep·dp "shards" (index e + ep·d) hold different tokens. The layers and the trainers
// split their communicators with the (color, key) pairs below, so every one of them names the same
// groups the same way.
#include <array>
#include <cstdint>
#include <iterator>
#include <memory>

namespace moekit {

// The sub-groups of the world a distributed layer or trainer talks to.
enum class RankGroup {
  kTp,      // same (e, d): the tp ranks of one expert-slice group (all-gather / reduce-scatter)
  kEp,      // same (t, d): the ep ranks that own different experts (all-to-all-v)
  kDp,      // same (t, e): the replicas of one expert slice (expert gradients)
  kShards,  // same t: the ep·dp ranks holding different tokens (balance counts, metrics)
  kTpEp,    // same d: the tp x ep distinct expert slices (count exchange, expert-slice norms)
  kWorld,   // every rank, in rank order (dense gradients: every tp replica gets the same bits)
};
inline constexpr RankGroup kAllRankGroups[] = {RankGroup::kTp,     RankGroup::kEp,   RankGroup::kDp,
                                               RankGroup::kShards, RankGroup::kTpEp, RankGroup::kWorld};

// This rank's place in the tp x ep x dp grid.
struct ParallelGrid {
  int tp = 1, ep = 1, dp = 1, t = 0, e = 0, d = 0;

  // The grid of `rank` for the degrees (tp, ep, dp); the caller has checked tp·ep·dp == world size.
  static ParallelGrid of(std::int64_t tp, std::int64_t ep, std::int64_t dp, int rank) {
    ParallelGrid g;
    g.tp = int(tp), g.ep = int(ep), g.dp = int(dp);
    g.t = rank % g.tp, g.e = (rank / g.tp) % g.ep, g.d = rank / (g.tp * g.ep);
    return g;
  }
  int rank() const { return t + tp * (e + ep * d); }
  int size() const { return tp * ep * dp; }
  int shards() const { return ep * dp; }
  int shard() const { return e + ep * d; }

  // (color, key) of this rank's group for communicator.split(color, key). Every rank must split the
  // groups in the same order (splits are collective over the world).
  struct Split {
    int color, key;
  };
  Split split_of(RankGroup g) const {
    switch (g) {
      case RankGroup::kTp: return {e + ep * d, t};
      case RankGroup::kEp: return {t + tp * d, e};
      case RankGroup::kDp: return {t + tp * e, d};
      case RankGroup::kShards: return {t, shard()};
      case RankGroup::kTpEp: return {d, t + tp * e};
      case RankGroup::kWorld: break;
    }
    return {0, rank()};
  }
};

// The six sub-communicators of a rank, split from the world in one fixed order.
// split(world, color, key) returns a std::unique_ptr<Comm>.
template <class Comm>
class RankGroups {
 public:
  RankGroups() = default;
  template <class World, class SplitFn>
  RankGroups(World& world, const ParallelGrid& g, SplitFn&& split) {
    for (RankGroup r : kAllRankGroups) {
      const auto s = g.split_of(r);
      c_[std::size_t(r)] = split(world, s.color, s.key);
    }
  }
  Comm& operator[](RankGroup r) const { return *c_[std::size_t(r)]; }
  template <class F>
  void for_each(F&& f) const {
    for (const auto& c : c_) f(*c);
  }

 private:
  std::array<std::unique_ptr<Comm>, std::size(kAllRankGroups)> c_;
};

}  // namespace moekit
