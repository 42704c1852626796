#pragma once
// CUDA error handling. Launch-layer functions return cudaError_t (as CUB does); the convenience
// layer turns a failure into moekit::CudaError naming the call, the place and cudaGetErrorString.
#include <cuda_runtime.h>

#include "moekit/backend/cuda/abi.hpp"
#include "moekit/core/error.hpp"  // OutOfMemoryTag

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
// cudaErrorMemoryAllocation: still a CudaError; the launch layer reports it as Status::kOutOfMemory.
class CudaOutOfMemory : public CudaError, public OutOfMemoryTag {
 public:
  using CudaError::CudaError;
};

namespace backend::cuda {
// An error that is reported (thrown, or returned to the caller) is also cleared from the thread's last
// error (cudaGetLastError resets it): otherwise a non-sticky failure, an allocation that failed say,
// stays there and the next launcher, which ends with `return cudaGetLastError()`, reports it as its own.
// A sticky error (the context is broken) is not cleared by this; every later call reports it anyway.
inline void clear_last_error() noexcept { (void)cudaGetLastError(); }

inline void throw_on_error(cudaError_t e, const char* call, const char* file, int line) {
  if (e != cudaSuccess) {
    clear_last_error();
    const std::string what = std::string(call) + " failed at " + file + ":" + std::to_string(line) + ": " +
                             cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
    if (e == cudaErrorMemoryAllocation) throw CudaOutOfMemory(e, what);
    throw CudaError(e, what);
  }
}

// cudaStreamQuery, except that "not ready" (which is not an error) is not left behind as the thread's
// last error, as the runtime may leave it: a poll loop would otherwise make the next launcher fail with
// cudaErrorNotReady. Any other error is returned and cleared, as throw_on_error does.
inline cudaError_t stream_query(cudaStream_t stream) noexcept {
  const cudaError_t q = cudaStreamQuery(stream);
  if (q == cudaErrorNotReady) {
    if (cudaPeekAtLastError() == cudaErrorNotReady) clear_last_error();
  } else if (q != cudaSuccess) {
    clear_last_error();
  }
  return q;
}
}  // namespace backend::cuda
}  // namespace moekit

// Convenience layer: throw on failure.
#ifndef MOEKIT_CUDA_CHECK
#define MOEKIT_CUDA_CHECK(call) ::moekit::backend::cuda::throw_on_error((call), #call, __FILE__, __LINE__)
#endif
// Launch layer: return the error to the caller (cleared from the thread's last error: it is the caller's now).
#ifndef MOEKIT_CUDA_RETURN_IF_ERROR
#define MOEKIT_CUDA_RETURN_IF_ERROR(call)                 \
  do {                                                    \
    const cudaError_t moekit_err_ = (call);               \
    if (moekit_err_ != cudaSuccess) {                     \
      ::moekit::backend::cuda::clear_last_error();        \
      return moekit_err_;                                 \
    }                                                     \
  } while (0)
#endif

// Kernels are templates with hidden visibility (as CUB's kernels): two shared objects that each
// instantiate one never resolve to the other's copy, which may be built for other architectures.
#ifndef MOEKIT_KERNEL
#define MOEKIT_KERNEL __global__ __attribute__((visibility("hidden")))
#endif

