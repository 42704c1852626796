#pragma once
// --resume for the example trainers (docs/checkpoints.md): the library's CheckpointDir and
// trainer_checkpoint/restore_trainer, plus the trainer's own state: its flags (which must match),
// where its sampler is, and the MoE routers' state. Trained: set_sampler_state(u64); Model:
// set_router_states(vector<vector<double>>).
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <moekit/core/error.hpp>
#include <moekit/train/checkpoint.hpp>
#include <moekit/train/trainer_checkpoint.hpp>

#include "console.hpp"
#include "ranks.hpp"

// --resume: the newest checkpoint that verifies (the ones skipped, and why, on stderr), restored into
// the model, the optimizer, the trainer and the sampler. No checkpoint at all: a fresh start, said so.
// Checkpoints that exist but none verifies, or one written with other flags: an error.
// Under mpirun every rank takes part (rank 0 prints), and the checkpoint may come from another layout.
// Returns the trainer's own part of the checkpoint (the `extra` it saved; empty on a fresh start).
template <class Trainer, class Trained, class Model>
nlohmann::json resume(const moekit::train::CheckpointDir& dir, Trainer& trainer, Trained& trained, Model& model,
            const nlohmann::json& config, Ranks* ranks) {
  std::vector<std::string> skipped;
  const moekit::ParallelGrid grid = ranks ? ranks->grid() : moekit::ParallelGrid{};
  const moekit::train::CheckpointRanks cr = ranks ? ranks->checkpoint_ranks() : moekit::train::CheckpointRanks{};
  const auto loaded = dir.load_newest(moekit::train::trainer_checkpoint(trainer, {}, grid), skipped, cr);
  if (!ranks || ranks->rank() == 0)
    for (const auto& s : skipped) std::fprintf(stderr, "resume: skipped %s\n", s.c_str());
  if (!loaded) {
    if (!skipped.empty())
      throw moekit::FormatError("--resume: none of the " + std::to_string(skipped.size()) + " checkpoints in " + dir.root().string() +
                                " verifies (above); not starting over on top of them");
    out("resume: no checkpoint in %s yet; starting at step 0\n", dir.root().string().c_str());
    return {};
  }
  const nlohmann::json run = moekit::train::restore_trainer(trainer, *loaded, grid);
  const nlohmann::json& saved = run.at("config");
  // A key the checkpoint lacks matches an empty object: options added since it was written, all at
  // their defaults (the trainers' moe_options, examples/common/moe_flags.hpp).
  for (const auto& [key, value] : config.items())
    if (saved.contains(key) ? saved[key] != value : !(value.is_object() && value.empty()))
      throw moekit::ConfigError(key, value.dump(), "differs from the checkpoint's " + (saved.contains(key) ? saved[key].dump() : "(none)") +
                                                       " (" + loaded->dir.string() + "); resume with the flags that wrote it");
  trained.set_sampler_state(run.at("sampler").get<std::uint64_t>());
  model.set_router_states(run.at("router_states").get<std::vector<std::vector<double>>>());
  const nlohmann::json& layout = loaded->state.at("layout");
  out("resume: step %lld from %s (written at tp %d x ep %d x dp %d%s)\n", (long long)loaded->step, loaded->dir.string().c_str(),
      layout.at("tp").get<int>(), layout.at("ep").get<int>(), layout.at("dp").get<int>(),
      layout == moekit::train::layout_json(grid) ? "" : "; resharded to this run's layout");
  return run;
}
