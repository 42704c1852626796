// bench_comm_volume: bytes each rank sends per training step (one forward, one backward and the
// gradient synchronisation of one MoE layer), per collective, for every parallel strategy and degree
// split that fits the world, from the communicators' counters and from the formula side by side.
//
//   mpirun -np 4 bench_comm_volume [--tokens T] [--json out.json]
//
// Shape: docs/design.md §10's cpu-mixtral-mini (d 512, d_expert 1024, 8 FFN experts, top-2, fp32), T tokens per
// shard (default 2048), uniform routing (random router). The formula is science/comm_bytes.hpp's
// (moe_layer_comm_bytes, per rank, its terms written out there). Routing is random, so measured
// all-to-all and tp volumes scatter around the formula by a few percent.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <moekit/backend/host/gemm_library.hpp>
#include <moekit/parallel/comm/mpi.hpp>
#include <moekit/parallel/host_moe_layer.hpp>
#include <moekit/science/comm_bytes.hpp>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

using namespace moekit;

namespace {

struct Split {
  int tp, ep, dp;
  const char* policy;
  bool dtd;
};

template <class P>
comm::ByteCounters run(comm::Mpi& world, const MoeConfig& cfg, std::int64_t T, bool dtd) {
  using L = MoeLayer<backend::Host<float>, router::TopK<router::Softmax>, experts::Ffn<act::SwiGLU>, balance::MicroBatch, P>;
  L layer(cfg, world);
  layer.init_params(1);
  layer.set_duplicate_token_dropping(dtd);
  const std::int64_t D = cfg.d_model;
  std::mt19937 g(100u + unsigned(layer.grid().shard()));
  std::normal_distribution<float> nd;
  std::vector<float> x(std::size_t(T * D)), y(x.size()), dx(x.size());
  for (auto& v : x) v = nd(g);
  layer.forward(MatrixView<const float>(x.data(), {T, D}), MatrixView<float>(y.data(), {T, D}));
  layer.backward(MatrixView<const float>(x.data(), {T, D}), MatrixView<float>(dx.data(), {T, D}));
  layer.sync_gradients();
  return layer.comm_counters();
}

}  // namespace

int main(int argc, char** argv) {
  comm::MpiSession session(&argc, &argv);
  comm::Mpi world;
  std::int64_t T = 2048;
  std::string json;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--tokens" && i + 1 < argc) T = std::atoll(argv[++i]);
    else if (a == "--json" && i + 1 < argc) json = argv[++i];
    else {
      if (world.rank() == 0) std::fprintf(stderr, "usage: bench_comm_volume [--tokens T] [--json out.json]\n");
      return 2;
    }
  }
  const int w = world.size();
  std::vector<Split> splits;
  for (int tp = 1; tp <= w; tp *= 2)
    for (int ep = 1; tp * ep <= w; ep *= 2) {
      if (w % (tp * ep)) continue;
      const int dp = w / (tp * ep);
      const char* policy = tp > 1 && ep > 1 ? "hybrid" : tp > 1 ? "tensor" : ep > 1 ? "expert" : "data";
      splits.push_back({tp, ep, dp, policy, true});
      if (tp > 1 && ep > 1) splits.push_back({tp, ep, dp, policy, false});
    }
  MoeConfig base;
  base.d_model = 512, base.d_expert = 1024, base.num_ffn_experts = 8, base.top_k = 2, base.lbl_coef = 0.01;
  nlohmann::ordered_json out;
  out["world"] = w, out["tokens_per_shard"] = T, out["shape"] = "cpu-mixtral-mini (d 512, d_expert 1024, 8 experts, top-2, fp32)";
  out["rows"] = nlohmann::json::array();
  out["gemm_library"] = backend::host::gemm_library().line();
  if (world.rank() == 0) std::printf("%s\n", backend::host::gemm_library().line().c_str());
  if (world.rank() == 0)
    std::printf("bench_comm_volume: %d ranks, T = %lld tokens per shard, d 512, d_expert 1024, 8 experts, top-2, fp32\n"
                "MB sent per rank per step (forward + backward + gradient sync), measured (mean over ranks) | formula\n\n"
                "%-7s %-9s %-4s | %17s | %17s | %17s | %17s\n",
                w, (long long)T, "tp.ep.dp", "strategy", "dtd", "all_to_all", "all_gather", "reduce_scatter", "all_reduce");
  for (const Split& s : splits) {
    MoeConfig c = base;
    c.tp = s.tp, c.ep = s.ep, c.dp = s.dp;
    comm::ByteCounters k;
    const std::string p = s.policy;
    if (p == "data") k = run<parallel::Data>(world, c, T, s.dtd);
    else if (p == "expert") k = run<parallel::Expert>(world, c, T, s.dtd);
    else if (p == "tensor") k = run<parallel::Tensor>(world, c, T, s.dtd);
    else k = run<parallel::Hybrid>(world, c, T, s.dtd);
    std::vector<double> mean(k.bytes.begin(), k.bytes.end());
    world.all_reduce_sum(mean.data(), mean.size());
    for (auto& v : mean) v /= w;
    science::CommShape shape;
    shape.tokens = T, shape.d_model = c.d_model, shape.d_expert = c.d_expert, shape.ffn_experts = c.num_ffn_experts, shape.top_k = c.top_k;
    shape.tp = s.tp, shape.ep = s.ep, shape.dp = s.dp, shape.duplicate_token_dropping = s.dtd;
    const science::CollectiveBytes step = science::moe_layer_comm_bytes(shape).step();
    const double f[] = {step.all_to_all, step.all_gather, step.reduce_scatter, step.all_reduce};
    const double m[] = {mean[std::size_t(comm::Collective::kAllToAll)], mean[std::size_t(comm::Collective::kAllGather)],
                        mean[std::size_t(comm::Collective::kReduceScatter)], mean[std::size_t(comm::Collective::kAllReduce)]};
    if (world.rank() == 0) {
      std::printf("%d.%d.%-3d %-9s %-4s", s.tp, s.ep, s.dp, s.policy, s.dtd ? "on" : "off");
      for (int i = 0; i < 4; ++i) std::printf(" | %7.2f | %7.2f", m[i] / 1e6, f[i] / 1e6);
      std::printf("\n");
    }
    out["rows"].push_back({{"tp", s.tp}, {"ep", s.ep}, {"dp", s.dp}, {"strategy", s.policy}, {"dtd", s.dtd},
                           {"all_to_all_mb", m[0] / 1e6}, {"all_to_all_formula_mb", f[0] / 1e6},
                           {"all_gather_mb", m[1] / 1e6}, {"all_gather_formula_mb", f[1] / 1e6},
                           {"reduce_scatter_mb", m[2] / 1e6}, {"reduce_scatter_formula_mb", f[2] / 1e6},
                           {"all_reduce_mb", m[3] / 1e6}, {"all_reduce_formula_mb", f[3] / 1e6}});
  }
  if (world.rank() == 0 && !json.empty()) std::ofstream(json) << out.dump(2) << "\n";
  return 0;
}
