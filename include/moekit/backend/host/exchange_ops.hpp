#pragma once
// The host's row operations for parallel::ExpertExchange (parallel/exchange.hpp): std::vector buffers
// that grow on demand, std::copy, and comm::HostCommunicator's collectives (comm::Mpi, comm::Single).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

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
  static void copy(T* dst, const T* src, std::size_t n, Context) { std::copy_n(src, n, dst); }
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
  template <class G>
  static void scale(G* v, std::int64_t n, double factor, Context) {
    const G f = G(factor);
    for (std::int64_t i = 0; i < n; ++i) v[i] *= f;
  }
};

}  // namespace moekit::backend::host
