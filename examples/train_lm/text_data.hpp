#pragma once
// train_lm's data: bytes of text (vocabulary 256, no tokenizer), split into training and held-out
// parts, sampled as sequences of --seq bytes that predict the byte after each one.
//
//   --data FILE   any file (meant for UTF-8 text); the last --heldout-fraction of it is held out, cut at
//                 a line break when one is near, so the two parts share no line
//   (no --data)   the embedded generated corpus (corpus.hpp): training and held-out text from two seeds,
//                 each byte labelled with its language
//
// A training sequence starts at a uniformly drawn offset of the training part. Evaluation reads the
// held-out part in consecutive windows: window w predicts bytes [w*seq + 1, (w+1)*seq] from the bytes
// before them inside the window.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <moekit/core/error.hpp>

#include "corpus.hpp"

struct TextSplit {
  std::string bytes;
  std::vector<std::uint8_t> domain;  // per byte (a file: all 0)
};

struct TextData {
  std::string source;                    // "embedded corpus" or the file's path
  std::vector<std::string> domain_names;  // {"text"} for a file
  TextSplit train, heldout;
};

// Shannon entropy, in bits per byte, of the bytes' own frequencies: what the best model that ignores
// context (a unigram model fitted to this very text) would score.
inline double unigram_bits(const std::string& s) {
  std::vector<double> count(256, 0.0);
  for (unsigned char c : s) count[c] += 1.0;
  double h = 0;
  for (double c : count)
    if (c > 0) h -= c / double(s.size()) * std::log2(c / double(s.size()));
  return h;
}

inline TextData embedded_text(std::int64_t train_bytes, std::int64_t heldout_bytes, std::uint64_t seed) {
  TextData d;
  d.source = "embedded corpus";
  for (int i = 0; i < corpus::kNumDomains; ++i) d.domain_names.push_back(corpus::domain_name(i));
  auto take = [](corpus::Text t) { return TextSplit{std::move(t.bytes), std::move(t.domain)}; };
  d.train = take(corpus::generate(std::size_t(train_bytes), seed * 2 + 1));
  d.heldout = take(corpus::generate(std::size_t(heldout_bytes), seed * 2 + 2));
  return d;
}

// Both parts must hold at least one window of seq + 1 bytes.
inline TextData file_text(const std::string& path, double heldout_fraction, std::int64_t seq) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw moekit::ConfigError("--data", path, "must be a readable file");
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw moekit::ConfigError("--data", path, "could not be read to the end");
  const std::int64_t n = std::int64_t(all.size()), need = 2 * (seq + 1);
  if (!(heldout_fraction > 0.0 && heldout_fraction < 1.0))
    throw moekit::ConfigError("--heldout-fraction", std::to_string(heldout_fraction), "must be in (0, 1)");
  std::int64_t cut = std::int64_t(double(n) * (1.0 - heldout_fraction));
  // Move the cut to the next line break within 256 bytes, if there is one.
  const auto nl = all.find('\n', std::size_t(std::max<std::int64_t>(cut, 0)));
  if (nl != std::string::npos && std::int64_t(nl) - cut < 256) cut = std::int64_t(nl) + 1;
  if (cut < seq + 1 || n - cut < seq + 1)
    throw moekit::ConfigError("--data", path + " (" + std::to_string(n) + " bytes)",
                              "must hold at least seq + 1 = " + std::to_string(seq + 1) + " bytes in each of the training and held-out parts (" +
                                  std::to_string(need) + " bytes or more with --heldout-fraction " + std::to_string(heldout_fraction) + ")");
  TextData d;
  d.source = path;
  d.domain_names = {"text"};
  d.train.bytes = all.substr(0, std::size_t(cut));
  d.heldout.bytes = all.substr(std::size_t(cut));
  d.train.domain.assign(d.train.bytes.size(), 0);
  d.heldout.domain.assign(d.heldout.bytes.size(), 0);
  return d;
}

// Sequences: inputs[r*seq + s] = text[start_r + s], targets[r*seq + s] = text[start_r + s + 1].
inline void make_sequences(const std::string& text, const std::int64_t* starts, std::int64_t rows, std::int64_t seq,
                           std::int32_t* inputs, std::int32_t* targets) {
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t s = 0; s < seq; ++s) {
      inputs[r * seq + s] = std::int32_t(static_cast<unsigned char>(text[std::size_t(starts[r] + s)]));
      targets[r * seq + s] = std::int32_t(static_cast<unsigned char>(text[std::size_t(starts[r] + s + 1)]));
    }
}

// How many evaluation windows of seq bytes the first `limit` bytes of a part hold (each needs seq + 1).
inline std::int64_t eval_windows(const TextSplit& part, std::int64_t limit, std::int64_t seq) {
  const std::int64_t n = std::min<std::int64_t>(limit, std::int64_t(part.bytes.size()));
  return n > seq ? (n - 1) / seq : 0;
}

// Text as a terminal can show it: valid UTF-8 passes, newlines and tabs too; other control bytes and
// bytes that do not form UTF-8 become U+FFFD (a byte-level model may emit half a character).
inline std::string printable_utf8(const std::string& s) {
  std::string out;
  const std::string bad = "\xEF\xBF\xBD";
  for (std::size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      out += (c >= 0x20 && c != 0x7F) || c == '\n' || c == '\t' ? char(c) : '?';
      ++i;
      continue;
    }
    const int len = c >= 0xF0 && c < 0xF5 ? 4 : c >= 0xE0 && c < 0xF0 ? 3 : c >= 0xC2 && c < 0xE0 ? 2 : 0;
    bool ok = len > 0 && i + std::size_t(len) <= s.size();
    for (int k = 1; ok && k < len; ++k) ok = (static_cast<unsigned char>(s[i + k]) & 0xC0) == 0x80;
    if (ok) {
      out.append(s, i, std::size_t(len));
      i += std::size_t(len);
    } else {
      out += bad;
      ++i;
    }
  }
  return out;
}
