#pragma once
#include <concepts>
#include <type_traits>

#include "moekit/core/bf16.hpp"

namespace moekit::backend {
// CPU backend: OpenMP loops and CBLAS GEMMs. T is float (the production type), double (used by
// the tests' finite-difference checks; everything, router included, then runs in double), or
// moekit::bf16: bf16 activations and weights, GEMMs accumulating in fp32 (backend/host/gemm_bf16.hpp),
// router, softmax/sigmoid, top-k, aux losses and every gradient in fp32, as backend::Cuda<bf16>.
template <class T>
struct Host {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, moekit::bf16>,
                "backend::Host<T>: T must be float, double or moekit::bf16");
  using value_type = T;
  static constexpr bool is_host = true;
};
template <class B>
concept BackendPolicy = requires { typename B::value_type; };
}  // namespace moekit::backend
