// --backend cuda with the open models' routers and experts (--router sigmoid, --n-group, --router-bias,
// --activation swiglu_oai): the 8 OpenRows of TrainerRows (moe_block.hpp), split from cuda_blocks.cu
// and cuda_blocks_bias.cu to bound nvcc's time per translation unit.
#include "cuda_block.cuh"

std::unique_ptr<DeviceMoeBlock<float>> make_open_cuda_block(const moekit::MoeConfig& mc, bool global_balance, void* stream) {
  return make_cuda_block<moekit::parallel::None, OpenRows>(mc, global_balance, stream);
}
#if defined(MOEKIT_EXAMPLE_CUDA_DISTRIBUTED)
std::unique_ptr<DeviceMoeBlock<float>> make_open_cuda_block(const moekit::MoeConfig& mc, bool global_balance, void* stream,
                                                     moekit::comm::Nccl& world) {
  return make_cuda_block<moekit::parallel::Hybrid, OpenRows>(mc, global_balance, stream, world);
}
#endif
