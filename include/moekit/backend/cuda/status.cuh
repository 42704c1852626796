#pragma once
// CUDA error handling. Launch-layer functions return cudaError_t (as CUB does); the convenience
// layer turns a failure into moekit::CudaError naming the call, the place and cudaGetErrorString.
#include <cuda_runtime.h>

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

// Kernels and their launchers live in an inline namespace named after the architectures this TU is
// built for (nvcc's __CUDA_ARCH_LIST__, e.g. 800,900 -> sm_800_900), as CUB does: TUs built for
// different architectures never share a kernel symbol by accident. Callers name
// moekit::backend::cuda::f as usual.
#define MOEKIT_CAT2_(a, b) a##b
#define MOEKIT_CAT_(a, b) MOEKIT_CAT2_(a, b)
#define MOEKIT_NARGS_I_(a1, a2, a3, a4, a5, a6, a7, a8, N, ...) N
#define MOEKIT_NARGS_(...) MOEKIT_NARGS_I_(__VA_ARGS__, 8, 7, 6, 5, 4, 3, 2, 1, 0)
#define MOEKIT_ARCH_1(a) MOEKIT_CAT_(_, a)
#define MOEKIT_ARCH_2(a, b) MOEKIT_CAT_(MOEKIT_ARCH_1(a), MOEKIT_ARCH_1(b))
#define MOEKIT_ARCH_3(a, ...) MOEKIT_CAT_(MOEKIT_ARCH_1(a), MOEKIT_ARCH_2(__VA_ARGS__))
#define MOEKIT_ARCH_4(a, ...) MOEKIT_CAT_(MOEKIT_ARCH_1(a), MOEKIT_ARCH_3(__VA_ARGS__))
#define MOEKIT_ARCH_5(a, ...) MOEKIT_CAT_(MOEKIT_ARCH_1(a), MOEKIT_ARCH_4(__VA_ARGS__))
#define MOEKIT_ARCH_6(a, ...) MOEKIT_CAT_(MOEKIT_ARCH_1(a), MOEKIT_ARCH_5(__VA_ARGS__))
#define MOEKIT_ARCH_7(a, ...) MOEKIT_CAT_(MOEKIT_ARCH_1(a), MOEKIT_ARCH_6(__VA_ARGS__))
#define MOEKIT_ARCH_8(a, ...) MOEKIT_CAT_(MOEKIT_ARCH_1(a), MOEKIT_ARCH_7(__VA_ARGS__))
#define MOEKIT_ARCHS_(...) MOEKIT_CAT_(MOEKIT_ARCH_, MOEKIT_NARGS_(__VA_ARGS__))(__VA_ARGS__)
#ifndef MOEKIT_CUDA_ABI
#ifdef __CUDA_ARCH_LIST__
#define MOEKIT_CUDA_ABI MOEKIT_CAT_(sm, MOEKIT_ARCHS_(__CUDA_ARCH_LIST__))
#else
#define MOEKIT_CUDA_ABI sm_unknown
#endif
#endif
