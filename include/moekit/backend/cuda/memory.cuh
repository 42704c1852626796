#pragma once
// Owning device and pinned-host arrays for the convenience layer (the layer that allocates), and host
// conversions between float and the storage types. Destructors never throw.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "moekit/backend/cuda/status.cuh"
#include "moekit/core/bf16.hpp"

namespace moekit::backend::cuda {
inline namespace MOEKIT_CUDA_ABI {

// The device storage type of a backend::Cuda<T> value type: float, or __nv_bfloat16 for moekit::bf16.
template <class T>
using storage_t = std::conditional_t<std::is_same_v<T, float>, float, __nv_bfloat16>;

namespace testing {
// Test hook (tests/gpu): the allocation functions below fail with cudaErrorMemoryAllocation, without
// asking CUDA, once this many more have succeeded; negative: never (the default). It injects an
// out-of-memory where a real one would be slow or unsafe to provoke (hundreds of GiB of pinned host
// memory can stall a machine before it fails). One host thread at a time.
inline int& allocations_before_failure() noexcept {
  static int n = -1;
  return n;
}
inline bool inject_allocation_failure() noexcept {
  int& n = allocations_before_failure();
  if (n < 0) return false;
  if (n == 0) return true;
  --n;
  return false;
}
}  // namespace testing

// cudaMalloc and cudaMallocHost for every allocation of the library (so that the hook above reaches them).
inline cudaError_t device_malloc(void** p, std::size_t bytes) noexcept {
  if (testing::inject_allocation_failure()) return cudaErrorMemoryAllocation;
  return cudaMalloc(p, bytes);
}
inline cudaError_t pinned_malloc(void** p, std::size_t bytes) noexcept {
  if (testing::inject_allocation_failure()) return cudaErrorMemoryAllocation;
  return cudaMallocHost(p, bytes);
}

// Owns n elements of device memory (Pinned = false) or page-locked host memory (Pinned = true).
template <class T, bool Pinned = false>
class CudaArray {
 public:
  CudaArray() = default;
  explicit CudaArray(std::size_t n) { resize(n); }
  CudaArray(const CudaArray&) = delete;
  CudaArray& operator=(const CudaArray&) = delete;
  CudaArray(CudaArray&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  CudaArray& operator=(CudaArray&& o) noexcept {
    if (this != &o) {
      release(std::exchange(p_, std::exchange(o.p_, nullptr)));
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }
  ~CudaArray() { release(std::exchange(p_, nullptr)); }
  void resize(std::size_t n) {  // discards the contents; on a failure the array is empty
    if (n == n_) return;
    release(std::exchange(p_, nullptr));
    n_ = 0;
    if (n) {
      void* q = nullptr;
      if constexpr (Pinned) MOEKIT_CUDA_CHECK(pinned_malloc(&q, n * sizeof(T)));
      else MOEKIT_CUDA_CHECK(device_malloc(&q, n * sizeof(T)));
      p_ = static_cast<T*>(q);
    }
    n_ = n;
  }
  T* data() const { return p_; }
  std::size_t size() const { return n_; }

 private:
  static void release(T* p) {
    if constexpr (Pinned) cudaFreeHost(p);
    else cudaFree(p);
  }
  T* p_ = nullptr;
  std::size_t n_ = 0;
};
template <class T>
using DeviceArray = CudaArray<T, false>;
template <class T>
using PinnedArray = CudaArray<T, true>;

// Host conversions (round to nearest even for bf16, as __float2bfloat16_rn).
template <class S>
S storage_from_float(float f) {
  if constexpr (std::is_same_v<S, float>) {
    return f;
  } else {
    __nv_bfloat16_raw r;
    r.x = moekit::bf16::from_float(f);
    return S(r);
  }
}
template <class S>
float storage_to_float(S v) {
  if constexpr (std::is_same_v<S, float>) {
    return v;
  } else {
    const __nv_bfloat16_raw r(v);
    return moekit::bf16::to_float(r.x);
  }
}

// Setup writes (constructors, load_weights, reserve, uploads; not the hot path), ordered with every
// stream: the device is idle first (work in flight on the caller's stream may still read the memory),
// the write is then finished before they return. A layer runs on the caller's stream, often created
// cudaStreamNonBlocking, which does not wait for the legacy default stream; and a plain cudaMemcpy from
// pageable memory may return before its DMA lands, a plain cudaMemset before it runs.
inline void copy_to_device(void* dst, const void* src, std::size_t bytes) {
  if (bytes == 0) return;
  MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
  MOEKIT_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, cudaStreamPerThread));
  MOEKIT_CUDA_CHECK(cudaStreamSynchronize(cudaStreamPerThread));
}
inline void fill_device(void* dst, int byte, std::size_t bytes) {
  if (bytes == 0) return;
  MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
  MOEKIT_CUDA_CHECK(cudaMemsetAsync(dst, byte, bytes, cudaStreamPerThread));
  MOEKIT_CUDA_CHECK(cudaStreamSynchronize(cudaStreamPerThread));
}

// Synchronous copies with conversion (setup and test paths, not the hot path).
template <class S>
void upload_as(const float* src, std::size_t n, S* dst) {
  if (n == 0) return;
  std::vector<S> h(n);
  for (std::size_t i = 0; i < n; ++i) h[i] = storage_from_float<S>(src[i]);
  copy_to_device(dst, h.data(), n * sizeof(S));
}
template <class S>
void download_as(const S* src, std::size_t n, float* dst) {  // after the device is idle (any stream)
  if (n == 0) return;
  std::vector<S> h(n);
  MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
  MOEKIT_CUDA_CHECK(cudaMemcpy(h.data(), src, n * sizeof(S), cudaMemcpyDeviceToHost));
  for (std::size_t i = 0; i < n; ++i) dst[i] = storage_to_float(h[i]);
}

}  // inline namespace MOEKIT_CUDA_ABI
}  // namespace moekit::backend::cuda
