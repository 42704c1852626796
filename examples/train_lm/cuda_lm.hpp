#pragma once
// train_lm --backend cuda: the whole model on one GPU (cuda_lm.cu, compiled by nvcc only when the build
// has CUDA; plain C++ here). The embedding, attention, norms, head and cross-entropy are the library's
// nn/cuda/ modules, the MoE layers ../common/cuda_blocks.hpp's DeviceMoeBlocks on the model's stream,
// and every parameter's AdamW state is on the device (backend::cuda::AdamWGroup). What crosses to the
// host in a training step: the micro-batch's token ids and targets in, the loss, aux losses and
// expert counts out (the MoE layer's one synchronisation per forward gives those).
//
// STATUS: compiled, never run: no GPU was lent where this was written.
#include <cstdint>
#include <memory>

#include "../common/cuda_blocks.hpp"
#include "lm.hpp"

// bf16: bf16 storage of activations and weights (fp32 gradients, fp32 AdamW masters, fp32 accumulation
// in every GEMM and reduction); otherwise fp32.
std::unique_ptr<Lm> make_cuda_lm(const LmConfig& c, std::uint64_t seed, CudaMoeBackend& backend, bool bf16);
