#pragma once
// Parallel strategies (docs/design.md §5) as policy tags; the degrees (MoeConfig::tp, ep, dp) are set at run
// time and each policy says which of them may exceed 1:
//   None    one rank.
//   Data    dp: everything replicated, gradients averaged over the ranks.
//   Expert  ep (and dp): FFN experts sharded over ep ranks, tokens travel by all-to-all-v.
//   Tensor  tp (and dp): each FFN expert's W1/W3 split by output columns, W2 by input columns over tp
//           ranks; partial outputs summed over the tp group.
//   Hybrid  tp, ep and dp at once (DeepSpeed-TED), with duplicate token dropping over tp.
#include <concepts>

namespace moekit::parallel {
struct None {
  static constexpr bool distributed = false;
  static constexpr bool allows_tp = false, allows_ep = false, allows_dp = false;
  static constexpr const char* name = "parallel::None";
};
struct Data {
  static constexpr bool distributed = true;
  static constexpr bool allows_tp = false, allows_ep = false, allows_dp = true;
  static constexpr const char* name = "parallel::Data";
};
struct Expert {
  static constexpr bool distributed = true;
  static constexpr bool allows_tp = false, allows_ep = true, allows_dp = true;
  static constexpr const char* name = "parallel::Expert";
};
struct Tensor {
  static constexpr bool distributed = true;
  static constexpr bool allows_tp = true, allows_ep = false, allows_dp = true;
  static constexpr const char* name = "parallel::Tensor";
};
struct Hybrid {
  static constexpr bool distributed = true;
  static constexpr bool allows_tp = true, allows_ep = true, allows_dp = true;
  static constexpr const char* name = "parallel::Hybrid";
};
template <class P>
concept ParallelPolicy = requires { { P::distributed } -> std::convertible_to<bool>; };
template <class P>
concept DistributedPolicy = ParallelPolicy<P> && P::distributed && requires {
  { P::allows_tp } -> std::convertible_to<bool>;
  { P::allows_ep } -> std::convertible_to<bool>;
  { P::allows_dp } -> std::convertible_to<bool>;
};
// The strategies a backend's layer implements: None, or a distributed one that says which degrees it allows.
template <class P>
concept StrategyPolicy = std::same_as<P, None> || DistributedPolicy<P>;
}  // namespace moekit::parallel
