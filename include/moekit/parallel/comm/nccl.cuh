#pragma once
// comm::Nccl: the device-buffer communicator over NCCL (docs/design.md §5). The operations of HostCommunicator
// (communicator.hpp) on device pointers, each with a trailing stream; bytes counted exactly as comm::Mpi
// counts them. Opt-in header: it needs <nccl.h> and linking NCCL (moekit::cuda links it and defines
// MOEKIT_HAS_NCCL=1 when NCCL was found). It holds no kernels: a .cpp built by the host compiler may include it.
//
// Collectives are enqueued on the caller's stream and return at once, as NCCL's do. `wait` (and barrier)
// poll the stream and NCCL's asynchronous error; on an error, or when MOEKIT_COMM_TIMEOUT_S (default 300 s;
// 0 waits forever) passes, they abort the communicator (ncclCommAbort) and throw CommError naming the last
// collective enqueued: a rank that never joins costs a timeout, not a hang. Arguments are checked on the
// host before anything is enqueued, so a bad argument throws CommError and leaves the communicator usable.
//
// Bootstrap: Nccl(id, nranks, rank) with an ncclUniqueId the caller distributed; Nccl::from_mpi(comm)
// with parallel/comm/nccl_mpi.hpp included; Nccl::single() for one rank. The CUDA device current at
// construction is the communicator's (set it first, e.g. local rank % device count). Construction and
// split block on the host until every rank joins (NCCL's blocking mode); they have no timeout.
// Not thread-safe: one host thread drives one communicator. wait and barrier query the stream, so they are
// not for use while it is being captured into a CUDA graph (the collectives themselves may be captured).
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <span>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "moekit/backend/cuda/memory.cuh"  // device_malloc
#include "moekit/backend/cuda/status.cuh"
#include "moekit/parallel/comm/communicator.hpp"

static_assert(NCCL_VERSION_CODE >= NCCL_VERSION(2, 18, 0),
              "comm::Nccl needs NCCL 2.18 or newer (ncclCommSplit, ncclConfig_t, ncclGetLastError, ncclBfloat16)");

namespace moekit::comm {

namespace detail {
template <class>
inline constexpr bool kNcclUnsupported = false;

struct NcclType {
  ncclDataType_t id;
  std::size_t bytes;
};
template <class T>
constexpr NcclType nccl_type_of() {
  if constexpr (std::is_same_v<T, float>) return {ncclFloat32, 4};
  else if constexpr (std::is_same_v<T, double>) return {ncclFloat64, 8};
  else if constexpr (std::is_same_v<T, std::int32_t>) return {ncclInt32, 4};
  else if constexpr (std::is_same_v<T, std::int64_t>) return {ncclInt64, 8};
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return {ncclBfloat16, 2};
  else {
    static_assert(kNcclUnsupported<T>, "comm::Nccl: element type must be float, double, int32, int64 or __nv_bfloat16");
    return {ncclFloat32, 4};
  }
}

// Same variable and default as comm::Mpi (mpi.hpp), read here so that this header does not need MPI.
}  // namespace detail

class Nccl {
 public:
  // Joins the communicator `id` (made by one rank with ncclGetUniqueId and sent to all) as `rank` of
  // `nranks`. Every rank must call it; it returns when all have.
  Nccl(ncclUniqueId id, int nranks, int rank, double timeout_s = default_comm_timeout_s())
      : rank_(rank), size_(nranks), timeout_s_(timeout_s) {
    if (nranks < 1 || rank < 0 || rank >= nranks)
      throw CommError("moekit::comm::Nccl: rank " + std::to_string(rank) + " of " + std::to_string(nranks) +
                      " is not a rank of the group (need 0 <= rank < nranks, nranks >= 1)");
    ncclConfig_t config = blocking_config();
    made(ncclCommInitRankConfig(&comm_, nranks, id, rank, &config), comm_, "ncclCommInitRankConfig");
    adopt();
  }

  // One rank on the current device: every collective is a copy (or nothing), nothing is counted.
  static Nccl single(double timeout_s = default_comm_timeout_s()) {
    ncclUniqueId id{};
    const ncclResult_t r = ncclGetUniqueId(&id);
    if (r != ncclSuccess)
      throw CommError(std::string("moekit::comm::Nccl::single: ncclGetUniqueId failed: ") + ncclGetErrorString(r) +
                      last_error(nullptr));
    return Nccl(id, 1, 0, timeout_s);
  }

  // Collective over an MPI communicator (an MPI_Comm, or a wrapper with native() -> MPI_Comm such as
  // comm::Mpi): rank 0 makes the id and MPI_Bcast sends it (with rank 0's status, so a failure there
  // throws on every rank instead of leaving the others waiting). Group rank r becomes NCCL rank r.
  // Declared here for every translation unit alike; defined in parallel/comm/nccl_mpi.hpp, which
  // includes <mpi.h> (so this class has the same members whether or not MPI was included first).
  template <class MpiComm>
  static Nccl from_mpi(const MpiComm& comm, double timeout_s = default_comm_timeout_s());

  ~Nccl() { release(); }
  Nccl(const Nccl&) = delete;
  Nccl& operator=(const Nccl&) = delete;
  Nccl(Nccl&& o) noexcept { *this = std::move(o); }
  Nccl& operator=(Nccl&& o) noexcept {
    if (this != &o) {
      release();
      comm_ = std::exchange(o.comm_, nullptr);
      scratch_ = std::exchange(o.scratch_, nullptr);
      rank_ = o.rank_;
      size_ = o.size_;
      device_ = o.device_;
      timeout_s_ = o.timeout_s_;
      uniform_fast_path_ = o.uniform_fast_path_;
      counters_ = o.counters_;
      last_op_ = o.last_op_;
      last_stream_ = o.last_stream_;
      aborted_ = std::move(o.aborted_);
    }
    return *this;
  }

  int rank() const { return rank_; }
  int size() const { return size_; }
  int device() const { return device_; }
  ncclComm_t native() const { return comm_; }
  double timeout_s() const { return timeout_s_; }
  const ByteCounters& counters() const { return counters_; }
  ByteCounters& counters() { return counters_; }

  // Ranks with the same color (>= 0) form a group, ordered by key, then by rank (ncclCommSplit). Collective
  // over this group. A negative color still takes part (as NCCL_SPLIT_NOCOLOR, so the others finish) and
  // then throws CommError on this rank.
  Nccl split(int color, int key) {
    ensure_live("split");
    ncclConfig_t config = blocking_config();
    ncclComm_t sub = nullptr;
    enqueued("ncclCommSplit (split)", nullptr);
    made(ncclCommSplit(comm_, color < 0 ? NCCL_SPLIT_NOCOLOR : color, key, &sub, &config), sub, "ncclCommSplit");
    if (color < 0) {
      if (sub) ncclCommDestroy(sub);
      throw CommError(where() + "split: color " + std::to_string(color) + " is negative (colors are >= 0)");
    }
    return Nccl(sub, timeout_s_, uniform_fast_path_);
  }

  // All ranks reach this point and their earlier work on `stream` is done: a one-int all-reduce, then wait.
  void barrier(cudaStream_t stream = nullptr) {
    ensure_live("barrier");
    enqueued("ncclAllReduce (barrier)", stream);
    check(ncclAllReduce(scratch_, scratch_, 1, ncclInt32, ncclSum, comm_, stream), "ncclAllReduce (barrier)");
    wait(stream, timeout_s_);
    counters_.add(Collective::kBarrier, 0);
  }

  // Blocks until `stream` is idle. Polls NCCL's asynchronous error meanwhile; on an error, a failed stream or
  // after timeout_s seconds (<= 0: no limit) aborts the communicator and throws CommError.
  void wait(cudaStream_t stream, double timeout_s) {
    ensure_live("wait");
    using Clock = std::chrono::steady_clock;
    const auto start = Clock::now();
    auto pause = std::chrono::microseconds(0);
    for (;;) {
      // Not cudaStreamQuery: its "not ready" would stay behind as the thread's last error and fail the
      // next launch (backend/cuda/status.cuh).
      const cudaError_t q = backend::cuda::stream_query(stream);
      ncclResult_t async = ncclSuccess;
      const ncclResult_t r = ncclCommGetAsyncError(comm_, &async);
      if (r != ncclSuccess) fail(std::string("ncclCommGetAsyncError failed: ") + ncclGetErrorString(r) + last_error(comm_));
      if (async != ncclSuccess && async != ncclInProgress)
        fail("asynchronous NCCL error after " + last_op() + ": " + ncclGetErrorString(async) + last_error(comm_));
      if (q == cudaSuccess) return;
      if (q != cudaErrorNotReady) {  // stream_query cleared it if it is not sticky; the message carries it
        fail("stream " + stream_name(stream) + " failed after " + last_op() + ": " + cudaGetErrorName(q) + " (" +
             cudaGetErrorString(q) + ")");
      }
      const double waited = std::chrono::duration<double>(Clock::now() - start).count();
      if (timeout_s > 0 && waited > timeout_s)
        fail("stream " + stream_name(stream) + " did not finish within " + seconds(timeout_s) + " s; last collective " +
             last_op() + ": a rank is missing, has failed or called a different collective; the communicator was aborted "
             "(MOEKIT_COMM_TIMEOUT_S sets the limit)");
      if (pause.count() == 0) std::this_thread::yield();
      else std::this_thread::sleep_for(pause);
      pause = std::min(pause * 2 + std::chrono::microseconds(1), std::chrono::microseconds(1000));
    }
  }
  void wait(cudaStream_t stream = nullptr) { wait(stream, timeout_s_); }

  // The -v collectives run NCCL's own collective when every count is equal (faster) and grouped calls
  // otherwise; off: always the grouped calls (so one GPU can test them; comparisons).
  void set_uniform_fast_path(bool on) noexcept { uniform_fast_path_ = on; }

  // Typed operations; every pointer is device memory, counts are in elements, blocks packed in rank order.
  template <class T>
  void all_reduce_sum(T* data, std::size_t n, cudaStream_t stream = nullptr) {
    all_reduce_(data, n, detail::nccl_type_of<T>(), stream);
  }
  // recv holds Σ counts elements: rank r's counts[r] at offset Σ_{q<r} counts[q]. send may be recv's own
  // block (in place); otherwise they must not overlap.
  template <class T>
  void all_gather_v(const T* send, const std::int64_t* counts, T* recv, cudaStream_t stream = nullptr) {
    all_gather_v_(send, counts, recv, detail::nccl_type_of<T>(), stream);
  }
  template <class T>
  void all_gather_v(const T* send, std::span<const std::int64_t> counts, T* recv, cudaStream_t stream = nullptr) {
    all_gather_v_(send, per_rank(counts, "all_gather_v", "counts"), recv, detail::nccl_type_of<T>(), stream);
  }
  template <class T>
  void all_gather(const T* send, std::size_t n, T* recv, cudaStream_t stream = nullptr) {
    const std::vector<std::int64_t> counts(std::size_t(size_), element_count(n, "all_gather"));
    all_gather_v_(send, counts.data(), recv, detail::nccl_type_of<T>(), stream);
  }
  // send holds Σ counts elements (block r for rank r); each rank receives the sum of its block. send and
  // recv must not overlap.
  template <class T>
  void reduce_scatter_v(const T* send, const std::int64_t* counts, T* recv, cudaStream_t stream = nullptr) {
    reduce_scatter_v_(send, counts, recv, detail::nccl_type_of<T>(), stream);
  }
  template <class T>
  void reduce_scatter_v(const T* send, std::span<const std::int64_t> counts, T* recv, cudaStream_t stream = nullptr) {
    reduce_scatter_v_(send, per_rank(counts, "reduce_scatter_v", "counts"), recv, detail::nccl_type_of<T>(), stream);
  }
  // send: block r (send_counts[r] elements) goes to rank r; recv: block r came from rank r. Rank a's
  // send_counts[b] must equal rank b's recv_counts[a] (exchange the counts first); send and recv must not
  // overlap.
  template <class T>
  void all_to_all_v(const T* send, const std::int64_t* send_counts, T* recv, const std::int64_t* recv_counts,
                    cudaStream_t stream = nullptr) {
    all_to_all_v_(send, send_counts, recv, recv_counts, detail::nccl_type_of<T>(), stream);
  }
  template <class T>
  void all_to_all_v(const T* send, std::span<const std::int64_t> send_counts, T* recv,
                    std::span<const std::int64_t> recv_counts, cudaStream_t stream = nullptr) {
    all_to_all_v_(send, per_rank(send_counts, "all_to_all_v", "send_counts"), recv,
                  per_rank(recv_counts, "all_to_all_v", "recv_counts"), detail::nccl_type_of<T>(), stream);
  }
  template <class T>
  void broadcast(T* data, std::size_t n, int root, cudaStream_t stream = nullptr) {
    broadcast_(data, n, root, detail::nccl_type_of<T>(), stream);
  }

 private:
  using Type = detail::NcclType;

  // A communicator made by ncclCommSplit.
  Nccl(ncclComm_t comm, double timeout_s, bool uniform_fast_path)
      : comm_(comm), timeout_s_(timeout_s), uniform_fast_path_(uniform_fast_path) {
    adopt();
  }

  // NCCL's group calls; the destructor closes a group left open by an exception.
  class Group {
   public:
    explicit Group(const Nccl& c) : c_(c) { c_.check(ncclGroupStart(), "ncclGroupStart"); }
    ~Group() {
      if (open_) (void)ncclGroupEnd();
    }
    Group(const Group&) = delete;
    Group& operator=(const Group&) = delete;
    void end() {
      open_ = false;
      c_.check(ncclGroupEnd(), "ncclGroupEnd");
    }

   private:
    const Nccl& c_;
    bool open_ = true;
  };

  void all_reduce_(void* data, std::size_t n, Type t, cudaStream_t stream) {
    ensure_live("all_reduce_sum");
    const std::int64_t count = element_count(n, "all_reduce_sum");
    check_bytes(count, t, "all_reduce_sum");
    check_device_pointer(data, count, "all_reduce_sum", "data");
    if (n > 0) {
      enqueued("ncclAllReduce (all_reduce_sum)", stream);
      check(ncclAllReduce(data, data, n, t.id, ncclSum, comm_, stream), "ncclAllReduce");
    }
    // Bandwidth-optimal (reduce-scatter + all-gather) volume: 2 (p-1)/p of the buffer, as comm::Mpi.
    counters_.add(Collective::kAllReduce, std::int64_t(2 * std::size_t(size_ - 1) * n * t.bytes / std::size_t(size_)));
  }

  void all_gather_v_(const void* send, const std::int64_t* counts, void* recv, Type t, cudaStream_t stream) {
    ensure_live("all_gather_v");
    const std::vector<std::int64_t> at = offsets(counts, t, "all_gather_v", "counts");
    check_device_pointer(send, counts[rank_], "all_gather_v", "send");
    check_device_pointer(recv, at[std::size_t(size_)], "all_gather_v", "recv");
    if (at[std::size_t(size_)] > 0) {
      if (uniform(counts)) {
        enqueued("ncclAllGather (all_gather_v)", stream);
        check(ncclAllGather(send, recv, std::size_t(counts[0]), t.id, comm_, stream), "ncclAllGather");
      } else {
        // One broadcast per root with a non-empty block; the root's own send -> recv copy is part of it.
        enqueued("grouped ncclBroadcast (all_gather_v)", stream);
        Group group(*this);
        for (int r = 0; r < size_; ++r) {
          if (counts[r] == 0) continue;
          void* block = offset(recv, at[std::size_t(r)], t);
          check(ncclBroadcast(r == rank_ ? send : block, block, std::size_t(counts[r]), t.id, r, comm_, stream),
                "ncclBroadcast (all_gather_v)");
        }
        group.end();
      }
    }
    counters_.add(Collective::kAllGather, counts[rank_] * (size_ - 1) * std::int64_t(t.bytes));
  }

  void reduce_scatter_v_(const void* send, const std::int64_t* counts, void* recv, Type t, cudaStream_t stream) {
    ensure_live("reduce_scatter_v");
    const std::vector<std::int64_t> at = offsets(counts, t, "reduce_scatter_v", "counts");
    check_device_pointer(send, at[std::size_t(size_)], "reduce_scatter_v", "send");
    check_device_pointer(recv, counts[rank_], "reduce_scatter_v", "recv");
    if (at[std::size_t(size_)] > 0) {
      if (uniform(counts)) {
        enqueued("ncclReduceScatter (reduce_scatter_v)", stream);
        check(ncclReduceScatter(send, recv, std::size_t(counts[0]), t.id, ncclSum, comm_, stream), "ncclReduceScatter");
      } else {
        // One reduce per root with a non-empty block (NCCL has no reduce-scatter-v).
        enqueued("grouped ncclReduce (reduce_scatter_v)", stream);
        Group group(*this);
        for (int r = 0; r < size_; ++r) {
          if (counts[r] == 0) continue;
          check(ncclReduce(offset(send, at[std::size_t(r)], t), r == rank_ ? recv : nullptr, std::size_t(counts[r]), t.id,
                           ncclSum, r, comm_, stream),
                "ncclReduce (reduce_scatter_v)");
        }
        group.end();
      }
    }
    counters_.add(Collective::kReduceScatter, others(counts) * std::int64_t(t.bytes));
  }

  void all_to_all_v_(const void* send, const std::int64_t* send_counts, void* recv, const std::int64_t* recv_counts,
                     Type t, cudaStream_t stream) {
    ensure_live("all_to_all_v");
    const std::vector<std::int64_t> sd = offsets(send_counts, t, "all_to_all_v", "send_counts");
    const std::vector<std::int64_t> rd = offsets(recv_counts, t, "all_to_all_v", "recv_counts");
    const std::size_t p = std::size_t(size_), me = std::size_t(rank_);
    if (send_counts[rank_] != recv_counts[rank_])
      throw CommError(where() + "all_to_all_v: sends " + std::to_string(send_counts[rank_]) +
                      " elements to itself but expects " + std::to_string(recv_counts[rank_]));
    check_device_pointer(send, sd[p], "all_to_all_v", "send");
    check_device_pointer(recv, rd[p], "all_to_all_v", "recv");
    const auto* s = static_cast<const char*>(send);
    const auto* d = static_cast<const char*>(recv);
    if (size_ > 1 && sd[p] > 0 && rd[p] > 0 && s < d + rd[p] * std::int64_t(t.bytes) && d < s + sd[p] * std::int64_t(t.bytes))
      throw CommError(where() + "all_to_all_v: send and recv overlap");
    enqueued("grouped ncclSend/ncclRecv (all_to_all_v)", stream);
    const std::size_t own = std::size_t(send_counts[rank_]) * t.bytes;
    const void* own_src = offset(send, sd[me], t);
    void* own_dst = offset(recv, rd[me], t);
    if (own > 0 && own_src != own_dst)
      check_cuda(cudaMemcpyAsync(own_dst, own_src, own, cudaMemcpyDeviceToDevice, stream), "cudaMemcpyAsync (all_to_all_v)");
    if (size_ > 1) {
      Group group(*this);
      for (int r = 0; r < size_; ++r) {
        if (r == rank_) continue;
        // Empty blocks are skipped on both sides (rank a's send_counts[b] == rank b's recv_counts[a]).
        if (send_counts[r] > 0)
          check(ncclSend(offset(send, sd[std::size_t(r)], t), std::size_t(send_counts[r]), t.id, r, comm_, stream), "ncclSend");
        if (recv_counts[r] > 0)
          check(ncclRecv(offset(recv, rd[std::size_t(r)], t), std::size_t(recv_counts[r]), t.id, r, comm_, stream), "ncclRecv");
      }
      group.end();
    }
    counters_.add(Collective::kAllToAll, others(send_counts) * std::int64_t(t.bytes));
  }

  void broadcast_(void* data, std::size_t n, int root, Type t, cudaStream_t stream) {
    ensure_live("broadcast");
    if (root < 0 || root >= size_)
      throw CommError(where() + "broadcast: root " + std::to_string(root) + " is not a rank of the group");
    const std::int64_t count = element_count(n, "broadcast");
    check_bytes(count, t, "broadcast");
    check_device_pointer(data, count, "broadcast", "data");
    if (n > 0) {
      enqueued("ncclBroadcast (broadcast)", stream);
      check(ncclBroadcast(data, data, n, t.id, root, comm_, stream), "ncclBroadcast");
    }
    counters_.add(Collective::kBroadcast, rank_ == root ? std::int64_t(n * t.bytes) * (size_ - 1) : 0);
  }

  // --- setup and teardown ---------------------------------------------------------------------------------
  static ncclConfig_t blocking_config() {
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 1;
    return config;
  }
  // Takes comm_ (just made): reads rank, size and device, allocates the barrier's int. Frees comm_ on failure.
  void adopt() {
    try {
      check(ncclCommUserRank(comm_, &rank_), "ncclCommUserRank");
      check(ncclCommCount(comm_, &size_), "ncclCommCount");
      check(ncclCommCuDevice(comm_, &device_), "ncclCommCuDevice");
      int current = 0;
      check_cuda(cudaGetDevice(&current), "cudaGetDevice");
      if (current != device_) check_cuda(cudaSetDevice(device_), "cudaSetDevice");
      void* p = nullptr;
      cudaError_t e = backend::cuda::device_malloc(&p, sizeof(std::int32_t));
      scratch_ = static_cast<std::int32_t*>(p);
      // Finished before any stream (the caller's may be non-blocking) reads it (backend/cuda/memory.cuh).
      if (e == cudaSuccess) e = cudaMemsetAsync(scratch_, 0, sizeof(std::int32_t), cudaStreamPerThread);
      if (e == cudaSuccess) e = cudaStreamSynchronize(cudaStreamPerThread);
      if (current != device_) (void)cudaSetDevice(current);
      check_cuda(e, "cudaMalloc/cudaMemset (barrier scratch)");
    } catch (...) {
      release();
      throw;
    }
  }
  // Never throws: a communicator with an outstanding asynchronous error is aborted instead of destroyed.
  void release() noexcept {
    if (comm_) {
      ncclResult_t async = ncclSuccess;
      if (ncclCommGetAsyncError(comm_, &async) != ncclSuccess || (async != ncclSuccess && async != ncclInProgress))
        (void)ncclCommAbort(comm_);
      else
        (void)ncclCommDestroy(comm_);
      comm_ = nullptr;
    }
    if (scratch_) {
      (void)cudaFree(scratch_);
      scratch_ = nullptr;
    }
  }

  // --- checks ---------------------------------------------------------------------------------------------
  std::string where() const {
    return "moekit::comm::Nccl: rank " + std::to_string(rank_) + " of " + std::to_string(size_) +
           (device_ >= 0 ? " (CUDA device " + std::to_string(device_) + ")" : std::string()) + ": ";
  }
  static std::string last_error(ncclComm_t comm) {
    const char* e = ncclGetLastError(comm);
    return e && *e ? std::string(" (") + e + ")" : std::string();
  }
  void check(ncclResult_t r, const char* call) const {
    if (r == ncclSuccess) return;
    throw CommError(where() + call + " failed: " + ncclGetErrorString(r) + last_error(comm_));
  }
  // A failed init or split may still hand back a communicator: abort it before throwing.
  void made(ncclResult_t r, ncclComm_t& comm, const char* call) const {
    if (r == ncclSuccess) return;
    const std::string msg = where() + call + " failed: " + ncclGetErrorString(r) + last_error(comm);
    if (comm) (void)ncclCommAbort(comm);
    comm = nullptr;
    throw CommError(msg);
  }
  void check_cuda(cudaError_t e, const char* call) const {
    if (e == cudaSuccess) return;
    backend::cuda::clear_last_error();  // the exception carries it (status.cuh)
    throw CommError(where() + call + " failed: " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
  }
  // Aborts the communicator (so that nothing waits on it) and throws `why`.
  [[noreturn]] void fail(const std::string& why) {
    const std::string msg = where() + why;
    if (comm_) (void)ncclCommAbort(comm_);
    comm_ = nullptr;
    aborted_ = msg;
    throw CommError(msg);
  }
  // A usable communicator, with no asynchronous error pending.
  void ensure_live(const char* op) {
    if (!comm_)
      throw CommError(where() + op + " on a communicator that " +
                      (aborted_.empty() ? std::string("was moved from") : "was aborted: " + aborted_));
    ncclResult_t async = ncclSuccess;
    if (ncclCommGetAsyncError(comm_, &async) == ncclSuccess && async != ncclSuccess && async != ncclInProgress)
      fail(std::string(op) + ": asynchronous NCCL error after " + last_op() + ": " + ncclGetErrorString(async) +
           last_error(comm_));
  }
  void enqueued(const char* op, cudaStream_t stream) {
    last_op_ = op;
    last_stream_ = stream;
  }
  std::string last_op() const { return std::string(last_op_) + " on stream " + stream_name(last_stream_); }
  static std::string seconds(double s) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%g", s);
    return buf;
  }
  static std::string stream_name(cudaStream_t s) {
    if (!s) return "0 (default)";
    char buf[32];
    std::snprintf(buf, sizeof buf, "%p", static_cast<void*>(s));
    return buf;
  }

  std::int64_t element_count(std::size_t n, const char* op) const {
    if (n > std::size_t(std::numeric_limits<std::int64_t>::max()))
      throw CommError(where() + op + ": " + std::to_string(n) + " elements is not a count");
    return std::int64_t(n);
  }
  void check_bytes(std::int64_t count, Type t, const char* op) const {
    if (count > std::numeric_limits<std::int64_t>::max() / std::int64_t(t.bytes))
      throw CommError(where() + op + ": " + std::to_string(count) + " elements overflow a byte count");
  }
  // One count per rank of the group.
  const std::int64_t* per_rank(std::span<const std::int64_t> counts, const char* op, const char* what) const {
    if (counts.size() != std::size_t(size_))
      throw CommError(where() + op + ": " + what + " has " + std::to_string(counts.size()) + " entries for a group of " +
                      std::to_string(size_) + " ranks");
    return counts.data();
  }
  // Offsets of the blocks, with their sum at [size]; throws on a null array, a negative count or overflow.
  std::vector<std::int64_t> offsets(const std::int64_t* counts, Type t, const char* op, const char* what) const {
    if (!counts) throw CommError(where() + op + ": " + what + " is null");
    std::vector<std::int64_t> at(std::size_t(size_) + 1, 0);
    const std::int64_t limit = std::numeric_limits<std::int64_t>::max() / std::int64_t(t.bytes);
    for (int r = 0; r < size_; ++r) {
      const std::int64_t c = counts[r];
      const std::int64_t so_far = at[std::size_t(r)];
      if (c < 0 || c > limit - so_far)
        throw CommError(where() + op + ": " + what + "[" + std::to_string(r) + "] = " + std::to_string(c) +
                        (c < 0 ? " is negative" : " overflows the buffer size"));
      at[std::size_t(r) + 1] = so_far + c;
    }
    return at;
  }
  // Plain host memory (or a null pointer) given for a non-empty buffer fails here, not inside a kernel.
  void check_device_pointer(const void* p, std::int64_t count, const char* op, const char* what) const {
    if (count == 0) return;
    if (!p) throw CommError(where() + op + ": " + what + " is null but holds " + std::to_string(count) + " elements");
    cudaPointerAttributes a{};
    const cudaError_t e = cudaPointerGetAttributes(&a, p);
    if (e != cudaSuccess) {
      backend::cuda::clear_last_error();
      check_cuda(e, "cudaPointerGetAttributes");
    }
    if (a.type == cudaMemoryTypeUnregistered)
      throw CommError(where() + op + ": " + what + " is not CUDA memory (a host pointer?)");
  }
  bool uniform(const std::int64_t* counts) const {
    return uniform_fast_path_ && std::all_of(counts, counts + size_, [&](std::int64_t c) { return c == counts[0]; });
  }
  std::int64_t others(const std::int64_t* counts) const {
    std::int64_t sum = 0;
    for (int r = 0; r < size_; ++r) sum += r == rank_ ? 0 : counts[r];
    return sum;
  }
  static const void* offset(const void* p, std::int64_t elements, Type t) {
    return static_cast<const char*>(p) + elements * std::int64_t(t.bytes);
  }
  static void* offset(void* p, std::int64_t elements, Type t) { return static_cast<char*>(p) + elements * std::int64_t(t.bytes); }

  ncclComm_t comm_ = nullptr;
  std::int32_t* scratch_ = nullptr;  // barrier's all-reduce operand (always 0)
  int rank_ = 0, size_ = 1, device_ = -1;
  double timeout_s_ = 300.0;
  bool uniform_fast_path_ = true;
  ByteCounters counters_;
  const char* last_op_ = "none";
  cudaStream_t last_stream_ = nullptr;
  std::string aborted_;  // why fail() aborted the communicator
};
static_assert(Communicator<Nccl>);

}  // namespace moekit::comm
