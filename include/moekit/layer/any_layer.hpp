#pragma once
// AnyMoeLayer<Backend>: one MoeLayer of any policies behind one interface (virtual calls, one per
// stage call of the whole layer), for programs that choose the layer at run time: the harness, the
// examples and the benchmarks. make_moe_layer(cfg) is the one runtime-to-type switch
// (with_layer_type, layer/moe_layer_decl.hpp) returning it; erase<Layer>(...) wraps a layer type the
// program chose itself (a program that bounds its instantiations to a few types).
//
// The interface is the layer's, less what only some types have: the expert-bias calls throw
// std::logic_error on a layer without router::BiasBalanced, the distributed calls are the identity
// (sync_gradients) or empty (comm_counters) on a single-rank layer. Views of the last forward come as
// pointers: host memory on the host backend, device memory on CUDA.
#include <cstdint>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "moekit/core/config.hpp"
#include "moekit/core/tensor.hpp"
#include "moekit/layer/moe_layer_decl.hpp"
#include "moekit/layer/parameter_table.hpp"
#include "moekit/layer/pipeline.hpp"
#include "moekit/parallel/comm/communicator.hpp"
#include "moekit/parallel/grid.hpp"

namespace moekit {

// The types a backend's layers share (those of any one of its layers).
template <class Backend>
struct layer_types {
  using probe = MoeLayer<Backend, router::TopK<router::Softmax>, experts::Ffn<act::SwiGLU>>;
  using storage_type = typename probe::storage_type;
  using logit_type = typename probe::logit_type;
  using weight_type = typename probe::weight_type;
  using Context = typename probe::Context;
  using parameter_type = typename decltype(std::declval<probe&>().parameters())::value_type;
};

// How the expert GEMMs ran: the strategy ("cblas" on the host; grouped / streams / lt on CUDA) and, on
// CUDA, the phases by path (backend/cuda/grouped_gemm.cuh, GemmPathCounts): grouped; sent to the streams
// path by type or by alignment; refused by cuBLAS; Lt problems without an algorithm. fallbacks: the sum
// of all but grouped.
struct GemmStats {
  std::string strategy;
  int fallbacks = 0;
  int grouped = 0, by_type = 0, by_alignment = 0, refused = 0, lt_no_algo = 0;
};

// Pointers to what the last forward left (valid until the next forward): host or device memory.
template <class L>
struct ForwardViews {
  const L* logits = nullptr;          // [T, N_E]
  const L* probs = nullptr;           // [T, N_E] P of the balance loss
  const int* topk_indices = nullptr;  // [T, k]; token choice only
  const L* topk_gates = nullptr;      // [T, k]; token choice only
  bool on_device = false;
  Routing routing = Routing::kTokenChoice;
  RoutingPlan<L> plan;  // every slot: token (plan.layout, by token under expert choice), expert, gate, row
};

template <class Backend>
class AnyMoeLayer {
 public:
  using types = layer_types<Backend>;
  using S = typename types::storage_type;
  using L = typename types::logit_type;
  using W = typename types::weight_type;
  using Context = typename types::Context;
  using parameter_type = typename types::parameter_type;

  virtual ~AnyMoeLayer() = default;
  virtual const MoeConfig& config() const = 0;
  virtual bool biased() const = 0;  // router::BiasBalanced
  virtual bool distributed() const = 0;
  virtual const ParameterTable& parameter_table() const = 0;

  virtual std::size_t workspace_bytes(std::int64_t tokens) const = 0;
  virtual void reserve(std::int64_t tokens) = 0;
  virtual AuxLosses forward(MatrixView<const S> x, MatrixView<S> y, MatrixView<const L> prev_logits = {}, Context ctx = {}) = 0;
  virtual void backward(MatrixView<const S> dy, MatrixView<S> dx, double aux_scale = 1.0, MatrixView<const L> dlogits_next = {},
                        MatrixView<L> dprev_logits = {}, Context ctx = {}) = 0;

  virtual void init_params(std::uint64_t seed) = 0;
  virtual void load_weights(const MoeWeights<W>& full) = 0;
  virtual MoeWeights<W> weights() const = 0;
  virtual MoeWeights<W> gradients() const = 0;
  virtual void zero_grad(Context ctx = {}) = 0;
  virtual std::vector<parameter_type> parameters(const std::string& prefix = "") = 0;

  virtual void set_training(bool on) = 0;
  virtual bool training() const = 0;
  virtual void end_step(Context ctx = {}) = 0;
  virtual std::span<const L> router_state() const = 0;
  virtual void set_router_state(std::span<const L> v) = 0;
  virtual std::span<const L> expert_bias() const = 0;            // logic_error without BiasBalanced
  virtual void set_expert_bias(std::span<const L> b) = 0;         // logic_error without BiasBalanced
  virtual std::vector<L> expert_bias_update() const = 0;          // logic_error without BiasBalanced
  virtual const std::vector<std::int64_t>& step_counts() const = 0;
  virtual void set_replay(MatrixView<const std::int32_t> indices) = 0;  // router replay: the next forward's record

  virtual void sync_gradients(Context ctx = {}) = 0;  // the identity on one rank
  virtual ParallelGrid grid() const = 0;              // tp = ep = dp = 1 on one rank
  virtual comm::ByteCounters comm_counters() const = 0;

  virtual std::int64_t num_tokens() const = 0;
  virtual AuxLosses aux() const = 0;
  virtual VectorView<const std::int32_t> expert_counts() const = 0;
  virtual const std::vector<std::int64_t>& routed_counts() const = 0;
  virtual std::int64_t expert_gemm_flops() const = 0;
  virtual std::int64_t ffn_rows() const = 0;
  virtual ForwardViews<L> views() const = 0;
  virtual GemmStats gemm_stats() const = 0;
};

// The erasure of one layer type (owns the layer; layer() reaches its full interface).
template <class Layer>
class ErasedMoeLayer final : public AnyMoeLayer<typename Layer::backend_type> {
  using Base = AnyMoeLayer<typename Layer::backend_type>;
  using typename Base::Context;
  using typename Base::L;
  using typename Base::S;
  using typename Base::W;
  static constexpr bool kBiased = router::router_traits<typename Layer::router_type>::selection_bias;
  static constexpr bool kDistributed = Layer::parallel_type::distributed;

 public:
  template <class... Args>
  explicit ErasedMoeLayer(Args&&... args) : layer_(std::forward<Args>(args)...) {}
  Layer& layer() { return layer_; }
  const Layer& layer() const { return layer_; }

  const MoeConfig& config() const override { return layer_.config(); }
  bool biased() const override { return kBiased; }
  bool distributed() const override { return kDistributed; }
  const ParameterTable& parameter_table() const override { return layer_.parameter_table(); }
  std::size_t workspace_bytes(std::int64_t tokens) const override { return layer_.workspace_bytes(tokens); }
  void reserve(std::int64_t tokens) override { layer_.reserve(tokens); }
  AuxLosses forward(MatrixView<const S> x, MatrixView<S> y, MatrixView<const L> prev, Context ctx) override {
    return layer_.forward(x, y, prev, ctx);
  }
  void backward(MatrixView<const S> dy, MatrixView<S> dx, double aux_scale, MatrixView<const L> dnext, MatrixView<L> dprev,
                Context ctx) override {
    layer_.backward(dy, dx, aux_scale, dnext, dprev, ctx);
  }
  void init_params(std::uint64_t seed) override { layer_.init_params(seed); }
  void load_weights(const MoeWeights<W>& full) override { layer_.load_weights(full); }
  MoeWeights<W> weights() const override { return layer_.weights(); }
  MoeWeights<W> gradients() const override { return layer_.gradients(); }
  void zero_grad(Context ctx) override { layer_.zero_grad(ctx); }
  std::vector<typename Base::parameter_type> parameters(const std::string& prefix) override { return layer_.parameters(prefix); }
  void set_training(bool on) override { layer_.set_training(on); }
  bool training() const override { return layer_.training(); }
  void end_step(Context ctx) override { layer_.end_step(ctx); }
  std::span<const L> router_state() const override { return layer_.router_state(); }
  void set_router_state(std::span<const L> v) override { layer_.set_router_state(v); }
  std::span<const L> expert_bias() const override {
    if constexpr (kBiased) return layer_.expert_bias();
    else throw no_bias("expert_bias");
  }
  void set_replay(MatrixView<const std::int32_t> indices) override { layer_.set_replay(indices); }
  void set_expert_bias(std::span<const L> b) override {
    if constexpr (kBiased) layer_.set_expert_bias(b);
    else throw no_bias("set_expert_bias");
  }
  std::vector<L> expert_bias_update() const override {
    if constexpr (kBiased) return layer_.expert_bias_update();
    else throw no_bias("expert_bias_update");
  }
  const std::vector<std::int64_t>& step_counts() const override { return layer_.step_counts(); }
  void sync_gradients(Context ctx) override {
    if constexpr (kDistributed) layer_.sync_gradients(ctx);
  }
  ParallelGrid grid() const override {
    if constexpr (kDistributed) return layer_.grid();
    else return ParallelGrid{};
  }
  comm::ByteCounters comm_counters() const override {
    if constexpr (kDistributed) return layer_.comm_counters();
    else return {};
  }
  std::int64_t num_tokens() const override { return layer_.num_tokens(); }
  AuxLosses aux() const override { return layer_.aux(); }
  VectorView<const std::int32_t> expert_counts() const override { return layer_.expert_counts(); }
  const std::vector<std::int64_t>& routed_counts() const override { return layer_.routed_counts(); }
  std::int64_t expert_gemm_flops() const override { return layer_.expert_gemm_flops(); }
  std::int64_t ffn_rows() const override { return layer_.ffn_rows(); }
  GemmStats gemm_stats() const override {
    if constexpr (requires { layer_.gemm_paths(); }) {
      const auto& p = layer_.gemm_paths();
      return {std::string(to_string(layer_.gemm_strategy())), layer_.gemm_fallbacks(), p.grouped, p.by_type, p.by_alignment,
              p.refused, p.lt_no_algo};
    } else if constexpr (requires { layer_.gemm_strategy(); }) {
      return {std::string(to_string(layer_.gemm_strategy())), layer_.gemm_fallbacks()};
    } else {
      return {"cblas", 0};
    }
  }
  ForwardViews<L> views() const override {
    if constexpr (requires { layer_.logits_device(); })
      return {layer_.logits_device(), layer_.probs_device(), layer_.topk_indices_device(), layer_.topk_gates_device(), true,
              layer_.routing(), layer_.routing_plan_device()};
    else
      return {layer_.logits().data, layer_.probs().data, layer_.topk_indices().data, layer_.topk_gates().data, false,
              layer_.routing(), layer_.routing_plan()};
  }

 private:
  static std::logic_error no_bias(const char* call) {
    return std::logic_error(std::string("AnyMoeLayer::") + call + ": the layer has no router::BiasBalanced (expert_bias false)");
  }
  Layer layer_;
};

// Wraps a layer type chosen by the program: erase<Layer>(constructor arguments...).
template <class Layer, class... Args>
std::unique_ptr<AnyMoeLayer<typename Layer::backend_type>> erase(Args&&... args) {
  return std::make_unique<ErasedMoeLayer<Layer>>(std::forward<Args>(args)...);
}

// The layer the config describes (router, gating residual, expert bias, activation, expert set; the
// balance scope and which router families to instantiate as with_layer_type's), on one rank, or with
// `world` (and the further constructor arguments) under a distributed strategy P.
template <class Backend, class Balance = balance::MicroBatch, class Filter = AllRows, class... Args>
std::unique_ptr<AnyMoeLayer<Backend>> make_moe_layer(const MoeConfig& cfg, Args&&... args) {
  return with_layer_type<Backend, Balance, Filter>(cfg, [&]<class Layer>(std::type_identity<Layer>) {
    return std::unique_ptr<AnyMoeLayer<Backend>>(std::make_unique<ErasedMoeLayer<Layer>>(cfg, std::forward<Args>(args)...));
  });
}
template <class Backend, class Balance, class P, class Filter = AllRows, class World, class... Args>
std::unique_ptr<AnyMoeLayer<Backend>> make_distributed_moe_layer(const MoeConfig& cfg, World& world, Args&&... args) {
  return with_layer_type<Backend, Balance, Filter>(cfg, [&]<class Single>(std::type_identity<Single>) {
    using Layer = MoeLayer<Backend, typename Single::router_type, typename Single::experts_type, Balance, P>;
    return std::unique_ptr<AnyMoeLayer<Backend>>(std::make_unique<ErasedMoeLayer<Layer>>(cfg, world, std::forward<Args>(args)...));
  });
}

}  // namespace moekit
