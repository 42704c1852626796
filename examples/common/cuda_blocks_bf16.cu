// --backend cuda --dtype bf16: the 16 layer types (both router families) with bf16 storage, one process,
// behind DeviceMoeBlock<bf16> (train_lm's whole-model GPU path). Apart from cuda_blocks.cu and
// cuda_blocks_bias.cu to bound nvcc's time per translation unit.
#include "cuda_block.cuh"

std::unique_ptr<DeviceMoeBlock<moekit::bf16>> make_bf16_cuda_block(const moekit::MoeConfig& mc, bool global_balance, void* stream) {
  return make_cuda_block<moekit::parallel::None, moekit::BiasVariants::kBoth, moekit::bf16>(mc, global_balance, stream);
}
