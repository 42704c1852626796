// Sharded checkpoints under mpirun (train/checkpoint.hpp, train/trainer_checkpoint.hpp): written from
// one (tp, ep, dp) layout, every tensor exactly once (one file per writing rank and an index), read back
// whole by a single process, and resharded into every other layout of the world, each rank's parts
// equal to the bit to slices cut here by hand from the full tensors. A corrupt tensor found by one rank
// fails the load on every rank, naming that rank and the file, and writes no rank's buffers.
// Checks are non-fatal (CHECK): a rank that stopped early would leave the others in a collective.
#include <doctest/doctest.h>

#include <array>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <moekit/io/safetensors.hpp>
#include <moekit/parallel/comm/mpi.hpp>
#include <moekit/train/checkpoint.hpp>
#include <moekit/train/trainer_checkpoint.hpp>

#include <unistd.h>

using namespace moekit;
namespace fs = std::filesystem;

namespace {

comm::Mpi& ckpt_world() {
  static comm::Mpi w;
  return w;
}

constexpr std::int64_t kD = 3, kF = 4, kE = 4;  // d_model, d_expert, FFN experts

// The full tensors: dense.weight [5, D] (replicated), experts.e.w1.weight [F, D] (rows over tp),
// experts.e.w2.weight [D, F] (columns over tp); element i of tensor k is k * 1000 + i + 0.25.
struct Spec {
  std::string name;
  std::vector<std::int64_t> shape;
  ParamShard shard;
  std::int64_t expert;  // -1: not an expert's
};
std::vector<Spec> full_specs() {
  std::vector<Spec> s{{"dense.weight", {5, kD}, ParamShard::kReplicated, -1}};
  for (std::int64_t e = 0; e < kE; ++e) {
    s.push_back({"experts." + std::to_string(e) + ".w1.weight", {kF, kD}, ParamShard::kExpertRows, e});
    s.push_back({"experts." + std::to_string(e) + ".w2.weight", {kD, kF}, ParamShard::kExpertCols, e});
    // 1-D expert tensors (the FFN biases, ffn_bias): split along their one dimension, by rows or columns.
    s.push_back({"experts." + std::to_string(e) + ".w1.bias", {kF}, ParamShard::kExpertRows, e});
    s.push_back({"experts." + std::to_string(e) + ".cols.bias", {kF}, ParamShard::kExpertCols, e});
  }
  return s;
}
float value(std::size_t k, std::int64_t i) { return float(k) * 1000.f + float(i) + 0.25f; }

// What the rank of grid g holds, in its own buffers (values cut from the full tensors here, by hand).
struct Holding {
  std::vector<std::vector<float>> bufs;
  std::vector<std::vector<float>> want;  // the expected contents
  train::CheckpointContent content;
  Holding(const ParallelGrid& g, bool fill) {
    const auto specs = full_specs();
    const std::int64_t el = kE / g.ep, fl = kF / g.tp;
    for (std::size_t k = 0; k < specs.size(); ++k) {
      const Spec& s = specs[k];
      if (s.expert >= 0 && (s.expert < g.e * el || s.expert >= (g.e + 1) * el)) continue;
      std::vector<float> part;
      std::vector<std::int64_t> local = s.shape;
      const std::int64_t numel = s.shape.size() == 1 ? s.shape[0] : s.shape[0] * s.shape[1];
      if (s.shard == ParamShard::kReplicated) {
        for (std::int64_t i = 0; i < numel; ++i) part.push_back(value(k, i));
      } else if (s.shard == ParamShard::kExpertRows) {  // rows [t fl, (t+1) fl) of [F, D] (or of [F])
        const std::int64_t per_row = numel / s.shape[0];
        local[0] = fl;
        for (std::int64_t r = g.t * fl; r < (g.t + 1) * fl; ++r)
          for (std::int64_t c = 0; c < per_row; ++c) part.push_back(value(k, r * per_row + c));
      } else {  // columns [t fl, (t+1) fl) of [D, F] (or of [F]): the last dimension
        const std::int64_t outer = numel / kF;
        local.back() = fl;
        for (std::int64_t r = 0; r < outer; ++r)
          for (std::int64_t c = g.t * fl; c < (g.t + 1) * fl; ++c) part.push_back(value(k, r * kF + c));
      }
      want.push_back(part);
      bufs.push_back(fill ? part : std::vector<float>(part.size(), -1.f));
      content.model.push_back(train::checkpoint_tensor(s.name, local, s.shard, bufs.back().data(), g));
    }
    // The optimizer set: one moment per parameter, its own values (the model's negated).
    const std::size_t n = bufs.size();
    for (std::size_t i = 0; i < n; ++i) {
      std::vector<float> m = want[i];
      for (auto& v : m) v = -v;
      want.push_back(m);
      bufs.push_back(fill ? m : std::vector<float>(m.size(), -1.f));
    }
    for (std::size_t i = 0; i < n; ++i) {
      train::CheckpointTensor t = content.model[i];
      t.name = "optim.m." + t.name, t.data = bufs[n + i].data();
      content.optimizer.push_back(t);
    }
    // bufs never grows again: the views stay valid.
    content.state = {{"layout", train::layout_json(g)}};
    content.rank_state = {{"rank", g.rank()}};
  }
  bool holds_want() const { return bufs == want; }
  bool untouched() const {
    for (const auto& b : bufs)
      for (float v : b)
        if (v != -1.f) return false;
    return true;
  }
};

// This rank's grid and slice group for the layout (tp, ep, dp) of the world.
struct Layout {
  ParallelGrid g;
  std::unique_ptr<comm::HostCommunicator> slices;
  train::CheckpointRanks ranks() { return {&ckpt_world(), slices.get()}; }
};
Layout layout(int tp, int ep, int dp) {
  Layout l;
  l.g = ParallelGrid::of(tp, ep, dp, ckpt_world().rank());
  const auto s = l.g.split_of(RankGroup::kTp);
  l.slices = ckpt_world().split(s.color, s.key);
  return l;
}

// The layouts of the world (tp x ep x dp = world) that the tensors allow (tp | F, ep | E).
std::vector<std::array<int, 3>> layouts() {
  const int w = ckpt_world().size();
  std::vector<std::array<int, 3>> out;
  for (int tp = 1; tp <= w; ++tp)
    for (int ep = 1; ep <= w; ++ep)
      if (w % (tp * ep) == 0 && kF % tp == 0 && kE % ep == 0) out.push_back({tp, ep, w / (tp * ep)});
  return out;
}

fs::path shared_dir(const std::string& name) {  // one folder for all ranks: rank 0's name
  std::int64_t pid = ::getpid();
  ckpt_world().broadcast(&pid, 1, 0);
  return fs::temp_directory_path() / ("moekit_mpi_ckpt_" + std::to_string(pid) + "_" + name);
}

}  // namespace

TEST_CASE("sharded checkpoint: every tensor written once, read whole by one process, resharded into every layout") {
  const int w = ckpt_world().size();
  for (const auto& from : layouts()) {
    CAPTURE(from[0]);
    CAPTURE(from[1]);
    CAPTURE(from[2]);
    const fs::path root = shared_dir("write_" + std::to_string(from[0]) + std::to_string(from[1]) + std::to_string(from[2]));
    Layout wl = layout(from[0], from[1], from[2]);
    Holding writer(wl.g, true);
    const train::CheckpointDir dir(root);
    const fs::path step = dir.save(3, writer.content, wl.ranks());
    CHECK(step == root / "step-000003");
    CHECK(writer.holds_want());  // saving changes nothing

    if (ckpt_world().rank() == 0) {
      // The files: one per rank that writes (dp index 0, tp index 0), an index naming each tensor once.
      const int writers = from[1];
      const nlohmann::json meta = nlohmann::json::parse(std::ifstream(step / "trainer.json"));
      CHECK(meta.at("ranks") == w);
      CHECK(meta.at("files").at("model").size() == std::size_t(writers));
      CHECK(meta.at("rank_states").size() == std::size_t(w));
      CHECK(meta.at("rank_states").at(std::size_t(w - 1)).at("rank") == w - 1);
      std::multiset<std::string> seen;
      for (const auto& f : meta.at("files").at("model")) {
        const io::SafetensorsFile sf = io::read_safetensors(step / f.get<std::string>());
        for (const auto& n : sf.names()) seen.insert(n);
      }
      CHECK(seen.size() == full_specs().size());
      for (const auto& s : full_specs()) CHECK(seen.count(s.name) == 1);
      CHECK(fs::exists(step / "model.safetensors.index.json") == (writers > 1));
      // A single process reads the full tensors.
      Holding one(ParallelGrid{}, false);
      const auto loaded = train::CheckpointDir::load(step, one.content);
      CHECK(loaded.step == 3);
      CHECK(loaded.rank_states.size() == std::size_t(w));
      CHECK(one.holds_want());
    }
    ckpt_world().barrier();
    // Every layout of the world reads its parts.
    for (const auto& to : layouts()) {
      CAPTURE(to[0]);
      CAPTURE(to[1]);
      CAPTURE(to[2]);
      Layout rl = layout(to[0], to[1], to[2]);
      Holding reader(rl.g, false);
      std::vector<std::string> skipped;
      const auto loaded = dir.load_newest(reader.content, skipped, rl.ranks());
      CHECK(loaded.has_value());
      CHECK(skipped.empty());
      CHECK(reader.holds_want());
    }
    ckpt_world().barrier();
    if (ckpt_world().rank() == 0) fs::remove_all(root);
  }
}

TEST_CASE("sharded checkpoint: a corrupt tensor found by one rank fails the load on every rank and writes nothing") {
  const int w = ckpt_world().size();
  const fs::path root = shared_dir("corrupt");
  Layout wl = layout(1, w, 1);  // ep = world: every rank writes its experts' file
  Holding writer(wl.g, true);
  const train::CheckpointDir dir(root);
  const fs::path step = dir.save(8, writer.content, wl.ranks());
  const std::string last = train::detail::shard_file("model", w - 1, w);
  if (ckpt_world().rank() == 0) {  // flip a byte near the end of the last rank's file (its last tensor)
    std::fstream f(step / last, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(-3, std::ios::end);
    char c = 0;
    f.read(&c, 1);
    c = char(c ^ 0x10);
    f.seekp(-3, std::ios::end);
    f.write(&c, 1);
  }
  ckpt_world().barrier();
  Layout rl = layout(1, w, 1);
  Holding reader(rl.g, false);
  std::string message;
  try {
    train::CheckpointDir::load(step, reader.content, rl.ranks());
  } catch (const FormatError& e) {
    message = e.what();
  }
  CAPTURE(message);
  CHECK(message.find("moekit::FormatError: rank " + std::to_string(w - 1) + ": /") == 0);  // the rank that holds those experts
  CHECK(message.find(last) != std::string::npos);
  CHECK(message.find("is corrupt") != std::string::npos);
  CHECK(reader.untouched());
  // load_newest skips it on every rank alike.
  std::vector<std::string> skipped;
  CHECK_FALSE(dir.load_newest(reader.content, skipped, rl.ranks()).has_value());
  CHECK(skipped.size() == 1);
  CHECK(reader.untouched());
  ckpt_world().barrier();
  if (ckpt_world().rank() == 0) fs::remove_all(root);
}
