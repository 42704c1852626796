#pragma once
// Un-permute + gate-weighted combine by gather (docs/design.md §3, §6). For token t with slots s of the plan's
// SlotLayout (layer/routing_plan.hpp: t·k + j for the token-choice routers):
//   out[t, :] = Σ_s gate[s] · y[row_of_slot[s], :]                  (FFN slots that kept a row, in slot order)
//             + Σ_s gate[s] · E_{idx[s]}(x[t, :])                     (kept zero-computation slots, in slot order)
// with E = 0 (zero), x (copy) or a1·x + a2·v (constant, [a1, a2] = softmax(Wc x) from zc_mix()); other
// kinds' terms arrive summed in `extra` (backend/cuda/zero_computation.cuh).
// Dropped slots (kDroppedSlot) add nothing. One thread per output element sums its terms in a fixed
// order: no float atomics, deterministic. Zero-computation slots never have a row: they are finished
// here, on the token's own row, so they never touch the GEMMs.
// Backward, also by gather:
//   dy[r, :]   = gate[s] · dout[token(s), :]                           (s = slot_of_row[r], FFN rows only)
//   dgate[s]   = dout[t] · (y[row] | x[t] | a1 x[t] + a2 v)            (one warp per slot, fixed order)
//   constant slots also give the coefficients of their weight gradients (dz1, dz2, gate·a2) and
//   token_backward() gathers dx[t] = Σ dxp[rows of t] + the copy / constant experts' input gradients.
// Storage T is float or __nv_bfloat16; accumulation is fp32.
#include <cuda_runtime.h>

#include <cstddef>

#include "moekit/backend/cuda/activation.cuh"  // load_f32 / store_f32
#include "moekit/backend/cuda/permute.cuh"     // kDroppedSlot, kZeroComputationSlot
#include "moekit/backend/cuda/status.cuh"
#include "moekit/experts/zero_computation.hpp"

namespace moekit::backend::cuda {
inline namespace MOEKIT_CUDA_ABI {

// Everything combine, its backward and token_backward read; unused fields may stay null.
template <class T>
struct CombineParams {
  SlotLayout slots;                  // tokens, slots (S), each token's slots (device arrays unless token choice)
  int d = 0;
  const float* gate = nullptr;       // [S]
  const int* row_of_slot = nullptr;  // [S]: a row, kDroppedSlot or kZeroComputationSlot
  const int* slot_of_row = nullptr;  // [S] (backward: dy rows)
  const int* num_rows = nullptr;     // device count of FFN rows (bounds dy rows); null = S
  const T* y = nullptr;              // [rows, d] expert outputs (forward, dgate)
  const T* x = nullptr;              // [T, d] layer input (copy / constant experts)
  // Zero-computation experts: ids [ffn, ffn+zero) zero, [.., +copy) copy, [.., +constant) constant.
  const int* idx = nullptr;  // [S] expert of each slot
  ExpertKinds kinds;  // layer/routing_plan.hpp
  const T* const_v = nullptr;   // [N_const, d]
  const T* const_wc = nullptr;  // [N_const, 2, d] (token_backward)
  const float* mix = nullptr;   // [S, 2]: a1, a2 of constant slots (from zc_mix)
  // Other zero-computation kinds (ZcKind::kCustom, backend/cuda/zero_computation.cuh): their terms,
  // fp32 [T, d], added last (combine: Σ gate · E(x); token_backward: their input gradients); or null.
  const float* extra = nullptr;
};

template <class T>
__device__ __forceinline__ ZcKind zc_kind(const CombineParams<T>& p, int e, int& q) {
  return p.kinds.zc_kind(e, q);
}

// acc[u] += (gate or 1) · rows[row of slot s, c + u] over token t's FFN slots in slot order; returns
// whether any of its slots is a kept zero-computation slot. Shared by the combine and the dx gather.
template <int V, class T>
__device__ __forceinline__ bool accumulate_rows(const CombineParams<T>& p, const T* rows, int t, std::size_t c,
                                                bool gate_weighted, float (&acc)[V]) {
  float v[V];
  bool any_zc = false;
  for (int s = p.slots.begin(t), end = p.slots.end(t); s < end; ++s) {
    const int row = p.row_of_slot[s];
    any_zc = any_zc || row == kZeroComputationSlot;
    if (row < 0) continue;
    const float g = gate_weighted ? p.gate[s] : 1.f;
    load_vec<V>(rows, std::size_t(row) * std::size_t(p.d) + c, v);
#pragma unroll
    for (int u = 0; u < V; ++u) acc[u] += g * v[u];
  }
  return any_zc;
}

// V columns per thread (16-byte accesses when rows are aligned, see vec_width).
template <int V, class T>
MOEKIT_KERNEL void combine_kernel(CombineParams<T> p, T* out) {
  const std::size_t d = std::size_t(p.d), n = std::size_t(p.slots.tokens) * d / V;
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const std::size_t e0 = i * V, c = e0 % d;
    const int t = int(e0 / d);
    float acc[V] = {}, v[V];
    if (accumulate_rows<V>(p, p.y, t, c, /*gate_weighted=*/true, acc)) {  // ZC after the FFN terms, as the host
      float xv[V];
      load_vec<V>(p.x, e0, xv);
      for (int s = p.slots.begin(t), end = p.slots.end(t); s < end; ++s) {
        if (p.row_of_slot[s] != kZeroComputationSlot) continue;
        int q;
        const ZcKind kind = zc_kind(p, p.idx[s], q);
        const float g = p.gate[s];
        if (kind == ZcKind::kCopy) {
#pragma unroll
          for (int u = 0; u < V; ++u) acc[u] += g * xv[u];
        } else if (kind == ZcKind::kConstant) {
          const float a1 = p.mix[2 * s], a2 = p.mix[2 * s + 1];
          load_vec<V>(p.const_v, std::size_t(q) * d + c, v);
#pragma unroll
          for (int u = 0; u < V; ++u) acc[u] += g * (a1 * xv[u] + a2 * v[u]);
        }
      }
    }
    if (p.extra) {
#pragma unroll
      for (int u = 0; u < V; ++u) acc[u] += p.extra[e0 + u];
    }
    store_vec<V>(out, e0, acc);
  }
}

// [a1, a2] = softmax(zc_logits[t, 2q], zc_logits[t, 2q + 1]) for kept constant slots; 0 elsewhere.
// zc_logits [T, 2·N_const] = x · Wc^T comes from one GEMM over all constant experts.
template <class T>
MOEKIT_KERNEL void zc_mix_kernel(CombineParams<T> p, const float* zc_logits, float* mix) {
  const int s = int(blockIdx.x) * int(blockDim.x) + int(threadIdx.x);
  if (s >= p.slots.slots) return;
  float a1 = 0.f, a2 = 0.f;
  int q;
  if (p.row_of_slot[s] == kZeroComputationSlot && zc_kind(p, p.idx[s], q) == ZcKind::kConstant) {
    const float* z = zc_logits + std::size_t(p.slots.token(s)) * std::size_t(2 * p.kinds.constant) + 2 * q;
    experts::Constant::mix_from_logits(z[0], z[1], a1, a2);
  }
  mix[2 * s] = a1;
  mix[2 * s + 1] = a2;
}

template <int V, class T>
MOEKIT_KERNEL void combine_dy_kernel(CombineParams<T> p, const T* dout, T* dy) {
  int rows = p.slots.slots;
  if (p.num_rows && *p.num_rows < rows) rows = *p.num_rows;
  const std::size_t d = std::size_t(p.d), n = std::size_t(rows) * d / V;
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const std::size_t e0 = i * V;
    const int s = p.slot_of_row[e0 / d];
    const float g = p.gate[s];
    float v[V];
    load_vec<V>(dout, std::size_t(p.slots.token(s)) * d + e0 % d, v);
#pragma unroll
    for (int u = 0; u < V; ++u) v[u] *= g;
    store_vec<V>(dy, e0, v);
  }
}

// Outputs of the per-slot backward; coef_z / coef_v may be null without constant experts.
template <class T>
struct SlotGrads {
  float* dgate = nullptr;  // [S]
  float* dz = nullptr;     // [S, 2]: dz1, dz2 of constant slots (for token_backward)
  T* coef_z = nullptr;     // [T, 2·N_const]: dz1, dz2 at (t, 2q), (t, 2q+1); caller zeroes it
  T* coef_v = nullptr;     // [T, N_const]:   gate·a2 at (t, q); caller zeroes it
};

template <int V, class T>
__device__ __forceinline__ float warp_dot(const T* a, const T* b, int d, int lane) {
  float acc = 0.f, va[V], vb[V];
  for (int c = lane * V; c < d; c += 32 * V) {
    load_vec<V>(a, std::size_t(c), va);
    load_vec<V>(b, std::size_t(c), vb);
#pragma unroll
    for (int u = 0; u < V; ++u) acc += va[u] * vb[u];
  }
  for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);  // fixed butterfly
  return acc;
}

// One warp per slot; every lane ends with the same sums.
template <int V, class T>
MOEKIT_KERNEL void combine_dgate_kernel(CombineParams<T> p, const T* dout, SlotGrads<T> g) {
  const int s = int((std::size_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32), lane = int(threadIdx.x % 32);
  if (s >= p.slots.slots) return;
  const std::size_t d = std::size_t(p.d), t = std::size_t(p.slots.token(s));
  const T* dot = dout + t * d;
  const int row = p.row_of_slot[s];
  float dg = 0.f, dz1 = 0.f, dz2 = 0.f;
  if (row >= 0) {
    dg = warp_dot<V>(dot, p.y + std::size_t(row) * d, p.d, lane);
  } else if (row == kZeroComputationSlot) {
    int q;
    const ZcKind kind = zc_kind(p, p.idx[s], q);
    if (kind == ZcKind::kCopy) {
      dg = warp_dot<V>(dot, p.x + t * d, p.d, lane);
    } else if (kind == ZcKind::kConstant) {
      const float a1 = p.mix[2 * s], a2 = p.mix[2 * s + 1], gate = p.gate[s];
      const float dx_dot = warp_dot<V>(dot, p.x + t * d, p.d, lane);
      const float dv_dot = warp_dot<V>(dot, p.const_v + std::size_t(q) * d, p.d, lane);
      dg = a1 * dx_dot + a2 * dv_dot;
      // E = a1 x + a2 v, dE = gate·dout: d a1 = gate·dout·x, d a2 = gate·dout·v, softmax backward.
      experts::Constant::mix_backward(a1, a2, gate * dx_dot, gate * dv_dot, dz1, dz2);
      if (lane == 0) {
        const std::size_t nc = std::size_t(p.kinds.constant);
        store_f32(g.coef_z, t * 2 * nc + 2 * std::size_t(q), dz1);
        store_f32(g.coef_z, t * 2 * nc + 2 * std::size_t(q) + 1, dz2);
        store_f32(g.coef_v, t * nc + std::size_t(q), gate * a2);
      }
    }
  }
  if (lane == 0) {
    g.dgate[s] = dg;  // dropped slots and zero experts do not reach the output: 0 (custom kinds: later)
    if (g.dz) {
      g.dz[2 * s] = dz1;
      g.dz[2 * s + 1] = dz2;
    }
  }
}

// dx[t, c] = Σ_s dxp[row of slot s, c] (FFN rows, slot order) + copy: gate·dout[t, c]
//          + constant: a1·gate·dout[t, c] + dz1·Wc[q, 0, c] + dz2·Wc[q, 1, c]   (then ZC slots in slot order)
// O is the output type: float for the layer (the router's GEMM adds into it next), or T.
template <int V, class T, class O>
MOEKIT_KERNEL void token_backward_kernel(CombineParams<T> p, const T* dxp, const T* dout, const float* dz, O* dx) {
  const std::size_t d = std::size_t(p.d), n = std::size_t(p.slots.tokens) * d / V;
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const std::size_t e0 = i * V, c = e0 % d;
    const int t = int(e0 / d);
    float acc[V] = {};
    if (accumulate_rows<V>(p, dxp, t, c, /*gate_weighted=*/false, acc)) {
      float dc[V], w0[V], w1[V];
      load_vec<V>(dout, e0, dc);
      for (int s = p.slots.begin(t), end = p.slots.end(t); s < end; ++s) {
        if (p.row_of_slot[s] != kZeroComputationSlot) continue;
        int q;
        const ZcKind kind = zc_kind(p, p.idx[s], q);
        const float g = p.gate[s];
        if (kind == ZcKind::kCopy) {
#pragma unroll
          for (int u = 0; u < V; ++u) acc[u] += g * dc[u];
        } else if (kind == ZcKind::kConstant) {
          const T* wc = p.const_wc + std::size_t(q) * 2 * d;
          load_vec<V>(wc, c, w0);
          load_vec<V>(wc, d + c, w1);
          const float a1g = p.mix[2 * s] * g, dz1 = dz[2 * s], dz2 = dz[2 * s + 1];
#pragma unroll
          for (int u = 0; u < V; ++u) acc[u] += a1g * dc[u] + dz1 * w0[u] + dz2 * w1[u];
        }
      }
    }
    if (p.extra) {
#pragma unroll
      for (int u = 0; u < V; ++u) acc[u] += p.extra[e0 + u];
    }
    store_vec<V>(dx, e0, acc);
  }
}

namespace detail {
inline unsigned grid_for(std::size_t n, int block) {
  const std::size_t want = (n + std::size_t(block) - 1) / std::size_t(block);
  return unsigned(want < 65535 * 8 ? want : 65535 * 8);
}
template <class T>
bool combine_params_ok(const CombineParams<T>& p) {
  if (!p.slots.valid() || p.d < 0) return false;
  if (p.slots.tokens == 0 || p.d == 0) return true;
  const bool zc = p.kinds.any_zc();
  return p.row_of_slot && (!zc || (p.idx && p.x && p.gate)) && (p.kinds.constant == 0 || (p.const_v && p.mix));
}
}  // namespace detail

// out [T, d] from the expert rows and the zero-computation slots.
template <class T>
cudaError_t combine(const CombineParams<T>& p, T* out, cudaStream_t stream) {
  if (!detail::combine_params_ok(p) || (p.slots.tokens && p.d && (!out || !p.y || !p.gate))) return cudaErrorInvalidValue;
  const std::size_t n = std::size_t(p.slots.tokens) * std::size_t(p.d);
  if (n == 0) return cudaSuccess;
  constexpr int kV = int(16 / sizeof(T));
  if (vec_width<T>(p.d, p.y, p.x, p.const_v, out) == kV)
    combine_kernel<kV><<<detail::grid_for(n / kV, 256), 256, 0, stream>>>(p, out);
  else
    combine_kernel<1><<<detail::grid_for(n, 256), 256, 0, stream>>>(p, out);
  return cudaGetLastError();
}

// Dropless FFN-only form: out [T, d] from y [T·k, d] (permuted rows), gate [T, k], row_of_slot [T·k].
template <class T>
cudaError_t combine(const T* y, const float* gate, const int* row_of_slot, T* out, int tokens, int top_k, int d,
                    cudaStream_t stream) {
  CombineParams<T> p;
  p.slots = SlotLayout::token_choice(tokens, top_k), p.d = d, p.gate = gate, p.row_of_slot = row_of_slot, p.y = y;
  return combine(p, out, stream);
}

// mix [T·k, 2] of the constant experts from zc_logits [T, 2·N_const].
template <class T>
cudaError_t zc_mix(const CombineParams<T>& p, const float* zc_logits, float* mix, cudaStream_t stream) {
  if (!detail::combine_params_ok(p) || (p.slots.tokens && (!mix || (p.kinds.constant && !zc_logits)))) return cudaErrorInvalidValue;
  const int slots = p.slots.slots;
  if (slots == 0) return cudaSuccess;
  zc_mix_kernel<<<unsigned((slots + 255) / 256), 256, 0, stream>>>(p, zc_logits, mix);
  return cudaGetLastError();
}

// dy [rows, d] (permuted FFN rows) and the per-slot gradients from dout [T, d].
template <class T>
cudaError_t combine_backward(const CombineParams<T>& p, const T* dout, T* dy, const SlotGrads<T>& g, cudaStream_t stream) {
  if (!detail::combine_params_ok(p) || (p.slots.tokens && (!dout || !dy || !p.y || !p.gate || !p.slot_of_row || !g.dgate)) ||
      (p.kinds.constant && p.slots.tokens && (!g.coef_z || !g.coef_v)))
    return cudaErrorInvalidValue;
  const int slots = p.slots.slots;
  if (slots == 0) return cudaSuccess;
  const std::size_t n = std::size_t(slots) * std::size_t(p.d);
  constexpr int kV = int(16 / sizeof(T));
  const bool vec = vec_width<T>(p.d, dout, dy, p.y, p.x, p.const_v) == kV;
  if (n) {
    if (vec) combine_dy_kernel<kV><<<detail::grid_for(n / kV, 256), 256, 0, stream>>>(p, dout, dy);
    else combine_dy_kernel<1><<<detail::grid_for(n, 256), 256, 0, stream>>>(p, dout, dy);
    MOEKIT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  const unsigned warps_grid = unsigned((std::size_t(slots) * 32 + 255) / 256);
  if (vec) combine_dgate_kernel<kV><<<warps_grid, 256, 0, stream>>>(p, dout, g);
  else combine_dgate_kernel<1><<<warps_grid, 256, 0, stream>>>(p, dout, g);
  return cudaGetLastError();
}

// Dropless FFN-only form: dy [T·k, d] (permuted rows) and dgate [T, k] from dout [T, d].
template <class T>
cudaError_t combine_backward(const T* dout, const T* y, const float* gate, const int* slot_of_row,
                             const int* row_of_slot, T* dy, float* dgate, int tokens, int top_k, int d,
                             cudaStream_t stream) {
  CombineParams<T> p;
  p.slots = SlotLayout::token_choice(tokens, top_k), p.d = d, p.gate = gate, p.row_of_slot = row_of_slot, p.slot_of_row = slot_of_row;
  p.y = y;
  SlotGrads<T> g;
  g.dgate = dgate;
  return combine_backward(p, dout, dy, g, stream);
}

// dx [T, d] (type O) by gather; dz [T·k, 2] from combine_backward (constant experts only).
template <class T, class O>
cudaError_t token_backward(const CombineParams<T>& p, const T* dxp, const T* dout, const float* dz, O* dx,
                           cudaStream_t stream) {
  if (!detail::combine_params_ok(p) || (p.slots.tokens && p.d && (!dxp || !dx)) ||
      (p.slots.tokens && p.d && p.kinds.copy + p.kinds.constant > 0 && !dout) ||
      (p.slots.tokens && p.d && p.kinds.constant > 0 && (!dz || !p.const_wc)))
    return cudaErrorInvalidValue;
  const std::size_t n = std::size_t(p.slots.tokens) * std::size_t(p.d);
  if (n == 0) return cudaSuccess;
  constexpr int kV = int(16 / sizeof(T));  // O (float) rows of a multiple of kV stay 16-byte aligned too
  if (vec_width<T>(p.d, dxp, dout, p.const_wc, dx) == kV)
    token_backward_kernel<kV><<<detail::grid_for(n / kV, 256), 256, 0, stream>>>(p, dxp, dout, dz, dx);
  else
    token_backward_kernel<1><<<detail::grid_for(n, 256), 256, 0, stream>>>(p, dxp, dout, dz, dx);
  return cudaGetLastError();
}

// Backward of gather_rows (permute.cuh), by gather: dx[t, :] = Σ_j dxp[row_of_slot[t·k + j], :] over the
// slots that have a row, summed in slot order in fp32.
template <class T>
cudaError_t gather_rows_backward(const T* dxp, const int* row_of_slot, T* dx, int tokens, int top_k, int d,
                                 cudaStream_t stream) {
  CombineParams<T> p;
  p.slots = SlotLayout::token_choice(tokens, top_k), p.d = d, p.row_of_slot = row_of_slot;
  return token_backward<T, T>(p, dxp, nullptr, nullptr, dx, stream);
}

}  // inline namespace MOEKIT_CUDA_ABI
}  // namespace moekit::backend::cuda
