#pragma once
// Test-only RAII device buffer shared by the GPU tests: poison (0xFF: NaN for floats, -1 for ints)
// before a launch so an unwritten element fails, upload, download.
#include <cuda_runtime.h>

#include <cstddef>
#include <moekit/backend/cuda/status.cuh>
#include <vector>

template <class T>
struct DeviceBuffer {
  T* p = nullptr;
  std::size_t n = 0;
  explicit DeviceBuffer(std::size_t count) : n(count) { MOEKIT_CUDA_CHECK(cudaMalloc(&p, sizeof(T) * (n ? n : 1))); }
  ~DeviceBuffer() { cudaFree(p); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void poison() { MOEKIT_CUDA_CHECK(cudaMemset(p, 0xFF, sizeof(T) * n)); }
  void upload(const std::vector<T>& v) { MOEKIT_CUDA_CHECK(cudaMemcpy(p, v.data(), sizeof(T) * n, cudaMemcpyHostToDevice)); }
  std::vector<T> download() const {
    std::vector<T> v(n);
    MOEKIT_CUDA_CHECK(cudaMemcpy(v.data(), p, sizeof(T) * n, cudaMemcpyDeviceToHost));
    return v;
  }
};
