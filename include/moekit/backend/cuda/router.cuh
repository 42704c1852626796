#pragma once
// Fused router kernels (docs/design.md §6): from fp32 logits [T, N_E] (the router GEMM, and the gating
// residual's prev·W_g^T, are cuBLAS GEMMs before this) to softmax or sigmoid, top-k (ties to the
// lower index), gates, probabilities for the LBL, the logsumexp for the z-loss and per-expert routed
// counts, in one pass over the logits. The math is router/topk.hpp's, shared with the host backend,
// so both backends compute the same function.
//
// Layers: route_tokens() validates and launches (returns cudaError_t); token_kernel is a thin
// __global__ shim; RouteTokenOp / RouteTokenBackwardOp are the device functors.
// One thread per token: N_E up to a few hundred fits in registers and L1; a warp-per-token variant
// for large N_E is future work once a device can measure both.
#include <cub/device/device_scan.cuh>
#include <cuda_runtime.h>

#include "moekit/backend/cuda/status.cuh"
#include "moekit/layer/routing_plan.hpp"
#include "moekit/router/policy.hpp"

namespace moekit::backend::cuda {
inline namespace MOEKIT_CUDA_ABI {

struct RouteParams {
  const float* logits = nullptr;  // [T, N_E]
  int tokens = 0, experts = 0, top_k = 0;  // top_k: the router's k
  float* sel = nullptr;    // [T, N_E] scratch: the selection scores
  float* prob = nullptr;   // [T, N_E] out: P of the balance loss
  int* idx = nullptr;      // [T, k]   out
  float* gate = nullptr;   // [T, k]   out
  float* lse = nullptr;    // [T]      out
  int* counts = nullptr;   // [N_E]    out: routed (pre-capacity) slots per expert
  int* bad_token = nullptr;  // [1] optional out: lowest token with a non-finite logit (kNoBadToken if none)
  const float* state = nullptr;  // [N_E] a stateful router's values (router::BiasBalanced: the biases), else null
};

using ::moekit::kNoBadToken;  // layer/routing_plan.hpp: what cudaMemset(0x7F) writes

struct RouteBackwardParams {
  const float* logits = nullptr;  // [T, N_E]
  const float* prob = nullptr;    // [T, N_E] from forward
  const int* idx = nullptr;       // [T, k]
  const float* gate = nullptr;    // [T, k]
  const float* dgate = nullptr;   // [T, k]
  const float* dprob = nullptr;   // [N_E]: d(aux)/d(prob_ti), the same for every token; or [T / dprob_tokens, N_E]
  int dprob_tokens = 0;           // > 0: the sequence scope, row t / dprob_tokens for token t
  const float* lse = nullptr;     // [T]
  float zscale = 0.f;             // zloss_coef * 2 / T (times aux_scale); d/d(lse_t) = zscale * lse_t
  int tokens = 0, experts = 0, top_k = 0;
  float* scratch = nullptr;  // [T, N_E] workspace
  float* dlogits = nullptr;  // [T, N_E] out
};

// The router policy object (its options by value) runs in the kernels: route_token_choice calls its
// selection, outermost wrapper first (router/policy.hpp).
template <class Router>
struct RouteTokenOp {
  Router router;
  __device__ void operator()(const RouteParams& p, int t) const {
    const std::size_t n = std::size_t(p.experts), k = std::size_t(p.top_k);
    int* idx = p.idx + t * k;
    if (p.bad_token) {
      bool finite = true;
      for (std::size_t i = 0; i < n; ++i) finite = finite && isfinite(p.logits[t * n + i]);
      if (!finite) atomicMin(p.bad_token, t);
    }
    p.lse[t] = router::route_token_choice(router, p.logits + t * n, p.experts, p.prob + t * n, p.sel + t * n, idx,
                                          p.gate + t * k, p.state);
    // Integer atomics: exact and order-free, so counts are deterministic.
    for (int j = 0; j < p.top_k; ++j) atomicAdd(&p.counts[idx[j]], 1);
  }
};

template <class Router>
struct RouteTokenBackwardOp {
  Router router;
  __device__ void operator()(const RouteBackwardParams& p, int t) const {
    const std::size_t n = std::size_t(p.experts), k = std::size_t(p.top_k);
    router::route_token_choice_backward(router, p.logits + t * n, p.experts, p.prob + t * n, p.idx + t * k, p.gate + t * k,
                                        p.dgate + t * k, p.dprob + (p.dprob_tokens > 0 ? std::size_t(t / p.dprob_tokens) * n : 0),
                                        p.zscale * p.lse[t], p.scratch + t * n, p.dlogits + t * n);
  }
};

template <class Op, class Params>
MOEKIT_KERNEL void token_kernel(Op op, Params p) {
  const int t = int(blockIdx.x) * int(blockDim.x) + int(threadIdx.x);
  if (t < p.tokens) op(p, t);
}

inline bool valid_shape(int tokens, int experts, int top_k) {
  return tokens >= 0 && experts > 0 && top_k >= 1 && top_k <= experts;
}

template <class Op, class Params>
cudaError_t launch_per_token(const Op& op, const Params& p, cudaStream_t stream) {
  if (p.tokens == 0) return cudaSuccess;
  constexpr int kBlock = 128;
  token_kernel<Op, Params><<<(p.tokens + kBlock - 1) / kBlock, kBlock, 0, stream>>>(op, p);
  return cudaGetLastError();
}

// Forward: zeroes counts (and sets bad_token to kNoBadToken), then one pass over the logits. router: a
// router policy object (router/policy.hpp: router::TopK<Softmax|Sigmoid> and its wrappers) whose k is
// p.top_k; the kernels call its selection, gates and capacity score.
template <class Router>
cudaError_t route_tokens(const Router& router, const RouteParams& p, cudaStream_t stream) {
  if (!valid_shape(p.tokens, p.experts, p.top_k) || router.k != p.top_k || !p.logits || !p.sel || !p.prob || !p.idx ||
      !p.gate || !p.lse || !p.counts)
    return cudaErrorInvalidValue;
  MOEKIT_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(p.counts, 0, sizeof(int) * std::size_t(p.experts), stream));
  if (p.bad_token) MOEKIT_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(p.bad_token, 0x7F, sizeof(int), stream));
  return launch_per_token(RouteTokenOp<Router>{router}, p, stream);
}

// Workspace of the backward: scratch [T, N_E] floats.
inline std::size_t route_tokens_backward_workspace(int tokens, int experts) {
  return sizeof(float) * std::size_t(tokens) * std::size_t(experts);
}

template <class Router>
cudaError_t route_tokens_backward(const Router& router, const RouteBackwardParams& p, cudaStream_t stream) {
  if (!valid_shape(p.tokens, p.experts, p.top_k) || router.k != p.top_k || !p.logits || !p.prob || !p.idx || !p.gate ||
      !p.dgate || !p.dprob || !p.lse || !p.scratch || !p.dlogits)
    return cudaErrorInvalidValue;
  return launch_per_token(RouteTokenBackwardOp<Router>{router}, p, stream);
}

// ---- plans by token (expert choice, router replay): a token's slots [first[t], first[t + 1]) -------------

// Router replay (router/replay.hpp): count[t] = the record's experts of token t (its -1 slots left out),
// count[T] = 0, for the exclusive scan that makes first.
template <class I>
MOEKIT_KERNEL void replay_count_kernel(const int* record, int tokens, int top_k, int* count) {
  const int t = int(blockIdx.x) * int(blockDim.x) + int(threadIdx.x);
  if (t > tokens) return;
  int c = 0;
  if (t < tokens)
    for (int j = 0; j < top_k; ++j) c += record[std::size_t(t) * top_k + j] >= 0;
  count[t] = c;
}

struct ReplayParams {
  RouteParams route;               // logits, tokens, experts, top_k, prob, gate, lse, counts, bad_token; idx by token
  const int* record = nullptr;     // [T, k], -1: no expert
  const int* first = nullptr;      // [T + 1], from the scan
  int* token_of = nullptr;         // [slots] out
  int tokens = 0;                  // (launch_per_token reads it)
};

template <class Router>
struct RouteReplayOp {
  Router router;
  __device__ void operator()(const ReplayParams& q, int t) const {
    const RouteParams& p = q.route;
    const std::size_t n = std::size_t(p.experts);
    if (p.bad_token) {
      bool finite = true;
      for (std::size_t i = 0; i < n; ++i) finite = finite && isfinite(p.logits[t * n + i]);
      if (!finite) atomicMin(p.bad_token, t);
    }
    int s = q.first[t];
    const int s0 = s;
    for (int j = 0; j < p.top_k; ++j)
      if (const int e = q.record[std::size_t(t) * p.top_k + j]; e >= 0) p.idx[s] = e, q.token_of[s] = t, ++s;
    p.lse[t] = router::route_token_replay(router, p.logits + t * n, p.experts, p.idx + s0, s - s0, p.prob + t * n, p.idx + s0, p.gate + s0);
    for (int i = s0; i < s; ++i) atomicAdd(&p.counts[p.idx[i]], 1);
  }
};

// Forward under replay: count, scan into first (temp: route_replay_temp_bytes), then one thread per token.
inline cudaError_t route_replay_temp_bytes(int tokens, std::size_t& bytes) {
  return cub::DeviceScan::ExclusiveSum(nullptr, bytes, static_cast<const int*>(nullptr), static_cast<int*>(nullptr), tokens + 1, nullptr);
}
template <class Router>
cudaError_t route_replay(const Router& router, const ReplayParams& q, int* count, int* first, void* temp, std::size_t temp_bytes,
                         cudaStream_t stream) {
  const RouteParams& p = q.route;
  if (!valid_shape(p.tokens, p.experts, p.top_k) || router.k != p.top_k || q.tokens != p.tokens || !p.logits || !p.prob || !p.idx ||
      !p.gate || !p.lse || !p.counts || !count || !first || q.first != first || !q.token_of || (p.tokens && !q.record))
    return cudaErrorInvalidValue;
  MOEKIT_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(p.counts, 0, sizeof(int) * std::size_t(p.experts), stream));
  if (p.bad_token) MOEKIT_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(p.bad_token, 0x7F, sizeof(int), stream));
  replay_count_kernel<int><<<unsigned((p.tokens + 1 + 127) / 128), 128, 0, stream>>>(q.record, p.tokens, p.top_k, count);
  MOEKIT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  std::size_t bytes = temp_bytes;
  MOEKIT_CUDA_RETURN_IF_ERROR(cub::DeviceScan::ExclusiveSum(temp, bytes, count, first, p.tokens + 1, stream));
  return launch_per_token(RouteReplayOp<Router>{router}, q, stream);
}

// The backward of a plan by token: each token over its own slots (router::route_by_token_backward).
struct ByTokenBackwardParams {
  RouteBackwardParams route;   // idx, gate, dgate by slot
  const int* first = nullptr;  // [T + 1]
  int tokens = 0;
};
template <class Router>
struct RouteByTokenBackwardOp {
  Router router;
  __device__ void operator()(const ByTokenBackwardParams& q, int t) const {
    const RouteBackwardParams& p = q.route;
    const std::size_t n = std::size_t(p.experts);
    const int s = q.first[t];
    router::route_by_token_backward(router, p.logits + t * n, p.experts, q.first[t + 1] - s, p.prob + t * n, p.idx + s, p.gate + s,
                                    p.dgate + s, p.dprob + (p.dprob_tokens > 0 ? std::size_t(t / p.dprob_tokens) * n : 0),
                                    p.zscale * p.lse[t], p.scratch + t * n, p.dlogits + t * n);
  }
};
template <class Router>
cudaError_t route_by_token_backward(const Router& router, const ByTokenBackwardParams& q, cudaStream_t stream) {
  const RouteBackwardParams& p = q.route;
  if (p.tokens < 0 || p.experts < 1 || q.tokens != p.tokens ||
      (p.tokens && (!p.logits || !p.prob || !q.first || !p.dprob || !p.lse || !p.scratch || !p.dlogits)))
    return cudaErrorInvalidValue;
  return launch_per_token(RouteByTokenBackwardOp<Router>{router}, q, stream);
}

// The balance loss's sequence scope: counts[b, i] = slots of sequence b (tokens [b·S, (b+1)·S)) routed to
// expert i, prob_sums[b, i] = Σ over its tokens of prob[t, i]. One thread per (b, i), in token order: no
// atomics, deterministic. (A template, as every kernel here: one definition across translation units.)
template <class P>
MOEKIT_KERNEL void sequence_stats_kernel(const int* idx, SlotLayout slots, const P* prob, int seqs, int len, int experts, int* counts,
                                         P* prob_sums) {
  const std::int64_t at = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (at >= std::int64_t(seqs) * experts) return;
  const int b = int(at / experts), i = int(at % experts);
  int c = 0;
  P s = 0;
  for (int t = b * len; t < (b + 1) * len; ++t) {
    for (int q = slots.begin(t); q < slots.end(t); ++q) c += idx[q] == i;
    s += prob[std::size_t(t) * experts + i];
  }
  counts[at] = c, prob_sums[at] = s;
}
// idx by slot, in the plan's layout (token choice's [T, k], or by token under replay).
inline cudaError_t sequence_stats(const int* idx, const SlotLayout& slots, const float* prob, int seqs, int len, int experts, int* counts,
                                  float* prob_sums, cudaStream_t stream) {
  const std::int64_t n = std::int64_t(seqs) * experts;
  if (n == 0) return cudaSuccess;
  if (!idx || !prob || !counts || !prob_sums || seqs < 0 || len < 1 || experts < 1 || !slots.valid()) return cudaErrorInvalidValue;
  sequence_stats_kernel<float><<<unsigned((n + 127) / 128), 128, 0, stream>>>(idx, slots, prob, seqs, len, experts, counts, prob_sums);
  return cudaGetLastError();
}

// The score a slot was picked by, for capacity drops: p for softmax, s = sigmoid(logit) for sigmoid
// (as the host backend's score_of).
template <class Router>
MOEKIT_KERNEL void slot_scores_kernel(Router router, const float* logits, const float* prob, const int* idx, SlotLayout slots,
                                      int experts, float* score) {
  const int s = int(blockIdx.x) * int(blockDim.x) + int(threadIdx.x);
  if (s >= slots.slots) return;
  const std::size_t at = std::size_t(slots.token(s)) * std::size_t(experts) + std::size_t(idx[s]);
  score[s] = router.capacity_score(logits[at], prob[at]);
}

template <class Router>
cudaError_t slot_scores(const Router& router, const float* logits, const float* prob, const int* idx, const SlotLayout& slots,
                        int experts, float* score, cudaStream_t stream) {
  if (!slots.valid() || experts < 1 || (slots.per_token > experts) || (slots.slots && (!logits || !prob || !idx || !score)))
    return cudaErrorInvalidValue;
  const int n = slots.slots;
  if (n == 0) return cudaSuccess;
  slot_scores_kernel<Router><<<unsigned((n + 255) / 256), 256, 0, stream>>>(router, logits, prob, idx, slots, experts, score);
  return cudaGetLastError();
}

// out[0] = Σ v[i]², one block with a fixed reduction tree (deterministic). For the z-loss: Σ_t lse_t².
template <class I>
MOEKIT_KERNEL void sum_squares_kernel(const float* v, I n, float* out) {
  __shared__ float part[256];
  float acc = 0.f;
  for (I i = I(threadIdx.x); i < n; i += I(blockDim.x)) acc += v[i] * v[i];
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int w = 128; w > 0; w /= 2) {
    if (int(threadIdx.x) < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = part[0];
}

inline cudaError_t sum_squares(const float* v, int n, float* out, cudaStream_t stream) {
  if (n < 0 || !out || (n && !v)) return cudaErrorInvalidValue;
  sum_squares_kernel<int><<<1, 256, 0, stream>>>(v, n, out);
  return cudaGetLastError();
}

}  // inline namespace MOEKIT_CUDA_ABI
}  // namespace moekit::backend::cuda
