#pragma once
// train_domains' flags, parsed by CLI11 (Debian libcli11-dev). --help lists them with their defaults.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include <CLI/CLI.hpp>

#include "../common/moe_flags.hpp"
#include "../common/ranks.hpp"

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
  bool expert_bias = false;  // --expert-bias (router::BiasBalanced)
  double bias_rate = 1e-3;   // --bias-rate
  MoeFlags moe;              // the open models' routers and experts (--router, --n-group, --activation, ...)
  bool pack_by_domain = false;
  Parallel parallel = Parallel::kNone;  // --parallel (needs mpirun for more than one rank)
  std::int64_t tp = 1, ep = 1;          // dp = ranks / (tp * ep)
  bool cuda = false;                    // --backend cuda: the MoE layers on the GPU
  bool bf16 = false;                    // --dtype bf16: the MoE layers in backend::Host<bf16>
  std::string checkpoint_dir;           // --checkpoint-dir (empty: no checkpoints)
  std::int64_t checkpoint_interval = 0;  // steps between checkpoints (0: only at the end)
  int keep = 0;                         // --keep N newest checkpoints (0: all)
  bool resume = false;                  // --resume from the newest checkpoint that verifies
  std::int64_t max_bad_steps = 3;       // non-finite steps in a row that stop the run
  // --inject-fault KIND:RANK:STEP (tests of failures under mpirun; hidden from --help): at 0-based
  // step STEP rank RANK throws (throw), or from STEP on reports a non-finite loss (nan).
  struct Fault {
    std::string kind;  // empty: none
    int rank = 0;
    std::int64_t step = 0;
  } fault;
};

// The flags; exits 0 after --help and 2 (with the message) on a bad flag or value.
inline Options parse_options(int argc, char** argv) {
  Options o;
  CLI::App app{"train_domains: a small MoE language model on four generated languages (docs/train_domains.md)"};
  app.option_defaults()->always_capture_default();
  const auto positive = CLI::PositiveNumber, nonneg = CLI::NonNegativeNumber;
  app.add_option("--steps", o.steps, "optimizer steps")->check(positive);
  app.add_option("--batch", o.batch, "tokens per micro-batch (the global one under --parallel)")->check(positive);
  app.add_option("--accum", o.accum, "micro-batches per step (gradient accumulation)")->check(positive);
  app.add_option("--lr", o.lr, "peak learning rate of the warmup + cosine schedule")->check(nonneg);
  app.add_option("--experts", o.experts, "FFN experts per MoE layer")->check(positive);
  app.add_option("--top-k", o.top_k, "experts per token")->check(positive);
  app.add_option("--d-model", o.d_model, "model width")->check(positive);
  app.add_option("--d-expert", o.d_expert, "hidden width of each expert")->check(positive);
  app.add_option("--context", o.context, "tokens in the input window")->check(positive);
  app.add_option("--lbl-coef", o.lbl_coef, "load-balancing loss coefficient")->check(nonneg);
  app.add_option("--zloss-coef", o.zloss_coef, "router z-loss coefficient")->check(nonneg);
  app.add_option("--weight-decay", o.weight_decay, "AdamW weight decay of the matrices")->check(nonneg);
  app.add_option("--seed", o.seed, "seed of the languages, the streams and the initialisation");
  app.add_option("--eval-interval", o.eval_interval, "steps between held-out evaluations (0: only at the end)")->check(nonneg);
  app.add_option("--log-interval", o.log_interval, "steps between progress lines")->check(positive);
  app.add_option("--train-tokens", o.train_tokens, "length of the generated training stream")->check(positive);
  app.add_option("--heldout-tokens", o.heldout_tokens, "length of the held-out stream")->check(positive);
  app.add_option("--threads", o.threads, "OpenMP (and OpenBLAS) threads (0: all cores)")->check(nonneg);
  app.add_option("--json", o.json, "write metrics as JSON lines to this file");
  std::string balance = "micro", parallel = "none", backend = "host";
  app.add_option("--balance", balance,
                 "load-balance scope: micro (per micro-batch) or global (counts summed over the step's micro-batches)")
      ->check(CLI::IsMember({"micro", "global"}));
  app.add_option("--granularity", o.granularity, "fine-grained experts: G*experts experts of d_expert/G, top-(G*top_k)")
      ->check(positive);
  app.add_option("--zero", o.zero_experts, "MoE++ zero experts, E(x) = 0")->check(nonneg);
  app.add_option("--copy", o.copy_experts, "MoE++ copy experts, E(x) = x")->check(nonneg);
  app.add_option("--constant", o.constant_experts, "MoE++ constant experts, E(x) = a1 x + a2 v")->check(nonneg);
  app.add_option("--tau", o.tau, "MoE++ tau: weight of the zero-computation experts in the balance loss")->check(positive);
  app.add_flag("--gating-residual", o.gating_residual, "each MoE router adds W_g * (the previous MoE layer's logits)");
  app.add_flag("--expert-bias", o.expert_bias,
               "aux-loss-free balancing (DeepSeek-V3): per-expert selection biases moved by --bias-rate * sign(mean load - load) "
               "after each step (try --lbl-coef 0)");
  app.add_option("--bias-rate", o.bias_rate, "u of the expert-bias update")->check(nonneg);
  o.moe.add_to(app);
  app.add_flag("--pack-by-domain", o.pack_by_domain, "every micro-batch from one domain (drawn at random)");
  app.add_option("--parallel", parallel, "none, or under mpirun: data, expert, tensor or hybrid")
      ->check(CLI::IsMember({"none", "data", "expert", "tensor", "hybrid"}));
  app.add_option("--tp", o.tp, "tensor-parallel degree (tensor, hybrid): each expert's d_expert split over N ranks")->check(positive);
  app.add_option("--ep", o.ep, "expert-parallel degree (expert, hybrid); dp = ranks / (tp * ep)")->check(positive);
  app.add_option("--backend", backend, "host, or cuda: the MoE layers on the GPU (a build with CUDA)")
      ->check(CLI::IsMember({"host", "cuda"}));
  std::string dtype = "fp32";
  app.add_option("--dtype", dtype,
                 "fp32, or bf16: the MoE layers in bf16 with fp32 accumulation and fp32 master weights (host, one process)")
      ->check(CLI::IsMember({"fp32", "bf16"}));
  app.add_option("--checkpoint-dir", o.checkpoint_dir, "write checkpoints (step-NNNNNN/ folders) here (docs/checkpoints.md)");
  app.add_option("--checkpoint-interval", o.checkpoint_interval, "steps between checkpoints (0: at the end only)")->check(nonneg);
  app.add_option("--keep", o.keep, "keep the newest N checkpoints (0: all)")->check(CLI::NonNegativeNumber);
  app.add_option("--max-bad-steps", o.max_bad_steps, "steps in a row with a non-finite loss or gradient norm (each skipped) that stop the run")
      ->check(positive);
  app.add_flag("--resume", o.resume, "continue from the newest checkpoint in --checkpoint-dir that verifies");
  std::string fault;
  app.add_option("--inject-fault", fault, "KIND:RANK:STEP, KIND throw or nan (tests)")->group("");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    std::exit(app.exit(e));
  } catch (const CLI::ParseError& e) {
    app.exit(e);  // prints the message
    std::exit(2);
  }
  if (!fault.empty()) {
    char kind[16] = {};
    long long step = -1;
    if (std::sscanf(fault.c_str(), "%15[a-z]:%d:%lld", kind, &o.fault.rank, &step) != 3 ||
        (std::string(kind) != "throw" && std::string(kind) != "nan") || o.fault.rank < 0 || step < 0) {
      std::fprintf(stderr, "error: --inject-fault %s: expected KIND:RANK:STEP with KIND throw or nan, RANK and STEP >= 0\n", fault.c_str());
      std::exit(2);
    }
    o.fault.kind = kind, o.fault.step = step;
  }
  o.global_balance = balance == "global";
  parse_parallel(parallel, o.parallel);
  o.cuda = backend == "cuda";
  o.bf16 = dtype == "bf16";
  if (o.bf16 && (o.cuda || o.parallel != Parallel::kNone)) {
    std::fprintf(stderr, "error: --dtype bf16 runs the host layers in one process (backend::Host<bf16>); %s\n",
                 o.cuda ? "--backend cuda trains in fp32 here" : "--parallel needs --dtype fp32");
    std::exit(2);
  }
  if ((o.resume || o.checkpoint_interval > 0 || o.keep > 0) && o.checkpoint_dir.empty()) {
    std::fprintf(stderr, "error: --%s needs --checkpoint-dir\n", o.resume ? "resume" : o.keep > 0 ? "keep" : "checkpoint-interval");
    std::exit(2);
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
