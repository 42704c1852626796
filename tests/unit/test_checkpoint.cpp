// train/checkpoint.hpp and train/trainer_checkpoint.hpp: the files a checkpoint holds (readable by any
// safetensors reader, each tensor's XXH3 checksum computed here with xxHash itself), a round trip to
// the bit, every verification failure naming the file and the tensor and leaving the buffers as they
// were, the states a crash can leave (a hidden temporary folder, a folder without trainer.json)
// skipped by load_newest, --keep, and a Trainer stopped, restored and run on giving the same steps as
// one never stopped.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <moekit/io/safetensors.hpp>
#include <moekit/train/checkpoint.hpp>
#include <moekit/train/trainer.hpp>
#include <moekit/train/trainer_checkpoint.hpp>
#include <string>
#include <vector>
#include <xxhash.h>

#include <unistd.h>

using namespace moekit;
using moekit::train::CheckpointContent;
using moekit::train::CheckpointDir;
namespace fs = std::filesystem;

namespace {

struct TempDir {
  fs::path path;
  TempDir() {
    static int n = 0;
    path = fs::temp_directory_path() / ("moekit_ckpt_" + std::to_string(::getpid()) + "_" + std::to_string(n++));
    fs::remove_all(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

// Two model tensors and their moments, filled with distinct values (one of them 1/3: not short in decimal).
struct Buffers {
  std::vector<float> w = std::vector<float>(12), b = std::vector<float>(3), mw = std::vector<float>(12), mb = std::vector<float>(3);
  explicit Buffers(float base) {
    for (std::size_t i = 0; i < w.size(); ++i) w[i] = base + float(i) / 3.f, mw[i] = -base * float(i);
    for (std::size_t i = 0; i < b.size(); ++i) b[i] = base * 7.f - float(i), mb[i] = base / float(i + 1);
  }
  CheckpointContent content(nlohmann::json state = {{"x", 1.0 / 3.0}, {"rng", std::uint64_t(0xfedcba9876543210ull)}}) {
    return {{{"layer.weight", {3, 4}, w.data()}, {"layer.bias", {3}, b.data()}},
            {{"optim.m.layer.weight", {3, 4}, mw.data()}, {"optim.m.layer.bias", {3}, mb.data()}},
            std::move(state), {}, {}, {}};
  }
};

void flip_byte(const fs::path& file, std::uint64_t from_end) {
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(0, std::ios::end);
  const auto size = std::uint64_t(f.tellg());
  f.seekg(std::streamoff(size - from_end));
  char c = 0;
  f.read(&c, 1);
  c = char(c ^ 0x40);
  f.seekp(std::streamoff(size - from_end));
  f.write(&c, 1);
}

std::string load_error(const fs::path& dir, CheckpointContent c) {
  try {
    CheckpointDir::load(dir, c);
  } catch (const FormatError& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

TEST_CASE("checkpoint: layout, checksums from xxHash, round trip to the bit") {
  TempDir t;
  Buffers a(1.5f);
  const CheckpointDir dir(t.path);
  const fs::path step = dir.save(123, a.content());
  CHECK(step == t.path / "step-000123");
  for (const char* f : {"model.safetensors", "optimizer.safetensors", "trainer.json"}) CHECK(fs::exists(step / f));
  // Any safetensors reader sees the names and shapes; the checksum is XXH3-64 of the tensor's bytes.
  const io::SafetensorsFile m = io::read_safetensors(step / "model.safetensors");
  CHECK(m.names() == std::vector<std::string>{"layer.bias", "layer.weight"});
  CHECK(m.info("layer.weight").shape == std::vector<std::int64_t>{3, 4});
  CHECK(m.get_f32("layer.weight") == a.w);
  char want[17];
  std::snprintf(want, sizeof want, "%016llx", (unsigned long long)XXH3_64bits(a.w.data(), a.w.size() * sizeof(float)));
  CHECK(m.metadata().at("xxh3:layer.weight") == std::string(want));
  // Load into other buffers: the same bits, the same state.
  Buffers b(-9.f);
  const nlohmann::json state = CheckpointDir::load(step, b.content()).state;
  CHECK(b.w == a.w);
  CHECK(b.b == a.b);
  CHECK(b.mw == a.mw);
  CHECK(b.mb == a.mb);
  CHECK(state.at("x").get<double>() == 1.0 / 3.0);
  CHECK(state.at("rng").get<std::uint64_t>() == 0xfedcba9876543210ull);
  CHECK(dir.list().size() == 1);
}

TEST_CASE("checkpoint: a failed verification names the file and the tensor and writes nothing") {
  TempDir t;
  Buffers a(2.f);
  const fs::path step = CheckpointDir(t.path).save(5, a.content());
  Buffers poison(-1.f);
  const std::vector<float> w0 = poison.w, mw0 = poison.mw;
  SUBCASE("a flipped byte in the last tensor of optimizer.safetensors") {
    flip_byte(step / "optimizer.safetensors", 2);
    const std::string e = load_error(step, poison.content());
    CHECK(e.find("optimizer.safetensors") != std::string::npos);
    CHECK(e.find("'optim.m.layer.weight' is corrupt") != std::string::npos);
  }
  SUBCASE("the model has a tensor the checkpoint lacks") {
    std::vector<float> extra(2);
    CheckpointContent c = poison.content();
    c.model.push_back({"layer2.bias", {2}, extra.data()});
    const std::string e = load_error(step, c);
    CHECK(e.find("model.safetensors: tensor 'layer2.bias' is missing") != std::string::npos);
  }
  SUBCASE("the checkpoint has a tensor the model lacks") {
    CheckpointContent c = poison.content();
    c.model.pop_back();
    CHECK(load_error(step, c).find("tensor 'layer.bias' is not in the model") != std::string::npos);
  }
  SUBCASE("another shape") {
    CheckpointContent c = poison.content();
    c.model[0].shape = {4, 3};
    CHECK(load_error(step, c).find("tensor 'layer.weight' has shape [3, 4], the model has [4, 3]") != std::string::npos);
  }
  SUBCASE("another format number") {
    std::ofstream(step / "trainer.json") << R"({"format": 99, "step": 5, "state": {}})";
    CHECK(load_error(step, poison.content()).find("field 'format' is 99") != std::string::npos);
  }
  SUBCASE("a step that is not the folder's") {
    std::ofstream(step / "trainer.json") << R"({"format": 2, "step": 6, "state": {}})";
    CHECK(load_error(step, poison.content()).find("field 'step' is 6, the directory says 5") != std::string::npos);
  }
  SUBCASE("a truncated trainer.json") {
    std::ofstream(step / "trainer.json") << R"({"format": 2, "st)";
    CHECK(load_error(step, poison.content()).find("trainer.json: not valid JSON") != std::string::npos);
  }
  CHECK(poison.w == w0);  // nothing was written
  CHECK(poison.mw == mw0);
}

TEST_CASE("checkpoint: what a crash leaves is skipped, --keep, the same step saved twice") {
  TempDir t;
  Buffers a(1.f), b(2.f), c(3.f);
  const CheckpointDir dir(t.path, /*keep=*/2);
  dir.save(10, a.content({{"which", 10}}));
  dir.save(20, b.content({{"which", 20}}));
  // A writer killed mid-write leaves only its hidden temporary folder; one killed between the files
  // and trainer.json cannot leave a step-* folder (trainer.json is written before the rename), but a
  // folder without it (copied by hand, say) must not be taken either.
  fs::create_directories(t.path / ".step-000030.tmp-99999");
  std::ofstream(t.path / ".step-000030.tmp-99999" / "model.safetensors") << "partial";
  fs::create_directories(t.path / "step-000040");
  fs::copy_file(t.path / "step-000020" / "model.safetensors", t.path / "step-000040" / "model.safetensors");
  flip_byte(t.path / "step-000020" / "model.safetensors", 1);  // and the newest whole one is corrupt
  CHECK(dir.list().size() == 3);  // 40, 20, 10: the hidden folder is not a checkpoint
  Buffers into(0.f);
  std::vector<std::string> skipped;
  const auto loaded = dir.load_newest(into.content(), skipped);
  REQUIRE(loaded);
  CHECK(loaded->step == 10);
  CHECK(loaded->state.at("which") == 10);
  CHECK(into.w == a.w);
  REQUIRE(skipped.size() == 2);
  CHECK(skipped[0].find("step-000040") != std::string::npos);
  CHECK(skipped[0].find("trainer.json: missing") != std::string::npos);
  CHECK(skipped[1].find("'layer.weight' is corrupt") != std::string::npos);  // the file's last tensor (sorted by name)
  // The next save prunes to the newest 2 and removes what killed writers left.
  dir.save(50, c.content({{"which", 50}}));
  CHECK_FALSE(fs::exists(t.path / ".step-000030.tmp-99999"));
  const auto left = dir.list();
  REQUIRE(left.size() == 2);
  CHECK(left[0].first == 50);
  CHECK(left[1].first == 40);
  // The same step again replaces it whole.
  dir.save(50, a.content({{"which", 51}}));
  Buffers again(0.f);
  CHECK(CheckpointDir::load(t.path / "step-000050", again.content()).state.at("which") == 51);
  CHECK(again.w == a.w);
  CHECK_THROWS_AS(CheckpointDir(t.path, -1), ConfigError);
}

namespace {
// Least squares y = W x + b on a stream of samples drawn from the model's own sampler: what a
// Trainer needs, with data position as state.
// With a group: one more bias c, bf16 values in a train::HostParameterGroup (fp32 masters), as the
// bf16 and CUDA layers keep theirs.
struct Regression {
  std::vector<float> w = std::vector<float>(6, 0.f), b = std::vector<float>(2, 0.f), gw = std::vector<float>(6), gb = std::vector<float>(2);
  SplitMix64 rng{42};
  std::vector<bf16> c = std::vector<bf16>(2, bf16(0.f));
  std::vector<float> gc = std::vector<float>(2, 0.f);
  std::unique_ptr<train::HostParameterGroup> group;
  explicit Regression(bool with_group = false) {
    if (with_group)
      group = std::make_unique<train::HostParameterGroup>(std::vector<Parameter<bf16, float>>{{"c", c.data(), gc.data(), {2}}},
                                                          train::AdamWConfig{0.05, 0.9, 0.95, 1e-8, 0.0});
  }
  std::vector<train::ParameterGroup*> parameter_groups() {
    if (!group) return {};
    group->set_checkpoint_prefix("extra.");
    return {group.get()};
  }
  train::MicroBatchStats train_micro_batch(std::int64_t, std::int64_t, double scale) {
    double loss = 0;
    for (int s = 0; s < 8; ++s) {
      float x[3], y[2];
      for (auto& v : x) v = float(rng.uniform(-1, 1));
      y[0] = 2 * x[0] - x[1] + 0.5f, y[1] = x[2] - 1;
      for (int o = 0; o < 2; ++o) {
        float p = b[o] + (group ? float(c[std::size_t(o)]) : 0.f);
        for (int i = 0; i < 3; ++i) p += w[o * 3 + i] * x[i];
        const float d = p - y[o];
        loss += 0.5 * d * d / 8;
        for (int i = 0; i < 3; ++i) gw[o * 3 + i] += float(scale) * d * x[i] / 8;
        gb[o] += float(scale) * d / 8;
        gc[std::size_t(o)] += float(scale) * d / 8;
      }
    }
    train::MicroBatchStats st;
    st.loss = loss;
    return st;
  }
  void zero_grad() {
    std::fill(gc.begin(), gc.end(), 0.f);
    std::fill(gw.begin(), gw.end(), 0.f);
    std::fill(gb.begin(), gb.end(), 0.f);
  }
  void reduce_gradients() {}
  void after_optimizer_step() {}
  std::vector<Parameter<float>> parameters() { return {{"w", w.data(), gw.data(), {2, 3}}, {"b", b.data(), gb.data(), {2}}}; }
};
}  // namespace

TEST_CASE("checkpoint: a Trainer stopped, restored into a new one and run on equals one never stopped") {
  train::TrainerConfig tc;
  tc.steps = 12, tc.accum = 2, tc.log_interval = 5, tc.tokens_per_micro_batch = 8;
  const train::AdamWConfig ac{0.05, 0.9, 0.95, 1e-8, 0.01};
  const train::CosineSchedule sched{0.05, 0.005, 2, 12};
  std::vector<double> straight_losses, resumed_losses;
  Regression a;
  train::Trainer<Regression> ta(a, tc, ac, sched);
  ta.on_log([&](const train::IntervalReport& r) { straight_losses.push_back(r.loss); });
  ta.run();

  TempDir t;
  const CheckpointDir dir(t.path);
  Regression b;
  {
    train::Trainer<Regression> tb(b, tc, ac, sched);
    for (int s = 0; s < 7; ++s) tb.step();  // inside a logging interval (5): its sums must be saved too
    dir.save(7, train::trainer_checkpoint(tb, {{"sampler", b.rng.state}}));
  }
  Regression c;  // a new process: fresh model, fresh trainer
  train::Trainer<Regression> tcn(c, tc, ac, sched);
  tcn.on_log([&](const train::IntervalReport& r) { resumed_losses.push_back(r.loss); });
  std::vector<std::string> skipped;
  const auto loaded = dir.load_newest(train::trainer_checkpoint(tcn), skipped);
  REQUIRE(loaded);
  CHECK(skipped.empty());
  const nlohmann::json run = train::restore_trainer(tcn, *loaded);
  c.rng.state = run.at("sampler").get<std::uint64_t>();
  CHECK(tcn.steps_done() == 7);
  CHECK(tcn.optimizer().steps_taken() == 7);
  tcn.run();
  CHECK(c.w == a.w);  // bit for bit
  CHECK(c.b == a.b);
  for (std::size_t i = 0; i < 2; ++i) {
    CHECK(tcn.optimizer().exp_avg(i) == ta.optimizer().exp_avg(i));
    CHECK(tcn.optimizer().exp_avg_sq(i) == ta.optimizer().exp_avg_sq(i));
  }
  // The straight run logged at steps 5, 10, 12; the resumed one at 10 and 12, with the same values.
  REQUIRE(straight_losses.size() == 3);
  REQUIRE(resumed_losses.size() == 2);
  CHECK(resumed_losses[0] == straight_losses[1]);
  CHECK(resumed_losses[1] == straight_losses[2]);
  CHECK(std::isfinite(a.w[0]));
}

TEST_CASE("checkpoint: a parameter group's bf16 values are saved as their fp32 masters and resume bit for bit") {
  train::TrainerConfig tc;
  tc.steps = 10, tc.log_interval = 4, tc.tokens_per_micro_batch = 8;
  const train::AdamWConfig ac{0.05, 0.9, 0.95, 1e-8, 0.01};
  const train::CosineSchedule sched{0.05, 0.005, 2, 10};
  Regression a(true);
  train::Trainer<Regression> ta(a, tc, ac, sched);
  ta.run();

  TempDir t;
  const CheckpointDir dir(t.path);
  {
    Regression b(true);
    train::Trainer<Regression> tb(b, tc, ac, sched);
    for (int s = 0; s < 6; ++s) tb.step();
    const fs::path step = dir.save(6, train::trainer_checkpoint(tb, {{"sampler", b.rng.state}}));
    // The group's tensors under their prefixed names, fp32: the master, not the rounded bf16 value.
    const io::SafetensorsFile m = io::read_safetensors(step / "model.safetensors");
    CHECK(m.get_f32("extra.c", {2}) == b.group->master(0));
    CHECK(io::read_safetensors(step / "optimizer.safetensors").contains("optim.v.extra.c"));
  }
  Regression c(true);
  train::Trainer<Regression> tcn(c, tc, ac, sched);
  std::vector<std::string> skipped;
  const auto loaded = dir.load_newest(train::trainer_checkpoint(tcn), skipped);
  REQUIRE(loaded);
  c.rng.state = train::restore_trainer(tcn, *loaded).at("sampler").get<std::uint64_t>();
  CHECK(c.group->steps_taken() == 6);
  tcn.run();
  CHECK(c.w == a.w);
  CHECK(c.group->master(0) == a.group->master(0));
  for (std::size_t i = 0; i < 2; ++i) CHECK(float(c.c[i]) == float(a.c[i]));
  CHECK(c.group->optimizer().exp_avg_sq(0) == a.group->optimizer().exp_avg_sq(0));
  CHECK(float(a.c[0]) != 0.f);  // the group did train
}

TEST_CASE("checkpoint: the open interval's sums carried into another layout (resharded_state)") {
  // Written at tp 2 x ep 2 (ranks 0..3; the shards are the tp-0 ranks 0 and 2), resumed with 3 shards.
  // Each old rank's sums (tp partners equal); what the new shards must hold, worked out by hand:
  //   loss: the old shards' mean (1.5 + 3.5) / 2 = 2.5, so the new mean over 3 shards stays 2.5;
  //   load: the old total (4 + 8, 6 + 2) = (12, 8) spread over 3 shards: (4, 8/3), so the new sum is (12, 8).
  auto rank = [](double loss, double lbl, std::vector<double> load) {
    train::TrainerState s;
    s.steps_done = 80, s.interval_micro = 7, s.sum_loss = loss, s.sum_norm = 9.0;
    s.sum_lbl = {lbl}, s.sum_z = {0.5}, s.load = {load};
    return train::to_json(s);
  };
  const std::vector<nlohmann::json> old{rank(1.5, 0.2, {4, 6}), rank(1.5, 0.2, {4, 6}), rank(3.5, 0.6, {8, 2}), rank(3.5, 0.6, {8, 2})};
  const train::TrainerState s = train::resharded_state(old, ParallelGrid::of(2, 2, 1, 0), 3);
  CHECK(s.steps_done == 80);
  CHECK(s.interval_micro == 7);
  CHECK(s.sum_norm == 9.0);
  CHECK(s.sum_loss == doctest::Approx(2.5).epsilon(1e-15));
  CHECK(s.sum_lbl.at(0) == doctest::Approx(0.4).epsilon(1e-15));
  CHECK(s.sum_z.at(0) == doctest::Approx(0.5).epsilon(1e-15));
  CHECK(s.load.at(0).at(0) == doctest::Approx(4.0).epsilon(1e-15));
  CHECK(s.load.at(0).at(1) == doctest::Approx(8.0 / 3.0).epsilon(1e-15));
  // Ranks whose rows disagree in size are a corrupt checkpoint.
  std::vector<nlohmann::json> bad = old;
  bad[2] = rank(3.5, 0.6, {8});
  CHECK_THROWS_AS(train::resharded_state(bad, ParallelGrid::of(2, 2, 1, 0), 3), FormatError);
}
