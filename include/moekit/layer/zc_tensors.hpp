#pragma once
// Where the zero-computation kinds' tensors lie in a layer's flat buffers (experts/zero_computation.hpp:
// each kind declares its families, replicated, each its own region), for the backends that hand each
// expert's slices to the kinds' functors (backend/host/zero_computation.hpp, backend/cuda/zero_computation.cuh).
#include <array>
#include <cstdint>
#include <string>

#include "moekit/core/error.hpp"
#include "moekit/experts/policy.hpp"
#include "moekit/layer/parameter_table.hpp"

namespace moekit {

// Kinds: std::tuple of kinds. Kind m has count[m] experts and tensors[m] families; its i-th family
// starts at element offset[m][i] of the table, one expert every stride[m][i] elements, size[m][i] in all.
template <class Kinds>
struct ZcTensorLayout {
  using List = experts::ZcList<Kinds>;
  static constexpr int K = List::size;
  static constexpr int kMaxTensors = experts::ZcWeights<float>::kMax;
  std::array<std::int64_t, K> count{};
  std::array<int, K> tensors{};
  std::array<std::array<std::int64_t, kMaxTensors>, K> offset{}, stride{}, size{};

  // ConfigError naming the kind when it declares more than kMaxTensors families, or one that is not
  // replicated, in the storage type and in a region of its own.
  static ZcTensorLayout of(const MoeConfig& cfg, const ParameterTable& t) {
    ZcTensorLayout l;
    const auto counts = List::counts(cfg);
    for (int m = 0; m < K; ++m) {
      l.count[std::size_t(m)] = counts[std::size_t(m)];
      List::visit(m, [&](auto z) {
        using Z = decltype(z);
        ParamDecls d;
        Z::declare_parameters(d, cfg);
        if (int(d.families().size()) > kMaxTensors)
          throw ConfigError(Z::name, std::to_string(d.families().size()) + " tensor families",
                            "a zero-computation kind declares at most " + std::to_string(kMaxTensors));
        l.tensors[std::size_t(m)] = int(d.families().size());
        for (std::size_t i = 0; i < d.families().size(); ++i) {
          const ParamFamily& f = d.families()[i];
          if (f.region != f.key || f.shard != ParamShard::kReplicated || f.fp32)
            throw ConfigError(Z::name, f.key,
                              "a zero-computation kind's tensors are replicated, in the storage type, each in its own region");
          if (!t.has_region(f.region)) continue;  // no experts of this kind
          const auto& r = t.region(f.region);
          l.offset[std::size_t(m)][i] = r.offset, l.stride[std::size_t(m)][i] = r.stride, l.size[std::size_t(m)][i] = r.size();
        }
      });
    }
    return l;
  }
};

}  // namespace moekit
