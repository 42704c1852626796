#pragma once
// train::Trainer: the training loop of a MoE model as a library piece (docs/design.md §7). One optimizer step:
//
//   lr = schedule(step); model.zero_grad(); each parameter group's zero_grad()
//   for each of `accum` micro-batches: model.train_micro_batch(step, micro, 1 / accum)   (forward + backward)
//   model.reduce_gradients()        distributed: gradients of the mean over the shards; device mirrors
//   clip to max_grad_norm           the global norm: replicated parameters counted once, expert slices
//                                   summed over the ranks that hold different ones (by shard kind);
//                                   with the model's parameter groups (device buffers) folded in
//   AdamW step at lr                the host parameters, and every parameter group where it lives
//   model.after_optimizer_step()    parameters back to a device; every MoE layer's end_step() (the
//                                   GlobalBatch buffer reset, the BiasBalanced update)
//
// Every `log_interval` steps a report (loss, aux losses, gradient norm, tokens/s, step time, per-layer
// expert load, averaged over the interval and over the shards) goes to the log callback; every
// `eval_interval` steps the eval callback runs. The model supplies the data and the forward/backward
// (TrainableModel below); the trainer owns the optimizer, the schedule and the bookkeeping.
//
// A wall-clock budget (time_budget_s > 0; Du et al.'s comparison at equal training time) ends the run
// after the step that reaches it, and the schedule runs over time instead of steps: step s uses
// schedule.at_progress(t / budget), t the training time before it (steps only; evaluations and
// callbacks excluded), so each model decays its learning rate to the end of the same budget whatever
// its step time. `steps` is then a cap and the schedule's nominal length. Such a run is not repeatable
// bit for bit (the steps' times pick the learning rates); a resumed one continues from the saved time.
#include <chrono>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "moekit/core/error.hpp"
#include "moekit/core/parameter.hpp"
#include "moekit/train/adamw.hpp"
#include "moekit/train/parameter_group.hpp"
#include "moekit/train/grad_clip.hpp"
#include "moekit/train/lr_schedule.hpp"

namespace moekit::train {

struct TrainerConfig {
  std::int64_t steps = 1;
  std::int64_t accum = 1;                   // micro-batches per optimizer step
  std::int64_t tokens_per_micro_batch = 0;  // all shards together (for tokens/s)
  std::int64_t log_interval = 50;
  std::int64_t eval_interval = 0;           // 0: the callback never runs from the loop
  double max_grad_norm = 1.0;
  // A step whose loss or gradient norm is not finite is skipped (no optimizer update); this many in a
  // row stop the run with a NumericError naming the step.
  std::int64_t max_bad_steps = 3;
  double time_budget_s = 0;  // > 0: stop at this much training time, the schedule over time (above)

  void validate() const {
    auto at_least = [](const char* f, std::int64_t v, std::int64_t lo) {
      if (v < lo) throw ConfigError(f, std::to_string(v), "must be >= " + std::to_string(lo));
    };
    at_least("steps", steps, 1);
    at_least("accum", accum, 1);
    at_least("tokens_per_micro_batch", tokens_per_micro_batch, 0);
    at_least("log_interval", log_interval, 1);
    at_least("eval_interval", eval_interval, 0);
    at_least("max_bad_steps", max_bad_steps, 1);
    if (!(max_grad_norm > 0.0) || !std::isfinite(max_grad_norm))
      throw ConfigError("max_grad_norm", moekit::detail::str(max_grad_norm), "must be finite and > 0");
    if (!(time_budget_s >= 0.0) || !std::isfinite(time_budget_s))
      throw ConfigError("time_budget_s", moekit::detail::str(time_budget_s), "must be finite and >= 0 (0: no budget)");
  }
};

// What the model reports of one micro-batch.
struct MicroBatchStats {
  double loss = 0;
  std::vector<double> lbl, zloss;              // per MoE layer, unscaled
  std::vector<std::vector<std::int64_t>> load;  // [layer][expert]: slots kept
};

// One logging interval, averaged over its micro-batches (and over the shards).
struct IntervalReport {
  std::int64_t step = 0, steps = 0;  // the 1-based step that ends the interval, of `steps`
  double loss = 0, lr = 0, grad_norm = 0, tokens_per_s = 0, step_time_ms = 0;
  std::int64_t bad_steps = 0, bad_steps_total = 0;  // skipped (non-finite) steps: in the interval, in the run
  std::vector<double> lbl, zloss;
  std::vector<std::vector<double>> expert_load;  // [layer][expert]: share of the interval's slots
};

// The trainer's own bookkeeping between steps: what a checkpoint keeps so that a resumed run reports
// the same intervals (train/trainer_checkpoint.hpp).
struct TrainerState {
  std::int64_t steps_done = 0, interval_steps = 0, interval_micro = 0;
  std::int64_t bad_in_interval = 0, bad_total = 0, bad_in_a_row = 0, good_in_interval = 0;
  double sum_loss = 0, sum_norm = 0, interval_s = 0, total_s = 0;
  std::vector<double> sum_lbl, sum_z;
  std::vector<std::vector<double>> load;
};

// The model a Trainer drives.
template <class M>
concept TrainableModel = requires(M& m, std::int64_t step, std::int64_t micro, double scale) {
  // Forward and backward of micro-batch `micro` of `step`, gradients (and aux losses) scaled by `scale`.
  { m.train_micro_batch(step, micro, scale) } -> std::convertible_to<MicroBatchStats>;
  m.zero_grad();
  m.reduce_gradients();
  m.after_optimizer_step();
  { m.parameters() } -> std::convertible_to<std::vector<Parameter<float>>>;
};

// A model may also keep parameters outside the host optimizer (train/parameter_group.hpp: a CUDA
// layer's device buffers): parameter_groups() lists them, and the trainer clips and steps them too.
template <class M>
concept HasParameterGroups = requires(M& m) {
  { m.parameter_groups() } -> std::convertible_to<std::vector<ParameterGroup*>>;
};

// How a distributed run sums over ranks (all empty: one process).
struct Reductions {
  int shards = 1;                                                  // ranks holding different tokens
  std::function<void(double*, std::size_t)> sum_over_shards;       // interval statistics
  std::function<void(double*, std::size_t)> sum_over_expert_slices;  // the ranks holding different expert slices
  std::function<void(double*, std::size_t)> sum_over_tensor_slices;  // the tp ranks (different tensor slices)
};

template <TrainableModel Model>
class Trainer {
 public:
  using Clock = std::chrono::steady_clock;

  Trainer(Model& model, TrainerConfig cfg, AdamWConfig adamw, CosineSchedule schedule,
          typename AdamW<float>::DecayRule decays = {}, Reductions red = {})
      : model_(model), cfg_(cfg), schedule_(schedule), params_(model.parameters()),
        optimizer_(params_, adamw, std::move(decays)), red_(std::move(red)) {
    cfg_.validate();
    schedule_.validate();
    if (cfg_.time_budget_s > 0 && (red_.sum_over_shards || red_.sum_over_expert_slices))
      throw ConfigError("time_budget_s", moekit::detail::str(cfg_.time_budget_s),
                        "needs one process: each rank's clock would pick its own learning rates and last step");
    if constexpr (HasParameterGroups<Model>) groups_ = model.parameter_groups();
  }

  void on_log(std::function<void(const IntervalReport&)> f) { log_ = std::move(f); }
  void on_eval(std::function<void(std::int64_t step)> f) { eval_ = std::move(f); }
  // After every step, its report and its evaluation (e.g. a checkpoint every N steps).
  void on_step(std::function<void(std::int64_t steps_done)> f) { after_step_ = std::move(f); }

  AdamW<float>& optimizer() { return optimizer_; }
  const CosineSchedule& schedule() const { return schedule_; }
  std::int64_t steps_done() const { return done_; }
  double train_seconds() const { return total_s_; }  // time in steps (not in evaluations)
  bool has_parameter_groups() const { return !groups_.empty(); }
  const std::vector<ParameterGroup*>& parameter_groups() const { return groups_; }

  TrainerState state() const {
    return {done_, interval_steps_, interval_micro_, interval_bad_, bad_total_, bad_in_a_row_, good_in_interval_, sum_loss_, sum_norm_, interval_s_,
            total_s_, sum_lbl_, sum_z_, load_};
  }
  // Continues from a saved state (the optimizer's moments and step count are restored beside it).
  void restore(const TrainerState& s) {
    if (s.steps_done < 0 || s.steps_done > cfg_.steps)
      throw ConfigError("steps_done", std::to_string(s.steps_done), "must be in [0, steps = " + std::to_string(cfg_.steps) + "]");
    done_ = s.steps_done, interval_steps_ = s.interval_steps, interval_micro_ = s.interval_micro;
    interval_bad_ = s.bad_in_interval, bad_total_ = s.bad_total, bad_in_a_row_ = s.bad_in_a_row, good_in_interval_ = s.good_in_interval;
    sum_loss_ = s.sum_loss, sum_norm_ = s.sum_norm, interval_s_ = s.interval_s, total_s_ = s.total_s;
    sum_lbl_ = s.sum_lbl, sum_z_ = s.sum_z, load_ = s.load;
  }

  // Runs the remaining steps (or until the time budget is spent).
  void run() {
    while (done_ < cfg_.steps && !out_of_time()) step();
  }
  // The time budget is set and spent: run() stops, and the last step reported as the final one.
  bool out_of_time() const { return cfg_.time_budget_s > 0 && total_s_ >= cfg_.time_budget_s; }

  // One optimizer step (the next one); returns the gradient norm before clipping. A step whose loss
  // (any micro-batch's, any rank's) or global gradient norm is not finite changes no parameter and no
  // optimizer state: it is counted (IntervalReport::bad_steps) and the run goes on, unless it is the
  // max_bad_steps-th in a row (NumericError). The step still ends with the model's per-step hook (the
  // layers' end_step(): GlobalBatch buffers reset, BiasBalanced biases moved by the step's counts).
  double step() {
    const auto t0 = Clock::now();
    const std::int64_t s = done_;
    const double lr = cfg_.time_budget_s > 0 ? schedule_.at_progress(total_s_ / cfg_.time_budget_s) : schedule_(s);
    model_.zero_grad();
    for (ParameterGroup* g : groups_) g->zero_grad();
    std::vector<MicroBatchStats> micro;
    bool finite = true;
    for (std::int64_t m = 0; m < cfg_.accum; ++m) {
      try {
        micro.push_back(model_.train_micro_batch(s, m, 1.0 / double(cfg_.accum)));
        finite = finite && std::isfinite(micro.back().loss);
      } catch (const NumericError& e) {  // a layer that refuses non-finite input (e.g. router logits)
        finite = false;
        last_error_ = e.what();
      }
    }
    model_.reduce_gradients();
    const double norm = grad_norm();  // NaN or inf when a gradient is not finite
    finite = finite && std::isfinite(norm);
    if (red_.sum_over_shards) {  // every rank takes the same decision
      double bad = finite ? 0.0 : 1.0;
      red_.sum_over_shards(&bad, std::size_t(1));
      if (finite && bad != 0.0) last_error_ = "the non-finite value was on another rank";
      finite = bad == 0.0;
    }
    if (finite) {
      const double coef = cfg_.max_grad_norm / (norm + 1e-6);
      if (coef < 1.0) {
        detail::scale_to(params_, cfg_.max_grad_norm, norm);
        for (ParameterGroup* g : groups_) g->scale_grads(coef);
      }
      optimizer_.step(lr);
      for (ParameterGroup* g : groups_) g->step(lr);
      for (const auto& m : micro) add(m);
      sum_norm_ += norm, ++good_in_interval_;
      bad_in_a_row_ = 0;
      last_error_.clear();
    } else {
      ++interval_bad_, ++bad_total_, ++bad_in_a_row_;
      last_bad_ = {micro.empty() ? std::numeric_limits<double>::quiet_NaN() : micro.back().loss, norm};
    }
    model_.after_optimizer_step();
    const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    interval_s_ += dt, total_s_ += dt, ++interval_steps_, ++done_;
    if (bad_in_a_row_ >= cfg_.max_bad_steps)
      throw NumericError("step " + std::to_string(done_) + ": " + std::to_string(bad_in_a_row_) +
                         " steps in a row with a non-finite loss or gradient norm (last: loss " + moekit::detail::str(last_bad_.first) +
                         ", gradient norm " + moekit::detail::str(last_bad_.second) + "); stopping (max_bad_steps " +
                         std::to_string(cfg_.max_bad_steps) + "); the parameters are those after step " +
                         std::to_string(done_ - bad_in_a_row_) + (last_error_.empty() ? "" : "; " + last_error_));
    const bool last = done_ == cfg_.steps || out_of_time();
    if (done_ % cfg_.log_interval == 0 || last) report(lr);
    if (cfg_.eval_interval > 0 && done_ % cfg_.eval_interval == 0 && !last && eval_) eval_(done_);
    if (after_step_) after_step_(done_);
    return norm;
  }

 private:
  // The global norm over the host parameters and the groups (by shard kind: expert slices summed over
  // the ranks that hold different ones, tensor slices over the tp ranks); not finite when a gradient is
  // not. One process without groups sums in parameter order (as clip_grad_norm).
  double grad_norm() {
    if (groups_.empty() && !red_.sum_over_expert_slices) {
      double total = 0;
      for (const auto& p : params_) total += detail::sum_squares(p.grad, p.numel());
      return std::sqrt(total);
    }
    NormSquares sq;
    for (const auto& p : params_) sq.add(p.shard, detail::sum_squares(p.grad, p.numel()));
    for (ParameterGroup* g : groups_) {
      try {
        g->grad_squares(sq);
      } catch (const NumericError&) {  // a group that refuses non-finite sums: the step is skipped, on every rank
        sq.replicated = std::numeric_limits<double>::quiet_NaN();
      }
    }
    if (red_.sum_over_expert_slices) red_.sum_over_expert_slices(&sq.expert_slices, std::size_t(1));
    if (red_.sum_over_tensor_slices) red_.sum_over_tensor_slices(&sq.tensor_slices, std::size_t(1));
    return std::sqrt(sq.total());
  }

  void add(const MicroBatchStats& m) {
    if (sum_lbl_.empty()) {
      sum_lbl_.assign(m.lbl.size(), 0.0), sum_z_.assign(m.zloss.size(), 0.0);
      load_.assign(m.load.size(), {});
      for (std::size_t l = 0; l < m.load.size(); ++l) load_[l].assign(m.load[l].size(), 0.0);
    }
    sum_loss_ += m.loss;
    for (std::size_t l = 0; l < m.lbl.size(); ++l) sum_lbl_[l] += m.lbl[l];
    for (std::size_t l = 0; l < m.zloss.size(); ++l) sum_z_[l] += m.zloss[l];
    for (std::size_t l = 0; l < m.load.size(); ++l)
      for (std::size_t e = 0; e < m.load[l].size(); ++e) load_[l][e] += double(m.load[l][e]);
    ++interval_micro_;
  }

  void report(double lr) {
    if (red_.sum_over_shards) {  // losses: the mean over the shards; the load: the sum
      std::vector<double> v{sum_loss_};
      v.insert(v.end(), sum_lbl_.begin(), sum_lbl_.end());
      v.insert(v.end(), sum_z_.begin(), sum_z_.end());
      for (const auto& row : load_) v.insert(v.end(), row.begin(), row.end());
      red_.sum_over_shards(v.data(), v.size());
      std::size_t at = 0;
      const double inv = 1.0 / double(red_.shards);
      sum_loss_ = v[at++] * inv;
      for (auto& x : sum_lbl_) x = v[at++] * inv;
      for (auto& x : sum_z_) x = v[at++] * inv;
      for (auto& row : load_)
        for (auto& c : row) c = v[at++];
    }
    IntervalReport r;
    const double m = double(interval_micro_);
    r.step = done_, r.steps = cfg_.steps, r.lr = lr, r.loss = sum_loss_ / m;
    r.grad_norm = good_in_interval_ > 0 ? sum_norm_ / double(good_in_interval_) : std::numeric_limits<double>::quiet_NaN();
    r.bad_steps = interval_bad_, r.bad_steps_total = bad_total_;
    r.tokens_per_s = double(interval_micro_ * cfg_.tokens_per_micro_batch) / interval_s_;
    r.step_time_ms = 1000.0 * interval_s_ / double(interval_steps_);
    for (double x : sum_lbl_) r.lbl.push_back(x / m);
    for (double x : sum_z_) r.zloss.push_back(x / m);
    for (const auto& row : load_) {
      double total = 0;
      for (double c : row) total += c;
      std::vector<double> share;
      for (double c : row) share.push_back(c / (total > 0 ? total : 1.0));
      r.expert_load.push_back(std::move(share));
    }
    if (log_) log_(r);
    sum_loss_ = sum_norm_ = interval_s_ = 0;
    for (auto* v : {&sum_lbl_, &sum_z_}) std::fill(v->begin(), v->end(), 0.0);
    for (auto& row : load_) std::fill(row.begin(), row.end(), 0.0);
    interval_steps_ = interval_micro_ = interval_bad_ = good_in_interval_ = 0;
  }

  std::vector<ParameterGroup*> groups_;
  Model& model_;
  TrainerConfig cfg_;
  CosineSchedule schedule_;
  std::vector<Parameter<float>> params_;
  AdamW<float> optimizer_;
  Reductions red_;
  std::function<void(const IntervalReport&)> log_;
  std::function<void(std::int64_t)> eval_, after_step_;
  std::int64_t done_ = 0, interval_steps_ = 0, interval_micro_ = 0;
  std::int64_t interval_bad_ = 0, bad_total_ = 0, bad_in_a_row_ = 0, good_in_interval_ = 0;
  std::pair<double, double> last_bad_{0, 0};  // loss, gradient norm
  std::string last_error_;                     // a micro-batch's NumericError, if one threw
  double sum_loss_ = 0, sum_norm_ = 0, interval_s_ = 0, total_s_ = 0;
  std::vector<double> sum_lbl_, sum_z_;
  std::vector<std::vector<double>> load_;
};

}  // namespace moekit::train
