#pragma once
// The CUDA MoE layers of the example trainers' --backend cuda, behind ./moe_block.hpp's MoeBlock.
//
// Plain C++ (no CUDA headers): a trainer's main.cpp, compiled by the host compiler, calls these;
// cuda_blocks.cu and cuda_blocks_bias.cu, compiled by nvcc once into the library
// moekit_example_cuda_blocks (./CMakeLists.txt) that both trainers link, define them. The library, and
// MOEKIT_TRAIN_WITH_CUDA=1 for whoever links it, exist only when the build has CUDA
// (MOEKIT_CUDA_ENABLED); without it nothing here is defined, and a trainer refuses --backend cuda
// before calling any of it.
//
// What runs where: each MoE layer is moekit::MoeLayer<backend::Cuda<float>, ...> (one process) or
// MoeLayer<backend::Cuda<float>, ..., parallel::Hybrid> over comm::Nccl (under mpirun, one GPU per rank),
// with its weights, fp32 gradients and AdamW state on the device (parameter_group()). Two ways in:
// - MoeBlock's host views (train_domains, whose dense parts are on the host): every forward copies the
//   block's input (and gating-residual logits) to the device and its output back, every backward the
//   same for the gradients.
// - DeviceMoeBlock's device pointers (train_lm, whose whole model is on the device): no copies; the
//   block runs on the stream it was made with, the model's.
#include <cstdint>
#include <memory>
#include <string>

#include <moekit/core/bf16.hpp>

#include "moe_block.hpp"

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

// A CUDA MoE block that also runs on device buffers. The pointers are device memory of the block's
// config: x, y, dy, dx [rows, d_model]; prev_logits, dlogits_next, dprev_logits [rows, num_experts]
// (null: none). Work is enqueued on the block's stream; forward_device returns once the layer's own
// synchronisation has given the aux losses and counts (one per forward, as the layer's).
// V: the storage type of x, y, dy, dx: float, or moekit::bf16 (the device's __nv_bfloat16 bits); logits
// and their gradients are fp32 either way. A bf16 block runs on device pointers only (its MoeBlock
// forward and backward throw std::logic_error).
template <class V>
class DeviceMoeBlock : public MoeBlock<float> {
 public:
  virtual moekit::AuxLosses forward_device(const V* x, V* y, const float* prev_logits, std::int64_t rows) = 0;
  virtual void backward_device(const V* dy, V* dx, double aux_scale, const float* dlogits_next, float* dprev_logits) = 0;
  virtual const float* logits_device() const = 0;  // [rows, num_experts] of the last forward
};

// The device side of a run: the GPU the layers live on (and, distributed, the NCCL world). Create it
// once, before the model; it must outlive the model's layers.
class CudaMoeBackend {
 public:
  virtual ~CudaMoeBackend() = default;
  // One CUDA MoE layer, of the same 16 types as make_moe_block (TrainerRows). Distributed: mc carries the run's degrees
  // (Ranks::with_degrees), and every rank makes its layers in the same order. stream: a cudaStream_t
  // the block runs on (its calls, its parameter group's), or null for a stream of its own.
  virtual std::unique_ptr<DeviceMoeBlock<float>> make_block(const moekit::MoeConfig& mc, bool global_balance, void* stream = nullptr) = 0;
  // The same with bf16 storage (activations and weights; fp32 gradients, and fp32 masters in the
  // parameter group). One process only: a distributed backend throws moekit::ConfigError.
  virtual std::unique_ptr<DeviceMoeBlock<moekit::bf16>> make_bf16_block(const moekit::MoeConfig& mc, bool global_balance,
                                                                       void* stream = nullptr) = 0;
  // "GPU 0 (NVIDIA H100 80GB HBM3)" (this rank's).
  virtual std::string describe() const = 0;
};

// One process on the current CUDA device (CUDA_VISIBLE_DEVICES picks it).
std::unique_ptr<CudaMoeBackend> make_cuda_backend();

// Collective over world: each rank takes GPU local_rank % devices (local_rank: its rank among the ranks
// on its node), then the ranks make one NCCL communicator (comm::Nccl::from_mpi). Needs NCCL in the
// build (MOEKIT_HAS_NCCL); without it, throws moekit::ConfigError on every rank alike.
std::unique_ptr<CudaMoeBackend> make_cuda_backend(moekit::comm::Mpi& world, int local_rank);
