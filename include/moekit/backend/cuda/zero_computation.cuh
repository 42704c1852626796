#pragma once
// The CUDA backend's zero-computation kinds other than MoE++'s three (experts/zero_computation.hpp):
// a kind brings only its host/device functors, and these kernels call them, in fp32 (bf16 storage:
// x, dy and the kinds' tensors are converted first). Zero, Copy and Constant keep their own vectorised
// code in combine.cuh; there a custom slot (ZcKind::kCustom) adds nothing, and these kernels add its
// terms through `extra` rows that combine and token_backward read.
//   forward:  extra[t] = Σ over t's custom slots (slot order) of gate · E(x[t])     one thread per token
//   dgate[s]  = dy[t] · E(x[t])                                                       one thread per slot
//   dx:       extra[t] = Σ over t's custom slots of gate · (∂E/∂x)ᵀ dy[t]             one thread per token
//   weights:  Σ over the slots of expert q in slot order of gate · (∂E/∂θ)ᵀ dy[t]     one thread per expert
// Serial per token and per expert, with no atomics: deterministic and simple, not fast; a kind that
// matters for speed gets kernels of its own, as Constant has.
#include <cuda_runtime.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "moekit/backend/cuda/activation.cuh"  // convert
#include "moekit/backend/cuda/parameter_store.cuh"
#include "moekit/backend/cuda/status.cuh"
#include "moekit/experts/policy.hpp"
#include "moekit/layer/parameter_table.hpp"
#include "moekit/layer/routing_plan.hpp"
#include "moekit/layer/zc_tensors.hpp"

namespace moekit::backend::cuda {
inline namespace MOEKIT_CUDA_ABI {

// Kinds: std::tuple of the custom kinds in routing order (their experts follow the constant experts).
template <class Kinds>
struct CustomZcParams {
  using List = experts::ZcList<Kinds>;
  static constexpr int K = List::size > 0 ? List::size : 1;
  static constexpr int kT = experts::ZcWeights<float>::kMax;
  SlotLayout slots;
  int d = 0, first = 0, experts = 0;  // the custom experts: ids [first, first + experts)
  int count[K] = {}, tensors[K] = {};
  long long woff[K][kT] = {}, goff[K][kT] = {}, stride[K][kT] = {};  // each tensor family in w / gw
  const int* idx = nullptr;
  const int* row_of_slot = nullptr;
  const float* gate = nullptr;
  const float* x = nullptr;   // [T, d]
  const float* w = nullptr;   // the kinds' tensors (fp32): the store's values, or a bf16 layer's copy
  float* gw = nullptr;        // their gradients: the store's fp32 gradient buffer
  float* saved = nullptr;     // [S, max(1, kSaved)]
  int saved_stride = 1;

  __device__ __forceinline__ bool custom(int s, int& m, int& q) const {
    if (row_of_slot[s] != kSlotZeroComputation) return false;
    q = idx[s] - first;
    if (q < 0 || q >= experts) return false;
    for (m = 0; m + 1 < List::size && q >= count[m]; ++m) q -= count[m];
    return true;
  }
  __device__ __forceinline__ experts::ZcWeights<float> weights(int m, int q) const {
    experts::ZcWeights<float> r;
    for (int i = 0; i < tensors[m]; ++i) r.w[i] = w + woff[m][i] + q * stride[m][i];
    return r;
  }
  __device__ __forceinline__ experts::ZcGrads<float> grads(int m, int q) const {
    experts::ZcGrads<float> r;
    for (int i = 0; i < tensors[m]; ++i) r.w[i] = gw + goff[m][i] + q * stride[m][i];
    return r;
  }
  // f(kind, its expert's tensors, their gradients, the slot's saved scalars) when slot s is a kept
  // slot of a custom kind.
  template <class F>
  __device__ __forceinline__ void with_slot(int s, F&& f) const {
    int m, q;
    if (!custom(s, m, q)) return;
    float* sv = saved + std::size_t(s) * std::size_t(saved_stride);
    const auto w = weights(m, q);
    const auto g = grads(m, q);
    experts::ZcList<Kinds>::visit(m, [&](auto z) { f(z, w, g, sv); });
  }
};

template <class Kinds>
MOEKIT_KERNEL void custom_zc_forward_kernel(CustomZcParams<Kinds> p, float* extra) {
  const int t = int(blockIdx.x) * int(blockDim.x) + int(threadIdx.x);
  if (t >= p.slots.tokens) return;
  const std::size_t at = std::size_t(t) * std::size_t(p.d);
  for (int s = p.slots.begin(t), end = p.slots.end(t); s < end; ++s)
    p.with_slot(s, [&](auto z, const auto& w, const auto&, float* saved) {
      decltype(z)::forward(w, p.x + at, p.d, p.gate[s], extra + at, saved);
    });
}

template <class Kinds>
MOEKIT_KERNEL void custom_zc_dgate_kernel(CustomZcParams<Kinds> p, const float* dy, float* dgate) {
  const int s = int(blockIdx.x) * int(blockDim.x) + int(threadIdx.x);
  if (s >= p.slots.slots) return;
  const std::size_t at = std::size_t(p.slots.token(s)) * std::size_t(p.d);
  p.with_slot(s, [&](auto z, const auto& w, const auto&, float* saved) {
    dgate[s] = decltype(z)::backward(w, p.x + at, p.d, p.gate[s], dy + at, saved, static_cast<float*>(nullptr),
                                     experts::ZcGrads<float>{});
  });
}

template <class Kinds>
MOEKIT_KERNEL void custom_zc_dx_kernel(CustomZcParams<Kinds> p, const float* dy, float* extra) {
  const int t = int(blockIdx.x) * int(blockDim.x) + int(threadIdx.x);
  if (t >= p.slots.tokens) return;
  const std::size_t at = std::size_t(t) * std::size_t(p.d);
  for (int s = p.slots.begin(t), end = p.slots.end(t); s < end; ++s)
    p.with_slot(s, [&](auto z, const auto& w, const auto&, float* saved) {
      (void)decltype(z)::backward(w, p.x + at, p.d, p.gate[s], dy + at, saved, extra + at, experts::ZcGrads<float>{});
    });
}

// One thread per custom expert: its slots in slot order, so the sums are deterministic.
template <class Kinds>
MOEKIT_KERNEL void custom_zc_weights_kernel(CustomZcParams<Kinds> p, const float* dy) {
  const int e = int(blockIdx.x) * int(blockDim.x) + int(threadIdx.x);
  if (e >= p.experts) return;
  for (int s = 0; s < p.slots.slots; ++s) {
    if (p.idx[s] != p.first + e) continue;
    const std::size_t at = std::size_t(p.slots.token(s)) * std::size_t(p.d);
    p.with_slot(s, [&](auto z, const auto& w, const auto& g, float* saved) {
      (void)decltype(z)::backward(w, p.x + at, p.d, p.gate[s], dy + at, saved, static_cast<float*>(nullptr), g);
    });
  }
}

// The layer's side of it: where each kind's tensors lie (ParameterTable regions of the store's value
// and gradient buffers), the fp32 copy of a bf16 layer, and the launches. S: storage type.
template <class S, class Kinds>
class CustomZc {
  using List = experts::ZcList<Kinds>;
  using P = CustomZcParams<Kinds>;
  static constexpr bool kCopy = !std::is_same_v<S, float>;

 public:
  static constexpr int kSaved = List::max_saved > 0 ? List::max_saved : 1;

  CustomZc() = default;
  CustomZc(const MoeConfig& cfg, const ParameterTable& t) {
    const auto at = ZcTensorLayout<Kinds>::of(cfg, t);
    const ExpertKinds kinds = ExpertKinds::of(cfg);
    base_.d = int(cfg.d_model), base_.first = kinds.first_custom(), base_.experts = kinds.custom;
    for (int m = 0; m < List::size; ++m) {
      base_.count[m] = int(at.count[std::size_t(m)]), base_.tensors[m] = at.tensors[std::size_t(m)];
      for (int i = 0; i < base_.tensors[m]; ++i) {
        const std::int64_t offset = at.offset[std::size_t(m)][std::size_t(i)], size = at.size[std::size_t(m)][std::size_t(i)];
        regions_.push_back({offset, size, copy_elements_});
        base_.goff[m][i] = offset, base_.stride[m][i] = at.stride[std::size_t(m)][std::size_t(i)];
        base_.woff[m][i] = kCopy ? copy_elements_ : offset;
        copy_elements_ += size;
      }
    }
  }
  // fp32 elements a bf16 layer's workspace holds for the copy of the kinds' tensors.
  std::int64_t copy_elements() const { return kCopy ? copy_elements_ : 0; }

  // The launch parameters of one forward: x fp32 [T, d]; a bf16 layer's copy is refreshed here.
  P params(const ParameterStore<S>& store, float* copy, SlotLayout slots, const int* idx, const int* row_of_slot,
           const float* gate, const float* x, float* saved, cudaStream_t stream) const {
    P p = base_;
    p.slots = slots, p.idx = idx, p.row_of_slot = row_of_slot, p.gate = gate, p.x = x, p.saved = saved;
    p.saved_stride = kSaved, p.gw = store.grad_at(0);
    if constexpr (kCopy) {
      for (const Region& r : regions_)
        MOEKIT_CUDA_CHECK(convert(store.value_at(r.offset), copy + r.at, std::size_t(r.size), stream));
      p.w = copy;
    } else {
      p.w = store.value_at(0);
    }
    return p;
  }

  cudaError_t forward(const P& p, float* extra, cudaStream_t stream) const {
    if (p.slots.tokens == 0) return cudaSuccess;
    MOEKIT_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(extra, 0, sizeof(float) * std::size_t(p.slots.tokens) * std::size_t(p.d), stream));
    custom_zc_forward_kernel<Kinds><<<unsigned((p.slots.tokens + 127) / 128), 128, 0, stream>>>(p, extra);
    return cudaGetLastError();
  }
  // dgate of the custom slots (after combine_backward wrote 0 there), dx's extra rows, and the kinds'
  // weight gradients (added into the store's).
  cudaError_t backward(const P& p, const float* dy, float* dgate, float* extra, cudaStream_t stream) const {
    if (p.slots.tokens == 0) return cudaSuccess;
    if (p.slots.slots > 0) custom_zc_dgate_kernel<Kinds><<<unsigned((p.slots.slots + 127) / 128), 128, 0, stream>>>(p, dy, dgate);
    MOEKIT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    MOEKIT_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(extra, 0, sizeof(float) * std::size_t(p.slots.tokens) * std::size_t(p.d), stream));
    custom_zc_dx_kernel<Kinds><<<unsigned((p.slots.tokens + 127) / 128), 128, 0, stream>>>(p, dy, extra);
    MOEKIT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    if (p.experts > 0 && copy_elements_ > 0)
      custom_zc_weights_kernel<Kinds><<<unsigned((p.experts + 63) / 64), 64, 0, stream>>>(p, dy);
    return cudaGetLastError();
  }

 private:
  struct Region {
    std::int64_t offset, size, at;  // in the table (the store's buffers) and in the copy
  };
  P base_;
  std::int64_t copy_elements_ = 0;
  std::vector<Region> regions_;
};

}  // inline namespace MOEKIT_CUDA_ABI
}  // namespace moekit::backend::cuda
