// --backend cuda --expert-bias: the classic rows' layer types with router::BiasBalanced, split from
// cuda_blocks.cu to bound nvcc's time per translation unit (cuda_block.cuh holds what both share).
#include "cuda_block.cuh"

std::unique_ptr<DeviceMoeBlock<float>> make_biased_cuda_block(const moekit::MoeConfig& mc, bool global_balance, void* stream) {
  return make_cuda_block<moekit::parallel::None, BothRows<ClassicRows, moekit::BiasVariants::kBiased>>(mc, global_balance, stream);
}
#if defined(MOEKIT_EXAMPLE_CUDA_DISTRIBUTED)
std::unique_ptr<DeviceMoeBlock<float>> make_biased_cuda_block(const moekit::MoeConfig& mc, bool global_balance, void* stream,
                                                       moekit::comm::Nccl& world) {
  return make_cuda_block<moekit::parallel::Hybrid, BothRows<ClassicRows, moekit::BiasVariants::kBiased>>(mc, global_balance, stream, world);
}
#endif
