// --backend cuda (cuda_blocks.hpp): the CUDA MoE layers behind DeviceMoeBlock, for both example
// trainers (library moekit_example_cuda_blocks, compiled by nvcc only when the build has CUDA). It
// instantiates the 8 classic unbiased layer types make_moe_block can reach (with_moe_layer_type;
// the 8 with router::BiasBalanced are in cuda_blocks_bias.cu, the open models' 16 in cuda_blocks_open.cu),
// once single-process (parallel::None) and, with MPI and NCCL, once distributed (parallel::Hybrid, whose
// code serves all four strategies as the host layer's does; main.cpp enforces --parallel's limits).
//
// STATUS: compiled, never run: no GPU was available where this was written.
#include "cuda_block.cuh"

#if defined(MOEKIT_EXAMPLE_CUDA_DISTRIBUTED)
#include <moekit/parallel/comm/mpi.hpp>
#include <moekit/parallel/comm/nccl_mpi.hpp>  // comm::Nccl::from_mpi
#endif

namespace {
namespace mk = moekit;

std::string device_name(int device) {
  cudaDeviceProp prop{};
  MOEKIT_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return "GPU " + std::to_string(device) + " (" + prop.name + ")";
}

class SingleGpu final : public CudaMoeBackend {
 public:
  SingleGpu() { MOEKIT_CUDA_CHECK(cudaGetDevice(&device_)); }
  std::unique_ptr<DeviceMoeBlock<float>> make_block(const mk::MoeConfig& mc, bool global_balance, void* stream) override {
    if (!mk::keeps<TrainerRows<ClassicRows>>(mc)) return make_open_cuda_block(mc, global_balance, stream);
    if (mc.expert_bias) return make_biased_cuda_block(mc, global_balance, stream);
    return make_cuda_block<mk::parallel::None, BothRows<ClassicRows, mk::BiasVariants::kUnbiased>>(mc, global_balance, stream);
  }
  std::unique_ptr<DeviceMoeBlock<mk::bf16>> make_bf16_block(const mk::MoeConfig& mc, bool global_balance, void* stream) override {
    return make_bf16_cuda_block(mc, global_balance, stream);
  }
  std::string describe() const override { return device_name(device_); }

 private:
  int device_ = 0;
};

#if defined(MOEKIT_EXAMPLE_CUDA_DISTRIBUTED)
class GpuPerRank final : public CudaMoeBackend {
 public:
  GpuPerRank(mk::comm::Mpi& world, int local_rank)
      : device_(select_device(local_rank)), nccl_(mk::comm::Nccl::from_mpi(world)) {}
  std::unique_ptr<DeviceMoeBlock<float>> make_block(const mk::MoeConfig& mc, bool global_balance, void* stream) override {
    if (!mk::keeps<TrainerRows<ClassicRows>>(mc)) return make_open_cuda_block(mc, global_balance, stream, nccl_);
    if (mc.expert_bias) return make_biased_cuda_block(mc, global_balance, stream, nccl_);
    return make_cuda_block<mk::parallel::Hybrid, BothRows<ClassicRows, mk::BiasVariants::kUnbiased>>(mc, global_balance, stream, nccl_);
  }
  std::unique_ptr<DeviceMoeBlock<mk::bf16>> make_bf16_block(const mk::MoeConfig&, bool, void*) override {
    throw mk::ConfigError("--dtype", "bf16", "with --backend cuda runs in one process only: the distributed bf16 CUDA blocks are not built");
  }
  std::string describe() const override { return device_name(device_); }

 private:
  static int select_device(int local_rank) {  // before the communicator: NCCL takes the current device
    int count = 0;
    MOEKIT_CUDA_CHECK(cudaGetDeviceCount(&count));
    const int device = local_rank % count;
    MOEKIT_CUDA_CHECK(cudaSetDevice(device));
    return device;
  }
  int device_;
  mk::comm::Nccl nccl_;  // the world; each layer splits its own communicators from it
};
#endif

}  // namespace

std::string cuda_device_problem(int ranks_on_node) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky error, if any
    return std::string("no usable CUDA device (cudaGetDeviceCount: ") + cudaGetErrorName(e) + ": " + cudaGetErrorString(e) + ")";
  }
  if (count == 0) return "no CUDA device found";
  if (ranks_on_node > count)
    return std::to_string(ranks_on_node) + " ranks on this node but " + std::to_string(count) +
           " CUDA device(s): NCCL needs a device of its own for every rank; start at most " + std::to_string(count) +
           " ranks per node";
  return {};
}

std::unique_ptr<CudaMoeBackend> make_cuda_backend() { return std::make_unique<SingleGpu>(); }

#if defined(MOEKIT_EXAMPLE_HAS_MPI)
std::unique_ptr<CudaMoeBackend> make_cuda_backend(mk::comm::Mpi& world, int local_rank) {
#if defined(MOEKIT_EXAMPLE_CUDA_DISTRIBUTED)
  return std::make_unique<GpuPerRank>(world, local_rank);
#else
  (void)world, (void)local_rank;
  throw mk::ConfigError("--backend", "cuda",
                        "with --parallel needs NCCL (comm::Nccl), and this build found none (MOEKIT_HAS_NCCL is not defined); "
                        "install NCCL >= 2.18 and reconfigure, or use --backend host");
#endif
}
#endif
