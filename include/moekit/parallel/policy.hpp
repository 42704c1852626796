#pragma once
#include <concepts>

namespace moekit::parallel {
// One rank, no communication.
struct None {
  static constexpr bool distributed = false;
};
template <class P>
concept ParallelPolicy = requires { { P::distributed } -> std::convertible_to<bool>; };
}  // namespace moekit::parallel
