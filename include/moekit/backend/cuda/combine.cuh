#pragma once
// Un-permute + gate-weighted combine by gather (DESIGN §6), dropless, routed FFN experts only:
//   out[t, :] = Σ_j gate[t, j] · y[row_of_slot[t·k + j], :]
// One thread per output element sums its k terms in slot order: no float atomics, deterministic.
// Backward, also by gather:
//   dy[r, :]  = gate[s] · dout[s / k, :]           (s = slot_of_row[r])
//   dgate[s]  = Σ_c dout[s / k, c] · y[row_of_slot[s], c]   (one warp per slot, fixed order)
// Storage T is float or __nv_bfloat16; accumulation is fp32.
//
// NOT YET: Zero / Copy / Constant (MoE++) expert slots and capacity-dropped slots (row -1). The
// launch functions reject nothing about them; callers must pass a dropless, FFN-only routing.
#include <cuda_runtime.h>

#include <cstddef>

#include "moekit/backend/cuda/activation.cuh"  // load_f32 / store_f32
#include "moekit/backend/cuda/status.cuh"

namespace moekit::backend::cuda {
inline namespace MOEKIT_CUDA_ABI {

template <class T>
MOEKIT_KERNEL void combine_kernel(const T* y, const float* gate, const int* row_of_slot, T* out, int tokens,
                                  int top_k, int d) {
  const std::size_t n = std::size_t(tokens) * std::size_t(d);
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const std::size_t t = i / std::size_t(d), c = i % std::size_t(d);
    float acc = 0.f;
    for (int j = 0; j < top_k; ++j) {
      const std::size_t s = t * std::size_t(top_k) + std::size_t(j);
      acc += gate[s] * load_f32(y, std::size_t(row_of_slot[s]) * std::size_t(d) + c);
    }
    store_f32(out, i, acc);
  }
}

template <class T>
MOEKIT_KERNEL void combine_dy_kernel(const T* dout, const float* gate, const int* slot_of_row, T* dy, int rows,
                                     int top_k, int d) {
  const std::size_t n = std::size_t(rows) * std::size_t(d);
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const std::size_t r = i / std::size_t(d), c = i % std::size_t(d);
    const int s = slot_of_row[r];
    store_f32(dy, i, gate[s] * load_f32(dout, std::size_t(s / top_k) * std::size_t(d) + c));
  }
}

// One warp per slot; lanes stride over d, then a fixed butterfly: the same order every run.
template <class T>
MOEKIT_KERNEL void combine_dgate_kernel(const T* dout, const T* y, const int* row_of_slot, float* dgate, int slots,
                                        int top_k, int d) {
  const int warp = int((std::size_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32), lane = int(threadIdx.x % 32);
  if (warp >= slots) return;
  const std::size_t xo = std::size_t(warp / top_k) * std::size_t(d), yo = std::size_t(row_of_slot[warp]) * std::size_t(d);
  float acc = 0.f;
  for (int c = lane; c < d; c += 32) acc += load_f32(dout, xo + std::size_t(c)) * load_f32(y, yo + std::size_t(c));
  for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) dgate[warp] = acc;
}

namespace detail {
inline unsigned grid_for(std::size_t n, int block) {
  const std::size_t want = (n + std::size_t(block) - 1) / std::size_t(block);
  return unsigned(want < 65535 * 8 ? want : 65535 * 8);
}
}  // namespace detail

// out [T, d] from y [T·k, d] (permuted rows), gate [T, k], row_of_slot [T·k].
template <class T>
cudaError_t combine(const T* y, const float* gate, const int* row_of_slot, T* out, int tokens, int top_k, int d,
                    cudaStream_t stream) {
  if (tokens < 0 || top_k < 1 || d < 0 || (tokens && d && (!y || !gate || !row_of_slot || !out)))
    return cudaErrorInvalidValue;
  const std::size_t n = std::size_t(tokens) * std::size_t(d);
  if (n == 0) return cudaSuccess;
  combine_kernel<<<detail::grid_for(n, 256), 256, 0, stream>>>(y, gate, row_of_slot, out, tokens, top_k, d);
  return cudaGetLastError();
}

// dy [T·k, d] (permuted rows) and dgate [T, k] from dout [T, d].
template <class T>
cudaError_t combine_backward(const T* dout, const T* y, const float* gate, const int* slot_of_row,
                             const int* row_of_slot, T* dy, float* dgate, int tokens, int top_k, int d,
                             cudaStream_t stream) {
  if (tokens < 0 || top_k < 1 || d < 0 ||
      (tokens && (!dout || !y || !gate || !slot_of_row || !row_of_slot || !dy || !dgate)))
    return cudaErrorInvalidValue;
  const int slots = tokens * top_k;
  if (slots == 0) return cudaSuccess;
  const std::size_t n = std::size_t(slots) * std::size_t(d);
  if (n) {
    combine_dy_kernel<<<detail::grid_for(n, 256), 256, 0, stream>>>(dout, gate, slot_of_row, dy, slots, top_k, d);
    MOEKIT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  combine_dgate_kernel<<<unsigned((std::size_t(slots) * 32 + 255) / 256), 256, 0, stream>>>(dout, y, row_of_slot,
                                                                                             dgate, slots, top_k, d);
  return cudaGetLastError();
}

}  // inline namespace MOEKIT_CUDA_ABI
}  // namespace moekit::backend::cuda
