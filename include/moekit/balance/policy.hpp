#pragma once
#include <concepts>

namespace moekit::balance {
// f_i of the load-balancing loss comes from the current micro-batch on this rank (DESIGN §4).
struct MicroBatch {
  static constexpr bool global = false;
};
template <class B>
concept BalancePolicy = requires { { B::global } -> std::convertible_to<bool>; };
}  // namespace moekit::balance
