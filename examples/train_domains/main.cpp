// train_domains: a small Mixture-of-Experts language model trained on the CPU, end to end.
//
// The data is a generated stream of four synthetic languages over one vocabulary (domains.hpp).
// The model predicts each token from the W tokens before it: a bag of per-position embeddings, two
// residual blocks h = h + MoE(RMSNorm(h)), a final RMSNorm and a linear head (model.hpp). It trains
// with AdamW (warmup + cosine), global gradient clipping at 1.0 and the load-balancing and z losses,
// then reports the held-out loss next to the unigram entropy of the held-out stream, per domain, and
// which experts each domain was routed to. Exit status 1 when held-out loss is not below the baseline.
//
// Flags reach the library's MoE variants: --balance micro|global (balance::MicroBatch / GlobalBatch),
// --granularity G (fine_grained_config), --zero/--copy/--constant/--tau (MoE++ zero-computation
// experts), --gating-residual (router::GatingResidual), and --pack-by-domain draws every micro-batch
// from one domain, as when training sequences are packed by source.
//
// Under mpirun, --parallel data|expert|tensor|hybrid with --tp/--ep trains the same model with the
// library's distributed host layers (parallel.hpp): --batch stays the global micro-batch, split over the
// ep·dp shards; dense gradients are averaged over the shards, the MoE layers sync theirs, and the
// global gradient norm counts each parameter of the full model once. Rank 0 prints and writes the JSON.
//
// --backend cuda puts the MoE layers on the GPU (cuda_blocks.hpp; one GPU per rank under mpirun, NCCL
// inside the layers) and keeps the embedding, norms, head and AdamW here on the host.
//
// Read top to bottom: options, data, model and optimizer, the training loop, the final evaluation.
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include <moekit/train/adamw.hpp>

#ifdef TRAIN_DOMAINS_HAS_MPI
#include <moekit/parallel/comm/mpi.hpp>
#endif

#include "cuda_blocks.hpp"
#include "domains.hpp"
#include "model.hpp"
#include "parallel.hpp"

// ---------------------------------------------------------------------------------------------------
// Options

struct Options {
  std::int64_t steps = 3000;
  std::int64_t batch = 512;  // tokens per micro-batch
  std::int64_t accum = 1;    // micro-batches per optimizer step
  double lr = 4e-3;
  std::int64_t experts = 8;
  std::int64_t top_k = 2;
  std::int64_t d_model = 64;
  std::int64_t d_expert = 128;
  std::int64_t context = 8;
  double lbl_coef = 0.01;
  double zloss_coef = 1e-3;
  double weight_decay = 0.01;
  std::uint64_t seed = 1234;
  std::int64_t eval_interval = 200;
  std::int64_t log_interval = 50;
  std::int64_t train_tokens = 1 << 21;
  std::int64_t heldout_tokens = 1 << 15;
  int threads = 0;  // 0: OpenMP's default
  std::string json;
  bool global_balance = false;   // --balance global
  std::int64_t granularity = 1;  // G: G*experts experts of d_expert/G, top-(G*top_k)
  std::int64_t zero_experts = 0, copy_experts = 0, constant_experts = 0;
  double tau = 1.0;
  bool gating_residual = false;
  bool expert_bias = false;      // --expert-bias (router::BiasBalanced)
  double bias_rate = 1e-3;       // --bias-rate
  bool pack_by_domain = false;
  Parallel parallel = Parallel::kNone;  // --parallel (needs mpirun for more than one rank)
  std::int64_t tp = 1, ep = 1;          // dp = ranks / (tp * ep)
  bool cuda = false;                    // --backend cuda: the MoE layers on the GPU
};

static void usage(const char* prog) {
  std::printf(
      "usage: %s [flags]\n"
      "  --steps N          optimizer steps (3000)\n"
      "  --batch N          tokens per micro-batch (512)\n"
      "  --accum N          micro-batches per step, gradient accumulation (1)\n"
      "  --lr X             peak learning rate of the warmup + cosine schedule (4e-3)\n"
      "  --experts N        FFN experts per MoE layer (8)\n"
      "  --top-k N          experts per token (2)\n"
      "  --d-model N        model width (64)\n"
      "  --d-expert N       hidden width of each expert (128)\n"
      "  --context N        tokens in the input window (8)\n"
      "  --lbl-coef X       load-balancing loss coefficient (0.01)\n"
      "  --zloss-coef X     router z-loss coefficient (0.001)\n"
      "  --weight-decay X   AdamW weight decay of the matrices (0.01)\n"
      "  --seed N           seed of the languages, the streams and the initialisation (1234)\n"
      "  --eval-interval N  steps between held-out evaluations (200; 0 = only at the end)\n"
      "  --log-interval N   steps between progress lines (50)\n"
      "  --train-tokens N   length of the generated training stream (2097152)\n"
      "  --heldout-tokens N length of the held-out stream (32768)\n"
      "  --threads N        OpenMP (and OpenBLAS) threads (default: all cores)\n"
      "  --json PATH        write metrics as JSON lines to PATH\n"
      "  --balance S        load-balance scope: micro (per micro-batch) or global (counts summed over the\n"
      "                     step's micro-batches, reset after each optimizer step) (micro)\n"
      "  --granularity G    fine-grained experts: G*experts experts of d_expert/G, top-(G*top_k) (1)\n"
      "  --zero N           MoE++ zero experts, E(x) = 0 (0)\n"
      "  --copy N           MoE++ copy experts, E(x) = x (0)\n"
      "  --constant N       MoE++ constant experts, E(x) = a1 x + a2 v (0)\n"
      "  --tau X            MoE++ tau: weight of zero-computation experts in the balance loss (1.0)\n"
      "  --gating-residual  each MoE router adds W_g * (previous MoE layer's logits)\n"
      "  --expert-bias      aux-loss-free balancing (DeepSeek-V3): per-expert selection biases, updated\n"
      "                     after each step by --bias-rate X (1e-3) * sign(mean load - load); try --lbl-coef 0\n"
      "  --pack-by-domain   every micro-batch from one domain (drawn at random); default: mixed\n"
      "  --parallel S       none, or under mpirun: data, expert, tensor or hybrid; --batch stays the global\n"
      "                     micro-batch, split over the ep*dp shards (none)\n"
      "  --tp N             tensor-parallel degree: each expert's d_expert split over N ranks (tensor, hybrid) (1)\n"
      "  --ep N             expert-parallel degree: the experts split over N ranks (expert, hybrid) (1);\n"
      "                     dp = ranks / (tp * ep)\n"
      "  --backend B        host, or cuda: the MoE layers on the GPU (one per rank under mpirun), the rest\n"
      "                     on the host; needs a build with CUDA (host)\n",
      prog);
}

static Options parse_args(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i], value;
    if (flag == "--help" || flag == "-h") {
      usage(argv[0]);
      std::exit(0);
    }
    if (flag == "--gating-residual" || flag == "--pack-by-domain" || flag == "--expert-bias") {  // switches: no value
      (flag == "--gating-residual" ? o.gating_residual : flag == "--expert-bias" ? o.expert_bias : o.pack_by_domain) = true;
      continue;
    }
    if (const auto eq = flag.find('='); eq != std::string::npos) {
      value = flag.substr(eq + 1);
      flag = flag.substr(0, eq);
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      std::fprintf(stderr, "error: %s needs a value\n", flag.c_str());
      std::exit(2);
    }
    auto integer = [&](std::int64_t lo) {
      char* end = nullptr;
      const long long v = std::strtoll(value.c_str(), &end, 10);
      if (value.empty() || *end != '\0' || v < lo) {
        std::fprintf(stderr, "error: %s = \"%s\" must be an integer >= %lld\n", flag.c_str(), value.c_str(), (long long)lo);
        std::exit(2);
      }
      return std::int64_t(v);
    };
    auto real = [&]() {
      char* end = nullptr;
      const double v = std::strtod(value.c_str(), &end);
      if (value.empty() || *end != '\0' || !(v >= 0.0)) {
        std::fprintf(stderr, "error: %s = \"%s\" must be a number >= 0\n", flag.c_str(), value.c_str());
        std::exit(2);
      }
      return v;
    };
    if (flag == "--steps") o.steps = integer(1);
    else if (flag == "--batch") o.batch = integer(1);
    else if (flag == "--accum") o.accum = integer(1);
    else if (flag == "--lr") o.lr = real();
    else if (flag == "--experts") o.experts = integer(1);
    else if (flag == "--top-k") o.top_k = integer(1);
    else if (flag == "--d-model") o.d_model = integer(1);
    else if (flag == "--d-expert") o.d_expert = integer(1);
    else if (flag == "--context") o.context = integer(1);
    else if (flag == "--lbl-coef") o.lbl_coef = real();
    else if (flag == "--zloss-coef") o.zloss_coef = real();
    else if (flag == "--weight-decay") o.weight_decay = real();
    else if (flag == "--seed") o.seed = std::uint64_t(integer(0));
    else if (flag == "--eval-interval") o.eval_interval = integer(0);
    else if (flag == "--log-interval") o.log_interval = integer(1);
    else if (flag == "--train-tokens") o.train_tokens = integer(1);
    else if (flag == "--heldout-tokens") o.heldout_tokens = integer(1);
    else if (flag == "--threads") o.threads = int(integer(1));
    else if (flag == "--json") o.json = value;
    else if (flag == "--balance") {
      if (value != "micro" && value != "global") {
        std::fprintf(stderr, "error: --balance = \"%s\" must be \"micro\" or \"global\"\n", value.c_str());
        std::exit(2);
      }
      o.global_balance = value == "global";
    }
    else if (flag == "--granularity") o.granularity = integer(1);
    else if (flag == "--zero") o.zero_experts = integer(0);
    else if (flag == "--copy") o.copy_experts = integer(0);
    else if (flag == "--constant") o.constant_experts = integer(0);
    else if (flag == "--tau") o.tau = real();
    else if (flag == "--bias-rate") o.bias_rate = real();
    else if (flag == "--parallel") {
      if (!parse_parallel(value, o.parallel)) {
        std::fprintf(stderr, "error: --parallel = \"%s\" must be none, data, expert, tensor or hybrid\n", value.c_str());
        std::exit(2);
      }
    }
    else if (flag == "--tp") o.tp = integer(1);
    else if (flag == "--ep") o.ep = integer(1);
    else if (flag == "--backend") {
      if (value != "host" && value != "cuda") {
        std::fprintf(stderr, "error: --backend = \"%s\" must be \"host\" or \"cuda\"\n", value.c_str());
        std::exit(2);
      }
      o.cuda = value == "cuda";
    }
    else {
      std::fprintf(stderr, "error: unknown flag %s\n", flag.c_str());
      usage(argv[0]);
      std::exit(2);
    }
  }
  // The degrees each strategy may raise above 1 (as the library's policies allow them).
  const auto [tp_ok, ep_ok] = allowed_degrees(o.parallel);
  if ((o.tp > 1 && !tp_ok) || (o.ep > 1 && !ep_ok)) {
    std::fprintf(stderr, "error: --%s %lld needs --parallel %s (got --parallel %s)\n", o.tp > 1 && !tp_ok ? "tp" : "ep",
                 (long long)(o.tp > 1 && !tp_ok ? o.tp : o.ep), o.tp > 1 && !tp_ok ? "tensor or hybrid" : "expert or hybrid",
                 parallel_name(o.parallel));
    std::exit(2);
  }
  return o;
}

// ---------------------------------------------------------------------------------------------------
// Batches: token i of a stream is predicted from the W tokens before it (separators before the start).
// Window slot j holds token i-1-j, offset by j * vocab to pick that slot's embedding table.

static void make_windows(const domains::Stream& s, const std::int64_t* positions, std::int64_t rows, std::int64_t context,
                         std::int32_t* ids, std::int32_t* targets) {
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int64_t i = positions[r];
    for (std::int64_t j = 0; j < context; ++j) {
      const std::int64_t at = i - 1 - j;
      ids[r * context + j] = std::int32_t(j * domains::kVocab) + (at >= 0 ? s.tokens[at] : domains::kSeparator);
    }
    targets[r] = s.tokens[i];
  }
}

// ---------------------------------------------------------------------------------------------------
// Evaluation over the first `limit` tokens of a stream, in chunks, without gradients.

struct Evaluation {
  double loss = 0, oracle = 0;
  std::array<double, domains::kNumDomains> domain_loss{}, domain_oracle{};
  std::array<std::int64_t, domains::kNumDomains> domain_tokens{};
  // routed[l][d][e]: slots of layer l sent to expert e by windows whose latest token is in domain d.
  std::vector<std::vector<std::vector<std::int64_t>>> routed;
  double expert_gemm_flops = 0;  // forward expert GEMM FLOPs, summed over layers and tokens
};

// Distributed runs: every rank evaluates the same tokens (the layers' forwards are collectives, so all
// ranks make them in the same order); only the expert GEMM FLOPs, spread over the ranks, are summed.
static Evaluation evaluate(Model<float>& model, const domains::Stream& s, std::int64_t limit, Ranks* ranks = nullptr) {
  const ModelConfig& c = model.config();
  const std::int64_t n = std::min<std::int64_t>(limit, std::int64_t(s.tokens.size())), chunk = 2048;
  Evaluation ev;
  model.set_training(false);  // evaluation forwards leave GlobalBatch buffers alone
  ev.routed.assign(c.blocks,
                   std::vector<std::vector<std::int64_t>>(domains::kNumDomains, std::vector<std::int64_t>(c.total_experts(), 0)));
  std::vector<std::int64_t> pos(chunk);
  std::vector<std::int32_t> ids(chunk * c.context), targets(chunk);
  std::vector<float> token_loss(chunk);
  for (std::int64_t start = 0; start < n; start += chunk) {
    const std::int64_t rows = std::min(chunk, n - start);
    for (std::int64_t r = 0; r < rows; ++r) pos[r] = start + r;
    make_windows(s, pos.data(), rows, c.context, ids.data(), targets.data());
    model.forward(ids.data(), targets.data(), rows, 0.0, token_loss.data());
    for (std::int64_t l = 0; l < c.blocks; ++l) ev.expert_gemm_flops += double(model.moe(l).expert_gemm_flops());
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::int64_t i = start + r;
      const int d = s.domain[i];
      ev.loss += token_loss[r];
      ev.oracle += s.oracle_nll[i];
      ev.domain_loss[d] += token_loss[r];
      ev.domain_oracle[d] += s.oracle_nll[i];
      ev.domain_tokens[d] += 1;
      const int context_domain = s.domain[i > 0 ? i - 1 : 0];
      for (std::int64_t l = 0; l < c.blocks; ++l) {
        const auto idx = model.moe(l).topk_indices();
        for (std::int64_t j = 0; j < c.top_k; ++j) ev.routed[l][context_domain][idx(r, j)] += 1;
      }
    }
  }
  if (ranks) {  // each of the S shards sent the same tokens to the experts
    ranks->world().all_reduce_sum(&ev.expert_gemm_flops, 1);
    ev.expert_gemm_flops /= double(ranks->grid().shards());
  }
  ev.loss /= double(n);
  ev.oracle /= double(n);
  for (int d = 0; d < domains::kNumDomains; ++d)
    if (ev.domain_tokens[d] > 0) {
      ev.domain_loss[d] /= double(ev.domain_tokens[d]);
      ev.domain_oracle[d] /= double(ev.domain_tokens[d]);
    }
  model.set_training(true);
  return ev;
}

// How much each domain keeps to its own experts, from one layer's routing table [domain][expert].
struct Specialisation {
  std::array<double, domains::kNumDomains> top_share{};  // share of the domain's slots at its top expert
  double mean_top_share = 0;
  double mutual_information_bits = 0;  // I(domain; expert) over slots
  double normalised_mi = 0;            // I / H(domain): 0 = routing ignores the domain, 1 = decides it
};

static Specialisation specialisation(const std::vector<std::vector<std::int64_t>>& table) {
  Specialisation sp;
  const std::size_t n_dom = table.size(), n_exp = table[0].size();
  std::vector<double> row(n_dom, 0), col(n_exp, 0);
  double total = 0;
  for (std::size_t d = 0; d < n_dom; ++d)
    for (std::size_t e = 0; e < n_exp; ++e) {
      row[d] += double(table[d][e]);
      col[e] += double(table[d][e]);
      total += double(table[d][e]);
    }
  if (total <= 0) return sp;
  double h_domain = 0;
  for (std::size_t d = 0; d < n_dom; ++d) {
    const double top = double(*std::max_element(table[d].begin(), table[d].end()));
    sp.top_share[d] = row[d] > 0 ? top / row[d] : 0.0;
    sp.mean_top_share += sp.top_share[d] / double(n_dom);
    if (row[d] > 0) h_domain -= row[d] / total * std::log2(row[d] / total);
    for (std::size_t e = 0; e < n_exp; ++e)
      if (table[d][e] > 0) {
        const double p = double(table[d][e]) / total;
        sp.mutual_information_bits += p * std::log2(p * total * total / (row[d] * col[e]));
      }
  }
  sp.normalised_mi = h_domain > 0 ? sp.mutual_information_bits / h_domain : 0.0;
  return sp;
}

// Column label of expert e: e0.. for FFN experts, then Z (zero), C (copy), K (constant) experts.
static std::string expert_label(const ModelConfig& c, std::int64_t e) {
  if (e < c.experts) return "e" + std::to_string(e);
  e -= c.experts;
  if (e < c.zero_experts) return "Z" + std::to_string(e);
  e -= c.zero_experts;
  if (e < c.copy_experts) return "C" + std::to_string(e);
  return "K" + std::to_string(e - c.copy_experts);
}

// OpenMP threads busy-wait between parallel regions by default. On a small machine shared with other
// jobs that turns every barrier into a wait for a descheduled thread (20x slower steps, measured on a
// loaded 2-core VM), so unless the user chose a policy, restart once with OMP_WAIT_POLICY=passive:
// libgomp reads the variable only when it loads.
static void prefer_passive_openmp(char** argv) {
#ifdef __linux__
  if (std::getenv("OMP_WAIT_POLICY") != nullptr) return;
  setenv("OMP_WAIT_POLICY", "passive", 1);
  execv("/proc/self/exe", argv);  // returns only on failure: carry on with the default policy
#else
  (void)argv;
#endif
}

// Progress and report go to stdout on rank 0 only.
static bool g_print = true;
static void out(const char* fmt, ...) {
  if (!g_print) return;
  va_list args;
  va_start(args, fmt);
  std::vprintf(fmt, args);
  va_end(args);
}

static double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

static void set_threads(int n) {
  omp_set_num_threads(n);
#ifdef OPENBLAS_VERSION
  openblas_set_num_threads(n);  // BLAS and the OpenMP loops take turns on the same cores
#endif
}

// world: the communicator of a --parallel run (nullptr: one process, the single-rank layers).
// cuda: --backend cuda's device side (nullptr: the host layers).
static int run(const Options& opt, moekit::comm::HostCommunicator* world, CudaMoeBackend* cuda = nullptr) {
  // 0. Ranks: this rank's place in the tp x ep x dp grid, its shard of the data and the trainer's groups.
  std::unique_ptr<Ranks> ranks;
  if (world) ranks = std::make_unique<Ranks>(*world, int(opt.tp), int(opt.ep));
  const int shards = ranks ? ranks->grid().shards() : 1, shard = ranks ? ranks->grid().shard() : 0;
  const bool root = !ranks || ranks->rank() == 0;
  g_print = root;
  if (opt.batch % shards != 0) {
    if (root)
      std::fprintf(stderr, "error: --batch %lld must be divisible by the %d shards (ep * dp), each of which takes an equal part\n",
                   (long long)opt.batch, shards);
    return 2;
  }
  const std::int64_t local_batch = opt.batch / shards;  // this shard's rows of each micro-batch
  std::ofstream json_out;
  if (!opt.json.empty() && root) {
    json_out.open(opt.json);
    if (!json_out) {
      std::fprintf(stderr, "error: cannot write %s\n", opt.json.c_str());
      return 2;
    }
  }
  auto emit = [&](const nlohmann::ordered_json& j) {
    if (json_out) json_out << j.dump() << "\n" << std::flush;
  };

  // 1. Data: one set of rules, two streams from different seeds.
  const domains::Rules rules(opt.seed);
  const domains::Stream train = domains::generate(rules, opt.train_tokens, opt.seed * 2 + 1);
  const domains::Stream heldout = domains::generate(rules, opt.heldout_tokens, opt.seed * 2 + 2);
  const double baseline = domains::unigram_entropy(heldout.tokens);
  const std::int64_t interval_eval_tokens = std::min<std::int64_t>(8192, std::int64_t(heldout.tokens.size()));

  // 2. Model and optimizer. Weight decay on matrices only (not on norm gains or the head's bias).
  ModelConfig mc;
  mc.vocab = domains::kVocab;
  mc.context = opt.context;
  mc.d_model = opt.d_model;
  mc.d_expert = opt.d_expert;
  mc.experts = opt.experts;
  mc.top_k = opt.top_k;
  mc.lbl_coef = opt.lbl_coef;
  mc.zloss_coef = opt.zloss_coef;
  mc.zero_experts = opt.zero_experts;
  mc.copy_experts = opt.copy_experts;
  mc.constant_experts = opt.constant_experts;
  mc.tau = opt.tau;
  mc.gating_residual = opt.gating_residual;
  mc.expert_bias = opt.expert_bias;
  mc.bias_update_rate = opt.bias_rate;
  mc.global_balance = opt.global_balance;
  if (opt.granularity > 1) {  // --d-expert is the d_ff being split, --experts E, --top-k k_base
    const moekit::MoeConfig fine =
        moekit::fine_grained_config(mc.moe_config(), opt.d_expert, opt.experts, opt.granularity, opt.top_k);
    mc.d_expert = fine.d_expert;
    mc.experts = fine.num_ffn_experts;
    mc.top_k = fine.top_k;
  }
  const std::int64_t n_experts = mc.total_experts();
  MoeBlockFactory<float> moe_blocks;  // empty: make_moe_block's single-rank host layers
  if (cuda)
    moe_blocks = [&](const moekit::MoeConfig& base, bool global_balance) {
      return cuda->make_block(ranks ? ranks->with_degrees(base) : base, global_balance);
    };
  else if (ranks)
    moe_blocks = ranks->moe_blocks<float>();
  Model<float> model(mc, opt.seed, moe_blocks);
  std::vector<moekit::Parameter<float>> params = model.parameters();  // this rank's (its expert shard)
  const std::vector<moekit::Parameter<float>> dense_params = model.dense_parameters();
  std::int64_t n_params = 0, n_local_params = 0;
  for (const auto& p : params) n_local_params += p.numel();
  n_params = ranks ? ranks->full_parameter_count(params) : n_local_params;
  moekit::train::AdamWConfig ac;
  ac.lr = opt.lr;
  ac.beta2 = 0.95;
  ac.weight_decay = opt.weight_decay;
  moekit::train::AdamW<float> optimizer(params, ac, [](const moekit::Parameter<float>& p) { return p.shape.size() >= 2; });
  moekit::train::CosineSchedule schedule{opt.lr, opt.lr / 10, std::max<std::int64_t>(1, opt.steps / 20), opt.steps};
  schedule.validate();

  out("train_domains: threads %d (OMP_WAIT_POLICY=%s) | vocab %d, context %lld | %lld blocks of MoE(%lld experts, top-%lld, d_model %lld, d_expert %lld) | %lld parameters\n",
      omp_get_max_threads(), std::getenv("OMP_WAIT_POLICY") ? std::getenv("OMP_WAIT_POLICY") : "default", domains::kVocab, (long long)opt.context, (long long)mc.blocks, (long long)mc.experts,
      (long long)mc.top_k, (long long)opt.d_model, (long long)mc.d_expert, (long long)n_params);
  if (opt.expert_bias) out("expert bias: on (router::BiasBalanced, u = %g after each step)\n", opt.bias_rate);
  const bool variant = opt.global_balance || opt.granularity > 1 || opt.gating_residual || opt.pack_by_domain ||
                       mc.zero_experts + mc.copy_experts + mc.constant_experts > 0;
  if (variant)  // the default run's output stays as it was
    out("variant: balance %s | granularity %lld | zero %lld, copy %lld, constant %lld, tau %g | gating residual %s | micro-batches %s\n",
        opt.global_balance ? "global" : "micro", (long long)opt.granularity, (long long)mc.zero_experts,
        (long long)mc.copy_experts, (long long)mc.constant_experts, mc.tau, mc.gating_residual ? "on" : "off",
        opt.pack_by_domain ? "packed by domain" : "mixed");
  if (cuda)  // --backend cuda only: host runs print what they always did
    out("backend: cuda | MoE layers on %s%s; embedding, norms, head and AdamW on the host\n", cuda->describe().c_str(),
        ranks ? " (rank 0; one GPU per rank, NCCL inside the layers)" : "");
  if (ranks) {
    const auto& g = ranks->grid();
    out("parallel: %s over %d ranks = tp %d x ep %d x dp %d | %d shards x %lld tokens per micro-batch | %lld FFN experts per rank, "
        "d_expert/tp %lld | %lld parameters on rank 0\n",
        parallel_name(opt.parallel), ranks->size(), g.tp, g.ep, g.dp, shards, (long long)local_batch,
        (long long)(mc.experts / g.ep), (long long)(mc.d_expert / g.tp), (long long)n_local_params);
  }
  out("data: %zu train tokens, %zu held-out tokens (different seed); held-out unigram entropy %.4f nats\n",
      train.tokens.size(), heldout.tokens.size(), baseline);
  out("steps %lld x %lld tokens x %lld micro-batches | AdamW lr %.2e (warmup %lld, cosine to %.2e) | clip 1.0 | lbl %.3g, z %.3g\n\n",
      (long long)opt.steps, (long long)opt.batch, (long long)opt.accum, opt.lr, (long long)schedule.warmup_steps,
      schedule.min_lr, opt.lbl_coef, opt.zloss_coef);

  // 3. Training. Every rank draws the whole micro-batch from the same sampler and keeps its shard's
  // part (tp ranks of a group the same part): the shards see different tokens, and together the
  // micro-batch the single-process run draws.
  moekit::SplitMix64 sampler(opt.seed ^ 0x53414d504c45ull);  // "SAMPLE"
  std::vector<std::int64_t> pos(opt.batch);
  const std::int64_t* my_pos = pos.data() + shard * local_batch;
  // --pack-by-domain: the training positions of each domain (the domain of the predicted token).
  std::array<std::vector<std::int64_t>, domains::kNumDomains> by_domain;
  if (opt.pack_by_domain)
    for (std::int64_t i = 0; i < std::int64_t(train.tokens.size()); ++i) by_domain[train.domain[i]].push_back(i);
  std::vector<std::int32_t> ids(local_batch * opt.context), targets(local_batch);
  // Interval statistics.
  double sum_loss = 0, sum_norm = 0;
  std::vector<double> sum_lbl(mc.blocks, 0), sum_z(mc.blocks, 0);
  std::vector<std::vector<std::int64_t>> load(mc.blocks, std::vector<std::int64_t>(n_experts, 0));
  std::int64_t interval_steps = 0, interval_micro = 0;
  double interval_train_s = 0, total_train_s = 0;
  const auto run_start = std::chrono::steady_clock::now();

  for (std::int64_t step = 0; step < opt.steps; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    const double lr = schedule(step);
    model.zero_grad();  // optimizer.zero_grad() would miss the CUDA layers' device gradients
    for (std::int64_t micro = 0; micro < opt.accum; ++micro) {
      if (opt.pack_by_domain) {
        const auto& from = by_domain[sampler.next() % domains::kNumDomains];
        for (auto& p : pos) p = from[sampler.next() % from.size()];
      } else {
        for (auto& p : pos) p = std::int64_t(sampler.next() % train.tokens.size());
      }
      make_windows(train, my_pos, local_batch, opt.context, ids.data(), targets.data());
      sum_loss += model.forward(ids.data(), targets.data(), local_batch, 1.0 / double(opt.accum));
      model.backward(1.0 / double(opt.accum));
      for (std::int64_t l = 0; l < mc.blocks; ++l) {
        sum_lbl[l] += model.aux(l).lbl;
        sum_z[l] += model.aux(l).zloss;
        const auto counts = model.moe(l).expert_counts();
        for (std::int64_t e = 0; e < n_experts; ++e) load[l][e] += counts(e);
      }
      ++interval_micro;
    }
    if (ranks) {  // gradients of the mean of the shards' losses
      ranks->average_over_shards(dense_params);
      model.sync_moe_gradients();
    }
    model.moe_gradients_to_host();  // --backend cuda: into the host mirrors that params lists
    // The full model's norm (distributed: every parameter counted once).
    sum_norm += ranks ? ranks->clip_grad_norm(params, 1.0) : moekit::train::clip_grad_norm(params, 1.0);
    optimizer.step(lr);
    model.moe_parameters_to_device();  // --backend cuda: the updated mirrors back to the GPU
    model.end_step();  // GlobalBatch: the buffer spans one step's micro-batches; BiasBalanced: the bias update
    const double dt = seconds_since(t0);
    interval_train_s += dt;
    total_train_s += dt;
    ++interval_steps;

    const bool last = step + 1 == opt.steps;
    if ((step + 1) % opt.log_interval == 0 || last) {
      if (ranks) {  // losses: the mean over the shards; expert load: the sum (tp replicas counted once)
        std::vector<double> v;
        v.push_back(sum_loss);
        v.insert(v.end(), sum_lbl.begin(), sum_lbl.end());
        v.insert(v.end(), sum_z.begin(), sum_z.end());
        for (const auto& row : load) v.insert(v.end(), row.begin(), row.end());
        ranks->sum_over_shards(v.data(), v.size());
        std::size_t at = 0;
        sum_loss = v[at++] / shards;
        for (auto& x : sum_lbl) x = v[at++] / shards;
        for (auto& x : sum_z) x = v[at++] / shards;
        for (auto& row : load)
          for (auto& c : row) c = std::int64_t(v[at++]);
      }
      const double m = double(interval_micro);
      const double tok_s = double(interval_micro * opt.batch) / interval_train_s;
      out("step %5lld/%lld | loss %.4f | lbl", (long long)(step + 1), (long long)opt.steps, sum_loss / m);
      for (auto v : sum_lbl) out(" %.3f", v / m);
      out(" | z");
      for (auto v : sum_z) out(" %.3f", v / m);
      out(" | lr %.2e | |g| %.2f | %5.0f tok/s | load %%", lr, sum_norm / double(interval_steps), tok_s);
      nlohmann::ordered_json load_json = nlohmann::ordered_json::array();
      for (std::int64_t l = 0; l < mc.blocks; ++l) {
        std::int64_t total = 0;
        for (auto c : load[l]) total += c;
        out(" L%lld", (long long)l);
        std::vector<double> frac;
        for (auto c : load[l]) {
          frac.push_back(double(c) / double(std::max<std::int64_t>(total, 1)));
          out(" %2.0f", 100.0 * frac.back());
        }
        load_json.push_back(frac);
      }
      out("\n");
      std::vector<double> lbl, z;
      for (std::int64_t l = 0; l < mc.blocks; ++l) lbl.push_back(sum_lbl[l] / m), z.push_back(sum_z[l] / m);
      emit({{"type", "train"}, {"step", step + 1}, {"loss", sum_loss / m}, {"lbl", lbl}, {"zloss", z}, {"lr", lr},
            {"grad_norm", sum_norm / double(interval_steps)}, {"tokens_per_s", tok_s},
            {"step_time_ms", 1000.0 * interval_train_s / double(interval_steps)}, {"expert_load", load_json}});
      sum_loss = sum_norm = 0;
      std::fill(sum_lbl.begin(), sum_lbl.end(), 0.0);
      std::fill(sum_z.begin(), sum_z.end(), 0.0);
      for (auto& v : load) std::fill(v.begin(), v.end(), 0);
      interval_steps = interval_micro = 0;
      interval_train_s = 0;
    }
    if (opt.eval_interval > 0 && (step + 1) % opt.eval_interval == 0 && !last) {
      const Evaluation ev = evaluate(model, heldout, interval_eval_tokens, ranks.get());
      out("  eval @ %lld: held-out loss %.4f (first %lld tokens; unigram baseline %.4f)\n", (long long)(step + 1), ev.loss,
          (long long)interval_eval_tokens, baseline);
      emit({{"type", "eval"}, {"step", step + 1}, {"heldout_loss", ev.loss}, {"tokens", interval_eval_tokens}});
    }
  }

  // 4. Final evaluation on the whole held-out stream.
  const Evaluation ev = evaluate(model, heldout, std::int64_t(heldout.tokens.size()), ranks.get());
  const double wall = seconds_since(run_start);
  out("\nheld-out loss %.4f nats  vs  unigram baseline %.4f nats  (generator's own NLL %.4f)\n", ev.loss, baseline, ev.oracle);
  out("%-8s %10s %10s %8s\n", "domain", "loss", "generator", "tokens");
  nlohmann::ordered_json per_domain;
  for (int d = 0; d < domains::kNumDomains; ++d) {
    out("%-8s %10.4f %10.4f %8lld\n", domains::domain_name(d), ev.domain_loss[d], ev.domain_oracle[d],
        (long long)ev.domain_tokens[d]);
    per_domain[domains::domain_name(d)] = {{"loss", ev.domain_loss[d]}, {"generator_nll", ev.domain_oracle[d]}, {"tokens", ev.domain_tokens[d]}};
  }
  out("\nexpert routing by domain (%% of the domain's slots per expert; domain of the window's latest token)\n");
  for (std::int64_t l = 0; l < mc.blocks; ++l) {
    out("layer %lld  ", (long long)l);
    for (std::int64_t e = 0; e < n_experts; ++e) out(" %-4s", expert_label(mc, e).c_str());
    out("\n");
    for (int d = 0; d < domains::kNumDomains; ++d) {
      std::int64_t total = 0;
      for (auto c : ev.routed[l][d]) total += c;
      out("  %-8s", domains::domain_name(d));
      for (auto c : ev.routed[l][d]) out(" %4.0f", 100.0 * double(c) / double(std::max<std::int64_t>(total, 1)));
      out("\n");
    }
  }

  // Load balance over the held-out slots: each expert's load against the mean (what the LBL or, with
  // --expert-bias, the bias updates even out).
  out("\nload balance (held-out slots per expert / mean)\n");
  nlohmann::ordered_json balance_json = nlohmann::ordered_json::array();
  for (std::int64_t l = 0; l < mc.blocks; ++l) {
    std::vector<double> load(std::size_t(n_experts), 0.0);
    for (int d = 0; d < domains::kNumDomains; ++d)
      for (std::int64_t e = 0; e < n_experts; ++e) load[std::size_t(e)] += double(ev.routed[l][d][std::size_t(e)]);
    double total = 0, lo = 1e300, hi = 0;
    for (double v : load) total += v;
    const double mean = std::max(total / double(n_experts), 1e-300);
    for (double v : load) lo = std::min(lo, v / mean), hi = std::max(hi, v / mean);
    out("  layer %lld: min %.2f  max %.2f  (max |load - mean| / mean %.1f %%)\n", (long long)l, lo, hi,
        100.0 * std::max(hi - 1.0, 1.0 - lo));
    balance_json.push_back({{"min_over_mean", lo}, {"max_over_mean", hi}});
  }

  // Specialisation per layer, the share of slots that zero-computation experts took (they do no GEMM),
  // and the expert GEMM FLOPs per held-out token against the same top-k with FFN experts only.
  out("\nspecialisation (top-expert share of each domain's slots; I(domain; expert) in bits, / H(domain))\n");
  nlohmann::ordered_json spec_json = nlohmann::ordered_json::array();
  double mean_top = 0, mean_mi = 0, mean_nmi = 0, zc_slots = 0, all_slots = 0;
  std::array<double, domains::kNumDomains> zc_by_domain{}, slots_by_domain{};
  for (std::int64_t l = 0; l < mc.blocks; ++l) {
    const Specialisation sp = specialisation(ev.routed[l]);
    out("  layer %lld:", (long long)l);
    for (int d = 0; d < domains::kNumDomains; ++d) out(" %s %.2f", domains::domain_name(d), sp.top_share[d]);
    out(" | mean %.3f | MI %.3f bits (%.3f)\n", sp.mean_top_share, sp.mutual_information_bits, sp.normalised_mi);
    spec_json.push_back({{"top_share", sp.top_share}, {"mean_top_share", sp.mean_top_share},
                         {"mutual_information_bits", sp.mutual_information_bits}, {"normalised_mi", sp.normalised_mi}});
    mean_top += sp.mean_top_share / double(mc.blocks);
    mean_mi += sp.mutual_information_bits / double(mc.blocks);
    mean_nmi += sp.normalised_mi / double(mc.blocks);
    for (int d = 0; d < domains::kNumDomains; ++d)
      for (std::int64_t e = 0; e < n_experts; ++e) {
        const double c = double(ev.routed[l][d][e]);
        slots_by_domain[d] += c;
        if (e >= mc.experts) zc_by_domain[d] += c;
      }
  }
  for (int d = 0; d < domains::kNumDomains; ++d) zc_slots += zc_by_domain[d], all_slots += slots_by_domain[d];
  const double zc_share = all_slots > 0 ? zc_slots / all_slots : 0.0;
  const double eval_tokens = double(heldout.tokens.size());
  const double flops_per_token = ev.expert_gemm_flops / eval_tokens;
  const double flops_ffn_only = double(mc.blocks * mc.top_k * 6 * mc.d_model * mc.d_expert);  // SwiGLU: 3 GEMMs of 2*d*f
  out("  mean over layers: top-expert share %.3f | MI %.3f bits (%.3f)\n", mean_top, mean_mi, mean_nmi);
  out("zero-computation experts: %.1f %% of slots", 100.0 * zc_share);
  nlohmann::ordered_json zc_domain_json;
  for (int d = 0; d < domains::kNumDomains; ++d) {
    const double share = slots_by_domain[d] > 0 ? zc_by_domain[d] / slots_by_domain[d] : 0.0;
    out(" | %s %.1f %%", domains::domain_name(d), 100.0 * share);
    zc_domain_json[domains::domain_name(d)] = share;
  }
  out("\nexpert GEMM FLOPs per token (forward, all layers): %.0f = %.3f x the %.0f of top-%lld over FFN experts only\n",
      flops_per_token, flops_per_token / flops_ffn_only, flops_ffn_only, (long long)mc.top_k);
  const double tokens_per_s = double(opt.steps * opt.accum * opt.batch) / total_train_s;
  out("\ntraining %.1f s (%.0f tokens/s), total %.1f s\n", total_train_s, tokens_per_s, wall);
  std::int32_t beat = ev.loss < baseline;
  if (ranks) ranks->world().broadcast(&beat, 1, 0);  // every rank exits as rank 0 does
  nlohmann::ordered_json config = {{"balance", opt.global_balance ? "global" : "micro"}, {"granularity", opt.granularity},
                                   {"ffn_experts", mc.experts}, {"zero_experts", mc.zero_experts}, {"copy_experts", mc.copy_experts},
                                   {"constant_experts", mc.constant_experts}, {"top_k", mc.top_k}, {"d_expert", mc.d_expert},
                                   {"tau", mc.tau}, {"gating_residual", mc.gating_residual}, {"pack_by_domain", opt.pack_by_domain},
                                   {"expert_bias", opt.expert_bias}, {"bias_update_rate", opt.bias_rate},
                                   {"steps", opt.steps}, {"batch", opt.batch}, {"accum", opt.accum}, {"seed", opt.seed},
                                   {"parameters", n_params}};
  if (cuda) config["backend"] = "cuda";  // absent: host
  if (ranks) {
    const auto& g = ranks->grid();
    config["parallel"] = {{"strategy", parallel_name(opt.parallel)}, {"ranks", ranks->size()}, {"tp", g.tp}, {"ep", g.ep}, {"dp", g.dp},
                          {"rank0_parameters", n_local_params}};
  }
  emit({{"type", "final"}, {"heldout_loss", ev.loss}, {"unigram_baseline", baseline}, {"generator_nll", ev.oracle},
        {"domains", per_domain}, {"routing", ev.routed}, {"config", config},
        {"specialisation", spec_json}, {"load_balance", balance_json}, {"mean_top_share", mean_top}, {"mean_mutual_information_bits", mean_mi},
        {"mean_normalised_mi", mean_nmi}, {"zc_slot_share", zc_share}, {"zc_slot_share_by_domain", zc_domain_json},
        {"expert_gemm_flops_per_token", flops_per_token}, {"expert_gemm_flops_per_token_ffn_only", flops_ffn_only},
        {"tokens_per_s", tokens_per_s}, {"train_seconds", total_train_s}, {"wall_seconds", wall},
        {"beats_baseline", bool(beat)}});
  if (!beat) {
    out("FAIL: held-out loss is not below the unigram baseline\n");
    return 1;
  }
  return 0;
}

// This rank's place among the ranks on its node (MPI_COMM_TYPE_SHARED): {rank, size}. Collective.
#ifdef TRAIN_DOMAINS_HAS_MPI
struct NodeRanks {
  int rank = 0, size = 1;
};
static NodeRanks node_ranks() {
  MPI_Comm node = MPI_COMM_NULL;
  NodeRanks n;
  if (MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node) == MPI_SUCCESS) {
    MPI_Comm_rank(node, &n.rank);
    MPI_Comm_size(node, &n.size);
    MPI_Comm_free(&node);
  }
  return n;
}

// Threads per rank when the user chose none: the cores this rank may use, shared with the other ranks
// on its node (mpirun may bind each rank to its own cores already).
static int threads_per_rank() { return std::max(1, omp_get_num_procs() / std::max(1, node_ranks().size)); }
#endif

// Ranks that mpirun (OpenMPI, MPICH, Slurm) started, from the environment: 1 when run directly.
static int launcher_ranks() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"})
    if (const char* e = std::getenv(v)) return std::max(1, std::atoi(e));
  return 1;
}

// --backend cuda, one process: the current GPU, or nullptr after saying why there is none (exit 2).
// main() refuses --backend cuda in a build without CUDA before it gets here.
static std::unique_ptr<CudaMoeBackend> open_cuda() {
#if defined(MOEKIT_TRAIN_WITH_CUDA) && MOEKIT_TRAIN_WITH_CUDA
  if (const std::string why = cuda_device_problem(); !why.empty()) {
    std::fprintf(stderr, "error: --backend cuda: %s; run where an NVIDIA GPU is visible, or use --backend host\n", why.c_str());
    return nullptr;
  }
  return make_cuda_backend();
#else
  return nullptr;
#endif
}

// --backend cuda under mpirun: GPU (rank on node) % (devices) for each rank and the NCCL world, or
// nullptr on every rank when any rank has no GPU to use (they decide together, so none is left waiting
// in the NCCL setup). Collective.
#ifdef TRAIN_DOMAINS_HAS_MPI
static std::unique_ptr<CudaMoeBackend> open_cuda(moekit::comm::Mpi& world) {
#if defined(MOEKIT_TRAIN_WITH_CUDA) && MOEKIT_TRAIN_WITH_CUDA
  const NodeRanks node = node_ranks();
  const std::string why = cuda_device_problem(node.size);
  std::int32_t without[2] = {why.empty() ? 0 : 1, world.rank() == 0 && !why.empty() ? 1 : 0};  // ranks, rank 0
  world.all_reduce_sum(without, 2);
  if (without[0] == 0) return make_cuda_backend(world, node.rank);
  if (world.rank() == 0)
    std::fprintf(stderr, "error: --backend cuda: %d of %d ranks have no CUDA device to use%s%s\n", without[0], world.size(),
                 why.empty() ? "" : "; rank 0: ", why.c_str());
  else if (!why.empty() && without[1] == 0)  // rank 0 had a device: say why this rank has none
    std::fprintf(stderr, "error (rank %d of %d): --backend cuda: %s\n", world.rank(), world.size(), why.c_str());
  return nullptr;
#else
  (void)world;
  return nullptr;
#endif
}
#endif

int main(int argc, char** argv) {
  const Options opt = parse_args(argc, argv);
  if (opt.parallel == Parallel::kNone && launcher_ranks() > 1) {
    std::fprintf(stderr, "error: started as one of %d ranks but --parallel is none (every rank would train its own copy): "
                         "add --parallel data, expert, tensor or hybrid\n", launcher_ranks());
    return 2;
  }
  if (opt.cuda && !kCudaCompiledIn) {
    std::fprintf(stderr, "error: --backend cuda needs the CUDA MoE layers, and this train_domains was built without CUDA "
                         "(examples/train_domains/cuda_blocks.cu is compiled only when the build has CUDA, e.g. "
                         "cmake --preset cuda with nvcc installed); rebuild with CUDA, or use --backend host\n");
    return 2;
  }
  prefer_passive_openmp(argv);
  if (opt.threads > 0) set_threads(opt.threads);
  if (opt.parallel == Parallel::kNone) {
    try {
      std::unique_ptr<CudaMoeBackend> cuda;  // outlives run()'s model
      if (opt.cuda && !(cuda = open_cuda())) return 2;
      return run(opt, nullptr, cuda.get());
    } catch (const std::exception& e) {
      std::fprintf(stderr, "error: %s\n", e.what());
      return 2;
    }
  }
#ifdef TRAIN_DOMAINS_HAS_MPI
  moekit::comm::MpiSession session(&argc, &argv);
  int status = 2;
  {
    moekit::comm::Mpi world;  // freed (with everything split from it) before MPI_Finalize
    if (opt.threads == 0 && std::getenv("OMP_NUM_THREADS") == nullptr) set_threads(threads_per_rank());
    try {
      std::unique_ptr<CudaMoeBackend> cuda;  // outlives run()'s model, freed before world
      if (!opt.cuda || (cuda = open_cuda(world))) status = run(opt, &world, cuda.get());
    } catch (const moekit::ConfigError& e) {  // the same on every rank (the layers agree on their config)
      if (world.rank() == 0) std::fprintf(stderr, "error: %s\n", e.what());
      status = 2;
    } catch (const std::exception& e) {  // possibly one rank only: the others may wait in a collective
      std::fprintf(stderr, "error (rank %d of %d): %s\n", world.rank(), world.size(), e.what());
      std::fflush(stderr);
      if (world.size() > 1) MPI_Abort(MPI_COMM_WORLD, 2);
      status = 2;
    }
  }
  return status;
#else
  std::fprintf(stderr, "error: --parallel %s needs MPI, and this train_domains was built without it (CMake found no MPI, so "
                       "there was no moekit::mpi target); rebuild with MPI installed, or use --parallel none\n",
               parallel_name(opt.parallel));
  return 2;
#endif
}
