#pragma once
// MoeLayer on the CUDA backend (backend::Cuda<float|bf16>): the layer's stages (layer/pipeline.hpp) over
// the CUDA operations (backend/cuda/layer_ops.cuh, which describes the kernels, the one host
// synchronisation per forward and the memory). Include it from a .cu file built by nvcc; the kernels
// are instantiated in the including translation unit. Distributed layers (over comm::Nccl) come with
// parallel/cuda_moe_layer.cuh.
//
// STATUS: compiled, never run: no GPU has been lent to this project yet.
#include "moekit/backend/cuda/layer_ops.cuh"
#include "moekit/layer/pipeline.hpp"
