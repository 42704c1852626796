#pragma once
// Optimizer kernels over flat device buffers: AdamW with train/adamw.hpp's order of operations (fp32
// moments and arithmetic; the values in the storage type, stepped through an fp32 master copy when
// one is given, so bf16 values do not lose the updates smaller than their rounding), and the sum of squares of fp32 gradients in
// double with a fixed reduction order (per-block partial sums, then one block adds them in block
// order), so the gradient norm is the same bits on every run. Launchers return cudaError_t.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "moekit/backend/cuda/activation.cuh"  // load_f32, store_f32
#include "moekit/backend/cuda/status.cuh"

namespace moekit::backend::cuda {
inline namespace MOEKIT_CUDA_ABI {

// The scalars of one AdamW step (computed on the host in double, rounded to fp32 as the host's).
struct AdamWStep {
  float shrink = 1.f;     // 1 - lr · weight_decay (or 1 without decay)
  float step_size = 0.f;  // lr / (1 - beta1^t)
  float bc2_sqrt = 1.f;   // sqrt(1 - beta2^t)
  float one_minus_b1 = 0.1f, b2 = 0.999f, one_minus_b2 = 0.001f, eps = 1e-8f;
};

template <class S>
MOEKIT_KERNEL void adamw_kernel(S* value, float* master, const float* grad, float* m, float* v, std::int64_t n, AdamWStep a) {
  for (std::int64_t j = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += std::int64_t(gridDim.x) * blockDim.x) {
    float p = (master ? master[j] : load_f32(value, std::size_t(j))) * a.shrink;
    const float g = grad[j];
    const float mj = m[j] + a.one_minus_b1 * (g - m[j]);
    const float vj = a.b2 * v[j] + a.one_minus_b2 * g * g;
    p -= a.step_size * mj / (sqrtf(vj) / a.bc2_sqrt + a.eps);
    m[j] = mj, v[j] = vj;
    if (master) master[j] = p;
    store_f32(value, std::size_t(j), p);  // rounded once, from the master
  }
}

// master: null, or n fp32 values the step reads and writes instead of `value` (then value = master, rounded).
template <class S>
cudaError_t adamw_update(S* value, float* master, const float* grad, float* m, float* v, std::int64_t n, const AdamWStep& a,
                         cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (!value || !grad || !m || !v || n < 0) return cudaErrorInvalidValue;
  const std::int64_t blocks = (n + 255) / 256;
  adamw_kernel<S><<<unsigned(blocks < 65535 ? blocks : 65535), 256, 0, stream>>>(value, master, grad, m, v, n, a);
  return cudaGetLastError();
}
template <class S>
cudaError_t adamw_update(S* value, const float* grad, float* m, float* v, std::int64_t n, const AdamWStep& a, cudaStream_t stream) {
  return adamw_update(value, static_cast<float*>(nullptr), grad, m, v, n, a, stream);
}

inline constexpr int kSquareBlocks = 256;  // partial sums of one sum_of_squares call

// partial[b] = Σ g² over the elements block b strides over (each thread in index order, then the
// block's threads in a fixed tree).
template <class G>
MOEKIT_KERNEL void square_partials_kernel(const G* g, std::int64_t n, double* partial) {
  __shared__ double s[256];
  double acc = 0.0;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += std::int64_t(gridDim.x) * blockDim.x)
    acc += double(g[i]) * double(g[i]);
  s[threadIdx.x] = acc;
  __syncthreads();
  for (unsigned w = blockDim.x / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) s[threadIdx.x] += s[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = s[0];
}
// out[0] (+)= Σ partial in block order (one thread: kSquareBlocks values).
template <class D>
MOEKIT_KERNEL void add_partials_kernel(const D* partial, int count, D* out, bool accumulate) {
  double s = 0.0;
  for (int b = 0; b < count; ++b) s += partial[b];
  out[0] = accumulate ? out[0] + s : s;
}

// *out (+)= Σ g[i]² in double; partial: kSquareBlocks doubles of scratch.
inline cudaError_t sum_of_squares(const float* g, std::int64_t n, double* partial, double* out, bool accumulate, cudaStream_t stream) {
  if (!partial || !out || n < 0 || (n && !g)) return cudaErrorInvalidValue;
  if (n > 0) square_partials_kernel<float><<<kSquareBlocks, 256, 0, stream>>>(g, n, partial);
  else MOEKIT_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(partial, 0, sizeof(double) * kSquareBlocks, stream));
  add_partials_kernel<double><<<1, 1, 0, stream>>>(partial, kSquareBlocks, out, accumulate);
  return cudaGetLastError();
}

template <class G>
MOEKIT_KERNEL void scale_f32_kernel(G* v, std::int64_t n, double factor) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += std::int64_t(gridDim.x) * blockDim.x)
    v[i] = G(double(v[i]) * factor);
}
// v *= factor, each product in double and rounded once (as train::detail::scale_to).
inline cudaError_t scale_grads(float* v, std::int64_t n, double factor, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (!v || n < 0) return cudaErrorInvalidValue;
  const std::int64_t blocks = (n + 255) / 256;
  scale_f32_kernel<float><<<unsigned(blocks < 65535 ? blocks : 65535), 256, 0, stream>>>(v, n, factor);
  return cudaGetLastError();
}

}  // namespace MOEKIT_CUDA_ABI
}  // namespace moekit::backend::cuda
