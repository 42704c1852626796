#pragma once
// Kernels of the dense transformer ops (nn/cuda/): embedding lookup and its deterministic backward,
// RMSNorm, rotary position embedding, the causal softmax of attention, softmax cross-entropy, and the
// residual adds. Storage S is float or __nv_bfloat16; every sum and every transcendental is fp32 (the
// loss mean in double), in a fixed order, so a run gives the same bits every time.
//
// Layers as elsewhere in backend/cuda/: the launchers validate their arguments and return cudaError_t;
// the __global__ functions are thin templates (hidden visibility, MOEKIT_KERNEL); the math is the host
// nn/ modules' (nn/embedding.hpp, rms_norm.hpp, rotary.hpp, attention.hpp, cross_entropy.hpp), which
// are the oracle of tests/gpu/test_cuda_nn.cu.
#include <cub/block/block_reduce.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "moekit/backend/cuda/activation.cuh"  // load_f32, store_f32
#include "moekit/backend/cuda/status.cuh"

namespace moekit::backend::cuda {
inline namespace MOEKIT_CUDA_ABI {

namespace nn_detail {
constexpr int kThreads = 256;
constexpr int kWarp = 32;
inline unsigned grid_for(std::int64_t n, int threads = kThreads) {  // grid-stride loops cover the rest
  const std::int64_t b = (n + threads - 1) / threads;
  return unsigned(b < (1 << 20) ? (b > 0 ? b : 1) : (1 << 20));
}
inline unsigned warp_rows_grid(std::int64_t rows) { return unsigned((rows + kThreads / kWarp - 1) / (kThreads / kWarp)); }
}  // namespace nn_detail

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// ---------------------------------------------------------------------------------------------------
// Embedding. out[t] = table[ids[t]]; an id outside [0, vocab) writes a row of NaN (never reads out of
// bounds; the loss then fails loudly; the nn/cuda module checks the ids on the host first).
template <class S>
MOEKIT_KERNEL void embedding_forward_kernel(const S* table, const int* ids, std::int64_t rows, std::int64_t d, std::int64_t vocab,
                                            S* out) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < rows * d; i += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t t = i / d, c = i % d;
    const int id = ids[t];
    if (id >= 0 && id < vocab) out[i] = table[std::int64_t(id) * d + c];
    else store_f32(out, std::size_t(i), __int_as_float(0x7fc00000));
  }
}
template <class S>
cudaError_t embedding_forward(const S* table, const int* ids, std::int64_t rows, std::int64_t d, std::int64_t vocab, S* out,
                              cudaStream_t stream) {
  if (rows < 0 || d <= 0 || vocab <= 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (!table || !ids || !out) return cudaErrorInvalidValue;
  embedding_forward_kernel<S><<<nn_detail::grid_for(rows * d), nn_detail::kThreads, 0, stream>>>(table, ids, rows, d, vocab, out);
  return cudaGetLastError();
}

// The backward sums dout's rows per id without atomics: a stable radix sort of (id, position) pairs
// (CUB) puts each id's positions in token order, then block v sums its run of rows, column by column,
// and adds the sum to grad[v]. The same bits on every run, whatever the ids.
template <class I>
MOEKIT_KERNEL void iota_kernel(I* v, std::int64_t n) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += std::int64_t(gridDim.x) * blockDim.x) v[i] = I(i);
}
template <class S>
MOEKIT_KERNEL void embedding_backward_kernel(const int* sorted_ids, const int* positions, int rows, const S* dout, std::int64_t d,
                                             float* grad) {
  __shared__ int range[2];
  const int v = int(blockIdx.x);
  if (threadIdx.x < 2) {  // first position with id >= v (+ threadIdx.x)
    int lo = 0, hi = rows;
    const int key = v + int(threadIdx.x);
    while (lo < hi) {
      const int mid = lo + (hi - lo) / 2;
      if (sorted_ids[mid] < key) lo = mid + 1;
      else hi = mid;
    }
    range[threadIdx.x] = lo;
  }
  __syncthreads();
  const std::int64_t c = std::int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (range[0] == range[1] || c >= d) return;
  float acc = 0.f;
  for (int j = range[0]; j < range[1]; ++j) acc += load_f32(dout, std::size_t(std::int64_t(positions[j]) * d + c));
  grad[std::int64_t(v) * d + c] += acc;
}

struct EmbeddingBackwardWorkspace {
  std::size_t sort_bytes = 0;  // CUB's temporary storage
  std::size_t total_bytes = 0;  // 3 int arrays of rows (sorted ids, positions in, positions out) + sort_bytes
};
inline int id_bits(std::int64_t vocab) {
  int b = 1;
  while ((std::int64_t(1) << b) < vocab) ++b;
  return b;
}
inline cudaError_t embedding_backward_workspace(std::int64_t rows, std::int64_t vocab, EmbeddingBackwardWorkspace& w) {
  if (rows < 0 || rows > (std::int64_t(1) << 31) - 1 || vocab <= 0) return cudaErrorInvalidValue;
  w.sort_bytes = 0;
  MOEKIT_CUDA_RETURN_IF_ERROR(cub::DeviceRadixSort::SortPairs(nullptr, w.sort_bytes, static_cast<const int*>(nullptr),
                                                              static_cast<int*>(nullptr), static_cast<const int*>(nullptr),
                                                              static_cast<int*>(nullptr), int(rows), 0, id_bits(vocab)));
  const std::size_t ints = (std::size_t(rows) * sizeof(int) + 255) / 256 * 256;
  w.total_bytes = 3 * ints + w.sort_bytes;
  return cudaSuccess;
}
// grad [vocab, d] fp32 += Σ_t onehot(ids[t]) dout[t]. Ids must be in [0, vocab), which the caller
// checks (nn::cuda::check_ids): the sort looks at the low id_bits(vocab) bits only, so any other id
// breaks the sorted order and the gradient of every row is then undefined.
// workspace: embedding_backward_workspace(rows, vocab).total_bytes, 256-byte aligned.
template <class S>
cudaError_t embedding_backward(const int* ids, const S* dout, std::int64_t rows, std::int64_t d, std::int64_t vocab, float* grad,
                               void* workspace, std::size_t workspace_bytes, cudaStream_t stream) {
  EmbeddingBackwardWorkspace w;
  MOEKIT_CUDA_RETURN_IF_ERROR(embedding_backward_workspace(rows, vocab, w));
  if (d <= 0 || vocab > (std::int64_t(1) << 31) - 1) return cudaErrorInvalidValue;
  if ((d + 127) / 128 > 65535) return cudaErrorInvalidValue;  // gridDim.y
  if (rows == 0) return cudaSuccess;
  if (!ids || !dout || !grad || !workspace || workspace_bytes < w.total_bytes) return cudaErrorInvalidValue;
  const std::size_t ints = (std::size_t(rows) * sizeof(int) + 255) / 256 * 256;
  char* base = static_cast<char*>(workspace);
  int* sorted = reinterpret_cast<int*>(base);
  int* pos_in = reinterpret_cast<int*>(base + ints);
  int* pos_out = reinterpret_cast<int*>(base + 2 * ints);
  void* temp = base + 3 * ints;
  iota_kernel<int><<<nn_detail::grid_for(rows), nn_detail::kThreads, 0, stream>>>(pos_in, rows);
  MOEKIT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  std::size_t temp_bytes = w.sort_bytes;
  MOEKIT_CUDA_RETURN_IF_ERROR(
      cub::DeviceRadixSort::SortPairs(temp, temp_bytes, ids, sorted, pos_in, pos_out, int(rows), 0, id_bits(vocab), stream));
  const dim3 grid(unsigned(vocab), unsigned((d + 127) / 128));
  embedding_backward_kernel<S><<<grid, 128, 0, stream>>>(sorted, pos_out, int(rows), dout, d, grad);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------------
// RMSNorm: y = x * r * w with r = 1 / sqrt(mean(x²) + eps); one warp per row.
template <class S>
MOEKIT_KERNEL void rms_norm_forward_kernel(const S* x, const S* w, std::int64_t rows, int d, float eps, S* y) {
  const std::int64_t row = std::int64_t(blockIdx.x) * (blockDim.x / nn_detail::kWarp) + threadIdx.x / nn_detail::kWarp;
  const int lane = int(threadIdx.x % nn_detail::kWarp);
  if (row >= rows) return;
  const S* xr = x + row * d;
  float ss = 0.f;
  for (int c = lane; c < d; c += nn_detail::kWarp) {
    const float v = load_f32(xr, std::size_t(c));
    ss += v * v;
  }
  const float r = 1.f / sqrtf(warp_sum(ss) / float(d) + eps);
  for (int c = lane; c < d; c += nn_detail::kWarp)  // y may alias x: each element is read before it is written
    store_f32(y + row * d, std::size_t(c), load_f32(xr, std::size_t(c)) * r * load_f32(w, std::size_t(c)));
}
template <class S>
cudaError_t rms_norm_forward(const S* x, const S* w, std::int64_t rows, std::int64_t d, float eps, S* y, cudaStream_t stream) {
  if (rows < 0 || d <= 0 || d > (1 << 30) || !(eps > 0.f)) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (!x || !w || !y) return cudaErrorInvalidValue;
  rms_norm_forward_kernel<S><<<nn_detail::warp_rows_grid(rows), nn_detail::kThreads, 0, stream>>>(x, w, rows, int(d), eps, y);
  return cudaGetLastError();
}

// dx = r (w dy - x r² mean(w dy x)) per row (overwritten), and r kept for the weight's gradient.
template <class S>
MOEKIT_KERNEL void rms_norm_dx_kernel(const S* x, const S* w, const S* dy, std::int64_t rows, int d, float eps, S* dx, float* rstd) {
  const std::int64_t row = std::int64_t(blockIdx.x) * (blockDim.x / nn_detail::kWarp) + threadIdx.x / nn_detail::kWarp;
  const int lane = int(threadIdx.x % nn_detail::kWarp);
  if (row >= rows) return;
  const S* xr = x + row * d;
  const S* gr = dy + row * d;
  float ss = 0.f, dot = 0.f;
  for (int c = lane; c < d; c += nn_detail::kWarp) {
    const float xv = load_f32(xr, std::size_t(c));
    ss += xv * xv;
    dot += load_f32(w, std::size_t(c)) * load_f32(gr, std::size_t(c)) * xv;
  }
  const float r = 1.f / sqrtf(warp_sum(ss) / float(d) + eps);
  const float coef = r * r * warp_sum(dot) / float(d);
  if (lane == 0) rstd[row] = r;
  for (int c = lane; c < d; c += nn_detail::kWarp)
    store_f32(dx + row * d, std::size_t(c),
              r * (load_f32(w, std::size_t(c)) * load_f32(gr, std::size_t(c)) - load_f32(xr, std::size_t(c)) * coef));
}
inline constexpr int kNormRowChunk = 64;  // rows per partial sum of the weight's gradient
// partial[chunk, c] = Σ_{t in chunk} dy[t, c] x[t, c] r[t], rows in order.
template <class S>
MOEKIT_KERNEL void rms_norm_dw_partial_kernel(const S* x, const S* dy, const float* rstd, std::int64_t rows, int d, float* partial) {
  const int c = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (c >= d) return;
  const std::int64_t t0 = std::int64_t(blockIdx.y) * kNormRowChunk;
  const std::int64_t t1 = t0 + kNormRowChunk < rows ? t0 + kNormRowChunk : rows;
  float acc = 0.f;
  for (std::int64_t t = t0; t < t1; ++t)
    acc += load_f32(dy, std::size_t(t * d + c)) * load_f32(x, std::size_t(t * d + c)) * rstd[t];
  partial[std::int64_t(blockIdx.y) * d + c] = acc;
}
// dw[c] += Σ_chunk partial[chunk, c], chunks in order.
template <class D>
MOEKIT_KERNEL void column_sum_kernel(const D* partial, std::int64_t chunks, int d, D* dw) {
  const int c = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (c >= d) return;
  D acc = 0;
  for (std::int64_t k = 0; k < chunks; ++k) acc += partial[k * d + c];
  dw[c] += acc;
}
// Floats of scratch rms_norm_backward needs for `rows` rows of width d.
inline std::int64_t rms_norm_backward_workspace(std::int64_t rows, std::int64_t d) {
  return rows + (rows + kNormRowChunk - 1) / kNormRowChunk * d;
}
// dx overwritten; dw [d] fp32 accumulated (+=). workspace: rms_norm_backward_workspace floats.
template <class S>
cudaError_t rms_norm_backward(const S* x, const S* w, const S* dy, std::int64_t rows, std::int64_t d, float eps, S* dx, float* dw,
                              float* workspace, cudaStream_t stream) {
  if (rows < 0 || d <= 0 || d > (1 << 30) || !(eps > 0.f)) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (!x || !w || !dy || !dx || !dw || !workspace) return cudaErrorInvalidValue;
  float* rstd = workspace;
  float* partial = workspace + rows;
  const std::int64_t chunks = (rows + kNormRowChunk - 1) / kNormRowChunk;
  if (chunks > 65535) return cudaErrorInvalidValue;  // gridDim.y
  rms_norm_dx_kernel<S><<<nn_detail::warp_rows_grid(rows), nn_detail::kThreads, 0, stream>>>(x, w, dy, rows, int(d), eps, dx, rstd);
  MOEKIT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  const unsigned col_blocks = unsigned((d + 127) / 128);
  rms_norm_dw_partial_kernel<S><<<dim3(col_blocks, unsigned(chunks)), 128, 0, stream>>>(x, dy, rstd, rows, int(d), partial);
  MOEKIT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  column_sum_kernel<float><<<col_blocks, 128, 0, stream>>>(partial, chunks, int(d), dw);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------------
// Rotary embedding (rotate-half): in each of `heads` head vectors of 2·half values at x + r·stride,
// pair (i, i + half) turns by sign · angle(r % seq, i); cos/sin tables [max_seq, half] in fp32.
template <class S>
MOEKIT_KERNEL void rotary_kernel(S* x, const float* cosines, const float* sines, std::int64_t rows, int seq, int heads, int half,
                                 std::int64_t stride, float sign) {
  const std::int64_t per_row = std::int64_t(heads) * half;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < rows * per_row; i += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t r = i / per_row;
    const int h = int((i % per_row) / half), j = int(i % half);
    const std::int64_t t = (r % seq) * half + j;
    const float c = cosines[t], s = sign * sines[t];
    const std::size_t lo = std::size_t(r * stride + std::int64_t(h) * 2 * half + j), hi = lo + std::size_t(half);
    const float a = load_f32(x, lo), b = load_f32(x, hi);
    store_f32(x, lo, a * c - b * s);
    store_f32(x, hi, a * s + b * c);
  }
}
template <class S>
cudaError_t rotary_apply(S* x, const float* cosines, const float* sines, std::int64_t rows, std::int64_t seq, std::int64_t heads,
                         std::int64_t head_dim, std::int64_t stride, bool inverse, cudaStream_t stream) {
  if (rows < 0 || seq <= 0 || rows % seq != 0 || heads < 0 || head_dim <= 0 || head_dim % 2 != 0 || stride < heads * head_dim)
    return cudaErrorInvalidValue;
  if (rows == 0 || heads == 0) return cudaSuccess;
  if (!x || !cosines || !sines) return cudaErrorInvalidValue;
  rotary_kernel<S><<<nn_detail::grid_for(rows * heads * head_dim / 2), nn_detail::kThreads, 0, stream>>>(
      x, cosines, sines, rows, int(seq), int(heads), int(head_dim / 2), stride, inverse ? -1.f : 1.f);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------------
// Causal softmax over `rows` rows of `seq` scores (row r is query r % seq of its matrix): p_j =
// softmax over j <= i, exactly 0 for j > i. One warp per row; p may alias scores (fp32).
template <class S>
MOEKIT_KERNEL void causal_softmax_kernel(const float* scores, S* p, std::int64_t rows, int seq) {
  const std::int64_t row = std::int64_t(blockIdx.x) * (blockDim.x / nn_detail::kWarp) + threadIdx.x / nn_detail::kWarp;
  const int lane = int(threadIdx.x % nn_detail::kWarp);
  if (row >= rows) return;
  const int i = int(row % seq);
  const float* sr = scores + row * seq;
  float m = -INFINITY;
  for (int j = lane; j <= i; j += nn_detail::kWarp) m = fmaxf(m, sr[j]);
  m = warp_max(m);
  float sum = 0.f;
  for (int j = lane; j <= i; j += nn_detail::kWarp) sum += expf(sr[j] - m);
  const float inv = 1.f / warp_sum(sum);
  for (int j = lane; j < seq; j += nn_detail::kWarp)  // each element read before it is written, by one thread
    store_f32(p + row * seq, std::size_t(j), j <= i ? expf(sr[j] - m) * inv : 0.f);
}
template <class S>
cudaError_t causal_softmax(const float* scores, S* p, std::int64_t rows, std::int64_t seq, cudaStream_t stream) {
  if (rows < 0 || seq <= 0 || rows % seq != 0 || seq > (1 << 30)) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (!scores || !p) return cudaErrorInvalidValue;
  causal_softmax_kernel<S><<<nn_detail::warp_rows_grid(rows), nn_detail::kThreads, 0, stream>>>(scores, p, rows, int(seq));
  return cudaGetLastError();
}
// ds_j = scale · p_j (dp_j - Σ_k dp_k p_k) for j <= i, else 0. ds may alias dp (fp32).
template <class S>
MOEKIT_KERNEL void causal_softmax_backward_kernel(const S* p, const float* dp, S* ds, std::int64_t rows, int seq, float scale) {
  const std::int64_t row = std::int64_t(blockIdx.x) * (blockDim.x / nn_detail::kWarp) + threadIdx.x / nn_detail::kWarp;
  const int lane = int(threadIdx.x % nn_detail::kWarp);
  if (row >= rows) return;
  const int i = int(row % seq);
  const S* pr = p + row * seq;
  const float* dr = dp + row * seq;
  float dot = 0.f;
  for (int j = lane; j <= i; j += nn_detail::kWarp) dot += dr[j] * load_f32(pr, std::size_t(j));
  dot = warp_sum(dot);
  for (int j = lane; j < seq; j += nn_detail::kWarp)
    store_f32(ds + row * seq, std::size_t(j), j <= i ? load_f32(pr, std::size_t(j)) * (dr[j] - dot) * scale : 0.f);
}
template <class S>
cudaError_t causal_softmax_backward(const S* p, const float* dp, S* ds, std::int64_t rows, std::int64_t seq, float scale,
                                    cudaStream_t stream) {
  if (rows < 0 || seq <= 0 || rows % seq != 0 || seq > (1 << 30)) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (!p || !dp || !ds) return cudaErrorInvalidValue;
  causal_softmax_backward_kernel<S><<<nn_detail::warp_rows_grid(rows), nn_detail::kThreads, 0, stream>>>(p, dp, ds, rows, int(seq), scale);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------------
// Softmax cross-entropy, one block per row: token_loss[t] = logsumexp(l_t) - l_t[y_t] and (when dlogits
// is not null) dlogits_t = scale (softmax(l_t) - onehot(y_t)). A target outside [0, vocab) gives a NaN
// loss (the nn/cuda function checks the targets on the host first).
template <class S, int Threads>
MOEKIT_KERNEL void cross_entropy_kernel(const S* logits, const int* targets, int vocab, float scale, S* dlogits, float* token_loss) {
  using Reduce = cub::BlockReduce<float, Threads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ float shared_max, shared_lse;
  const std::int64_t row = blockIdx.x;
  const S* l = logits + row * vocab;
  float m = -INFINITY;
  for (int v = int(threadIdx.x); v < vocab; v += Threads) m = fmaxf(m, load_f32(l, std::size_t(v)));
  m = Reduce(tmp).Reduce(m, [](float a, float b) { return fmaxf(a, b); });
  if (threadIdx.x == 0) shared_max = m;
  __syncthreads();
  m = shared_max;
  float sum = 0.f;
  for (int v = int(threadIdx.x); v < vocab; v += Threads) sum += expf(load_f32(l, std::size_t(v)) - m);
  sum = Reduce(tmp).Sum(sum);
  const int y = targets[row];
  if (threadIdx.x == 0) {
    shared_lse = m + logf(sum);
    token_loss[row] = y >= 0 && y < vocab ? shared_lse - load_f32(l, std::size_t(y)) : __int_as_float(0x7fc00000);
  }
  __syncthreads();
  if (!dlogits) return;
  const float lse = shared_lse;
  for (int v = int(threadIdx.x); v < vocab; v += Threads)
    store_f32(dlogits + row * vocab, std::size_t(v), scale * expf(load_f32(l, std::size_t(v)) - lse) - (v == y ? scale : 0.f));
}
// out[0] = Σ v[i] / n in double, in a fixed order (per-thread strided sums, then a fixed tree).
template <class F>
MOEKIT_KERNEL void mean_kernel(const F* v, std::int64_t n, double* out) {
  using Reduce = cub::BlockReduce<double, 256>;
  __shared__ typename Reduce::TempStorage tmp;
  double acc = 0.0;
  for (std::int64_t i = threadIdx.x; i < n; i += 256) acc += double(v[i]);
  acc = Reduce(tmp).Sum(acc);
  if (threadIdx.x == 0) out[0] = n > 0 ? acc / double(n) : 0.0;
}
// token_loss [rows] fp32 (scratch or the caller's), mean_out: one double on the device.
template <class S>
cudaError_t softmax_cross_entropy(const S* logits, const int* targets, std::int64_t rows, std::int64_t vocab, float scale, S* dlogits,
                                  float* token_loss, double* mean_out, cudaStream_t stream) {
  if (rows < 0 || vocab <= 0 || vocab > (1 << 30) || rows > (std::int64_t(1) << 31) - 1) return cudaErrorInvalidValue;
  if (!mean_out || (rows > 0 && (!logits || !targets || !token_loss))) return cudaErrorInvalidValue;
  if (rows > 0) cross_entropy_kernel<S, 256><<<unsigned(rows), 256, 0, stream>>>(logits, targets, int(vocab), scale, dlogits, token_loss);
  MOEKIT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  mean_kernel<float><<<1, 256, 0, stream>>>(token_loss, rows, mean_out);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------------
// out = a + b (out may alias a or b), and into += b: the residual stream.
template <class S>
MOEKIT_KERNEL void add_kernel(const S* a, const S* b, S* out, std::int64_t n) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += std::int64_t(gridDim.x) * blockDim.x)
    store_f32(out, std::size_t(i), load_f32(a, std::size_t(i)) + load_f32(b, std::size_t(i)));
}
template <class S>
cudaError_t add(const S* a, const S* b, S* out, std::int64_t n, cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (!a || !b || !out) return cudaErrorInvalidValue;
  add_kernel<S><<<nn_detail::grid_for(n), nn_detail::kThreads, 0, stream>>>(a, b, out, n);
  return cudaGetLastError();
}

}  // namespace MOEKIT_CUDA_ABI
}  // namespace moekit::backend::cuda
