#pragma once
// train_domains --backend cuda: the MoE layers on the GPU, everything else on the host.
//
// Plain C++ (no CUDA headers): main.cpp, compiled by the host compiler, calls these; cuda_blocks.cu,
// compiled by nvcc, defines them. CMake adds cuda_blocks.cu and defines MOEKIT_TRAIN_WITH_CUDA=1 only
// when the build has CUDA (MOEKIT_CUDA_ENABLED); without it nothing here is defined, and main.cpp
// refuses --backend cuda before calling any of it.
//
// What runs where: each MoE layer is moekit::MoeLayer<backend::Cuda<float>, ...> (one process) or
// MoeLayer<backend::Cuda<float>, ..., parallel::Hybrid> over comm::Nccl (under mpirun, one GPU per rank),
// with its weights and fp32 gradients on the device. The embedding, RMSNorms, head, cross-entropy,
// gradient clipping and AdamW stay on the host, as with --backend host. So every forward copies the
// block's input (and gating-residual logits) to the device and its output back, and every backward the
// same for the gradients; once per optimizer step the MoE gradients come to host mirrors, AdamW updates
// the mirrors, and their values go back to the device. That traffic is the price of keeping the
// trainer's dense parts on the host (and its code the same for both backends).
#include <memory>
#include <string>

#include "../common/moe_block.hpp"

namespace moekit::comm {
class Mpi;
}

#if defined(MOEKIT_TRAIN_WITH_CUDA) && MOEKIT_TRAIN_WITH_CUDA
inline constexpr bool kCudaCompiledIn = true;  // cuda_blocks.cu is linked in
#else
inline constexpr bool kCudaCompiledIn = false;
#endif

// Empty when this process can run the CUDA layers; otherwise why not: cudaGetDeviceCount's error, no
// device, or (ranks_on_node > 1) more ranks on this node than devices (NCCL needs a GPU per rank).
std::string cuda_device_problem(int ranks_on_node = 1);

// The device side of a run: the GPU the layers live on (and, distributed, the NCCL world). Create it
// once, before the model; it must outlive the model's layers.
class CudaMoeBackend {
 public:
  virtual ~CudaMoeBackend() = default;
  // One CUDA MoE layer behind MoeBlock<float>, of the same 8 types as make_moe_block. Distributed: mc
  // carries the run's degrees (Ranks::with_degrees), and every rank makes its layers in the same order.
  virtual std::unique_ptr<MoeBlock<float>> make_block(const moekit::MoeConfig& mc, bool global_balance) = 0;
  // "GPU 0 (NVIDIA H100 80GB HBM3)" (this rank's).
  virtual std::string describe() const = 0;
};

// One process on the current CUDA device (CUDA_VISIBLE_DEVICES picks it).
std::unique_ptr<CudaMoeBackend> make_cuda_backend();

// Collective over world: each rank takes GPU local_rank % devices (local_rank: its rank among the ranks
// on its node), then the ranks make one NCCL communicator (comm::Nccl::from_mpi). Needs NCCL in the
// build (MOEKIT_HAS_NCCL); without it, throws moekit::ConfigError on every rank alike.
std::unique_ptr<CudaMoeBackend> make_cuda_backend(moekit::comm::Mpi& world, int local_rank);
