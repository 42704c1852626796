#pragma once
// train_lm's flags, parsed by CLI11 (Debian libcli11-dev). --help lists them with their defaults.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include <CLI/CLI.hpp>

#include "../common/moe_flags.hpp"
#include "../common/ranks.hpp"

struct Options {
  // Data.
  std::string data;  // empty: the embedded corpus
  double heldout_fraction = 0.1;
  std::int64_t train_bytes = 1 << 20, heldout_bytes = 1 << 16;  // embedded corpus
  // Model.
  std::int64_t seq = 128, d_model = 128, heads = 4, kv_heads = 0, blocks = 3;  // kv_heads 0: = heads
  bool tie_embeddings = false, dense = false;
  std::int64_t experts = 8, top_k = 2, d_expert = 256, granularity = 1;
  std::int64_t zero_experts = 0, copy_experts = 0, constant_experts = 0;
  double tau = 1.0, capacity_factor = 0.0;
  bool gating_residual = false, expert_bias = false, global_balance = false, sequence_balance = false;
  double bias_rate = 1e-3, lbl_coef = 0.01, zloss_coef = 1e-3;
  MoeFlags moe;  // the open models' routers and experts (--router, --n-group, --activation, ...)
  // Optimisation.
  std::int64_t steps = 1200, batch = 16, accum = 1;  // batch: sequences per micro-batch (all ranks together)
  double lr = 3e-3, weight_decay = 0.1;
  double time_budget = 0;  // seconds of training; 0: --steps steps
  std::uint64_t seed = 1234;
  std::int64_t max_bad_steps = 3;
  // Output.
  std::int64_t log_interval = 50, eval_interval = 200, eval_bytes = 1 << 15;
  std::string json;
  std::string sample_prompt;  // empty: the first line of the held-out text
  std::int64_t sample_tokens = 240, sample_top_k = 20;
  double temperature = 0.8;
  double require_gain = 0.0;  // exit 1 unless held-out bits per byte <= unigram - this
  int threads = 0;
  // Where it runs.
  Parallel parallel = Parallel::kNone;
  std::int64_t tp = 1, ep = 1;
  bool cuda = false, bf16 = false;
  // Checkpoints.
  std::string checkpoint_dir;
  std::int64_t checkpoint_interval = 0;
  int keep = 0;
  bool resume = false;
};

// The flags; exits 0 after --help and 2 (with the message) on a bad flag or value.
inline Options parse_options(int argc, char** argv) {
  Options o;
  CLI::App app{"train_lm: a byte-level decoder-only MoE transformer (docs/train_lm.md)"};
  app.option_defaults()->always_capture_default();
  const auto positive = CLI::PositiveNumber, nonneg = CLI::NonNegativeNumber;
  app.add_option("--data", o.data, "train on this text file (bytes; the last --heldout-fraction held out); default: the embedded corpus");
  app.add_option("--heldout-fraction", o.heldout_fraction, "share of --data held out for evaluation")->check(CLI::Range(0.001, 0.5));
  app.add_option("--train-bytes", o.train_bytes, "embedded corpus: bytes of training text")->check(positive);
  app.add_option("--heldout-bytes", o.heldout_bytes, "embedded corpus: bytes of held-out text")->check(positive);
  app.add_option("--seq", o.seq, "context length in bytes")->check(CLI::Range(std::int64_t(1), std::int64_t(1) << 16));
  app.add_option("--d-model", o.d_model, "model width")->check(positive);
  app.add_option("--heads", o.heads, "attention heads (d_model / heads must be even)")->check(positive);
  app.add_option("--kv-heads", o.kv_heads, "key/value heads (grouped-query attention; 0: as many as --heads)")->check(nonneg);
  app.add_option("--blocks", o.blocks, "transformer blocks")->check(positive);
  app.add_flag("--tie-embeddings", o.tie_embeddings, "the LM head is the embedding matrix");
  app.add_flag("--dense", o.dense, "a dense FFN of top_k * d_expert per block instead of the MoE layer (same active parameters)");
  app.add_option("--experts", o.experts, "FFN experts per MoE layer")->check(positive);
  app.add_option("--top-k", o.top_k, "experts per token")->check(positive);
  app.add_option("--d-expert", o.d_expert, "hidden width of each expert")->check(positive);
  app.add_option("--granularity", o.granularity, "fine-grained experts: G*experts experts of d_expert/G, top-(G*top_k)")->check(positive);
  app.add_option("--zero", o.zero_experts, "MoE++ zero experts, E(x) = 0")->check(nonneg);
  app.add_option("--copy", o.copy_experts, "MoE++ copy experts, E(x) = x")->check(nonneg);
  app.add_option("--constant", o.constant_experts, "MoE++ constant experts, E(x) = a1 x + a2 v")->check(nonneg);
  app.add_option("--tau", o.tau, "MoE++ tau: weight of the zero-computation experts in the balance loss")->check(positive);
  app.add_option("--capacity-factor", o.capacity_factor, "expert capacity factor (0: dropless)")->check(nonneg);
  app.add_flag("--gating-residual", o.gating_residual, "each MoE router adds W_g * (the previous block's router logits)");
  app.add_flag("--expert-bias", o.expert_bias, "aux-loss-free balancing (DeepSeek-V3): per-expert selection biases");
  app.add_option("--bias-rate", o.bias_rate, "u of the expert-bias update")->check(nonneg);
  std::string balance = "micro", parallel = "none", backend = "host", dtype = "fp32";
  app.add_option("--balance", balance,
                 "load-balance scope: micro, global, or sequence (f and P per sequence of --seq bytes, DeepSeek-V3's)")
      ->check(CLI::IsMember({"micro", "global", "sequence"}));
  app.add_option("--lbl-coef", o.lbl_coef, "load-balancing loss coefficient")->check(nonneg);
  app.add_option("--zloss-coef", o.zloss_coef, "router z-loss coefficient")->check(nonneg);
  o.moe.add_to(app);
  app.add_option("--steps", o.steps, "optimizer steps (with --time-budget: the most, and the schedule's nominal length)")->check(positive);
  app.add_option("--time-budget", o.time_budget,
                 "seconds of training (evaluations excluded): stop there, the learning-rate schedule over time (0: off; one process)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--batch", o.batch, "sequences per micro-batch (the global one under --parallel)")->check(positive);
  app.add_option("--accum", o.accum, "micro-batches per step (gradient accumulation)")->check(positive);
  app.add_option("--lr", o.lr, "peak learning rate (warmup, then cosine to a tenth)")->check(nonneg);
  app.add_option("--weight-decay", o.weight_decay, "AdamW weight decay of the matrices")->check(nonneg);
  app.add_option("--seed", o.seed, "seed of the data, the initialisation and the sampler");
  app.add_option("--max-bad-steps", o.max_bad_steps, "non-finite steps in a row (each skipped) that stop the run")->check(positive);
  app.add_option("--log-interval", o.log_interval, "steps between progress lines")->check(positive);
  app.add_option("--eval-interval", o.eval_interval, "steps between held-out evaluations (0: only at the end)")->check(nonneg);
  app.add_option("--eval-bytes", o.eval_bytes, "held-out bytes of each interval evaluation (the final one reads all)")->check(positive);
  app.add_option("--json", o.json, "write metrics as JSON lines to this file (tools/plot_run draws them)");
  app.add_option("--sample-prompt", o.sample_prompt, "text the closing sample continues (default: the held-out text's first line)");
  app.add_option("--sample-tokens", o.sample_tokens, "bytes to generate at the end (0: no sample)")->check(nonneg);
  app.add_option("--temperature", o.temperature, "sampling temperature (0: greedy)")->check(nonneg);
  app.add_option("--sample-top-k", o.sample_top_k, "sample among the k likeliest bytes (0: all)")->check(nonneg);
  app.add_option("--require-gain", o.require_gain, "exit 1 unless held-out bits per byte end this far below the unigram entropy");
  app.add_option("--threads", o.threads, "OpenMP (and OpenBLAS) threads (0: all cores)")->check(nonneg);
  app.add_option("--parallel", parallel, "none, or under mpirun: data, expert, tensor or hybrid (attention stays data-parallel)")
      ->check(CLI::IsMember({"none", "data", "expert", "tensor", "hybrid"}));
  app.add_option("--tp", o.tp, "tensor-parallel degree of the experts (tensor, hybrid)")->check(positive);
  app.add_option("--ep", o.ep, "expert-parallel degree (expert, hybrid); dp = ranks / (tp * ep)")->check(positive);
  app.add_option("--backend", backend, "host, or cuda (the whole model on one GPU; fp32, one process)")->check(CLI::IsMember({"host", "cuda"}));
  app.add_option("--dtype", dtype, "fp32, or bf16: bf16 products with fp32 masters and accumulation (host: one process)")
      ->check(CLI::IsMember({"fp32", "bf16"}));
  app.add_option("--checkpoint-dir", o.checkpoint_dir, "write checkpoints (step-NNNNNN/ folders) here (docs/checkpoints.md)");
  app.add_option("--checkpoint-interval", o.checkpoint_interval, "steps between checkpoints (0: at the end only)")->check(nonneg);
  app.add_option("--keep", o.keep, "keep the newest N checkpoints (0: all)")->check(CLI::NonNegativeNumber);
  app.add_flag("--resume", o.resume, "continue from the newest checkpoint in --checkpoint-dir that verifies");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    std::exit(app.exit(e));
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    std::exit(2);
  }
  o.global_balance = balance == "global";
  o.sequence_balance = balance == "sequence";
  parse_parallel(parallel, o.parallel);
  o.cuda = backend == "cuda";
  o.bf16 = dtype == "bf16";
  if (o.kv_heads == 0) o.kv_heads = o.heads;
  auto fail = [](const std::string& msg) {
    std::fprintf(stderr, "error: %s\n", msg.c_str());
    std::exit(2);
  };
  if (o.time_budget > 0 && o.parallel != Parallel::kNone)
    fail("--time-budget runs in one process (ranks would stop at different steps); drop --parallel or the budget");
  if (o.bf16 && o.parallel != Parallel::kNone) fail("--dtype bf16 runs the host MoE layers in one process; --parallel needs --dtype fp32");
  if ((o.resume || o.checkpoint_interval > 0 || o.keep > 0) && o.checkpoint_dir.empty())
    fail(std::string("--") + (o.resume ? "resume" : o.keep > 0 ? "keep" : "checkpoint-interval") + " needs --checkpoint-dir");
  if (o.dense && (o.zero_experts + o.copy_experts + o.constant_experts > 0 || o.granularity > 1 || o.expert_bias || o.gating_residual ||
                  o.ep > 1 || o.moe.any()))
    fail("--dense has one FFN per block: it takes none of --zero/--copy/--constant, --granularity, --expert-bias, --gating-residual, --ep, "
         "nor the router and expert flags of the open models");
  const auto [tp_ok, ep_ok] = allowed_degrees(o.parallel);
  if ((o.tp > 1 && !tp_ok) || (o.ep > 1 && !ep_ok))
    fail(o.tp > 1 && !tp_ok ? "--tp " + std::to_string(o.tp) + " needs --parallel tensor or hybrid (got " + parallel + ")"
                            : "--ep " + std::to_string(o.ep) + " needs --parallel expert or hybrid (got " + parallel + ")");
  return o;
}
