// MoeLayer<backend::Cuda<bf16>> against the host backend run on the bf16-rounded inputs and weights
// (tests/gpu/layer_check.cuh): every policy; within 1e-2 relative. Its own TU so nvcc builds the fp32
// and bf16 instantiations in parallel.
#include "layer_check.cuh"

TEST_CASE("cuda layer bf16 equals the host layer within bf16 rounding") { layer_check::run_all<moekit::bf16>(); }
