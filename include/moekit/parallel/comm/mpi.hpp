#pragma once
// comm::Mpi: the host communicator over MPI (OpenMPI under mpirun; docs/design.md §5). Opt-in header: it needs
// <mpi.h> and linking MPI::MPI_CXX (target moekit::mpi). MPI errors are returned, not fatal
// (MPI_ERRORS_RETURN), and thrown as CommError naming the collective and MPI's message.
//
// Hangs: a collective that some rank never joins would block forever (MPI cannot cancel one). Layers
// therefore check, with fixed-size collectives that every rank makes, that all ranks agree on their
// configuration before any data moves (consistency_check), so a bad config fails on every rank with a
// message. As a last resort a watchdog thread aborts the job (MPI_Abort) when one collective has been
// waiting longer than the timeout (MOEKIT_COMM_TIMEOUT_S, default 300 s; 0 disables it), after printing
// which collective on which rank.
#include <mpi.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "moekit/parallel/comm/communicator.hpp"

namespace moekit::comm {

namespace detail {
// One watchdog per process; the innermost collective in flight (host collectives do not nest).
class Watchdog {
 public:
  static Watchdog& instance() {
    static Watchdog w;
    return w;
  }
  void enter(const char* what, int world_rank, double timeout_s) {
    if (timeout_s <= 0) return;
    what_.store(what);
    rank_.store(world_rank);
    timeout_ms_.store(std::int64_t(timeout_s * 1000));
    start_ms_.store(now_ms());
    std::call_once(started_, [this] { std::thread([this] { run(); }).detach(); });
  }
  void leave() { start_ms_.store(-1); }

 private:
  static std::int64_t now_ms() {
    return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
  }
  void run() {
    for (;;) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      const std::int64_t s = start_ms_.load();
      if (s >= 0 && now_ms() - s > timeout_ms_.load()) {
        std::fprintf(stderr,
                     "moekit::comm::Mpi: rank %d: %s did not finish within %.0f s: a rank is missing, has failed or "
                     "called a different collective; aborting the job (MOEKIT_COMM_TIMEOUT_S sets the limit)\n",
                     rank_.load(), what_.load(), double(timeout_ms_.load()) / 1000.0);
        std::fflush(stderr);
        MPI_Abort(MPI_COMM_WORLD, 3);
      }
    }
  }
  std::atomic<const char*> what_{""};
  std::atomic<int> rank_{-1};
  std::atomic<std::int64_t> start_ms_{-1}, timeout_ms_{0};
  std::once_flag started_;
};
}  // namespace detail

// MPI_Init / MPI_Finalize for a program's main (examples and tests); the library never calls them itself.
class MpiSession {
 public:
  MpiSession(int* argc, char*** argv) {
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited) {
      MPI_Init(argc, argv);
      owned_ = true;
    }
  }
  ~MpiSession() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (owned_ && !finalized) MPI_Finalize();
  }
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

 private:
  bool owned_ = false;
};

class Mpi final : public HostCommunicator {
 public:
  // Wraps `comm` (not freed); MPI must be initialised.
  explicit Mpi(MPI_Comm comm = MPI_COMM_WORLD, double timeout_s = default_comm_timeout_s()) : comm_(comm), timeout_s_(timeout_s) {
    check(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank_);
  }
  ~Mpi() override {
    if (owned_) MPI_Comm_free(&comm_);
  }
  Mpi(const Mpi&) = delete;
  Mpi& operator=(const Mpi&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  MPI_Comm native() const { return comm_; }
  std::unique_ptr<HostCommunicator> split(int color, int key) override {
    MPI_Comm sub = MPI_COMM_NULL;
    {
      Guard g(*this, "MPI_Comm_split");
      check(MPI_Comm_split(comm_, color, key, &sub), "MPI_Comm_split");
    }
    auto m = std::make_unique<Mpi>(sub, timeout_s_);
    m->owned_ = true;
    return m;
  }
  void barrier() override {
    Guard g(*this, "MPI_Barrier");
    check(MPI_Barrier(comm_), "MPI_Barrier");
    counters_.add(Collective::kBarrier, 0);
  }

 protected:
  void all_reduce_(void* data, std::size_t n, DType t) override {
    Guard g(*this, "MPI_Allreduce");
    check(MPI_Allreduce(MPI_IN_PLACE, data, count(n), mpi_type(t), MPI_SUM, comm_), "MPI_Allreduce");
    // Bandwidth-optimal (reduce-scatter + all-gather) volume: 2 (p-1)/p of the buffer.
    counters_.add(Collective::kAllReduce, std::int64_t(2 * (size_ - 1) * n * size_of(t) / std::size_t(size_)));
  }
  void all_gather_v_(const void* send, const std::int64_t* counts, void* recv, DType t) override {
    std::vector<int> c, displ;
    layout(counts, c, displ);
    Guard g(*this, "MPI_Allgatherv");
    check(MPI_Allgatherv(send, c[rank_], mpi_type(t), recv, c.data(), displ.data(), mpi_type(t), comm_), "MPI_Allgatherv");
    counters_.add(Collective::kAllGather, std::int64_t(counts[rank_]) * (size_ - 1) * std::int64_t(size_of(t)));
  }
  void reduce_scatter_v_(const void* send, const std::int64_t* counts, void* recv, DType t) override {
    std::vector<int> c, displ;
    layout(counts, c, displ);
    Guard g(*this, "MPI_Reduce_scatter");
    check(MPI_Reduce_scatter(send, recv, c.data(), mpi_type(t), MPI_SUM, comm_), "MPI_Reduce_scatter");
    std::int64_t others = 0;
    for (int r = 0; r < size_; ++r) others += r == rank_ ? 0 : counts[r];
    counters_.add(Collective::kReduceScatter, others * std::int64_t(size_of(t)));
  }
  void all_to_all_v_(const void* send, const std::int64_t* send_counts, void* recv, const std::int64_t* recv_counts,
                     DType t) override {
    std::vector<int> sc, sd, rc, rd;
    layout(send_counts, sc, sd);
    layout(recv_counts, rc, rd);
    Guard g(*this, "MPI_Alltoallv");
    check(MPI_Alltoallv(send, sc.data(), sd.data(), mpi_type(t), recv, rc.data(), rd.data(), mpi_type(t), comm_), "MPI_Alltoallv");
    std::int64_t others = 0;
    for (int r = 0; r < size_; ++r) others += r == rank_ ? 0 : send_counts[r];
    counters_.add(Collective::kAllToAll, others * std::int64_t(size_of(t)));
  }
  void broadcast_(void* data, std::size_t n, int root, DType t) override {
    Guard g(*this, "MPI_Bcast");
    check(MPI_Bcast(data, count(n), mpi_type(t), root, comm_), "MPI_Bcast");
    counters_.add(Collective::kBroadcast, rank_ == root ? std::int64_t(n * size_of(t)) * (size_ - 1) : 0);
  }

 private:
  struct Guard {  // the watchdog's view of the collective in flight
    Guard(const Mpi& m, const char* what) { detail::Watchdog::instance().enter(what, m.world_rank_, m.timeout_s_); }
    ~Guard() { detail::Watchdog::instance().leave(); }
  };
  static MPI_Datatype mpi_type(DType t) {
    switch (t) {
      case DType::kF32: return MPI_FLOAT;
      case DType::kF64: return MPI_DOUBLE;
      case DType::kI32: return MPI_INT32_T;
      case DType::kI64: return MPI_INT64_T;
    }
    return MPI_BYTE;
  }
  static int count(std::size_t n) {
    if (n > std::size_t(INT_MAX)) throw CommError("comm::Mpi: " + std::to_string(n) + " elements exceed MPI's int count");
    return int(n);
  }
  void layout(const std::int64_t* counts, std::vector<int>& c, std::vector<int>& displ) const {
    c.resize(std::size_t(size_));
    displ.resize(std::size_t(size_));
    std::int64_t at = 0;
    for (int r = 0; r < size_; ++r) {
      if (counts[r] < 0 || at + counts[r] > INT_MAX)
        throw CommError("comm::Mpi: counts out of range for MPI (rank " + std::to_string(r) + ": " + std::to_string(counts[r]) + ")");
      c[r] = int(counts[r]);
      displ[r] = int(at);
      at += counts[r];
    }
  }
  void check(int err, const char* call) const {
    if (err == MPI_SUCCESS) return;
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(err, msg, &len);
    throw CommError(std::string("moekit::comm::Mpi: ") + call + " failed on rank " + std::to_string(world_rank_) + ": " +
                    std::string(msg, std::size_t(len)));
  }

  MPI_Comm comm_;
  double timeout_s_;
  int rank_ = 0, size_ = 1, world_rank_ = 0;
  bool owned_ = false;
};
static_assert(Communicator<Mpi>);

}  // namespace moekit::comm
