#pragma once
// The parameters of one MoE layer, named once: every backend (host, CUDA) and every strategy (single
// rank, distributed) keeps its parameters in one flat buffer laid out by this table and lists them from
// it, so they all name the same tensors in the same order with the same shard layout.
//
// Names (Mixtral / MoE++ checkpoints), in this order:
//   gate.weight [N_E, D]; experts.{e}.w1.weight [f, D], .w2.weight [D, f], .w3.weight [f, D] (gated only)
//   for each FFN expert e this rank holds (global index); constant.{j}.wc.weight [2, D], .v [D];
//   gate_residual.weight [N_E, N_E] (router::GatingResidual only).
// Flat layout (elements), the same on every backend so a buffer moves between them in one copy:
//   router | w13 [el][wf][D] (expert le: its w1 rows, then its w3 rows) | w2 [el][D][fl] |
//   const_wc [Nc][2][D] | const_v [Nc][D] | gate_residual [N_E][N_E]
// el = N_FFN / ep experts, each the t-th 1/tp slice of d_expert (fl = d_expert / tp rows of w1/w3 and
// columns of w2), wf = fl (ungated) or 2·fl. The gating residual is last: the CUDA backend keeps it in
// fp32 whatever the storage type (it multiplies the fp32 logits), after the storage-typed part.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "moekit/core/config.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/parameter.hpp"
#include "moekit/parallel/grid.hpp"

namespace moekit {

// Weights (or their gradients) of one whole MoE layer as separate full-size tensors, torch Linear
// layout [out, in], experts contiguous: the interchange form (initialisation, the tests' references,
// moekit-layer's files). Layers hold their own shard in a flat buffer and copy from and to this.
template <class T>
struct MoeWeights {
  std::vector<T> router;         // [N_E, D]              gate.weight
  std::vector<T> w1;             // [N_FFN, d_expert, D]  experts.{i}.w1.weight
  std::vector<T> w2;             // [N_FFN, D, d_expert]  experts.{i}.w2.weight
  std::vector<T> w3;             // [N_FFN, d_expert, D]  experts.{i}.w3.weight (gated activations only)
  std::vector<T> const_wc;       // [N_const, 2, D]       constant.{j}.wc.weight
  std::vector<T> const_v;        // [N_const, D]          constant.{j}.v
  std::vector<T> gate_residual;  // [N_E, N_E]            gate_residual.weight (router::GatingResidual only)

  void resize(const MoeConfig& c, bool gated, bool residual) {
    const auto e = c.num_ffn_experts, d = c.d_model, f = c.d_expert, n = c.num_experts();
    router.assign(n * d, T(0));
    w1.assign(e * f * d, T(0));
    w2.assign(e * d * f, T(0));
    w3.assign(gated ? e * f * d : 0, T(0));
    const_wc.assign(c.num_constant_experts * 2 * d, T(0));
    const_v.assign(c.num_constant_experts * d, T(0));
    gate_residual.assign(residual ? n * n : 0, T(0));
  }
  void zero() {
    for (auto* v : {&router, &w1, &w2, &w3, &const_wc, &const_v, &gate_residual}) std::fill(v->begin(), v->end(), T(0));
  }
};

// torch.nn.Linear's default initialisation, deterministic for a seed: every backend and strategy
// initialised with a seed holds the same values (a distributed layer: its shard of them).
template <class T>
void init_moe_weights(MoeWeights<T>& w, const MoeConfig& cfg, std::uint64_t seed) {
  SplitMix64 rng(seed);
  const double bd = 1.0 / std::sqrt(double(cfg.d_model)), bf = 1.0 / std::sqrt(double(cfg.d_expert));
  auto init = [&](std::vector<T>& v, double bound) { init_uniform(v.data(), std::int64_t(v.size()), bound, rng); };
  init(w.router, bd);
  init(w.w1, bd);
  init(w.w2, bf);
  init(w.w3, bd);
  init(w.const_wc, bd);
  init(w.const_v, bd);
  init(w.gate_residual, 1.0 / std::sqrt(double(cfg.num_experts())));
}

// One tensor of the table.
struct ParamSpec {
  enum class Family { kRouter, kW1, kW2, kW3, kConstWc, kConstV, kGateResidual };
  std::string name;                       // without the caller's prefix
  Family family = Family::kRouter;
  std::int64_t index = 0;                 // global expert (w1/w2/w3) or constant expert (wc/v) index
  std::vector<std::int64_t> shape;        // the full tensor
  std::vector<std::int64_t> local_shape;  // this rank's slice of it
  ParamShard shard = ParamShard::kReplicated;
  std::int64_t offset = 0;                // of the local slice in the flat buffer, in elements
  std::int64_t numel() const { return numel_of(local_shape); }
};

class ParameterTable {
 public:
  using I64 = std::int64_t;
  using Family = ParamSpec::Family;

  ParameterTable() = default;
  // The table of a layer whose policies declare these families (core/parameter.hpp), with this config,
  // on the rank of `g` (the default grid: one rank holding everything). cfg must be valid for the grid.
  ParameterTable(const MoeConfig& cfg, const ParameterFamilies& fam, const ParallelGrid& g = {})
      : cfg_(cfg), grid_(g), gated_(fam.ffn_gated), residual_(fam.gate_residual) {
    if (!fam.router || !fam.ffn)
      throw ConfigError("policies", "router " + std::string(fam.router ? "yes" : "no") + ", ffn " + (fam.ffn ? "yes" : "no"),
                        "a layer's router must declare its router weight and its experts the FFN weights");
    if (!fam.constant && cfg.num_constant_experts > 0)
      throw ConfigError("num_constant_experts", std::to_string(cfg.num_constant_experts),
                        "needs an expert set that declares the constant experts' tensors");
    const bool gated = gated_, residual = residual_;
    const I64 d = cfg.d_model, n = cfg.num_experts(), f = cfg.d_expert, nc = cfg.num_constant_experts;
    el_ = cfg.num_ffn_experts / g.ep, fl_ = f / g.tp, wf_ = gated ? 2 * fl_ : fl_;
    off_.router = 0;
    off_.w13 = off_.router + n * d;
    off_.w2 = off_.w13 + el_ * wf_ * d;
    off_.const_wc = off_.w2 + el_ * d * fl_;
    off_.const_v = off_.const_wc + nc * 2 * d;
    off_.gate_residual = off_.const_v + nc * d;
    off_.end = off_.gate_residual + (residual ? n * n : 0);
    auto add = [&](std::string name, Family fam, I64 index, std::vector<I64> shape, std::vector<I64> local, ParamShard sh,
                   I64 offset) { specs_.push_back({std::move(name), fam, index, std::move(shape), std::move(local), sh, offset}); };
    add("gate.weight", Family::kRouter, 0, {n, d}, {n, d}, ParamShard::kReplicated, off_.router);
    for (I64 le = 0; le < el_; ++le) {
      const I64 e = first_expert() + le;
      const std::string p = "experts." + std::to_string(e) + ".";
      add(p + "w1.weight", Family::kW1, e, {f, d}, {fl_, d}, ParamShard::kExpertRows, w1_offset(le));
      add(p + "w2.weight", Family::kW2, e, {d, f}, {d, fl_}, ParamShard::kExpertCols, w2_offset(le));
      if (gated) add(p + "w3.weight", Family::kW3, e, {f, d}, {fl_, d}, ParamShard::kExpertRows, w3_offset(le));
    }
    for (I64 j = 0; j < nc; ++j) {
      const std::string p = "constant." + std::to_string(j) + ".";
      add(p + "wc.weight", Family::kConstWc, j, {2, d}, {2, d}, ParamShard::kReplicated, off_.const_wc + j * 2 * d);
      add(p + "v", Family::kConstV, j, {d}, {d}, ParamShard::kReplicated, off_.const_v + j * d);
    }
    if (residual)
      add("gate_residual.weight", Family::kGateResidual, 0, {n, n}, {n, n}, ParamShard::kReplicated, off_.gate_residual);
  }

  // The table of the layer MoeLayer<Backend, Router, Experts, ...> on this grid: the families its
  // policies declare.
  template <class Router, class Experts>
  static ParameterTable of(const MoeConfig& cfg, const ParallelGrid& g = {}) {
    ParameterFamilies f;
    Router::declare_parameters(f);
    Experts::declare_parameters(f);
    return ParameterTable(cfg, f, g);
  }

  const MoeConfig& config() const { return cfg_; }
  const ParallelGrid& grid() const { return grid_; }
  const std::vector<ParamSpec>& specs() const { return specs_; }
  // Elements of the flat buffer.
  I64 size() const { return off_.end; }
  // Where each family starts in the flat buffer (elements).
  struct Offsets {
    I64 router = 0, w13 = 0, w2 = 0, const_wc = 0, const_v = 0, gate_residual = 0, end = 0;
  };
  const Offsets& offsets() const { return off_; }
  // The experts this rank holds, [first_expert(), first_expert() + local_experts()), and their shape.
  I64 first_expert() const { return I64(grid_.e) * el_; }
  I64 local_experts() const { return el_; }
  I64 local_d_expert() const { return fl_; }
  I64 w13_rows() const { return wf_; }  // rows of one expert's [w1; w3] block
  I64 w1_offset(I64 le) const { return off_.w13 + le * wf_ * cfg_.d_model; }
  I64 w3_offset(I64 le) const { return w1_offset(le) + fl_ * cfg_.d_model; }
  I64 w2_offset(I64 le) const { return off_.w2 + le * cfg_.d_model * fl_; }

  // Byte layout of a values buffer in a storage type of `storage` bytes: the elements before the gating
  // residual in the storage type, the gating residual in fp32 (from the next 256-byte boundary when the
  // storage type is not 4 bytes wide; an fp32 buffer is plain elements, the same bytes as the host's).
  std::size_t value_byte_offset(I64 element, std::size_t storage) const {
    const auto gr = std::size_t(off_.gate_residual), e = std::size_t(element);
    if (e < gr || storage == 4) return e * storage;
    return (gr * storage + 255) / 256 * 256 + (e - gr) * 4;
  }
  std::size_t value_bytes(std::size_t storage) const { return value_byte_offset(off_.end, storage); }

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

  // Calls copy(full_offset, flat_offset, count) for each contiguous run of spec s: where its local slice
  // sits in the full tensor family of MoeWeights and in the flat buffer.
  template <class F>
  void for_each_run(const ParamSpec& s, F&& copy) const {
    const I64 d = cfg_.d_model, f = cfg_.d_expert, off = I64(grid_.t) * fl_;
    switch (s.family) {
      case Family::kW1:
      case Family::kW3: copy((s.index * f + off) * d, s.offset, fl_ * d); return;
      case Family::kW2:
        for (I64 c = 0; c < d; ++c) copy((s.index * d + c) * f + off, s.offset + c * fl_, fl_);
        return;
      case Family::kConstWc: copy(s.index * 2 * d, s.offset, 2 * d); return;
      case Family::kConstV: copy(s.index * d, s.offset, d); return;
      case Family::kRouter:
      case Family::kGateResidual: copy(0, s.offset, s.numel()); return;
    }
  }

  // Full-size weights -> this rank's slice in a flat buffer (converted element by element to B).
  template <class A, class B>
  void pack(const MoeWeights<A>& full, B* flat) const {
    check_full(full, "pack");
    for (const auto& s : specs_) {
      const A* src = family(full, s.family).data();
      for_each_run(s, [&](I64 from, I64 to, I64 n) {
        for (I64 i = 0; i < n; ++i) flat[to + i] = B(src[from + i]);
      });
    }
  }
  // This rank's slice in a flat buffer -> its place in full-size weights (sized here; what other ranks
  // hold stays 0).
  template <class B, class A>
  void unpack(const B* flat, MoeWeights<A>& full) const {
    full.resize(cfg_, gated_, residual_);
    for (const auto& s : specs_) {
      A* dst = family(full, s.family).data();
      for_each_run(s, [&](I64 from, I64 to, I64 n) {
        for (I64 i = 0; i < n; ++i) dst[from + i] = A(flat[to + i]);
      });
    }
  }

 private:
  template <class W>
  static auto& family(W& w, Family f) {
    switch (f) {
      case Family::kRouter: return w.router;
      case Family::kW1: return w.w1;
      case Family::kW2: return w.w2;
      case Family::kW3: return w.w3;
      case Family::kConstWc: return w.const_wc;
      case Family::kConstV: return w.const_v;
      case Family::kGateResidual: break;
    }
    return w.gate_residual;
  }
  template <class A>
  void check_full(const MoeWeights<A>& w, const char* what) const {
    MoeWeights<char> want;
    want.resize(cfg_, gated_, residual_);
    auto same = [&](std::size_t got, std::size_t need, const char* name) {
      if (got != need)
        throw ShapeError(std::string(what) + ": " + name + " has " + std::to_string(got) + " values, expected " +
                         std::to_string(need));
    };
    same(w.router.size(), want.router.size(), "router");
    same(w.w1.size(), want.w1.size(), "w1");
    same(w.w2.size(), want.w2.size(), "w2");
    same(w.w3.size(), want.w3.size(), "w3");
    same(w.const_wc.size(), want.const_wc.size(), "const_wc");
    same(w.const_v.size(), want.const_v.size(), "const_v");
    same(w.gate_residual.size(), want.gate_residual.size(), "gate_residual");
  }

  MoeConfig cfg_;
  ParallelGrid grid_;
  bool gated_ = false, residual_ = false;
  I64 el_ = 0, fl_ = 0, wf_ = 0;
  Offsets off_;
  std::vector<ParamSpec> specs_;
};

}  // namespace moekit
