// Parallel strategies over MPI on the host backend (run by ctest under mpirun with 2 and 4 ranks).
// Every strategy and degree split that fits the world gives the outputs, gradients and aux losses of
// parallel::None on the concatenated batch (GlobalBatch balance) or on each shard (MicroBatch), fp32
// within 1e-5 relative. Also: the communicator's collectives and byte counters, Duplicate Token Dropping
// cutting the all-to-all volume by tp, activation checkpointing without a second all-to-all, and
// inconsistent configs failing on every rank. Checks are non-fatal (CHECK): a rank that stopped early
// would leave the others waiting in a collective.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cmath>
#include <moekit/moe_layer.hpp>
#include "../common/compare.hpp"
#include "../common/random.hpp"
#include "../unit/zc_tanh_scale.hpp"
#include <moekit/parallel/comm/mpi.hpp>
#include <moekit/parallel/host_moe_layer.hpp>
#include <random>
#include <string>
#include <vector>

using namespace moekit;

namespace {

comm::Mpi& world() {
  static comm::Mpi w;
  return w;
}


using moekit_test::random_vec;

MoeConfig base_config(int tp, int ep, int dp, bool mixed) {
  MoeConfig c;
  c.d_model = 16, c.d_expert = 8, c.num_ffn_experts = 8, c.top_k = 2;
  c.lbl_coef = 0.01, c.zloss_coef = 0.001;
  if (mixed) c.num_zero_experts = 1, c.num_copy_experts = 1, c.num_constant_experts = 2, c.tau = 0.75, c.activation = Activation::kGeLU;
  c.tp = tp, c.ep = ep, c.dp = dp;
  return c;
}

// One distributed run against the single-rank reference. Tokens per shard: T (not a multiple of tp).
template <class P, class Router, class Experts, class Balance>
void check_equivalence(MoeConfig cfg, std::int64_t T = 13, bool dtd = true, bool recompute = false) {
  using Dist = MoeLayer<backend::Host<float>, Router, Experts, Balance, P>;
  using Ref = MoeLayer<backend::Host<float>, Router, Experts, Balance>;
  constexpr bool kResidual = router::router_traits<Router>::reads_prev_logits;
  const std::string policy = P::name;
  CAPTURE(policy);
  CAPTURE(cfg.tp);
  CAPTURE(cfg.ep);
  CAPTURE(cfg.dp);
  CAPTURE(Balance::global);
  CAPTURE(dtd);
  Dist layer(cfg, world());
  layer.set_duplicate_token_dropping(dtd);
  layer.set_activation_checkpointing(recompute);
  MoeConfig one = cfg;
  one.tp = one.ep = one.dp = 1;
  const MoeWeights<float> full = ParameterTable::of<Router, Experts>(one).template initial<float>(42);
  layer.load_weights(full);
  layer.zero_grad();

  const auto& g = layer.grid();
  const int S = g.shards(), me = g.shard();
  const std::int64_t D = cfg.d_model, N = cfg.num_experts();
  auto shard_x = [&](int s) { return random_vec(std::size_t(T * D), 1000u + unsigned(s)); };
  auto shard_dy = [&](int s) { return random_vec(std::size_t(T * D), 2000u + unsigned(s)); };
  auto shard_prev = [&](int s) { return kResidual ? random_vec(std::size_t(T * N), 3000u + unsigned(s)) : std::vector<float>{}; };

  // Distributed run on this rank's shard.
  auto x = shard_x(me), dy = shard_dy(me), prev = shard_prev(me);
  std::vector<float> y(T * D), dx(T * D), dprev(prev.size());
  const MatrixView<const float> pv{prev.empty() ? nullptr : prev.data(), {T, N}};
  const AuxLosses aux = layer.forward(MatrixView<const float>(x.data(), {T, D}), MatrixView<float>(y.data(), {T, D}), pv);
  layer.backward(MatrixView<const float>(dy.data(), {T, D}), MatrixView<float>(dx.data(), {T, D}), 1.0, {},
                 MatrixView<float>(dprev.empty() ? nullptr : dprev.data(), {T, N}));
  layer.sync_gradients();
  if (recompute) CHECK(layer.recomputations() == 1);

  // Reference: parallel::None. GlobalBatch: on the concatenated batch with dy / S (the distributed
  // gradients are averaged over the S shards). MicroBatch: each shard on its own, gradients summed with
  // dy / S and aux_scale 1 / S.
  Ref ref(one);
  ref.load_weights(full);
  ref.zero_grad();
  std::vector<float> y_ref, dx_ref, dprev_ref;
  double lbl_ref = 0, z_ref = 0;
  const float inv = 1.f / float(S);
  auto run_ref = [&](const std::vector<float>& xs, const std::vector<float>& dys, const std::vector<float>& ps, std::int64_t tokens,
                     double aux_scale, std::vector<float>& yo, std::vector<float>& dxo, std::vector<float>& dpo) {
    yo.assign(tokens * D, 0.f), dxo.assign(tokens * D, 0.f), dpo.assign(ps.size(), 0.f);
    std::vector<float> dys_scaled(dys);
    for (auto& v : dys_scaled) v *= inv;
    const AuxLosses a = ref.forward(MatrixView<const float>(xs.data(), {tokens, D}), MatrixView<float>(yo.data(), {tokens, D}),
                                    MatrixView<const float>(ps.empty() ? nullptr : ps.data(), {tokens, N}));
    ref.backward(MatrixView<const float>(dys_scaled.data(), {tokens, D}), MatrixView<float>(dxo.data(), {tokens, D}), aux_scale, {},
                 MatrixView<float>(dpo.empty() ? nullptr : dpo.data(), {tokens, N}));
    return a;
  };
  if constexpr (Balance::global) {
    std::vector<float> xs, dys, ps;
    for (int s = 0; s < S; ++s) {
      auto a = shard_x(s), b = shard_dy(s), c = shard_prev(s);
      xs.insert(xs.end(), a.begin(), a.end()), dys.insert(dys.end(), b.begin(), b.end()), ps.insert(ps.end(), c.begin(), c.end());
    }
    std::vector<float> yo, dxo, dpo;
    const AuxLosses a = run_ref(xs, dys, ps, T * S, 1.0, yo, dxo, dpo);
    lbl_ref = a.lbl, z_ref = a.zloss;
    y_ref.assign(yo.begin() + me * T * D, yo.begin() + (me + 1) * T * D);
    dx_ref.assign(dxo.begin() + me * T * D, dxo.begin() + (me + 1) * T * D);
    if (kResidual) dprev_ref.assign(dpo.begin() + me * T * N, dpo.begin() + (me + 1) * T * N);
  } else {
    for (int s = 0; s < S; ++s) {
      std::vector<float> yo, dxo, dpo;
      const AuxLosses a = run_ref(shard_x(s), shard_dy(s), shard_prev(s), T, 1.0 / S, yo, dxo, dpo);
      if (s == me) y_ref = yo, dx_ref = dxo, dprev_ref = dpo, lbl_ref = a.lbl, z_ref = a.zloss;
    }
  }
  for (auto& v : dx_ref) v *= float(S);  // the reference saw dy / S
  for (auto& v : dprev_ref) v *= float(S);

  CHECK(moekit_test::rel_err(y, y_ref) <= 1e-5);
  CHECK(moekit_test::rel_err(dx, dx_ref) <= 1e-5);
  if (kResidual) CHECK(moekit_test::rel_err(dprev, dprev_ref) <= 1e-5);
  // Aux losses: per shard (MicroBatch), or their mean over the shards (GlobalBatch: f global, P local).
  double mine[2] = {aux.lbl, aux.zloss};
  if constexpr (Balance::global) {
    world().all_reduce_sum(mine, 2);
    for (auto& v : mine) v /= double(world().size());  // tp replicas hold the same values
  }
  CHECK(std::abs(mine[0] - lbl_ref) <= 1e-5 * std::max(1.0, std::abs(lbl_ref)));
  CHECK(std::abs(mine[1] - z_ref) <= 1e-5 * std::max(1.0, std::abs(z_ref)));
  const MoeWeights<float> ref_local = moekit_test::restrict_to(layer.parameter_table(), ref.gradients());
  moekit_test::for_each_weight(layer.gradients(), ref_local,
                               [&](const char* name, const std::vector<float>& got, const std::vector<float>& ref) {
                                 CAPTURE(name);
                                 CHECK(moekit_test::rel_err(got, ref) <= 1e-5);
                               });
}

struct Split {
  int tp, ep, dp;
};
// The degree splits of the issue that fit this world (tp x ep x dp = size).
std::vector<Split> splits() {
  const int w = world().size();
  std::vector<Split> all = {{1, 2, 1}, {2, 1, 1}, {1, 1, 2}, {2, 2, 1}, {1, 2, 2}, {2, 1, 2}, {1, 1, 1}};
  std::vector<Split> fit;
  for (auto s : all)
    if (s.tp * s.ep * s.dp == w) fit.push_back(s);
  return fit;
}

using Soft = router::TopK<router::Softmax>;
using Ffn = experts::Ffn<act::SwiGLU>;
using Mixed = experts::Set<experts::Ffn<act::GeLU>, experts::Zero, experts::Copy, experts::Constant>;
// A zero-computation kind of the tests' own (tests/unit/zc_tanh_scale.hpp) beside MoE++'s three.
using WithTanh = experts::Set<experts::Ffn<act::GeLU>, experts::Zero, experts::Copy, experts::Constant, moekit_test::TanhScale>;

}  // namespace

TEST_CASE("comm::Mpi collectives and byte counters") {
  auto& w = world();
  const int p = w.size(), r = w.rank();
  std::vector<double> v = {double(r), 1.0};
  w.all_reduce_sum(v.data(), v.size());
  CHECK(v[0] == p * (p - 1) / 2.0);
  CHECK(v[1] == p);
  // all_gather_v: rank q contributes q + 1 values equal to q.
  std::vector<std::int64_t> counts(p);
  for (int q = 0; q < p; ++q) counts[q] = q + 1;
  std::vector<float> mine(std::size_t(r + 1), float(r)), all(std::size_t(p * (p + 1) / 2));
  w.all_gather_v(mine.data(), counts.data(), all.data());
  for (int q = 0, at = 0; q < p; ++q)
    for (int i = 0; i <= q; ++i) CHECK(all[at++] == float(q));
  // reduce_scatter_v: everyone sends 1s; block q (q + 1 values) sums to p.
  std::vector<float> ones(all.size(), 1.f), block(std::size_t(r + 1));
  w.reduce_scatter_v(ones.data(), counts.data(), block.data());
  for (float b : block) CHECK(b == float(p));
  // all_to_all_v: rank r sends r + q + 1 values "100 r + q" to rank q.
  std::vector<std::int64_t> sc(p), rc(p);
  std::vector<float> send, recv;
  for (int q = 0; q < p; ++q) {
    sc[q] = r + q + 1, rc[q] = q + r + 1;
    send.insert(send.end(), std::size_t(sc[q]), float(100 * r + q));
  }
  recv.resize(std::size_t(r * p + p * (p + 1) / 2));
  const auto before = w.counters()[comm::Collective::kAllToAll];
  w.all_to_all_v(send.data(), sc.data(), recv.data(), rc.data());
  for (int q = 0, at = 0; q < p; ++q)
    for (int i = 0; i < rc[q]; ++i) CHECK(recv[at++] == float(100 * q + r));
  std::int64_t off_rank = 0;
  for (int q = 0; q < p; ++q) off_rank += q == r ? 0 : sc[q] * 4;
  CHECK(w.counters()[comm::Collective::kAllToAll] - before == off_rank);
  // split: even and odd ranks.
  auto sub = w.split(r % 2, r);
  CHECK(sub->size() == (p + 1 - r % 2) / 2);
  CHECK(sub->rank() == r / 2);
  std::int64_t one = 1;
  sub->all_reduce_sum(&one, 1);
  CHECK(one == sub->size());
}

TEST_CASE("every strategy and split equals parallel::None (FFN experts, GlobalBatch)") {
  for (auto s : splits()) {
    const MoeConfig c = base_config(s.tp, s.ep, s.dp, false);
    check_equivalence<parallel::Hybrid, Soft, Ffn, balance::GlobalBatch>(c);
    if (s.tp == 1 && s.ep == 1) check_equivalence<parallel::Data, Soft, Ffn, balance::GlobalBatch>(c);
    if (s.tp == 1) check_equivalence<parallel::Expert, Soft, Ffn, balance::GlobalBatch>(c);
    if (s.ep == 1) check_equivalence<parallel::Tensor, Soft, Ffn, balance::GlobalBatch>(c);
  }
}

TEST_CASE("every split equals parallel::None (MoE++ experts, gating residual; MicroBatch with capacity)") {
  for (auto s : splits()) {
    MoeConfig c = base_config(s.tp, s.ep, s.dp, true);
    c.gating_residual = true;
    check_equivalence<parallel::Hybrid, router::GatingResidual<Soft>, Mixed, balance::GlobalBatch>(c);
    check_equivalence<parallel::Hybrid, router::GatingResidual<Soft>, Mixed, balance::MicroBatch>(c);
    MoeConfig capped = base_config(s.tp, s.ep, s.dp, true);
    capped.activation = Activation::kGeLU;
    capped.capacity_factor = 1.0;  // capacity per shard, as DeepSpeed drops: equals None on each shard
    check_equivalence<parallel::Hybrid, Soft, Mixed, balance::MicroBatch>(capped, 17);
  }
}

TEST_CASE("the open models' routers: every split equals parallel::None (groups, router bias, scaling)") {
  for (auto s : splits()) {
    // DeepSeek-V3's router: sigmoid, biased groups, scaled gates (the biases start at 0 on every rank).
    MoeConfig v3 = base_config(s.tp, s.ep, s.dp, false);
    v3.router = RouterKind::kSigmoid, v3.expert_bias = true;
    v3.options.set("n_group", 4), v3.options.set("topk_group", 2), v3.options.set("routed_scaling_factor", 2.5);
    check_equivalence<parallel::Hybrid, router::BiasBalanced<router::GroupLimited<router::TopK<router::Sigmoid>>>, Ffn,
                      balance::MicroBatch>(v3);
    // GPT-OSS's router bias: a replicated parameter, its gradient averaged as the router weight's.
    MoeConfig oss = base_config(s.tp, s.ep, s.dp, false);
    oss.renormalize = true, oss.options.set("router_bias", true);
    check_equivalence<parallel::Hybrid, router::LinearBias<Soft>, Ffn, balance::GlobalBatch>(oss);
  }
}

TEST_CASE("the open models' experts: every split equals parallel::None (GPT-OSS's clamped SwiGLU and FFN biases)") {
  using Oai = experts::Ffn<act::SwiGLUOai>;
  for (auto s : splits()) {
    // b1 and b3 split over tp with their rows, b2 [D] by columns: each tp rank adds its columns once.
    MoeConfig oss = base_config(s.tp, s.ep, s.dp, false);
    oss.activation = Activation::kSwiGLUOai, oss.renormalize = true;
    oss.options.set("router_bias", true), oss.options.set("ffn_bias", true), oss.options.set("swiglu_limit", 1.0);
    check_equivalence<parallel::Hybrid, router::LinearBias<Soft>, Oai, balance::GlobalBatch>(oss);
    if (s.ep == 1) check_equivalence<parallel::Tensor, router::LinearBias<Soft>, Oai, balance::GlobalBatch>(oss);
    MoeConfig gelu = base_config(s.tp, s.ep, s.dp, true);  // biased ungated experts beside MoE++'s
    gelu.activation = Activation::kGeLU, gelu.options.set("ffn_bias", true);
    check_equivalence<parallel::Hybrid, Soft, Mixed, balance::MicroBatch>(gelu, 19);
  }
}

TEST_CASE("shared experts: every strategy and split equals parallel::None (tp-sliced FFN_s, its gate, their gradients)") {
  for (auto s : splits()) {
    // Qwen2-MoE: one shared expert of its own width with its gate; its w1/w3 rows and w2 columns split
    // over tp (the partial outputs and input gradients summed over the tp group), replicated over ep/dp.
    MoeConfig qw = base_config(s.tp, s.ep, s.dp, false);
    qw.options.set("num_shared_experts", 1), qw.options.set("d_shared", 12), qw.options.set("shared_gate", true);
    check_equivalence<parallel::Hybrid, Soft, Ffn, balance::GlobalBatch>(qw);
    check_equivalence<parallel::Hybrid, Soft, Ffn, balance::MicroBatch>(qw, 11, /*dtd=*/false, /*recompute=*/true);
    if (s.tp == 1 && s.ep == 1) check_equivalence<parallel::Data, Soft, Ffn, balance::GlobalBatch>(qw);
    if (s.tp == 1) check_equivalence<parallel::Expert, Soft, Ffn, balance::GlobalBatch>(qw);
    if (s.ep == 1) check_equivalence<parallel::Tensor, Soft, Ffn, balance::GlobalBatch>(qw);
    // DeepSeek: two shared experts of d_expert at weight 1, beside MoE++'s experts and capacity.
    MoeConfig ds = base_config(s.tp, s.ep, s.dp, true);
    ds.options.set("num_shared_experts", 2), ds.capacity_factor = 1.0;
    check_equivalence<parallel::Hybrid, Soft, Mixed, balance::MicroBatch>(ds, 17);
  }
}

TEST_CASE("a zero-computation kind of one's own: every strategy and split equals parallel::None") {
  for (auto s : splits()) {
    // Its experts are replicated and finish on the token's rank, as MoE++'s; its tensor u is replicated
    // and its gradient reduced with the other replicated ones.
    MoeConfig c = base_config(s.tp, s.ep, s.dp, true);
    c.options.set("num_tanh_zc_experts", 2);
    check_equivalence<parallel::Hybrid, Soft, WithTanh, balance::GlobalBatch>(c);
    c.capacity_factor = 1.0;
    check_equivalence<parallel::Hybrid, Soft, WithTanh, balance::MicroBatch>(c, 17, /*dtd=*/true, /*recompute=*/true);
    if (s.tp == 1) check_equivalence<parallel::Expert, Soft, WithTanh, balance::MicroBatch>(c);
    if (s.ep == 1) check_equivalence<parallel::Tensor, Soft, WithTanh, balance::MicroBatch>(c);
  }
}

TEST_CASE("the balance loss's sequence scope: every split equals parallel::None on each shard's sequences") {
  for (auto s : splits()) {
    MoeConfig c = base_config(s.tp, s.ep, s.dp, false);
    c.router = RouterKind::kSigmoid, c.lbl_coef = 0.3;
    c.options.set("balance", "sequence"), c.options.set("sequence_length", 4);
    check_equivalence<parallel::Hybrid, router::TopK<router::Sigmoid>, Ffn, balance::MicroBatch>(c, 12);
    MoeConfig m = base_config(s.tp, s.ep, s.dp, true);
    m.lbl_coef = 0.3, m.options.set("balance", "sequence"), m.options.set("sequence_length", 3);
    check_equivalence<parallel::Hybrid, Soft, Mixed, balance::MicroBatch>(m, 12);
  }
}

TEST_CASE("expert choice: every split equals parallel::None on each shard (each rank's experts choose among its tokens)") {
  for (auto s : splits()) {
    // Each shard's experts take C = ceil(γ k T / N_E) of its own T tokens; the plan is by token, and
    // dispatch, the chunks of duplicate token dropping and combine read it as they read token choice's.
    MoeConfig c = base_config(s.tp, s.ep, s.dp, false);
    c.lbl_coef = 0.0, c.capacity_factor = 1.5, c.options.set("routing", "expert_choice");
    check_equivalence<parallel::Hybrid, Soft, Ffn, balance::MicroBatch>(c);
    check_equivalence<parallel::Hybrid, Soft, Ffn, balance::MicroBatch>(c, 11, /*dtd=*/false, /*recompute=*/true);
    if (s.tp == 1) check_equivalence<parallel::Expert, Soft, Ffn, balance::MicroBatch>(c);
    if (s.ep == 1) check_equivalence<parallel::Tensor, Soft, Ffn, balance::MicroBatch>(c);
    MoeConfig m = base_config(s.tp, s.ep, s.dp, true);  // MoE++'s τ-weighted capacities, a routed scale
    m.lbl_coef = 0.0, m.capacity_factor = 1.0, m.options.set("routing", "expert_choice"), m.options.set("routed_scaling_factor", 1.5);
    check_equivalence<parallel::Hybrid, Soft, Mixed, balance::MicroBatch>(m, 17);
  }
}

TEST_CASE("router replay: a distributed forward's own record replays it bit for bit, every split") {
  for (auto s : splits()) {
    MoeConfig c = base_config(s.tp, s.ep, s.dp, true);
    c.capacity_factor = 1.0, c.renormalize = true;
    using Dist = MoeLayer<backend::Host<float>, Soft, Mixed, balance::MicroBatch, parallel::Hybrid>;
    Dist layer(c, world());
    MoeConfig one = c;
    one.tp = one.ep = one.dp = 1;
    layer.load_weights(ParameterTable::of<Soft, Mixed>(one).template initial<float>(43));
    const std::int64_t T = 15, D = c.d_model, K = c.top_k;
    const auto x = random_vec(std::size_t(T * D), 500u + unsigned(layer.grid().shard())), dy = random_vec(x.size(), 600u);
    auto pass = [&](const std::vector<std::int32_t>* rec, std::vector<float>& y, std::vector<float>& dx, std::vector<float>& g) {
      y.assign(x.size(), 0.f), dx.assign(x.size(), 0.f);
      if (rec) layer.set_replay(MatrixView<const std::int32_t>(rec->data(), {T, K}));
      layer.forward(MatrixView<const float>(x.data(), {T, D}), MatrixView<float>(y.data(), {T, D}));
      const std::vector<std::int32_t> r(layer.topk_indices().data, layer.topk_indices().data + T * K);
      layer.zero_grad();
      layer.backward(MatrixView<const float>(dy.data(), {T, D}), MatrixView<float>(dx.data(), {T, D}));
      layer.sync_gradients();
      g.assign(layer.flat_grads().begin(), layer.flat_grads().end());
      return r;
    };
    std::vector<float> y1, dx1, g1, y2, dx2, g2;
    const auto rec = pass(nullptr, y1, dx1, g1);
    const auto again = pass(&rec, y2, dx2, g2);
    CAPTURE(s.tp);
    CAPTURE(s.ep);
    CHECK(again == rec);
    CHECK(y2 == y1);
    CHECK(dx2 == dx1);
    CHECK(g2 == g1);
  }
}

// router::BiasBalanced: each rank routes its own shard; end_step sums the step's counts over the shards,
// so after every step the biases are the same bits on every rank and equal a single-rank layer's that saw
// the concatenated batch (sums of ±u in the same order), and so are the next step's routing decisions.
template <class P>
void check_bias_balancing(const Split& s) {
  using Router = router::BiasBalanced<Soft>;
  using Dist = MoeLayer<backend::Host<float>, Router, Ffn, balance::GlobalBatch, P>;
  using Ref = MoeLayer<backend::Host<float>, Router, Ffn, balance::GlobalBatch>;
  MoeConfig cfg = base_config(s.tp, s.ep, s.dp, false);
  cfg.expert_bias = true, cfg.bias_update_rate = 0.05, cfg.lbl_coef = 0.0;
  const std::string policy = P::name;
  CAPTURE(policy);
  CAPTURE(cfg.tp);
  CAPTURE(cfg.ep);
  Dist layer(cfg, world());
  MoeConfig one = cfg;
  one.tp = one.ep = one.dp = 1;
  Ref ref(one);
  layer.init_params(5), ref.init_params(5);
  const auto& g = layer.grid();
  const int S = g.shards(), me = g.shard();
  const std::int64_t T = 11, D = cfg.d_model, K = cfg.top_k;
  for (int step = 0; step < 4; ++step) {
    CAPTURE(step);
    std::vector<float> all;
    for (int sh = 0; sh < S; ++sh) {
      const auto x = random_vec(std::size_t(T * D), 100u * unsigned(step) + unsigned(sh));
      all.insert(all.end(), x.begin(), x.end());
    }
    std::vector<float> y(T * D), yr(all.size());
    layer.forward(MatrixView<const float>(all.data() + me * T * D, {T, D}), MatrixView<float>(y.data(), {T, D}));
    ref.forward(MatrixView<const float>(all.data(), {T * S, D}), MatrixView<float>(yr.data(), {T * S, D}));
    const auto idx = layer.topk_indices(), idx_ref = ref.topk_indices();
    int same = 0;
    for (std::int64_t i = 0; i < T * K; ++i) same += idx.data[i] == idx_ref.data[me * T * K + i];
    CHECK(same == T * K);  // the same experts picked with the same biases
    layer.end_step(), ref.end_step();
    const auto b = layer.expert_bias(), br = ref.expert_bias();
    bool equal = b.size() == br.size();
    for (std::size_t i = 0; equal && i < b.size(); ++i) equal = b[i] == br[i];
    CHECK(equal);
    // Identical on every rank: the sum over the world of (bias - rank 0's bias) is zero exactly.
    std::vector<float> mine(b.begin(), b.end()), first(mine);
    world().broadcast(first.data(), first.size(), 0);
    int differs = mine != first ? 1 : 0;
    world().all_reduce_sum(&differs, 1);
    CHECK(differs == 0);
  }
  bool moved = false;
  for (float v : ref.expert_bias()) moved = moved || v != 0.0f;
  CHECK(moved);
}

TEST_CASE("router::BiasBalanced: biases identical on every rank after each step and equal to a single rank's") {
  for (auto s : splits()) {
    check_bias_balancing<parallel::Hybrid>(s);
    if (s.tp == 1 && s.ep == 1) check_bias_balancing<parallel::Data>(s);
    if (s.tp == 1) check_bias_balancing<parallel::Expert>(s);
  }
}

TEST_CASE("duplicate token dropping cuts all-to-all volume by tp; checkpointing repeats no all-to-all") {
  for (auto s : splits()) {
    if (s.tp == 1 || s.ep == 1) continue;  // needs both a tp group and an all-to-all
    const MoeConfig c = base_config(s.tp, s.ep, s.dp, false);
    using L = MoeLayer<backend::Host<float>, Soft, Ffn, balance::MicroBatch, parallel::Hybrid>;
    auto a2a_bytes = [&](bool dtd, bool recompute, std::int64_t* bwd_calls) {
      L layer(c, world());
      layer.init_params(5);
      layer.set_duplicate_token_dropping(dtd);
      layer.set_activation_checkpointing(recompute);
      const std::int64_t T = 32, D = c.d_model;
      auto x = random_vec(std::size_t(T * D), 10u + unsigned(layer.grid().shard()));
      std::vector<float> y(x.size()), dx(x.size());
      layer.forward(MatrixView<const float>(x.data(), {T, D}), MatrixView<float>(y.data(), {T, D}));
      const auto calls_fwd = layer.ep_counters().calls_of(comm::Collective::kAllToAll);
      layer.backward(MatrixView<const float>(x.data(), {T, D}), MatrixView<float>(dx.data(), {T, D}));
      *bwd_calls = layer.ep_counters().calls_of(comm::Collective::kAllToAll) - calls_fwd;
      std::int64_t bytes = layer.ep_counters()[comm::Collective::kAllToAll];
      world().all_reduce_sum(&bytes, 1);
      return bytes;
    };
    std::int64_t calls_plain = 0, calls_dup = 0, calls_ckpt = 0;
    const std::int64_t with_dtd = a2a_bytes(true, false, &calls_plain), without = a2a_bytes(false, false, &calls_dup);
    CHECK(with_dtd > 0);
    CHECK(with_dtd * s.tp == without);  // every tp rank sends its chunk instead of every row
    a2a_bytes(true, true, &calls_ckpt);
    CHECK(calls_plain == 2);  // dispatch and return of the gradient rows
    CHECK(calls_ckpt == calls_plain);  // recomputation reuses the saved all-to-all outputs
  }
}

TEST_CASE("an inconsistent or invalid config fails on every rank, without a hang") {
  const int w = world().size();
  MoeConfig c = base_config(1, w, 1, false);
  if (world().rank() == 1) c.d_model = 24;  // one rank disagrees
  using L = MoeLayer<backend::Host<float>, Soft, Ffn, balance::MicroBatch, parallel::Expert>;
  try {
    L layer(c, world());
    FAIL("an inconsistent d_model must throw");
  } catch (const ConfigError& e) {
    CHECK(std::string(e.what()).find("d_model") != std::string::npos);
  }
  MoeConfig bad = base_config(1, w, 2, false);  // tp * ep * dp = 2 w
  CHECK_THROWS_AS(L(bad, world()), ConfigError);
  MoeConfig wrong_policy = base_config(w, 1, 1, false);  // tp > 1 with parallel::Expert
  if (w > 1) CHECK_THROWS_AS(L(wrong_policy, world()), ConfigError);
  MoeConfig local_only = base_config(1, w, 1, false);
  if (world().rank() == 0) local_only.num_ffn_experts = 7;  // invalid on rank 0 only (7 % ep)
  CHECK_THROWS_AS(L(local_only, world()), ConfigError);
}

TEST_CASE("non-finite router logits on one rank stop every rank, without a hang") {
  const int w = world().size();
  MoeConfig c = base_config(1, w, 1, false);
  using L = MoeLayer<backend::Host<float>, Soft, Ffn, balance::MicroBatch, parallel::Expert>;
  L layer(c, world());
  layer.init_params(7);
  const std::int64_t T = 6;
  std::vector<float> x = random_vec(std::size_t(T * c.d_model), 11 + unsigned(world().rank())), y(x.size());
  const int bad_rank = w - 1;
  if (world().rank() == bad_rank) x[std::size_t(3 * c.d_model + 1)] = std::nanf("");  // token 3 of the last rank
  std::string message;
  try {
    layer.forward(MatrixView<const float>(x.data(), {T, c.d_model}), MatrixView<float>(y.data(), {T, c.d_model}));
  } catch (const NumericError& e) {
    message = e.what();
  }
  CAPTURE(message);
  if (world().rank() == bad_rank) CHECK(message.find("router logits of token 3 are not finite") != std::string::npos);
  else CHECK(message.find("not finite on another rank") != std::string::npos);
  // Every rank is still in step: a clean forward afterwards works on all of them.
  std::vector<float> ok = random_vec(x.size(), 5);
  CHECK_NOTHROW(layer.forward(MatrixView<const float>(ok.data(), {T, c.d_model}), MatrixView<float>(y.data(), {T, c.d_model})));
}

int main(int argc, char** argv) {
  comm::MpiSession session(&argc, &argv);
  doctest::Context ctx(argc, argv);
  const int res = ctx.run();
  int failed = res != 0 ? 1 : 0;
  MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return failed;
}
