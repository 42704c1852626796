// moekit::io safetensors reader and writer: round trips, the exact bytes of the reference
// implementation, and every malformed input ending in FormatError rather than a crash.
#include <doctest/doctest.h>

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <unistd.h>

#include "moekit/io/safetensors.hpp"

namespace {

namespace fs = std::filesystem;
using moekit::FormatError;
using moekit::io::read_safetensors;
using moekit::io::SafetensorsFile;
using moekit::io::SafetensorsWriter;
using Bytes = std::vector<std::uint8_t>;

struct TempDir {
  fs::path path;
  TempDir() {
    static std::atomic<int> n{0};
    path = fs::temp_directory_path() / ("moekit_st_" + std::to_string(::getpid()) + "_" + std::to_string(n++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::vector<std::string> entries() const {
    std::vector<std::string> e;
    for (const auto& d : fs::directory_iterator(path)) e.push_back(d.path().filename().string());
    return e;
  }
};

// [u64 LE n][header][data] with n = header.size() unless given.
Bytes file_bytes(const std::string& header, const Bytes& data = {}, std::int64_t n = -1) {
  const std::uint64_t len = n < 0 ? header.size() : std::uint64_t(n);
  Bytes b;
  for (int i = 0; i < 8; ++i) b.push_back(std::uint8_t(len >> (8 * i)));
  b.insert(b.end(), header.begin(), header.end());
  b.insert(b.end(), data.begin(), data.end());
  return b;
}

// The FormatError message of parsing `b`, or "" when it parses.
std::string parse_error(const Bytes& b) {
  try {
    SafetensorsFile::parse(b, "bad.safetensors");
  } catch (const FormatError& e) {
    return e.what();
  }
  return "";
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

}  // namespace

TEST_CASE("safetensors: round trip of every element type through a file") {
  TempDir dir;
  const std::vector<float> f32{1.5f, -2.25f, 0.0f, 3.0e-30f, -7.0f, 1.0e30f};
  const std::vector<double> f64{0.1, -1e300};
  const std::vector<std::int32_t> i32{-2147483647 - 1, 0, 2147483647};
  const std::vector<std::int64_t> i64{-(std::int64_t(1) << 62), 42};
  const std::vector<float> widened{1.0f, -0.5f, 3.140625f};  // exactly representable in bf16
  SafetensorsWriter w;
  w.add_f32("layer.weight", {2, 3}, f32)
      .add_f64("d", {2}, f64)
      .add_i32("ints", {3}, i32)
      .add_i64("longs", {1, 2}, i64)
      .add_f32_as_bf16("half", {3}, widened)
      .add_f32("empty", {0, 4}, std::vector<float>{})
      .add_f32("scalar", {}, std::vector<float>{2.0f})
      .set_metadata("format", "pt")
      .set_metadata("note", "ünïcode ✓");
  const fs::path p = dir.path / "t.safetensors";
  w.write(p);

  const SafetensorsFile f = read_safetensors(p);
  CHECK(f.size() == 7);
  CHECK(f.names() == std::vector<std::string>{"d", "empty", "half", "ints", "layer.weight", "longs", "scalar"});
  CHECK(f.contains("ints"));
  CHECK_FALSE(f.contains("nope"));
  CHECK(f.metadata().at("format") == "pt");
  CHECK(f.metadata().at("note") == "ünïcode ✓");
  CHECK(f.get_f32("layer.weight", {2, 3}) == f32);
  CHECK(f.get_f32("layer.weight") == f32);
  CHECK(f.get_f64("d", {2}) == f64);
  CHECK(f.get_i32("ints", {3}) == i32);
  CHECK(f.get_i64("longs", {1, 2}) == i64);
  CHECK(f.get_bf16_as_f32("half", {3}) == widened);
  CHECK(f.get_bf16("half", {3})[1].bits == 0xBF00);
  CHECK(f.get_f32("empty", {0, 4}).empty());
  CHECK(f.get_f32("scalar", {}) == std::vector<float>{2.0f});
  CHECK(f.info("ints").dtype == moekit::io::Dtype::kI32);
  CHECK(f.info("layer.weight").shape == std::vector<std::int64_t>{2, 3});
  CHECK(f.raw("ints").size() == 12);
  // In memory the same bytes as on disk.
  std::ifstream in(p, std::ios::binary);
  const Bytes on_disk((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  CHECK(on_disk == w.serialize());
  // Data starts 8-aligned and every tensor is aligned to its element size.
  const std::uint64_t n = on_disk[0] | std::uint64_t(on_disk[1]) << 8;
  CHECK(n % 8 == 0);
  for (const auto& name : f.names())
    CHECK(f.info(name).begin % moekit::io::dtype_size(f.info(name).dtype) == 0);
}

TEST_CASE("safetensors: the writer reproduces the reference implementation's bytes") {
  // The reference's own unit test (safetensors/src/tensor.rs, test_serialization): one F32 [1, 2, 3].
  const std::vector<float> v{0, 1, 2, 3, 4, 5};
  const Bytes expected{64,  0,   0,   0,   0,   0,   0,   0,   123, 34,  97,  116, 116, 110, 46,  48,  34,  58,  123,
                       34,  100, 116, 121, 112, 101, 34,  58,  34,  70,  51,  50,  34,  44,  34,  115, 104, 97,  112,
                       101, 34,  58,  91,  49,  44,  50,  44,  51,  93,  44,  34,  100, 97,  116, 97,  95,  111, 102,
                       102, 115, 101, 116, 115, 34,  58,  91,  48,  44,  50,  52,  93,  125, 125, 0,   0,   0,   0,
                       0,   0,   128, 63,  0,   0,   0,   64,  0,   0,   64,  64,  0,   0,   128, 64,  0,   0,   160, 64};
  CHECK(SafetensorsWriter().add_f32("attn.0", {1, 2, 3}, v).serialize() == expected);
  // No tensors: "{}" padded to 8 bytes with spaces (the reference's test_empty).
  CHECK(SafetensorsWriter().serialize() == Bytes{8, 0, 0, 0, 0, 0, 0, 0, '{', '}', ' ', ' ', ' ', ' ', ' ', ' '});
}

TEST_CASE("safetensors: layout of a three-dtype file computed by hand") {
  // Data order: descending alignment (F32, I32, BF16), then name; metadata first; keys dtype, shape,
  // data_offsets; compact JSON; 189 header bytes padded with 3 spaces to 192 = 0xC0.
  const std::string json =
      R"({"__metadata__":{"k":"v"},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
      R"("a":{"dtype":"I32","shape":[1],"data_offsets":[8,12]},"c":{"dtype":"BF16","shape":[3],"data_offsets":[12,18]}})";
  REQUIRE(json.size() == 189);
  Bytes expected{0xC0, 0, 0, 0, 0, 0, 0, 0};
  expected.insert(expected.end(), json.begin(), json.end());
  expected.insert(expected.end(), {' ', ' ', ' '});
  expected.insert(expected.end(), {0x00, 0x00, 0x80, 0x3F, 0x00, 0x00, 0x00, 0xC0});  // b: 1.0f, -2.0f
  expected.insert(expected.end(), {0x07, 0x00, 0x00, 0x00});                          // a: 7
  expected.insert(expected.end(), {0x80, 0x3F, 0x00, 0x3F, 0x80, 0xBF});              // c: 1, 0.5, -1 (bf16)

  SafetensorsWriter w;  // added out of order on purpose
  w.add_f32_as_bf16("c", {3}, std::vector<float>{1.0f, 0.5f, -1.0f});
  w.add_i32("a", {1}, std::vector<std::int32_t>{7});
  w.set_metadata("k", "v");
  w.add_f32("b", {2}, std::vector<float>{1.0f, -2.0f});
  CHECK(w.serialize() == expected);

  const SafetensorsFile f = SafetensorsFile::parse(expected, "hand");
  CHECK(f.get_f32("b", {2}) == std::vector<float>{1.0f, -2.0f});
  CHECK(f.get_i32("a", {1}) == std::vector<std::int32_t>{7});
  CHECK(f.get_bf16_as_f32("c", {3}) == std::vector<float>{1.0f, 0.5f, -1.0f});
}

TEST_CASE("safetensors: typed getters name the tensor and the mismatch") {
  SafetensorsWriter w;
  w.add_f32("w", {4, 9}, std::vector<float>(36, 1.0f)).add_f32_as_bf16("h", {2}, std::vector<float>{1, 2});
  const SafetensorsFile f = SafetensorsFile::parse(w.serialize(), "model.safetensors");
  const std::string missing = error_of([&] { f.get_f32("x", {1}); });
  CHECK(contains(missing, "model.safetensors"));
  CHECK(contains(missing, "no tensor named 'x'"));
  CHECK(contains(missing, "h, w"));  // lists what is there
  const std::string dtype = error_of([&] { f.get_f32("h", {2}); });
  CHECK(contains(dtype, "tensor 'h'"));
  CHECK(contains(dtype, "expected F32, found BF16"));
  const std::string shape = error_of([&] { f.get_f32("w", {4, 8}); });
  CHECK(contains(shape, "tensor 'w'"));
  CHECK(contains(shape, "expected [4, 8], found [4, 9]"));
  CHECK_THROWS_AS(f.get_i32("w", {4, 9}), FormatError);
  CHECK_THROWS_AS(f.info("nope"), FormatError);
}

TEST_CASE("safetensors: every malformed header is a FormatError naming the rule") {
  const Bytes f32x2{0, 0, 128, 63, 0, 0, 0, 64};  // 1.0f, 2.0f
  auto one = [](const std::string& body) { return "{\"t\":" + body + "}"; };
  struct Case {
    const char* what;
    Bytes bytes;
    const char* message;
  };
  const std::vector<Case> cases{
      {"empty file", {}, "shorter than the 8-byte header length"},
      {"7 bytes", {1, 0, 0, 0, 0, 0, 0}, "shorter than the 8-byte header length"},
      {"length past the end", file_bytes("{}", {}, 100), "runs past the end of the file"},
      {"length near 2^64", file_bytes("{}", {}, std::int64_t(-1) & 0x7fffffffffffffff), "exceeds the limit"},
      {"length over 100 MB", file_bytes("{}", {}, 100'000'001), "exceeds the limit"},
      {"zero-length header", file_bytes("", {}), "starting with '{'"},
      {"leading space", file_bytes(" {}", {}), "starting with '{'"},
      {"not JSON", file_bytes("{\"t\":", {}), "not valid JSON"},
      {"trailing garbage", file_bytes("{} x", {}), "not valid JSON"},
      {"invalid UTF-8", file_bytes("{\"\xff\":1}", {}), "not valid JSON"},
      {"duplicate tensor", file_bytes(R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"t":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", f32x2), "repeats the key \"t\""},
      {"duplicate field", file_bytes(one(R"({"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]})"), f32x2), "repeats the key \"dtype\""},
      {"entry not an object", file_bytes(one("[1]"), {}), "tensor 't': entry must be an object"},
      {"missing dtype", file_bytes(one(R"({"shape":[2],"data_offsets":[0,8]})"), f32x2), "missing field \"dtype\""},
      {"missing shape", file_bytes(one(R"({"dtype":"F32","data_offsets":[0,8]})"), f32x2), "missing field \"shape\""},
      {"missing offsets", file_bytes(one(R"({"dtype":"F32","shape":[2]})"), f32x2), "missing field \"data_offsets\""},
      {"dtype not a string", file_bytes(one(R"({"dtype":4,"shape":[2],"data_offsets":[0,8]})"), f32x2), "\"dtype\" must be a string"},
      {"unknown dtype", file_bytes(one(R"({"dtype":"F12","shape":[2],"data_offsets":[0,8]})"), f32x2), "unknown dtype \"F12\""},
      {"shape not an array", file_bytes(one(R"({"dtype":"F32","shape":2,"data_offsets":[0,8]})"), f32x2), "\"shape\" must be an array"},
      {"negative dimension", file_bytes(one(R"({"dtype":"F32","shape":[-2],"data_offsets":[0,8]})"), f32x2), "shape[0] must be >= 0"},
      {"fractional dimension", file_bytes(one(R"({"dtype":"F32","shape":[2.0],"data_offsets":[0,8]})"), f32x2), "shape[0] must be a non-negative integer"},
      {"numel overflow", file_bytes(one(R"({"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]})"), f32x2), "more bytes than fit in 64 bits"},
      {"bytes overflow", file_bytes(one(R"({"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,8]})"), f32x2), "more bytes than fit in 64 bits"},
      {"offsets not a pair", file_bytes(one(R"({"dtype":"F32","shape":[2],"data_offsets":[0,8,9]})"), f32x2), "must be an array [begin, end]"},
      {"negative offset", file_bytes(one(R"({"dtype":"F32","shape":[2],"data_offsets":[-1,8]})"), f32x2), "data_offsets[0] must be >= 0"},
      {"reversed offsets", file_bytes(one(R"({"dtype":"F32","shape":[0],"data_offsets":[8,0]})"), f32x2), "end before they begin"},
      {"size mismatch", file_bytes(one(R"({"dtype":"F32","shape":[3],"data_offsets":[0,8]})"), f32x2), "needs 12 (numel x dtype size)"},
      {"past the buffer", file_bytes(one(R"({"dtype":"F32","shape":[2],"data_offsets":[4,12]})"), f32x2), "run past the end of the data buffer"},
      {"overlap", file_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", f32x2), "overlap tensor 'a'"},
      {"gap", file_bytes(one(R"({"dtype":"F32","shape":[1],"data_offsets":[4,8]})"), f32x2), "belong to no tensor"},
      {"trailing bytes", file_bytes(one(R"({"dtype":"F32","shape":[1],"data_offsets":[0,4]})"), f32x2), "trailing bytes"},
      {"metadata not an object", file_bytes(R"({"__metadata__":[1]})"), "\"__metadata__\" must be an object"},
      {"metadata value not a string", file_bytes(R"({"__metadata__":{"a":1}})"), "value of \"a\" must be a string"},
      {"header is an array", file_bytes("[]"), "starting with '{'"},
  };
  TempDir dir;
  for (const auto& c : cases) {
    CAPTURE(c.what);
    const std::string msg = parse_error(c.bytes);
    CHECK(contains(msg, "bad.safetensors"));
    CHECK_MESSAGE(contains(msg, c.message), msg);
    // open() reads only the header, and refuses the same files for the same reasons.
    const fs::path p = dir.path / "bad.safetensors";
    std::ofstream(p, std::ios::binary | std::ios::trunc).write(reinterpret_cast<const char*>(c.bytes.data()), std::streamsize(c.bytes.size()));
    const std::string opened = error_of([&] { SafetensorsFile::open(p); });
    CHECK_MESSAGE(contains(opened, c.message), opened);
  }
  // The well-formed neighbour of these cases parses, and a zero-size tensor may sit anywhere.
  CHECK(parse_error(file_bytes(one(R"({"dtype":"F32","shape":[2],"data_offsets":[0,8]})"), f32x2)).empty());
  CHECK(parse_error(file_bytes(R"({"z":{"dtype":"I8","shape":[0],"data_offsets":[8,8]},"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", f32x2)).empty());
}

TEST_CASE("safetensors: truncations and byte flips never crash") {
  SafetensorsWriter w;
  w.add_f32("a", {2, 2}, std::vector<float>{1, 2, 3, 4}).add_i32("b", {3}, std::vector<std::int32_t>{5, 6, 7});
  w.set_metadata("m", "x");
  const Bytes good = w.serialize();
  REQUIRE(parse_error(good).empty());
  for (std::size_t n = 0; n < good.size(); ++n) {
    CAPTURE(n);
    CHECK_FALSE(parse_error(Bytes(good.begin(), good.begin() + std::ptrdiff_t(n))).empty());
  }
  // Flipping bytes either leaves a valid file (e.g. inside the data) or gives a FormatError; any other
  // exception or a crash fails the test.
  for (std::size_t i = 0; i < good.size(); ++i)
    for (std::uint8_t mask : {0x01, 0x20, 0x80, 0xff}) {
      Bytes b = good;
      b[i] ^= mask;
      CAPTURE(i);
      CHECK_NOTHROW(parse_error(b));
    }
}

TEST_CASE("safetensors: read_safetensors names the missing or unreadable path") {
  TempDir dir;
  const std::string missing = error_of([&] { read_safetensors(dir.path / "nope.safetensors"); });
  CHECK(contains(missing, "nope.safetensors: no such file"));
  CHECK_THROWS_AS(read_safetensors(dir.path), FormatError);
  const fs::path p = dir.path / "short.safetensors";
  std::ofstream(p, std::ios::binary) << "abc";
  const std::string shorter = error_of([&] { read_safetensors(p); });
  CHECK(contains(shorter, "short.safetensors"));
  CHECK(contains(shorter, "shorter than the 8-byte header length"));
}

TEST_CASE("safetensors: the writer rejects inconsistent tensors") {
  SafetensorsWriter w;
  CHECK_THROWS_AS(w.add_f32("a", {2, 3}, std::vector<float>(5)), moekit::ShapeError);
  CHECK_THROWS_AS(w.add_f32("a", {-1}, std::vector<float>{}), moekit::ShapeError);
  CHECK_THROWS_AS(w.add_f32("a", {1ll << 40, 1ll << 40}, std::vector<float>{}), moekit::ShapeError);
  CHECK_THROWS_AS(w.add_f32("__metadata__", {1}, std::vector<float>{1}), std::invalid_argument);
  w.add_f32("a", {1}, std::vector<float>{1});
  CHECK_THROWS_AS(w.add_i32("a", {1}, std::vector<std::int32_t>{1}), std::invalid_argument);
  w.add_f32("\xff", {1}, std::vector<float>{1});  // not UTF-8: refused when the header is made
  CHECK_THROWS_AS(w.serialize(), std::invalid_argument);
}

TEST_CASE("safetensors: writes are atomic and leave no temporary files") {
  TempDir dir;
  const fs::path p = dir.path / "ckpt.safetensors";
  SafetensorsWriter().add_f32("v", {1}, std::vector<float>{1}).write(p);
  SafetensorsWriter().add_f32("v", {2}, std::vector<float>{2, 3}).write(p);  // replaces
  CHECK(read_safetensors(p).get_f32("v", {2}) == std::vector<float>{2, 3});
  CHECK(dir.entries() == std::vector<std::string>{"ckpt.safetensors"});
  // A folder that does not exist: an error, and nothing is created.
  CHECK_THROWS_AS(SafetensorsWriter().write(dir.path / "no" / "x.safetensors"), std::system_error);
  CHECK(dir.entries() == std::vector<std::string>{"ckpt.safetensors"});
  // Writing onto a directory fails at the rename, keeps the directory and removes the temporary file.
  fs::create_directory(dir.path / "d.safetensors");
  fs::create_directory(dir.path / "d.safetensors" / "inner");
  CHECK_THROWS_AS(SafetensorsWriter().write(dir.path / "d.safetensors"), std::system_error);
  CHECK(fs::is_directory(dir.path / "d.safetensors"));
  CHECK(dir.entries().size() == 2);
}

TEST_CASE("safetensors: open() keeps the data on disk and reads one tensor at a time") {
  TempDir dir;
  const fs::path p = dir.path / "t.safetensors";
  SafetensorsWriter w;
  w.add_f32("a", {2, 2}, std::vector<float>{1, 2, 3, 4}).add_i32("b", {3}, std::vector<std::int32_t>{5, 6, 7});
  w.set_metadata("m", "x");
  w.write(p);
  const SafetensorsFile whole = read_safetensors(p);
  const SafetensorsFile f = SafetensorsFile::open(p);
  CHECK(f.names() == whole.names());
  CHECK(f.metadata().at("m") == "x");
  const auto raw = whole.raw("b");
  CHECK(f.read("b") == Bytes(raw.begin(), raw.end()));
  CHECK(whole.read("b") == f.read("b"));
  CHECK(f.get_f32("a", {2, 2}) == std::vector<float>{1, 2, 3, 4});
  CHECK(contains(error_of([&] { (void)f.raw("a"); }), "opened header-only"));
  // The file shrinks under it: reading is an error naming the tensor, never bytes past the end.
  fs::resize_file(p, fs::file_size(p) - 4);
  const std::string changed = error_of([&] { (void)f.read("a"); });
  CHECK(contains(changed, "tensor 'a'"));
  CHECK(contains(changed, "changed size"));
  CHECK(contains(error_of([&] { SafetensorsFile::open(dir.path / "nope.safetensors"); }), "nope.safetensors: no such file"));
}
