#pragma once
// Permutation (docs/design.md §4, §6): the S slots of a routing plan (layer/routing_plan.hpp's SlotLayout: T·k
// (token, pick) pairs for the token-choice routers) ordered stably by expert, so FFN expert e's rows
// are [offsets[e], offsets[e+1]) in slot order (token-major, as the host backend). A stable LSD
// radix sort (CUB DeviceRadixSort::SortPairs, keys = expert id, values = slot index) is the stable
// counting sort; expert boundaries come from the sorted keys; row_of_slot is the inverse.
//
// Capacity (cap_ffn / cap_zc >= 0): each expert keeps its `cap` highest-scoring slots, ties to the
// earlier slot, as the host backend. Two more stable sorts give that order: by score descending, then
// by expert; a slot's rank inside its expert's segment decides. Zero-computation experts (ids >=
// ffn_experts) and dropped slots get no row: their key is the sentinel ffn_experts, so they sort
// after every FFN row, and row_of_slot says why (kDroppedSlot, kZeroComputationSlot). With chunks > 1
// the rows are chunk-major (token chunk, then expert) and the sentinel is chunks·ffn_experts.
// gather_rows() copies x rows into expert-contiguous rows.
//
// Two-phase like CUB: call permute_slots with temp == nullptr to get temp_bytes, then again.
#include <cub/device/device_radix_sort.cuh>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "moekit/backend/cuda/status.cuh"
#include "moekit/layer/routing_plan.hpp"

namespace moekit::backend::cuda {
inline namespace MOEKIT_CUDA_ABI {

inline constexpr int kDroppedSlot = kSlotDropped;                  // layer/routing_plan.hpp's sentinels
inline constexpr int kZeroComputationSlot = kSlotZeroComputation;

struct PermuteParams {
  const int* idx = nullptr;  // [S]: expert of each slot (from route_tokens)
  SlotLayout slots;          // tokens, S, and each slot's token (for its chunk)
  int experts = 0;
  int ffn_experts = 0;            // experts below this id get rows; 0 means all `experts`
  const float* score = nullptr;   // [S] router score of each slot (needed when a capacity is set)
  int cap_ffn = -1, cap_zc = -1;  // slots each FFN / zero-computation expert keeps; -1 = no limit
  int chunks = 1;                 // rows chunk-major: token chunk c = [T·c/C, T·(c+1)/C), then expert
  int* slot_of_row = nullptr;  // [S] out: row r of the permuted layout holds slot slot_of_row[r]
  int* row_of_slot = nullptr;  // [S] out: inverse (or kDroppedSlot / kZeroComputationSlot)
  int* offsets = nullptr;      // [chunks·ffn_experts + 1] out: (chunk c, expert e)'s rows are
                               // [offsets[c·F + e], offsets[c·F + e + 1])
  int* kept_counts = nullptr;  // [experts] out, optional: slots each expert kept after capacity
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
// One thread per sorted row: writes the expert boundaries it crosses (empty experts included), so
// every offsets[e] is written exactly once; with slot_of_row, also the inverse map (sentinel rows get
// the reason they have no row).
template <class I>
MOEKIT_KERNEL void boundaries_kernel(const I* sorted_keys, const int* slot_of_row, const unsigned char* keep,
                                     int* row_of_slot, int* offsets, int n, int experts) {
  const int r = int(blockIdx.x) * int(blockDim.x) + int(threadIdx.x);
  if (r > n) return;
  const int prev = r == 0 ? -1 : sorted_keys[r - 1];
  const int cur = r == n ? experts : sorted_keys[r];
  for (int e = prev + 1; e <= cur; ++e) offsets[e] = r;
  if (r < n && row_of_slot) {
    const int s = slot_of_row[r];
    row_of_slot[s] = cur < experts ? r : (keep == nullptr || keep[s]) ? kZeroComputationSlot : kDroppedSlot;
  }
}

// keys[r] = idx[slot[r]]: the expert of each slot in score order.
template <class I>
MOEKIT_KERNEL void expert_of_kernel(const I* idx, const int* slot, I* keys, int n) {
  const int r = int(blockIdx.x) * int(blockDim.x) + int(threadIdx.x);
  if (r < n) keys[r] = idx[slot[r]];
}

// Rank of each slot inside its expert's segment (score-descending order) against the capacity.
template <class I>
MOEKIT_KERNEL void capacity_keep_kernel(const I* sorted_experts, const int* sorted_slots, const int* segment, int n,
                                        int ffn_experts, int cap_ffn, int cap_zc, unsigned char* keep) {
  const int r = int(blockIdx.x) * int(blockDim.x) + int(threadIdx.x);
  if (r >= n) return;
  const int e = sorted_experts[r];
  const int cap = e < ffn_experts ? cap_ffn : cap_zc;
  keep[sorted_slots[r]] = (cap < 0 || r - segment[e] < cap) ? 1 : 0;
}

// Sort key of each slot: chunk·F + its FFN expert, or the sentinel chunks·F (no row); counts kept slots.
// Token t is in chunk c = ceil((t+1)·C/T) - 1, i.e. T·c/C <= t < T·(c+1)/C (parallel/dispatch_plan.hpp).
template <class I>
MOEKIT_KERNEL void row_key_kernel(const I* idx, const unsigned char* keep, SlotLayout slots, int ffn_experts, int chunks,
                                  I* key, int* kept_counts) {
  const int s = int(blockIdx.x) * int(blockDim.x) + int(threadIdx.x);
  if (s >= slots.slots) return;
  const int e = idx[s];
  const bool kept = keep == nullptr || keep[s];
  const long long t = slots.token(s), tokens = slots.tokens;
  const int c = chunks == 1 ? 0 : int(((t + 1) * chunks + tokens - 1) / tokens - 1);
  key[s] = (kept && e < ffn_experts) ? c * ffn_experts + e : chunks * ffn_experts;
  if (kept && kept_counts) atomicAdd(&kept_counts[e], 1);  // integer atomics: exact, order-free
}

namespace detail {
struct PermuteLayout {  // the temp buffer, carved in 256-byte-aligned pieces
  std::size_t ints = 0, segment = 0, keep = 0, sort = 0, total = 0;
};
inline cudaError_t permute_layout(const PermuteParams& p, int n, PermuteLayout& l, cudaStream_t stream) {
  std::size_t by_expert = 0, by_score = 0, by_row = 0;
  const int ffn = p.ffn_experts > 0 ? p.ffn_experts : p.experts;
  MOEKIT_CUDA_RETURN_IF_ERROR(cub::DeviceRadixSort::SortPairs(nullptr, by_expert, static_cast<const int*>(nullptr),
                                                              static_cast<int*>(nullptr), static_cast<const int*>(nullptr),
                                                              static_cast<int*>(nullptr), n, 0, key_bits(p.experts), stream));
  MOEKIT_CUDA_RETURN_IF_ERROR(cub::DeviceRadixSort::SortPairsDescending(
      nullptr, by_score, static_cast<const float*>(nullptr), static_cast<float*>(nullptr), static_cast<const int*>(nullptr),
      static_cast<int*>(nullptr), n, 0, int(8 * sizeof(float)), stream));
  MOEKIT_CUDA_RETURN_IF_ERROR(cub::DeviceRadixSort::SortPairs(nullptr, by_row, static_cast<const int*>(nullptr),
                                                              static_cast<int*>(nullptr), static_cast<const int*>(nullptr),
                                                              static_cast<int*>(nullptr), n, 0,
                                                              key_bits(p.chunks * ffn + 1), stream));
  std::size_t sort = by_row > by_expert ? by_row : by_expert;
  sort = sort > by_score ? sort : by_score;
  l.ints = align256(sizeof(int) * std::size_t(n > 0 ? n : 1));
  l.segment = align256(sizeof(int) * std::size_t(p.experts + 1));
  l.keep = align256(std::size_t(n > 0 ? n : 1));
  l.sort = align256(sort);
  l.total = 6 * l.ints + l.segment + l.keep + l.sort;
  return cudaSuccess;
}
}  // namespace detail

inline cudaError_t permute_slots(void* temp, std::size_t& temp_bytes, const PermuteParams& p, cudaStream_t stream) {
  const int ffn = p.ffn_experts > 0 ? p.ffn_experts : p.experts;
  if (!p.slots.valid() || p.experts < 1 || p.slots.per_token > p.experts || ffn > p.experts || p.chunks < 1 ||
      std::int64_t(p.chunks) * ffn >= (std::int64_t(1) << 30) || p.slots.slots > (1 << 30))
    return cudaErrorInvalidValue;
  const int rows_keys = p.chunks * ffn;  // sort keys below this have a row
  const int n = p.slots.slots;
  detail::PermuteLayout l;
  MOEKIT_CUDA_RETURN_IF_ERROR(detail::permute_layout(p, n, l, stream));
  if (temp == nullptr) {
    temp_bytes = l.total;
    return cudaSuccess;
  }
  const bool capacity = p.cap_ffn >= 0 || p.cap_zc >= 0;
  if (temp_bytes < l.total || !p.offsets || (n && (!p.idx || !p.slot_of_row || !p.row_of_slot)) ||
      (capacity && n && !p.score))
    return cudaErrorInvalidValue;
  char* w = static_cast<char*>(temp);
  int* ints[6];
  for (int i = 0; i < 6; ++i) ints[i] = reinterpret_cast<int*>(w + std::size_t(i) * l.ints);
  int* segment = reinterpret_cast<int*>(w + 6 * l.ints);
  unsigned char* keep = reinterpret_cast<unsigned char*>(w + 6 * l.ints + l.segment);
  void* sort_temp = w + 6 * l.ints + l.segment + l.keep;
  std::size_t sort_bytes = l.sort;
  constexpr int kBlock = 256;
  const unsigned grid = unsigned((n + kBlock - 1) / kBlock);
  if (p.kept_counts) MOEKIT_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(p.kept_counts, 0, sizeof(int) * std::size_t(p.experts), stream));
  if (capacity && n > 0) {
    // Slots by score (descending, stable: equal scores keep slot order), then stably by expert.
    float* sorted_score = reinterpret_cast<float*>(ints[0]);
    int *slots = ints[1], *by_score = ints[2], *experts_in = ints[3], *experts_out = ints[4], *by_expert = ints[5];
    iota_kernel<int><<<grid, kBlock, 0, stream>>>(slots, n);
    MOEKIT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    MOEKIT_CUDA_RETURN_IF_ERROR(cub::DeviceRadixSort::SortPairsDescending(sort_temp, sort_bytes, p.score, sorted_score, slots,
                                                                          by_score, n, 0, int(8 * sizeof(float)), stream));
    expert_of_kernel<int><<<grid, kBlock, 0, stream>>>(p.idx, by_score, experts_in, n);
    MOEKIT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    MOEKIT_CUDA_RETURN_IF_ERROR(cub::DeviceRadixSort::SortPairs(sort_temp, sort_bytes, experts_in, experts_out, by_score,
                                                                by_expert, n, 0, detail::key_bits(p.experts), stream));
    boundaries_kernel<int><<<unsigned((n + 1 + kBlock - 1) / kBlock), kBlock, 0, stream>>>(
        experts_out, nullptr, nullptr, nullptr, segment, n, p.experts);
    MOEKIT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    capacity_keep_kernel<int><<<grid, kBlock, 0, stream>>>(experts_out, by_expert, segment, n, ffn, p.cap_ffn, p.cap_zc,
                                                           keep);
    MOEKIT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  int *key = ints[0], *sorted_keys = ints[1], *slots_in = ints[2];
  const unsigned char* keep_or_all = capacity ? keep : nullptr;
  if (n > 0) {
    row_key_kernel<int><<<grid, kBlock, 0, stream>>>(p.idx, keep_or_all, p.slots, ffn, p.chunks, key, p.kept_counts);
    MOEKIT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    iota_kernel<int><<<grid, kBlock, 0, stream>>>(slots_in, n);
    MOEKIT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    MOEKIT_CUDA_RETURN_IF_ERROR(cub::DeviceRadixSort::SortPairs(sort_temp, sort_bytes, key, sorted_keys, slots_in,
                                                                p.slot_of_row, n, 0, detail::key_bits(rows_keys + 1), stream));
  }
  boundaries_kernel<int><<<unsigned((n + 1 + kBlock - 1) / kBlock), kBlock, 0, stream>>>(
      sorted_keys, p.slot_of_row, keep_or_all, p.row_of_slot, p.offsets, n, rows_keys);
  return cudaGetLastError();
}

// xp[r, :] = x[token of slot_of_row[r], :] for r < rows. T is float or __nv_bfloat16 (copied as is).
// num_rows (device, optional) bounds the rows further: the layer passes the total FFN rows (the last offset), which only the
// device knows before the forward's one synchronisation.
template <class T, int V>
MOEKIT_KERNEL void gather_rows_kernel(const T* x, const int* slot_of_row, T* xp, int rows, SlotLayout slots, int d,
                                      const int* num_rows) {
  if (num_rows && *num_rows < rows) rows = *num_rows;
  using P = std::conditional_t<V == 1, T, uint4>;  // 16-byte copies when rows are aligned
  const std::size_t w = std::size_t(d) * sizeof(T) / sizeof(P), n = std::size_t(rows) * w;
  const P* src = reinterpret_cast<const P*>(x);
  P* dst = reinterpret_cast<P*>(xp);
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const std::size_t r = i / w, c = i % w;
    dst[i] = src[std::size_t(slots.token(slot_of_row[r])) * w + c];
  }
}

template <class T>
cudaError_t gather_rows(const T* x, const int* slot_of_row, T* xp, int rows, const SlotLayout& slots, int d,
                        cudaStream_t stream, const int* num_rows = nullptr) {
  if (rows < 0 || d < 0 || !slots.valid() || (rows && d && (!x || !slot_of_row || !xp))) return cudaErrorInvalidValue;
  const std::size_t bytes = std::size_t(rows) * std::size_t(d) * sizeof(T);
  if (bytes == 0) return cudaSuccess;
  const bool vec = (std::size_t(d) * sizeof(T)) % 16 == 0 && reinterpret_cast<std::uintptr_t>(x) % 16 == 0 &&
                   reinterpret_cast<std::uintptr_t>(xp) % 16 == 0;
  constexpr int kBlock = 256;
  const std::size_t want = (vec ? bytes / 16 : bytes / sizeof(T)) / kBlock + 1;
  const unsigned grid = unsigned(want < 65535 * 8 ? want : 65535 * 8);
  if (vec) gather_rows_kernel<T, 16><<<grid, kBlock, 0, stream>>>(x, slot_of_row, xp, rows, slots, d, num_rows);
  else gather_rows_kernel<T, 1><<<grid, kBlock, 0, stream>>>(x, slot_of_row, xp, rows, slots, d, num_rows);
  return cudaGetLastError();
}
// The token-choice form: slots s = t·k + j.
template <class T>
cudaError_t gather_rows(const T* x, const int* slot_of_row, T* xp, int rows, int top_k, int d, cudaStream_t stream,
                        const int* num_rows = nullptr) {
  if (top_k < 1) return cudaErrorInvalidValue;
  return gather_rows(x, slot_of_row, xp, rows, SlotLayout::token_choice(rows / top_k, top_k), d, stream, num_rows);
}

// The backward of gather_rows (dx by gather, deterministic) is token_backward() in combine.cuh, which
// also adds the zero-computation experts' terms; gather_rows_backward() there is its plain form.

}  // inline namespace MOEKIT_CUDA_ABI
}  // namespace moekit::backend::cuda
