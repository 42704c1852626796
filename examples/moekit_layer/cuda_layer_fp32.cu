// moekit-layer's CUDA fp32 run (cuda_layer.cuh): MoeLayer<backend::Cuda<float>>. Its own translation
// unit so that nvcc builds the fp32 and bf16 layer instantiations in parallel.
#include "cuda_layer.cuh"

namespace moekit_layer {
LayerOutputs run_cuda_layer_fp32(const moekit::MoeConfig& cfg, const LayerInputs& in) {
  return cuda_detail::run<float>(cfg, in);
}
}  // namespace moekit_layer
