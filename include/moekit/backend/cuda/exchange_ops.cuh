#pragma once
// The CUDA row operations for parallel::ExpertExchange (parallel/exchange.hpp): device buffers sized by
// reserve() (ensure() only checks: nothing is allocated in forward or backward), stream-ordered copies,
// and comm::Nccl's collectives on the caller's stream.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "moekit/backend/cuda/memory.cuh"
#include "moekit/backend/cuda/router.cuh"  // kNoBadToken
#include "moekit/backend/cuda/status.cuh"
#include "moekit/core/error.hpp"

namespace moekit::comm {
class Nccl;  // parallel/comm/nccl.cuh: needed only where a distributed layer is made
}

namespace moekit::backend::cuda {
inline namespace MOEKIT_CUDA_ABI {

// counts[e] = offsets[c·F + e + 1] - offsets[c·F + e]: the rows chunk c sends to each FFN expert.
template <class I>
MOEKIT_KERNEL void chunk_counts_kernel(const int* offsets, int chunk, int ffn, I* counts) {
  const int e = int(blockIdx.x) * int(blockDim.x) + int(threadIdx.x);
  if (e < ffn) counts[e] = I(offsets[chunk * ffn + e + 1] - offsets[chunk * ffn + e]);
}
// *v = value (the token count next to the routed counts, the capacity next to the counts).
template <class I>
MOEKIT_KERNEL void set_value_kernel(I* v, I value) {
  *v = value;
}
// *flag = 1 when this rank saw a non-finite logit (route_tokens' bad token), else 0.
template <class I>
MOEKIT_KERNEL void bad_flag_kernel(const int* bad_token, I* flag) {
  *flag = *bad_token != kNoBadToken ? 1 : 0;
}

template <class G>
MOEKIT_KERNEL void scale_kernel(G* v, std::int64_t n, float factor) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += std::int64_t(gridDim.x) * blockDim.x)
    v[i] = G(float(v[i]) * factor);
}

template <class S, class C = comm::Nccl>
struct ExchangeOps {
  using value_type = S;
  using Comm = C;
  using Context = cudaStream_t;
  using Buffer = DeviceArray<S>;

  static void reserve(Buffer& b, std::size_t n) {
    if (b.size() < n) b.resize(n);
  }
  static S* ensure(Buffer& b, std::size_t n) {
    if (b.size() < n)
      throw ShapeError("expert exchange: " + std::to_string(n) + " elements needed, " + std::to_string(b.size()) +
                       " reserved (every rank must reserve() the largest token count any rank uses)");
    return b.data();
  }
  template <class E>
  static void copy(E* dst, const E* src, std::size_t n, Context s) {
    if (n) MOEKIT_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(E), cudaMemcpyDeviceToDevice, s));
  }
  static void a2a(Comm& c, const S* send, const std::int64_t* sc, S* recv, const std::int64_t* rc, Context s) {
    c.all_to_all_v(send, sc, recv, rc, s);
  }
  static void all_gather_v(Comm& c, const S* send, const std::int64_t* counts, S* recv, Context s) {
    c.all_gather_v(send, counts, recv, s);
  }
  static void reduce_scatter_v(Comm& c, const S* send, const std::int64_t* counts, S* recv, Context s) {
    c.reduce_scatter_v(send, counts, recv, s);
  }
  template <class G>
  static void all_reduce(Comm& c, G* v, std::size_t n, Context s) {
    c.all_reduce_sum(v, n, s);
  }
  template <class E>
  static void all_gather(Comm& c, const E* send, std::size_t n, E* recv, Context s) {
    c.all_gather(send, n, recv, s);
  }
  // NCCL errors and timeouts surface here (comm::Nccl::wait), not as a hang in a later synchronisation.
  static void wait(Comm& c, Context s) { c.wait(s); }
  // A collective on host values (the bias update's step counts): staged through the device; synchronises.
  static void all_reduce_host(Comm& c, std::int64_t* v, std::size_t n, Context s) {
    DeviceArray<std::int64_t> d(n);
    MOEKIT_CUDA_CHECK(cudaMemcpyAsync(d.data(), v, n * sizeof(std::int64_t), cudaMemcpyHostToDevice, s));
    c.all_reduce_sum(d.data(), n, s);
    c.wait(s);
    MOEKIT_CUDA_CHECK(cudaMemcpyAsync(v, d.data(), n * sizeof(std::int64_t), cudaMemcpyDeviceToHost, s));
    MOEKIT_CUDA_CHECK(cudaStreamSynchronize(s));
  }
  // The communicator of one rank group, and the config agreement's all-gather on the world (host values,
  // staged through the device).
  template <class W>
  static std::unique_ptr<Comm> split(W& world, int color, int key) {
    return std::make_unique<Comm>(world.split(color, key));
  }
  template <class W>
  static void gather_config(W& world, const std::int64_t* mine, std::size_t n, std::int64_t* all) {
    DeviceArray<std::int64_t> a(n), b(n * std::size_t(world.size()));
    copy_to_device(a.data(), mine, n * sizeof(std::int64_t));
    world.all_gather(a.data(), n, b.data());
    world.wait();
    MOEKIT_CUDA_CHECK(cudaMemcpy(all, b.data(), b.size() * sizeof(std::int64_t), cudaMemcpyDeviceToHost));
  }
  // The statistics block (on the device, on the stream): my chunk's counts per FFN expert, a value, the
  // non-finite flag.
  static void chunk_counts(const int* offsets, int chunk, int ffn, int* counts, Context s) {
    if (ffn == 0) return;
    chunk_counts_kernel<int><<<unsigned((ffn + 127) / 128), 128, 0, s>>>(offsets, chunk, ffn, counts);
    MOEKIT_CUDA_CHECK(cudaGetLastError());
  }
  static void set_value(int* v, int value, Context s) {
    set_value_kernel<int><<<1, 1, 0, s>>>(v, value);
    MOEKIT_CUDA_CHECK(cudaGetLastError());
  }
  static void bad_flag(const int* bad_token, int* flag, Context s) {
    bad_flag_kernel<int><<<1, 1, 0, s>>>(bad_token, flag);
    MOEKIT_CUDA_CHECK(cudaGetLastError());
  }

  template <class G>
  static void scale(G* v, std::int64_t n, double factor, Context s) {
    if (n == 0) return;
    const std::int64_t blocks = (n + 255) / 256;
    scale_kernel<G><<<unsigned(blocks < 4096 ? blocks : 4096), 256, 0, s>>>(v, n, float(factor));
    MOEKIT_CUDA_CHECK(cudaGetLastError());
  }
};

}  // namespace MOEKIT_CUDA_ABI
}  // namespace moekit::backend::cuda
