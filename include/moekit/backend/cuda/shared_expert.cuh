#pragma once
// The shared experts' element-wise work (experts/shared.hpp; their GEMMs are layer_ops.cuh's) and the
// second stream they run on, overlapping the routed path (docs/design.md §3):
//   shared_gate_forward  σ_t = sigmoid(w_sg · x_t)                        (one warp per token)
//   add_shared_rows      y[t, :] += σ_t · ys[t, :] (σ_t = 1 without a gate)
//   shared_rows_backward dys[t, :] = σ_t · dy[t, :]; with a gate dz_t = (dy_t · ys_t) σ_t (1 − σ_t)
//   shared_gate_grad     g[c] += Σ_t dz_t x[t, c]                          (token order: deterministic)
//   add_shared_dx        dx[t, c] += dxs[t, c] (+ dz_t w_sg[c])            (dx fp32, as token_backward's)
// The math in fp32 whatever the storage type.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "moekit/backend/cuda/activation.cuh"     // load_f32, store_f32
#include "moekit/backend/cuda/grouped_gemm.cuh"  // MOEKIT_CUBLAS_CHECK
#include "moekit/backend/cuda/status.cuh"

namespace moekit::backend::cuda {
inline namespace MOEKIT_CUDA_ABI {

namespace shared_detail {
constexpr int kWarpsPerBlock = 8;
__device__ inline float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
inline unsigned token_blocks(int tokens) { return unsigned((tokens + kWarpsPerBlock - 1) / kWarpsPerBlock); }
inline unsigned element_blocks(std::int64_t n) {
  const std::int64_t b = (n + 255) / 256;
  return unsigned(b < 4096 ? b : 4096);
}
}  // namespace shared_detail

template <class S>
MOEKIT_KERNEL void shared_gate_forward_kernel(const S* x, const S* w, float* sig, int tokens, int d) {
  const int t = int(blockIdx.x) * shared_detail::kWarpsPerBlock + int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  if (t >= tokens) return;
  float z = 0.f;
  for (int c = lane; c < d; c += 32) z += load_f32(x, std::size_t(t) * std::size_t(d) + std::size_t(c)) * load_f32(w, std::size_t(c));
  z = shared_detail::warp_sum(z);
  if (lane == 0) sig[t] = 1.f / (1.f + expf(-z));
}

template <class S>
MOEKIT_KERNEL void add_shared_rows_kernel(S* y, const S* ys, const float* sig, int d, std::int64_t n) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += std::int64_t(gridDim.x) * blockDim.x) {
    const float s = sig ? sig[i / d] : 1.f;
    store_f32(y, std::size_t(i), load_f32(y, std::size_t(i)) + s * load_f32(ys, std::size_t(i)));
  }
}

template <class S>
MOEKIT_KERNEL void shared_rows_backward_kernel(const S* dy, const S* ys, const float* sig, S* dys, float* dz, int tokens, int d) {
  const int t = int(blockIdx.x) * shared_detail::kWarpsPerBlock + int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  if (t >= tokens) return;
  const float s = sig ? sig[t] : 1.f;
  float ds = 0.f;
  for (int c = lane; c < d; c += 32) {
    const std::size_t at = std::size_t(t) * std::size_t(d) + std::size_t(c);
    const float g = load_f32(dy, at);
    if (sig) ds += g * load_f32(ys, at);
    store_f32(dys, at, s * g);
  }
  ds = shared_detail::warp_sum(ds);
  if (lane == 0 && dz) dz[t] = ds * s * (1.f - s);
}

template <class S>
MOEKIT_KERNEL void shared_gate_grad_kernel(const float* dz, const S* x, float* g, int tokens, int d) {
  const int c = int(blockIdx.x) * int(blockDim.x) + int(threadIdx.x);
  if (c >= d) return;
  float s = 0.f;
  for (int t = 0; t < tokens; ++t) s += dz[t] * load_f32(x, std::size_t(t) * std::size_t(d) + std::size_t(c));
  g[c] += s;
}

template <class S>
MOEKIT_KERNEL void add_shared_dx_kernel(float* dx, const S* dxs, const float* dz, const S* w, int d, std::int64_t n) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += std::int64_t(gridDim.x) * blockDim.x) {
    float v = load_f32(dxs, std::size_t(i));
    if (dz) v += dz[i / d] * load_f32(w, std::size_t(i % d));
    dx[i] += v;
  }
}

template <class S>
cudaError_t shared_gate_forward(const S* x, const S* w, float* sig, int tokens, int d, cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  if (!x || !w || !sig || tokens < 0 || d <= 0) return cudaErrorInvalidValue;
  shared_gate_forward_kernel<<<shared_detail::token_blocks(tokens), 32 * shared_detail::kWarpsPerBlock, 0, stream>>>(x, w, sig, tokens, d);
  return cudaGetLastError();
}
// sig null: σ = 1.
template <class S>
cudaError_t add_shared_rows(S* y, const S* ys, const float* sig, int tokens, int d, cudaStream_t stream) {
  const std::int64_t n = std::int64_t(tokens) * d;
  if (n == 0) return cudaSuccess;
  if (!y || !ys || tokens < 0 || d <= 0) return cudaErrorInvalidValue;
  add_shared_rows_kernel<<<shared_detail::element_blocks(n), 256, 0, stream>>>(y, ys, sig, d, n);
  return cudaGetLastError();
}
// sig null: σ = 1 and no dz (dz may then be null too).
template <class S>
cudaError_t shared_rows_backward(const S* dy, const S* ys, const float* sig, S* dys, float* dz, int tokens, int d, cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  if (!dy || !dys || (sig && (!ys || !dz)) || tokens < 0 || d <= 0) return cudaErrorInvalidValue;
  shared_rows_backward_kernel<<<shared_detail::token_blocks(tokens), 32 * shared_detail::kWarpsPerBlock, 0, stream>>>(
      dy, ys, sig, dys, sig ? dz : nullptr, tokens, d);
  return cudaGetLastError();
}
template <class S>
cudaError_t shared_gate_grad(const float* dz, const S* x, float* g, int tokens, int d, cudaStream_t stream) {
  if (tokens == 0 || d == 0) return cudaSuccess;
  if (!dz || !x || !g || tokens < 0 || d < 0) return cudaErrorInvalidValue;
  shared_gate_grad_kernel<<<unsigned((d + 255) / 256), 256, 0, stream>>>(dz, x, g, tokens, d);
  return cudaGetLastError();
}
// dz and w null: no gate.
template <class S>
cudaError_t add_shared_dx(float* dx, const S* dxs, const float* dz, const S* w, int tokens, int d, cudaStream_t stream) {
  const std::int64_t n = std::int64_t(tokens) * d;
  if (n == 0) return cudaSuccess;
  if (!dx || !dxs || (!dz) != (!w) || tokens < 0 || d <= 0) return cudaErrorInvalidValue;
  add_shared_dx_kernel<<<shared_detail::element_blocks(n), 256, 0, stream>>>(dx, dxs, dz, w, d, n);
  return cudaGetLastError();
}

// A second stream with its own cuBLAS handle: fork() makes it wait for what the main stream has
// enqueued so far, join() makes the main stream wait for what it has enqueued. Created once, with
// the layer; nothing here allocates later.
class SideStream {
 public:
  SideStream() {
    try {
      MOEKIT_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
      MOEKIT_CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
      MOEKIT_CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
      MOEKIT_CUBLAS_CHECK(cublasCreate(&handle_));
      MOEKIT_CUBLAS_CHECK(cublasSetStream(handle_, stream_));
    } catch (...) {
      release();
      throw;
    }
  }
  SideStream(const SideStream&) = delete;
  SideStream& operator=(const SideStream&) = delete;
  ~SideStream() { release(); }

  cudaStream_t stream() const { return stream_; }
  cublasHandle_t handle() const { return handle_; }
  void fork(cudaStream_t main) {
    MOEKIT_CUDA_CHECK(cudaEventRecord(ready_, main));
    MOEKIT_CUDA_CHECK(cudaStreamWaitEvent(stream_, ready_, 0));
  }
  void join(cudaStream_t main) {
    MOEKIT_CUDA_CHECK(cudaEventRecord(done_, stream_));
    MOEKIT_CUDA_CHECK(cudaStreamWaitEvent(main, done_, 0));
  }

 private:
  void release() noexcept {
    if (handle_) cublasDestroy(handle_), handle_ = nullptr;
    if (done_) cudaEventDestroy(done_), done_ = nullptr;
    if (ready_) cudaEventDestroy(ready_), ready_ = nullptr;
    if (stream_) cudaStreamDestroy(stream_), stream_ = nullptr;
  }
  cudaStream_t stream_ = nullptr;
  cudaEvent_t ready_ = nullptr, done_ = nullptr;
  cublasHandle_t handle_ = nullptr;
};

}  // inline namespace MOEKIT_CUDA_ABI
}  // namespace moekit::backend::cuda
