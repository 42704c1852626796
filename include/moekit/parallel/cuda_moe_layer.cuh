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
#include "moekit/parallel/grid.hpp"
#include "moekit/parallel/policy.hpp"
#include "moekit/parallel/sharding.hpp"

namespace moekit {

namespace backend::cuda {
inline namespace MOEKIT_CUDA_ABI {
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
}  // inline namespace MOEKIT_CUDA_ABI
}  // namespace backend::cuda

template <class V, class Router, class Experts, class Balance, parallel::DistributedPolicy P>
class MoeLayer<backend::Cuda<V, backend::cuda::Abi>, Router, Experts, Balance, P>
    : public MoeLayer<backend::Cuda<V, backend::cuda::Abi>, Router, Experts, Balance, parallel::None> {
  using Base = MoeLayer<backend::Cuda<V, backend::cuda::Abi>, Router, Experts, Balance, parallel::None>;
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
             gemm, grid_of(cfg, world.rank())),
        dtd_(duplicate_token_dropping) {
    g_ = ParallelGrid::of(cfg.tp, cfg.ep, cfg.dp, world.rank());
    groups_ = RankGroups<comm::Nccl>(world, g_, [](comm::Nccl& w, int color, int key) { return std::make_unique<comm::Nccl>(w.split(color, key)); });
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
  // The expert side's buffers come with reserve() only (no caller-owned workspace here).
  void attach_workspace(void*, std::size_t, I64) = delete;
  I64 first_expert() const { return this->table_.first_expert(); }
  I64 local_experts() const { return el_; }
  void set_activation_checkpointing(bool on) { recompute_ = on; }
  I64 recomputations() const { return recomputations_; }

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
    groups_[RankGroup::kTpEp].all_gather(counts_dev_.data(), std::size_t(nf + 1), this->extra_dev(), stream);
    int* global = this->extra_dev() + g_.tp * g_.ep * (nf + 1);
    MOEKIT_CUDA_CHECK(cudaMemcpyAsync(global, this->routed_dev(), sizeof(int) * std::size_t(n), cudaMemcpyDeviceToDevice, stream));
    mc::set_value_kernel<int><<<1, 1, 0, stream>>>(global + n, int(this->tokens_));
    MOEKIT_CUDA_CHECK(cudaGetLastError());
    if constexpr (Balance::global) groups_[RankGroup::kShards].all_reduce_sum(global, std::size_t(n + 1), stream);
    // Ranks with non-finite logits, over the world: every rank then throws together instead of some
    // leaving the others in a collective.
    mc::bad_flag_kernel<int><<<1, 1, 0, stream>>>(this->bad_dev(), global + n + 1);
    MOEKIT_CUDA_CHECK(cudaGetLastError());
    groups_[RankGroup::kWorld].all_reduce_sum(global + n + 1, 1, stream);
    groups_[RankGroup::kWorld].wait(stream);  // NCCL errors and timeouts surface here, not as a hang in the sync
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
    auto reduce = [&](comm::Nccl& c, float* v, I64 n, float scale) {
      if (n == 0) return;
      c.all_reduce_sum(v, std::size_t(n), stream);
      MOEKIT_CUBLAS_CHECK(cublasSscal(h, int(n), &scale, v, 1));
    };
    // The flat layout keeps the expert slices in [w13, const_wc) and the replicated tensors around it.
    const auto& o = this->table_.offsets();
    float* g = this->grads_.data();
    const float expert = 1.f / float(g_.shards()), dense = 1.f / float(g_.shards() * g_.tp);
    reduce(groups_[RankGroup::kDp], g + o.w13, o.const_wc - o.w13, expert);
    reduce(groups_[RankGroup::kWorld], g + o.router, o.w13 - o.router, dense);
    reduce(groups_[RankGroup::kWorld], g + o.const_wc, o.end - o.const_wc, dense);
  }

  comm::ByteCounters comm_counters() const {
    comm::ByteCounters s;
    groups_.for_each([&](const comm::Nccl& c) {
      for (std::size_t i = 0; i < s.bytes.size(); ++i) s.bytes[i] += c.counters().bytes[i], s.calls[i] += c.counters().calls[i];
    });
    return s;
  }
  const comm::ByteCounters& ep_counters() const { return groups_[RankGroup::kEp].counters(); }

 private:
  static ParallelGrid grid_of(const MoeConfig& c, int rank) {  // before validation: no division by 0
    return ParallelGrid::of(std::max<I64>(c.tp, 1), std::max<I64>(c.ep, 1), std::max<I64>(c.dp, 1), rank);
  }
  static void gather_on_device(comm::Nccl& world, const std::int64_t* mine, std::size_t n, std::int64_t* all) {
    backend::cuda::DeviceArray<std::int64_t> a(n), b(n * std::size_t(world.size()));
    MOEKIT_CUDA_CHECK(cudaMemcpy(a.data(), mine, n * sizeof(std::int64_t), cudaMemcpyHostToDevice));
    world.all_gather(a.data(), n, b.data());
    world.wait();
    MOEKIT_CUDA_CHECK(cudaMemcpy(all, b.data(), b.size() * sizeof(std::int64_t), cudaMemcpyDeviceToHost));
  }

  typename Base::ExpertView view() {
    return this->expert_view();
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
    groups_[RankGroup::kEp].all_to_all_v(rows + plan_.chunk_row(plan_.my_chunk()) * d, plan_.send().data(), recv_.data(), plan_.recv().data(), stream);
    const S* gathered = recv_.data();
    if (dtd_ && g_.tp > 1) {
      groups_[RankGroup::kTp].all_gather_v(recv_.data(), plan_.gather().data(), gathered_.data(), stream);
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
      groups_[RankGroup::kTp].reduce_scatter_v(gathered_.data(), plan_.gather().data(), recv_.data(), stream);
      back = recv_.data();
    } else if (g_.tp > 1) {
      groups_[RankGroup::kTp].all_reduce_sum(gathered_.data(), std::size_t(plan_.expert_rows() * d), stream);
    }
    S* mine = rows + plan_.chunk_row(plan_.my_chunk()) * d;
    groups_[RankGroup::kEp].all_to_all_v(back, plan_.recv().data(), mine, plan_.send().data(), stream);
    if (dtd_ && g_.tp > 1) {  // all-gather's send may not alias its receive buffer
      MOEKIT_CUDA_CHECK(cudaMemcpyAsync(mine_.data(), mine, std::size_t(plan_.my_rows() * d) * sizeof(S), cudaMemcpyDeviceToDevice, stream));
      groups_[RankGroup::kTp].all_gather_v(mine_.data(), plan_.chunk_elements().data(), rows, stream);
    }
  }

  ParallelGrid g_;
  DispatchPlan plan_;
  RankGroups<comm::Nccl> groups_;
  bool dtd_ = true, recompute_ = false, has_activations_ = false;
  I64 el_ = 0, fl_ = 0, wfl_ = 0, recomputations_ = 0, capacity_rows_ = 0;
  std::vector<std::int32_t> exp_off_;
  backend::cuda::DeviceArray<S> xe_, ye_, dye_, gathered_, recv_, h13e_, ae_, mine_;
  backend::cuda::DeviceArray<int> counts_dev_;
};

}  // namespace moekit
