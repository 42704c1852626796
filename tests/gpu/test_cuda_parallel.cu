// The distributed CUDA layer (parallel/cuda_moe_layer.cuh) on one GPU over a single-rank comm::Nccl:
// parallel::Hybrid with tp = ep = dp = 1 must compute what MoeLayer<backend::Cuda<float>> computes
// (fp32, 1e-5 relative), through its whole dispatch path (counts all-gather, all-to-all, block
// permutation, expert GEMMs on its shard, sync_gradients), with and without activation checkpointing.
// Several ranks need several GPUs: tests/mpi covers the multi-rank algorithm on the host backend.
#if defined(MOEKIT_HAS_NCCL)
#include <doctest/doctest.h>

#include <cmath>
#include <moekit/parallel/cuda_moe_layer.cuh>
#include <random>
#include <vector>

#include "../common/compare.hpp"
#include "device_buffer.cuh"

// The CUDA layer headers bring no CBLAS (the host layer's) into a CUDA translation unit.
#if defined(CBLAS_H)
#error "moekit's CUDA layer headers included cblas.h"
#endif

namespace {


// gemm kGrouped with recompute: the backward's recomputation reuses the forward's grouped-GEMM phases
// with no host synchronisation in between (the pointer-array slots must not be rewritten under a
// GEMM still reading them); nothing here synchronises until the end.
template <class Experts, class Balance>
void check_single_rank(moekit::MoeConfig cfg, bool recompute,
                       moekit::backend::cuda::GemmStrategy gemm = moekit::backend::cuda::GemmStrategy::kAuto) {
  using namespace moekit;
  using Router = router::TopK<router::Softmax>;
  using One = MoeLayer<backend::Cuda<float>, Router, Experts, Balance>;
  using Dist = MoeLayer<backend::Cuda<float>, Router, Experts, Balance, parallel::Hybrid>;
  comm::Nccl world = comm::Nccl::single();
  const std::int64_t T = 45, D = cfg.d_model;
  One one(cfg, gemm);
  Dist dist(cfg, world, /*duplicate_token_dropping=*/true, gemm);
  one.init_params(7), dist.init_params(7);
  dist.set_activation_checkpointing(recompute);
  one.reserve(T), dist.reserve(T);
  std::mt19937 g(11);
  std::normal_distribution<float> nd;
  std::vector<float> hx(T * D), hdy(T * D);
  for (auto& v : hx) v = nd(g);
  for (auto& v : hdy) v = nd(g);
  DeviceBuffer<float> x(T * D), dy(T * D), y1(T * D), y2(T * D), dx1(T * D), dx2(T * D);
  x.upload(hx), dy.upload(hdy);
  y1.poison(), y2.poison(), dx1.poison(), dx2.poison();
  const auto a1 = one.forward(MatrixView<const float>(x.p, {T, D}), MatrixView<float>(y1.p, {T, D}));
  const auto a2 = dist.forward(MatrixView<const float>(x.p, {T, D}), MatrixView<float>(y2.p, {T, D}));
  one.backward(MatrixView<const float>(dy.p, {T, D}), MatrixView<float>(dx1.p, {T, D}));
  dist.backward(MatrixView<const float>(dy.p, {T, D}), MatrixView<float>(dx2.p, {T, D}));
  dist.sync_gradients();
  MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
  CHECK(moekit_test::rel_err(y2.download(), y1.download()) <= 1e-5);
  CHECK(moekit_test::rel_err(dx2.download(), dx1.download()) <= 1e-5);
  CHECK(std::abs(a2.lbl - a1.lbl) <= 1e-5);
  CHECK(std::abs(a2.zloss - a1.zloss) <= 1e-5);
  CHECK(dist.recomputations() == (recompute ? 1 : 0));
  // Names and order from the one table: the single-GPU and the distributed layer list the same.
  std::vector<std::string> n1, n2;
  for (const auto& p : one.parameters()) n1.push_back(p.name);
  for (const auto& p : dist.parameters()) n2.push_back(p.name);
  CHECK(n1 == n2);
  const MoeWeights<float> g2 = dist.gradients();
  const MoeWeights<float> g1_shard = moekit_test::restrict_to(dist.parameter_table(), one.gradients());
  moekit_test::for_each_weight(g2, g1_shard, [&](const char* name, const std::vector<float>& got, const std::vector<float>& ref) {
    CAPTURE(name);
    CHECK(moekit_test::rel_err(got, ref) <= 1e-5);
  });
}

}  // namespace

TEST_CASE("cuda parallel::Hybrid on one rank equals the single-GPU layer") {
  using namespace moekit;
  MoeConfig c;
  c.d_model = 48, c.d_expert = 32, c.num_ffn_experts = 8, c.top_k = 2, c.lbl_coef = 0.01, c.zloss_coef = 1e-3;
  for (bool recompute : {false, true}) check_single_rank<experts::Ffn<act::SwiGLU>, balance::GlobalBatch>(c, recompute);
  check_single_rank<experts::Ffn<act::SwiGLU>, balance::GlobalBatch>(c, true, backend::cuda::GemmStrategy::kGrouped);
  MoeConfig m = c;
  m.activation = Activation::kGeLU;
  m.num_zero_experts = 1, m.num_copy_experts = 1, m.num_constant_experts = 2, m.capacity_factor = 1.0;
  check_single_rank<experts::Set<experts::Ffn<act::GeLU>, experts::Zero, experts::Copy, experts::Constant>, balance::MicroBatch>(
      m, false);
  // Shared experts (their second stream, the tensor-slice gradient reduction) with and without recomputation.
  MoeConfig s = c;
  s.options.set("num_shared_experts", 2), s.options.set("d_shared", 16), s.options.set("shared_gate", true);
  for (bool recompute : {false, true}) check_single_rank<experts::Ffn<act::SwiGLU>, balance::MicroBatch>(s, recompute);
}
#endif
