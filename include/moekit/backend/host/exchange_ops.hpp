#pragma once
// The host's row operations for parallel::ExpertExchange (parallel/exchange.hpp): std::vector buffers
// that grow on demand, std::copy, and comm::HostCommunicator's collectives (comm::Mpi, comm::Single);
// and the few operations on the statistics block that MoeLayer's exchange_stats makes
// (layer/pipeline.hpp), as plain host code.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "moekit/layer/routing_plan.hpp"

#include "moekit/parallel/comm/communicator.hpp"

namespace moekit::backend::host {

template <class T>
struct ExchangeOps {
  using value_type = T;
  using Comm = comm::HostCommunicator;
  struct Context {};
  using Buffer = std::vector<T>;

  static void reserve(Buffer& b, std::size_t n) {
    if (b.size() < n) b.resize(n);
  }
  static T* ensure(Buffer& b, std::size_t n) {
    reserve(b, n);
    return b.data();
  }
  template <class E>
  static void copy(E* dst, const E* src, std::size_t n, Context) {
    std::copy_n(src, n, dst);
  }
  static void a2a(Comm& c, const T* send, const std::int64_t* sc, T* recv, const std::int64_t* rc, Context) {
    c.all_to_all_v(send, sc, recv, rc);
  }
  static void all_gather_v(Comm& c, const T* send, const std::int64_t* counts, T* recv, Context) { c.all_gather_v(send, counts, recv); }
  static void reduce_scatter_v(Comm& c, const T* send, const std::int64_t* counts, T* recv, Context) {
    c.reduce_scatter_v(send, counts, recv);
  }
  template <class G>
  static void all_reduce(Comm& c, G* v, std::size_t n, Context) {
    c.all_reduce_sum(v, n);
  }
  template <class E>
  static void all_gather(Comm& c, const E* send, std::size_t n, E* recv, Context) {
    c.all_gather(send, n, recv);
  }
  static void wait(Comm&, Context) {}  // host collectives are complete when they return
  // A collective on host values (the bias update's step counts).
  static void all_reduce_host(Comm& c, std::int64_t* v, std::size_t n, Context) { c.all_reduce_sum(v, n); }
  // The communicator of one rank group, and the config agreement's all-gather on the world.
  static std::unique_ptr<Comm> split(Comm& world, int color, int key) { return world.split(color, key); }
  static void gather_config(Comm& world, const std::int64_t* mine, std::size_t n, std::int64_t* all) {
    world.all_gather(mine, n, all);
  }
  // The statistics block: my chunk's counts per FFN expert, a value, the non-finite flag.
  static void chunk_counts(const std::int32_t* offsets, int chunk, int ffn, std::int32_t* counts, Context) {
    for (int e = 0; e < ffn; ++e) counts[e] = offsets[chunk * ffn + e + 1] - offsets[chunk * ffn + e];
  }
  static void set_value(std::int32_t* v, std::int32_t value, Context) { *v = value; }
  static void bad_flag(const std::int32_t* bad_token, std::int32_t* flag, Context) { *flag = *bad_token != kNoBadToken ? 1 : 0; }

  template <class G>
  static void scale(G* v, std::int64_t n, double factor, Context) {
    const G f = G(factor);
    for (std::int64_t i = 0; i < n; ++i) v[i] *= f;
  }
};

}  // namespace moekit::backend::host
