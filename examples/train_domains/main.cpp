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
// library's distributed host layers (../common/ranks.hpp): --batch stays the global micro-batch, split over the
// ep·dp shards; dense gradients are averaged over the shards, the MoE layers sync theirs, and the
// global gradient norm counts each parameter of the full model once. Rank 0 prints and writes the JSON.
//
// --backend cuda puts the MoE layers on the GPU (cuda_blocks.hpp; one GPU per rank under mpirun, NCCL
// inside the layers) and keeps the embedding, norms, head and AdamW here on the host.
//
// Read top to bottom: the model as the library's Trainer sees it, then run(): data, model, the trainer
// (moekit/train/trainer.hpp: accumulation, gradient reduction, clipping, AdamW, the schedule, the
// layers' per-step hook), progress and evaluation, the closing report. Flags: options.hpp (CLI11);
// evaluation and report: report.hpp; start-up (threads, MPI, GPU): ../common/open_cuda.hpp.
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <memory>
#include <optional>
#include <stdexcept>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include <moekit/backend/host/gemm_bf16.hpp>
#include <moekit/backend/host/gemm_library.hpp>
#include <moekit/train/trainer.hpp>
#include <moekit/train/trainer_checkpoint.hpp>

#include "../common/cuda_blocks.hpp"
#include "domains.hpp"
#include "../common/open_cuda.hpp"
#include "model.hpp"
#include "options.hpp"
#include "../common/ranks.hpp"
#include "../common/resume.hpp"
#include "report.hpp"

// The model as train::Trainer drives it: micro-batches drawn from the training stream, forward and
// backward, and the distributed and device steps around the optimizer. Every rank draws the whole
// micro-batch from the same sampler and keeps its shard's part (tp ranks of a group the same part):
// the shards see different tokens, and together the micro-batch the single-process run draws.
class TrainedModel {
 public:
  TrainedModel(Model<float>& model, const domains::Stream& train, const Options& opt, Ranks* ranks)
      : model_(model), train_(train), opt_(opt), ranks_(ranks), sampler_(opt.seed ^ 0x53414d504c45ull),  // "SAMPLE"
        shards_(ranks ? ranks->grid().shards() : 1), local_batch_(opt.batch / shards_), pos_(opt.batch),
        ids_(local_batch_ * opt.context), targets_(local_batch_), dense_(model.dense_parameters()) {
    if (opt.pack_by_domain)  // the training positions of each domain (the domain of the predicted token)
      for (std::int64_t i = 0; i < std::int64_t(train.tokens.size()); ++i) by_domain_[train.domain[i]].push_back(i);
  }

  moekit::train::MicroBatchStats train_micro_batch(std::int64_t step, std::int64_t, double scale) {
    const int rank = ranks_ ? ranks_->rank() : 0;
    const bool faulty = !opt_.fault.kind.empty() && rank == opt_.fault.rank;
    if (faulty && opt_.fault.kind == "throw" && step == opt_.fault.step)  // the others wait in the forward's collectives
      throw std::runtime_error("injected fault (--inject-fault throw) at step " + std::to_string(step));
    if (opt_.pack_by_domain) {
      const auto& from = by_domain_[sampler_.next() % domains::kNumDomains];
      for (auto& p : pos_) p = from[sampler_.next() % from.size()];
    } else {
      for (auto& p : pos_) p = std::int64_t(sampler_.next() % train_.tokens.size());
    }
    const std::int64_t shard = ranks_ ? ranks_->grid().shard() : 0;
    make_windows(train_, pos_.data() + shard * local_batch_, local_batch_, opt_.context, ids_.data(), targets_.data());
    moekit::train::MicroBatchStats s;
    s.loss = model_.forward(ids_.data(), targets_.data(), local_batch_, scale);
    model_.backward(scale);
    if (faulty && opt_.fault.kind == "nan" && step >= opt_.fault.step) s.loss = std::nan("");  // this rank only
    const ModelConfig& c = model_.config();
    for (std::int64_t l = 0; l < c.blocks; ++l) {
      s.lbl.push_back(model_.aux(l).lbl);
      s.zloss.push_back(model_.aux(l).zloss);
      const auto counts = model_.moe(l).expert_counts();
      s.load.emplace_back(counts.data, counts.data + c.total_experts());
    }
    return s;
  }
  void zero_grad() { model_.zero_grad(); }  // the CUDA layers' device gradients too
  void reduce_gradients() {
    if (ranks_) {  // gradients of the mean of the shards' losses
      ranks_->average_over_shards(dense_);
      model_.sync_moe_gradients();
    }
  }
  void after_optimizer_step() { model_.end_step(); }  // GlobalBatch buffers, BiasBalanced biases
  // Where the sampler is in its stream (checkpoints: a resumed run draws the same micro-batches).
  std::uint64_t sampler_state() const { return sampler_.state; }
  void set_sampler_state(std::uint64_t s) { sampler_.state = s; }
  std::vector<moekit::Parameter<float>> parameters() { return model_.parameters(); }  // this rank's, on the host
  // --backend cuda: the MoE layers' parameters, clipped and stepped on the device by the trainer.
  std::vector<moekit::train::ParameterGroup*> parameter_groups() { return groups_; }
  void set_parameter_groups(std::vector<moekit::train::ParameterGroup*> g) { groups_ = std::move(g); }

 private:
  Model<float>& model_;
  const domains::Stream& train_;
  const Options& opt_;
  Ranks* ranks_;
  moekit::SplitMix64 sampler_;
  int shards_;
  std::int64_t local_batch_;
  std::vector<std::int64_t> pos_;
  std::vector<std::int32_t> ids_, targets_;
  std::vector<moekit::Parameter<float>> dense_;
  std::vector<moekit::train::ParameterGroup*> groups_;
  std::array<std::vector<std::int64_t>, domains::kNumDomains> by_domain_;
};

// What a checkpoint must agree with to be resumed: every flag that changes the model, the data or the
// optimisation (threads, intervals and output paths may differ).
static nlohmann::json checkpoint_config(const Options& o) {
  return {{"seed", o.seed}, {"steps", o.steps}, {"batch", o.batch}, {"accum", o.accum}, {"lr", o.lr}, {"experts", o.experts},
          {"top_k", o.top_k}, {"d_model", o.d_model}, {"d_expert", o.d_expert}, {"context", o.context}, {"lbl_coef", o.lbl_coef},
          {"zloss_coef", o.zloss_coef}, {"weight_decay", o.weight_decay}, {"train_tokens", o.train_tokens},
          {"global_balance", o.global_balance}, {"granularity", o.granularity}, {"zero_experts", o.zero_experts},
          {"copy_experts", o.copy_experts}, {"constant_experts", o.constant_experts}, {"tau", o.tau},
          {"gating_residual", o.gating_residual}, {"expert_bias", o.expert_bias}, {"bias_rate", o.bias_rate},
          {"pack_by_domain", o.pack_by_domain}, {"moe_options", o.moe.changed()}};
}

// world: the communicator of a --parallel run (nullptr: one process, the single-rank layers).
// cuda: --backend cuda's device side (nullptr: the host layers).
static int run(const Options& opt, moekit::comm::HostCommunicator* world, CudaMoeBackend* cuda = nullptr) {
  // 0. Ranks: this rank's place in the tp x ep x dp grid, its shard of the data and the trainer's groups.
  std::unique_ptr<Ranks> ranks;
  if (world) ranks = std::make_unique<Ranks>(*world, int(opt.tp), int(opt.ep));
  const int shards = ranks ? ranks->grid().shards() : 1;
  const bool root = !ranks || ranks->rank() == 0;
  g_print = root;
  if (opt.batch % shards != 0) {
    if (root)
      std::fprintf(stderr, "error: --batch %lld must be divisible by the %d shards (ep * dp), each of which takes an equal part\n",
                   (long long)opt.batch, shards);
    return 2;
  }
  std::ofstream json_out;
  if (!opt.json.empty() && root) {
    // --resume appends: the run's metrics stay one file (rows after the checkpoint's step appear again).
    json_out.open(opt.json, opt.resume ? std::ios::app : std::ios::trunc);
    if (!json_out) {
      std::fprintf(stderr, "error: cannot write %s\n", opt.json.c_str());
      return 2;
    }
  }
  const Emit emit = [&](const nlohmann::ordered_json& j) {
    if (json_out) json_out << j.dump() << "\n" << std::flush;
  };

  // 1. Data: one set of rules, two streams from different seeds.
  const domains::Rules rules(opt.seed);
  const domains::Stream train = domains::generate(rules, opt.train_tokens, opt.seed * 2 + 1);
  const domains::Stream heldout = domains::generate(rules, opt.heldout_tokens, opt.seed * 2 + 2);
  const double baseline = domains::unigram_entropy(heldout.tokens);
  const std::int64_t interval_eval_tokens = std::min<std::int64_t>(8192, std::int64_t(heldout.tokens.size()));

  // 2. Model.
  ModelConfig mc;
  mc.vocab = domains::kVocab, mc.context = opt.context, mc.d_model = opt.d_model, mc.d_expert = opt.d_expert;
  mc.experts = opt.experts, mc.top_k = opt.top_k, mc.lbl_coef = opt.lbl_coef, mc.zloss_coef = opt.zloss_coef;
  mc.zero_experts = opt.zero_experts, mc.copy_experts = opt.copy_experts, mc.constant_experts = opt.constant_experts;
  mc.tau = opt.tau, mc.gating_residual = opt.gating_residual, mc.global_balance = opt.global_balance;
  mc.expert_bias = opt.expert_bias, mc.bias_update_rate = opt.bias_rate;
  opt.moe.apply(mc.base);
  if (opt.granularity > 1) {  // --d-expert is the d_ff being split, --experts E, --top-k k_base
    const moekit::MoeConfig fine =
        moekit::fine_grained_config(mc.moe_config(), opt.d_expert, opt.experts, opt.granularity, opt.top_k);
    mc.d_expert = fine.d_expert, mc.experts = fine.num_ffn_experts, mc.top_k = fine.top_k;
  }
  MoeBlockFactory<float> moe_blocks;  // empty: make_moe_block's single-rank host layers
  if (cuda)
    moe_blocks = [&](const moekit::MoeConfig& base, bool global_balance) {
      return cuda->make_block(ranks ? ranks->with_degrees(base) : base, global_balance);
    };
  else if (ranks)
    moe_blocks = ranks->moe_blocks<float>();
  else if (opt.bf16)
    moe_blocks = make_bf16_moe_block;
  Model<float> model(mc, opt.seed, moe_blocks);
  TrainedModel trained(model, train, opt, ranks.get());
  std::int64_t n_local_params = 0;
  const std::vector<moekit::Parameter<float>> params = model.parameter_shapes();  // wherever they live
  for (const auto& p : params) n_local_params += p.numel();
  const std::int64_t n_params = ranks ? ranks->full_parameter_count(params) : n_local_params;

  // 3. The trainer: AdamW (weight decay on matrices only), warmup + cosine, clipping at 1.0 by the
  // global norm (distributed: expert slices summed over the ranks that hold different ones).
  moekit::train::TrainerConfig tc;
  tc.steps = opt.steps, tc.accum = opt.accum, tc.tokens_per_micro_batch = opt.batch;
  tc.log_interval = opt.log_interval, tc.eval_interval = opt.eval_interval, tc.max_grad_norm = 1.0;
  tc.max_bad_steps = opt.max_bad_steps;
  moekit::train::AdamWConfig ac;
  ac.lr = opt.lr, ac.beta2 = 0.95, ac.weight_decay = opt.weight_decay;
  const moekit::train::CosineSchedule schedule{opt.lr, opt.lr / 10, std::max<std::int64_t>(1, opt.steps / 20), opt.steps};
  const moekit::train::Reductions red = ranks ? ranks->reductions() : moekit::train::Reductions{};
  trained.set_parameter_groups(model.parameter_groups(ac));  // --backend cuda: on the device
  moekit::train::Trainer<TrainedModel> trainer(
      trained, tc, ac, schedule, [](const moekit::Parameter<float>& p) { return p.shape.size() >= 2; }, red);

  out("train_domains: threads %d (OMP_WAIT_POLICY=%s) | vocab %d, context %lld | %lld blocks of MoE(%lld experts, top-%lld, d_model %lld, d_expert %lld) | %lld parameters\n",
      omp_get_max_threads(), std::getenv("OMP_WAIT_POLICY") ? std::getenv("OMP_WAIT_POLICY") : "default", domains::kVocab, (long long)opt.context, (long long)mc.blocks, (long long)mc.experts,
      (long long)mc.top_k, (long long)opt.d_model, (long long)mc.d_expert, (long long)n_params);
  out("%s\n", moekit::backend::host::gemm_library().line().c_str());  // which GEMM kernel the host runs (and any warning)
  if (opt.expert_bias) out("expert bias: on (router::BiasBalanced, u = %g after each step)\n", opt.bias_rate);
  if (opt.moe.any()) out("router and experts: %s\n", opt.moe.changed().dump().c_str());
  const bool variant = opt.global_balance || opt.granularity > 1 || opt.gating_residual || opt.pack_by_domain ||
                       mc.zero_experts + mc.copy_experts + mc.constant_experts > 0;
  if (variant)  // the default run's output stays as it was
    out("variant: balance %s | granularity %lld | zero %lld, copy %lld, constant %lld, tau %g | gating residual %s | micro-batches %s\n",
        opt.global_balance ? "global" : "micro", (long long)opt.granularity, (long long)mc.zero_experts,
        (long long)mc.copy_experts, (long long)mc.constant_experts, mc.tau, mc.gating_residual ? "on" : "off",
        opt.pack_by_domain ? "packed by domain" : "mixed");
  if (opt.bf16)
    out("dtype: bf16 MoE layers (backend::Host<bf16>: bf16 weights and activations, fp32 accumulation, fp32 masters in AdamW) | %s; "
        "embedding, norms and head in fp32\n", moekit::backend::host::bf16_gemm().line().c_str());
  if (cuda)  // --backend cuda only: host runs print what they always did
    out("backend: cuda | MoE layers and their AdamW on %s%s; embedding, norms, head and their AdamW on the host\n", cuda->describe().c_str(),
        ranks ? " (rank 0; one GPU per rank, NCCL inside the layers)" : "");
  if (ranks) {
    const auto& g = ranks->grid();
    out("parallel: %s over %d ranks = tp %d x ep %d x dp %d | %d shards x %lld tokens per micro-batch | %lld FFN experts per rank, "
        "d_expert/tp %lld | %lld parameters on rank 0\n",
        parallel_name(opt.parallel), ranks->size(), g.tp, g.ep, g.dp, shards, (long long)(opt.batch / shards),
        (long long)(mc.experts / g.ep), (long long)(mc.d_expert / g.tp), (long long)n_local_params);
  }
  out("data: %zu train tokens, %zu held-out tokens (different seed); held-out unigram entropy %.4f nats\n",
      train.tokens.size(), heldout.tokens.size(), baseline);
  out("steps %lld x %lld tokens x %lld micro-batches | AdamW lr %.2e (warmup %lld, cosine to %.2e) | clip 1.0 | lbl %.3g, z %.3g\n\n",
      (long long)opt.steps, (long long)opt.batch, (long long)opt.accum, opt.lr, (long long)schedule.warmup_steps,
      schedule.min_lr, opt.lbl_coef, opt.zloss_coef);

  // 4. Training: a progress line per interval, a held-out evaluation every --eval-interval steps.
  trainer.on_log([&](const moekit::train::IntervalReport& r) {
    out("step %5lld/%lld | loss %.4f | lbl", (long long)r.step, (long long)r.steps, r.loss);
    for (auto v : r.lbl) out(" %.3f", v);
    out(" | z");
    for (auto v : r.zloss) out(" %.3f", v);
    out(" | lr %.2e | |g| %.2f | %5.0f tok/s | load %%", r.lr, r.grad_norm, r.tokens_per_s);
    for (std::size_t l = 0; l < r.expert_load.size(); ++l) {
      out(" L%zu", l);
      for (auto share : r.expert_load[l]) out(" %2.0f", 100.0 * share);
    }
    if (r.bad_steps_total > 0) out(" | skipped %lld non-finite steps (%lld in all)", (long long)r.bad_steps, (long long)r.bad_steps_total);
    out("\n");
    emit({{"type", "train"}, {"step", r.step}, {"loss", r.loss}, {"lbl", r.lbl}, {"zloss", r.zloss}, {"lr", r.lr},
          {"grad_norm", r.grad_norm}, {"tokens_per_s", r.tokens_per_s}, {"step_time_ms", r.step_time_ms},
          {"expert_load", r.expert_load}, {"bad_steps", r.bad_steps}, {"bad_steps_total", r.bad_steps_total}});
  });
  trainer.on_eval([&](std::int64_t step) {
    const Evaluation ev = evaluate(model, heldout, interval_eval_tokens, ranks.get());
    out("  eval @ %lld: held-out loss %.4f (first %lld tokens; unigram baseline %.4f)\n", (long long)step, ev.loss,
        (long long)interval_eval_tokens, baseline);
    emit({{"type", "eval"}, {"step", step}, {"heldout_loss", ev.loss}, {"tokens", interval_eval_tokens}});
  });
  // 5. Checkpoints (docs/checkpoints.md): resume from the newest one that verifies; one every
  // --checkpoint-interval steps and one at the end.
  std::optional<moekit::train::CheckpointDir> checkpoints;
  if (!opt.checkpoint_dir.empty()) {
    checkpoints.emplace(opt.checkpoint_dir, opt.keep);
    const nlohmann::json config = checkpoint_config(opt);
    if (opt.resume) resume(*checkpoints, trainer, trained, model, config, ranks.get());
    trainer.on_step([&, config](std::int64_t done) {
      if ((opt.checkpoint_interval > 0 && done % opt.checkpoint_interval == 0) || done == opt.steps) {
        const nlohmann::json run = {{"sampler", trained.sampler_state()}, {"router_states", model.router_states()}, {"config", config}};
        const auto dir = ranks ? checkpoints->save(done, moekit::train::trainer_checkpoint(trainer, run, ranks->grid()), ranks->checkpoint_ranks())
                               : checkpoints->save(done, moekit::train::trainer_checkpoint(trainer, run));
        out("  checkpoint @ %lld: %s\n", (long long)done, dir.string().c_str());
      }
    });
  }
  const auto run_start = std::chrono::steady_clock::now();
  trainer.run();

  // 6. The closing report on the whole held-out stream.
  return final_report(model, heldout, ranks.get(), baseline, mc, opt, trainer.train_seconds(), run_start, n_params,
                      n_local_params, cuda != nullptr, emit);
}

int main(int argc, char** argv) {
  const Options opt = parse_options(argc, argv);
  if (opt.parallel == Parallel::kNone && launcher_ranks() > 1) {
    std::fprintf(stderr, "error: started as one of %d ranks but --parallel is none (every rank would train its own copy): "
                         "add --parallel data, expert, tensor or hybrid\n", launcher_ranks());
    return 2;
  }
  if (opt.cuda && !kCudaCompiledIn) {
    std::fprintf(stderr, "error: --backend cuda needs the CUDA MoE layers, and this train_domains was built without CUDA "
                         "(examples/common/cuda_blocks.cu is compiled only when the build has CUDA, e.g. "
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
#ifdef MOEKIT_EXAMPLE_HAS_MPI
  return run_under_mpi(&argc, &argv, opt.threads, [&](moekit::comm::Mpi& world) {
    std::unique_ptr<CudaMoeBackend> cuda;  // outlives run()'s model, freed before world
    if (opt.cuda && !(cuda = open_cuda(world))) return 2;
    return run(opt, &world, cuda.get());
  });
#else
  std::fprintf(stderr, "error: --parallel %s needs MPI, and this train_domains was built without it (CMake found no MPI, so "
                       "there was no moekit::mpi target); rebuild with MPI installed, or use --parallel none\n",
               parallel_name(opt.parallel));
  return 2;
#endif
}
