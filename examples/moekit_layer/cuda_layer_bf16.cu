// moekit-layer's CUDA bf16 run (cuda_layer.cuh): MoeLayer<backend::Cuda<moekit::bf16>>. Its own
// translation unit so that nvcc builds the fp32 and bf16 layer instantiations in parallel.
#include "cuda_layer.cuh"

namespace moekit_layer {
LayerOutputs run_cuda_layer_bf16_biased(const moekit::MoeConfig& cfg, const LayerInputs& in);  // cuda_layer_bf16_bias.cu

LayerOutputs run_cuda_layer_bf16(const moekit::MoeConfig& cfg, const LayerInputs& in) {
  if (cfg.expert_bias) return run_cuda_layer_bf16_biased(cfg, in);
  return cuda_detail::run<moekit::bf16, moekit::BiasVariants::kUnbiased>(cfg, in);
}
}  // namespace moekit_layer
