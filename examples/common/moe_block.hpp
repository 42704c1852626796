#pragma once
// One MoE layer behind a small virtual interface (MoeBlock), and the factories that make the host
// layers behind it, shared by the example trainers (train_domains, train_lm).
//
// A trainer's model holds its MoE layers as MoeBlock<T>: whichever of the library's layer types the
// run-time flags pick (router x experts x balance scope), on the host (HostMoeBlock over
// moekit::AnyMoeLayer, fp32 or bf16 storage), distributed over ranks (ranks.hpp), or on a GPU (a
// trainer's own CUDA factory). with_moe_layer_type turns the flags into one of 16 layer types through
// the library's runtime switch.
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <moekit/backend/host/convert.hpp>
#include <moekit/layer/any_layer.hpp>
#include <moekit/moe_layer.hpp>
#include <moekit/train/adamw.hpp>
#include <moekit/train/parameter_group.hpp>

// One MoE layer behind a small virtual interface, so the model can hold whichever of the layer types
// the run-time flags pick. Virtual calls happen a few times per layer per step: nothing next to GEMMs.
template <class T>
class MoeBlock {
 public:
  template <class U>
  using Matrix = moekit::MatrixView<U>;
  virtual ~MoeBlock() = default;
  virtual const moekit::MoeConfig& config() const = 0;
  virtual moekit::AuxLosses forward(Matrix<const T> x, Matrix<T> y, Matrix<const T> prev_logits) = 0;
  virtual void backward(Matrix<const T> dy, Matrix<T> dx, double aux_scale, Matrix<const T> dlogits_next,
                        Matrix<T> dprev_logits) = 0;
  virtual Matrix<const T> logits() const = 0;
  virtual Matrix<const T> probs() const = 0;
  virtual Matrix<const std::int32_t> topk_indices() const = 0;  // token choice only
  // The experts each token of the last forward went to: token t's are experts[first[t] .. first[t + 1])
  // (token choice: its top k; expert choice: the experts that took it, in expert order).
  struct Routed {
    std::vector<std::int32_t> first, experts;
  };
  virtual Routed routed() const {
    const auto idx = topk_indices();
    Routed r;  // a replayed record's -1 slots left out
    r.first.push_back(0);
    for (std::int64_t t = 0; t < idx.shape[0]; ++t) {
      for (std::int64_t j = 0; j < idx.shape[1]; ++j)
        if (idx(t, j) >= 0) r.experts.push_back(idx(t, j));
      r.first.push_back(std::int32_t(r.experts.size()));
    }
    return r;
  }
  virtual moekit::VectorView<const std::int32_t> expert_counts() const = 0;
  virtual const std::vector<std::int64_t>& routed_counts() const = 0;
  virtual std::int64_t expert_gemm_flops() const = 0;
  virtual std::int64_t ffn_rows() const = 0;
  virtual void init_params(std::uint64_t seed) = 0;
  virtual std::vector<moekit::Parameter<T>> parameters(const std::string& prefix) = 0;
  virtual void zero_grad() = 0;
  // Distributed layers: average the step's accumulated MoE gradients over the shards (a collective:
  // every rank calls it once per optimizer step, after the last backward). Single-rank: nothing.
  virtual void sync_gradients() = 0;
  // GlobalBatch: empty the count buffer after each optimizer step. MicroBatch: nothing to do.
  // After each optimizer step: the layer's per-step hook (GlobalBatch buffer reset, BiasBalanced update).
  virtual void end_step() = 0;
  // Evaluation forwards (false) do not add their counts to a GlobalBatch buffer.
  virtual void set_training(bool on) = 0;
  // Layers whose weights live elsewhere (the CUDA layers: on the device) list no host parameters; their
  // parameters are a train::ParameterGroup that the trainer clips and steps where they live (made on
  // first call with the trainer's AdamW config; weight decay on matrices, as the host's). Host layers:
  // none.
  virtual moekit::train::ParameterGroup* parameter_group(const moekit::train::AdamWConfig&) { return nullptr; }
  // Parameters of the layer wherever they live (for counting): shapes and shards; host layers: parameters().
  virtual std::vector<moekit::Parameter<T>> parameter_shapes(const std::string& prefix) { return parameters(prefix); }
  // A stateful router's values (BiasBalanced: the biases; empty otherwise), for checkpoints.
  virtual std::vector<double> router_state() const { return {}; }
  virtual void set_router_state(const std::vector<double>& v) {
    if (!v.empty()) throw std::logic_error("this MoE layer keeps no router state");
  }
};

// A host layer: the library's type-erased layer (moekit/layer/any_layer.hpp) behind the model's interface.
// V: the layer's storage type. V = T: the calls pass straight through. V = bf16 (--dtype bf16): x and dy
// arrive in T and are rounded to bf16 on the way in, y and dx come back widened (logits and their
// gradients are fp32 in the layer anyway); the parameters (bf16 values, fp32 gradients) are a
// train::HostParameterGroup with fp32 masters, which the trainer clips and steps beside the fp32 ones.
template <class T, class V = T>
class HostMoeBlock final : public MoeBlock<T> {
  template <class U>
  using Matrix = moekit::MatrixView<U>;
  using Layer = moekit::AnyMoeLayer<moekit::backend::Host<V>>;
  static constexpr bool kConverts = !std::is_same_v<T, V>;

 public:
  explicit HostMoeBlock(std::unique_ptr<Layer> layer) : layer_(std::move(layer)) {}
  const moekit::MoeConfig& config() const override { return layer_->config(); }
  moekit::AuxLosses forward(Matrix<const T> x, Matrix<T> y, Matrix<const T> prev) override {
    if constexpr (!kConverts) {
      return layer_->forward(x, y, prev);
    } else {
      moekit::check_shape(y, "y", {x.shape[0], config().d_model});
      const std::int64_t n = x.shape[0] * x.shape[1];
      in_.resize(std::size_t(n)), out_.resize(std::size_t(n));
      moekit::backend::host::convert(x.data, in_.data(), n);
      const auto aux = layer_->forward({in_.data(), x.shape}, {out_.data(), x.shape}, prev);
      moekit::backend::host::convert(out_.data(), y.data, n);
      return aux;
    }
  }
  void backward(Matrix<const T> dy, Matrix<T> dx, double aux_scale, Matrix<const T> dnext, Matrix<T> dprev) override {
    if constexpr (!kConverts) {
      layer_->backward(dy, dx, aux_scale, dnext, dprev);
    } else {
      moekit::check_shape(dx, "dx", {dy.shape[0], config().d_model});
      const std::int64_t n = dy.shape[0] * dy.shape[1];
      in_.resize(std::size_t(n)), out_.resize(std::size_t(n));
      moekit::backend::host::convert(dy.data, in_.data(), n);
      layer_->backward({in_.data(), dy.shape}, {out_.data(), dy.shape}, aux_scale, dnext, dprev);
      moekit::backend::host::convert(out_.data(), dx.data, n);
    }
  }
  Matrix<const T> logits() const override { return {layer_->views().logits, {layer_->num_tokens(), config().num_experts()}}; }
  Matrix<const T> probs() const override { return {layer_->views().probs, {layer_->num_tokens(), config().num_experts()}}; }
  Matrix<const std::int32_t> topk_indices() const override {
    return {layer_->views().topk_indices, {layer_->num_tokens(), config().top_k}};
  }
  typename MoeBlock<T>::Routed routed() const override {
    const auto v = layer_->views();
    if (v.routing == moekit::Routing::kTokenChoice) return MoeBlock<T>::routed();
    const moekit::SlotLayout& l = v.plan.layout;  // by token, host memory
    return {std::vector<std::int32_t>(l.first, l.first + l.tokens + 1), std::vector<std::int32_t>(v.plan.expert, v.plan.expert + l.slots)};
  }
  moekit::VectorView<const std::int32_t> expert_counts() const override { return layer_->expert_counts(); }
  const std::vector<std::int64_t>& routed_counts() const override { return layer_->routed_counts(); }
  std::int64_t expert_gemm_flops() const override { return layer_->expert_gemm_flops(); }
  std::int64_t ffn_rows() const override { return layer_->ffn_rows(); }
  void init_params(std::uint64_t seed) override {
    layer_->init_params(seed);
    if constexpr (kConverts)
      if (group_) group_->reload_masters();
  }
  std::vector<moekit::Parameter<T>> parameters(const std::string& prefix) override {
    if constexpr (kConverts) return {};  // the group holds them
    else return layer_->parameters(prefix);
  }
  std::vector<moekit::Parameter<T>> parameter_shapes(const std::string& prefix) override {
    if constexpr (!kConverts) return layer_->parameters(prefix);
    std::vector<moekit::Parameter<T>> ps;
    for (const auto& p : layer_->parameters()) ps.push_back({prefix + p.name, nullptr, nullptr, p.shape, p.shard});
    return ps;
  }
  moekit::train::ParameterGroup* parameter_group(const moekit::train::AdamWConfig& ac) override {
    if constexpr (kConverts) {
      if (!group_)
        group_ = std::make_unique<moekit::train::HostParameterGroup>(layer_->parameters(), ac,
                                                                     [](const moekit::Parameter<float>& p) { return p.shape.size() >= 2; });
      return group_.get();
    } else {
      (void)ac;
      return nullptr;
    }
  }
  std::vector<double> router_state() const override {
    const auto v = layer_->router_state();
    return {v.begin(), v.end()};
  }
  void set_router_state(const std::vector<double>& v) override {
    using L = typename std::remove_cvref_t<decltype(layer_->router_state())>::value_type;
    const std::vector<std::remove_const_t<L>> l(v.begin(), v.end());
    layer_->set_router_state(l);
  }
  void zero_grad() override { layer_->zero_grad(); }
  void sync_gradients() override { layer_->sync_gradients(); }
  void end_step() override { layer_->end_step(); }
  void set_training(bool on) override { layer_->set_training(on); }

 private:
  std::unique_ptr<Layer> layer_;
  std::unique_ptr<moekit::train::HostParameterGroup> group_;  // kConverts only
  std::vector<V> in_, out_;                                    // kConverts only
};

// The layer types the trainers' flags reach, as filters of the library's one runtime switch
// (moekit/layer/policy_switch.hpp), in two families:
//   ClassicRows  softmax top-k routers (plain, gating residual, expert bias, both) with SwiGLU experts,
//                with or without MoE++'s zero-computation experts (8 rows);
//   OpenRows     the open models' routers with SwiGLU experts: sigmoid (with or without expert bias),
//                groups (DeepSeek-V2 softmax, sigmoid, DeepSeek-V3 sigmoid with expert bias), router
//                bias; and GPT-OSS's clamped SwiGLU experts, plain or with router bias (8 rows).
// The rest of the switch (GeLU/ReLU, other chains) would multiply what every trainer compiles. A CUDA
// program splits the rows over translation units with Part (ClassicRows + BiasVariants, OpenRows).
namespace trainer_rows {
namespace mk = moekit;
using Softmax = mk::router::TopK<mk::router::Softmax>;
using Sigmoid = mk::router::TopK<mk::router::Sigmoid>;
using Residual = mk::router::GatingResidual<Softmax>;
template <class R, class E>
inline constexpr bool classic = (std::is_same_v<R, Softmax> || std::is_same_v<R, Residual> ||
                                 std::is_same_v<R, mk::router::BiasBalanced<Softmax>> ||
                                 std::is_same_v<R, mk::router::BiasBalanced<Residual>>) &&
                                std::is_same_v<typename E::activation, mk::act::SwiGLU>;
template <class R, class E>
inline constexpr bool open =
    (std::is_same_v<E, mk::experts::Ffn<mk::act::SwiGLU>> &&
     (std::is_same_v<R, Sigmoid> || std::is_same_v<R, mk::router::BiasBalanced<Sigmoid>> ||
      std::is_same_v<R, mk::router::GroupLimited<Softmax>> || std::is_same_v<R, mk::router::GroupLimited<Sigmoid>> ||
      std::is_same_v<R, mk::router::BiasBalanced<mk::router::GroupLimited<Sigmoid>>> ||
      std::is_same_v<R, mk::router::LinearBias<Softmax>>)) ||
    (std::is_same_v<E, mk::experts::Ffn<mk::act::SwiGLUOai>> &&
     (std::is_same_v<R, Softmax> || std::is_same_v<R, mk::router::LinearBias<Softmax>>));
}  // namespace trainer_rows

struct ClassicRows {
  template <std::size_t Row, class R, class E>
  static constexpr bool keep = trainer_rows::classic<R, E>;
};
struct OpenRows {
  template <std::size_t Row, class R, class E>
  static constexpr bool keep = trainer_rows::open<R, E>;
};
template <class A, class B>
struct BothRows {  // the rows both filters keep
  template <std::size_t Row, class R, class E>
  static constexpr bool keep = A::template keep<Row, R, E> && B::template keep<Row, R, E>;
};

template <class Part = moekit::AllRows>
struct TrainerRows {
  template <std::size_t Row, class R, class E>
  static constexpr bool keep = (trainer_rows::classic<R, E> || trainer_rows::open<R, E>) && Part::template keep<Row, R, E>;
};

// Calls make(std::type_identity<MoeLayer<Backend, R, E, B, Parallel>>{}) for the flags' type (B: the
// balance scope) and returns what it returns (the same type for all): make_moe_block below for the
// host layers, cuda_blocks*.cu for the CUDA ones. A config outside TrainerRows is a ConfigError.
template <class Backend, class Parallel, class Part = moekit::AllRows, class Make>
auto with_moe_layer_type(const moekit::MoeConfig& mc, bool global_balance, Make&& make) {
  namespace mk = moekit;
  const auto [r, e] = mk::policy_row(mc);  // a ConfigError for a config no row builds
  (void)r, (void)e;
  if (!mk::keeps<TrainerRows<>>(mc))
    throw mk::ConfigError("router", mk::detail::asked_text(mc),
                          "is not one of the layers the example trainers build (examples/common/moe_block.hpp: TrainerRows)");
  return mk::with_policies<TrainerRows<Part>>(mc, [&]<class R, class E>(std::type_identity<R>, std::type_identity<E>) {
    if (global_balance) return make(std::type_identity<mk::MoeLayer<Backend, R, E, mk::balance::GlobalBatch, Parallel>>{});
    return make(std::type_identity<mk::MoeLayer<Backend, R, E, mk::balance::MicroBatch, Parallel>>{});
  });
}

// The host layers. Parallel = parallel::None (args: none) or a distributed policy (args: the communicator).
template <class T, class Parallel = moekit::parallel::None, class... Args>
std::unique_ptr<MoeBlock<T>> make_moe_block(const moekit::MoeConfig& mc, bool global_balance, Args&... args) {
  return with_moe_layer_type<moekit::backend::Host<T>, Parallel>(
      mc, global_balance, [&]<class Layer>(std::type_identity<Layer>) -> std::unique_ptr<MoeBlock<T>> {
        return std::make_unique<HostMoeBlock<T>>(moekit::erase<Layer>(mc, args...));
      });
}

// --dtype bf16: the single-rank backend::Host<bf16> layers.
inline std::unique_ptr<MoeBlock<float>> make_bf16_moe_block(const moekit::MoeConfig& mc, bool global_balance) {
  return with_moe_layer_type<moekit::backend::Host<moekit::bf16>, moekit::parallel::None>(
      mc, global_balance, [&]<class Layer>(std::type_identity<Layer>) -> std::unique_ptr<MoeBlock<float>> {
        return std::make_unique<HostMoeBlock<float, moekit::bf16>>(moekit::erase<Layer>(mc));
      });
}

// Makes one MoE layer from its config and the balance scope. Called once per block, in block order.
template <class T>
using MoeBlockFactory = std::function<std::unique_ptr<MoeBlock<T>>(const moekit::MoeConfig&, bool global_balance)>;
