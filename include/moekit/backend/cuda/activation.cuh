#pragma once
// Fused expert activations (docs/design.md §6) over expert rows [rows, d_expert]: a = act(h1[, h3]) and its
// backward (dh1[, dh3] from da). Storage is float or __nv_bfloat16; the math is fp32 and is
// experts/activation.hpp's, shared with the host backend.
//
// Layers: activation_forward / activation_backward validate and launch (return cudaError_t);
// elementwise_kernel is a thin __global__ shim; ActForwardOp / ActBackwardOp are device functors.
// h3 / dh3 are read / written only for gated activations (SwiGLU); they may be null otherwise.
// h1/h3/dh1/dh3 rows may be strided (ldh >= d): the layer keeps W1 x and W3 x side by side in one
// [rows, 2·d_expert] buffer (one GEMM for both), so h3 = h1 + d_expert and ldh = 2·d_expert. The
// backward may run in place (dh1 == h1, dh3 == h3): each element is read before it is written, by the
// same thread.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "moekit/backend/cuda/status.cuh"
#include "moekit/experts/activation.hpp"

namespace moekit::backend::cuda {
inline namespace MOEKIT_CUDA_ABI {

template <class T>
__device__ __forceinline__ float load_f32(const T* p, std::size_t i) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(p[i]);
  else return float(p[i]);
}
template <class T>
__device__ __forceinline__ void store_f32(T* p, std::size_t i, float v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) p[i] = __float2bfloat16_rn(v);
  else p[i] = v;
}

// V consecutive elements at p + i (16-byte loads and stores when V = 16 / sizeof(T); the caller checks
// alignment: see vec_width()).
template <class T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};
template <int V, class T>
__device__ __forceinline__ void load_vec(const T* p, std::size_t i, float (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = load_f32(p, i);
  } else {
    const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p + i);
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = load_f32(pk.v, std::size_t(j));
  }
}
template <int V, class T>
__device__ __forceinline__ void store_vec(T* p, std::size_t i, const float (&in)[V]) {
  if constexpr (V == 1) {
    store_f32(p, i, in[0]);
  } else {
    Pack<T, V> pk;
#pragma unroll
    for (int j = 0; j < V; ++j) store_f32(pk.v, std::size_t(j), in[j]);
    *reinterpret_cast<Pack<T, V>*>(p + i) = pk;
  }
}
// 16 / sizeof(T) when every row of width d starts 16-byte aligned from these base pointers, else 1.
template <class T, class... P>
inline int vec_width(int d, const P*... ptrs) {
  constexpr int v = int(16 / sizeof(T));
  const bool aligned = ((reinterpret_cast<std::uintptr_t>(ptrs) % 16 == 0) && ...);
  return (d % v == 0 && aligned) ? v : 1;
}

// dst[i] = src[i] converted (float <-> __nv_bfloat16, RNE), for i < n.
template <class S, class D>
MOEKIT_KERNEL void convert_kernel(const S* src, D* dst, std::size_t n) {
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) store_f32(dst, i, load_f32(src, i));
}
template <class S, class D>
cudaError_t convert(const S* src, D* dst, std::size_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (!src || !dst) return cudaErrorInvalidValue;
  const std::size_t want = (n + 255) / 256;
  convert_kernel<<<unsigned(want < 65535 * 8 ? want : 65535 * 8), 256, 0, stream>>>(src, dst, n);
  return cudaGetLastError();
}

template <class Act>
inline constexpr bool is_gated_v = Act::gated;

template <class T>
struct ActParams {
  const T* h1 = nullptr;  // [rows, d]
  const T* h3 = nullptr;  // [rows, d], gated only
  const T* da = nullptr;  // [rows, d], backward only
  T* a = nullptr;         // [rows, d] out (forward)
  T* dh1 = nullptr;       // [rows, d] out (backward)
  T* dh3 = nullptr;       // [rows, d] out (backward, gated only)
  std::size_t n = 0;      // rows * d
  std::size_t d = 1;      // columns
  std::size_t ldh = 1;    // row stride of h1, h3, dh1, dh3 (a and da are contiguous)
};

template <class T>
__device__ __forceinline__ std::size_t h_index(const ActParams<T>& p, std::size_t i) {
  return p.ldh == p.d ? i : (i / p.d) * p.ldh + i % p.d;
}

// The activation is a value (its options: GPT-OSS's alpha and limit), copied into the kernel's parameters.
template <class Act>
struct ActForwardOp {
  Act act;
  template <class T>
  __device__ void operator()(const ActParams<T>& p, std::size_t i) const {
    const std::size_t h = h_index(p, i);
    const float h3 = is_gated_v<Act> ? load_f32(p.h3, h) : 0.f;
    store_f32(p.a, i, act.apply(load_f32(p.h1, h), h3));
  }
};

template <class Act>
struct ActBackwardOp {
  Act act;
  template <class T>
  __device__ void operator()(const ActParams<T>& p, std::size_t i) const {
    const std::size_t h = h_index(p, i);
    const float h3 = is_gated_v<Act> ? load_f32(p.h3, h) : 0.f;
    float g1 = 0.f, g3 = 0.f;
    act.backward(load_f32(p.h1, h), h3, load_f32(p.da, i), g1, g3);
    store_f32(p.dh1, h, g1);
    if constexpr (is_gated_v<Act>) store_f32(p.dh3, h, g3);
  }
};

// Grid-stride loop: any n with a bounded grid.
template <class Op, class T>
MOEKIT_KERNEL void elementwise_kernel(Op op, ActParams<T> p) {
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride) op(p, i);
}

template <class Op, class T>
cudaError_t launch_elementwise(const Op& op, const ActParams<T>& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  constexpr int kBlock = 256;
  const std::size_t want = (p.n + kBlock - 1) / kBlock;
  const unsigned grid = unsigned(want < 65535 * 8 ? want : 65535 * 8);
  elementwise_kernel<Op><<<grid, kBlock, 0, stream>>>(op, p);
  return cudaGetLastError();
}

// a = act(h1, h3) over rows * d elements; ldh = 0 means d (contiguous h).
template <class Act, class T>
cudaError_t activation_forward(const T* h1, const T* h3, T* a, int rows, int d, cudaStream_t stream, int ldh = 0, const Act& act = Act{}) {
  if (ldh == 0) ldh = d;
  if (rows < 0 || d < 0 || ldh < d || (rows && d && (!h1 || !a || (is_gated_v<Act> && !h3)))) return cudaErrorInvalidValue;
  ActParams<T> p;
  p.h1 = h1, p.h3 = h3, p.a = a, p.n = std::size_t(rows) * std::size_t(d);
  p.d = std::size_t(d ? d : 1), p.ldh = std::size_t(ldh ? ldh : 1);
  return launch_elementwise(ActForwardOp<Act>{act}, p, stream);
}

// dh1 (and dh3 if gated) from da. Recomputes from h1/h3 (the activation output is not needed).
template <class Act, class T>
cudaError_t activation_backward(const T* h1, const T* h3, const T* da, T* dh1, T* dh3, int rows, int d,
                                cudaStream_t stream, int ldh = 0, const Act& act = Act{}) {
  if (ldh == 0) ldh = d;
  if (rows < 0 || d < 0 || ldh < d ||
      (rows && d && (!h1 || !da || !dh1 || (is_gated_v<Act> && (!h3 || !dh3)))))
    return cudaErrorInvalidValue;
  ActParams<T> p;
  p.h1 = h1, p.h3 = h3, p.da = da, p.dh1 = dh1, p.dh3 = dh3, p.n = std::size_t(rows) * std::size_t(d);
  p.d = std::size_t(d ? d : 1), p.ldh = std::size_t(ldh ? ldh : 1);
  return launch_elementwise(ActBackwardOp<Act>{act}, p, stream);
}

}  // inline namespace MOEKIT_CUDA_ABI
}  // namespace moekit::backend::cuda
