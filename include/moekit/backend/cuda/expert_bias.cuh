#pragma once
// The FFN experts' biases (experts::FfnOptions::ffn_bias, GPT-OSS) over expert-contiguous rows: expert
// e's rows are [off[e], off[e + 1]) (device int64, experts + 1 values).
//   add_expert_bias    y[r, col0 + j] += b[e(r)·bstride + j], j < n (after the GEMM that makes y)
//   expert_bias_grad   g[e·gstride + j] += Σ over e's rows of dy[r, col0 + j] (fp32 accumulation)
// The math in fp32 whatever the storage type. Each expert is one row of the grid (blockIdx.y), so no
// thread searches for its expert; the column sums read a block's columns together (coalesced).
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "moekit/backend/cuda/activation.cuh"  // load_f32, store_f32
#include "moekit/backend/cuda/status.cuh"

namespace moekit::backend::cuda {
inline namespace MOEKIT_CUDA_ABI {

template <class T, class B>
MOEKIT_KERNEL void add_expert_bias_kernel(T* y, int ld, int col0, int n, const std::int64_t* off, const B* b, int bstride) {
  const int e = int(blockIdx.y);
  const std::int64_t r0 = off[e], total = (off[e + 1] - r0) * n;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t r = r0 + i / n;
    const int j = int(i % n);
    const std::size_t at = std::size_t(r) * std::size_t(ld) + std::size_t(col0 + j);
    store_f32(y, at, load_f32(y, at) + load_f32(b, std::size_t(e) * std::size_t(bstride) + std::size_t(j)));
  }
}

template <class T>
MOEKIT_KERNEL void expert_bias_grad_kernel(const T* dy, int ld, int col0, int n, const std::int64_t* off, float* g, int gstride) {
  const int e = int(blockIdx.y), j = int(blockIdx.x) * int(blockDim.x) + int(threadIdx.x);
  if (j >= n) return;
  float s = 0.f;
  for (std::int64_t r = off[e]; r < off[e + 1]; ++r) s += load_f32(dy, std::size_t(r) * std::size_t(ld) + std::size_t(col0 + j));
  g[std::size_t(e) * std::size_t(gstride) + std::size_t(j)] += s;
}

// max_rows: the most rows any expert has (the host knows the offsets; it sizes the grid).
template <class T, class B>
cudaError_t add_expert_bias(T* y, int ld, int col0, int n, const std::int64_t* off, int experts, std::int64_t max_rows, const B* b,
                            int bstride, cudaStream_t stream) {
  if (experts == 0 || n == 0 || max_rows == 0) return cudaSuccess;
  if (!y || !off || !b || n < 0 || col0 < 0 || col0 + n > ld || experts < 0 || experts > 65535 || bstride < n)
    return cudaErrorInvalidValue;
  constexpr int kBlock = 256;
  const std::int64_t want = (max_rows * n + kBlock - 1) / kBlock;
  const dim3 grid(unsigned(want < 4096 ? want : 4096), unsigned(experts));
  add_expert_bias_kernel<<<grid, kBlock, 0, stream>>>(y, ld, col0, n, off, b, bstride);
  return cudaGetLastError();
}

template <class T>
cudaError_t expert_bias_grad(const T* dy, int ld, int col0, int n, const std::int64_t* off, int experts, float* g, int gstride,
                             cudaStream_t stream) {
  if (experts == 0 || n == 0) return cudaSuccess;
  if (!dy || !off || !g || n < 0 || col0 < 0 || col0 + n > ld || experts < 0 || experts > 65535 || gstride < n)
    return cudaErrorInvalidValue;
  constexpr int kBlock = 256;
  const dim3 grid(unsigned((n + kBlock - 1) / kBlock), unsigned(experts));
  expert_bias_grad_kernel<<<grid, kBlock, 0, stream>>>(dy, ld, col0, n, off, g, gstride);
  return cudaGetLastError();
}

}  // inline namespace MOEKIT_CUDA_ABI
}  // namespace moekit::backend::cuda
