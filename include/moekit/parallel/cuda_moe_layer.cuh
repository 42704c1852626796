#pragma once
// MoeLayer<backend::Cuda<V>, ..., P> for P = parallel::Data, Expert, Tensor or Hybrid over comm::Nccl
// (one GPU per rank): the same algorithm as the host one (parallel/host_moe_layer.hpp, which explains
// the rank grid, duplicate token dropping, the all-to-all and tp collectives and the gradient
// averaging), with device buffers and NCCL on the caller's stream. The bookkeeping is the shared
// DispatchPlan; the permutation sorts rows chunk-major on the device (permute.cuh, chunks = tp).
//
// Host synchronisations: still one per forward. Before it, on the stream: the per-expert counts of this
// rank's chunk (and its expert-side capacity) are all-gathered over the tp x ep ranks of its dp index,
// (GlobalBatch) the routed counts all-reduced over the shards, and a non-finite-logits flag summed over
// the world, into the stats block that the forward copies to the host anyway; so a rank with bad input
// or too small a workspace makes all the ranks it talks to throw together.
// Duplicate token dropping is fixed at construction (it decides the permutation's chunks).
// Workspace: the layer's own plus the expert side's, sized for ep·T·k rows (every row of every source
// could come to this rank's experts).
//
// STATUS: compiled, never run: no GPU (let alone several) has been lent to this project yet.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "moekit/backend/cuda/moe_layer.cuh"
#include "moekit/parallel/comm/nccl.cuh"
#include "moekit/parallel/dispatch_plan.hpp"
#include "moekit/parallel/policy.hpp"
#include "moekit/parallel/sharding.hpp"

namespace moekit {

namespace backend::cuda {
// counts[e] = offsets[c·F + e + 1] - offsets[c·F + e]: the rows chunk c sends to each FFN expert.
template <class I>
MOEKIT_KERNEL void chunk_counts_kernel(const int* offsets, int chunk, int ffn, I* counts) {
  const int e = int(blockIdx.x) * int(blockDim.x) + int(threadIdx.x);
  if (e < ffn) counts[e] = I(offsets[chunk * ffn + e + 1] - offsets[chunk * ffn + e]);
}
// *v = value (the token count next to the routed counts, the capacity next to the counts).
template <class I>
MOEKIT_KERNEL void set_value_kernel(I* v, I value) {
  *v = value;
}
// *flag = 1 when this rank saw a non-finite logit (route_tokens' bad token), else 0.
template <class I>
MOEKIT_KERNEL void bad_flag_kernel(const int* bad_token, I* flag) {
  *flag = *bad_token != kNoBadToken ? 1 : 0;
}
}  // namespace backend::cuda

template <class V, class Router, class Experts, class Balance, parallel::DistributedPolicy P>
class MoeLayer<backend::Cuda<V>, Router, Experts, Balance, P>
    : public MoeLayer<backend::Cuda<V>, Router, Experts, Balance, parallel::None> {
  using Base = MoeLayer<backend::Cuda<V>, Router, Experts, Balance, parallel::None>;
  using S = typename Base::storage_type;
  using Act = typename Experts::activation;
  static constexpr bool kGated = Act::gated;
  using I64 = std::int64_t;

 public:
  MoeLayer(const MoeConfig& cfg, comm::Nccl& world, bool duplicate_token_dropping = true,
           backend::cuda::GemmStrategy gemm = backend::cuda::GemmStrategy::kAuto)
      : Base(detail::agreed_config<Router, Experts, P>(
                 cfg, world.size(), world.rank(),
                 [&](const std::int64_t* mine, std::size_t n, std::int64_t* all) { gather_on_device(world, mine, n, all); },
                 {{"duplicate_token_dropping", duplicate_token_dropping}, {"balance (GlobalBatch)", Balance::global}}),
             gemm, shard_of(cfg)),
        dtd_(duplicate_token_dropping) {
    const int r = world.rank();
    g_.tp = int(cfg.tp), g_.ep = int(cfg.ep), g_.dp = int(cfg.dp);
    g_.t = r % g_.tp, g_.e = (r / g_.tp) % g_.ep, g_.d = r / (g_.tp * g_.ep);
    auto split = [&](int color, int key) { return std::make_unique<comm::Nccl>(world.split(color, key)); };
    tp_ = split(g_.e + g_.ep * g_.d, g_.t);  // every rank splits in the same order
    ep_ = split(g_.t + g_.tp * g_.d, g_.e);
    dp_ = split(g_.t + g_.tp * g_.e, g_.d);
    dense_ = split(g_.t, g_.shard());
    tpep_ = split(g_.d, g_.t + g_.tp * g_.e);
    world_ = split(0, r);
    const I64 nf = this->cfg_.num_ffn_experts, n = this->cfg_.num_experts();
    el_ = this->held_, fl_ = this->f_, wfl_ = this->wf_;
    this->chunks_ = dtd_ ? g_.tp : 1;
    // Stats extras: per rank of the tp x ep group its chunk's counts [N_FFN] and its expert-side capacity
    // [1]; the routed counts and tokens [N_E + 1] (summed over the shards for GlobalBatch); the number of
    // ranks whose logits were not finite [1].
    this->extra_ints_ = std::size_t(g_.tp * g_.ep * (nf + 1) + n + 1 + 1);
    this->host_stats_.resize(this->stats_ints() + this->stats_floats());
    if constexpr (Balance::global) {  // the counts were all-reduced on the device before the sync
      const std::int32_t* global = this->extra_host() + g_.tp * g_.ep * (nf + 1);  // pinned: never moves
      this->balance_.set_all_reduce([global](std::int64_t* data, std::size_t k) { std::copy_n(global, k, data); });
    }
  }
  MoeLayer(const MoeLayer&) = delete;
  MoeLayer& operator=(const MoeLayer&) = delete;
  MoeLayer(MoeLayer&&) = delete;  // the GlobalBatch hook and the communicators point into this object

  const ParallelGrid& grid() const { return g_; }
  // Full-size weights do not fit a shard: load_full_params / init_params / download_grads instead; the
  // expert side's buffers come with reserve() only.
  void upload_params(const MoeWeights<float>&) = delete;
  void download_params(MoeWeights<float>&) const = delete;
  void attach_workspace(void*, std::size_t, I64) = delete;
  // This rank's parameters (expert names are global; their shapes are the tp slices).
  std::vector<DeviceParameter> parameters(const std::string& prefix = "") {
    std::vector<DeviceParameter> out = this->dense_parameters(prefix);
    const I64 d = this->cfg_.d_model;
    const cudaDataType_t st = backend::cuda::data_type<S>();
    for (I64 le = 0; le < el_; ++le) {
      const std::string p = prefix + "experts." + std::to_string(first_expert() + le) + ".";
      out.push_back({p + "w1.weight", this->w13_.data() + le * wfl_ * d, this->g_w13_.data() + le * wfl_ * d, {fl_, d}, st});
      out.push_back({p + "w2.weight", this->w2_.data() + le * d * fl_, this->g_w2_.data() + le * d * fl_, {d, fl_}, st});
      if constexpr (kGated)
        out.push_back({p + "w3.weight", this->w13_.data() + (le * wfl_ + fl_) * d, this->g_w13_.data() + (le * wfl_ + fl_) * d, {fl_, d}, st});
    }
    return out;
  }
  I64 first_expert() const { return I64(g_.e) * el_; }
  I64 local_experts() const { return el_; }
  void set_activation_checkpointing(bool on) { recompute_ = on; }
  I64 recomputations() const { return recomputations_; }

  // The full model's fp32 weights (as a single-rank layer holds them) -> this rank's shard on the device.
  void load_full_params(const MoeWeights<float>& full) {
    this->check_sizes(full, "load_full_params");
    MoeWeights<float> local;
    slice_moe_weights(full, local, this->cfg_, g_);
    namespace mc = backend::cuda;
    mc::upload_as(local.router.data(), local.router.size(), this->router_.data());
    std::vector<float> w13(std::size_t(el_ * wfl_ * this->cfg_.d_model));
    interleave(local.w1, local.w3, w13);
    mc::upload_as(w13.data(), w13.size(), this->w13_.data());
    mc::upload_as(local.w2.data(), local.w2.size(), this->w2_.data());
    mc::upload_as(local.const_wc.data(), local.const_wc.size(), this->wc_.data());
    mc::upload_as(local.const_v.data(), local.const_v.size(), this->v_.data());
    if constexpr (Router::residual) mc::upload_as(local.gate_residual.data(), local.gate_residual.size(), this->gate_res_.data());
  }
  void init_params(std::uint64_t seed) {
    MoeWeights<float> full;
    full.resize(this->cfg_, kGated, Router::residual);
    init_moe_weights(full, this->cfg_, seed);
    load_full_params(full);
  }
  // This rank's fp32 gradients in the shard layout of slice_moe_weights (synchronises the device).
  void download_grads(MoeWeights<float>& g) const {
    namespace mc = backend::cuda;
    MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
    const I64 d = this->cfg_.d_model;
    g.router.resize(this->g_router_.size()), g.const_wc.resize(this->g_wc_.size()), g.const_v.resize(this->g_v_.size());
    g.gate_residual.resize(this->g_gate_res_.size());
    mc::download_as(this->g_router_.data(), g.router.size(), g.router.data());
    mc::download_as(this->g_wc_.data(), g.const_wc.size(), g.const_wc.data());
    mc::download_as(this->g_v_.data(), g.const_v.size(), g.const_v.data());
    mc::download_as(this->g_gate_res_.data(), g.gate_residual.size(), g.gate_residual.data());
    std::vector<float> w13(std::size_t(el_ * wfl_ * d));
    mc::download_as(this->g_w13_.data(), w13.size(), w13.data());
    g.w1.assign(std::size_t(el_ * fl_ * d), 0.f), g.w3.assign(kGated ? std::size_t(el_ * fl_ * d) : 0, 0.f);
    for (I64 le = 0; le < el_; ++le) {
      std::copy_n(w13.begin() + le * wfl_ * d, fl_ * d, g.w1.begin() + le * fl_ * d);
      if constexpr (kGated) std::copy_n(w13.begin() + (le * wfl_ + fl_) * d, fl_ * d, g.w3.begin() + le * fl_ * d);
    }
    g.w2.resize(this->g_w2_.size());
    mc::download_as(this->g_w2_.data(), g.w2.size(), g.w2.data());
  }

  // The base workspace and the expert side's (ep·T·k rows: every row of every source could come here).
  // Every rank must reserve the same number of tokens.
  void reserve(I64 tokens) {
    Base::reserve(tokens);
    tokens = this->reserved_tokens();
    const std::size_t rows = std::size_t(g_.ep * tokens * this->cfg_.top_k), d = std::size_t(this->cfg_.d_model);
    if (rows > std::size_t(INT32_MAX)) throw ShapeError("ep * tokens * top_k = " + std::to_string(rows) + " exceeds 2^31 - 1");
    for (auto* a : {&xe_, &ye_, &dye_, &gathered_, &recv_}) a->resize(rows * d);
    h13e_.resize(rows * std::size_t(wfl_)), ae_.resize(rows * std::size_t(fl_));
    mine_.resize(std::size_t(tokens * this->cfg_.top_k) * d);
    counts_dev_.resize(std::size_t(this->cfg_.num_ffn_experts + 1));
    capacity_rows_ = I64(rows);
  }

  AuxLosses forward(MatrixView<const S> x, MatrixView<S> y, MatrixView<const float> prev_logits = {}, cudaStream_t stream = nullptr) {
    namespace mc = backend::cuda;
    this->route_and_permute(x, y, prev_logits, stream);
    const int nf = int(this->cfg_.num_ffn_experts), n = int(this->cfg_.num_experts());
    const int chunk = dtd_ ? g_.t : 0;
    mc::chunk_counts_kernel<int><<<unsigned((nf + 127) / 128), 128, 0, stream>>>(this->offsets_dev(), chunk, nf, counts_dev_.data());
    MOEKIT_CUDA_CHECK(cudaGetLastError());
    mc::set_value_kernel<int><<<1, 1, 0, stream>>>(counts_dev_.data() + nf, int(capacity_rows_));
    MOEKIT_CUDA_CHECK(cudaGetLastError());
    tpep_->all_gather(counts_dev_.data(), std::size_t(nf + 1), this->extra_dev(), stream);
    int* global = this->extra_dev() + g_.tp * g_.ep * (nf + 1);
    MOEKIT_CUDA_CHECK(cudaMemcpyAsync(global, this->routed_dev(), sizeof(int) * std::size_t(n), cudaMemcpyDeviceToDevice, stream));
    mc::set_value_kernel<int><<<1, 1, 0, stream>>>(global + n, int(this->tokens_));
    MOEKIT_CUDA_CHECK(cudaGetLastError());
    if constexpr (Balance::global) dense_->all_reduce_sum(global, std::size_t(n + 1), stream);
    // Ranks with non-finite logits, over the world: every rank then throws together instead of some
    // leaving the others in a collective.
    mc::bad_flag_kernel<int><<<1, 1, 0, stream>>>(this->bad_dev(), global + n + 1);
    MOEKIT_CUDA_CHECK(cudaGetLastError());
    world_->all_reduce_sum(global + n + 1, 1, stream);
    world_->wait(stream);  // NCCL errors and timeouts surface here, not as a hang in the sync
    this->sync_stats(stream, /*check_finite=*/false);
    if (this->extra_host()[g_.tp * g_.ep * (nf + 1) + n + 1] > 0) {
      this->throw_if_not_finite();
      throw NumericError("router logits are not finite on another rank (see its error); every rank stops");
    }
    make_plan();
    to_experts(this->b_.xp, xe_.data(), stream);
    this->gemm_flops_ = this->experts_forward(view(), xe_.data(), h13e_.data(), ae_.data(), ye_.data(), exp_off_, stream);
    from_experts(ye_.data(), this->b_.yp, stream);
    has_activations_ = !recompute_;
    return this->combine_and_aux(y.data, stream);
  }

  void backward(MatrixView<const S> dy, MatrixView<S> dx, double aux_scale = 1.0, MatrixView<const float> dlogits_next = {},
                MatrixView<float> dprev_logits = {}, cudaStream_t stream = nullptr) {
    this->combine_backward_rows(dy, dx, dlogits_next, dprev_logits, stream);
    to_experts(this->b_.dyp, dye_.data(), stream);
    if (!has_activations_) {  // recompute from the saved all-to-all outputs (xe_): no communication
      this->experts_forward(view(), xe_.data(), h13e_.data(), ae_.data(), ye_.data(), exp_off_, stream);
      ++recomputations_;
    }
    this->experts_backward(view(), xe_.data(), h13e_.data(), ae_.data(), dye_.data(), exp_off_, stream);
    has_activations_ = false;
    from_experts(dye_.data(), this->b_.dyp, stream);
    this->finish_backward(dy.data, dx.data, aux_scale, dlogits_next.data, dprev_logits.data, stream);
  }

  // Once per optimizer step: expert shards summed over dp; dense weights summed over the whole world
  // (tp replicas hold equal gradients; one communicator gives every replica the same bits); both divided
  // to the mean over the ep·dp shards (as the host layer).
  void sync_gradients(cudaStream_t stream = nullptr) {
    cublasHandle_t h = this->gemm_->handle(stream);
    auto reduce = [&](comm::Nccl& c, backend::cuda::DeviceArray<float>& v, float scale) {
      if (v.size() == 0) return;
      c.all_reduce_sum(v.data(), v.size(), stream);
      MOEKIT_CUBLAS_CHECK(cublasSscal(h, int(v.size()), &scale, v.data(), 1));
    };
    const float expert = 1.f / float(g_.shards()), dense = 1.f / float(g_.shards() * g_.tp);
    reduce(*dp_, this->g_w13_, expert), reduce(*dp_, this->g_w2_, expert);
    reduce(*world_, this->g_router_, dense), reduce(*world_, this->g_wc_, dense), reduce(*world_, this->g_v_, dense);
    reduce(*world_, this->g_gate_res_, dense);
  }

  comm::ByteCounters comm_counters() const {
    comm::ByteCounters s;
    for (const comm::Nccl* c : {tp_.get(), ep_.get(), dp_.get(), dense_.get(), tpep_.get(), world_.get()})
      for (std::size_t i = 0; i < s.bytes.size(); ++i) s.bytes[i] += c->counters().bytes[i], s.calls[i] += c->counters().calls[i];
    return s;
  }
  const comm::ByteCounters& ep_counters() const { return ep_->counters(); }

 private:
  static typename Base::ExpertShard shard_of(const MoeConfig& c) {  // before validation: no division by 0
    return {c.ep > 0 ? c.num_ffn_experts / c.ep : c.num_ffn_experts, c.tp > 0 ? c.d_expert / c.tp : c.d_expert};
  }
  static void gather_on_device(comm::Nccl& world, const std::int64_t* mine, std::size_t n, std::int64_t* all) {
    backend::cuda::DeviceArray<std::int64_t> a(n), b(n * std::size_t(world.size()));
    MOEKIT_CUDA_CHECK(cudaMemcpy(a.data(), mine, n * sizeof(std::int64_t), cudaMemcpyHostToDevice));
    world.all_gather(a.data(), n, b.data());
    world.wait();
    MOEKIT_CUDA_CHECK(cudaMemcpy(all, b.data(), b.size() * sizeof(std::int64_t), cudaMemcpyDeviceToHost));
  }

  typename Base::ExpertView view() {
    return {this->w13_.data(), this->w2_.data(), this->g_w13_.data(), this->g_w2_.data(), fl_, wfl_};
  }

  // The plan from the synchronised stats: offsets (chunk-major) and the all-gathered counts.
  void make_plan() {
    const I64 nf = this->cfg_.num_ffn_experts, nc = this->chunks_, group = g_.tp * g_.ep;
    plan_.reset(g_, dtd_, nf, this->cfg_.d_model);
    std::vector<I64> cnt(std::size_t(nc * nf));
    for (I64 i = 0; i < nc * nf; ++i) cnt[i] = this->offsets_[i + 1] - this->offsets_[i];
    plan_.set_token_counts(cnt);
    const std::int32_t* gathered = this->extra_host();  // per rank g: counts [N_FFN], capacity [1]
    std::vector<I64> all(std::size_t(group * nf));
    for (I64 g = 0; g < group; ++g) std::copy_n(gathered + g * (nf + 1), nf, all.begin() + g * nf);
    // Every rank of the tp x ep group checks every rank's expert-side rows against its capacity, so they
    // all throw together (never one rank alone, which would leave the others in a collective).
    for (I64 g = 0; g < group; ++g) {
      const I64 t = g % g_.tp, e = g / g_.tp;
      I64 rows = 0;
      for (I64 src = 0; src < group; ++src)
        if (dtd_ || src % g_.tp == t)
          for (I64 le = 0; le < el_; ++le) rows += all[std::size_t(src * nf + e * el_ + le)];
      if (rows > gathered[g * (nf + 1) + nf])
        throw ShapeError("rank " + std::to_string(g) + " of the tp x ep group would receive " + std::to_string(rows) +
                         " expert rows but reserved " + std::to_string(gathered[g * (nf + 1) + nf]) +
                         " (every rank must reserve() the largest token count any rank uses)");
    }
    plan_.set_all_counts(all);
    exp_off_.assign(plan_.expert_offsets().begin(), plan_.expert_offsets().end());
  }

  void permute_blocks(const S* src, S* dst, bool to_expert_major, cudaStream_t stream) const {
    const I64 d = this->cfg_.d_model;
    plan_.for_each_block(to_expert_major, [&](I64 from, I64 to, I64 rows) {
      MOEKIT_CUDA_CHECK(cudaMemcpyAsync(dst + to * d, src + from * d, std::size_t(rows * d) * sizeof(S), cudaMemcpyDeviceToDevice, stream));
    });
  }

  // My chunk's rows of `rows` -> expert-major rows `out` at the expert side.
  void to_experts(const S* rows, S* out, cudaStream_t stream) {
    const I64 d = this->cfg_.d_model;
    ep_->all_to_all_v(rows + plan_.chunk_row(plan_.my_chunk()) * d, plan_.send().data(), recv_.data(), plan_.recv().data(), stream);
    const S* gathered = recv_.data();
    if (dtd_ && g_.tp > 1) {
      tp_->all_gather_v(recv_.data(), plan_.gather().data(), gathered_.data(), stream);
      gathered = gathered_.data();
    }
    permute_blocks(gathered, out, true, stream);
  }

  // Expert-major partial rows -> summed over tp, my chunk's rows of `rows`; with DTD all chunks' rows.
  void from_experts(const S* in, S* rows, cudaStream_t stream) {
    const I64 d = this->cfg_.d_model;
    permute_blocks(in, gathered_.data(), false, stream);
    const S* back = gathered_.data();
    if (g_.tp > 1 && dtd_) {
      tp_->reduce_scatter_v(gathered_.data(), plan_.gather().data(), recv_.data(), stream);
      back = recv_.data();
    } else if (g_.tp > 1) {
      tp_->all_reduce_sum(gathered_.data(), std::size_t(plan_.expert_rows() * d), stream);
    }
    S* mine = rows + plan_.chunk_row(plan_.my_chunk()) * d;
    ep_->all_to_all_v(back, plan_.recv().data(), mine, plan_.send().data(), stream);
    if (dtd_ && g_.tp > 1) {  // all-gather's send may not alias its receive buffer
      MOEKIT_CUDA_CHECK(cudaMemcpyAsync(mine_.data(), mine, std::size_t(plan_.my_rows() * d) * sizeof(S), cudaMemcpyDeviceToDevice, stream));
      tp_->all_gather_v(mine_.data(), plan_.chunk_elements().data(), rows, stream);
    }
  }

  // [el, fl, d] w1 and w3 -> [el, wfl, d] with each expert's w1 slice then w3 slice.
  void interleave(const std::vector<float>& w1, const std::vector<float>& w3, std::vector<float>& w13) const {
    const std::size_t blk = std::size_t(fl_ * this->cfg_.d_model);
    for (std::size_t le = 0; le < std::size_t(el_); ++le) {
      std::copy_n(w1.begin() + le * blk, blk, w13.begin() + le * std::size_t(wfl_ / fl_) * blk);
      if constexpr (kGated) std::copy_n(w3.begin() + le * blk, blk, w13.begin() + (2 * le + 1) * blk);
    }
  }

  ParallelGrid g_;
  DispatchPlan plan_;
  std::unique_ptr<comm::Nccl> tp_, ep_, dp_, dense_, tpep_, world_;
  bool dtd_ = true, recompute_ = false, has_activations_ = false;
  I64 el_ = 0, fl_ = 0, wfl_ = 0, recomputations_ = 0, capacity_rows_ = 0;
  std::vector<std::int32_t> exp_off_;
  backend::cuda::DeviceArray<S> xe_, ye_, dye_, gathered_, recv_, h13e_, ae_, mine_;
  backend::cuda::DeviceArray<int> counts_dev_;
};

}  // namespace moekit
