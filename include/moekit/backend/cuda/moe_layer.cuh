#pragma once
// CUDA backend of MoeLayer (DESIGN §6): the same function as the host backend, for every router,
// expert set, balance scope and capacity mode, forward and exact backward. Include this header from a
// .cu file (nvcc); the kernels are instantiated in the including translation unit.
//
// Forward on the caller's stream:
//   router GEMM (+ gating residual GEMM) -> fused route_tokens (softmax/sigmoid, top-k, gates, P, lse,
//   routed counts, non-finite check) -> capacity + permutation (CUB radix sorts) -> gather x rows ->
//   [one host synchronisation: counts, aux-loss sums, non-finite flag] -> expert GEMM (W1|W3 in one)
//   -> fused activation -> expert GEMM (W2) -> combine by gather, with zero/copy/constant experts.
// Backward mirrors it; weight gradients are grouped GEMMs accumulating into fp32 gradients.
//
// Host synchronisations: exactly one per forward (cudaStreamSynchronize after copying ~(N_FFN + 4·N_E)
// numbers to pinned memory): the grouped GEMM needs each expert's row count on the host, and the aux
// losses (GlobalBatch's all-reduce hook runs on the host) need the counts and sums. None in backward.
// Size: about 870 lines, over the ~600 guide, because this is one backend's whole layer with every
// strategy composed in. The next step of the restructuring (docs/architecture.md: one pipeline over
// per-backend operation headers) moves the stage bodies out and splits it.
// Memory: parameters (T) and fp32 gradients are allocated at construction; the workspace at reserve()
// (or the caller's, through attach_workspace()); forward/backward allocate nothing.
// Calls of one layer must be ordered on one stream (or the caller synchronises between streams).
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <concepts>
#include <cmath>
#include <cstdint>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "moekit/backend/cuda/activation.cuh"
#include "moekit/backend/cuda/combine.cuh"
#include "moekit/backend/cuda/exchange_ops.cuh"
#include "moekit/backend/cuda/grouped_gemm.cuh"
#include "moekit/backend/cuda/memory.cuh"
#include "moekit/backend/cuda/permute.cuh"
#include "moekit/backend/cuda/policy.hpp"
#include "moekit/backend/cuda/router.cuh"
#include "moekit/layer/parameter_table.hpp"
#include "moekit/parallel/grid.hpp"
#include "moekit/balance/loss.hpp"
#include "moekit/core/tensor.hpp"
#include "moekit/layer/moe_layer_decl.hpp"
#include "moekit/parallel/exchange.hpp"
#include "moekit/parallel/policy.hpp"
#include "moekit/parallel/sharding.hpp"

namespace moekit {

// A parameter on the device: value in the layer's storage type (fp32 for gate_residual), gradient fp32.
struct DeviceParameter {
  std::string name;
  void* value = nullptr;
  float* grad = nullptr;
  std::vector<std::int64_t> shape;
  cudaDataType_t dtype = CUDA_R_32F;
  ParamShard shard = ParamShard::kReplicated;
  bool expert_slice() const { return shard != ParamShard::kReplicated; }
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
};

// Specialised for this TU's architecture tag only (backend/cuda/abi.hpp): the type, and every symbol of
// its members, then differ between TUs built for different architectures.
//
// One class for every parallel strategy P: parallel::None, or Data / Expert / Tensor / Hybrid over
// comm::Nccl (one GPU per rank; include parallel/cuda_moe_layer.cuh, which describes the algorithm). The
// strategy is composed, not inherited: a distributed layer holds a parallel::ExpertExchange
// (parallel/exchange.hpp, written once for both backends) between the token side and the expert side.
template <class V, class Router, class Experts, class Balance, parallel::StrategyPolicy P>
class MoeLayer<backend::Cuda<V, backend::cuda::Abi>, Router, Experts, Balance, P> {
  static_assert(detail::PolicyChecks<Router, Experts, Balance>::ok);
  static constexpr bool kDistributed = P::distributed;

  using Act = typename Experts::activation;
  using Score = typename Router::score;
  static constexpr bool kGated = Act::gated;
  static constexpr bool kResidual = Router::residual;
  static constexpr bool kBiased = Router::biased;

 public:
  using value_type = V;  // float or moekit::bf16
  using router_type = Router;
  using experts_type = Experts;
  using balance_type = Balance;
  using parallel_type = P;
  using storage_type = backend::cuda::storage_t<V>;
  using S = storage_type;

  using Exchange = parallel::ExpertExchange<backend::cuda::ExchangeOps<S>>;
  struct NoExchange {};

  // One GPU (parallel::None).
  explicit MoeLayer(const MoeConfig& cfg, backend::cuda::GemmStrategy gemm = backend::cuda::GemmStrategy::kAuto)
    requires(!kDistributed)
      : cfg_(cfg) {
    detail::validate_layer_config<Router, Experts>(cfg_);
    init(ParallelGrid{}, gemm);
  }
  // One GPU per rank of `world`. The config is checked on every rank before anything else moves (a bad
  // or disagreeing config throws ConfigError on every rank), then the sub-communicators are split.
  // Duplicate token dropping is fixed here (it decides the permutation's chunks).
  // (World is comm::Nccl: a template only so that this header needs NCCL's only when a distributed
  // layer is made; parallel/cuda_moe_layer.cuh includes it.)
  template <class World>
    requires(kDistributed && std::same_as<World, comm::Nccl>)
  MoeLayer(const MoeConfig& cfg, World& world, bool duplicate_token_dropping = true,
           backend::cuda::GemmStrategy gemm = backend::cuda::GemmStrategy::kAuto)
      : cfg_(detail::agreed_config<Router, Experts, P>(
            cfg, world.size(), world.rank(),
            [&](const std::int64_t* mine, std::size_t n, std::int64_t* all) { gather_on_device(world, mine, n, all); },
            {{"duplicate_token_dropping", duplicate_token_dropping}, {"balance (GlobalBatch)", Balance::global}})),
        ex_(world, ParallelGrid::of(cfg.tp, cfg.ep, cfg.dp, world.rank()),
            [](World& w, int color, int key) { return std::make_unique<World>(w.split(color, key)); }) {
    const ParallelGrid& g = ex_.grid();
    ex_.set_duplicate_token_dropping(duplicate_token_dropping);
    chunks_ = ex_.chunks();
    // Stats extras: per rank of the tp x ep group its chunk's counts [N_FFN] and its expert-side capacity
    // [1]; the routed counts and tokens [N_E + 1] (summed over the shards for GlobalBatch); the number of
    // ranks whose logits were not finite [1].
    extra_ints_ = std::size_t(g.tp * g.ep * (cfg_.num_ffn_experts + 1) + cfg_.num_experts() + 1 + 1);
    init(g, gemm);
    if constexpr (Balance::global) {  // the counts were all-reduced on the device before the sync
      const std::int32_t* global = extra_host() + g.tp * g.ep * (cfg_.num_ffn_experts + 1);  // pinned: never moves
      balance_.set_all_reduce([global](std::int64_t* data, std::size_t k) { std::copy_n(global, k, data); });
    }
  }

  const MoeConfig& config() const { return cfg_; }
  Balance& balance() { return balance_; }
  void set_training(bool on) { training_ = on; }
  bool training() const { return training_; }
  backend::cuda::GemmStrategy gemm_strategy() const { return gemm_->strategy(); }
  int gemm_fallbacks() const { return gemm_->grouped_fallbacks(); }

  // ---- parameters -------------------------------------------------------------------------------
  // One flat values buffer (storage type; the gating residual fp32) and one flat fp32 gradient buffer,
  // both laid out and named by the parameter table (layer/parameter_table.hpp), as the host layer's.
  const ParameterTable& parameter_table() const { return table_; }
  void* flat_values() const { return values_.data(); }
  std::size_t flat_value_bytes() const { return values_.size(); }
  float* flat_grads() const { return grads_.data(); }
  std::size_t flat_grad_count() const { return grads_.size(); }

  // The values a host layer holds for the same seed (generated on the host, then converted; a
  // distributed layer: its shard of them).
  void init_params(std::uint64_t seed) {
    MoeWeights<float> w;
    w.resize(cfg_, kGated, kResidual);
    init_moe_weights(w, cfg_, seed);
    load_weights(w);
  }
  // Full-size host fp32 weights to the device (this layer's part, rounded to T).
  void load_weights(const MoeWeights<float>& full) {
    std::vector<float> flat(std::size_t(table_.size()));
    table_.pack(full, flat.data());
    std::vector<char> bytes(values_.size());
    for (std::int64_t i = 0; i < table_.size(); ++i) {
      char* at = bytes.data() + table_.value_byte_offset(i, sizeof(S));
      if (i < table_.offsets().gate_residual) *reinterpret_cast<S*>(at) = backend::cuda::storage_from_float<S>(flat[std::size_t(i)]);
      else *reinterpret_cast<float*>(at) = flat[std::size_t(i)];
    }
    if (!bytes.empty()) MOEKIT_CUDA_CHECK(cudaMemcpy(values_.data(), bytes.data(), bytes.size(), cudaMemcpyHostToDevice));
  }
  // This layer's weights (full-size; what other ranks hold reads 0) and fp32 gradients; both synchronise.
  MoeWeights<float> weights() const {
    MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<char> bytes(values_.size());
    if (!bytes.empty()) MOEKIT_CUDA_CHECK(cudaMemcpy(bytes.data(), values_.data(), bytes.size(), cudaMemcpyDeviceToHost));
    std::vector<float> flat(std::size_t(table_.size()));
    for (std::int64_t i = 0; i < table_.size(); ++i) {
      const char* at = bytes.data() + table_.value_byte_offset(i, sizeof(S));
      flat[std::size_t(i)] = i < table_.offsets().gate_residual ? backend::cuda::storage_to_float(*reinterpret_cast<const S*>(at))
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
  void zero_grad(cudaStream_t stream = nullptr) {
    if (grads_.size()) MOEKIT_CUDA_CHECK(cudaMemsetAsync(grads_.data(), 0, grads_.size() * sizeof(float), stream));
  }
  // Device parameters named and ordered as the host layer's, from the table: for an optimizer or a
  // checkpoint.
  std::vector<DeviceParameter> parameters(const std::string& prefix = "") const {
    std::vector<DeviceParameter> ps;
    for (const ParamSpec& s : table_.specs()) {
      const bool f32 = s.family == ParamSpec::Family::kGateResidual;
      ps.push_back({prefix + s.name, values_.data() + table_.value_byte_offset(s.offset, sizeof(S)), grads_.data() + s.offset,
                    s.local_shape, f32 ? CUDA_R_32F : backend::cuda::data_type<S>(), s.shard});
    }
    return ps;
  }

  // ---- workspace --------------------------------------------------------------------------------
  // Bytes of device workspace a forward/backward of up to `tokens` tokens needs.
  std::size_t workspace_bytes(std::int64_t tokens) const {
    check_token_limits(tokens);
    Buffers b;
    return carve(b, nullptr, tokens);
  }
  // Allocates (or grows) the layer's own workspace for up to `tokens` tokens. A distributed layer also
  // sizes the expert side for ep·T·k rows (every row of every source could come to this rank's experts);
  // every rank must reserve the same number of tokens.
  void reserve(std::int64_t tokens) {
    if (!(reserved_ >= 0 && tokens <= reserved_ && !external_)) {
      owned_.resize(0);
      owned_.resize(workspace_bytes(tokens));
      bind(owned_.data(), tokens);
      external_ = false;
    }
    if constexpr (kDistributed) reserve_expert_side(reserved_tokens());
  }
  // Uses caller-owned device memory (at least workspace_bytes(tokens)) instead (one GPU only: the
  // expert side of a distributed layer comes with reserve()).
  void attach_workspace(void* p, std::size_t bytes, std::int64_t tokens)
    requires(!kDistributed)
  {
    const std::size_t need = workspace_bytes(tokens);
    if (reinterpret_cast<std::uintptr_t>(p) % 256 != 0)
      throw ShapeError("attach_workspace: the pointer must be 256-byte aligned (as cudaMalloc's are)");
    if (!p || bytes < need)
      throw ShapeError("attach_workspace: " + std::to_string(bytes) + " bytes given, " + std::to_string(need) +
                       " needed for " + std::to_string(tokens) + " tokens");
    owned_.resize(0);
    bind(static_cast<char*>(p), tokens);
    external_ = true;
  }
  std::int64_t reserved_tokens() const { return reserved_ < 0 ? 0 : reserved_; }

  // ---- forward / backward -----------------------------------------------------------------------
  // y = MoE(x). x, y: device [T, D] in the storage type; prev_logits: device [T, N_E] fp32 (gating
  // residual only). T must be <= reserved_tokens(). Returns the aux losses (unscaled).
  AuxLosses forward(MatrixView<const S> x, MatrixView<S> y, MatrixView<const float> prev_logits = {},
                    cudaStream_t stream = nullptr) {
    route_and_permute(x, y, prev_logits, stream);
    if constexpr (kDistributed) {
      exchange_stats(stream);  // the counts every rank needs, gathered before the one synchronisation
      make_plan();
      ex_.to_experts(b_.xp, xe_.data(), stream);  // xe_ is kept for backward: the all-to-all outputs
      gemm_flops_ = experts_forward(expert_view(), xe_.data(), h13e_.data(), ae_.data(), ye_.data(), exp_off_, stream);
      ex_.from_experts(ye_.data(), b_.yp, stream);
      has_activations_ = !recompute_;
    } else {
      sync_stats(stream);
      gemm_flops_ = experts_forward(expert_view(), b_.xp, b_.h13, b_.a, b_.yp, offsets_, stream);
    }
    return combine_and_aux(y.data, stream);
  }

  // Backward of L = sum(y * dy) + aux_scale * (lbl_coef * LBL + zloss_coef * zloss) + sum(logits * dlogits_next),
  // as the host backend: writes dx (and dprev_logits when given), adds into the fp32 gradients.
  void backward(MatrixView<const S> dy, MatrixView<S> dx, double aux_scale = 1.0, MatrixView<const float> dlogits_next = {},
                MatrixView<float> dprev_logits = {}, cudaStream_t stream = nullptr) {
    combine_backward(dy, dx, dlogits_next, dprev_logits, stream);
    if constexpr (kDistributed) {
      ex_.to_experts(b_.dyp, dye_.data(), stream);
      if (!has_activations_) {  // recompute from the saved all-to-all outputs (xe_): no communication
        experts_forward(expert_view(), xe_.data(), h13e_.data(), ae_.data(), ye_.data(), exp_off_, stream);
        ++recomputations_;
      }
      experts_backward(expert_view(), xe_.data(), h13e_.data(), ae_.data(), dye_.data(), exp_off_, stream);
      has_activations_ = false;
      ex_.from_experts(dye_.data(), b_.dyp, stream);
    } else {
      experts_backward(expert_view(), b_.xp, b_.h13, b_.a, b_.dyp, offsets_, stream);
    }
    finish_backward(dy.data, dx.data, aux_scale, dlogits_next.data, dprev_logits.data, stream);
  }

  // ---- router state and the per-step hook (as the host layer's) -------------------------------------
  // Once after each optimizer step: resets a GlobalBatch buffer, and (router::BiasBalanced) applies
  // b_i += u · sign(mean c − c_i) with the step's routed counts summed over its training forwards and
  // over the ranks that hold different tokens (collective in a distributed layer). Synchronises.
  void end_step(cudaStream_t stream = nullptr) {
    if constexpr (Balance::global) balance_.reset();
    if constexpr (kBiased) {
      std::vector<std::int64_t> c = bias_.step_counts();
      if constexpr (kDistributed) {
        backend::cuda::DeviceArray<std::int64_t> d(c.size());
        MOEKIT_CUDA_CHECK(cudaMemcpyAsync(d.data(), c.data(), c.size() * sizeof(std::int64_t), cudaMemcpyHostToDevice, stream));
        ex_.group(RankGroup::kShards).all_reduce_sum(d.data(), c.size(), stream);
        ex_.group(RankGroup::kShards).wait(stream);
        MOEKIT_CUDA_CHECK(cudaMemcpyAsync(c.data(), d.data(), c.size() * sizeof(std::int64_t), cudaMemcpyDeviceToHost, stream));
      }
      MOEKIT_CUDA_CHECK(cudaStreamSynchronize(stream));
      bias_.apply(c, cfg_.bias_update_rate);
      upload_bias();
    }
  }
  // router::BiasBalanced: the selection biases (a host copy of the device's), and the update this rank's
  // counts since the last end_step() would apply (without the other ranks' counts).
  const std::vector<float>& expert_bias() const
    requires(kBiased)
  {
    return bias_.bias();
  }
  void set_expert_bias(std::span<const float> b)
    requires(kBiased)
  {
    bias_.set(b);
    upload_bias();
  }
  std::vector<float> expert_bias_update() const
    requires(kBiased)
  {
    return bias_.preview(cfg_.bias_update_rate);
  }
  const std::vector<std::int64_t>& step_counts() const { return bias_.step_counts(); }

  // ---- distributed strategies only ----------------------------------------------------------------
  const ParallelGrid& grid() const
    requires(kDistributed)
  {
    return ex_.grid();
  }
  std::int64_t first_expert() const { return table_.first_expert(); }
  std::int64_t local_experts() const { return table_.local_experts(); }
  void set_activation_checkpointing(bool on)
    requires(kDistributed)
  {
    recompute_ = on;
  }
  std::int64_t recomputations() const { return recomputations_; }
  // Once per optimizer step: expert gradients summed over dp, dense ones over the world, both divided to
  // the mean over the ep·dp shards (parallel/exchange.hpp), on the stream.
  void sync_gradients(cudaStream_t stream = nullptr)
    requires(kDistributed)
  {
    ex_.sync_gradients(table_, grads_.data(), stream);
  }
  comm::ByteCounters comm_counters() const
    requires(kDistributed)
  {
    return ex_.counters();
  }
  const comm::ByteCounters& ep_counters() const
    requires(kDistributed)
  {
    return ex_.ep_counters();
  }

  // ---- results of the last forward ----------------------------------------------------------------
  std::int64_t num_tokens() const { return tokens_; }
  AuxLosses aux() const { return aux_; }
  // Routed (pre-capacity) slots per expert, and slots each expert kept (host copies from the forward).
  const std::vector<std::int64_t>& routed_counts() const { return routed_; }
  const std::vector<std::int32_t>& expert_counts() const { return kept_; }
  std::int64_t expert_gemm_flops() const { return gemm_flops_; }
  std::int64_t ffn_rows() const { return offsets_.empty() ? 0 : offsets_.back(); }
  // Device views (valid until the next forward).
  const float* logits_device() const { return b_.logits; }
  const float* probs_device() const { return b_.prob; }
  const int* topk_indices_device() const { return b_.idx; }
  const float* topk_gates_device() const { return b_.gate; }
  const int* slot_rows_device() const { return b_.row_of_slot; }  // row, or kDroppedSlot / kZeroComputationSlot

 private:
  using I64 = std::int64_t;

  void upload_bias() {
    const auto& b = bias_.bias();
    MOEKIT_CUDA_CHECK(cudaMemcpy(bias_dev_.data(), b.data(), b.size() * sizeof(float), cudaMemcpyHostToDevice));
  }

  // ---- the distributed stages ---------------------------------------------------------------------
  template <class World>
  static void gather_on_device(World& world, const std::int64_t* mine, std::size_t n, std::int64_t* all) {
    backend::cuda::DeviceArray<std::int64_t> a(n), b(n * std::size_t(world.size()));
    MOEKIT_CUDA_CHECK(cudaMemcpy(a.data(), mine, n * sizeof(std::int64_t), cudaMemcpyHostToDevice));
    world.all_gather(a.data(), n, b.data());
    world.wait();
    MOEKIT_CUDA_CHECK(cudaMemcpy(all, b.data(), b.size() * sizeof(std::int64_t), cudaMemcpyDeviceToHost));
  }

  // The expert side for up to ep·T·k rows, and the exchange's buffers.
  void reserve_expert_side(I64 tokens) {
    const ParallelGrid& g = ex_.grid();
    const I64 rows = I64(g.ep) * tokens * cfg_.top_k, d = cfg_.d_model;
    if (rows > I64(INT32_MAX)) throw ShapeError("ep * tokens * top_k = " + std::to_string(rows) + " exceeds 2^31 - 1");
    if (rows <= capacity_rows_ && xe_.size()) return;
    for (auto* a : {&xe_, &ye_, &dye_}) a->resize(std::size_t(rows * d));
    h13e_.resize(std::size_t(rows * table_.w13_rows())), ae_.resize(std::size_t(rows * table_.local_d_expert()));
    ex_.reserve(rows, tokens * cfg_.top_k, d);
    counts_dev_.resize(std::size_t(cfg_.num_ffn_experts + 1));
    capacity_rows_ = rows;
  }

  // Before the forward's one host synchronisation, on the stream: this rank's chunk counts and its
  // expert-side capacity all-gathered over the tp x ep ranks of its dp index, (GlobalBatch) the routed
  // counts summed over the shards, and a non-finite-logits flag summed over the world, all into the
  // stats block the forward copies to the host anyway. So a rank with bad input or too small a
  // workspace makes every rank it talks to throw together.
  void exchange_stats(cudaStream_t stream) {
    namespace mc = backend::cuda;
    const ParallelGrid& g = ex_.grid();
    const int nf = int(cfg_.num_ffn_experts), n = int(cfg_.num_experts());
    if (counts_dev_.size() == 0) throw ShapeError("a distributed layer needs reserve() before forward");
    mc::chunk_counts_kernel<int><<<unsigned((nf + 127) / 128), 128, 0, stream>>>(offsets_dev(), ex_.my_chunk(), nf, counts_dev_.data());
    MOEKIT_CUDA_CHECK(cudaGetLastError());
    mc::set_value_kernel<int><<<1, 1, 0, stream>>>(counts_dev_.data() + nf, int(capacity_rows_));
    MOEKIT_CUDA_CHECK(cudaGetLastError());
    ex_.group(RankGroup::kTpEp).all_gather(counts_dev_.data(), std::size_t(nf + 1), extra_dev(), stream);
    int* global = extra_dev() + g.tp * g.ep * (nf + 1);
    MOEKIT_CUDA_CHECK(cudaMemcpyAsync(global, routed_dev(), sizeof(int) * std::size_t(n), cudaMemcpyDeviceToDevice, stream));
    mc::set_value_kernel<int><<<1, 1, 0, stream>>>(global + n, int(tokens_));
    MOEKIT_CUDA_CHECK(cudaGetLastError());
    if constexpr (Balance::global) ex_.group(RankGroup::kShards).all_reduce_sum(global, std::size_t(n + 1), stream);
    mc::bad_flag_kernel<int><<<1, 1, 0, stream>>>(bad_dev(), global + n + 1);
    MOEKIT_CUDA_CHECK(cudaGetLastError());
    ex_.group(RankGroup::kWorld).all_reduce_sum(global + n + 1, 1, stream);
    ex_.group(RankGroup::kWorld).wait(stream);  // NCCL errors and timeouts surface here, not as a hang in the sync
    sync_stats(stream, /*check_finite=*/false);
    if (extra_host()[g.tp * g.ep * (nf + 1) + n + 1] > 0) {
      throw_if_not_finite();
      throw NumericError("router logits are not finite on another rank (see its error); every rank stops");
    }
  }

  // The dispatch plan from the synchronised stats: offsets (chunk-major) and the all-gathered counts.
  void make_plan() {
    const ParallelGrid& g = ex_.grid();
    const bool dtd = ex_.duplicate_token_dropping();
    const I64 nf = cfg_.num_ffn_experts, nc = chunks_, group = g.tp * g.ep, el = table_.local_experts();
    DispatchPlan& plan = ex_.plan();
    plan.reset(g, dtd, nf, cfg_.d_model);
    std::vector<I64> cnt(std::size_t(nc * nf));
    for (I64 i = 0; i < nc * nf; ++i) cnt[i] = offsets_[i + 1] - offsets_[i];
    plan.set_token_counts(cnt);
    const std::int32_t* gathered = extra_host();  // per rank: counts [N_FFN], capacity [1]
    std::vector<I64> all(std::size_t(group * nf));
    for (I64 r = 0; r < group; ++r) std::copy_n(gathered + r * (nf + 1), nf, all.begin() + r * nf);
    // Every rank of the tp x ep group checks every rank's expert-side rows against its capacity, so they
    // all throw together (never one rank alone, which would leave the others in a collective).
    for (I64 r = 0; r < group; ++r) {
      const I64 t = r % g.tp, e = r / g.tp;
      I64 rows = 0;
      for (I64 src = 0; src < group; ++src)
        if (dtd || src % g.tp == t)
          for (I64 le = 0; le < el; ++le) rows += all[std::size_t(src * nf + e * el + le)];
      if (rows > gathered[r * (nf + 1) + nf])
        throw ShapeError("rank " + std::to_string(r) + " of the tp x ep group would receive " + std::to_string(rows) +
                         " expert rows but reserved " + std::to_string(gathered[r * (nf + 1) + nf]) +
                         " (every rank must reserve() the largest token count any rank uses)");
    }
    plan.set_all_counts(all);
    exp_off_.assign(plan.expert_offsets().begin(), plan.expert_offsets().end());
  }

  void init(const ParallelGrid& grid, backend::cuda::GemmStrategy gemm) {
    const auto n = cfg_.num_experts();
    const std::pair<const char*, std::int64_t> dims[] = {{"d_model", cfg_.d_model}, {"d_expert", cfg_.d_expert}, {"num_experts()", n}};
    for (const auto& [field, v] : dims)
      if (v > (std::int64_t(1) << 30)) throw ConfigError(field, std::to_string(v), "must be <= 2^30 on the CUDA backend");
    table_ = ParameterTable(cfg_, kGated, kResidual, grid);
    values_.resize(table_.value_bytes(sizeof(S)));
    grads_.resize(std::size_t(table_.size()));
    if (values_.size()) MOEKIT_CUDA_CHECK(cudaMemset(values_.data(), 0, values_.size()));
    eta_ = balance_eta<float>(cfg_);
    bias_.resize(std::size_t(n), kBiased);
    if constexpr (kBiased) {
      bias_dev_.resize(std::size_t(n));
      MOEKIT_CUDA_CHECK(cudaMemset(bias_dev_.data(), 0, std::size_t(n) * sizeof(float)));
    }
    gemm_ = std::make_unique<backend::cuda::ExpertGemm>(gemm, int(table_.local_experts()));
    host_stats_.resize(stats_ints() + stats_floats());
    host_dprob_.resize(n);
    zero_grad();
    MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
  }

  // Checks; router; capacity; permutation (chunk-major when chunks_ > 1); gather of every FFN row; aux
  // sums; constant experts' mix. Everything before the forward's host synchronisation.
  void route_and_permute(MatrixView<const S> x, MatrixView<S> y, MatrixView<const float> prev_logits, cudaStream_t stream) {
    using namespace backend::cuda;
    const std::int64_t tokens = x.shape[0], d = cfg_.d_model, n = cfg_.num_experts(), k = cfg_.top_k,
                       nf = cfg_.num_ffn_experts, nc = cfg_.num_constant_experts;
    check_forward_args(cfg_, kResidual, x, y, prev_logits, std::int64_t(1) << 30);  // layer/routing_plan.hpp
    if (tokens > reserved_)
      throw ShapeError("x has " + std::to_string(tokens) + " tokens but the workspace holds " + std::to_string(reserved_tokens()) +
                       " (call reserve(" + std::to_string(tokens) + ") first: forward never allocates)");
    const bool has_prev = prev_logits.data != nullptr;
    has_forward_ = false;
    has_prev_ = has_prev;
    tokens_ = tokens;
    const int T = int(tokens), N = int(n), K = int(k), D = int(d), NF = int(nf), NC = int(nc);
    const cudaDataType_t st = data_type<S>();
    cublasHandle_t h = gemm_->handle(stream);
    MOEKIT_CUDA_CHECK(cudaMemcpyAsync(b_.x, x.data, std::size_t(tokens * d) * sizeof(S), cudaMemcpyDeviceToDevice, stream));
    // Router logits in fp32: x W_r^T (+ prev W_g^T).
    MOEKIT_CUBLAS_CHECK(gemm_row_major(h, {false, true, st, CUDA_R_32F, 1.f, 0.f},
                                       {T, N, D, b_.x, D, router_w(), D, b_.logits, N}));
    if constexpr (kResidual)
      if (has_prev) {
        MOEKIT_CUDA_CHECK(cudaMemcpyAsync(b_.prev, prev_logits.data, std::size_t(tokens * n) * sizeof(float),
                                          cudaMemcpyDeviceToDevice, stream));
        MOEKIT_CUBLAS_CHECK(gemm_row_major(h, {false, true, CUDA_R_32F, CUDA_R_32F, 1.f, 1.f},
                                           {T, N, N, b_.prev, N, gate_res_w(), N, b_.logits, N}));
      }
    RouteParams rp;
    rp.logits = b_.logits, rp.tokens = T, rp.experts = N, rp.top_k = K, rp.renormalize = cfg_.renormalize;
    rp.prob = b_.prob, rp.idx = b_.idx, rp.gate = b_.gate, rp.lse = b_.lse, rp.counts = routed_dev(), rp.bad_token = bad_dev();
    if constexpr (kBiased) rp.bias = bias_dev_.data();
    MOEKIT_CUDA_CHECK(route_tokens<Score>(rp, stream));
    // Capacity, permutation and the gather into expert-contiguous rows.
    const auto caps = balance::expert_capacities(cfg_.capacity_factor, cfg_.tau, k, tokens, nf, cfg_.num_zc_experts());
    PermuteParams pp;
    pp.idx = b_.idx, pp.tokens = T, pp.top_k = K, pp.experts = N, pp.ffn_experts = NF, pp.chunks = int(chunks_);
    pp.cap_ffn = int(std::min<std::int64_t>(caps.ffn, INT32_MAX)), pp.cap_zc = int(std::min<std::int64_t>(caps.zc, INT32_MAX));
    if (caps.ffn >= 0) {
      MOEKIT_CUDA_CHECK(slot_scores<Score>(b_.logits, b_.prob, b_.idx, T, N, K, b_.score, stream));
      pp.score = b_.score;
    }
    pp.slot_of_row = b_.slot_of_row, pp.row_of_slot = b_.row_of_slot, pp.offsets = offsets_dev(), pp.kept_counts = kept_dev();
    std::size_t perm_bytes = perm_bytes_;
    MOEKIT_CUDA_CHECK(permute_slots(b_.perm, perm_bytes, pp, stream));
    MOEKIT_CUDA_CHECK(gather_rows(b_.x, b_.slot_of_row, b_.xp, T * K, K, D, stream, rows_dev()));
    // Sums of the aux losses: P_i = Σ_t prob[t, i] (prob^T · 1) and Σ_t lse_t².
    if (T > 0) {
      const float one = 1.f, zero = 0.f;
      MOEKIT_CUBLAS_CHECK(cublasSgemv(h, CUBLAS_OP_N, N, T, &one, b_.prob, N, b_.ones, 1, &zero, prob_sum_dev(), 1));
    } else {
      MOEKIT_CUDA_CHECK(cudaMemsetAsync(prob_sum_dev(), 0, sizeof(float) * std::size_t(N), stream));
    }
    MOEKIT_CUDA_CHECK(sum_squares(b_.lse, T, zsum_dev(), stream));
    if (NC > 0) {  // [a1, a2] of constant experts from one GEMM over all of them
      MOEKIT_CUBLAS_CHECK(gemm_row_major(h, {false, true, st, CUDA_R_32F, 1.f, 0.f},
                                         {T, 2 * NC, D, b_.x, D, wc_w(), D, b_.zc_logits, 2 * NC}));
      MOEKIT_CUDA_CHECK(zc_mix(combine_params(), b_.zc_logits, b_.mix, stream));
    }
  }

  // The one host synchronisation of the forward: counts, aux sums, the non-finite flag (and whatever
  // the distributed layer put in the stats block's extra ints).
  // check_finite = false: the caller decides (a distributed layer makes every rank throw together).
  void sync_stats(cudaStream_t stream, bool check_finite = true) {
    MOEKIT_CUDA_CHECK(cudaMemcpyAsync(host_stats_.data(), b_.stats, stats_bytes(), cudaMemcpyDeviceToHost, stream));
    MOEKIT_CUDA_CHECK(cudaStreamSynchronize(stream));
    read_stats();
    if (check_finite) throw_if_not_finite();
  }
  void throw_if_not_finite() const {
    if (bad_token_ != backend::cuda::kNoBadToken)
      throw NumericError("router logits of token " + std::to_string(bad_token_) +
                         " are not finite (check x, gate.weight and prev_logits)");
  }

  // Experts' weights and gradients (all of them here; a shard in the distributed layer).
  struct ExpertView {
    const S *w13, *w2;
    float *g13, *g2;
    std::int64_t f, wf;  // hidden units (per tp rank) and rows of a [W1|W3] block
  };
  ExpertView expert_view() { return {w13_w(), w2_w(), grad_at(table_.offsets().w13), grad_at(table_.offsets().w2), table_.local_d_expert(), table_.w13_rows()}; }

  // [W1|W3] x, activation, W2 a over expert-contiguous rows (offsets per expert, host). Returns FLOPs.
  std::int64_t experts_forward(const ExpertView& v, const S* xp, S* h13, S* a, S* yp, const std::vector<std::int32_t>& offsets,
                               cudaStream_t stream) {
    using namespace backend::cuda;
    const int D = int(cfg_.d_model), F = int(v.f), WF = int(v.wf);
    const std::int64_t d = cfg_.d_model, rows = offsets.empty() ? 0 : offsets.back();
    const GemmSpec fwd{false, true, data_type<S>(), data_type<S>(), 1.f, 0.f};
    gemm_->run(fwd, expert_problems(offsets, [&](int e, int off, int m) {
                 return GemmProblem{m, WF, D, xp + std::size_t(off) * D, D, v.w13 + std::size_t(e) * v.wf * d, D,
                                    h13 + std::size_t(off) * WF, WF};
               }), stream);
    MOEKIT_CUDA_CHECK(activation_forward<Act>(h13, kGated ? h13 + F : nullptr, a, int(rows), F, stream, WF));
    gemm_->run(fwd, expert_problems(offsets, [&](int e, int off, int m) {
                 return GemmProblem{m, D, F, a + std::size_t(off) * F, F, v.w2 + std::size_t(e) * d * v.f, F,
                                    yp + std::size_t(off) * D, D};
               }), stream);
    return rows * 2 * (v.wf * d + d * v.f);
  }

  // dW2 += dY^T A; dA = dY W2 (into a); activation backward in place (h13); dW13 += dH^T X; dX = dH W13 (into dyp).
  void experts_backward(const ExpertView& v, const S* xp, S* h13, S* a, S* dyp, const std::vector<std::int32_t>& offsets,
                        cudaStream_t stream) {
    using namespace backend::cuda;
    const cudaDataType_t st = data_type<S>();
    const int D = int(cfg_.d_model), F = int(v.f), WF = int(v.wf);
    const std::int64_t d = cfg_.d_model, rows = offsets.empty() ? 0 : offsets.back();
    const GemmSpec wgrad{true, false, st, CUDA_R_32F, 1.f, 1.f}, dgrad{false, false, st, st, 1.f, 0.f};
    gemm_->run(wgrad, expert_problems(offsets, [&](int e, int off, int m) {
                 return GemmProblem{D, F, m, dyp + std::size_t(off) * D, D, a + std::size_t(off) * F, F, v.g2 + std::size_t(e) * d * v.f, F};
               }), stream);
    gemm_->run(dgrad, expert_problems(offsets, [&](int e, int off, int m) {
                 return GemmProblem{m, F, D, dyp + std::size_t(off) * D, D, v.w2 + std::size_t(e) * d * v.f, F, a + std::size_t(off) * F, F};
               }), stream);
    MOEKIT_CUDA_CHECK(activation_backward<Act>(h13, kGated ? h13 + F : nullptr, a, h13, kGated ? h13 + F : nullptr, int(rows), F,
                                               stream, WF));
    gemm_->run(wgrad, expert_problems(offsets, [&](int e, int off, int m) {
                 return GemmProblem{WF, D, m, h13 + std::size_t(off) * WF, WF, xp + std::size_t(off) * D, D,
                                    v.g13 + std::size_t(e) * v.wf * d, D};
               }), stream);
    gemm_->run(dgrad, expert_problems(offsets, [&](int e, int off, int m) {
                 return GemmProblem{m, D, WF, h13 + std::size_t(off) * WF, WF, v.w13 + std::size_t(e) * v.wf * d, D,
                                    dyp + std::size_t(off) * D, D};
               }), stream);
  }

  AuxLosses combine_and_aux(S* y, cudaStream_t stream) {
    MOEKIT_CUDA_CHECK(backend::cuda::combine(combine_params(), y, stream));
    aux_ = compute_aux();
    has_forward_ = true;
    return aux_;
  }

  // Checks; dgate of every slot; d rows = gate·dy of every FFN row (into dyp).
  void combine_backward(MatrixView<const S> dy, MatrixView<S> dx, MatrixView<const float> dlogits_next,
                             MatrixView<float> dprev_logits, cudaStream_t stream) {
    using namespace backend::cuda;
    check_backward_args(cfg_, has_forward_, has_prev_, tokens_, dy, dx, dlogits_next, dprev_logits);
    const int T = int(tokens_), NC = int(cfg_.num_constant_experts);
    SlotGrads<S> sg;
    sg.dgate = b_.dgate;
    if (NC > 0) {
      sg.dz = b_.dz, sg.coef_z = b_.coef_z, sg.coef_v = b_.coef_v;
      MOEKIT_CUDA_CHECK(cudaMemsetAsync(b_.coef_z, 0, sizeof(S) * std::size_t(T) * 2 * NC, stream));
      MOEKIT_CUDA_CHECK(cudaMemsetAsync(b_.coef_v, 0, sizeof(S) * std::size_t(T) * NC, stream));
    }
    MOEKIT_CUDA_CHECK(backend::cuda::combine_backward(combine_params(), dy.data, b_.dyp, sg, stream));
  }

  // After dyp holds d(x rows): dx by gather + copy/constant experts (fp32), their weight gradients, the
  // router backward, the conversion to the storage type.
  void finish_backward(const S* dy, S* dx, double aux_scale, const float* dlogits_next, float* dprev, cudaStream_t stream) {
    using namespace backend::cuda;
    const int T = int(tokens_), D = int(cfg_.d_model), NC = int(cfg_.num_constant_experts);
    const cudaDataType_t st = data_type<S>();
    cublasHandle_t h = gemm_->handle(stream);
    float* dx32 = b_.dx32 ? b_.dx32 : reinterpret_cast<float*>(dx);
    MOEKIT_CUDA_CHECK(token_backward(combine_params(), b_.dyp, dy, b_.dz, dx32, stream));
    if (NC > 0) {
      MOEKIT_CUBLAS_CHECK(gemm_row_major(h, {true, false, st, CUDA_R_32F, 1.f, 1.f}, {NC, D, T, b_.coef_v, NC, dy, D, grad_at(table_.offsets().const_v), D}));
      MOEKIT_CUBLAS_CHECK(gemm_row_major(h, {true, false, st, CUDA_R_32F, 1.f, 1.f},
                                         {2 * NC, D, T, b_.coef_z, 2 * NC, b_.x, D, grad_at(table_.offsets().const_wc), D}));
    }
    router_backward(h, float(aux_scale), dlogits_next, dprev, dx32, stream);
    if (b_.dx32) MOEKIT_CUDA_CHECK(convert(b_.dx32, dx, std::size_t(tokens_ * cfg_.d_model), stream));
  }

  struct Buffers {
    S *x = nullptr, *xp = nullptr, *h13 = nullptr, *a = nullptr, *yp = nullptr, *dyp = nullptr, *dlogits_s = nullptr,
      *coef_z = nullptr, *coef_v = nullptr;
    float *prev = nullptr, *logits = nullptr, *prob = nullptr, *dlogits = nullptr, *scratch = nullptr, *gate = nullptr,
          *dgate = nullptr, *lse = nullptr, *score = nullptr, *mix = nullptr, *dz = nullptr, *zc_logits = nullptr,
          *dx32 = nullptr, *ones = nullptr, *dprob = nullptr;
    int *idx = nullptr, *slot_of_row = nullptr, *row_of_slot = nullptr;
    void* perm = nullptr;
    char* stats = nullptr;
  };

  // Stats block (device, copied to pinned host memory once per forward): the ints below, then floats
  // prob_sum [N_E] | Σ lse² [1].
  // offsets [chunks·N_FFN + 1] | kept [N_E] | routed [N_E] | bad token [1] | extra [extra_ints_] (distributed layer)
  std::size_t stats_ints() const {
    return std::size_t(chunks_ * cfg_.num_ffn_experts + 1 + 2 * cfg_.num_experts() + 1) + extra_ints_;
  }
  std::size_t stats_floats() const { return std::size_t(cfg_.num_experts() + 1); }
  std::size_t stats_bytes() const { return 4 * (stats_ints() + stats_floats()); }
  int* offsets_dev() const { return reinterpret_cast<int*>(b_.stats); }
  int* kept_dev() const { return offsets_dev() + chunks_ * cfg_.num_ffn_experts + 1; }
  int* rows_dev() const { return offsets_dev() + chunks_ * cfg_.num_ffn_experts; }  // FFN rows in all
  int* routed_dev() const { return kept_dev() + cfg_.num_experts(); }
  int* bad_dev() const { return routed_dev() + cfg_.num_experts(); }
  int* extra_dev() const { return bad_dev() + 1; }
  const std::int32_t* extra_host() const { return host_stats_.data() + (stats_ints() - extra_ints_); }
  float* prob_sum_dev() const { return reinterpret_cast<float*>(b_.stats + 4 * stats_ints()); }
  float* zsum_dev() const { return prob_sum_dev() + cfg_.num_experts(); }

  // Lays the buffers for `tokens` tokens out from `base` (or only counts with base == nullptr).
  std::size_t carve(Buffers& b, char* base, std::int64_t tokens) const {
    const std::size_t t = std::size_t(tokens), n = std::size_t(cfg_.num_experts()), k = std::size_t(cfg_.top_k),
                      d = std::size_t(cfg_.d_model), f = std::size_t(table_.local_d_expert()), nc = std::size_t(cfg_.num_constant_experts),
                      rows = t * k, wf = std::size_t(table_.w13_rows());
    constexpr bool kBf16 = !std::is_same_v<S, float>;
    std::size_t at = 0;
    auto take = [&](auto*& p, std::size_t count) {
      using E = std::remove_reference_t<decltype(*p)>;
      p = base ? reinterpret_cast<E*>(base + at) : nullptr;  // valid (unread) even when count is 0
      at += (count * sizeof(E) + 255) / 256 * 256;
    };
    take(b.x, t * d);
    if constexpr (kResidual) take(b.prev, t * n);
    for (float** p : {&b.logits, &b.prob, &b.dlogits, &b.scratch}) take(*p, t * n);
    if constexpr (kBf16) take(b.dlogits_s, t * n);
    for (float** p : {&b.gate, &b.dgate, &b.score}) take(*p, rows);
    for (float** p : {&b.mix, &b.dz}) take(*p, 2 * rows);
    take(b.lse, t);
    for (int** p : {&b.idx, &b.slot_of_row, &b.row_of_slot}) take(*p, rows);
    take(b.xp, rows * d), take(b.h13, rows * wf), take(b.a, rows * f), take(b.yp, rows * d), take(b.dyp, rows * d);
    if (nc) take(b.zc_logits, t * 2 * nc), take(b.coef_z, t * 2 * nc), take(b.coef_v, t * nc);
    if constexpr (kBf16) take(b.dx32, t * d);
    take(b.ones, t);
    take(b.dprob, n);
    take(b.stats, stats_bytes());
    char* perm = nullptr;
    take(perm, permute_temp_bytes(tokens));
    b.perm = perm;
    return at;
  }
  std::size_t permute_temp_bytes(std::int64_t tokens) const {
    backend::cuda::PermuteParams pp;
    pp.tokens = int(tokens), pp.top_k = int(cfg_.top_k), pp.experts = int(cfg_.num_experts());
    pp.ffn_experts = int(cfg_.num_ffn_experts), pp.chunks = int(chunks_);
    std::size_t bytes = 0;
    MOEKIT_CUDA_CHECK(backend::cuda::permute_slots(nullptr, bytes, pp, nullptr));
    return bytes;
  }
  // int kernels and cuBLAS int sizes: T·k and T·N_E (and T·2·N_const) must fit.
  void check_token_limits(std::int64_t tokens) const {
    if (tokens < 0) throw ShapeError("tokens = " + std::to_string(tokens) + " must be >= 0");
    if (tokens * cfg_.top_k > (std::int64_t(1) << 30))
      throw ShapeError("tokens * top_k = " + std::to_string(tokens * cfg_.top_k) + " exceeds 2^30 on the CUDA backend");
    const std::int64_t wide = std::max(cfg_.num_experts(), 2 * cfg_.num_constant_experts);
    if (tokens * wide > std::int64_t(INT32_MAX))
      throw ShapeError("tokens * num_experts = " + std::to_string(tokens * wide) +
                       " exceeds 2^31 - 1 on the CUDA backend");
  }
  void bind(char* base, std::int64_t tokens) {
    check_token_limits(tokens);
    carve(b_, base, tokens);
    perm_bytes_ = permute_temp_bytes(tokens);
    if (tokens > 0) {
      const std::vector<float> ones(std::size_t(tokens), 1.f);
      MOEKIT_CUDA_CHECK(cudaMemcpy(b_.ones, ones.data(), ones.size() * sizeof(float), cudaMemcpyHostToDevice));
    }
    reserved_ = tokens;
    has_forward_ = false;
  }

  backend::cuda::CombineParams<S> combine_params() const {
    backend::cuda::CombineParams<S> p;
    p.tokens = int(tokens_), p.top_k = int(cfg_.top_k), p.d = int(cfg_.d_model);
    p.gate = b_.gate, p.row_of_slot = b_.row_of_slot, p.slot_of_row = b_.slot_of_row;
    p.num_rows = rows_dev();
    p.y = b_.yp, p.x = b_.x, p.idx = b_.idx;
    p.kinds = ExpertKinds::of(cfg_);
    p.const_v = v_w(), p.const_wc = wc_w(), p.mix = b_.mix;
    return p;
  }

  // One problem per expert with rows (host offsets per expert).
  template <class F>
  static std::vector<backend::cuda::GemmProblem> expert_problems(const std::vector<std::int32_t>& offsets, F&& make) {
    std::vector<backend::cuda::GemmProblem> ps;
    for (int e = 0; e + 1 < int(offsets.size()); ++e)
      if (offsets[e + 1] > offsets[e]) ps.push_back(make(e, offsets[e], offsets[e + 1] - offsets[e]));
    return ps;
  }

  void read_stats() {
    const auto no = chunks_ * cfg_.num_ffn_experts + 1, n = cfg_.num_experts();
    const std::int32_t* ints = host_stats_.data();
    offsets_.assign(ints, ints + no);
    kept_.assign(ints + no, ints + no + n);
    routed_.assign(ints + no + n, ints + no + 2 * n);
    if (training_) bias_.count(routed_);
    bad_token_ = ints[no + 2 * n];
    const float* floats = reinterpret_cast<const float*>(ints + stats_ints());
    prob_sum_.assign(floats, floats + n);
    zsum_ = floats[n];
  }

  AuxLosses compute_aux() {  // on the host, from the synchronised sums (layer/routing_plan.hpp)
    return aux_losses<float>(cfg_, balance_, training_, routed_, tokens_, prob_sum_.data(), zsum_, eta_.data(), f_counts_, f_tokens_);
  }

  void router_backward(cublasHandle_t h, float aux_scale, const float* dlogits_next, float* dprev, float* dx32,
                       cudaStream_t stream) {
    using namespace backend::cuda;
    const auto n = cfg_.num_experts(), k = cfg_.top_k;
    const int T = int(tokens_), N = int(n), D = int(cfg_.d_model);
    balance::load_balancing_dprob_all<float>(f_counts_.data(), int(n), int(k), f_tokens_, tokens_, eta_.data(),
                                             aux_scale * float(cfg_.lbl_coef), host_dprob_.data());
    MOEKIT_CUDA_CHECK(cudaMemcpyAsync(b_.dprob, host_dprob_.data(), sizeof(float) * std::size_t(n), cudaMemcpyHostToDevice, stream));
    if (T == 0) return;
    RouteBackwardParams rb;
    rb.logits = b_.logits, rb.prob = b_.prob, rb.idx = b_.idx, rb.gate = b_.gate, rb.dgate = b_.dgate, rb.dprob = b_.dprob;
    rb.lse = b_.lse, rb.zscale = aux_scale * float(cfg_.zloss_coef) * 2.f / float(T);
    rb.tokens = T, rb.experts = N, rb.top_k = int(k), rb.renormalize = cfg_.renormalize;
    rb.scratch = b_.scratch, rb.dlogits = b_.dlogits;
    MOEKIT_CUDA_CHECK(route_tokens_backward<Score>(rb, stream));
    if (dlogits_next) {
      const float one = 1.f;
      MOEKIT_CUBLAS_CHECK(cublasSaxpy(h, T * N, &one, dlogits_next, 1, b_.dlogits, 1));
    }
    const cudaDataType_t st = data_type<S>();
    const void* dl = b_.dlogits;
    if (b_.dlogits_s) {  // bf16: the GEMMs with x and W_r take one input type
      MOEKIT_CUDA_CHECK(convert(b_.dlogits, b_.dlogits_s, std::size_t(T) * N, stream));
      dl = b_.dlogits_s;
    }
    MOEKIT_CUBLAS_CHECK(gemm_row_major(h, {true, false, st, CUDA_R_32F, 1.f, 1.f}, {N, D, T, dl, N, b_.x, D, grad_at(table_.offsets().router), D}));
    MOEKIT_CUBLAS_CHECK(gemm_row_major(h, {false, false, st, CUDA_R_32F, 1.f, 1.f}, {T, D, N, dl, N, router_w(), D, dx32, D}));
    if constexpr (kResidual)
      if (has_prev_) {
        MOEKIT_CUBLAS_CHECK(gemm_row_major(h, {true, false, CUDA_R_32F, CUDA_R_32F, 1.f, 1.f},
                                           {N, N, T, b_.dlogits, N, b_.prev, N, grad_at(table_.offsets().gate_residual), N}));
        if (dprev)
          MOEKIT_CUBLAS_CHECK(gemm_row_major(h, {false, false, CUDA_R_32F, CUDA_R_32F, 1.f, 0.f},
                                             {T, N, N, b_.dlogits, N, gate_res_w(), N, dprev, N}));
      }
  }

  // The families of the flat buffers (parameter table offsets).
  S* value_at(std::int64_t element) const {
    return reinterpret_cast<S*>(values_.data() + table_.value_byte_offset(element, sizeof(S)));
  }
  S* router_w() const { return value_at(table_.offsets().router); }
  S* w13_w() const { return value_at(table_.offsets().w13); }
  S* w2_w() const { return value_at(table_.offsets().w2); }
  S* wc_w() const { return value_at(table_.offsets().const_wc); }
  S* v_w() const { return value_at(table_.offsets().const_v); }
  float* gate_res_w() const {
    return reinterpret_cast<float*>(values_.data() + table_.value_byte_offset(table_.offsets().gate_residual, sizeof(S)));
  }
  float* grad_at(std::int64_t element) const { return grads_.data() + element; }

  MoeConfig cfg_;
  [[no_unique_address]] std::conditional_t<kDistributed, Exchange, NoExchange> ex_;
  router::BiasState<float> bias_;               // router::BiasBalanced's b [N_E] (host copy), every router's step counts
  backend::cuda::DeviceArray<float> bias_dev_;  // b on the device, read by route_tokens
  // The expert side of a distributed layer (sized by reserve()) and its bookkeeping.
  backend::cuda::DeviceArray<S> xe_, ye_, dye_, h13e_, ae_;
  backend::cuda::DeviceArray<int> counts_dev_;
  std::vector<std::int32_t> exp_off_;
  bool recompute_ = false, has_activations_ = false;
  std::int64_t recomputations_ = 0, capacity_rows_ = 0;
  ParameterTable table_;
  backend::cuda::DeviceArray<char> values_;  // flat, laid out by table_ (storage type; gating residual fp32)
  backend::cuda::DeviceArray<float> grads_;  // flat fp32, laid out by table_
  Balance balance_;
  std::vector<float> eta_;
  std::unique_ptr<backend::cuda::ExpertGemm> gemm_;
  backend::cuda::DeviceArray<char> owned_;
  backend::cuda::PinnedArray<std::int32_t> host_stats_;  // ints then floats (same 4-byte size)
  backend::cuda::PinnedArray<float> host_dprob_;
  Buffers b_;
  std::size_t perm_bytes_ = 0;
  std::int64_t reserved_ = -1, tokens_ = 0, f_tokens_ = 0, gemm_flops_ = 0;  // -1: no workspace yet
  std::int64_t chunks_ = 1;         // token chunks of the permutation (tp with duplicate token dropping)
  std::size_t extra_ints_ = 0;      // ints the distributed layer adds to the stats block
  bool external_ = false, has_forward_ = false, has_prev_ = false, training_ = true;
  int bad_token_ = 0;
  float zsum_ = 0.f;
  AuxLosses aux_;
  std::vector<std::int32_t> offsets_, kept_;
  std::vector<std::int64_t> routed_, f_counts_;
  std::vector<float> prob_sum_;
};

}  // namespace moekit
