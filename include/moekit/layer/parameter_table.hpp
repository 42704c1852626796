#pragma once
// The parameters of one MoE layer, named once: every backend (host, CUDA) and every strategy (single
// rank, distributed) keeps its parameters in one flat buffer laid out by this table and lists them from
// it, so they all name the same tensors in the same order with the same shard layout. The table takes
// whatever families the layer's policies declare (core/parameter.hpp's ParamFamily), in this order: the
// families the CUDA backend keeps in its storage type in declaration order, then the fp32 ones.
//
// With today's policies (names as Mixtral / MoE++ checkpoints):
//   gate.weight [N_E, D]; experts.{e}.w1.weight [f, D], .w2.weight [D, f], .w3.weight [f, D] (gated only)
//   for each FFN expert e this rank holds (global index); with ffn_bias (GPT-OSS) experts.{e}.w1.bias
//   [f], .w3.bias [f], .w2.bias [D]; constant.{j}.wc.weight [2, D], .v [D]; shared_experts.w1.weight
//   [s, D], .w2.weight [D, s], .w3.weight [s, D] and shared_expert_gate.weight [1, D] (experts/shared.hpp);
//   gate.bias [N_E] (router::LinearBias, fp32); gate_residual.weight [N_E, N_E] (router::GatingResidual, fp32).
// Flat layout (elements): regions in order, each tensor-major with its families interleaved:
//   router | w13 [el][wf][D] (expert le: its w1 rows, then its w3 rows) | w2 [el][D][fl] |
//   b13 [el][wf] | b2 [el][D/tp] | const_wc [Nc][2][D] | const_v [Nc][D] | shared_w13 [2·s/tp][D] |
//   shared_w2 [D][s/tp] | shared_gate [D] | router_bias [N_E] | gate_residual [N_E][N_E]
//   (a region is there when a policy declares it)
// el = N_FFN / ep experts, each the t-th 1/tp slice of d_expert (fl = d_expert / tp rows of w1/w3 and
// columns of w2), wf = fl (ungated) or 2·fl. The fp32 families come last: the CUDA backend keeps them in
// fp32 whatever the storage type, after the storage-typed part (value_byte_offset).
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "moekit/core/config.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/parameter.hpp"
#include "moekit/experts/policy.hpp"
#include "moekit/parallel/grid.hpp"

namespace moekit {

// Weights (or their gradients) of one whole MoE layer as full-size tensors by family, torch Linear
// layout [out, in], a family's tensors contiguous (w1: [N_FFN, d_expert, D]): the interchange form
// (initialisation, the tests' references, moekit-layer's files). Layers hold their own shard in a flat
// buffer and copy from and to this. ParameterTable::full() makes one of the right families and sizes.
template <class T>
struct MoeWeights {
  struct Family {
    std::string key;
    std::vector<T> values;
  };
  std::vector<Family> families;  // in the table's order

  bool has(std::string_view key) const { return find(key) != nullptr; }
  std::vector<T>& operator[](std::string_view key) & { return at(key); }
  const std::vector<T>& operator[](std::string_view key) const& { return at(key); }
  // Of a temporary (layer.gradients()["w1"]): the values themselves, so a range-for over them does
  // not outlive the weights they came from.
  std::vector<T> operator[](std::string_view key) && { return std::move(at(key)); }
  std::vector<T>& at(std::string_view key) {
    if (Family* f = find(key)) return f->values;
    throw ShapeError("MoeWeights: no family '" + std::string(key) + "' (families: " + keys() + ")");
  }
  const std::vector<T>& at(std::string_view key) const { return const_cast<MoeWeights&>(*this).at(key); }
  void zero() {
    for (auto& f : families) std::fill(f.values.begin(), f.values.end(), T(0));
  }
  std::string keys() const {
    std::string s;
    for (const auto& f : families) s += (s.empty() ? "" : ", ") + f.key;
    return s.empty() ? "none" : s;
  }
  // The same families converted element by element.
  template <class U>
  MoeWeights<U> as() const {
    MoeWeights<U> w;
    for (const auto& f : families) w.families.push_back({f.key, std::vector<U>(f.values.begin(), f.values.end())});
    return w;
  }

 private:
  Family* find(std::string_view key) {
    for (auto& f : families)
      if (f.key == key) return &f;
    return nullptr;
  }
  const Family* find(std::string_view key) const { return const_cast<MoeWeights*>(this)->find(key); }
};

// One tensor of the table.
struct ParamSpec {
  std::string name;                       // without the caller's prefix
  std::string family;                     // its family's key
  std::int64_t index = 0;                 // its index in the family (global: the FFN expert, the constant expert)
  std::vector<std::int64_t> shape;        // the full tensor
  std::vector<std::int64_t> local_shape;  // this rank's slice of it
  ParamShard shard = ParamShard::kReplicated;
  std::int64_t offset = 0;                // of the local slice in the flat buffer, in elements
  bool fp32 = false;                      // kept in fp32 on the CUDA backend
  std::int64_t numel() const { return numel_of(local_shape); }
  bool expert_slice() const { return expert_shard(shard); }
};

class ParameterTable {
 public:
  using I64 = std::int64_t;

  // Where one region of the flat buffer lies: `count` local tensors of `stride` elements each.
  struct Region {
    std::string key;
    I64 offset = 0, count = 0, stride = 0;
    I64 size() const { return count * stride; }
  };

  ParameterTable() = default;
  // The table of a layer whose policies declare these families, with this config, on the rank of `g`
  // (the default grid: one rank holding everything). cfg must be valid for the grid.
  ParameterTable(const MoeConfig& cfg, const ParamDecls& decls, const ParallelGrid& g = {}) : cfg_(cfg), grid_(g) {
    for (bool fp32 : {false, true})
      for (const auto& f : decls.families())
        if (f.fp32 == fp32) add_family(f);
    if (!has_family("router") || !has_family("w1") || !has_family("w2"))
      throw ConfigError("policies", "families " + family_keys(),
                        "a layer's router must declare its router weight and its experts the FFN weights (router, w1, w2)");
    if (!has_family("const_wc") && cfg.num_constant_experts > 0)
      throw ConfigError("num_constant_experts", std::to_string(cfg.num_constant_experts),
                        "needs an expert set that declares the constant experts' tensors");
    lay_out();
  }

  // The table of the layer MoeLayer<Backend, Router, Experts, ...> on this grid: the families its
  // policies declare.
  template <class Router, class Experts>
  static ParameterTable of(const MoeConfig& cfg, const ParallelGrid& g = {}) {
    ParamDecls d;
    Router::declare_parameters(d, cfg);
    experts::declare_expert_parameters<Experts>(d, cfg);
    return ParameterTable(cfg, d, g);
  }

  const MoeConfig& config() const { return cfg_; }
  const ParallelGrid& grid() const { return grid_; }
  const std::vector<ParamSpec>& specs() const { return specs_; }
  const std::vector<ParamFamily>& families() const { return families_; }
  bool has_family(std::string_view key) const { return family_index(key) >= 0; }
  // Elements of the flat buffer.
  I64 size() const { return end_; }
  // A region of the flat buffer (ShapeError if the policies declared none), and where it starts, or the
  // end of the buffer when they did not declare it (an empty range: a pointer that is never read).
  const Region& region(std::string_view key) const {
    for (const auto& r : regions_)
      if (r.key == key) return r;
    throw ShapeError("no parameter region '" + std::string(key) + "' in this layer (families: " + family_keys() + ")");
  }
  bool has_region(std::string_view key) const {
    for (const auto& r : regions_)
      if (r.key == key) return true;
    return false;
  }
  I64 offset_or_end(std::string_view key) const {
    for (const auto& r : regions_)
      if (r.key == key) return r.offset;
    return end_;
  }
  I64 size_or_zero(std::string_view key) const {
    for (const auto& r : regions_)
      if (r.key == key) return r.size();
    return 0;
  }
  // Where the fp32 families start (the end of the buffer when there are none).
  I64 fp32_begin() const { return fp32_begin_; }
  // The experts this rank holds, [first_expert(), first_expert() + local_experts()), and their shape.
  I64 first_expert() const { return I64(grid_.e) * local_experts(); }
  I64 local_experts() const { return cfg_.num_ffn_experts / grid_.ep; }
  I64 local_d_expert() const { return cfg_.d_expert / grid_.tp; }
  I64 w13_rows() const { return region("w13").stride / cfg_.d_model; }  // rows of one expert's [w1; w3] block

  // Byte layout of a values buffer in a storage type of `storage` bytes: the elements before the fp32
  // families in the storage type, the fp32 ones from the next 256-byte boundary when the storage type is
  // not 4 bytes wide (an fp32 buffer is plain elements, the same bytes as the host's).
  std::size_t value_byte_offset(I64 element, std::size_t storage) const {
    const auto gr = std::size_t(fp32_begin_), e = std::size_t(element);
    if (e < gr || storage == 4) return e * storage;
    return (gr * storage + 255) / 256 * 256 + (e - gr) * 4;
  }
  std::size_t value_bytes(std::size_t storage) const { return value_byte_offset(end_, storage); }

  // The spec named `name` (without prefix); ShapeError if there is none.
  const ParamSpec& find(const std::string& name) const {
    for (const auto& s : specs_)
      if (s.name == name) return s;
    throw ShapeError("no parameter named '" + name + "' in this layer");
  }

  // Parameter views into flat buffers (value and gradient laid out by this table; bf16 values have
  // fp32 gradients).
  template <class T, class G>
  std::vector<Parameter<T, G>> parameters(T* value, G* grad, const std::string& prefix = "") const {
    std::vector<Parameter<T, G>> ps;
    ps.reserve(specs_.size());
    for (const auto& s : specs_)
      ps.push_back({prefix + s.name, value + s.offset, grad ? grad + s.offset : nullptr, s.local_shape, s.shard});
    return ps;
  }

  // Full-size zero weights of every family this table lays out (a distributed layer's too: all of them).
  template <class T>
  MoeWeights<T> full() const {
    MoeWeights<T> w;
    for (const auto& f : families_) w.families.push_back({f.key, std::vector<T>(std::size_t(f.count * numel_of(f.shape)), T(0))});
    return w;
  }
  // torch.nn.Linear's default initialisation, deterministic for a seed: each family in table order from
  // one splitmix64 stream, so every backend and strategy initialised with a seed holds the same values (a
  // distributed layer: its shard of them).
  template <class T>
  MoeWeights<T> initial(std::uint64_t seed) const {
    MoeWeights<T> w = full<T>();
    SplitMix64 rng(seed);
    for (std::size_t i = 0; i < families_.size(); ++i) {
      auto& v = w.families[i].values;
      init_uniform(v.data(), std::int64_t(v.size()), families_[i].init_bound, rng);
    }
    return w;
  }

  // Calls copy(full_offset, flat_offset, count) for each contiguous run of spec s: where its local slice
  // sits in its family's full tensor and in the flat buffer.
  template <class F>
  void for_each_run(const ParamSpec& s, F&& copy) const {
    const I64 numel = numel_of(s.shape), base = s.index * numel;
    if (!tp_split(s.shard)) {
      copy(base, s.offset, numel);
    } else if (row_split(s.shard)) {  // rows [t·r, (t+1)·r) of the first dimension
      const I64 per_row = numel / s.shape.front(), rows = s.local_shape.front();
      copy(base + I64(grid_.t) * rows * per_row, s.offset, rows * per_row);
    } else {  // columns [t·c, (t+1)·c) of the last dimension
      const I64 cols = s.shape.back(), local = s.local_shape.back(), outer = numel / cols;
      for (I64 o = 0; o < outer; ++o) copy(base + o * cols + I64(grid_.t) * local, s.offset + o * local, local);
    }
  }

  // Full-size weights -> this rank's slice in a flat buffer (converted element by element to B).
  template <class A, class B>
  void pack(const MoeWeights<A>& full, B* flat) const {
    check_full(full, "pack");
    for (const auto& s : specs_) {
      const A* src = full[s.family].data();
      for_each_run(s, [&](I64 from, I64 to, I64 n) {
        for (I64 i = 0; i < n; ++i) flat[to + i] = B(src[from + i]);
      });
    }
  }
  // This rank's slice in a flat buffer -> its place in full-size weights (sized here; what other ranks
  // hold stays 0).
  template <class B, class A>
  void unpack(const B* flat, MoeWeights<A>& full) const {
    full = this->full<A>();
    for (const auto& s : specs_) {
      A* dst = full[s.family].data();
      for_each_run(s, [&](I64 from, I64 to, I64 n) {
        for (I64 i = 0; i < n; ++i) dst[from + i] = A(flat[to + i]);
      });
    }
  }

 private:
  int family_index(std::string_view key) const {
    for (std::size_t i = 0; i < families_.size(); ++i)
      if (families_[i].key == key) return int(i);
    return -1;
  }
  std::string family_keys() const {
    std::string s;
    for (const auto& f : families_) s += (s.empty() ? "" : ", ") + f.key;
    return s.empty() ? "none" : s;
  }
  void add_family(const ParamFamily& f) {
    auto bad = [&](const std::string& rule) { throw ConfigError("parameter family " + f.key, f.name, rule); };
    if (has_family(f.key)) bad("is declared twice");
    if (f.count < 0 || f.shape.empty()) bad("needs a count >= 0 and a shape");
    if (tp_split(f.shard)) {
      if (expert_shard(f.shard) && f.count % grid_.ep != 0)
        bad("has " + std::to_string(f.count) + " tensors, not divisible by ep = " + std::to_string(grid_.ep));
      const I64 split = row_split(f.shard) ? f.shape.front() : f.shape.back();
      if (split % grid_.tp != 0) bad("splits " + std::to_string(split) + " over tp = " + std::to_string(grid_.tp));
    }
    families_.push_back(f);
  }
  // The tensors of family f this rank holds: [first, first + count), each of local shape.
  std::pair<I64, I64> local_range(const ParamFamily& f) const {
    if (!expert_shard(f.shard)) return {0, f.count};
    const I64 n = f.count / grid_.ep;
    return {I64(grid_.e) * n, n};
  }
  std::vector<I64> local_shape(const ParamFamily& f) const {
    std::vector<I64> s = f.shape;
    if (tp_split(f.shard)) (row_split(f.shard) ? s.front() : s.back()) /= grid_.tp;
    return s;
  }
  // Regions in order of first appearance, each tensor-major over its families; then the listing.
  void lay_out() {
    I64 at = 0;
    fp32_begin_ = -1;
    std::vector<I64> family_offset(families_.size()), family_stride(families_.size());
    for (std::size_t i = 0; i < families_.size(); ++i) {
      const ParamFamily& f = families_[i];
      bool seen = false;
      for (const auto& r : regions_) seen = seen || r.key == f.region;
      if (seen) continue;
      if (f.fp32 && fp32_begin_ < 0) fp32_begin_ = at;
      Region r{f.region, at, local_range(f).second, 0};
      for (std::size_t j = i; j < families_.size(); ++j) {
        const ParamFamily& m = families_[j];
        if (m.region != f.region) continue;
        if (local_range(m).second != r.count || m.fp32 != f.fp32 || expert_shard(m.shard) != expert_shard(f.shard) ||
            tp_split(m.shard) != tp_split(f.shard))
          throw ConfigError("parameter family " + m.key, m.region,
                            "shares a region with " + f.key + " but not its count, sharding or precision");
        family_offset[j] = r.stride;  // within one tensor-major block, for now
        r.stride += numel_of(local_shape(m));
      }
      for (std::size_t j = i; j < families_.size(); ++j)
        if (families_[j].region == f.region) family_offset[j] += at, family_stride[j] = r.stride;
      at += r.size();
      regions_.push_back(r);
    }
    end_ = at;
    if (fp32_begin_ < 0) fp32_begin_ = end_;
    // The listing: groups in order of first appearance, each tensor-major over its families.
    std::vector<bool> listed(families_.size(), false);
    for (std::size_t i = 0; i < families_.size(); ++i) {
      if (listed[i]) continue;
      std::vector<std::size_t> members;
      for (std::size_t j = i; j < families_.size(); ++j)
        if (families_[j].group == families_[i].group) members.push_back(j), listed[j] = true;
      const I64 count = local_range(families_[i]).second;
      for (I64 le = 0; le < count; ++le)
        for (std::size_t j : members) {
          const ParamFamily& f = families_[j];
          const auto [fj, cj] = local_range(f);
          if (cj != count)
            throw ConfigError("parameter family " + f.key, f.group, "shares a listing group with " + families_[i].key + " but not its count");
          const I64 index = fj + le;
          specs_.push_back({tensor_name(f, index), f.key, index, f.shape, local_shape(f), f.shard,
                            family_offset[j] + le * family_stride[j], f.fp32});
        }
    }
  }
  static std::string tensor_name(const ParamFamily& f, I64 index) {
    std::string n = f.name;
    const auto at = n.find("{}");
    if (at != std::string::npos) n.replace(at, 2, std::to_string(index));
    return n;
  }
  template <class A>
  void check_full(const MoeWeights<A>& w, const char* what) const {
    for (const auto& f : families_) {
      if (!w.has(f.key)) throw ShapeError(std::string(what) + ": the weights have no '" + f.key + "' (they have: " + w.keys() + ")");
      const std::size_t need = std::size_t(f.count * numel_of(f.shape)), got = w[f.key].size();
      if (got != need)
        throw ShapeError(std::string(what) + ": " + f.key + " has " + std::to_string(got) + " values, expected " + std::to_string(need));
    }
    for (const auto& f : w.families)
      if (!has_family(f.key)) throw ShapeError(std::string(what) + ": '" + f.key + "' is not a parameter family of this layer (" + family_keys() + ")");
  }

  MoeConfig cfg_;
  ParallelGrid grid_;
  std::vector<ParamFamily> families_;  // in table order: storage-typed, then fp32
  std::vector<Region> regions_;
  std::vector<ParamSpec> specs_;
  I64 end_ = 0, fp32_begin_ = 0;
};

}  // namespace moekit
