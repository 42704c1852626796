#pragma once
// Communicators (docs/design.md §5): one interface for a group of ranks: rank, size, split into sub-groups,
// all-reduce (sum), all-gather(-v), reduce-scatter(-v), all-to-all-v, broadcast, barrier. Host
// communicators (comm::Single, comm::Mpi) take host buffers; comm::Nccl (nccl.cuh) takes device buffers
// and a stream and has the same operations. Every communicator counts the bytes this rank sends to
// other ranks, per kind of collective, so communication volume is measurable (bytes to itself are not
// counted: they never leave the rank).
//
// Counts and displacements are in elements; "-v" collectives take one count per rank of the group and
// pack the blocks contiguously in rank order.
#include <array>
#include <cstdlib>
#include <cstring>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace moekit::comm {

enum class Collective { kAllReduce, kAllGather, kReduceScatter, kAllToAll, kBroadcast, kBarrier, kCount };
inline const char* to_string(Collective c) {
  static const char* names[] = {"all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "barrier"};
  return c < Collective::kCount ? names[int(c)] : "?";
}

// Bytes this rank sent to other ranks and calls made, per collective.
struct ByteCounters {
  std::array<std::int64_t, std::size_t(Collective::kCount)> bytes{}, calls{};
  std::int64_t operator[](Collective c) const { return bytes[std::size_t(c)]; }
  std::int64_t calls_of(Collective c) const { return calls[std::size_t(c)]; }
  void add(Collective c, std::int64_t b) {
    bytes[std::size_t(c)] += b;
    calls[std::size_t(c)] += 1;
  }
  std::int64_t total() const {
    std::int64_t t = 0;
    for (auto b : bytes) t += b;
    return t;
  }
  void reset() { *this = ByteCounters{}; }
};

// Seconds a collective may wait before the communicator gives up (MOEKIT_COMM_TIMEOUT_S; 0 = no limit).
inline double default_comm_timeout_s() {
  const char* e = std::getenv("MOEKIT_COMM_TIMEOUT_S");
  return e ? std::atof(e) : 300.0;
}

// A collective failed, timed out, or the ranks disagree: every rank of the group gets one.
class CommError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class DType { kF32, kF64, kI32, kI64 };
template <class T>
constexpr DType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return DType::kF32;
  else if constexpr (std::is_same_v<T, double>) return DType::kF64;
  else if constexpr (std::is_same_v<T, std::int32_t>) return DType::kI32;
  else {
    static_assert(std::is_same_v<T, std::int64_t>, "comm: element type must be float, double, int32 or int64");
    return DType::kI64;
  }
}
inline std::size_t size_of(DType t) { return t == DType::kF32 || t == DType::kI32 ? 4 : 8; }

// The interface of host communicators. Implementations provide the untyped operations; callers use the
// typed wrappers below. Every rank of the group must call the same collectives in the same order.
class HostCommunicator {
 public:
  virtual ~HostCommunicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Ranks with the same color form a group, ordered by key (then by rank). Collective over this group.
  virtual std::unique_ptr<HostCommunicator> split(int color, int key) = 0;
  virtual void barrier() = 0;

  // Typed operations.
  template <class T>
  void all_reduce_sum(T* data, std::size_t n) {
    all_reduce_(data, n, dtype_of<T>());
  }
  // recv holds Σ counts elements: rank r's `counts[r]` elements at offset Σ_{q<r} counts[q].
  template <class T>
  void all_gather_v(const T* send, const std::int64_t* counts, T* recv) {
    all_gather_v_(send, counts, recv, dtype_of<T>());
  }
  template <class T>
  void all_gather(const T* send, std::size_t n, T* recv) {
    const std::vector<std::int64_t> counts(static_cast<std::size_t>(size()), static_cast<std::int64_t>(n));
    all_gather_v_(send, counts.data(), recv, dtype_of<T>());
  }
  // send holds Σ counts elements (block r for rank r); each rank receives the sum of its block.
  template <class T>
  void reduce_scatter_v(const T* send, const std::int64_t* counts, T* recv) {
    reduce_scatter_v_(send, counts, recv, dtype_of<T>());
  }
  // send: block r (send_counts[r] elements) goes to rank r; recv: block r came from rank r.
  template <class T>
  void all_to_all_v(const T* send, const std::int64_t* send_counts, T* recv, const std::int64_t* recv_counts) {
    all_to_all_v_(send, send_counts, recv, recv_counts, dtype_of<T>());
  }
  template <class T>
  void broadcast(T* data, std::size_t n, int root) {
    broadcast_(data, n, root, dtype_of<T>());
  }

  const ByteCounters& counters() const { return counters_; }
  ByteCounters& counters() { return counters_; }

 protected:
  virtual void all_reduce_(void* data, std::size_t n, DType t) = 0;
  virtual void all_gather_v_(const void* send, const std::int64_t* counts, void* recv, DType t) = 0;
  virtual void reduce_scatter_v_(const void* send, const std::int64_t* counts, void* recv, DType t) = 0;
  virtual void all_to_all_v_(const void* send, const std::int64_t* send_counts, void* recv,
                             const std::int64_t* recv_counts, DType t) = 0;
  virtual void broadcast_(void* data, std::size_t n, int root, DType t) = 0;
  ByteCounters counters_;
};

// The operations every communicator offers (host or device buffers).
template <class C>
concept Communicator = requires(C& c, float* f, const float* cf, const std::int64_t* counts, std::size_t n) {
  { c.rank() } -> std::convertible_to<int>;
  { c.size() } -> std::convertible_to<int>;
  c.split(0, 0);
  c.barrier();
  c.all_reduce_sum(f, n);
  c.all_gather_v(cf, counts, f);
  c.reduce_scatter_v(cf, counts, f);
  c.all_to_all_v(cf, counts, f, counts);
  c.broadcast(f, n, 0);
  { c.counters() } -> std::convertible_to<const ByteCounters&>;
};

// Every rank's string, in rank order (error messages, names, small JSON): the lengths, then the bytes
// packed into int64 words, in two all-gathers. Collective over c.
inline std::vector<std::string> all_gather_strings(HostCommunicator& c, const std::string& mine) {
  const auto n = static_cast<std::size_t>(c.size());
  std::int64_t len = static_cast<std::int64_t>(mine.size());
  std::vector<std::int64_t> lens(n);
  c.all_gather(&len, 1, lens.data());
  std::vector<std::int64_t> words(n), send((mine.size() + 7) / 8, 0);
  std::int64_t total = 0;
  for (std::size_t r = 0; r < n; ++r) total += words[r] = (lens[r] + 7) / 8;
  if (!mine.empty()) std::memcpy(send.data(), mine.data(), mine.size());
  std::vector<std::int64_t> recv(static_cast<std::size_t>(total));
  c.all_gather_v(send.data(), words.data(), recv.data());
  std::vector<std::string> out(n);
  std::size_t at = 0;
  for (std::size_t r = 0; r < n; ++r) {
    out[r].assign(reinterpret_cast<const char*>(recv.data() + at), static_cast<std::size_t>(lens[r]));
    at += static_cast<std::size_t>(words[r]);
  }
  return out;
}

// One rank: every collective is a copy (or nothing), and nothing is counted.
class Single final : public HostCommunicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::unique_ptr<HostCommunicator> split(int, int) override { return std::make_unique<Single>(); }
  void barrier() override {}

 protected:
  void all_reduce_(void*, std::size_t, DType) override {}
  void all_gather_v_(const void* send, const std::int64_t* counts, void* recv, DType t) override {
    copy(send, recv, std::size_t(counts[0]) * size_of(t));
  }
  void reduce_scatter_v_(const void* send, const std::int64_t* counts, void* recv, DType t) override {
    copy(send, recv, std::size_t(counts[0]) * size_of(t));
  }
  void all_to_all_v_(const void* send, const std::int64_t* send_counts, void* recv, const std::int64_t* recv_counts,
                     DType t) override {
    if (send_counts[0] != recv_counts[0])
      throw CommError("comm::Single::all_to_all_v: sends " + std::to_string(send_counts[0]) + " elements to itself but expects " +
                      std::to_string(recv_counts[0]));
    copy(send, recv, std::size_t(send_counts[0]) * size_of(t));
  }
  void broadcast_(void*, std::size_t, int, DType) override {}

 private:
  static void copy(const void* s, void* d, std::size_t bytes) {
    if (bytes && s != d) std::memmove(d, s, bytes);
  }
};
static_assert(Communicator<Single>);

}  // namespace moekit::comm
