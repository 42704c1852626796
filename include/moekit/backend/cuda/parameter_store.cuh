#pragma once
// A CUDA layer's parameters: one flat value buffer (storage type S; the fp32 families, such as the
// gating residual, after the rest at a 256-byte boundary) and one flat fp32 gradient buffer on the device, both laid out and named by the
// parameter table (layer/parameter_table.hpp), as the host layer's; conversion from and to full-size
// host MoeWeights<float>; the named views an optimizer or a checkpoint walks.
#include <cuda_runtime.h>
#include <library_types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "moekit/backend/cuda/grouped_gemm.cuh"  // data_type
#include "moekit/backend/cuda/memory.cuh"
#include "moekit/backend/cuda/status.cuh"
#include "moekit/layer/parameter_table.hpp"

namespace moekit {

// A parameter on the device: value in the layer's storage type (fp32 for gate_residual), gradient fp32.
struct DeviceParameter {
  std::string name;
  void* value = nullptr;
  float* grad = nullptr;
  std::vector<std::int64_t> shape;
  cudaDataType_t dtype = CUDA_R_32F;
  ParamShard shard = ParamShard::kReplicated;
  bool expert_slice() const { return expert_shard(shard); }
  std::int64_t numel() const { return numel_of(shape); }
};

namespace backend::cuda {
inline namespace MOEKIT_CUDA_ABI {

template <class S>
class ParameterStore {
 public:
  ParameterStore() = default;
  explicit ParameterStore(ParameterTable table) : table_(std::move(table)) {
    values_.resize(table_.value_bytes(sizeof(S)));
    grads_.resize(std::size_t(table_.size()));
    fill_device(values_.data(), 0, values_.size());
    fill_device(grads_.data(), 0, grads_.size() * sizeof(float));
  }

  const ParameterTable& table() const { return table_; }
  void* flat_values() const { return values_.data(); }
  std::size_t flat_value_bytes() const { return values_.size(); }
  float* flat_grads() const { return grads_.data(); }
  std::size_t flat_grad_count() const { return grads_.size(); }

  // The families of the flat buffers (parameter table offsets).
  S* value_at(std::int64_t element) const {
    return reinterpret_cast<S*>(values_.data() + table_.value_byte_offset(element, sizeof(S)));
  }
  S* region(const char* key) const { return value_at(table_.offset_or_end(key)); }
  S* w13() const { return region("w13"); }
  S* w2() const { return region("w2"); }
  S* const_wc() const { return region("const_wc"); }
  S* const_v() const { return region("const_v"); }
  // An fp32 family's values (router::GatingResidual's W_g).
  float* fp32_region(const char* key) const {
    return reinterpret_cast<float*>(values_.data() + table_.value_byte_offset(table_.offset_or_end(key), sizeof(S)));
  }
  float* grad_at(std::int64_t element) const { return grads_.data() + element; }

  // Full-size host fp32 weights to the device (this layer's part, rounded to S); synchronises (work in
  // flight on any stream finishes first, and work enqueued after it sees the new values).
  void load(const MoeWeights<float>& full) {
    std::vector<float> flat(std::size_t(table_.size()));
    table_.pack(full, flat.data());
    std::vector<char> bytes(values_.size());
    for (std::int64_t i = 0; i < table_.size(); ++i) {
      char* at = bytes.data() + table_.value_byte_offset(i, sizeof(S));
      if (i < table_.fp32_begin()) *reinterpret_cast<S*>(at) = storage_from_float<S>(flat[std::size_t(i)]);
      else *reinterpret_cast<float*>(at) = flat[std::size_t(i)];
    }
    copy_to_device(values_.data(), bytes.data(), bytes.size());  // waits for the device first
  }
  // This layer's weights (full-size; what other ranks hold reads 0) and fp32 gradients; both synchronise.
  MoeWeights<float> weights() const {
    MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<char> bytes(values_.size());
    if (!bytes.empty()) MOEKIT_CUDA_CHECK(cudaMemcpy(bytes.data(), values_.data(), bytes.size(), cudaMemcpyDeviceToHost));
    std::vector<float> flat(std::size_t(table_.size()));
    for (std::int64_t i = 0; i < table_.size(); ++i) {
      const char* at = bytes.data() + table_.value_byte_offset(i, sizeof(S));
      flat[std::size_t(i)] = i < table_.fp32_begin() ? storage_to_float(*reinterpret_cast<const S*>(at))
                                                                : *reinterpret_cast<const float*>(at);
    }
    MoeWeights<float> w;
    table_.unpack(flat.data(), w);
    return w;
  }
  MoeWeights<float> gradients() const {
    MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<float> flat(grads_.size());
    if (!flat.empty()) MOEKIT_CUDA_CHECK(cudaMemcpy(flat.data(), grads_.data(), flat.size() * sizeof(float), cudaMemcpyDeviceToHost));
    MoeWeights<float> g;
    table_.unpack(flat.data(), g);
    return g;
  }
  void zero_grad(cudaStream_t stream) {
    if (grads_.size()) MOEKIT_CUDA_CHECK(cudaMemsetAsync(grads_.data(), 0, grads_.size() * sizeof(float), stream));
  }
  // Named and ordered as the host layer's parameters(), from the table.
  std::vector<DeviceParameter> parameters(const std::string& prefix) const {
    std::vector<DeviceParameter> ps;
    for (const ParamSpec& s : table_.specs()) {
      const bool f32 = s.fp32;
      ps.push_back({prefix + s.name, values_.data() + table_.value_byte_offset(s.offset, sizeof(S)), grads_.data() + s.offset,
                    s.local_shape, f32 ? CUDA_R_32F : data_type<S>(), s.shard});
    }
    return ps;
  }

 private:
  ParameterTable table_;
  DeviceArray<char> values_;  // flat, laid out by table_ (storage type; gating residual fp32)
  DeviceArray<float> grads_;  // flat fp32, laid out by table_
};

}  // namespace MOEKIT_CUDA_ABI
}  // namespace backend::cuda
}  // namespace moekit
