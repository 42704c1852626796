#pragma once
// How train_domains starts: OpenMP's wait policy, thread counts per rank, the ranks mpirun started, and
// the CUDA device side (one GPU, or one per rank with NCCL).
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#ifdef TRAIN_DOMAINS_HAS_MPI
#include <moekit/parallel/comm/mpi.hpp>
#endif

#include "cuda_blocks.hpp"

// OpenMP threads busy-wait between parallel regions by default. On a small machine shared with other
// jobs that turns every barrier into a wait for a descheduled thread (20x slower steps, measured on a
// loaded 2-core VM), so unless the user chose a policy, restart once with OMP_WAIT_POLICY=passive:
// libgomp reads the variable only when it loads.
inline void prefer_passive_openmp(char** argv) {
#ifdef __linux__
  if (std::getenv("OMP_WAIT_POLICY") != nullptr) return;
  setenv("OMP_WAIT_POLICY", "passive", 1);
  execv("/proc/self/exe", argv);  // returns only on failure: carry on with the default policy
#else
  (void)argv;
#endif
}

inline void set_threads(int n) {
  omp_set_num_threads(n);
#ifdef OPENBLAS_VERSION
  openblas_set_num_threads(n);  // BLAS and the OpenMP loops take turns on the same cores
#endif
}

// This rank's place among the ranks on its node (MPI_COMM_TYPE_SHARED): {rank, size}. Collective.
#ifdef TRAIN_DOMAINS_HAS_MPI
struct NodeRanks {
  int rank = 0, size = 1;
};
inline NodeRanks node_ranks() {
  MPI_Comm node = MPI_COMM_NULL;
  NodeRanks n;
  if (MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node) == MPI_SUCCESS) {
    MPI_Comm_rank(node, &n.rank);
    MPI_Comm_size(node, &n.size);
    MPI_Comm_free(&node);
  }
  return n;
}

// Threads per rank when the user chose none: the cores this rank may use, shared with the other ranks
// on its node (mpirun may bind each rank to its own cores already).
inline int threads_per_rank() { return std::max(1, omp_get_num_procs() / std::max(1, node_ranks().size)); }
#endif

// Ranks that mpirun (OpenMPI, MPICH, Slurm) started, from the environment: 1 when run directly.
inline int launcher_ranks() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"})
    if (const char* e = std::getenv(v)) return std::max(1, std::atoi(e));
  return 1;
}

// --backend cuda, one process: the current GPU, or nullptr after saying why there is none (exit 2).
// main() refuses --backend cuda in a build without CUDA before it gets here.
inline std::unique_ptr<CudaMoeBackend> open_cuda() {
#if defined(MOEKIT_TRAIN_WITH_CUDA) && MOEKIT_TRAIN_WITH_CUDA
  if (const std::string why = cuda_device_problem(); !why.empty()) {
    std::fprintf(stderr, "error: --backend cuda: %s; run where an NVIDIA GPU is visible, or use --backend host\n", why.c_str());
    return nullptr;
  }
  return make_cuda_backend();
#else
  return nullptr;
#endif
}

// --backend cuda under mpirun: GPU (rank on node) % (devices) for each rank and the NCCL world, or
// nullptr on every rank when any rank has no GPU to use (they decide together, so none is left waiting
// in the NCCL setup). Collective.
#ifdef TRAIN_DOMAINS_HAS_MPI
inline std::unique_ptr<CudaMoeBackend> open_cuda(moekit::comm::Mpi& world) {
#if defined(MOEKIT_TRAIN_WITH_CUDA) && MOEKIT_TRAIN_WITH_CUDA
  const NodeRanks node = node_ranks();
  const std::string why = cuda_device_problem(node.size);
  std::int32_t without[2] = {why.empty() ? 0 : 1, world.rank() == 0 && !why.empty() ? 1 : 0};  // ranks, rank 0
  world.all_reduce_sum(without, 2);
  if (without[0] == 0) return make_cuda_backend(world, node.rank);
  if (world.rank() == 0)
    std::fprintf(stderr, "error: --backend cuda: %d of %d ranks have no CUDA device to use%s%s\n", without[0], world.size(),
                 why.empty() ? "" : "; rank 0: ", why.c_str());
  else if (!why.empty() && without[1] == 0)  // rank 0 had a device: say why this rank has none
    std::fprintf(stderr, "error (rank %d of %d): --backend cuda: %s\n", world.rank(), world.size(), why.c_str());
  return nullptr;
#else
  (void)world;
  return nullptr;
#endif
}
#endif
