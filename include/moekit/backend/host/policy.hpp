#pragma once
#include <concepts>
#include <type_traits>

namespace moekit::backend {
// CPU backend: OpenMP loops and CBLAS GEMMs. T is float (the production type) or double (used by
// the tests' finite-difference checks; everything, router included, then runs in double).
template <class T>
struct Host {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "backend::Host<T>: T must be float or double");
  using value_type = T;
  static constexpr bool is_host = true;
};
template <class B>
concept BackendPolicy = requires { typename B::value_type; };
}  // namespace moekit::backend
