#pragma once
// router::GroupLimited<Inner>: group-limited top-k (DeepSeek-V2, arXiv 2405.04434 §2.1.2, "device-
// limited routing"; DeepSeek-V3, arXiv 2412.19437 §2.1.2 and its n_group / topk_group). The N_E experts
// (of every kind) form n_group equal contiguous groups; a group's score is the sum of its two largest
// selection scores (DeepSeek-V3, "top2_sum") or its largest (DeepSeek-V2, "max"); the topk_group best
// groups are kept (ties to the lower group) and the inner router selects its top-k among their experts
// only. The selection scores are what the wrapper is handed: s, or s + b under
// router::BiasBalanced<GroupLimited<...>> (DeepSeek-V3's router). Gates, P and the backward are the
// inner router's: the groups only narrow the selection, a constant of the forward.
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "moekit/core/config.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/options.hpp"
#include "moekit/router/policy.hpp"

namespace moekit {
enum class GroupScore { kTop2Sum, kMax };
inline const char* to_string(GroupScore g) { return g == GroupScore::kTop2Sum ? "top2_sum" : "max"; }
template <>
struct EnumValues<GroupScore> {
  static constexpr GroupScore all[] = {GroupScore::kTop2Sum, GroupScore::kMax};
};
}  // namespace moekit

namespace moekit::router {

struct GroupOptions {
  static constexpr std::int64_t kMaxGroups = 64;  // a group mask fits one word; DeepSeek-V3 has 8
  std::int64_t n_group = 1;
  std::int64_t topk_group = 1;
  GroupScore group_score = GroupScore::kTop2Sum;

  static constexpr auto fields() {
    using R = FieldRule;
    return std::make_tuple(ConfigField<std::int64_t, GroupOptions>{"n_group", &GroupOptions::n_group, R::kPositive},
                           ConfigField<std::int64_t, GroupOptions>{"topk_group", &GroupOptions::topk_group, R::kPositive},
                           ConfigField<GroupScore, GroupOptions>{"group_score", &GroupOptions::group_score});
  }
  void validate(const MoeConfig& c) const {
    const std::int64_t n = c.num_experts();
    if (n_group > kMaxGroups) throw ConfigError("n_group", std::to_string(n_group), "must be <= " + std::to_string(kMaxGroups));
    if (n % n_group != 0)
      throw ConfigError("n_group", std::to_string(n_group), "must divide the number of experts " + std::to_string(n) + " (equal groups)");
    if (topk_group > n_group)
      throw ConfigError("topk_group", std::to_string(topk_group), "must be <= n_group = " + std::to_string(n_group));
    if (c.top_k > topk_group * (n / n_group))
      throw ConfigError("top_k", std::to_string(c.top_k),
                        "must be <= topk_group * experts per group = " + std::to_string(topk_group * (n / n_group)));
    if (group_score == GroupScore::kTop2Sum && n / n_group < 2)
      throw ConfigError("group_score", "\"top2_sum\"", "needs at least 2 experts per group (n_group = " + std::to_string(n_group) + ")");
  }
};

template <class Inner>
struct GroupLimited : Inner {
  static_assert(RouterPolicy<Inner> && !router_traits<Inner>::stateful,
                "router::GroupLimited<Inner>: Inner must be a stateless router such as router::TopK<...> "
                "(write router::BiasBalanced<GroupLimited<...>> for DeepSeek-V3's biased groups)");
  using inner = Inner;
  using options = GroupOptions;
  static constexpr const char* choice = "n_group";

  int n_group = 1, topk_group = 1;
  GroupScore how = GroupScore::kTop2Sum;

  GroupLimited() = default;
  explicit GroupLimited(const MoeConfig& c) : Inner(c) {
    const GroupOptions o = read_options<GroupOptions>(c);
    n_group = int(o.n_group), topk_group = int(o.topk_group), how = o.group_score;
  }
  static void check(const MoeConfig& c) {
    Inner::check(c);
    if (!c.options.has("n_group")) throw ConfigError("n_group", "(missing)", "must be given for the layer's router::GroupLimited");
    require_token_choice(routing_of(Inner(c)), "n_group (router::GroupLimited)");
  }
  static void list_choices(std::vector<std::string>& keys) {
    Inner::list_choices(keys);
    keys.push_back(choice);
  }

  // Experts outside the topk_group best groups get the excluded score, then the inner selection.
  template <class S>
  MOEKIT_HD void select(S* sel, int n, int* idx, const S* state) const {
    const int size = n / n_group;
    S score[GroupOptions::kMaxGroups];
    for (int g = 0; g < n_group; ++g) {
      S first = excluded_score<S>(), second = excluded_score<S>();
      for (int i = g * size; i < (g + 1) * size; ++i) {
        const S v = sel[i];
        if (v > first) second = first, first = v;
        else if (v > second) second = v;
      }
      score[g] = how == GroupScore::kMax ? first : first + second;
    }
    std::uint64_t kept = 0;
    for (int r = 0; r < topk_group; ++r) {
      int best = -1;
      for (int g = 0; g < n_group; ++g)
        if (!(kept >> g & 1u) && (best < 0 || score[g] > score[best])) best = g;  // ties: the lower group
      kept |= std::uint64_t(1) << best;
    }
    for (int g = 0; g < n_group; ++g)
      if (!(kept >> g & 1u))
        for (int i = g * size; i < (g + 1) * size; ++i) sel[i] = excluded_score<S>();
    Inner::select(sel, n, idx, state);
  }
};

}  // namespace moekit::router
