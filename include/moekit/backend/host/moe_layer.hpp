#pragma once
// Host (CPU) backend of MoeLayer: CBLAS GEMMs per expert, OpenMP loops over tokens (DESIGN §1-§5).
// This is the oracle of the CUDA backend and the way everything runs without a GPU.
//
// One class for every parallel strategy P: parallel::None, or Data / Expert / Tensor / Hybrid over a
// comm::HostCommunicator (comm::Mpi between processes, comm::Single for one). The strategy is composed,
// not inherited: a distributed layer holds a parallel::ExpertExchange (parallel/exchange.hpp) that
// moves the FFN rows between the token side (the rows this rank routed) and the expert side (the rows of
// the experts it holds); for parallel::None the two sides are the same buffers. The algorithm of the
// distributed strategies (rank grid, duplicate token dropping, the collectives, the gradient averaging,
// communication-aware checkpointing) is described in parallel/host_moe_layer.hpp.
// Size: about 670 lines, over the ~600 guide, for the same reason as the CUDA layer's (one backend's
// whole layer); the pipeline-over-operations step in docs/architecture.md splits it.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "moekit/backend/host/blas.hpp"
#include "moekit/backend/host/exchange_ops.hpp"
#include "moekit/backend/host/ffn.hpp"
#include "moekit/backend/host/policy.hpp"
#include "moekit/balance/loss.hpp"
#include "moekit/core/parameter.hpp"
#include "moekit/core/tensor.hpp"
#include "moekit/experts/activation.hpp"
#include "moekit/experts/zero_computation.hpp"
#include "moekit/layer/moe_layer_decl.hpp"
#include "moekit/layer/parameter_table.hpp"
#include "moekit/layer/routing_plan.hpp"
#include "moekit/parallel/comm/communicator.hpp"
#include "moekit/parallel/exchange.hpp"
#include "moekit/parallel/policy.hpp"
#include "moekit/parallel/sharding.hpp"
#include "moekit/router/topk.hpp"

// Loops with less work than this many elements run on one thread: waking an OpenMP team costs more,
// and idle OpenMP threads spinning after a region slow the (separately threaded) BLAS calls.
#ifndef MOEKIT_OMP_MIN_WORK
#define MOEKIT_OMP_MIN_WORK 32768
#endif

namespace moekit {

template <class T, class Router, class Experts, class Balance, parallel::StrategyPolicy P>
class MoeLayer<backend::Host<T>, Router, Experts, Balance, P> {
  static_assert(detail::PolicyChecks<Router, Experts, Balance>::ok);
  static constexpr bool kDistributed = P::distributed;
  using Exchange = parallel::ExpertExchange<backend::host::ExchangeOps<T>>;
  struct NoExchange {};

  using Act = typename Experts::activation;
  using Score = typename Router::score;
  using Kinds = experts::zc_kinds<Experts>;
  static constexpr bool kGated = Act::gated;
  static constexpr bool kResidual = Router::residual;
  static constexpr bool kBiased = Router::biased;
  static constexpr bool kAnyZc = Kinds::zero || Kinds::copy || Kinds::constant;

 public:
  using value_type = T;
  using router_type = Router;
  using experts_type = Experts;
  using balance_type = Balance;
  using parallel_type = P;

  // One rank (parallel::None).
  explicit MoeLayer(const MoeConfig& cfg)
    requires(!kDistributed)
      : cfg_(cfg) {
    detail::validate_layer_config<Router, Experts>(cfg_);
    init(ParallelGrid{});
  }
  // A distributed layer: the config is checked on every rank of `world` before anything else moves (a
  // bad or disagreeing config throws ConfigError on every rank), then the sub-communicators are split.
  MoeLayer(const MoeConfig& cfg, comm::HostCommunicator& world)
    requires(kDistributed)
      : cfg_(detail::agreed_config<Router, Experts, P>(
            cfg, world.size(), world.rank(),
            [&](const std::int64_t* mine, std::size_t n, std::int64_t* all) { world.all_gather(mine, n, all); },
            {{"balance (GlobalBatch)", Balance::global}})),
        ex_(world, ParallelGrid::of(cfg.tp, cfg.ep, cfg.dp, world.rank()),
            [](comm::HostCommunicator& w, int color, int key) { return w.split(color, key); }) {
    init(ex_.grid());
    if constexpr (Balance::global) {  // counts summed over the ranks holding different tokens
      comm::HostCommunicator* shards = &ex_.group(RankGroup::kShards);
      balance_.set_all_reduce([shards](std::int64_t* data, std::size_t n) { shards->all_reduce_sum(data, n); });
    }
  }

  const MoeConfig& config() const { return cfg_; }
  // The parameters in one flat buffer (and the gradients in another), laid out and named by the
  // table (layer/parameter_table.hpp).
  const ParameterTable& parameter_table() const { return table_; }
  std::span<T> flat_values() { return value_; }
  std::span<const T> flat_values() const { return value_; }
  std::span<T> flat_grads() { return grad_; }
  std::span<const T> flat_grads() const { return grad_; }
  // Full-size weights in and out (a distributed layer: its shard of them; the rest reads 0).
  void load_weights(const MoeWeights<T>& full) { table_.pack(full, value_.data()); }
  MoeWeights<T> weights() const { return unpacked(value_); }
  MoeWeights<T> gradients() const { return unpacked(grad_); }
  void zero_grad() { std::fill(grad_.begin(), grad_.end(), T(0)); }
  // The balance-scope policy object (GlobalBatch keeps its count buffer here: reset() after each step).
  Balance& balance() { return balance_; }
  // Training mode (the default) adds each forward's counts to a GlobalBatch buffer; evaluation mode
  // does not (the aux losses then use this forward's own counts), so eval forwards leave the buffer
  // of the current step untouched. MicroBatch layers behave the same in both modes.
  void set_training(bool on) { training_ = on; }
  bool training() const { return training_; }

  // torch.nn.Linear's default initialisation, deterministic for a seed (a distributed layer: its shard).
  void init_params(std::uint64_t seed) {
    MoeWeights<T> full;
    full.resize(cfg_, kGated, kResidual);
    init_moe_weights(full, cfg_, seed);
    load_weights(full);
  }

  // Every parameter with its gradient, named as Mixtral (and MoE++) checkpoints name them, from the
  // table: views into the flat buffers.
  std::vector<Parameter<T>> parameters(const std::string& prefix = "") { return table_.parameters(value_.data(), grad_.data(), prefix); }

  // Bytes this layer keeps for a forward/backward of `tokens` tokens (allocated by reserve()).
  std::int64_t workspace_bytes(std::int64_t tokens) const {
    const auto n = cfg_.num_experts(), k = cfg_.top_k, d = cfg_.d_model, f = cfg_.d_expert;
    const std::int64_t rows = tokens * k;
    const std::int64_t vals = tokens * d + tokens * n * (kResidual ? 4 : 3) + tokens * k * 4 + tokens +
                              rows * d * 3 + rows * f * (kGated ? 3 : 2);
    return vals * std::int64_t(sizeof(T)) + (tokens * k * 2 + rows) * std::int64_t(sizeof(std::int32_t));
  }
  // Sizes the saved activations for up to `tokens` tokens; forward() calls it, so buffers only grow.
  void reserve(std::int64_t tokens) {
    if (tokens <= reserved_) return;
    const auto n = cfg_.num_experts(), k = cfg_.top_k, d = cfg_.d_model, f = cfg_.d_expert;
    const std::int64_t rows = tokens * k;
    for (auto* v : {&logits_, &prob_, &dlogits_}) v->resize(tokens * n);
    if constexpr (kResidual) prev_.resize(tokens * n);
    for (auto* v : {&gate_, &dgate_, &mix_}) v->resize(tokens * k * (v == &mix_ ? 2 : 1));
    lse_.resize(tokens);
    idx_.resize(tokens * k);
    slot_row_.resize(tokens * k);
    row_slot_.resize(rows);
    x_.resize(tokens * d);
    for (auto* v : {&xp_, &yp_, &dyp_}) v->resize(rows * d);
    for (auto* v : {&h1_, &a_}) v->resize(rows * f);
    if constexpr (kGated) h3_.resize(rows * f);
    reserved_ = tokens;
  }

  // y = MoE(x). x, y: [T, D] contiguous. prev_logits [T, N_E]: the previous MoE layer's logits, for
  // router::GatingResidual (leave empty in the first layer). Saves what backward needs.
  AuxLosses forward(MatrixView<const T> x, MatrixView<T> y, MatrixView<const T> prev_logits = {}) {
    begin_forward(x, y, prev_logits);
    route();
    assign_slots();
    if constexpr (kDistributed) {
      relayout();
      exchange_counts();
    }
    experts_forward();
    return combine_and_aux(y.data);
  }

  // Backward of L = sum(y * dy) + aux_scale * (lbl_coef * LBL + zloss_coef * zloss) + sum(logits * dlogits_next).
  // Writes dx [T, D] and, when given, dprev_logits [T, N_E]; adds into the gradients (so micro-batches
  // accumulate). With gradient accumulation over m micro-batches pass aux_scale = 1/m.
  // dlogits_next: the gradient the next layer's gating residual sends back to these logits.
  void backward(MatrixView<const T> dy, MatrixView<T> dx, double aux_scale = 1.0, MatrixView<const T> dlogits_next = {},
                MatrixView<T> dprev_logits = {}) {
    begin_backward(dy, dx, dlogits_next, dprev_logits);
    combine_backward(dy.data);
    experts_backward();
    gather_slots(dyp_.data(), dx.data, /*gate_weighted=*/false);
    finish_backward(dy.data, dx.data, aux_scale, dlogits_next.data, dprev_logits.data);
  }

  // ---- router state and the per-step hook ----------------------------------------------------------
  // Once after each optimizer step: resets a GlobalBatch buffer, and (router::BiasBalanced) applies
  // b_i += u · sign(mean c − c_i) with the step's routed counts summed over its training forwards and
  // over the ranks that hold different tokens (a collective of the distributed layer: every rank calls
  // it, and every rank ends with the same biases).
  void end_step() {
    if constexpr (Balance::global) balance_.reset();
    if constexpr (kBiased) {
      std::vector<std::int64_t> c = bias_.step_counts();
      if constexpr (kDistributed) ex_.group(RankGroup::kShards).all_reduce_sum(c.data(), c.size());
      bias_.apply(c, cfg_.bias_update_rate);
    }
  }
  // router::BiasBalanced: the per-expert selection biases (state, not a parameter; HF DeepSeek-V3's
  // gate.e_score_correction_bias), and the update this rank's counts since the last end_step() would
  // apply (without the other ranks' counts).
  std::span<const T> expert_bias() const
    requires(kBiased)
  {
    return bias_.bias();
  }
  void set_expert_bias(std::span<const T> b)
    requires(kBiased)
  {
    bias_.set(b);
  }
  std::vector<T> expert_bias_update() const
    requires(kBiased)
  {
    return bias_.preview(cfg_.bias_update_rate);
  }
  // Routed (pre-capacity) slots per expert over this step's training forwards (the bias update's c).
  const std::vector<std::int64_t>& step_counts() const { return bias_.step_counts(); }

  // ---- distributed strategies only ----------------------------------------------------------------
  const ParallelGrid& grid() const
    requires(kDistributed)
  {
    return ex_.grid();
  }
  // Local experts [first_expert(), first_expert() + local_experts()), each a d_expert/tp slice.
  std::int64_t first_expert() const { return table_.first_expert(); }
  std::int64_t local_experts() const { return table_.local_experts(); }
  // Duplicate token dropping over tp (default on; off dispatches every row from every tp rank).
  void set_duplicate_token_dropping(bool on)
    requires(kDistributed)
  {
    ex_.set_duplicate_token_dropping(on);
  }
  // Communication-aware activation checkpointing: the forward keeps only the dispatched rows (the
  // all-to-all outputs), and backward recomputes the expert activations from them without
  // communicating again.
  void set_activation_checkpointing(bool on)
    requires(kDistributed)
  {
    recompute_ = on;
  }
  std::int64_t recomputations() const { return recomputations_; }
  // Once per optimizer step, before it: expert gradients summed over dp, dense ones over the world,
  // both divided to the mean over the ep·dp shards (parallel/exchange.hpp).
  void sync_gradients()
    requires(kDistributed)
  {
    ex_.sync_gradients(table_, grad_.data(), {});
  }
  // Bytes and calls of every collective this layer made, summed over its groups; the all-to-all alone
  // (the volume duplicate token dropping divides by tp).
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

  // Results of the last forward.
  std::int64_t num_tokens() const { return tokens_; }
  MatrixView<const T> logits() const { return {logits_.data(), {tokens_, cfg_.num_experts()}}; }
  MatrixView<const T> probs() const { return {prob_.data(), {tokens_, cfg_.num_experts()}}; }
  MatrixView<const std::int32_t> topk_indices() const { return {idx_.data(), {tokens_, cfg_.top_k}}; }
  MatrixView<const T> topk_gates() const { return {gate_.data(), {tokens_, cfg_.top_k}}; }
  // Slots each expert kept after capacity, and the slots routed to it before (the f_i of the LBL).
  VectorView<const std::int32_t> expert_counts() const { return {kept_.data(), {cfg_.num_experts()}}; }
  const std::vector<std::int64_t>& routed_counts() const { return routed_; }
  // True for (token, slot) pairs that were kept (not dropped by capacity).
  bool slot_kept(std::int64_t t, std::int64_t j) const { return slot_row_[t * cfg_.top_k + j] != kDropped; }
  AuxLosses aux() const { return aux_; }
  // Work of the expert GEMMs in the last forward: FLOPs issued (2 m n k per GEMM) and rows that
  // entered them. Slots of zero-computation experts never do.
  std::int64_t expert_gemm_flops() const { return gemm_flops_; }
  std::int64_t ffn_rows() const { return offset_.empty() ? 0 : offset_.back(); }

 private:
  using I32 = std::int32_t;
  using I64 = std::int64_t;

  void init(const ParallelGrid& grid) {
    set_parameter_table(ParameterTable(cfg_, kGated, kResidual, grid));
    eta_ = balance_eta<T>(cfg_);
    bias_.resize(std::size_t(cfg_.num_experts()), kBiased);
  }

  // Checks the arguments, sizes the buffers and saves x (and prev_logits).
  void begin_forward(MatrixView<const T> x, MatrixView<T> y, MatrixView<const T> prev_logits) {
    const std::int64_t tokens = x.shape[0], d = cfg_.d_model;
    check_forward_args(cfg_, kResidual, x, y, prev_logits, std::int64_t(INT32_MAX));  // layer/routing_plan.hpp
    has_forward_ = false;
    has_prev_ = prev_logits.data != nullptr;
    reserve(tokens);
    tokens_ = tokens;
    std::copy_n(x.data, tokens * d, x_.data());
    if constexpr (kResidual)
      if (has_prev_) std::copy_n(prev_logits.data, prev_logits.numel(), prev_.data());
  }
  // Combine of the expert rows in yp_, the zero-computation experts, the aux losses.
  AuxLosses combine_and_aux(T* y) {
    gather_slots(yp_.data(), y, /*gate_weighted=*/true);
    if constexpr (kAnyZc) zero_computation_forward(y);
    aux_ = compute_aux();
    has_forward_ = true;
    return aux_;
  }
  void begin_backward(MatrixView<const T> dy, MatrixView<T> dx, MatrixView<const T> dlogits_next, MatrixView<T> dprev_logits) {
    check_backward_args(cfg_, has_forward_, has_prev_, tokens_, dy, dx, dlogits_next, dprev_logits);
  }
  // After dx holds the expert rows' gradient: the zero-computation experts and the router.
  void finish_backward(const T* dy, T* dx, double aux_scale, const T* dlogits_next, T* dprev) {
    if constexpr (kAnyZc) zero_computation_backward(dy, dx);
    router_backward(dx, T(aux_scale), dlogits_next, dprev);
  }
  static constexpr I32 kDropped = kSlotDropped, kZeroComputation = kSlotZeroComputation;  // layer/routing_plan.hpp

  // The families of a flat buffer (values or gradients).
  struct Weights {
    T *router, *w13, *w2, *const_wc, *const_v, *gate_residual;
  };
  Weights weights_in(std::vector<T>& flat) const {
    const auto& o = table_.offsets();
    T* b = flat.data();
    return {b + o.router, b + o.w13, b + o.w2, b + o.const_wc, b + o.const_v, b + o.gate_residual};
  }
  Weights W() { return weights_in(value_); }
  Weights G() { return weights_in(grad_); }
  void set_parameter_table(ParameterTable t) {
    table_ = std::move(t);
    value_.assign(std::size_t(table_.size()), T(0));
    grad_.assign(std::size_t(table_.size()), T(0));
  }
  MoeWeights<T> unpacked(const std::vector<T>& flat) const {
    MoeWeights<T> w;
    table_.unpack(flat.data(), w);
    return w;
  }

  bool is_ffn(std::int64_t e) const { return e < cfg_.num_ffn_experts; }

  void route() {
    const auto n = cfg_.num_experts(), k = cfg_.top_k, d = cfg_.d_model;
    const Weights w = W();
    backend::host::gemm<T>(false, true, tokens_, n, d, T(1), x_.data(), w.router, T(0), logits_.data());
    if constexpr (kResidual)
      if (has_prev_)
        backend::host::gemm<T>(false, true, tokens_, n, n, T(1), prev_.data(), w.gate_residual, T(1), logits_.data());
    std::int64_t bad = -1;
#pragma omp parallel for schedule(static) if (tokens_ * n >= MOEKIT_OMP_MIN_WORK)
    for (std::int64_t t = 0; t < tokens_; ++t) {
      const T* l = &logits_[t * n];
      bool finite = true;
      for (std::int64_t i = 0; i < n; ++i) finite = finite && std::isfinite(l[i]);
      if (!finite) {
#pragma omp critical
        bad = bad < 0 ? t : std::min(bad, t);
        continue;
      }
      lse_[t] = router::route_token(Score{}, l, int(n), int(k), cfg_.renormalize, &prob_[t * n], &idx_[t * k], &gate_[t * k],
                                    kBiased ? bias_.bias().data() : nullptr);
    }
    if (bad >= 0)
      throw NumericError("router logits of token " + std::to_string(bad) +
                         " are not finite (check x, gate.weight and prev_logits)");
  }

  // Counts, capacity drops (lowest router score first) and each kept FFN slot's row in the
  // expert-contiguous buffers. Rows of one expert are in token order, so results are deterministic.
  void assign_slots() {
    const auto n = cfg_.num_experts(), k = cfg_.top_k, nf = cfg_.num_ffn_experts;
    routed_.assign(n, 0);
    for (std::int64_t s = 0; s < tokens_ * k; ++s) ++routed_[idx_[s]];
    if (training_) bias_.count(routed_);
    std::fill(slot_row_.begin(), slot_row_.begin() + tokens_ * k, 0);
    const auto caps = balance::expert_capacities(cfg_.capacity_factor, cfg_.tau, k, tokens_, nf, cfg_.num_zc_experts());
    if (caps.ffn >= 0) {
      std::vector<std::vector<I32>> by_expert(n);
      for (std::int64_t s = 0; s < tokens_ * k; ++s) {
        const std::int64_t e = idx_[s];
        if (routed_[e] > (is_ffn(e) ? caps.ffn : caps.zc)) by_expert[e].push_back(I32(s));
      }
      for (std::int64_t e = 0; e < n; ++e) {
        auto& slots = by_expert[e];
        const auto cap = std::size_t(is_ffn(e) ? caps.ffn : caps.zc);
        // Higher router score first; equal scores keep the earlier token (slots are in token order).
        std::stable_sort(slots.begin(), slots.end(), [&](I32 a, I32 b) { return score_of(a) > score_of(b); });
        for (std::size_t r = cap; r < slots.size(); ++r) slot_row_[slots[r]] = kDropped;
      }
    }
    kept_.assign(n, 0);
    for (std::int64_t s = 0; s < tokens_ * k; ++s)
      if (slot_row_[s] != kDropped) ++kept_[idx_[s]];
    offset_.assign(nf + 1, 0);
    for (std::int64_t e = 0; e < nf; ++e) offset_[e + 1] = offset_[e] + kept_[e];
    std::vector<std::int64_t> fill(offset_.begin(), offset_.end() - 1);
    for (std::int64_t s = 0; s < tokens_ * k; ++s) {
      if (slot_row_[s] == kDropped) continue;
      if (!is_ffn(idx_[s])) {
        slot_row_[s] = kZeroComputation;
        continue;
      }
      const std::int64_t row = fill[idx_[s]]++;
      slot_row_[s] = I32(row);
      row_slot_[row] = I32(s);
    }
  }
  // The router score a slot was picked by (layer/routing_plan.hpp).
  T score_of(I32 s) const {
    const std::int64_t at = (s / cfg_.top_k) * cfg_.num_experts() + idx_[s];
    return capacity_score<Score>(logits_[at], prob_[at]);
  }

  // ---- the experts: token side -> (exchange) -> expert side -> FFN -> (exchange) -> token side ---------
  // The local experts over the expert side's rows: each expert's range of them (the token side's
  // offsets for parallel::None, the dispatch plan's expert-major ones otherwise).
  backend::host::FfnShapes<T> ffn_shapes() const {
    const I64* offsets = offset_.data();
    if constexpr (kDistributed) offsets = ex_.plan().expert_offsets().data();
    return {cfg_.d_model, table_.local_d_expert(), offsets, table_.local_experts(), table_.w13_rows()};
  }
  // The expert side's rows: xp/yp/dyp themselves for parallel::None, the exchange's buffers otherwise.
  T* expert_x() { return kDistributed ? xe_.data() : xp_.data(); }
  T* expert_y() { return kDistributed ? ye_.data() : yp_.data(); }
  T* expert_dy() { return kDistributed ? dye_.data() : dyp_.data(); }

  // The FFN over the expert side's rows (activations kept for backward).
  void ffn_forward() {
    const auto s = ffn_shapes();
    const std::size_t rows = std::size_t(s.rows()), f = std::size_t(s.f);
    for (auto* v : {&h1_, &a_}) v->resize(std::max(v->size(), rows * f));
    if constexpr (kGated) h3_.resize(std::max(h3_.size(), rows * f));
    const Weights w = W();
    gemm_flops_ = backend::host::ffn_forward<Act>(s, w.w13, w.w2, expert_x(), h1_.data(), h3_.data(), a_.data(), expert_y());
  }

  void experts_forward() {
    const auto k = cfg_.top_k, d = cfg_.d_model;
    // The token side's rows this rank sends: all of them, or with duplicate token dropping its chunk.
    I64 r0 = 0, r1 = ffn_rows();
    if constexpr (kDistributed) r0 = ex_.plan().chunk_row(ex_.plan().my_chunk()), r1 = ex_.plan().chunk_row(ex_.plan().my_chunk() + 1);
#pragma omp parallel for schedule(static) if ((r1 - r0) * d >= MOEKIT_OMP_MIN_WORK)
    for (I64 r = r0; r < r1; ++r) std::copy_n(&x_[(row_slot_[r] / k) * d], d, &xp_[r * d]);
    if constexpr (kDistributed) {
      const std::size_t rows = std::size_t(ex_.plan().expert_rows() * d);
      xe_.resize(std::max(xe_.size(), rows)), ye_.resize(std::max(ye_.size(), rows));
      ex_.to_experts(xp_.data(), xe_.data(), {});  // xe_ is kept for backward: the all-to-all outputs
      ffn_forward();
      ex_.from_experts(ye_.data(), yp_.data(), {});
      has_activations_ = !recompute_;
      if (recompute_) h1_.clear(), h3_.clear(), a_.clear();  // keep only the dispatched rows
    } else {
      ffn_forward();
    }
  }

  // d(expert rows) from dyp (gate·dy) into dyp (d of the gathered x rows), the weight gradients added.
  void experts_backward() {
    if constexpr (kDistributed) {
      dye_.resize(std::max(dye_.size(), std::size_t(ex_.plan().expert_rows() * cfg_.d_model)));
      ex_.to_experts(dyp_.data(), dye_.data(), {});
      if (!has_activations_) {  // recompute from the saved all-to-all outputs: no communication
        ffn_forward();
        ++recomputations_;
      }
    }
    const Weights w = W(), g = G();
    backend::host::ffn_backward<Act>(ffn_shapes(), w.w13, w.w2, expert_x(), h1_.data(), h3_.data(), a_.data(), expert_dy(),
                                     g.w13, g.w2);
    if constexpr (kDistributed) {
      has_activations_ = false;  // consumed
      ex_.from_experts(dye_.data(), dyp_.data(), {});
    }
  }

  // Distributed: rows in the plan's chunk-major order (chunk, expert, token); the token-side counts.
  void relayout() {
    const I64 k = cfg_.top_k, nf = cfg_.num_ffn_experts, tokens = tokens_;
    DispatchPlan& plan = ex_.plan();
    plan.reset(ex_.grid(), ex_.duplicate_token_dropping(), nf, cfg_.d_model);
    const I64 nc = plan.chunks();
    std::vector<I64> cnt(std::size_t(nc * nf), 0), fill(std::size_t(nc * nf), 0);
    for (I64 s = 0; s < tokens * k; ++s)
      if (slot_row_[s] >= 0) ++cnt[DispatchPlan::chunk_of(s / k, tokens, nc) * nf + idx_[s]];
    plan.set_token_counts(cnt);
    for (I64 c = 0, at = 0; c < nc; ++c)
      for (I64 e = 0; e < nf; ++e) fill[c * nf + e] = at, at += cnt[c * nf + e];
    for (I64 s = 0; s < tokens * k; ++s) {
      if (slot_row_[s] < 0) continue;
      const I64 row = fill[DispatchPlan::chunk_of(s / k, tokens, nc) * nf + idx_[s]]++;
      slot_row_[s] = I32(row);
      row_slot_[row] = I32(s);
    }
  }
  // Distributed: the per-expert counts of every rank of this dp index (tp x ep): the expert side's layout.
  void exchange_counts() {
    const I64 nf = cfg_.num_ffn_experts;
    const ParallelGrid& g = ex_.grid();
    std::vector<I64> all(std::size_t(g.tp * g.ep * nf));
    ex_.group(RankGroup::kTpEp).all_gather(ex_.plan().my_counts(), std::size_t(nf), all.data());
    ex_.plan().set_all_counts(all);
  }

  // out_t = sum over t's kept FFN slots of (gate or 1) * rows[slot's row]: a gather, not a scatter
  // with atomics, so results are deterministic. Combine (gate-weighted) and dx (unweighted) share it.
  void gather_slots(const T* rows, T* out, bool gate_weighted) const {
    const auto k = cfg_.top_k, d = cfg_.d_model;
#pragma omp parallel for schedule(static) if (tokens_ * d * k >= MOEKIT_OMP_MIN_WORK)
    for (std::int64_t t = 0; t < tokens_; ++t) {
      T* ot = out + t * d;
      std::fill_n(ot, d, T(0));
      for (std::int64_t j = 0; j < k; ++j) {
        const I32 row = slot_row_[t * k + j];
        if (row < 0) continue;
        const T g = gate_weighted ? gate_[t * k + j] : T(1);
        const T* src = rows + std::int64_t(row) * d;
        for (std::int64_t c = 0; c < d; ++c) ot[c] += g * src[c];
      }
    }
  }

  // Calls fn(slot, kind, constant index) for each kept zero-computation slot of token t.
  template <class F>
  void for_each_zc_slot(std::int64_t t, F&& fn) const {
    const ExpertKinds kinds = ExpertKinds::of(cfg_);
    for (std::int64_t s = t * cfg_.top_k; s < (t + 1) * cfg_.top_k; ++s)
      if (slot_row_[s] == kZeroComputation) {
        int q = 0;
        const ZcKind kind = kinds.zc_kind(idx_[s], q);
        fn(s, kind, std::int64_t(q));
      }
  }

  // Zero/copy/constant experts are finished here, on the token's own row: no GEMM, no travel.
  void zero_computation_forward(T* y) {
    [[maybe_unused]] const auto k = cfg_.top_k;  // read by the OpenMP clause only
    const auto d = cfg_.d_model;
    const Weights w = W();
#pragma omp parallel for schedule(static) if (tokens_ * d * k >= MOEKIT_OMP_MIN_WORK)
    for (std::int64_t t = 0; t < tokens_; ++t) {
      const T* xt = &x_[t * d];
      T* yt = y + t * d;
      for_each_zc_slot(t, [&](std::int64_t s, ZcKind kind, std::int64_t q) {
        const T g = gate_[s];
        if (kind == ZcKind::kCopy) {
          for (std::int64_t c = 0; c < d; ++c) yt[c] += g * xt[c];
        } else if (kind == ZcKind::kConstant) {
          T a1, a2;
          experts::constant_mix(&w.const_wc[q * 2 * d], xt, int(d), a1, a2);
          mix_[2 * s] = a1;
          mix_[2 * s + 1] = a2;
          const T* v = &w.const_v[q * d];
          for (std::int64_t c = 0; c < d; ++c) yt[c] += g * (a1 * xt[c] + a2 * v[c]);
        }
      });
    }
  }

  AuxLosses compute_aux() {
    const auto n = cfg_.num_experts();
    prob_sum_.assign(n, T(0));
    T z = 0;
    for (std::int64_t t = 0; t < tokens_; ++t) {
      for (std::int64_t i = 0; i < n; ++i) prob_sum_[i] += prob_[t * n + i];
      z += lse_[t] * lse_[t];
    }
    // f_i from the scope's routed (pre-capacity) counts; P_i from this micro-batch (layer/routing_plan.hpp).
    return aux_losses<T>(cfg_, balance_, training_, routed_, tokens_, prob_sum_.data(), z, eta_.data(), f_counts_, f_tokens_);
  }

  // dgate for every slot, and d(expert rows) = gate * dy for FFN slots.
  void combine_backward(const T* dy) {
    const auto k = cfg_.top_k, d = cfg_.d_model;
    const T* const_v = W().const_v;
    const ExpertKinds kinds = ExpertKinds::of(cfg_);
#pragma omp parallel for schedule(static) if (tokens_ * d * k >= MOEKIT_OMP_MIN_WORK)
    for (std::int64_t t = 0; t < tokens_; ++t) {
      const T* dyt = dy + t * d;
      const T* xt = &x_[t * d];
      for (std::int64_t j = 0; j < k; ++j) {
        const std::int64_t s = t * k + j;
        const I32 row = slot_row_[s];
        T dg = 0;
        if (row >= 0) {
          const T* src = &yp_[std::int64_t(row) * d];
          T* dst = &dyp_[std::int64_t(row) * d];
          for (std::int64_t c = 0; c < d; ++c) {
            dg += dyt[c] * src[c];
            dst[c] = gate_[s] * dyt[c];
          }
        } else if (row == kZeroComputation) {
          int q = 0;
          const ZcKind kind = kinds.zc_kind(idx_[s], q);
          if (kind == ZcKind::kCopy) {
            for (std::int64_t c = 0; c < d; ++c) dg += dyt[c] * xt[c];
          } else if (kind == ZcKind::kConstant) {
            const T* v = &const_v[std::int64_t(q) * d];
            for (std::int64_t c = 0; c < d; ++c) dg += dyt[c] * (mix_[2 * s] * xt[c] + mix_[2 * s + 1] * v[c]);
          }
        }
        dgate_[s] = dg;  // dropped slots and zero experts do not reach y: 0
      }
    }
  }


  // Copy and constant experts' input gradients and the constant experts' weight gradients, in token
  // order: the work is small, and one fixed order keeps the weight gradients deterministic.
  void zero_computation_backward(const T* dy, T* dx) {
    const auto d = cfg_.d_model;
    const Weights w = W(), gw = G();
    std::vector<T> de(d);
    for (std::int64_t t = 0; t < tokens_; ++t) {
      const T* dyt = dy + t * d;
      T* dxt = dx + t * d;
      for_each_zc_slot(t, [&](std::int64_t s, ZcKind kind, std::int64_t q) {
        const T g = gate_[s];
        if (kind == ZcKind::kCopy) {
          for (std::int64_t c = 0; c < d; ++c) dxt[c] += g * dyt[c];
        } else if (kind == ZcKind::kConstant) {
          for (std::int64_t c = 0; c < d; ++c) de[c] = g * dyt[c];
          experts::constant_backward(&w.const_wc[q * 2 * d], &x_[t * d], &w.const_v[q * d], mix_[2 * s], mix_[2 * s + 1],
                                     de.data(), int(d), dxt, &gw.const_v[q * d], &gw.const_wc[q * 2 * d]);
        }
      });
    }
  }

  void router_backward(T* dx, T aux_scale, const T* dlogits_next, T* dprev) {
    const auto n = cfg_.num_experts(), k = cfg_.top_k, d = cfg_.d_model;
    std::vector<T> dprob(n);
    balance::load_balancing_dprob_all<T>(f_counts_.data(), int(n), int(k), f_tokens_, tokens_, eta_.data(),
                                         aux_scale * T(cfg_.lbl_coef), dprob.data());
    const T zscale = tokens_ > 0 ? aux_scale * T(cfg_.zloss_coef) * T(2) / T(tokens_) : T(0);
#pragma omp parallel if (tokens_ * n >= MOEKIT_OMP_MIN_WORK)
    {
      std::vector<T> scratch(n);
#pragma omp for schedule(static)
      for (std::int64_t t = 0; t < tokens_; ++t) {
        T* dl = &dlogits_[t * n];
        router::route_token_backward(Score{}, &logits_[t * n], int(n), int(k), cfg_.renormalize, &prob_[t * n],
                                     &idx_[t * k], &gate_[t * k], &dgate_[t * k], dprob.data(), zscale * lse_[t],
                                     scratch.data(), dl);
        if (dlogits_next)
          for (std::int64_t i = 0; i < n; ++i) dl[i] += dlogits_next[t * n + i];
      }
    }
    const Weights w = W(), g = G();
    backend::host::gemm<T>(true, false, n, d, tokens_, T(1), dlogits_.data(), x_.data(), T(1), g.router);
    backend::host::gemm<T>(false, false, tokens_, d, n, T(1), dlogits_.data(), w.router, T(1), dx);
    if constexpr (kResidual)
      if (has_prev_) {
        backend::host::gemm<T>(true, false, n, n, tokens_, T(1), dlogits_.data(), prev_.data(), T(1), g.gate_residual);
        if (dprev) backend::host::gemm<T>(false, false, tokens_, n, n, T(1), dlogits_.data(), w.gate_residual, T(0), dprev);
      }
  }

  MoeConfig cfg_;
  [[no_unique_address]] std::conditional_t<kDistributed, Exchange, NoExchange> ex_;
  router::BiasState<T> bias_;  // router::BiasBalanced's b [N_E], and every router's step counts
  bool recompute_ = false, has_activations_ = false;
  std::int64_t recomputations_ = 0;
  std::vector<T> xe_, ye_, dye_;  // the expert side's rows (distributed only)
  ParameterTable table_;
  std::vector<T> value_, grad_;  // flat, laid out by table_
  Balance balance_;
  std::vector<T> eta_;
  std::int64_t reserved_ = 0, tokens_ = 0, f_tokens_ = 0, gemm_flops_ = 0;
  bool has_forward_ = false, has_prev_ = false, training_ = true;
  AuxLosses aux_;
  std::vector<T> x_, prev_, logits_, prob_, dlogits_, gate_, dgate_, mix_, lse_, prob_sum_;
  std::vector<I32> idx_, slot_row_, row_slot_, kept_;
  std::vector<std::int64_t> routed_, offset_, f_counts_;
  std::vector<T> xp_, yp_, dyp_, h1_, h3_, a_;
};

}  // namespace moekit
