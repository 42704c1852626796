#pragma once
// Expert-choice routing on the device (router/expert_choice.hpp; docs/design.md §2): the scores per token,
// each expert's C_e best tokens by one segmented sort, and the plan by token (SlotLayout::by_token) that
// dispatch, the experts and combine read. The host backend's expert_choice_select is the oracle.
//
//   scores     one thread per token: softmax p [T, N_E], lse, the non-finite check (a bad token's row of p
//              is 0, as on the host); sort keys per (expert, token): p's bits over ~t, so one 64-bit
//              descending sort orders each expert's tokens by score and ties by the lower token, with
//              no reliance on the sort's stability
//   sort       cub::DeviceSegmentedRadixSort, one segment per expert
//   mark       the first C_e tokens of segment e: taken[t, e] = 1
//   count/scan slots per token, exclusive sum: first [T + 1]
//   fill       one thread per token: its slots in expert order (expert, gate = c · p, token)
// The backward is the token-choice one over each token's own slots (router.cuh's route_by_token_backward).
#include <cub/device/device_scan.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>
#include <cuda_runtime.h>

#include <cstdint>

#include "moekit/backend/cuda/status.cuh"
#include "moekit/layer/routing_plan.hpp"
#include "moekit/router/expert_choice.hpp"

namespace moekit::backend::cuda {
inline namespace MOEKIT_CUDA_ABI {

struct ExpertChoiceParams {
  const float* logits = nullptr;  // [T, N_E]
  int tokens = 0, experts = 0, ffn_experts = 0;
  int cap_ffn = 0, cap_zc = 0;    // tokens each FFN / zero-computation expert takes (<= T)
  float scale = 1.f;              // the routed scaling factor
  float* prob = nullptr;          // [T, N_E] out
  float* lse = nullptr;           // [T] out
  int* bad_token = nullptr;       // [1] out: the lowest token with a non-finite logit, or kNoBadToken
  int* counts = nullptr;          // [N_E] out: tokens each expert took
  // The plan, out: first [T + 1], token_of / idx / gate [Σ C_e].
  int *first = nullptr, *token_of = nullptr, *idx = nullptr;
  float* gate = nullptr;
  // Workspace: keys [2, N_E·T] (64-bit), taken [T·N_E], count [T + 1], offsets [N_E + 1]; and CUB's.
  unsigned long long* keys = nullptr;
  int *taken = nullptr, *count = nullptr, *offsets = nullptr;
};

template <class I>
MOEKIT_KERNEL void ec_scores_kernel(ExpertChoiceParams p) {
  const int t = int(blockIdx.x) * int(blockDim.x) + int(threadIdx.x);
  if (t >= p.tokens) return;
  const std::size_t n = std::size_t(p.experts);
  const float* l = p.logits + t * n;
  float* pr = p.prob + t * n;
  bool finite = true;
  for (std::size_t i = 0; i < n; ++i) finite = finite && isfinite(l[i]);
  if (finite) {
    p.lse[t] = router::token_scores(router::Softmax{}, l, p.experts, pr);
  } else {
    atomicMin(p.bad_token, t);
    for (std::size_t i = 0; i < n; ++i) pr[i] = 0.f;
    p.lse[t] = 0.f;
  }
  for (std::size_t e = 0; e < n; ++e)  // p >= 0: its bits order as unsigned; ~t puts the lower token first
    p.keys[e * std::size_t(p.tokens) + t] = (static_cast<unsigned long long>(__float_as_uint(pr[e])) << 32) | (~static_cast<unsigned>(t));
}

template <class I>
MOEKIT_KERNEL void ec_offsets_kernel(int* offsets, int experts, int tokens, int* counts, int ffn_experts, int cap_ffn, int cap_zc) {
  const int e = int(blockIdx.x) * int(blockDim.x) + int(threadIdx.x);
  if (e <= experts) offsets[e] = e * tokens;
  if (e < experts) counts[e] = e < ffn_experts ? cap_ffn : cap_zc;
}

// taken[t, e] = 1 for the first C_e of expert e's sorted tokens.
template <class I>
MOEKIT_KERNEL void ec_mark_kernel(const unsigned long long* sorted, int tokens, int experts, int ffn_experts, int cap_ffn, int cap_zc,
                                  int* taken) {
  const std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= std::int64_t(tokens) * experts) return;
  const int e = int(i / tokens), r = int(i % tokens);
  if (r >= (e < ffn_experts ? cap_ffn : cap_zc)) return;
  const int t = int(~static_cast<unsigned>(sorted[i] & 0xffffffffull));
  taken[std::size_t(t) * experts + e] = 1;
}

template <class I>
MOEKIT_KERNEL void ec_count_kernel(const int* taken, int tokens, int experts, int* count) {
  const int t = int(blockIdx.x) * int(blockDim.x) + int(threadIdx.x);
  if (t > tokens) return;
  int c = 0;
  if (t < tokens)
    for (int e = 0; e < experts; ++e) c += taken[std::size_t(t) * experts + e];
  count[t] = c;  // count[T] = 0: the scan's total lands in first[T]
}

template <class I>
MOEKIT_KERNEL void ec_fill_kernel(ExpertChoiceParams p) {
  const int t = int(blockIdx.x) * int(blockDim.x) + int(threadIdx.x);
  if (t >= p.tokens) return;
  const std::size_t n = std::size_t(p.experts);
  int s = p.first[t];
  for (int e = 0; e < p.experts; ++e)
    if (p.taken[t * n + e]) {
      p.idx[s] = e, p.token_of[s] = t, p.gate[s] = p.scale * p.prob[t * n + e];
      ++s;
    }
}

// CUB's temporary bytes for T tokens and N_E experts (the larger of the sort's and the scan's).
inline cudaError_t expert_choice_temp_bytes(int tokens, int experts, std::size_t& bytes) {
  std::size_t sort = 0, scan = 0;
  const int n = tokens * experts;
  MOEKIT_CUDA_RETURN_IF_ERROR(cub::DeviceSegmentedRadixSort::SortKeysDescending(
      nullptr, sort, static_cast<const unsigned long long*>(nullptr), static_cast<unsigned long long*>(nullptr), n, experts,
      static_cast<const int*>(nullptr), static_cast<const int*>(nullptr), 0, 64, nullptr));
  MOEKIT_CUDA_RETURN_IF_ERROR(cub::DeviceScan::ExclusiveSum(nullptr, scan, static_cast<const int*>(nullptr), static_cast<int*>(nullptr),
                                                            tokens + 1, nullptr));
  bytes = sort > scan ? sort : scan;
  return cudaSuccess;
}

// Forward: p's arrays as above; temp: expert_choice_temp_bytes of device memory.
inline cudaError_t expert_choice_route(const ExpertChoiceParams& p, void* temp, std::size_t temp_bytes, cudaStream_t stream) {
  if (p.tokens < 0 || p.experts < 1 || p.ffn_experts < 0 || p.ffn_experts > p.experts || p.cap_ffn < 0 || p.cap_zc < 0 ||
      p.cap_ffn > p.tokens || p.cap_zc > p.tokens || std::int64_t(p.tokens) * p.experts > INT32_MAX || !p.logits || !p.prob ||
      !p.lse || !p.bad_token || !p.counts || !p.first || !p.keys || !p.taken || !p.count || !p.offsets)
    return cudaErrorInvalidValue;
  constexpr int kBlock = 128;
  const int T = p.tokens, N = p.experts, n = T * N;
  MOEKIT_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(p.bad_token, 0x7F, sizeof(int), stream));
  ec_offsets_kernel<int><<<unsigned((N + 1 + kBlock - 1) / kBlock), kBlock, 0, stream>>>(p.offsets, N, T, p.counts, p.ffn_experts,
                                                                                        p.cap_ffn, p.cap_zc);
  MOEKIT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (T == 0) return cudaMemsetAsync(p.first, 0, sizeof(int), stream);
  ec_scores_kernel<int><<<unsigned((T + kBlock - 1) / kBlock), kBlock, 0, stream>>>(p);
  MOEKIT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  unsigned long long* sorted = p.keys + std::size_t(n);
  std::size_t bytes = temp_bytes;
  MOEKIT_CUDA_RETURN_IF_ERROR(cub::DeviceSegmentedRadixSort::SortKeysDescending(temp, bytes, p.keys, sorted, n, N, p.offsets,
                                                                                p.offsets + 1, 0, 64, stream));
  MOEKIT_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(p.taken, 0, sizeof(int) * std::size_t(n), stream));
  ec_mark_kernel<int><<<unsigned((n + 255) / 256), 256, 0, stream>>>(sorted, T, N, p.ffn_experts, p.cap_ffn, p.cap_zc, p.taken);
  MOEKIT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  ec_count_kernel<int><<<unsigned((T + 1 + kBlock - 1) / kBlock), kBlock, 0, stream>>>(p.taken, T, N, p.count);
  MOEKIT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  bytes = temp_bytes;
  MOEKIT_CUDA_RETURN_IF_ERROR(cub::DeviceScan::ExclusiveSum(temp, bytes, p.count, p.first, T + 1, stream));
  ec_fill_kernel<int><<<unsigned((T + kBlock - 1) / kBlock), kBlock, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // inline namespace MOEKIT_CUDA_ABI
}  // namespace moekit::backend::cuda
