#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace moekit {

// How a parameter is split over the parallel grid (layer/parameter_table.hpp):
//   kReplicated  whole on every rank (router, gating residual, constant experts, every dense layer);
//   kExpertRows  an FFN expert held by one ep rank, its rows (first dimension) split over tp (w1, w3);
//   kExpertCols  the same, its columns (last dimension) split over tp (w2);
//   kTensorRows  on every ep and dp rank, its rows split over tp (the shared experts' w1, w3: a dense
//                FFN under tensor parallelism);
//   kTensorCols  the same, its columns split over tp (the shared experts' w2).
// Distributed clipping, gradient reduction and checkpoints go by this, never by names.
enum class ParamShard { kReplicated, kExpertRows, kExpertCols, kTensorRows, kTensorCols };
// Held by one ep rank (an FFN expert's slice).
constexpr bool expert_shard(ParamShard s) { return s == ParamShard::kExpertRows || s == ParamShard::kExpertCols; }
// Split over tp (then rows or columns).
constexpr bool tp_split(ParamShard s) { return s != ParamShard::kReplicated; }
constexpr bool row_split(ParamShard s) { return s == ParamShard::kExpertRows || s == ParamShard::kTensorRows; }

// A global gradient norm's squares by how the tensors are held: replicated ones count once; expert
// slices differ over tp × ep (summed over those ranks); tensor slices differ over tp only (summed over
// the tp group; the ep and dp ranks hold copies).
struct NormSquares {
  double replicated = 0, expert_slices = 0, tensor_slices = 0;
  void add(ParamShard s, double v) { (expert_shard(s) ? expert_slices : tp_split(s) ? tensor_slices : replicated) += v; }
  double total() const { return replicated + expert_slices + tensor_slices; }
};

// One family of trainable tensors, as a policy declares it (router/policy.hpp, experts/policy.hpp):
// `count` tensors of `shape` (full size), named by `name` with "{}" replaced by the tensor's index. The
// parameter table (layer/parameter_table.hpp) names, shards and lays out whatever families the policies
// declare, once for every backend; MoeWeights holds them by `key`.
struct ParamFamily {
  std::string key;                  // the family's name in MoeWeights ("w1")
  std::string name;                 // each tensor's name: "experts.{}.w1.weight", or "gate.weight" when count is 1
  std::int64_t count = 1;           // tensors (an expert kind's: one per expert; kExpert* families: N_FFN)
  std::vector<std::int64_t> shape;  // one tensor, full size, torch Linear layout [out, in]
  ParamShard shard = ParamShard::kReplicated;
  std::string region;  // the flat-buffer region (default: key). The families of one region lie interleaved,
                       // tensor-major: expert e's w1 rows, then its w3 rows ("w13": one GEMM for both)
  std::string group;   // the listing group (default: key): parameters() lists a group tensor-major
  double init_bound = 0.0;  // torch.nn.Linear's default init: U(-init_bound, init_bound)
  bool fp32 = false;        // the CUDA backend keeps it in fp32 whatever the storage type (it meets the fp32
                            // logits); the table places fp32 families after the others
};

// What a layer's policies declare, in declaration order (router first, then the experts).
class ParamDecls {
 public:
  void add(ParamFamily f) {
    if (f.region.empty()) f.region = f.key;
    if (f.group.empty()) f.group = f.key;
    families_.push_back(std::move(f));
  }
  const std::vector<ParamFamily>& families() const { return families_; }
  bool has(const std::string& key) const {
    for (const auto& f : families_)
      if (f.key == key) return true;
    return false;
  }

 private:
  std::vector<ParamFamily> families_;
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
  bool expert_slice() const { return expert_shard(shard); }
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
