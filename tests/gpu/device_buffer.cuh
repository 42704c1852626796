#pragma once
// Test-only RAII device buffer shared by the GPU tests: poison (0xFF: NaN for floats, -1 for ints)
// before a launch so an unwritten element fails, upload, download.
// poison and upload are finished before they return (backend/cuda/memory.cuh's fill_device and
// copy_to_device): the code under test often runs on a cudaStreamNonBlocking stream, which does not
// wait for the legacy default stream that a plain cudaMemset or cudaMemcpy would use. download first
// waits for the given stream (the one the code under test ran on), then for the whole device.
#include <cuda_runtime.h>

#include <cstddef>
#include <stdexcept>
#include <moekit/backend/cuda/memory.cuh>
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
  void poison() { moekit::backend::cuda::fill_device(p, 0xFF, sizeof(T) * n); }
  void upload(const std::vector<T>& v) {
    if (v.size() < n) throw std::logic_error("DeviceBuffer::upload: fewer host elements than the buffer holds");
    moekit::backend::cuda::copy_to_device(p, v.data(), sizeof(T) * n);
  }
  std::vector<T> download(cudaStream_t stream = nullptr) const {
    if (stream) MOEKIT_CUDA_CHECK(cudaStreamSynchronize(stream));
    MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<T> v(n);
    if (n) MOEKIT_CUDA_CHECK(cudaMemcpy(v.data(), p, sizeof(T) * n, cudaMemcpyDeviceToHost));
    return v;
  }
};
