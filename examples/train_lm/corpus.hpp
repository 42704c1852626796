#pragma once
// train_lm's embedded corpus: text in four generated "languages", so that a byte-level model has
// something to learn in a few minutes and its experts have domains to specialise in. Each document is
// drawn from one language and ends with a blank line; every byte is labelled with its document's
// language (the domain x expert routing table of the closing report).
//
//   prose   English-like sentences from a small grammar: "The quiet river follows a small bridge."
//   sums    arithmetic that is right: "17 + 25 = 42", "6 * 7 = 42", one per line
//   code    C-like statements over a few identifiers: "int x2 = y1 * 4 + 3;", "if (x2 > 9) { ... }"
//   records JSON objects of people: {"name": "mira", "age": 31, "tags": ["red", "tea"]}
//
// The word lists are fixed; which words, numbers and documents appear comes from the seed. Train and
// held-out text use different seeds.
#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <moekit/core/parameter.hpp>  // SplitMix64

namespace corpus {

constexpr int kNumDomains = 4;
inline const char* domain_name(int d) {
  constexpr const char* names[kNumDomains] = {"prose", "sums", "code", "records"};
  return names[d];
}

// Bytes and, for each byte, the language of its document.
struct Text {
  std::string bytes;
  std::vector<std::uint8_t> domain;
};

namespace detail {

struct Gen {
  moekit::SplitMix64 rng;
  std::string out;

  std::uint64_t below(std::uint64_t n) { return rng.next() % n; }
  template <std::size_t N>
  std::string_view pick(const std::array<std::string_view, N>& words) { return words[below(N)]; }
  void put(std::string_view s) { out.append(s); }
  void num(std::uint64_t v) { out.append(std::to_string(v)); }
};

constexpr std::array<std::string_view, 12> kAdjectives = {"quiet", "old", "red", "small", "bright", "cold",
                                                           "green", "tired", "happy", "dark", "slow", "loud"};
constexpr std::array<std::string_view, 16> kNouns = {"river", "bridge", "child", "teacher", "dog",  "garden", "city",  "window",
                                                      "baker", "song",   "road",  "mountain", "boat", "letter", "friend", "market"};
constexpr std::array<std::string_view, 12> kVerbs = {"follows", "sees",  "finds", "carries", "paints", "builds",
                                                      "hears",   "opens", "likes", "crosses", "waits for", "remembers"};
constexpr std::array<std::string_view, 6> kPlaces = {"near the sea", "in the morning", "after the rain", "at night",
                                                      "by the wall", "every day"};
constexpr std::array<std::string_view, 6> kIds = {"x", "y", "n", "total", "count", "i"};
constexpr std::array<std::string_view, 12> kNames = {"mira", "tomas", "ana", "li", "omar", "sara",
                                                      "ivan", "noor", "ben",   "yuki", "lea", "kofi"};
constexpr std::array<std::string_view, 10> kTags = {"red", "tea", "music", "chess", "rain", "bikes", "books", "sea", "code", "jazz"};

inline void sentence(Gen& g) {
  auto noun_phrase = [&](bool capital) {
    std::string det(g.below(2) ? "the" : "a");
    if (capital) det[0] = char(det[0] - 'a' + 'A');
    g.put(det), g.put(" ");
    if (g.below(2)) g.put(g.pick(kAdjectives)), g.put(" ");
    g.put(g.pick(kNouns));
  };
  noun_phrase(true);
  g.put(" "), g.put(g.pick(kVerbs)), g.put(" ");
  noun_phrase(false);
  if (g.below(3) == 0) g.put(" "), g.put(g.pick(kPlaces));
  g.put(g.below(6) == 0 ? "!" : ".");
}

inline void prose(Gen& g, std::size_t len) {
  while (g.out.size() < len) {
    sentence(g);
    g.put(g.below(4) == 0 ? "\n" : " ");
  }
  g.put("\n");
}

inline void sums(Gen& g, std::size_t len) {
  while (g.out.size() < len) {
    const std::uint64_t a = g.below(50), b = g.below(50);
    switch (g.below(3)) {
      case 0: g.num(a), g.put(" + "), g.num(b), g.put(" = "), g.num(a + b); break;
      case 1: g.num(a + b), g.put(" - "), g.num(b), g.put(" = "), g.num(a); break;
      default: g.num(a % 10), g.put(" * "), g.num(b % 10), g.put(" = "), g.num((a % 10) * (b % 10)); break;
    }
    g.put("\n");
  }
}

inline void code(Gen& g, std::size_t len) {
  auto id = [&] {
    g.put(g.pick(kIds));
    g.num(g.below(3));
  };
  while (g.out.size() < len) {
    switch (g.below(3)) {
      case 0: g.put("int "), id(), g.put(" = "), id(), g.put(" * "), g.num(g.below(9) + 1), g.put(" + "), g.num(g.below(10)), g.put(";\n"); break;
      case 1: g.put("if ("), id(), g.put(" > "), g.num(g.below(20)), g.put(") {\n  return "), id(), g.put(";\n}\n"); break;
      default: g.put("for (int i = 0; i < "), g.num(g.below(16) + 1), g.put("; ++i) "), id(), g.put(" += i;\n"); break;
    }
  }
}

inline void records(Gen& g, std::size_t len) {
  while (g.out.size() < len) {
    g.put("{\"name\": \""), g.put(g.pick(kNames)), g.put("\", \"age\": "), g.num(18 + g.below(60)), g.put(", \"tags\": [");
    const std::uint64_t n = 1 + g.below(3);
    for (std::uint64_t t = 0; t < n; ++t) g.put(t ? ", \"" : "\""), g.put(g.pick(kTags)), g.put("\"");
    g.put("]}\n");
  }
}

}  // namespace detail

// About `bytes` bytes of documents (each 150..600 bytes, whole), from `seed`.
inline Text generate(std::size_t bytes, std::uint64_t seed) {
  Text t;
  t.bytes.reserve(bytes + 1024);
  detail::Gen g{moekit::SplitMix64(seed ^ 0x434f52505553ull), {}};  // "CORPUS"
  while (t.bytes.size() < bytes) {
    const int d = int(g.below(kNumDomains));
    const std::size_t len = 150 + g.below(451);
    g.out.clear();
    switch (d) {
      case 0: detail::prose(g, len); break;
      case 1: detail::sums(g, len); break;
      case 2: detail::code(g, len); break;
      default: detail::records(g, len); break;
    }
    g.out.push_back('\n');  // a blank line ends the document
    t.bytes += g.out;
    t.domain.insert(t.domain.end(), g.out.size(), std::uint8_t(d));
  }
  return t;
}

}  // namespace corpus
