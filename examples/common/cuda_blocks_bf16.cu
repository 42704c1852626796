// --backend cuda --dtype bf16: the classic rows' 16 layer types (with and without expert bias) with bf16
// storage, one process, behind DeviceMoeBlock<bf16> (train_lm's whole-model GPU path). Apart from the
// fp32 units to bound nvcc's time per translation unit; the open models' rows run in fp32 (ConfigError).
#include "cuda_block.cuh"

std::unique_ptr<DeviceMoeBlock<moekit::bf16>> make_bf16_cuda_block(const moekit::MoeConfig& mc, bool global_balance, void* stream) {
  if (!moekit::keeps<TrainerRows<ClassicRows>>(mc))
    throw moekit::ConfigError("--dtype", "bf16", "with --backend cuda builds the softmax top-k SwiGLU layers only; the open models' "
                                                 "routers and experts run in fp32 on the GPU (or in bf16 on the host)");
  return make_cuda_block<moekit::parallel::None, ClassicRows, moekit::bf16>(mc, global_balance, stream);
}
