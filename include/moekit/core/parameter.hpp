#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace moekit {

// How a parameter is split over the parallel grid (layer/parameter_table.hpp):
//   kReplicated  whole on every rank (router, gating residual, constant experts, every dense layer);
//   kExpertRows  an FFN expert held by one ep rank, its rows split over tp (w1, w3);
//   kExpertCols  the same, its columns split over tp (w2).
// Distributed clipping and gradient reduction go by this, never by names.
enum class ParamShard { kReplicated, kExpertRows, kExpertCols };

// The tensor families of an MoE layer. The policies declare theirs (a router policy its router
// tensors, an expert set its experts'), and the parameter table (layer/parameter_table.hpp) names, shards
// and lays them out, once for every backend.
struct ParameterFamilies {
  bool router = false;         // gate.weight [N_E, D]
  bool ffn = false;            // experts.{e}.w1.weight [f, D], .w2.weight [D, f]
  bool ffn_gated = false;      // experts.{e}.w3.weight [f, D] (gated activations)
  bool constant = false;       // constant.{j}.wc.weight [2, D], .v [D] (MoE++ constant experts)
  bool gate_residual = false;  // gate_residual.weight [N_E, N_E] (MoE++ gating residual)
};

// Elements of a tensor of this shape (1 for a scalar's empty shape).
inline std::int64_t numel_of(const std::vector<std::int64_t>& shape) {
  std::int64_t n = 1;
  for (auto s : shape) n *= s;
  return n;
}

// A named trainable tensor and its gradient (both contiguous, same shape). Layers list theirs with
// `parameters()`; the optimizer, checkpoints and the reference harness all use these names. G is the
// gradient's type: T, except for bf16 values (backend::Host<bf16>), whose gradients are fp32.
template <class T, class G = T>
struct Parameter {
  std::string name;
  T* value = nullptr;
  G* grad = nullptr;
  std::vector<std::int64_t> shape;  // of this rank's slice
  ParamShard shard = ParamShard::kReplicated;
  bool expert_slice() const { return shard != ParamShard::kReplicated; }
  std::int64_t numel() const { return numel_of(shape); }
};

// Uniform [-bound, bound) from a splitmix64 stream: identical on every platform and compiler,
// unlike std::uniform_real_distribution.
struct SplitMix64 {
  std::uint64_t state;
  explicit SplitMix64(std::uint64_t seed) : state(seed) {}
  std::uint64_t next() {
    std::uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }  // [0, 1)
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
};

// torch.nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
template <class T>
void init_uniform(T* p, std::int64_t n, double bound, SplitMix64& rng) {
  for (std::int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(rng.uniform(-bound, bound));
}

}  // namespace moekit
