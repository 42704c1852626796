#pragma once
// Over 600 lines on purpose: the layer's public API and its stages in one class (the distributed stages
// are already apart, layer/pipeline_distributed.hpp); the next split would cut the stages from their state.
// MoeLayer<Backend, Router, Experts, Balance, Parallel>: the MoE layer, one class template for every
// backend and parallel strategy. The stages are written here once; their bodies are the backend's
// operations (Ops = layer_ops<...>::type: backend/host/layer_ops.hpp, backend/cuda/layer_ops.cuh), and
// the strategy is composed in as a parallel::ExpertExchange (parallel/exchange.hpp) between the token
// side (the rows this rank routed) and the expert side (the rows of the experts it holds).
//
// Forward:  begin (save x) -> shared experts (CUDA: on a second stream, until the join) -> route
//           (router GEMM, per-token routing, routed counts, aux sums) -> plan (capacity drops, rows
//           per (chunk, expert), gather x rows) -> statistics to the host (distributed: first
//           exchanged between the ranks, so a bad rank stops every rank) -> [dispatch plan,
//           to_experts] -> FFN -> [from_experts] -> shared join [sum over tp] -> combine (with the
//           zero-computation and shared experts) -> aux losses.
// Backward: combine backward (dgate, gate·dy rows) -> shared experts' backward (CUDA: second stream)
//           -> [to_experts] -> (recompute) FFN backward -> [from_experts] -> shared join [sum of its
//           dx over tp] -> token backward (dx of the rows, the zero-computation and shared experts) ->
//           router backward (LBL and z-loss through P and lse, the gating residual).
//
// Ops provides (CUDA: device memory and a stream; host: vectors and OpenMP loops):
//   types value_type (activations), logit_type (router math), weight_type (MoeWeights' element),
//   Context, Options, World (the distributed communicator), Exchange (parallel::ExpertExchange's row
//   operations, plus a few on the statistics block); constants kMaxSlots (T·k limit), kGrows (buffers
//   grow in forward; else reserve() first);
//   the parameters: table(), load_weights, weights, gradients, zero_grad, parameters, flat buffers;
//   the workspace: check_config (the backend's limits), workspace_bytes, reserve, prepare(tokens),
//   reserve_expert_side(rows), capacity_rows;
//   the stages: begin, route, plan, stats_ints/stats_floats (where they are computed), sync_stats,
//   stats_ints_host/stats_floats_host, token_rows, expert_rows, ffn_forward, drop_activations,
//   ffn_backward, combine, combine_backward, token_backward, router_backward, set_router_state; the
//   shared experts' has_shared, shared_forward, shared_backward, shared_join, shared_rows, shared_dx.
// The router's behaviour (its per-token functors, capacity score, state hook) is the router policy's
// (router/policy.hpp): the operations call Router::route / route_backward / capacity_score.
#include <algorithm>
#include <concepts>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "moekit/balance/loss.hpp"
#include "moekit/core/config.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/tensor.hpp"
#include "moekit/layer/moe_layer_decl.hpp"
#include "moekit/layer/parameter_table.hpp"
#include "moekit/layer/routing_plan.hpp"
#include "moekit/parallel/comm/communicator.hpp"
#include "moekit/parallel/dispatch_plan.hpp"
#include "moekit/parallel/exchange.hpp"
#include "moekit/parallel/grid.hpp"
#include "moekit/parallel/sharding.hpp"
#include "moekit/router/bias_balanced.hpp"
#include "moekit/router/state.hpp"

namespace moekit {

template <class Backend, class Router, class Experts, class Balance, class P>
class MoeLayer {
  static_assert(detail::PolicyChecks<Router, Experts, Balance>::ok);
  using Ops = typename layer_ops<Backend, Router, Experts, Balance, P>::type;
  using X = typename Ops::Exchange;
  static constexpr bool kDistributed = P::distributed;
  static constexpr bool kResidual = router::router_traits<Router>::reads_prev_logits;
  static constexpr bool kBiased = router::router_traits<Router>::selection_bias;
  static constexpr bool kStateful = router::router_traits<Router>::stateful;
  using Exchange = parallel::ExpertExchange<X>;
  struct NoExchange {};

 public:
  using value_type = typename Backend::value_type;
  using storage_type = typename Ops::value_type;  // activations: T on the host, float or bf16 bits on CUDA
  using logit_type = typename Ops::logit_type;    // logits, probabilities, gates, prev_logits
  using weight_type = typename Ops::weight_type;  // MoeWeights<weight_type> in and out
  using Context = typename Ops::Context;          // the stream (CUDA), or nothing
  using Options = typename Ops::Options;          // CUDA: the GEMM strategy
  using backend_type = Backend;
  using router_type = Router;
  using experts_type = Experts;
  using balance_type = Balance;
  using parallel_type = P;
  using ops_type = Ops;
  using S = storage_type;
  using L = logit_type;

  // One rank (parallel::None).
  explicit MoeLayer(const MoeConfig& cfg, Options options = {})
    requires(!kDistributed)
      : cfg_(validated(cfg)), layout_(cfg_.num_ffn_experts, cfg_.num_experts(), 1, 1),
        ops_(cfg_, ParameterTable::of<Router, Experts>(cfg_), layout_, options) {
    init();
  }
  // One rank of `world` (one GPU per rank on CUDA). The config is checked on every rank before anything
  // else moves (a bad or disagreeing config throws ConfigError on every rank), then the six
  // sub-communicators are split. duplicate_token_dropping must agree too.
  template <class World>
    requires(kDistributed && std::derived_from<World, typename Ops::World>)
  MoeLayer(const MoeConfig& cfg, World& world, bool duplicate_token_dropping = true, Options options = {})
      : cfg_(detail::agreed_config<Router, Experts, P>(
            cfg, world.size(), world.rank(),
            [&](const std::int64_t* mine, std::size_t n, std::int64_t* all) { X::gather_config(world, mine, n, all); },
            {{"duplicate_token_dropping", duplicate_token_dropping}, {"balance (GlobalBatch)", Balance::global}})),
        ex_(static_cast<typename Ops::World&>(world), ParallelGrid::of(cfg.tp, cfg.ep, cfg.dp, world.rank()),
            [](typename Ops::World& w, int color, int key) { return X::split(w, color, key); }),
        layout_(cfg_.num_ffn_experts, cfg_.num_experts(), cfg_.tp, cfg_.ep),
        ops_(cfg_, ParameterTable::of<Router, Experts>(cfg_, ex_.grid()), layout_, options) {
    ex_.set_duplicate_token_dropping(duplicate_token_dropping);
    init();
    if constexpr (Balance::global) {  // exchange_stats summed the counts over the shards already
      const std::int32_t* global = ops_.stats_ints_host() + layout_.global;  // never moves
      balance_.set_all_reduce([global](std::int64_t* data, std::size_t k) { std::copy_n(global, k, data); });
    }
  }

  const MoeConfig& config() const { return cfg_; }
  // Token choice, or expert choice (router/expert_choice.hpp): the router's `routing` option.
  Routing routing() const { return routing_; }
  Ops& ops() { return ops_; }
  const Ops& ops() const { return ops_; }
  // The balance-scope policy object (GlobalBatch keeps its count buffer here: end_step() resets it).
  Balance& balance() { return balance_; }
  // Training mode (the default) adds each forward's counts to a GlobalBatch buffer and to the step's
  // counts of a biased router; evaluation mode does not (the aux losses then use this forward's own
  // counts). MicroBatch layers behave the same in both modes. An evaluation-mode forward keeps nothing
  // for backward where the backend can drop it (the host: no gradient buffers, the activation computed
  // in place), so backward after it is a logic_error.
  void set_training(bool on) {
    training_ = on;
    if constexpr (requires(Ops& o) { o.set_training(on); }) ops_.set_training(on);
  }
  bool training() const { return training_; }

  // ---- parameters: one flat value buffer and one flat gradient buffer, laid out and named by the
  // parameter table (layer/parameter_table.hpp) ----------------------------------------------------
  const ParameterTable& parameter_table() const { return ops_.table(); }
  decltype(auto) flat_values() { return ops_.flat_values(); }
  decltype(auto) flat_values() const { return ops_.flat_values(); }
  decltype(auto) flat_grads() { return ops_.flat_grads(); }
  decltype(auto) flat_grads() const { return ops_.flat_grads(); }
  // Full-size weights in and out (a distributed layer: its shard of them; the rest reads 0).
  void load_weights(const MoeWeights<weight_type>& full) { ops_.load_weights(full); }
  MoeWeights<weight_type> weights() const { return ops_.weights(); }
  MoeWeights<weight_type> gradients() const { return ops_.gradients(); }
  void zero_grad(Context ctx = {}) { ops_.zero_grad(ctx); }
  // torch.nn.Linear's default initialisation, deterministic for a seed (a distributed layer: its shard).
  void init_params(std::uint64_t seed) { load_weights(ops_.table().template initial<weight_type>(seed)); }
  // Every parameter with its gradient, named as Mixtral (and MoE++) checkpoints name them, in the
  // table's order (the same on every backend and strategy): views into the flat buffers.
  auto parameters(const std::string& prefix = "") { return ops_.parameters(prefix); }
  auto parameters(const std::string& prefix = "") const { return ops_.parameters(prefix); }

  // ---- workspace --------------------------------------------------------------------------------
  // Bytes a forward/backward of up to `tokens` tokens needs (the layer's own buffers).
  std::size_t workspace_bytes(std::int64_t tokens) const { return std::size_t(ops_.workspace_bytes(tokens)); }
  // Sizes the buffers for up to `tokens` tokens. The host grows them in forward as well; CUDA never
  // allocates in forward. A distributed CUDA layer also sizes its expert side for ep·T·k rows (every
  // row of every source could come to its experts): every rank must reserve the same number of tokens.
  void reserve(std::int64_t tokens) {
    if constexpr (!Ops::kGrows) {  // new device memory: what the last forward saved is gone
      if (ops_.reserve(tokens)) has_forward_ = false;  // a failure changes nothing (CUDA ops: strong guarantee)
    } else {
      ops_.reserve(tokens);
    }
    if constexpr (kDistributed && !Ops::kGrows) {
      const std::int64_t t = ops_.reserved_tokens(), slots = router::routing_slots(cfg_, routing_, t),
                         rows = std::int64_t(cfg_.ep) * slots;
      if (rows > std::int64_t(INT32_MAX)) throw ShapeError("ep * slots = " + std::to_string(rows) + " exceeds 2^31 - 1 (slots: tokens * top_k, or the experts' tokens under expert choice)");
      ops_.reserve_expert_side(rows);
      ex_.reserve(rows, slots, cfg_.d_model);
    }
  }
  // CUDA, one GPU: caller-owned device memory (256-byte aligned, at least workspace_bytes(tokens)).
  void attach_workspace(void* p, std::size_t bytes, std::int64_t tokens)
    requires(!kDistributed && requires(Ops& o, void* q, std::size_t b, std::int64_t t) { o.attach_workspace(q, b, t); })
  {
    ops_.attach_workspace(p, bytes, tokens);
    has_forward_ = false;
  }
  std::int64_t reserved_tokens() const { return ops_.reserved_tokens(); }

  // ---- forward / backward -----------------------------------------------------------------------
  // y = MoE(x). x, y: [T, D] contiguous (CUDA: device memory). prev_logits [T, N_E]: the previous MoE
  // layer's logits, for router::GatingResidual (leave empty in the first layer). Saves what backward
  // needs. Returns the aux losses (unscaled by their coefficients).
  AuxLosses forward(MatrixView<const S> x, MatrixView<S> y, MatrixView<const L> prev_logits = {}, Context ctx = {}) {
    const std::int64_t tokens = x.shape[0];
    check_forward_args(cfg_, kResidual, x, y, prev_logits, Ops::kMaxSlots);  // layer/routing_plan.hpp
    if (routing_ == Routing::kExpertChoice && router::routing_slots(cfg_, routing_, tokens) > Ops::kMaxSlots)
      throw ShapeError("x has " + std::to_string(tokens) + " tokens; the experts' tokens under expert choice must be <= " + std::to_string(Ops::kMaxSlots));
    // The sequence scope needs whole sequences in training; an evaluation-mode forward of another length
    // (a prompt, a generated token) takes its aux losses over all its tokens, as one sequence.
    if (seq_len_ > 0 && tokens % seq_len_ != 0 && training_)
      throw ConfigError("sequence_length", std::to_string(seq_len_),
                        "must divide the micro-batch's tokens T = " + std::to_string(tokens) + " (sequences of the balance scope, [B, S] row-major)");
    seq_now_ = seq_len_ > 0 && tokens % seq_len_ == 0 ? seq_len_ : 0;
    ops_.use_sequences(seq_now_ > 0);
    ops_.prepare(tokens);
    if (replay_pending_) {  // router replay: the record set_replay() gave (after prepare: the workspace holds T)
      replay_pending_ = false;
      if (replay_rows_ != tokens)
        throw ShapeError("replay.indices has " + std::to_string(replay_rows_) + " rows for a forward of " + std::to_string(tokens) + " tokens");
      ops_.use_replay(replay_.data(), tokens);
    } else {
      ops_.use_replay(nullptr, tokens);
    }
    has_forward_ = false;
    has_prev_ = prev_logits.data != nullptr;
    tokens_ = tokens;
    ops_.begin(x.data, prev_logits.data, tokens, ctx);
    const std::int64_t shared_flops = ops_.shared_forward(ctx);  // overlaps what follows on CUDA
    ops_.route(has_prev_, ctx);  // a stateful router reads the values set_router_state() gave the ops
    // Expert choice took each expert's capacity of tokens in the route stage: the plan drops nothing.
    const auto caps = routing_ == Routing::kExpertChoice
                          ? balance::Capacities{}
                          : balance::expert_capacities(cfg_.capacity_factor, cfg_.tau, cfg_.top_k, tokens, cfg_.num_ffn_experts,
                                                       cfg_.num_zc_experts());
    ops_.plan(caps, chunks(), my_chunk(), ctx);
    if constexpr (kDistributed) exchange_stats(ctx);  // brings the statistics to the host
    else ops_.sync_stats(ctx);
    read_stats();
    if constexpr (kDistributed) make_plan();
    else throw_if_not_finite();

    const auto tok = ops_.token_rows();
    if constexpr (kDistributed) {
      const auto ex = ops_.expert_rows(ex_.plan().expert_rows());
      ex_.to_experts(tok.x, ex.x, ctx);  // ex.x is kept for backward: the all-to-all outputs
      gemm_flops_ = ops_.ffn_forward(ex, expert_offsets(), ctx);
      ex_.from_experts(ex.y, tok.y, ctx);
      has_activations_ = !recompute_;
      if (recompute_) ops_.drop_activations();  // keep only the dispatched rows
    } else {
      gemm_flops_ = ops_.ffn_forward(tok, expert_offsets(), ctx);
    }
    gemm_flops_ += shared_flops;
    join_shared(ops_.shared_rows(), ctx);
    ops_.combine(y.data, ctx);
    // f_i from the scope's routed (pre-capacity) counts; P_i and z from this micro-batch.
    aux_ = aux_losses<L>(cfg_, balance_, training_, routed_, tokens_, prob_sum_.data(), z_sum_, eta_.data(), f_counts_, f_tokens_);
    if (seq_now_ > 0)  // the sequence scope: f and P per sequence, averaged over the sequences
      aux_.lbl = double(balance::sequence_balancing_loss<L>(seq_counts_.data(), seq_prob_.data(), int(cfg_.num_experts()), int(cfg_.top_k),
                                                            tokens_ / seq_now_, seq_now_, eta_.data()));
    has_forward_ = true;
    forward_trained_ = training_;
    return aux_;
  }

  // Backward of L = sum(y * dy) + aux_scale * (lbl_coef * LBL + zloss_coef * zloss) + sum(logits * dlogits_next).
  // Writes dx [T, D] and, when given, dprev_logits [T, N_E]; adds into the gradients (so micro-batches
  // accumulate). With gradient accumulation over m micro-batches pass aux_scale = 1/m.
  // dlogits_next: the gradient the next layer's gating residual sends back to these logits.
  void backward(MatrixView<const S> dy, MatrixView<S> dx, double aux_scale = 1.0, MatrixView<const L> dlogits_next = {},
                MatrixView<L> dprev_logits = {}, Context ctx = {}) {
    check_backward_args(cfg_, has_forward_, has_prev_, tokens_, dy, dx, dlogits_next, dprev_logits);
    if (!forward_trained_)
      throw std::logic_error("moekit::MoeLayer::backward after an evaluation-mode forward (it keeps no activations): "
                             "set_training(true) before the forward whose backward you need");
    ops_.combine_backward(dy.data, ctx);
    ops_.shared_backward(dy.data, ctx);  // overlaps what follows on CUDA
    const auto tok = ops_.token_rows();
    if constexpr (kDistributed) {
      const auto ex = ops_.expert_rows(ex_.plan().expert_rows());
      ex_.to_experts(tok.dy, ex.dy, ctx);
      if (!has_activations_) {  // recompute from the saved all-to-all outputs: no communication
        ops_.ffn_forward(ex, expert_offsets(), ctx);
        ++recomputations_;
      }
      ops_.ffn_backward(ex, expert_offsets(), ctx);
      has_activations_ = false;  // consumed
      ex_.from_experts(ex.dy, tok.dy, ctx);
    } else {
      ops_.ffn_backward(tok, expert_offsets(), ctx);
    }
    join_shared(ops_.shared_dx(), ctx);
    ops_.token_backward(dy.data, dx.data, ctx);
    // The balance loss's dL/dp (the same for every token of the scope: one row, or one per sequence of
    // the sequence scope) and the z-loss's scale, on the host.
    const L scale = L(aux_scale);
    const int n = int(cfg_.num_experts()), k = int(cfg_.top_k);
    if (seq_now_ > 0) {
      const I64 seqs = tokens_ / seq_now_;
      dprob_.assign(std::size_t(seqs * n), L(0));
      balance::sequence_balancing_dprob_all<L>(seq_counts_.data(), n, k, seqs, seq_now_, eta_.data(), scale * L(cfg_.lbl_coef),
                                               dprob_.data());
    } else {
      dprob_.assign(std::size_t(n), L(0));
      balance::load_balancing_dprob_all<L>(f_counts_.data(), n, k, f_tokens_, tokens_, eta_.data(), scale * L(cfg_.lbl_coef), dprob_.data());
    }
    const L zscale = tokens_ > 0 ? scale * L(cfg_.zloss_coef) * L(2) / L(tokens_) : L(0);
    ops_.router_backward(dprob_.data(), seq_now_, zscale, dlogits_next.data, dprev_logits.data, dx.data, has_prev_, ctx);
  }

  // ---- launch layer (as CUTLASS's device adapters; docs/cuda.md): status codes, nothing thrown -----
  // can_implement: whether a layer of this type can run cfg (its rules, its policies, the backend's
  // limits). initialize: caller-owned workspace (CUDA, one rank: 256-byte aligned device memory of at
  // least workspace_bytes(tokens)), or null to let the layer allocate its own; the host grows its
  // buffers, so it takes null only. run_forward / run_backward: forward / backward on ctx (the stream).
  // A failure returns its Status and leaves the message in last_error(). The convenience layer is the
  // rest of this class: the constructor, reserve(), forward() and backward() allocate and throw.
  static Status can_implement(const MoeConfig& cfg, std::string* why = nullptr) noexcept {
    std::string msg;
    const Status s = status_of([&] {
      validated(cfg);
      Ops::check_config(cfg);
    }, msg);
    if (why) *why = msg;
    return s;
  }
  Status initialize(void* workspace, std::size_t bytes, std::int64_t tokens, Context ctx = {}) noexcept {
    (void)ctx;  // binding waits for the device, then writes the workspace's constants (backend/cuda/layer_ops.cuh)
    if (!workspace) return status_of([&] { reserve(tokens); }, last_error_);
    if constexpr (requires(Ops& o, void* p, std::size_t b, std::int64_t t) { o.attach_workspace(p, b, t); }) {
      std::size_t need = 0;
      if (const Status s = status_of([&] { need = workspace_bytes(tokens); }, last_error_); s != Status::kSuccess) return s;
      if (bytes < need) {
        last_error_ = "initialize: " + std::to_string(bytes) + " workspace bytes given, " + std::to_string(need) +
                      " needed for " + std::to_string(tokens) + " tokens";
        return Status::kWorkspaceTooSmall;
      }
      return status_of([&] { attach_workspace(workspace, bytes, tokens); }, last_error_);
    } else {
      last_error_ = "initialize: this layer allocates its own buffers; pass a null workspace";
      return Status::kInvalidArgument;
    }
  }
  Status run_forward(MatrixView<const S> x, MatrixView<S> y, MatrixView<const L> prev_logits = {}, Context ctx = {},
                     AuxLosses* aux = nullptr) noexcept {
    return status_of([&] {
      const AuxLosses a = forward(x, y, prev_logits, ctx);
      if (aux) *aux = a;
    }, last_error_);
  }
  Status run_backward(MatrixView<const S> dy, MatrixView<S> dx, double aux_scale = 1.0, MatrixView<const L> dlogits_next = {},
                      MatrixView<L> dprev_logits = {}, Context ctx = {}) noexcept {
    return status_of([&] { backward(dy, dx, aux_scale, dlogits_next, dprev_logits, ctx); }, last_error_);
  }
  // The message of the last launch-layer call that failed (empty after one that succeeded).
  const std::string& last_error() const noexcept { return last_error_; }

  // ---- router replay (router/replay.hpp) -------------------------------------------------------------
  // The next forward uses this record instead of its own selection: indices [T, k] int32, the experts of
  // each token's slots (as topk_indices() recorded them), -1 for a slot with no expert. The gates come
  // from the current scores by the router's rule (normalised over the token's replayed slots when it
  // renormalises, then scaled), so they get gradients; capacity, the counts and the aux losses follow
  // as usual. With unchanged weights a forward's own record replays it bit for bit. Checked here
  // (ShapeError: its width, an expert out of range or twice in a row) and its rows against the forward's
  // tokens; token choice only (expert choice: ConfigError). Used once: the forward after consumes it.
  void set_replay(MatrixView<const std::int32_t> indices) {
    if (routing_ == Routing::kExpertChoice)
      throw ConfigError("routing", "\"expert_choice\"", "has no token-choice selection to replay (router replay is token choice's)");
    router::check_routing_record(indices.data, indices.shape[0], indices.shape[1], cfg_.top_k, cfg_.num_experts(), "replay.indices");
    replay_.assign(indices.data, indices.data + indices.shape[0] * indices.shape[1]);
    replay_rows_ = indices.shape[0];
    replay_pending_ = true;
  }
  bool replay_pending() const { return replay_pending_; }

  // ---- router state and the per-step hook ----------------------------------------------------------
  // Once after each optimizer step: resets a GlobalBatch buffer; a stateful router's hook
  // (router::BiasBalanced: b_i += u · sign(mean c − c_i)) gets the step's routed counts summed over its
  // training forwards and over the ranks that hold different tokens (a collective of a distributed
  // layer: every rank calls it, and every rank ends with the same state); a new step's counts begin.
  void end_step(Context ctx = {}) {
    if constexpr (Balance::global) balance_.reset();
    if constexpr (kStateful) {
      std::vector<std::int64_t> c = state_.step_counts();
      if constexpr (kDistributed) X::all_reduce_host(ex_.group(RankGroup::kShards), c.data(), c.size(), ctx);
      Router::end_step(state_.values(), c, cfg_);
      ops_.set_router_state(state_.values());
    }
    state_.new_step();
  }
  // A stateful router's per-expert values (router/state.hpp; empty for a stateless router), for a
  // checkpoint or a test. set_router_state: the same number of values.
  std::span<const L> router_state() const { return state_.values(); }
  void set_router_state(std::span<const L> v) {
    state_.set(v, "router state");
    if constexpr (kStateful) ops_.set_router_state(state_.values());
  }
  // router::BiasBalanced: the per-expert selection biases (state, not a parameter; HF DeepSeek-V3's
  // gate.e_score_correction_bias), and the update this rank's counts since the last end_step() would
  // apply (without the other ranks' counts).
  std::span<const L> expert_bias() const
    requires(kBiased)
  {
    return state_.values();
  }
  void set_expert_bias(std::span<const L> b)
    requires(kBiased)
  {
    state_.set(b, "expert bias");
    ops_.set_router_state(state_.values());
  }
  std::vector<L> expert_bias_update() const
    requires(kBiased)
  {
    return Router::template step_update<L>(state_.step_counts(), cfg_);
  }
  // Routed (pre-capacity) slots per expert over this step's training forwards (a stateful router's c).
  const std::vector<std::int64_t>& step_counts() const { return state_.step_counts(); }

  // ---- distributed strategies -------------------------------------------------------------------
  const ParallelGrid& grid() const
    requires(kDistributed)
  {
    return ex_.grid();
  }
  // Local experts [first_expert(), first_expert() + local_experts()), each a d_expert/tp slice.
  std::int64_t first_expert() const { return ops_.table().first_expert(); }
  std::int64_t local_experts() const { return ops_.table().local_experts(); }
  // Duplicate token dropping over tp (default on; off dispatches every row from every tp rank). Every
  // rank must agree; the workspace is sized for either.
  void set_duplicate_token_dropping(bool on)
    requires(kDistributed)
  {
    ex_.set_duplicate_token_dropping(on);
  }
  bool duplicate_token_dropping() const
    requires(kDistributed)
  {
    return ex_.duplicate_token_dropping();
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
  void sync_gradients(Context ctx = {})
    requires(kDistributed)
  {
    ex_.sync_gradients(ops_.table(), ops_.grad_data(), ctx);
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

  // ---- results of the last forward (host copies) -------------------------------------------------
  std::int64_t num_tokens() const { return tokens_; }
  AuxLosses aux() const { return aux_; }
  // Slots each expert kept after capacity, and the slots routed to it before (the f_i of the LBL).
  VectorView<const std::int32_t> expert_counts() const { return {kept_.data(), {cfg_.num_experts()}}; }
  const std::vector<std::int64_t>& routed_counts() const { return routed_; }
  // Work of the expert GEMMs in the last forward (the shared experts' included): FLOPs issued (2 m n k
  // per GEMM) and the token side's FFN rows. Slots of zero-computation experts never enter them.
  std::int64_t expert_gemm_flops() const { return gemm_flops_; }
  std::int64_t ffn_rows() const { return offsets_.empty() ? 0 : offsets_.back(); }

  // CUDA: the grouped-GEMM strategy in use and how often it fell back; the flat buffers' sizes.
  auto gemm_strategy() const
    requires requires(const Ops& o) { o.gemm_strategy(); }
  {
    return ops_.gemm_strategy();
  }
  int gemm_fallbacks() const
    requires requires(const Ops& o) { o.gemm_fallbacks(); }
  {
    return ops_.gemm_fallbacks();
  }
  // CUDA: how the expert GEMM phases ran, by path and by reason (backend/cuda/grouped_gemm.cuh).
  decltype(auto) gemm_paths() const
    requires requires(const Ops& o) { o.gemm_paths(); }
  {
    return ops_.gemm_paths();
  }
  std::size_t flat_value_bytes() const
    requires requires(const Ops& o) { o.flat_value_bytes(); }
  {
    return ops_.flat_value_bytes();
  }
  // Host: bytes of the buffers the layer holds now (evaluation mode keeps fewer).
  std::size_t buffer_bytes() const
    requires requires(const Ops& o) { o.buffer_bytes(); }
  {
    return ops_.buffer_bytes();
  }
  std::size_t flat_grad_count() const
    requires requires(const Ops& o) { o.flat_grad_count(); }
  {
    return ops_.flat_grad_count();
  }
  // CUDA: device views of the last forward (valid until the next forward).
  const float* logits_device() const
    requires requires(const Ops& o) { o.logits_device(); }
  {
    return ops_.logits_device();
  }
  const float* probs_device() const
    requires requires(const Ops& o) { o.probs_device(); }
  {
    return ops_.probs_device();
  }
  const int* topk_indices_device() const
    requires requires(const Ops& o) { o.topk_indices_device(); }
  {
    return ops_.topk_indices_device();
  }
  const float* topk_gates_device() const
    requires requires(const Ops& o) { o.topk_gates_device(); }
  {
    return ops_.topk_gates_device();
  }
  const int* slot_rows_device() const  // row, or kSlotDropped / kSlotZeroComputation
    requires requires(const Ops& o) { o.slot_rows_device(); }
  {
    return ops_.slot_rows_device();
  }

  // Host: views of the last forward.
  auto logits() const
    requires requires(const Ops& o) { o.logits(); }
  {
    return ops_.logits();
  }
  auto probs() const
    requires requires(const Ops& o) { o.probs(); }
  {
    return ops_.probs();
  }
  auto topk_indices() const
    requires requires(const Ops& o) { o.topk_indices(); }
  {
    return ops_.topk_indices();
  }
  auto topk_gates() const
    requires requires(const Ops& o) { o.topk_gates(); }
  {
    return ops_.topk_gates();
  }
  // Host: the last forward's plan, by slot (token choice: [T, k]; expert choice: by token, a token's
  // slots in expert order), with each slot's expert, gate and row (or kSlotDropped / kSlotZeroComputation).
  auto routing_plan() const
    requires requires(const Ops& o) { o.routing_plan(); }
  {
    return ops_.routing_plan();
  }
  // CUDA: the same plan in device memory (valid until the next forward).
  auto routing_plan_device() const
    requires requires(const Ops& o) { o.routing_plan_device(); }
  {
    return ops_.routing_plan_device();
  }
  // True for (token, pick) pairs that were kept (not dropped by capacity).
  bool slot_kept(std::int64_t t, std::int64_t j) const
    requires requires(const Ops& o) { o.slot_kept(t, j); }
  {
    return ops_.slot_kept(t, j);
  }

 private:
  using I64 = std::int64_t;

  static MoeConfig validated(const MoeConfig& cfg) {
    detail::validate_layer_config<Router, Experts>(cfg);
    check_scope(cfg);
    return cfg;
  }
  // The sequence scope is a form of the micro-batch scope, and a token-choice one.
  static void check_scope(const MoeConfig& cfg) {
    const bool per_sequence = read_options<balance::ScopeOptions>(cfg).per_sequence() > 0;
    if (Balance::global && per_sequence)
      throw ConfigError("balance", "\"sequence\"", "is a form of the micro-batch scope: a balance::GlobalBatch layer takes f from the global batch");
    if (per_sequence && router::routing_of(Router(cfg)) == Routing::kExpertChoice)
      throw ConfigError("balance", "\"sequence\"", "needs token-choice routing (\"routing\": \"expert_choice\" balances by construction)");
  }
  void init() {
    check_scope(cfg_);  // (the distributed constructor's agreed config skips validated())
    seq_len_ = read_options<balance::ScopeOptions>(cfg_).per_sequence();
    routing_ = router::routing_of(Router(cfg_));
    ops_.set_sequence_length(seq_len_);
    eta_ = balance_eta<L>(cfg_);
    state_.resize(std::size_t(cfg_.num_experts()), kStateful);
    if constexpr (kStateful) ops_.set_router_state(state_.values());
  }
  int chunks() const {
    if constexpr (kDistributed) return ex_.chunks();
    else return 1;
  }
  int my_chunk() const {
    if constexpr (kDistributed) return ex_.my_chunk();
    else return 0;
  }
  // The local experts' ranges of rows on the expert side: the token side's for parallel::None, the
  // dispatch plan's expert-major ones otherwise.
  std::span<const I64> expert_offsets() const {
    if constexpr (kDistributed) return ex_.plan().expert_offsets();
    else return offsets_;
  }

  // Waits for the shared experts' stream (CUDA) and sums their partial rows [T, D] (output or input
  // gradient) over the tp group: each tp rank holds a slice of their width.
  void join_shared(S* rows, Context ctx) {
    if (!ops_.has_shared()) return;
    ops_.shared_join(ctx);
    if constexpr (kDistributed)
      if (cfg_.tp > 1) X::all_reduce(ex_.group(RankGroup::kTp), rows, std::size_t(tokens_ * cfg_.d_model), ctx);
  }

  // The statistics block on the host (after the synchronisation).
  void read_stats() {
    const std::int32_t* ints = ops_.stats_ints_host();
    const L* floats = ops_.stats_floats_host();
    const I64 n = cfg_.num_experts(), no = I64(chunks()) * cfg_.num_ffn_experts + 1;
    offsets_.assign(ints + layout_.offsets, ints + layout_.offsets + no);
    kept_.assign(ints + layout_.kept, ints + layout_.kept + n);
    routed_.assign(ints + layout_.routed, ints + layout_.routed + n);
    if (training_) state_.count(routed_);
    bad_token_ = ints[layout_.bad];
    prob_sum_.assign(floats + layout_.prob_sum, floats + layout_.prob_sum + n);
    z_sum_ = floats[layout_.z_sum];
    if (seq_now_ > 0) {  // the sequence scope's [B, N] counts and probability sums
      const auto st = ops_.sequence_stats_host();
      const I64 m = tokens_ / seq_now_ * n;
      seq_counts_.assign(st.counts, st.counts + m);
      seq_prob_.assign(st.prob_sums, st.prob_sums + m);
    }
  }
  void throw_if_not_finite() const {
    if (bad_token_ != kNoBadToken)
      throw NumericError("router logits of token " + std::to_string(bad_token_) +
                         " are not finite (check x, gate.weight and prev_logits)");
  }

  // Distributed only (layer/pipeline_distributed.hpp): the statistics exchanged between the ranks
  // before they reach the host, and the dispatch plan made from them.
  void exchange_stats(Context ctx);
  void make_plan();

  MoeConfig cfg_;
  [[no_unique_address]] std::conditional_t<kDistributed, Exchange, NoExchange> ex_;
  StatsLayout layout_;
  Ops ops_;
  Balance balance_;
  router::RouterState<L> state_;  // a stateful router's values (BiasBalanced: b [N_E]), every router's step counts
  std::vector<L> eta_, prob_sum_, dprob_, seq_prob_;
  std::vector<std::int64_t> seq_counts_;
  std::int64_t seq_len_ = 0;  // the sequence scope's S (balance::ScopeOptions), or 0
  std::int64_t seq_now_ = 0;  // the last forward's: S, or 0 (an evaluation forward of a length S does not divide)
  Routing routing_ = Routing::kTokenChoice;  // the router's (router/expert_choice.hpp)
  std::vector<std::int32_t> replay_;  // router replay: the record the next forward uses
  std::int64_t replay_rows_ = 0;
  bool replay_pending_ = false;
  L z_sum_ = L(0);
  std::int64_t tokens_ = 0, f_tokens_ = 0, gemm_flops_ = 0, recomputations_ = 0;
  int bad_token_ = kNoBadToken;
  bool has_forward_ = false, has_prev_ = false, training_ = true, recompute_ = false, has_activations_ = false;
  bool forward_trained_ = true;  // the last forward ran in training mode (backward may follow)
  AuxLosses aux_;
  std::string last_error_;  // of the launch layer
  std::vector<std::int32_t> kept_;
  std::vector<std::int64_t> offsets_, routed_, f_counts_;
};

}  // namespace moekit

#include "moekit/layer/pipeline_distributed.hpp"  // the distributed stages' bodies
