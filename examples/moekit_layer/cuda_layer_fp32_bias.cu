// moekit-layer's CUDA fp32 run with "expert_bias" (router::BiasBalanced): half of the layer types of
// cuda_layer_fp32.cu's switch, in their own translation unit to bound nvcc's time per unit.
#include "cuda_layer.cuh"

namespace moekit_layer {
LayerOutputs run_cuda_layer_fp32_biased(const moekit::MoeConfig& cfg, const LayerInputs& in) {
  return cuda_detail::run<float, moekit::BiasVariants::kBiased>(cfg, in);
}
}  // namespace moekit_layer
