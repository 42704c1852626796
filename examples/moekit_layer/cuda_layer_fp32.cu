// moekit-layer's CUDA fp32 run (cuda_layer.cuh): MoeLayer<backend::Cuda<float>>. Its own translation
// unit so that nvcc builds the fp32 and bf16 layer instantiations in parallel; the biased routers
// (router::BiasBalanced) are in cuda_layer_fp32_bias.cu, for the same reason.
#include "cuda_layer.cuh"

namespace moekit_layer {
LayerOutputs run_cuda_layer_fp32_biased(const moekit::MoeConfig& cfg, const LayerInputs& in);  // cuda_layer_fp32_bias.cu

LayerOutputs run_cuda_layer_fp32(const moekit::MoeConfig& cfg, const LayerInputs& in) {
  if (cfg.expert_bias) return run_cuda_layer_fp32_biased(cfg, in);
  return cuda_detail::run<float, moekit::BiasVariants::kUnbiased>(cfg, in);
}
}  // namespace moekit_layer
