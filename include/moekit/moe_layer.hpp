#pragma once
// MoeLayer<Backend, Router, Experts, Balance, Parallel>: the public entry point (docs/design.md §1), with the
// host backend. CUDA users include <moekit/backend/cuda/moe_layer.cuh> from a .cu file instead (or as
// well); distributed layers come with <moekit/parallel/host_moe_layer.hpp> / cuda_moe_layer.cuh.
#include "moekit/layer/moe_layer_decl.hpp"
#include "moekit/backend/host/moe_layer.hpp"
