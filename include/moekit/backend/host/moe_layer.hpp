#pragma once
// MoeLayer on the host backend (backend::Host<float|double>): the layer's stages (layer/pipeline.hpp)
// over the host's operations (backend/host/layer_ops.hpp), for every parallel strategy (the
// distributed ones over a comm::HostCommunicator: parallel/host_moe_layer.hpp describes them).
#include "moekit/backend/host/layer_ops.hpp"
#include "moekit/layer/pipeline.hpp"
