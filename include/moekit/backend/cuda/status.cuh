#pragma once
// CUDA error handling. Launch-layer functions return cudaError_t (as CUB does); the convenience
// layer turns a failure into moekit::CudaError naming the call, the place and cudaGetErrorString.
#include <cuda_runtime.h>

#include "moekit/backend/cuda/abi.hpp"

#include <stdexcept>
#include <string>

namespace moekit {

class CudaError : public std::runtime_error {
 public:
  CudaError(cudaError_t code, const std::string& what)
      : std::runtime_error("moekit::CudaError: " + what), code_(code) {}
  cudaError_t code() const noexcept { return code_; }

 private:
  cudaError_t code_;
};

namespace backend::cuda {
inline void throw_on_error(cudaError_t e, const char* call, const char* file, int line) {
  if (e != cudaSuccess)
    throw CudaError(e, std::string(call) + " failed at " + file + ":" + std::to_string(line) + ": " +
                           cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
}
}  // namespace backend::cuda
}  // namespace moekit

// Convenience layer: throw on failure.
#ifndef MOEKIT_CUDA_CHECK
#define MOEKIT_CUDA_CHECK(call) ::moekit::backend::cuda::throw_on_error((call), #call, __FILE__, __LINE__)
#endif
// Launch layer: return the error to the caller.
#ifndef MOEKIT_CUDA_RETURN_IF_ERROR
#define MOEKIT_CUDA_RETURN_IF_ERROR(call)   \
  do {                                      \
    const cudaError_t moekit_err_ = (call); \
    if (moekit_err_ != cudaSuccess) return moekit_err_; \
  } while (0)
#endif

// Kernels are templates with hidden visibility (as CUB's kernels): two shared objects that each
// instantiate one never resolve to the other's copy, which may be built for other architectures.
#ifndef MOEKIT_KERNEL
#define MOEKIT_KERNEL __global__ __attribute__((visibility("hidden")))
#endif

