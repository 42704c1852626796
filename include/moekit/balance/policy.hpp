#pragma once
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include "moekit/core/config.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/options.hpp"

namespace moekit {
// Over which tokens the load-balancing loss's f_i and P_i are taken, within the micro-batch scope: all
// of them, or each sequence apart (DeepSeek-V3's complementary sequence-wise loss).
enum class BalanceScope { kMicroBatch, kSequence };
inline const char* to_string(BalanceScope s) { return s == BalanceScope::kMicroBatch ? "micro_batch" : "sequence"; }
template <>
struct EnumValues<BalanceScope> {
  static constexpr BalanceScope all[] = {BalanceScope::kMicroBatch, BalanceScope::kSequence};
};
}  // namespace moekit

namespace moekit::balance {

// The sequence scope (DeepSeek-V3, arXiv 2412.19437 eq. 17-20; docs/design.md §4): the tokens are B
// sequences of sequence_length S, row-major [B, S]; f_{b,i} and P_{b,i} are taken over each sequence and
// LBL = (1/B) Σ_b N_E Σ_i η_i f_{b,i} P_{b,i}. An option of every layer's micro-batch scope (a runtime
// choice: no new layer types); a GlobalBatch layer refuses it, and a T that S does not divide is a
// ConfigError at forward.
struct ScopeOptions {
  BalanceScope balance = BalanceScope::kMicroBatch;
  std::int64_t sequence_length = 0;
  static constexpr auto fields() {
    return std::make_tuple(ConfigField<BalanceScope, ScopeOptions>{"balance", &ScopeOptions::balance},
                           ConfigField<std::int64_t, ScopeOptions>{"sequence_length", &ScopeOptions::sequence_length,
                                                                   FieldRule::kNonNegative});
  }
  void validate(const MoeConfig&) const {
    if (balance == BalanceScope::kSequence && sequence_length < 1)
      throw ConfigError("sequence_length", std::to_string(sequence_length), "must be >= 1 with \"balance\": \"sequence\"");
    if (balance != BalanceScope::kSequence && sequence_length != 0)
      throw ConfigError("sequence_length", std::to_string(sequence_length), "needs \"balance\": \"sequence\"");
  }
  // Tokens per sequence of the sequence scope, or 0 (the whole micro-batch).
  std::int64_t per_sequence() const { return balance == BalanceScope::kSequence ? sequence_length : 0; }
};

// f_i of the load-balancing loss comes from the current micro-batch on this rank (docs/design.md §4).
struct MicroBatch {
  static constexpr bool global = false;
};

// Global-batch balancing (Qwen, arXiv 2501.11873, Algorithm 1): the per-expert routed counts of every
// micro-batch are all-reduced over the ranks that hold different tokens and added into a buffer;
// f_i comes from the buffer. Call reset() after each optimizer step. P_i stays per micro-batch.
class GlobalBatch {
 public:
  static constexpr bool global = true;
  using AllReduce = std::function<void(std::int64_t* data, std::size_t n)>;

  // Sums counts (n experts) and the token count across ranks; the default is one rank (no-op).
  void set_all_reduce(AllReduce fn) { all_reduce_ = std::move(fn); }

  // Adds one micro-batch: local routed counts and tokens, all-reduced first.
  void accumulate(const std::vector<std::int64_t>& local_counts, std::int64_t local_tokens) {
    scratch_.assign(local_counts.begin(), local_counts.end());
    scratch_.push_back(local_tokens);  // counts and tokens travel in one collective
    if (all_reduce_) all_reduce_(scratch_.data(), scratch_.size());
    if (counts_.size() != local_counts.size()) counts_.assign(local_counts.size(), 0);
    for (std::size_t i = 0; i < counts_.size(); ++i) counts_[i] += scratch_[i];
    tokens_ += scratch_.back();
  }
  void reset() {
    counts_.assign(counts_.size(), 0);
    tokens_ = 0;
  }
  const std::vector<std::int64_t>& counts() const { return counts_; }
  std::int64_t tokens() const { return tokens_; }

 private:
  AllReduce all_reduce_;
  std::vector<std::int64_t> counts_, scratch_;
  std::int64_t tokens_ = 0;
};

// The f_i counts (and their token count) of a balance scope after one micro-batch with `routed` counts:
// the micro-batch's own, or for GlobalBatch in training mode the buffer after adding them (all-reduced
// through its hook). Evaluation forwards leave a GlobalBatch buffer alone.
template <class Balance>
void scope_counts(Balance& balance, bool training, const std::vector<std::int64_t>& routed, std::int64_t tokens,
                  std::vector<std::int64_t>& f_counts, std::int64_t& f_tokens) {
  f_counts = routed;
  f_tokens = tokens;
  if constexpr (Balance::global)
    if (training) {
      balance.accumulate(routed, tokens);
      f_counts = balance.counts();
      f_tokens = balance.tokens();
    }
}

template <class B>
concept BalancePolicy = requires { { B::global } -> std::convertible_to<bool>; };

}  // namespace moekit::balance
