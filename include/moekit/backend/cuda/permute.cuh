#pragma once
// Dropless permutation (DESIGN §6): the T*k (token, slot) pairs ordered stably by expert, so expert
// e's rows are [offsets[e], offsets[e+1]) in slot order (token-major, as the host backend). A stable
// LSD radix sort (CUB DeviceRadixSort::SortPairs, keys = expert id, values = slot index) is the
// stable counting sort; expert boundaries come from the sorted keys; row_of_slot is the inverse.
// gather_rows() copies x rows into expert-contiguous rows.
//
// NOT YET: capacity drops. The host keeps, per expert, the `capacity` highest-scoring slots; that
// needs a segmented sort by score and is not written. These functions are dropless only.
//
// Two-phase like CUB: call permute_slots with temp == nullptr to get temp_bytes, then again.
#include <cub/device/device_radix_sort.cuh>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <type_traits>

#include "moekit/backend/cuda/status.cuh"

namespace moekit::backend::cuda {
inline namespace MOEKIT_CUDA_ABI {

struct PermuteParams {
  const int* idx = nullptr;  // [T, k]: expert of each slot (from route_tokens)
  int tokens = 0, top_k = 0, experts = 0;
  int* slot_of_row = nullptr;  // [T*k] out: row r of the permuted layout holds slot slot_of_row[r]
  int* row_of_slot = nullptr;  // [T*k] out: inverse
  int* offsets = nullptr;      // [N_E + 1] out: expert e's rows are [offsets[e], offsets[e+1])
};

namespace detail {
inline std::size_t align256(std::size_t b) { return (b + 255) / 256 * 256; }
inline int key_bits(int experts) {
  int b = 1;
  while ((1 << b) < experts) ++b;
  return b;
}
}  // namespace detail

template <class I>
MOEKIT_KERNEL void iota_kernel(I* v, int n) {
  const int i = int(blockIdx.x) * int(blockDim.x) + int(threadIdx.x);
  if (i < n) v[i] = i;
}

// (Kernels are templates so that a header included by two TUs defines no symbol twice.)
// One thread per sorted row: writes the inverse map and the expert boundaries it crosses
// (empty experts included), so every offsets[e] is written exactly once.
template <class I>
MOEKIT_KERNEL void boundaries_kernel(const I* sorted_keys, const int* slot_of_row, int* row_of_slot, int* offsets,
                                     int n, int experts) {
  const int r = int(blockIdx.x) * int(blockDim.x) + int(threadIdx.x);
  if (r > n) return;
  const int prev = r == 0 ? -1 : sorted_keys[r - 1];
  const int cur = r == n ? experts : sorted_keys[r];
  for (int e = prev + 1; e <= cur; ++e) offsets[e] = r;
  if (r < n) row_of_slot[slot_of_row[r]] = r;
}

inline cudaError_t permute_slots(void* temp, std::size_t& temp_bytes, const PermuteParams& p, cudaStream_t stream) {
  if (p.tokens < 0 || p.top_k < 1 || p.experts < 1 || p.top_k > p.experts) return cudaErrorInvalidValue;
  const std::size_t n64 = std::size_t(p.tokens) * std::size_t(p.top_k);
  if (n64 > std::size_t(1) << 30) return cudaErrorInvalidValue;
  const int n = int(n64);
  std::size_t sort_bytes = 0;
  MOEKIT_CUDA_RETURN_IF_ERROR(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, static_cast<const int*>(nullptr),
                                                              static_cast<int*>(nullptr),
                                                              static_cast<const int*>(nullptr),
                                                              static_cast<int*>(nullptr), n, 0,
                                                              detail::key_bits(p.experts), stream));
  const std::size_t keys_bytes = detail::align256(sizeof(int) * (n64 ? n64 : 1));
  const std::size_t need = 2 * keys_bytes + detail::align256(sort_bytes);
  if (temp == nullptr) {
    temp_bytes = need;
    return cudaSuccess;
  }
  if (temp_bytes < need || !p.offsets || (n && (!p.idx || !p.slot_of_row || !p.row_of_slot)))
    return cudaErrorInvalidValue;
  char* w = static_cast<char*>(temp);
  int* sorted_keys = reinterpret_cast<int*>(w);
  int* slots_in = reinterpret_cast<int*>(w + keys_bytes);
  void* sort_temp = w + 2 * keys_bytes;
  constexpr int kBlock = 256;
  if (n > 0) {
    iota_kernel<int><<<(n + kBlock - 1) / kBlock, kBlock, 0, stream>>>(slots_in, n);
    MOEKIT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    MOEKIT_CUDA_RETURN_IF_ERROR(cub::DeviceRadixSort::SortPairs(sort_temp, sort_bytes, p.idx, sorted_keys, slots_in,
                                                                p.slot_of_row, n, 0, detail::key_bits(p.experts),
                                                                stream));
  }
  boundaries_kernel<int><<<(n + 1 + kBlock - 1) / kBlock, kBlock, 0, stream>>>(sorted_keys, p.slot_of_row, p.row_of_slot,
                                                                         p.offsets, n, p.experts);
  return cudaGetLastError();
}

// xp[r, :] = x[slot_of_row[r] / k, :] for r < rows. T is float or __nv_bfloat16 (copied as is).
template <class T>
MOEKIT_KERNEL void gather_rows_kernel(const T* x, const int* slot_of_row, T* xp, int rows, int top_k, int d) {
  const std::size_t n = std::size_t(rows) * std::size_t(d);
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const std::size_t r = i / std::size_t(d), c = i % std::size_t(d);
    xp[i] = x[std::size_t(slot_of_row[r] / top_k) * std::size_t(d) + c];
  }
}

template <class T>
cudaError_t gather_rows(const T* x, const int* slot_of_row, T* xp, int rows, int top_k, int d, cudaStream_t stream) {
  if (rows < 0 || d < 0 || top_k < 1 || (rows && d && (!x || !slot_of_row || !xp))) return cudaErrorInvalidValue;
  const std::size_t n = std::size_t(rows) * std::size_t(d);
  if (n == 0) return cudaSuccess;
  constexpr int kBlock = 256;
  const std::size_t want = (n + kBlock - 1) / kBlock;
  gather_rows_kernel<<<unsigned(want < 65535 * 8 ? want : 65535 * 8), kBlock, 0, stream>>>(x, slot_of_row, xp, rows,
                                                                                          top_k, d);
  return cudaGetLastError();
}

// Backward of gather_rows, by gather (no float atomics, deterministic):
//   dx[t, :] = Σ_j dxp[row_of_slot[t·k + j], :], summed in slot order in fp32.
template <class T>
MOEKIT_KERNEL void gather_rows_backward_kernel(const T* dxp, const int* row_of_slot, T* dx, int tokens, int top_k,
                                               int d) {
  const std::size_t n = std::size_t(tokens) * std::size_t(d);
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const std::size_t t = i / std::size_t(d), c = i % std::size_t(d);
    float acc = 0.f;
    for (int j = 0; j < top_k; ++j) {
      const T v = dxp[std::size_t(row_of_slot[t * std::size_t(top_k) + std::size_t(j)]) * std::size_t(d) + c];
      if constexpr (std::is_same_v<T, float>) acc += v;
      else acc += __bfloat162float(v);
    }
    if constexpr (std::is_same_v<T, float>) dx[i] = acc;
    else dx[i] = __float2bfloat16_rn(acc);
  }
}

template <class T>
cudaError_t gather_rows_backward(const T* dxp, const int* row_of_slot, T* dx, int tokens, int top_k, int d,
                                 cudaStream_t stream) {
  if (tokens < 0 || d < 0 || top_k < 1 || (tokens && d && (!dxp || !row_of_slot || !dx))) return cudaErrorInvalidValue;
  const std::size_t n = std::size_t(tokens) * std::size_t(d);
  if (n == 0) return cudaSuccess;
  constexpr int kBlock = 256;
  const std::size_t want = (n + kBlock - 1) / kBlock;
  gather_rows_backward_kernel<<<unsigned(want < 65535 * 8 ? want : 65535 * 8), kBlock, 0, stream>>>(
      dxp, row_of_slot, dx, tokens, top_k, d);
  return cudaGetLastError();
}

}  // inline namespace MOEKIT_CUDA_ABI
}  // namespace moekit::backend::cuda
