// libFuzzer target: train::CheckpointDir::load on a checkpoint folder made from the input. The input
// is split at its first 0xFF 0x00 into trainer.json and model.safetensors (optimizer.safetensors is a
// valid empty file). Every input either loads (the expected tensor was found whole) or throws
// moekit::FormatError naming what is wrong, and the buffers are untouched unless it loaded.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <moekit/train/checkpoint.hpp>

namespace fs = std::filesystem;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const fs::path dir = fs::temp_directory_path() / ("moekit_fuzz_ckpt_" + std::to_string(::getpid())) / "step-000007";
  static bool made = [] {
    fs::create_directories(dir);
    moekit::io::SafetensorsWriter().write(dir / "optimizer.safetensors");
    return true;
  }();
  (void)made;
  std::size_t cut = size;
  for (std::size_t i = 0; i + 1 < size; ++i)
    if (data[i] == 0xFF && data[i + 1] == 0x00) {
      cut = i;
      break;
    }
  std::ofstream(dir / "trainer.json", std::ios::binary).write(reinterpret_cast<const char*>(data), std::streamsize(cut));
  const std::size_t rest = cut + 2 <= size ? cut + 2 : size;
  std::ofstream(dir / "model.safetensors", std::ios::binary)
      .write(reinterpret_cast<const char*>(data + rest), std::streamsize(size - rest));
  std::vector<float> w(6, -7.f);
  moekit::train::CheckpointContent c{{{"w", {2, 3}, w.data()}}, {}, {}};
  try {
    (void)moekit::train::CheckpointDir::load(dir, c);
  } catch (const moekit::FormatError&) {
    for (float v : w)
      if (v != -7.f) __builtin_trap();  // a failed load wrote the buffer
  }
  return 0;
}
