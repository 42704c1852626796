#pragma once
// How an example trainer opens its GPU for --backend cuda: one GPU, or one per rank with NCCL (the
// ranks on a node from launch.hpp), after checking every rank has one.
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>

#include "launch.hpp"
#include "cuda_blocks.hpp"

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
#ifdef MOEKIT_EXAMPLE_HAS_MPI
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
