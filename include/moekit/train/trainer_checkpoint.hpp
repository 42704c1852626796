#pragma once
// A Trainer's run as a checkpoint (train/checkpoint.hpp): the parameters under their names, AdamW's
// moments as optim.m.<name> / optim.v.<name>, and in the JSON state the optimizer's step count, the
// trainer's bookkeeping (steps done, the open logging interval's sums) and whatever the caller adds
// (data position, RNG states, router state, config). Restoring it and running on gives the same
// steps, bit for bit, as never stopping (same machine, same thread count: tests/unit/test_checkpoint.cpp
// and the train_domains resume test).
//
// Host parameters only for now: a trainer with parameter groups (bf16 masters, CUDA layers) is
// refused with a ConfigError.
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moekit/core/error.hpp"
#include "moekit/train/checkpoint.hpp"
#include "moekit/train/trainer.hpp"

namespace moekit::train {

inline nlohmann::json to_json(const TrainerState& s) {
  // Doubles go through nlohmann's shortest round-trip form: the same bits come back.
  return {{"steps_done", s.steps_done}, {"interval_steps", s.interval_steps}, {"interval_micro", s.interval_micro},
          {"bad_in_interval", s.bad_in_interval}, {"bad_total", s.bad_total}, {"bad_in_a_row", s.bad_in_a_row},
          {"good_in_interval", s.good_in_interval},
          {"sum_loss", s.sum_loss},     {"sum_norm", s.sum_norm},             {"interval_s", s.interval_s},
          {"total_s", s.total_s},       {"sum_lbl", s.sum_lbl},               {"sum_z", s.sum_z},
          {"load", s.load}};
}
inline TrainerState trainer_state_from_json(const nlohmann::json& j) {
  try {
    TrainerState s;
    s.steps_done = j.at("steps_done").get<std::int64_t>();
    s.interval_steps = j.at("interval_steps").get<std::int64_t>();
    s.interval_micro = j.at("interval_micro").get<std::int64_t>();
    s.bad_in_interval = j.at("bad_in_interval").get<std::int64_t>();
    s.bad_total = j.at("bad_total").get<std::int64_t>();
    s.bad_in_a_row = j.at("bad_in_a_row").get<std::int64_t>();
    s.good_in_interval = j.at("good_in_interval").get<std::int64_t>();
    s.sum_loss = j.at("sum_loss").get<double>();
    s.sum_norm = j.at("sum_norm").get<double>();
    s.interval_s = j.at("interval_s").get<double>();
    s.total_s = j.at("total_s").get<double>();
    s.sum_lbl = j.at("sum_lbl").get<std::vector<double>>();
    s.sum_z = j.at("sum_z").get<std::vector<double>>();
    s.load = j.at("load").get<std::vector<std::vector<double>>>();
    return s;
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(std::string("trainer.json: state.trainer: ") + e.what());
  }
}

// The checkpoint content of `trainer` (views of its parameters and moments: save or load through it).
// `extra` goes into the state under "run".
template <class Model>
CheckpointContent trainer_checkpoint(Trainer<Model>& trainer, nlohmann::json extra = nlohmann::json::object()) {
  if (trainer.has_parameter_groups())
    throw ConfigError("checkpoint", "parameter groups",
                      "checkpoints of parameters that live outside the host optimizer (bf16 masters, CUDA layers) are not supported yet");
  CheckpointContent c;
  AdamW<float>& opt = trainer.optimizer();
  const auto& ps = opt.parameters();
  for (std::size_t i = 0; i < ps.size(); ++i) {
    c.model.push_back({ps[i].name, ps[i].shape, ps[i].value});
    c.optimizer.push_back({"optim.m." + ps[i].name, ps[i].shape, opt.exp_avg(i).data()});
    c.optimizer.push_back({"optim.v." + ps[i].name, ps[i].shape, opt.exp_avg_sq(i).data()});
  }
  c.state = {{"trainer", to_json(trainer.state())}, {"optimizer_steps", opt.steps_taken()}, {"run", std::move(extra)}};
  return c;
}

// After CheckpointDir::load (which filled the parameters and moments): the trainer's bookkeeping and
// the optimizer's step count from the state. Returns the caller's "run" part.
template <class Model>
nlohmann::json restore_trainer(Trainer<Model>& trainer, const nlohmann::json& state) {
  if (!state.contains("trainer") || !state.contains("optimizer_steps") || !state.contains("run"))
    throw FormatError("trainer.json: state needs 'trainer', 'optimizer_steps' and 'run'");
  trainer.restore(trainer_state_from_json(state["trainer"]));
  trainer.optimizer().set_steps_taken(state["optimizer_steps"].get<std::int64_t>());
  return state["run"];
}

}  // namespace moekit::train
