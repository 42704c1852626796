#pragma once
// What the CUDA nn modules (nn/cuda/) share: the Context a call runs in (a stream and a cuBLAS handle),
// Blas (owns the handle), and DeviceTensor (a parameter on the device: values in the storage type, an
// fp32 gradient). The modules mirror the host ones in nn/ (same names, shapes, parameter names and
// initial values) with the activations they keep on the device; the host modules are their oracle
// (tests/gpu/test_cuda_nn.cu). T is a backend::Cuda<T> value type: float or moekit::bf16 (stored as
// __nv_bfloat16; GEMMs and reductions in fp32; gradients of parameters fp32).
//
// Convenience layer: calls throw (moekit::CudaError, moekit::CublasError, ShapeError) and enqueue work
// on ctx.stream without synchronising, unless they return a host value (a loss).
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <library_types.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "moekit/backend/cuda/grouped_gemm.cuh"  // CublasError, data_type, gemm_row_major
#include "moekit/backend/cuda/memory.cuh"
#include "moekit/backend/cuda/parameter_store.cuh"  // DeviceParameter
#include "moekit/core/bf16.hpp"
#include "moekit/core/error.hpp"

namespace moekit::nn::cuda {
inline namespace MOEKIT_CUDA_ABI {

namespace bc = moekit::backend::cuda;

struct Context {
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
};

// A cuBLAS handle (its stream is set per call from the Context).
class Blas {
 public:
  Blas() { MOEKIT_CUBLAS_CHECK(cublasCreate(&h_)); }
  ~Blas() { cublasDestroy(h_); }
  Blas(const Blas&) = delete;
  Blas& operator=(const Blas&) = delete;
  cublasHandle_t get() const { return h_; }

 private:
  cublasHandle_t h_ = nullptr;
};

inline void set_stream(const Context& ctx) {
  if (!ctx.blas) throw ShapeError("nn::cuda: the Context has no cuBLAS handle");
  MOEKIT_CUBLAS_CHECK(cublasSetStream(ctx.blas, ctx.stream));
}

// A parameter on the device: numel values of S and numel fp32 gradients (zeroed at construction).
template <class S>
class DeviceTensor {
 public:
  explicit DeviceTensor(std::vector<std::int64_t> shape) : shape_(std::move(shape)), n_(numel_of(shape_)) {
    value_.resize(std::size_t(n_));
    grad_.resize(std::size_t(n_));
    bc::fill_device(grad_.data(), 0, std::size_t(n_) * sizeof(float));
  }
  S* value() const { return value_.data(); }
  float* grad() const { return grad_.data(); }
  std::int64_t numel() const { return n_; }
  const std::vector<std::int64_t>& shape() const { return shape_; }

  void upload(const float* host) { bc::upload_as<S>(host, std::size_t(n_), value_.data()); }  // synchronous
  std::vector<float> download() const {  // synchronous (after the device is idle)
    std::vector<float> h(static_cast<std::size_t>(n_));
    MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
    bc::download_as<S>(value_.data(), std::size_t(n_), h.data());
    return h;
  }
  std::vector<float> download_grad() const {
    std::vector<float> h(static_cast<std::size_t>(n_));
    MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
    if (n_) MOEKIT_CUDA_CHECK(cudaMemcpy(h.data(), grad_.data(), h.size() * sizeof(float), cudaMemcpyDeviceToHost));
    return h;
  }
  void zero_grad(cudaStream_t s) {
    if (n_) MOEKIT_CUDA_CHECK(cudaMemsetAsync(grad_.data(), 0, std::size_t(n_) * sizeof(float), s));
  }
  DeviceParameter parameter(std::string name) const {
    return {std::move(name), value_.data(), grad_.data(), shape_, bc::data_type<S>(), ParamShard::kReplicated};
  }

 private:
  std::vector<std::int64_t> shape_;
  std::int64_t n_;
  bc::DeviceArray<S> value_;
  bc::DeviceArray<float> grad_;
};

// Grows a scratch array to at least n elements (contents discarded when it grows).
template <class U>
void grow(bc::DeviceArray<U>& a, std::int64_t n) {
  if (std::int64_t(a.size()) < n) a.resize(std::size_t(n));
}

}  // namespace MOEKIT_CUDA_ABI
}  // namespace moekit::nn::cuda
