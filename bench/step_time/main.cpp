// bench_step_time: step time as the cost (Du et al., arXiv 2405.15052; docs/design.md §8). For a few sizes of
// train_lm's model, the wall time of one training step (forward, backward, gradient clipping, AdamW:
// train::Trainer::step) of
//   moe          the MoE model (E experts, top-k, d_expert),
//   dense_active a dense model of the same active parameters (one FFN of k·d_expert, train_lm --dense),
//   dense_time   a dense model as slow as the MoE one: its FFN width is interpolated between measured
//                widths until its step time matches the MoE step (within the noise), then rounded to 64,
// with the counted model FLOPs (science/flops.hpp), the FLOP/s, tokens/s, and the ratio of measured to
// counted time at the machine's dense-GEMM ceiling (1.0 would be a model that runs at sgemm speed).
//
//   bench_step_time [--sizes tiny,small,medium] [--steps 6] [--rounds 3] [--json out.json]
//
// The variants are measured in alternation, round after round (this machine is shared and noisy): each
// round times every variant's steps back to back, and the table reports each variant's median step
// over all rounds. The host only: on a GPU the same comparison is train_lm --backend cuda (the speed row).
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <moekit/backend/host/gemm_library.hpp>
#include <moekit/train/trainer.hpp>

#include "../../examples/train_lm/lm.hpp"
#include "../../examples/train_lm/text_data.hpp"

namespace {

struct Size {
  std::string name;
  std::int64_t d_model, blocks, heads, d_expert, experts, top_k, seq, batch;
};
const std::vector<Size>& sizes() {
  static const std::vector<Size> s = {
      {"tiny", 64, 2, 4, 128, 8, 2, 64, 8},
      {"small", 128, 3, 4, 256, 8, 2, 128, 16},  // train_lm's default model
      {"medium", 256, 4, 8, 512, 8, 2, 128, 16},
  };
  return s;
}

// The trainer's view of a model on fixed data: every step draws fresh sequences from the text.
class StepModel {
 public:
  StepModel(Lm& m, const std::string& text, std::int64_t batch, std::int64_t seq)
      : m_(m), text_(text), batch_(batch), seq_(seq), starts_(batch), in_(batch * seq), tg_(batch * seq) {}
  moekit::train::MicroBatchStats train_micro_batch(std::int64_t, std::int64_t, double scale) {
    for (auto& s : starts_) s = std::int64_t(rng_.next() % std::uint64_t(text_.size() - seq_));
    make_sequences(text_, starts_.data(), batch_, seq_, in_.data(), tg_.data());
    m_.forward(in_.data(), batch_, seq_);
    moekit::train::MicroBatchStats st;
    st.loss = m_.loss(tg_.data(), scale);
    m_.backward(scale);
    return st;
  }
  void zero_grad() { m_.zero_grad(); }
  void reduce_gradients() {}
  void after_optimizer_step() { m_.end_step(); }
  std::vector<moekit::Parameter<float>> parameters() { return m_.parameters(); }

 private:
  Lm& m_;
  const std::string& text_;
  std::int64_t batch_, seq_;
  moekit::SplitMix64 rng_{99};
  std::vector<std::int64_t> starts_;
  std::vector<std::int32_t> in_, tg_;
};

// One variant: its model, trainer and measured steps.
struct Variant {
  std::string name;
  LmConfig config;
  std::unique_ptr<HostLm> lm;
  std::unique_ptr<StepModel> adapter;
  std::unique_ptr<moekit::train::Trainer<StepModel>> trainer;
  std::vector<double> step_s;
  std::int64_t params = 0;

  Variant(std::string n, const LmConfig& c, const std::string& text, const Size& s) : name(std::move(n)), config(c) {
    lm = std::make_unique<HostLm>(c, 1234, MoeBlockFactory<float>{});
    adapter = std::make_unique<StepModel>(*lm, text, s.batch, s.seq);
    moekit::train::TrainerConfig tc;
    tc.steps = 1 << 30, tc.accum = 1, tc.tokens_per_micro_batch = s.batch * s.seq, tc.log_interval = 1 << 30, tc.max_grad_norm = 1.0;
    moekit::train::AdamWConfig ac;
    ac.lr = 1e-3, ac.beta2 = 0.95, ac.weight_decay = 0.1;
    trainer = std::make_unique<moekit::train::Trainer<StepModel>>(
        *adapter, tc, ac, moekit::train::CosineSchedule{1e-3, 1e-4, 1, 1 << 30},
        [](const moekit::Parameter<float>& p) { return p.shape.size() >= 2; });
    for (const auto& p : lm->parameter_shapes()) params += p.numel();
  }
  // n timed steps (after one untimed one: buffers, pages, threads).
  void measure(int n) {
    trainer->step();
    for (int i = 0; i < n; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      trainer->step();
      step_s.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
  }
  double median() const {
    std::vector<double> v = step_s;
    std::sort(v.begin(), v.end());
    return v.empty() ? 0.0 : v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
  }
};

LmConfig base_config(const Size& s) {
  LmConfig c;
  c.seq = s.seq, c.d_model = s.d_model, c.heads = c.kv_heads = s.heads, c.blocks = s.blocks;
  c.moe.d_model = s.d_model, c.moe.d_expert = s.d_expert, c.moe.num_ffn_experts = s.experts, c.moe.top_k = s.top_k;
  c.moe.lbl_coef = 0.01, c.moe.zloss_coef = 1e-3;
  return c;
}
LmConfig dense_config(const Size& s, std::int64_t width) {  // one FFN of `width` (LmConfig: top_k * d_expert)
  LmConfig c = base_config(s);
  c.dense = true, c.moe.top_k = 1, c.moe.d_expert = width;
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench_step_time: MoE against dense by wall time per training step (train_lm's model, host)"};
  app.option_defaults()->always_capture_default();
  std::string size_list = "tiny,small,medium", json;
  int steps = 6, rounds = 3;
  app.add_option("--sizes", size_list, "comma-separated: tiny, small, medium");
  app.add_option("--steps", steps, "timed steps per variant per round")->check(CLI::PositiveNumber);
  app.add_option("--rounds", rounds, "alternating rounds")->check(CLI::PositiveNumber);
  app.add_option("--json", json, "write the rows as JSON here");
  CLI11_PARSE(app, argc, argv);

  const TextData data = embedded_text(1 << 18, 1 << 12, 1234);
  const std::string& text = data.train.bytes;
  const GemmCeiling ceiling = host_gemm_ceiling();
  std::printf("%s\nbench_step_time: %d threads | ceiling %.1f GFLOP/s (%s) | %d rounds x %d steps, alternated\n\n",
              moekit::backend::host::gemm_library().line().c_str(), omp_get_max_threads(), ceiling.flops_per_s / 1e9, ceiling.what.c_str(),
              rounds, steps);
  std::printf("%-7s %-13s %6s %9s %9s %11s %9s %9s %10s %8s\n", "size", "variant", "ffn", "params(M)", "active(M)", "GFLOP/step",
              "step ms", "GFLOP/s", "tokens/s", "meas/cnt");
  nlohmann::ordered_json out = {{"bench", "step_time"},
                                {"gemm_library", moekit::backend::host::gemm_library().line()},
                                {"threads", omp_get_max_threads()},
                                {"ceiling_gflops", ceiling.flops_per_s / 1e9},
                                {"ceiling", ceiling.what},
                                {"rounds", rounds},
                                {"steps_per_round", steps},
                                {"rows", nlohmann::json::array()}};
  for (const Size& s : sizes()) {
    if (("," + size_list + ",").find("," + s.name + ",") == std::string::npos) continue;
    const std::int64_t active_width = s.top_k * s.d_expert;
    std::vector<std::unique_ptr<Variant>> v;
    v.push_back(std::make_unique<Variant>("moe", base_config(s), text, s));
    v.push_back(std::make_unique<Variant>("dense_active", dense_config(s, active_width), text, s));
    // Calibrate dense_time: widths 1x..8x the active one, each timed against the MoE step.
    std::vector<std::pair<double, double>> curve;  // (width, step s)
    Variant& moe = *v[0];
    moe.measure(steps);
    for (const std::int64_t mult : {1, 2, 4, 8}) {
      Variant probe("probe", dense_config(s, active_width * mult), text, s);
      probe.measure(std::max(2, steps / 2));
      curve.push_back({double(active_width * mult), probe.median()});
      if (probe.median() > moe.median()) break;
    }
    const double target = moe.median();
    moe.step_s.clear();
    double width = curve.back().first;
    for (std::size_t i = 1; i < curve.size(); ++i)
      if (curve[i].second >= target) {  // linear between the two widths that bracket the MoE step time
        const auto [w0, t0] = curve[i - 1];
        const auto [w1, t1] = curve[i];
        width = w0 + (w1 - w0) * std::clamp((target - t0) / std::max(1e-12, t1 - t0), 0.0, 1.0);
        break;
      }
    if (curve.front().second >= target) width = curve.front().first;  // dense at equal active is already as slow
    const std::int64_t w = std::max<std::int64_t>(64, std::int64_t(std::llround(width / 64.0)) * 64);
    v.push_back(std::make_unique<Variant>("dense_time", dense_config(s, w), text, s));
    for (int r = 0; r < rounds; ++r)
      for (auto& x : v) x->measure(steps);
    for (auto& x : v) {
      const LmConfig& c = x->config;
      const auto mc = c.layer_config();
      const double gflop = c.flops(s.batch).total() / 1e9, t = x->median();
      // Active per token: every parameter but the experts not picked.
      const double expert = double(c.dense ? 0 : mc.num_experts() - mc.top_k) * 3.0 * double(mc.d_model * mc.d_expert) * double(c.blocks);
      const double active = double(x->params) - expert;
      const double ffn = double(c.dense ? mc.d_expert : mc.top_k * mc.d_expert);
      const double measured_over_counted = t / (gflop * 1e9 / ceiling.flops_per_s);
      std::printf("%-7s %-13s %6.0f %9.3f %9.3f %11.3f %9.2f %9.1f %10.0f %8.2f\n", s.name.c_str(), x->name.c_str(), ffn, double(x->params) / 1e6,
                  active / 1e6, gflop, t * 1e3, gflop / t, double(s.batch * s.seq) / t, measured_over_counted);
      out["rows"].push_back({{"size", s.name},
                             {"variant", x->name},
                             {"d_model", s.d_model},
                             {"blocks", s.blocks},
                             {"seq", s.seq},
                             {"batch", s.batch},
                             {"ffn_active_width", ffn},
                             {"experts", c.dense ? 1 : mc.num_experts()},
                             {"params", x->params},
                             {"active_params", active},
                             {"gflop_per_step", gflop},
                             {"step_ms_median", t * 1e3},
                             {"step_ms_all", x->step_s},
                             {"gflops", gflop / t},
                             {"tokens_per_s", double(s.batch * s.seq) / t},
                             {"measured_over_counted", measured_over_counted}});
    }
    std::printf("\n");
  }
  if (!json.empty()) std::ofstream(json) << out.dump(2) << "\n";
  return 0;
}
