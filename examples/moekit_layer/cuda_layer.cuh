#pragma once
// moekit-layer's CUDA run: MoeLayer<backend::Cuda<V>> forward + backward on the harness's fp32 inputs,
// results back in fp32 (layer_io.hpp). Included by cuda_layer_fp32.cu and cuda_layer_bf16.cu, one
// value type each, so nvcc builds the two sets of layer instantiations in parallel.
//
// bf16: x, dy and every weight but gate_residual.weight are rounded to bf16 on upload (as the layer
// stores them); prev_logits, gate_residual.weight, the router results and every gradient stay fp32.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "layer_io.hpp"
#include "moekit/backend/cuda/memory.cuh"
#include "moekit/backend/cuda/moe_layer.cuh"
#include "moekit/layer/any_layer.hpp"
#include "moekit/layer/parameter_table.hpp"
#include "moekit/layer/moe_layer_decl.hpp"

namespace moekit_layer::cuda_detail {

// A clear error (exit code 2 in the harness) rather than a failure inside the layer when this machine
// has no usable CUDA device or driver.
inline void require_device() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e == cudaSuccess && count > 0) return;
  (void)cudaGetLastError();  // clear the sticky error, if any
  const std::string why = e != cudaSuccess ? std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e)
                                           : std::string("no CUDA device found");
  throw std::runtime_error("backend \"cuda\": no usable CUDA device (" + why +
                           "); run on a machine with an NVIDIA GPU, or use \"backend\": \"host\"");
}

template <class S>
void download_raw(const S* src, std::size_t n, std::vector<S>& dst) {
  dst.resize(n);
  if (n) MOEKIT_CUDA_CHECK(cudaMemcpy(dst.data(), src, n * sizeof(S), cudaMemcpyDeviceToHost));
}

template <class V, class Filter>
LayerOutputs run(const moekit::MoeConfig& cfg, const LayerInputs& in) {
  namespace mc = moekit::backend::cuda;
  using moekit::MatrixView;
  require_device();
  const std::int64_t T = in.tokens, d = cfg.d_model, n = cfg.num_experts(), k = cfg.top_k;
  const bool residual = cfg.gating_residual;
  using S = mc::storage_t<V>;
  const auto layer = moekit::make_moe_layer<moekit::backend::Cuda<V>, moekit::balance::MicroBatch, Filter>(cfg);

  // The weights by name into the flat layout of the parameter table every backend shares.
  const moekit::ParameterTable& table = layer->parameter_table();
  std::vector<float> flat(std::size_t(table.size()));
  for (const auto& p : table.specs()) {
    const auto it = in.weights.find(p.name);
    if (it == in.weights.end() || std::int64_t(it->second.size()) != p.numel())
      throw std::logic_error("moekit-layer: the layer's parameter '" + p.name + "' does not match parameter_shapes()");
    std::copy(it->second.begin(), it->second.end(), flat.begin() + p.offset);
  }
  moekit::MoeWeights<float> w;
  table.unpack(flat.data(), w);

  LayerOutputs out;
  layer->load_weights(w);
  if (layer->biased()) layer->set_expert_bias(in.expert_bias);
  layer->reserve(T);
  if (!in.replay.empty()) layer->set_replay(MatrixView<const std::int32_t>(in.replay.data(), {T, k}));
  const std::size_t td = std::size_t(T * d), tn = std::size_t(T * n), tk = std::size_t(T * k);
  mc::DeviceArray<S> x(td), y(td), dy(td), dx(td);
  mc::DeviceArray<float> prev(residual ? tn : 0), dprev(residual ? tn : 0);
  mc::upload_as(in.x.data(), td, x.data());
  mc::upload_as(in.dy.data(), td, dy.data());
  if (residual) mc::upload_as(in.prev_logits.data(), tn, prev.data());
  // Views of nothing (data == nullptr) without the gating residual.
  const MatrixView<const float> prev_view{residual ? prev.data() : nullptr, {T, n}};
  const MatrixView<float> dprev_view{residual ? dprev.data() : nullptr, {T, n}};

  const moekit::AuxLosses aux = layer->forward(MatrixView<const S>(x.data(), {T, d}), MatrixView<S>(y.data(), {T, d}), prev_view);
  // Router results live in the layer's workspace: copy them before backward reuses any buffer.
  const moekit::ForwardViews<float> v = layer->views();
  download_raw(v.logits, tn, out.logits);
  if (v.routing == moekit::Routing::kTokenChoice && in.replay.empty()) {
    std::vector<int> idx;
    download_raw(v.topk_indices, tk, idx);
    out.topk_indices.assign(idx.begin(), idx.end());
    download_raw(v.topk_gates, tk, out.topk_gates);
  } else {  // expert choice or a replayed record: the plan by token, from the device
    const std::size_t slots = std::size_t(v.plan.layout.slots);
    std::vector<int> first, token_of, experts;
    std::vector<float> gates;
    download_raw(v.plan.layout.first, std::size_t(T + 1), first);
    download_raw(v.plan.layout.token_of, slots, token_of);
    download_raw(v.plan.expert, slots, experts);
    download_raw(v.plan.gate, slots, gates);
    const moekit::SlotLayout host = moekit::SlotLayout::by_token(int(T), int(slots), first.data(), token_of.data());
    dense_choice(v.routing, host, experts.data(), gates.data(), n, out);
    if (!in.replay.empty()) out.topk_indices = in.replay, out.topk_gates = replayed_gates(in.replay, k, host, gates.data());
  }
  const auto counts = layer->expert_counts();
  out.expert_counts.assign(counts.data, counts.data + counts.numel());
  out.lbl = aux.lbl, out.zloss = aux.zloss;
  if (layer->biased()) out.expert_bias_update = layer->expert_bias_update();
  // L = sum(y * dy) + lbl_coef * LBL + zloss_coef * zloss; the last MoE layer (no dlogits_next).
  layer->backward(MatrixView<const S>(dy.data(), {T, d}), MatrixView<S>(dx.data(), {T, d}), 1.0, {}, dprev_view);
  MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
  out.y.resize(td), out.dx.resize(td);
  mc::download_as(y.data(), td, out.y.data());
  mc::download_as(dx.data(), td, out.dx.data());
  if (residual) download_raw(dprev.data(), tn, out.grad_prev_logits);
  table.pack(layer->gradients(), flat.data());
  for (const auto& p : table.specs()) out.grads[p.name].assign(flat.begin() + p.offset, flat.begin() + p.offset + p.numel());
  return out;
}

}  // namespace moekit_layer::cuda_detail
