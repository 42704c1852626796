// comm::Nccl on one rank (one GPU): every collective on device buffers against the host result (on one
// rank the sum over ranks is the input and every gather/scatter/exchange is a copy, so results are
// bit-exact), for fp32, fp64, int32, int64 and bf16, through NCCL's own collectives and through the grouped
// calls the -v collectives use for unequal counts; byte counters (nothing leaves a single rank: 0 bytes,
// one call per collective); split; bad arguments throw CommError before anything is enqueued and leave
// the communicator usable; wait's timeout aborts the communicator with a message. Several ranks need
// several GPUs (NCCL allows one rank per GPU) and are not covered here.
#if defined(MOEKIT_HAS_NCCL)
#include <doctest/doctest.h>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <span>
#include <moekit/parallel/comm/nccl.cuh>
#include <string>
#include <vector>

#include "device_buffer.cuh"

namespace {

using moekit::comm::Collective;
using moekit::comm::CommError;
using moekit::comm::Nccl;

// Distinct values, exact in every element type (bf16 included: small multiples of 1/4).
template <class T>
std::vector<T> values(std::size_t n, int seed) {
  std::vector<T> v(n);
  for (std::size_t i = 0; i < n; ++i) {
    const int k = int(i) * 3 - 40 + seed;
    if constexpr (std::is_same_v<T, __nv_bfloat16>) v[i] = __float2bfloat16_rn(float(k) * 0.25f);
    else if constexpr (std::is_floating_point_v<T>) v[i] = T(k) * T(0.25);
    else v[i] = T(k);
  }
  return v;
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// A stream that orders with the legacy default stream (DeviceBuffer's upload and poison also wait).
struct Stream {
  cudaStream_t s = nullptr;
  Stream() { MOEKIT_CUDA_CHECK(cudaStreamCreate(&s)); }
  ~Stream() { cudaStreamDestroy(s); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
};

// Keeps a stream busy for about `ms` milliseconds (for the timeout test).
__global__ void busy_kernel(int ms) {
  for (int i = 0; i < ms; ++i)
    for (int j = 0; j < 10; ++j) __nanosleep(100000);
}

// Every collective once on `stream`, each output poisoned first.
template <class T>
void check_every_collective(Nccl& comm, cudaStream_t stream) {
  const std::size_t n = 37;
  const std::vector<T> x = values<T>(n, 1);
  const std::vector<std::int64_t> counts{std::int64_t(n)};
  DeviceBuffer<T> send(n), recv(n);
  send.upload(x);

  recv.upload(x);
  comm.all_reduce_sum(recv.p, n, stream);  // in place
  comm.wait(stream);
  CHECK(same_bits(recv.download(), x));

  recv.poison();
  comm.all_gather_v(send.p, counts.data(), recv.p, stream);
  comm.wait(stream);
  CHECK(same_bits(recv.download(), x));

  recv.poison();
  comm.all_gather(send.p, n, recv.p, stream);
  comm.wait(stream);
  CHECK(same_bits(recv.download(), x));

  recv.poison();
  comm.reduce_scatter_v(send.p, std::span<const std::int64_t>(counts), recv.p, stream);
  comm.wait(stream);
  CHECK(same_bits(recv.download(), x));

  recv.poison();
  comm.all_to_all_v(send.p, counts.data(), recv.p, counts.data(), stream);
  comm.wait(stream);
  CHECK(same_bits(recv.download(), x));

  recv.upload(x);
  comm.broadcast(recv.p, n, 0, stream);
  comm.wait(stream);
  CHECK(same_bits(recv.download(), x));

  // Empty blocks touch nothing (and null pointers are fine for them).
  recv.poison();
  const std::vector<T> poisoned = recv.download();
  const std::int64_t zero[] = {0};
  comm.all_gather_v(static_cast<const T*>(nullptr), zero, recv.p, stream);
  comm.reduce_scatter_v(static_cast<const T*>(nullptr), zero, recv.p, stream);
  comm.all_to_all_v(static_cast<const T*>(nullptr), zero, recv.p, zero, stream);
  comm.all_reduce_sum(recv.p, 0, stream);
  comm.broadcast(recv.p, 0, 0, stream);
  comm.barrier(stream);
  CHECK(same_bits(recv.download(), poisoned));
}

}  // namespace

TEST_CASE_TEMPLATE("comm::Nccl one rank: every collective equals the host result", T, float, double, std::int32_t,
                   std::int64_t, __nv_bfloat16) {
  Nccl comm = Nccl::single();
  REQUIRE(comm.rank() == 0);
  REQUIRE(comm.size() == 1);
  Stream stream;
  check_every_collective<T>(comm, stream.s);  // NCCL's own collectives
  comm.set_uniform_fast_path(false);
  check_every_collective<T>(comm, stream.s);  // the grouped calls of unequal counts
  check_every_collective<T>(comm, nullptr);   // the default stream
  CHECK(comm.counters().total() == 0);        // nothing leaves a single rank
}

TEST_CASE("comm::Nccl one rank: byte counters count calls, not bytes") {
  Nccl comm = Nccl::single();
  DeviceBuffer<float> a(16), b(16);
  a.upload(values<float>(16, 0));
  const std::int64_t c16[] = {16};
  comm.all_reduce_sum(a.p, 16);
  comm.all_gather_v(a.p, c16, b.p);
  comm.all_gather(a.p, 16, b.p);
  comm.reduce_scatter_v(a.p, c16, b.p);
  comm.all_to_all_v(a.p, c16, b.p, c16);
  comm.broadcast(a.p, 16, 0);
  comm.barrier();
  const auto& k = comm.counters();
  CHECK(k.calls_of(Collective::kAllReduce) == 1);
  CHECK(k.calls_of(Collective::kAllGather) == 2);
  CHECK(k.calls_of(Collective::kReduceScatter) == 1);
  CHECK(k.calls_of(Collective::kAllToAll) == 1);
  CHECK(k.calls_of(Collective::kBroadcast) == 1);
  CHECK(k.calls_of(Collective::kBarrier) == 1);
  CHECK(k.total() == 0);
  comm.counters().reset();
  CHECK(comm.counters().calls_of(Collective::kAllReduce) == 0);
}

TEST_CASE("comm::Nccl one rank: split and move") {
  Nccl comm = Nccl::single();
  Nccl sub = comm.split(3, 0);
  CHECK(sub.rank() == 0);
  CHECK(sub.size() == 1);
  CHECK(sub.device() == comm.device());

  DeviceBuffer<__nv_bfloat16> data(9);
  const auto x = values<__nv_bfloat16>(9, 5);
  data.upload(x);
  sub.all_reduce_sum(data.p, 9);
  sub.barrier();
  CHECK(same_bits(data.download(), x));

  Nccl moved = std::move(sub);
  moved.barrier();
  CHECK_THROWS_AS(sub.barrier(), CommError);  // moved from

  CHECK_THROWS_AS(comm.split(-2, 0), CommError);  // negative color: takes part, then throws
  comm.barrier();                                 // still usable
}

TEST_CASE("comm::Nccl one rank: bad arguments throw CommError and leave the communicator usable") {
  Nccl comm = Nccl::single();
  DeviceBuffer<float> a(8), b(8);
  a.upload(values<float>(8, 2));
  const std::int64_t negative[] = {-1};
  const std::int64_t eight[] = {8}, seven[] = {7};
  const std::vector<std::int64_t> two_counts{4, 4};

  CHECK_THROWS_AS(comm.all_gather_v(a.p, negative, b.p), CommError);
  CHECK_THROWS_AS(comm.reduce_scatter_v(a.p, negative, b.p), CommError);
  CHECK_THROWS_AS(comm.all_to_all_v(a.p, negative, b.p, negative), CommError);
  CHECK_THROWS_AS(comm.all_gather_v(a.p, static_cast<const std::int64_t*>(nullptr), b.p), CommError);
  // Wrong number of counts (the span overloads know how many there are).
  CHECK_THROWS_AS(comm.all_gather_v(a.p, two_counts, b.p), CommError);
  CHECK_THROWS_AS(comm.reduce_scatter_v(a.p, two_counts, b.p), CommError);
  CHECK_THROWS_AS(comm.all_to_all_v(a.p, two_counts, b.p, two_counts), CommError);
  // Sends 8 elements to itself but expects 7.
  CHECK_THROWS_AS(comm.all_to_all_v(a.p, eight, b.p, seven), CommError);
  CHECK_THROWS_AS(comm.broadcast(a.p, 8, 1), CommError);   // no rank 1
  CHECK_THROWS_AS(comm.broadcast(a.p, 8, -1), CommError);  // no rank -1
  std::vector<float> host(8, 1.0f);
  CHECK_THROWS_AS(comm.all_reduce_sum(host.data(), 8), CommError);  // host memory
  CHECK_THROWS_AS(comm.all_gather_v(a.p, eight, static_cast<float*>(nullptr)), CommError);
  CHECK_THROWS_AS(Nccl(ncclUniqueId{}, 1, 1), CommError);  // rank outside the group
  CHECK_THROWS_AS(Nccl(ncclUniqueId{}, 0, 0), CommError);  // empty group

  try {
    comm.all_gather_v(a.p, negative, b.p);
  } catch (const CommError& e) {
    const std::string what = e.what();
    CHECK(what.find("all_gather_v") != std::string::npos);
    CHECK(what.find("negative") != std::string::npos);
  }

  // Nothing was enqueued or counted; the communicator still works.
  CHECK(comm.counters().calls_of(Collective::kAllGather) == 0);
  CHECK(comm.counters().calls_of(Collective::kAllToAll) == 0);
  b.poison();
  comm.all_gather_v(a.p, eight, b.p);
  comm.barrier();
  CHECK(same_bits(b.download(), values<float>(8, 2)));
}

TEST_CASE("comm::Nccl one rank: wait times out, aborts and names the last collective") {
  Nccl comm = Nccl::single();
  Stream stream;
  comm.barrier(stream.s);
  busy_kernel<<<1, 1, 0, stream.s>>>(300);
  MOEKIT_CUDA_CHECK(cudaGetLastError());
  std::string what;
  try {
    comm.wait(stream.s, 0.02);
  } catch (const CommError& e) {
    what = e.what();
  }
  CHECK(what.find("did not finish within 0.02 s") != std::string::npos);
  CHECK(what.find("barrier") != std::string::npos);
  CHECK(what.find("rank 0 of 1") != std::string::npos);
  MOEKIT_CUDA_CHECK(cudaStreamSynchronize(stream.s));
  CHECK_THROWS_AS(comm.barrier(), CommError);  // aborted
}

// wait polls the stream; the "not ready" answers it saw must not stay behind as the thread's last error,
// or the first launch after a wait that waited reports cudaErrorNotReady (backend/cuda/status.cuh).
TEST_CASE("comm::Nccl one rank: a wait that waited leaves no error for the next launch") {
  Nccl comm = Nccl::single();
  Stream stream;
  DeviceBuffer<float> a(1024);
  a.upload(values<float>(1024, 1));
  busy_kernel<<<1, 1, 0, stream.s>>>(20);  // about 20 ms: wait polls it many times
  MOEKIT_CUDA_CHECK(cudaGetLastError());
  comm.all_reduce_sum(a.p, 1024, stream.s);
  comm.wait(stream.s);
  CHECK(cudaPeekAtLastError() == cudaSuccess);
  busy_kernel<<<1, 1, 0, stream.s>>>(0);
  CHECK(cudaGetLastError() == cudaSuccess);
  comm.barrier(stream.s);
  CHECK(same_bits(a.download(stream.s), values<float>(1024, 1)));
}

#endif  // MOEKIT_HAS_NCCL
