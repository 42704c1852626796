// train_lm: a byte-level decoder-only Mixture-of-Experts transformer, trained end to end.
//
// The data is bytes of text (vocabulary 256): any file with --data (the last --heldout-fraction held
// out), or by default an embedded generated corpus in four languages (corpus.hpp). The model
// (model.hpp) is a token embedding, --blocks pre-norm blocks of causal self-attention with rotary
// positions and a MoE layer, a final RMSNorm and an LM head (tied to the embedding with
// --tie-embeddings). It trains with the library's Trainer: AdamW (warmup + cosine), global gradient
// clipping at 1.0, the load-balancing and z losses. It prints a progress line per interval, evaluates
// on held-out text every --eval-interval steps, and at the end reports held-out bits per byte against
// the unigram entropy, per domain, the domain x expert routing table, and a sample continuing a
// prompt. Exit status 1 when held-out bits per byte do not end --require-gain below the unigram entropy.
//
// Every MoE flag of train_domains works here (router, MoE++ experts, granularity, balance scope, expert
// bias, gating residual, capacity factor), and --dense swaps the MoE layers for dense FFNs of the same
// active width. Under mpirun, --parallel data|expert|tensor|hybrid distributes the MoE layers as the
// library's distributed host layers (../common/ranks.hpp) while attention, norms, embedding and head
// stay data-parallel: --batch sequences are split over the ep*dp shards, dense gradients averaged.
// --backend cuda runs the whole model on one GPU (cuda_lm.hpp); the trainer below is the same.
//
// Read top to bottom: the model as the Trainer sees it (TrainedModel), then run(): data, model, trainer,
// progress and evaluation, checkpoints, the closing report and sample.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <moekit/backend/host/gemm_bf16.hpp>
#include <moekit/backend/host/gemm_library.hpp>
#include <moekit/experts/granularity.hpp>
#include <moekit/train/trainer.hpp>
#include <moekit/train/trainer_checkpoint.hpp>

#include "../common/console.hpp"
#include "../common/launch.hpp"
#include "../common/open_cuda.hpp"
#include "../common/ranks.hpp"
#include "../common/resume.hpp"
#include "cuda_lm.hpp"
#include "lm.hpp"
#include "options.hpp"
#include "report.hpp"
#include "text_data.hpp"

using Emit = std::function<void(const nlohmann::ordered_json&)>;

// The model as train::Trainer drives it: micro-batches of sequences drawn from the training text,
// forward, loss and backward, and the distributed steps around the optimizer. Every rank draws the
// whole micro-batch's start offsets from the same sampler and keeps its shard's sequences (tp ranks of a
// group the same ones): together the shards see the micro-batch a single process draws.
class TrainedModel {
 public:
  TrainedModel(Lm& model, const TextSplit& train, const Options& opt, Ranks* ranks)
      : model_(model), train_(train), opt_(opt), ranks_(ranks), sampler_(opt.seed ^ 0x53455153ull),  // "SEQS"
        local_batch_(opt.batch / (ranks ? ranks->grid().shards() : 1)), starts_(opt.batch),
        inputs_(local_batch_ * opt.seq), targets_(local_batch_ * opt.seq), dense_(model.dense_parameters()) {}

  moekit::train::MicroBatchStats train_micro_batch(std::int64_t, std::int64_t, double scale) {
    const std::uint64_t span = std::uint64_t(train_.bytes.size()) - std::uint64_t(opt_.seq);  // starts with seq + 1 bytes
    for (auto& s : starts_) s = std::int64_t(sampler_.next() % span);
    const std::int64_t shard = ranks_ ? ranks_->grid().shard() : 0;
    make_sequences(train_.bytes, starts_.data() + shard * local_batch_, local_batch_, opt_.seq, inputs_.data(), targets_.data());
    model_.forward(inputs_.data(), local_batch_, opt_.seq);
    moekit::train::MicroBatchStats s;
    s.loss = model_.loss(targets_.data(), scale);
    model_.backward(scale);
    const std::int64_t E = model_.total_experts();
    for (std::int64_t l = 0; l < model_.config().blocks; ++l) {
      auto& moe = model_.moe(l);
      s.lbl.push_back(model_.aux(l).lbl);
      s.zloss.push_back(model_.aux(l).zloss);
      const auto kept = moe.expert_counts();
      s.load.emplace_back(kept.data, kept.data + E);
      for (std::int64_t e = 0; e < E; ++e) slots_[1] += double(kept.data[e]);
      for (auto c : moe.routed_counts()) slots_[0] += double(c);
    }
    return s;
  }
  void zero_grad() { model_.zero_grad(); }
  void reduce_gradients() {
    if (ranks_) {  // gradients of the mean of the shards' losses
      ranks_->average_over_shards(dense_);
      model_.sync_moe_gradients();
    }
  }
  void after_optimizer_step() { model_.end_step(); }  // GlobalBatch buffers, BiasBalanced biases
  std::vector<moekit::Parameter<float>> parameters() { return model_.parameters(); }
  std::vector<moekit::train::ParameterGroup*> parameter_groups() { return groups_; }  // --dtype bf16's masters
  void set_parameter_groups(std::vector<moekit::train::ParameterGroup*> g) { groups_ = std::move(g); }

  // The share of routed slots that capacity dropped since the last call (all shards; collective).
  double take_dropped_share() {
    double v[2] = {slots_[0], slots_[1]};
    if (ranks_) ranks_->sum_over_shards(v, 2);
    slots_[0] = slots_[1] = 0;
    return v[0] > 0 ? 1.0 - v[1] / v[0] : 0.0;
  }
  // Checkpoints: where the sampler is, and the interval's slot counts.
  nlohmann::json state() const { return {{"sampler", sampler_.state}, {"slots", {slots_[0], slots_[1]}}}; }
  void set_state(const nlohmann::json& j) {
    sampler_.state = j.at("sampler").get<std::uint64_t>();
    slots_[0] = j.at("slots").at(0).get<double>(), slots_[1] = j.at("slots").at(1).get<double>();
  }
  void set_sampler_state(std::uint64_t s) { sampler_.state = s; }  // (common/resume.hpp)

 private:
  Lm& model_;
  const TextSplit& train_;
  const Options& opt_;
  Ranks* ranks_;
  moekit::SplitMix64 sampler_;
  std::int64_t local_batch_;
  std::vector<std::int64_t> starts_;
  std::vector<std::int32_t> inputs_, targets_;
  std::vector<moekit::Parameter<float>> dense_;
  std::vector<moekit::train::ParameterGroup*> groups_;
  double slots_[2] = {0, 0};  // routed, kept: this interval, this rank
};

// The MoE options that moved from their defaults (a checkpoint's record: empty for a run without them).
static nlohmann::json moe_options(const Options& o) {
  nlohmann::json j = o.moe.changed();
  if (o.sequence_balance) j["balance"] = "sequence";
  return j;
}

// What a checkpoint must agree with to be resumed: every flag that changes the model, the data or the
// optimisation (threads, intervals, output paths and the sample may differ).
static nlohmann::json checkpoint_config(const Options& o) {
  return {{"data", o.data}, {"heldout_fraction", o.heldout_fraction}, {"train_bytes", o.train_bytes}, {"heldout_bytes", o.heldout_bytes},
          {"seq", o.seq}, {"d_model", o.d_model}, {"heads", o.heads}, {"kv_heads", o.kv_heads}, {"blocks", o.blocks},
          {"tie_embeddings", o.tie_embeddings}, {"dense", o.dense}, {"experts", o.experts}, {"top_k", o.top_k},
          {"d_expert", o.d_expert}, {"granularity", o.granularity}, {"zero_experts", o.zero_experts}, {"copy_experts", o.copy_experts},
          {"constant_experts", o.constant_experts}, {"tau", o.tau}, {"capacity_factor", o.capacity_factor},
          {"gating_residual", o.gating_residual}, {"expert_bias", o.expert_bias}, {"global_balance", o.global_balance},
          {"bias_rate", o.bias_rate}, {"lbl_coef", o.lbl_coef}, {"zloss_coef", o.zloss_coef}, {"steps", o.steps}, {"time_budget", o.time_budget}, {"batch", o.batch},
          {"accum", o.accum}, {"lr", o.lr}, {"weight_decay", o.weight_decay}, {"seed", o.seed}, {"moe_options", moe_options(o)}};
}

// The model's config from the flags: with --granularity G, --d-expert is the d_ff being split,
// --experts E and --top-k the base counts (experts/granularity.hpp).
static LmConfig model_config(const Options& o) {
  LmConfig c;
  c.seq = o.seq, c.d_model = o.d_model, c.heads = o.heads, c.kv_heads = o.kv_heads, c.blocks = o.blocks;
  c.tie_embeddings = o.tie_embeddings, c.dense = o.dense, c.global_balance = o.global_balance;
  moekit::MoeConfig& m = c.moe;
  m.d_model = o.d_model, m.d_expert = o.d_expert, m.num_ffn_experts = o.experts, m.top_k = o.top_k;
  m.num_zero_experts = o.zero_experts, m.num_copy_experts = o.copy_experts, m.num_constant_experts = o.constant_experts;
  m.tau = o.tau, m.capacity_factor = o.capacity_factor, m.gating_residual = o.gating_residual;
  m.expert_bias = o.expert_bias, m.bias_update_rate = o.bias_rate, m.lbl_coef = o.lbl_coef, m.zloss_coef = o.zloss_coef;
  o.moe.apply(m);
  if (o.sequence_balance) m.options.set("balance", "sequence"), m.options.set("sequence_length", o.seq);  // a sequence is --seq bytes
  if (o.granularity > 1) {
    const moekit::MoeConfig fine = moekit::fine_grained_config(m, o.d_expert, o.experts, o.granularity, o.top_k);
    m.d_expert = fine.d_expert, m.num_ffn_experts = fine.num_ffn_experts, m.top_k = fine.top_k;
  }
  return c;
}

// world: the communicator of a --parallel run (nullptr: one process); cuda: --backend cuda's GPU
// (nullptr: the host).
static int run(const Options& opt, moekit::comm::HostCommunicator* world, CudaMoeBackend* cuda = nullptr) {
  // 0. Ranks: this rank's place in the tp x ep x dp grid.
  std::unique_ptr<Ranks> ranks;
  if (world) ranks = std::make_unique<Ranks>(*world, int(opt.tp), int(opt.ep));
  const int shards = ranks ? ranks->grid().shards() : 1;
  const bool root = !ranks || ranks->rank() == 0;
  g_print = root;
  if (opt.batch % shards != 0)
    throw moekit::ConfigError("--batch", std::to_string(opt.batch), "must be divisible by the " + std::to_string(shards) +
                                                                      " shards (ep * dp), each of which takes an equal part");
  std::ofstream json_out;
  if (!opt.json.empty() && root) {
    json_out.open(opt.json, opt.resume ? std::ios::app : std::ios::trunc);  // --resume appends: one file per run
    if (!json_out) throw moekit::ConfigError("--json", opt.json, "must be a writable file");
  }
  const Emit emit = [&](const nlohmann::ordered_json& j) {
    if (json_out) json_out << j.dump() << "\n" << std::flush;
  };

  // 1. Data.
  const TextData data = opt.data.empty() ? embedded_text(opt.train_bytes, opt.heldout_bytes, opt.seed)
                                         : file_text(opt.data, opt.heldout_fraction, opt.seq);
  if (std::int64_t(data.heldout.bytes.size()) <= opt.seq || std::int64_t(data.train.bytes.size()) <= opt.seq)
    throw moekit::ConfigError("--seq", std::to_string(opt.seq), "must be shorter than the training and the held-out text");
  const double unigram = unigram_bits(data.heldout.bytes);

  // 2. Model: the MoE layers from the factory this run needs.
  const LmConfig lc = model_config(opt);
  MoeBlockFactory<float> moe_blocks;  // empty: make_moe_block's single-rank host layers
  if (ranks) moe_blocks = ranks->moe_blocks<float>();
  else if (opt.bf16) moe_blocks = make_bf16_moe_block;
  std::unique_ptr<Lm> model_ptr;
#if defined(MOEKIT_TRAIN_WITH_CUDA) && MOEKIT_TRAIN_WITH_CUDA
  if (cuda) model_ptr = make_cuda_lm(lc, opt.seed, *cuda, opt.bf16);
#endif
  if (!model_ptr) {
    auto host = std::make_unique<HostLm>(lc, opt.seed, moe_blocks);
    if (opt.bf16) host->model().set_matmul_precision(moekit::backend::host::MatmulPrecision::kBf16);
    model_ptr = std::move(host);
  }
  Lm& model = *model_ptr;
  TrainedModel trained(model, data.train, opt, ranks.get());
  std::int64_t n_local = 0, n_moe = 0;
  const auto params = model.parameter_shapes();
  for (const auto& p : params) n_local += p.numel();
  const std::int64_t n_params = ranks ? ranks->full_parameter_count(params) : n_local;
  for (const auto& p : model.dense_parameter_shapes()) n_moe -= p.numel();
  n_moe += n_params;  // what the MoE layers hold (full model)
  const moekit::MoeConfig& mc = model.layer_config();
  // Active per token: the dense parameters, each block's router and top_k of its experts.
  const std::int64_t n_active = (n_params - n_moe) + lc.blocks * (mc.d_model * mc.num_experts() + mc.top_k * 3 * mc.d_model * mc.d_expert);

  // 3. The trainer: AdamW (weight decay on matrices only), warmup + cosine to a tenth, clipping at 1.0.
  moekit::train::TrainerConfig tc;
  tc.steps = opt.steps, tc.accum = opt.accum, tc.tokens_per_micro_batch = opt.batch * opt.seq;
  tc.log_interval = opt.log_interval, tc.eval_interval = opt.eval_interval, tc.max_grad_norm = 1.0;
  tc.max_bad_steps = opt.max_bad_steps, tc.time_budget_s = opt.time_budget;
  moekit::train::AdamWConfig ac;
  ac.lr = opt.lr, ac.beta2 = 0.95, ac.weight_decay = opt.weight_decay;
  const moekit::train::CosineSchedule schedule{opt.lr, opt.lr / 10, std::max<std::int64_t>(1, opt.steps / 20), opt.steps};
  const moekit::train::Reductions red = ranks ? ranks->reductions() : moekit::train::Reductions{};
  trained.set_parameter_groups(model.parameter_groups(ac));
  moekit::train::Trainer<TrainedModel> trainer(
      trained, tc, ac, schedule, [](const moekit::Parameter<float>& p) { return p.shape.size() >= 2; }, red);

  out("train_lm: %s | %zu training bytes, %zu held-out bytes | held-out unigram entropy %.3f bits per byte\n", data.source.c_str(),
      data.train.bytes.size(), data.heldout.bytes.size(), unigram);
  out("model: %lld blocks of [attention %lld heads (%lld kv), RoPE | %s] | d_model %lld, seq %lld%s | %.2fM parameters, %.2fM active per token\n",
      (long long)lc.blocks, (long long)lc.heads, (long long)lc.kv_heads,
      opt.dense ? ("dense FFN " + std::to_string(mc.d_expert)).c_str()
                : ("MoE " + std::to_string(mc.num_ffn_experts) + " experts of " + std::to_string(mc.d_expert) + ", top-" +
                   std::to_string(mc.top_k) + (mc.num_zc_experts() > 0 ? " + " + std::to_string(mc.num_zc_experts()) + " MoE++" : std::string()))
                      .c_str(),
      (long long)lc.d_model, (long long)lc.seq, lc.tie_embeddings ? ", tied head" : "", double(n_params) / 1e6, double(n_active) / 1e6);
  if (opt.moe.any()) out("router and experts: %s\n", opt.moe.changed().dump().c_str());
  if (cuda)
    out("backend: %s | the whole model and its AdamW on the GPU; the host sees token ids, the loss and the metrics\n",
        model.describe().c_str());
  else
    out("%s | threads %d\n", moekit::backend::host::gemm_library().line().c_str(), omp_get_max_threads());
  if (opt.bf16 && cuda) out("dtype: bf16 storage of activations and weights, fp32 gradients, AdamW masters and accumulation\n");
  else if (opt.bf16)
    out("dtype: bf16 products everywhere (%s): the MoE layers store bf16 weights (fp32 masters); attention and the head round "
        "their operands to bf16 from fp32 masters and activations; norms, softmax, residuals and the loss in fp32\n",
        moekit::backend::host::bf16_gemm().line().c_str());
  if (ranks) {
    const auto& g = ranks->grid();
    out("parallel: %s over %d ranks = tp %d x ep %d x dp %d | %d shards x %lld sequences | attention and embeddings data-parallel\n",
        parallel_name(opt.parallel), ranks->size(), g.tp, g.ep, g.dp, shards, (long long)(opt.batch / shards));
  }
  if (opt.time_budget > 0)
    out("time budget: %.0f s of training (evaluations excluded), the schedule over time; at most %lld steps\n", opt.time_budget,
        (long long)opt.steps);
  out("training: %lld steps x %lld sequences x %lld bytes x %lld micro-batches | AdamW lr %.1e (warmup %lld, cosine) | balance %s, lbl %.3g, z %.3g\n\n",
      (long long)opt.steps, (long long)opt.batch, (long long)opt.seq, (long long)opt.accum, opt.lr, (long long)schedule.warmup_steps,
      opt.global_balance ? "global" : opt.sequence_balance ? "sequence" : "micro", opt.lbl_coef, opt.zloss_coef);

  // 4. Progress: a line per interval; a held-out evaluation every --eval-interval steps.
  Progress progress;
  const std::int64_t E = model.total_experts();
  trainer.on_log([&](const moekit::train::IntervalReport& r) {
    const double dropped = trained.take_dropped_share(), elapsed = trainer.train_seconds();
    double zero_share = 0;  // slots sent to zero-computation experts (after the FFN experts), all layers
    for (const auto& layer : r.expert_load)
      for (std::int64_t e = mc.num_ffn_experts; e < E; ++e) zero_share += layer[e] / double(r.expert_load.size());
    char line[512];
    std::snprintf(line, sizeof line, "step %5lld/%lld | loss %.4f | %.3f bpb | lbl %.3f | %6.0f tok/s | ETA %s | load max/mean %s%s",
                  (long long)r.step, (long long)r.steps, r.loss, r.loss / kLn2,
                  r.lbl.empty() ? 0.0 : std::accumulate(r.lbl.begin(), r.lbl.end(), 0.0) / double(r.lbl.size()), r.tokens_per_s,
                  duration_text(opt.time_budget > 0 ? std::max(0.0, opt.time_budget - elapsed)
                                                    : elapsed / double(r.step) * double(r.steps - r.step)).c_str(), load_summary(r.expert_load).c_str(),
                  r.bad_steps_total > 0 ? (" | skipped " + std::to_string(r.bad_steps_total) + " steps").c_str() : "");
    progress.line(line);
    emit({{"type", "train"}, {"step", r.step}, {"elapsed_s", elapsed}, {"loss", r.loss}, {"bits_per_byte", r.loss / kLn2},
          {"lbl", r.lbl}, {"zloss", r.zloss}, {"expert_load", r.expert_load}, {"dropped_share", dropped}, {"zero_share", zero_share},
          {"grad_norm", r.grad_norm}, {"lr", r.lr}, {"step_time_ms", r.step_time_ms}, {"tokens_per_s", r.tokens_per_s},
          {"bad_steps", r.bad_steps}, {"bad_steps_total", r.bad_steps_total}});
  });
  const std::size_t n_domains = data.domain_names.size();
  trainer.on_eval([&](std::int64_t step) {
    const Evaluation ev = evaluate(model, data.heldout, n_domains, opt.eval_bytes);
    progress.settle();
    out("  eval @ %lld: held-out %.3f bits per byte (%.4f nats; %lld bytes) | unigram %.3f\n", (long long)step, ev.bits(), ev.loss,
        (long long)ev.bytes, unigram);
    std::fflush(stdout);
    emit({{"type", "eval"}, {"step", step}, {"elapsed_s", trainer.train_seconds()}, {"heldout_loss", ev.loss},
          {"heldout_bits_per_byte", ev.bits()}, {"bytes", ev.bytes}});
  });

  // 5. Checkpoints (docs/checkpoints.md): resume from the newest that verifies; one every
  // --checkpoint-interval steps and one at the end.
  std::optional<moekit::train::CheckpointDir> checkpoints;
  if (!opt.checkpoint_dir.empty()) {
    checkpoints.emplace(opt.checkpoint_dir, opt.keep);
    const nlohmann::json config = checkpoint_config(opt);
    if (opt.resume) {
      const nlohmann::json run = resume(*checkpoints, trainer, trained, model, config, ranks.get());
      if (run.contains("trained")) trained.set_state(run.at("trained"));
    }
    trainer.on_step([&, config](std::int64_t done) {
      if ((opt.checkpoint_interval > 0 && done % opt.checkpoint_interval == 0) || done == opt.steps || trainer.out_of_time()) {
        const nlohmann::json run = {{"sampler", trained.state().at("sampler")}, {"trained", trained.state()},
                                    {"router_states", model.router_states()}, {"config", config}};
        const moekit::ParallelGrid grid = ranks ? ranks->grid() : moekit::ParallelGrid{};
        const auto dir = checkpoints->save(done, moekit::train::trainer_checkpoint(trainer, run, grid),
                                           ranks ? ranks->checkpoint_ranks() : moekit::train::CheckpointRanks{});
        progress.settle();
        out("  checkpoint @ %lld: %s\n", (long long)done, dir.string().c_str());
      }
    });
  }
  trainer.run();
  progress.settle();
  const std::int64_t steps_done = trainer.steps_done();  // --steps, or fewer under --time-budget

  // 6. The closing report: the whole held-out text (up to 1 MiB), per domain, and the routing table.
  const Evaluation ev = evaluate(model, data.heldout, n_domains, std::int64_t(1) << 20);
  out("\nheld-out: %.3f bits per byte (%.4f nats) over %lld bytes | unigram entropy %.3f | %.1f%% below it\n", ev.bits(), ev.loss,
      (long long)ev.bytes, unigram, 100.0 * (1.0 - ev.bits() / unigram));
  emit({{"type", "eval"}, {"step", steps_done}, {"elapsed_s", trainer.train_seconds()}, {"heldout_loss", ev.loss},
        {"heldout_bits_per_byte", ev.bits()}, {"bytes", ev.bytes}, {"final", true}});
  if (n_domains > 1) {
    out("per domain (bits per byte):");
    for (std::size_t d = 0; d < n_domains; ++d) out(" %s %.3f", data.domain_names[d].c_str(), ev.domain_loss[d] / kLn2);
    out("\n");
  }
  if (!opt.dense)
    for (std::int64_t l = 0; l < lc.blocks; ++l) {
      out("routing, block %lld (%% of each domain's slots per expert):\n", (long long)l);
      std::vector<std::vector<double>> share(n_domains, std::vector<double>(std::size_t(E), 0.0));
      for (std::size_t d = 0; d < n_domains; ++d) {
        double total = 0;
        for (auto c : ev.routed[l][d]) total += double(c);
        out("  %-8s", data.domain_names[d].c_str());
        for (std::int64_t e = 0; e < E; ++e) {
          share[d][e] = total > 0 ? double(ev.routed[l][d][e]) / total : 0.0;
          out(" %3.0f", 100.0 * share[d][e]);
        }
        out("\n");
      }
      emit({{"type", "routing"}, {"layer", l}, {"domains", data.domain_names}, {"experts", E}, {"share", share}});
    }
  if (opt.sample_tokens > 0) {
    std::string prompt = opt.sample_prompt;
    if (prompt.empty()) prompt = data.heldout.bytes.substr(0, std::min<std::size_t>(40, data.heldout.bytes.find('\n') + 1));
    const std::string text = generate(model, prompt, opt.sample_tokens, opt.temperature, opt.sample_top_k, opt.seed, ranks.get());
    out("\nsample (temperature %.2f, top-%lld), prompt in brackets:\n[%s]%s\n", opt.temperature, (long long)opt.sample_top_k,
        printable_utf8(prompt).c_str(), printable_utf8(text.substr(prompt.size())).c_str());
    emit({{"type", "sample"}, {"prompt", printable_utf8(prompt)}, {"text", printable_utf8(text.substr(prompt.size()))}});
  }
  out("\ntrained %lld steps in %s (%.0f bytes/s)%s%s\n", (long long)steps_done, duration_text(trainer.train_seconds()).c_str(),
      double(steps_done * opt.accum * opt.batch * opt.seq) / std::max(1e-9, trainer.train_seconds()),
      opt.json.empty() ? "" : " | metrics: ", opt.json.c_str());
  // Speed: the model FLOPs of the steps (LmConfig::flops) per second of training, against the measured
  // dense-GEMM ceiling of this backend (one process; under mpirun the ranks share the machine's cores).
  const moekit::science::Flops step_flops = double(opt.accum) * lc.flops(opt.batch);
  const double flops_per_s = step_flops.total() * double(steps_done) / std::max(1e-9, trainer.train_seconds());
  if (!ranks) {
    const GemmCeiling ceiling = model.gemm_ceiling();
    out("compute: %.3g GFLOP a step (matrix products, forward + backward) | %.2f GFLOP/s | %.1f%% of the dense-GEMM ceiling "
        "%.2f GFLOP/s (%s)\n",
        step_flops.total() / 1e9, flops_per_s / 1e9, 100.0 * flops_per_s / ceiling.flops_per_s, ceiling.flops_per_s / 1e9,
        ceiling.what.c_str());
    emit({{"type", "speed"}, {"flops_per_step", step_flops.total()}, {"forward_flops_per_step", step_flops.forward},
          {"flops_per_s", flops_per_s}, {"gemm_ceiling_flops_per_s", ceiling.flops_per_s}, {"gemm_ceiling", ceiling.what},
          {"mfu", flops_per_s / ceiling.flops_per_s}, {"backend", model.describe()}});
  } else {
    out("compute: %.3g GFLOP a step (matrix products, forward + backward) | %.2f GFLOP/s over %d ranks\n", step_flops.total() / 1e9,
        flops_per_s / 1e9, ranks->size());
  }
  const bool learnt = ev.bits() <= unigram - opt.require_gain;
  if (!learnt)
    std::fprintf(stderr, "train_lm: held-out %.3f bits per byte is not %.3f below the unigram entropy %.3f\n", ev.bits(), opt.require_gain, unigram);
  return learnt ? 0 : 1;
}

int main(int argc, char** argv) {
  const Options opt = parse_options(argc, argv);
  if (opt.parallel == Parallel::kNone && launcher_ranks() > 1) {
    std::fprintf(stderr, "error: started as one of %d ranks but --parallel is none (every rank would train its own copy): "
                         "add --parallel data, expert, tensor or hybrid\n", launcher_ranks());
    return 2;
  }
  if (opt.cuda) {
    const char* why = !kCudaCompiledIn ? "this train_lm was built without CUDA (cuda_lm.cu is compiled only when the build has CUDA, "
                                         "e.g. cmake --preset cuda with nvcc installed); rebuild with CUDA, or use --backend host"
                      : opt.parallel != Parallel::kNone ? "runs on one GPU for now (the dense gradients' NCCL all-reduce is not built); "
                                                          "drop --parallel, or use --backend host under mpirun"
                                                          : nullptr;
    if (why) {
      std::fprintf(stderr, "error: --backend cuda: %s\n", why);
      return 2;
    }
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
#ifdef MOEKIT_EXAMPLE_HAS_MPI
  return run_under_mpi(&argc, &argv, opt.threads, [&](moekit::comm::Mpi& w) { return run(opt, &w); });
#else
  std::fprintf(stderr, "error: --parallel %s needs MPI, and this train_lm was built without it; rebuild with MPI, or use --parallel none\n",
               parallel_name(opt.parallel));
  return 2;
#endif
}
