#pragma once
// A Trainer's run as a checkpoint (train/checkpoint.hpp): the parameters under their names, AdamW's
// moments as optim.m.<name> / optim.v.<name>, and in the JSON state the optimizer's step count, the
// trainer's bookkeeping (steps done, the open logging interval's sums) and whatever the caller adds
// (data position, RNG states, router state, config). Restoring it and running on gives the same
// steps, bit for bit, as never stopping (same machine, same thread count: tests/unit/test_checkpoint.cpp
// and the train_domains resume test).
//
// Under mpirun (a ParallelGrid and CheckpointRanks): each parameter is a full tensor of the
// checkpoint, written once (replicated ones by rank 0, an expert's by the ranks of its dp index 0, its
// tp slices gathered), and every rank's bookkeeping is kept. Resumed in the same layout, each rank
// continues from its own; in another layout (resharding) from the bookkeeping summed over the old
// shards and spread over the new ones (the interval's reported means then agree within rounding).
//
// Parameter groups (train/parameter_group.hpp: bf16 parameters with fp32 masters, a CUDA layer's
// device buffers) are saved as fp32 tensors like the host ones (a bf16 parameter as its master, the
// state AdamW updates), copied to the host when the content is made and back after a load.
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moekit/core/error.hpp"
#include "moekit/core/parameter.hpp"
#include "moekit/parallel/grid.hpp"
#include "moekit/train/checkpoint.hpp"
#include "moekit/train/parameter_group.hpp"
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
    throw FormatError(std::string("trainer.json: rank_states: ") + e.what());
  }
}

// A parameter (or its moment) of this rank as a checkpoint tensor: its full shape, this rank's slice
// (layer/parameter_table.hpp's layout: an FFN expert's w1/w3 rows (and biases) and w2 columns (and its
// [D] bias) split over tp, slice t; the shared experts' alike, held by every ep and dp rank), and
// whether this rank writes it (one rank of each tp group that holds it: the tp slices are gathered).
inline CheckpointTensor checkpoint_tensor(std::string name, const std::vector<std::int64_t>& local_shape, ParamShard shard,
                                          float* data, const ParallelGrid& g) {
  CheckpointTensor t{std::move(name), local_shape, data};
  if (shard == ParamShard::kReplicated) {
    t.writer = g.rank() == 0;
    return t;
  }
  t.writer = g.t == 0 && g.d == 0 && (expert_shard(shard) || g.e == 0);
  if (g.tp > 1) {
    const int dim = row_split(shard) ? 0 : int(local_shape.size()) - 1;  // columns: the last dimension
    const std::int64_t local = local_shape.at(std::size_t(dim));
    t.shape[std::size_t(dim)] = local * g.tp;
    t.slice_dim = dim, t.slice_begin = g.t * local, t.slice_size = local;
  }
  return t;
}

inline nlohmann::json layout_json(const ParallelGrid& g) { return {{"tp", g.tp}, {"ep", g.ep}, {"dp", g.dp}}; }

// The checkpoint content of `trainer` on the rank `grid` places (views of its parameters and moments:
// save or load through it). `extra` goes into the state under "run".
template <class Model>
CheckpointContent trainer_checkpoint(Trainer<Model>& trainer, nlohmann::json extra = nlohmann::json::object(),
                                     const ParallelGrid& grid = {}) {
  CheckpointContent c;
  AdamW<float>& opt = trainer.optimizer();
  const auto& ps = opt.parameters();
  for (std::size_t i = 0; i < ps.size(); ++i) {
    c.model.push_back(checkpoint_tensor(ps[i].name, ps[i].shape, ps[i].shard, ps[i].value, grid));
    c.optimizer.push_back(checkpoint_tensor("optim.m." + ps[i].name, ps[i].shape, ps[i].shard, opt.exp_avg(i).data(), grid));
    c.optimizer.push_back(checkpoint_tensor("optim.v." + ps[i].name, ps[i].shape, ps[i].shard, opt.exp_avg_sq(i).data(), grid));
  }
  // Parameter groups (bf16 masters, CUDA layers' device buffers): host copies of their fp32 values
  // and moments, taken now (a save writes them) and written back after a load.
  std::size_t n_staged = 0;
  for (ParameterGroup* g : trainer.parameter_groups()) n_staged += 3 * g->checkpoint_parameters().size();
  c.staging.reserve(n_staged);  // never reallocated: the tensors point into it
  for (ParameterGroup* g : trainer.parameter_groups()) {
    const auto gps = g->checkpoint_parameters();
    for (std::size_t i = 0; i < gps.size(); ++i) {
      const auto n = std::size_t(gps[i].numel());
      float* v = c.staging.emplace_back(n).data();
      float* m = c.staging.emplace_back(n).data();
      float* s = c.staging.emplace_back(n).data();
      g->save_state(i, v, m, s);
      const std::string name = g->checkpoint_prefix() + gps[i].name;
      c.model.push_back(checkpoint_tensor(name, gps[i].shape, gps[i].shard, v, grid));
      c.optimizer.push_back(checkpoint_tensor("optim.m." + name, gps[i].shape, gps[i].shard, m, grid));
      c.optimizer.push_back(checkpoint_tensor("optim.v." + name, gps[i].shape, gps[i].shard, s, grid));
      c.after_load.push_back([g, i, v, m, s] { g->load_state(i, v, m, s); });
    }
  }
  c.state = {{"optimizer_steps", opt.steps_taken()}, {"layout", layout_json(grid)}, {"run", std::move(extra)}};
  c.rank_state = to_json(trainer.state());
  return c;
}

// The bookkeeping of a run written in layout `from` (every rank's state) for a rank of another layout
// with `shards` shards: the interval's sums of the old shards (ranks with t = 0) combined, the losses
// as their mean (each new shard holds it, so the new mean is the same), the load counts as their sum
// spread evenly (so the new sum is the same); counters, norms and times are rank 0's (equal on all).
inline TrainerState resharded_state(const std::vector<nlohmann::json>& rank_states, const ParallelGrid& from, int shards) {
  TrainerState s = trainer_state_from_json(rank_states.at(0));
  std::vector<TrainerState> old;
  for (std::size_t r = 0; r < rank_states.size(); r += std::size_t(from.tp)) old.push_back(trainer_state_from_json(rank_states[r]));
  const double n_old = double(old.size());
  s.sum_loss = 0;
  for (auto& v : s.sum_lbl) v = 0;
  for (auto& v : s.sum_z) v = 0;
  for (auto& row : s.load)
    for (auto& v : row) v = 0;
  for (const auto& o : old) {
    if (o.sum_lbl.size() != s.sum_lbl.size() || o.sum_z.size() != s.sum_z.size() || o.load.size() != s.load.size())
      throw FormatError("trainer.json: rank_states: the ranks' interval sums have different sizes");
    s.sum_loss += o.sum_loss / n_old;
    for (std::size_t l = 0; l < s.sum_lbl.size(); ++l) s.sum_lbl[l] += o.sum_lbl[l] / n_old;
    for (std::size_t l = 0; l < s.sum_z.size(); ++l) s.sum_z[l] += o.sum_z[l] / n_old;
    for (std::size_t l = 0; l < s.load.size(); ++l) {
      if (o.load[l].size() != s.load[l].size()) throw FormatError("trainer.json: rank_states: the ranks' load rows differ in size");
      for (std::size_t e = 0; e < s.load[l].size(); ++e) s.load[l][e] += o.load[l][e] / double(shards);
    }
  }
  return s;
}

// After CheckpointDir::load (which filled the parameters and moments): the trainer's bookkeeping and
// the optimizer's step count, for the rank `grid` places (the same layout: its own; another: the
// resharded form). Returns the caller's "run" part.
template <class Model>
nlohmann::json restore_trainer(Trainer<Model>& trainer, const LoadedCheckpoint& loaded, const ParallelGrid& grid = {}) {
  const nlohmann::json& state = loaded.state;
  if (!state.is_object() || !state.contains("layout") || !state.contains("optimizer_steps") || !state.contains("run"))
    throw FormatError("trainer.json: state needs 'layout', 'optimizer_steps' and 'run'");
  ParallelGrid from;
  try {
    from = ParallelGrid::of(state["layout"].at("tp").get<int>(), state["layout"].at("ep").get<int>(),
                            state["layout"].at("dp").get<int>(), 0);
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(std::string("trainer.json: state.layout: ") + e.what());
  }
  if (from.tp < 1 || from.ep < 1 || from.dp < 1 || std::size_t(from.size()) != loaded.rank_states.size())
    throw FormatError("trainer.json: state.layout " + state["layout"].dump() + " does not match the " +
                      std::to_string(loaded.rank_states.size()) + " rank states");
  const bool same = from.tp == grid.tp && from.ep == grid.ep && from.dp == grid.dp;
  trainer.restore(same ? trainer_state_from_json(loaded.rank_states[std::size_t(grid.rank())])
                       : resharded_state(loaded.rank_states, from, grid.shards()));
  trainer.optimizer().set_steps_taken(state["optimizer_steps"].get<std::int64_t>());
  for (ParameterGroup* g : trainer.parameter_groups()) g->set_steps_taken(state["optimizer_steps"].get<std::int64_t>());
  return state["run"];
}

}  // namespace moekit::train
