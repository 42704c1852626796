#pragma once
// backend::Cuda<T>: the CUDA backend tag (docs/design.md §6). T is the storage type of activations and expert
// weights: float, or moekit::bf16 (stored as __nv_bfloat16, same bits). Router logits, probabilities,
// aux losses and every gradient of a parameter are fp32 whatever T is; GEMMs accumulate in fp32.
// Plain C++ (no CUDA headers): code that only names the policy does not need nvcc.
#include <type_traits>

#include "moekit/backend/cuda/abi.hpp"
#include "moekit/core/bf16.hpp"

namespace moekit::backend {
// Abi: the architecture tag of the naming TU (backend/cuda/abi.hpp); leave it defaulted.
template <class T, class Abi = cuda::Abi>
struct Cuda {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, moekit::bf16>,
                "backend::Cuda<T>: T must be float or moekit::bf16");
  using value_type = T;
  using abi = Abi;
  static constexpr bool is_host = false;
};
}  // namespace moekit::backend
