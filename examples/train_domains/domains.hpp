#pragma once
// A generated multi-domain token stream: four synthetic "languages" over one shared vocabulary of 64
// tokens, each document drawn from one of them and ended by a separator token. The token ranges of
// the domains overlap a little, so a window of context says (mostly) which language it is in — the
// cue a router can learn to send each domain to its own experts.
//
//   token 0         separator between documents
//   markov   1..20  order-2 Markov chain: each pair (a, b) has three successors, p = .6 / .3 / .1
//   arith   13..28  x_{n+1} = x_n + s (mod 16), start and step s in 1..15 drawn per document
//   copy    25..57  a pattern of 4 tokens, repeated until the document ends
//   bracket 58..63  ( [ { ) ] }: balanced brackets of 3 kinds, depth at most 4
//
// The rules (the Markov table) come from the rule seed; which documents are drawn comes from the
// stream seed. Train and held-out streams share the rules and differ in the stream seed.
//
// Every token also gets its "oracle" negative log-likelihood: -log p under the generator, given the
// whole history. Its mean is the floor no model can beat on average.
#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

#include <moekit/core/parameter.hpp>  // SplitMix64

namespace domains {

constexpr std::int32_t kVocab = 64;
constexpr std::int32_t kSeparator = 0;
constexpr int kNumDomains = 4;
enum Domain : std::uint8_t { kMarkov = 0, kArith = 1, kCopy = 2, kBracket = 3 };
inline const char* domain_name(int d) {
  constexpr const char* names[kNumDomains] = {"markov", "arith", "copy", "bracket"};
  return names[d];
}

constexpr std::int32_t kMarkovLo = 1, kMarkovN = 20;
constexpr std::int32_t kArithLo = 13, kArithMod = 16;
constexpr std::int32_t kCopyLo = 25, kCopyN = 33, kCopyPeriod = 4;
constexpr std::int32_t kBracketLo = 58, kBracketKinds = 3, kBracketMaxDepth = 4;  // opens 58..60, closes 61..63
constexpr int kDocMin = 24, kDocMax = 64;  // content tokens per document, uniform

// The languages' fixed rules.
struct Rules {
  static constexpr double kMarkovProb[3] = {0.6, 0.3, 0.1};
  std::vector<std::array<std::int32_t, 3>> markov_next;  // [kMarkovN * kMarkovN]: successors of (a, b)

  explicit Rules(std::uint64_t seed) {
    moekit::SplitMix64 rng(seed ^ 0x52554c4553ull);  // "RULES"
    markov_next.resize(kMarkovN * kMarkovN);
    for (auto& s : markov_next) {
      // Three distinct successors.
      for (int j = 0; j < 3; ++j) {
        bool fresh = false;
        while (!fresh) {
          s[j] = kMarkovLo + std::int32_t(rng.next() % kMarkovN);
          fresh = true;
          for (int q = 0; q < j; ++q) fresh = fresh && s[q] != s[j];
        }
      }
    }
  }
};

// A stream of tokens with, for each token, the domain of its document and its oracle NLL.
struct Stream {
  std::vector<std::int32_t> tokens;
  std::vector<std::uint8_t> domain;  // the separator ending a document belongs to that document
  std::vector<float> oracle_nll;
};

namespace detail {

inline std::int32_t below(moekit::SplitMix64& rng, std::int32_t n) { return std::int32_t(rng.next() % std::uint64_t(n)); }

// Writes one document of `len` content tokens (no separator). `logp` receives log p of each token
// under the generator, given the document so far.
inline void write_document(const Rules& rules, Domain dom, int len, moekit::SplitMix64& rng,
                           std::vector<std::int32_t>& out, std::vector<double>& logp) {
  switch (dom) {
    case kMarkov: {
      std::int32_t a = kMarkovLo + below(rng, kMarkovN), b = kMarkovLo + below(rng, kMarkovN);
      for (int i = 0; i < len; ++i) {
        std::int32_t x;
        double p;
        if (i < 2) {
          x = i == 0 ? a : b;
          p = 1.0 / kMarkovN;
        } else {
          const auto& nx = rules.markov_next[(a - kMarkovLo) * kMarkovN + (b - kMarkovLo)];
          const double u = rng.uniform();
          const int j = u < Rules::kMarkovProb[0] ? 0 : u < Rules::kMarkovProb[0] + Rules::kMarkovProb[1] ? 1 : 2;
          x = nx[j];
          p = Rules::kMarkovProb[j];
          a = b;
          b = x;
        }
        out.push_back(x);
        logp.push_back(std::log(p));
      }
      break;
    }
    case kArith: {
      const std::int32_t start = below(rng, kArithMod), step = 1 + below(rng, kArithMod - 1);
      for (int i = 0; i < len; ++i) {
        out.push_back(kArithLo + (start + i * step) % kArithMod);
        logp.push_back(i == 0 ? -std::log(double(kArithMod)) : i == 1 ? -std::log(double(kArithMod - 1)) : 0.0);
      }
      break;
    }
    case kCopy: {
      std::int32_t pattern[kCopyPeriod];
      for (auto& x : pattern) x = kCopyLo + below(rng, kCopyN);
      for (int i = 0; i < len; ++i) {
        out.push_back(pattern[i % kCopyPeriod]);
        logp.push_back(i < kCopyPeriod ? -std::log(double(kCopyN)) : 0.0);
      }
      break;
    }
    case kBracket: {
      std::int32_t stack[kBracketMaxDepth];
      int depth = 0;
      for (int i = 0; i < len; ++i) {
        // At depth 0 open; at the maximum depth close; otherwise open or close with equal odds.
        const bool open = depth == 0 || (depth < kBracketMaxDepth && rng.uniform() < 0.5);
        const double p_move = (depth == 0 || depth == kBracketMaxDepth) ? 1.0 : 0.5;
        if (open) {
          const std::int32_t kind = below(rng, kBracketKinds);
          stack[depth++] = kind;
          out.push_back(kBracketLo + kind);
          logp.push_back(std::log(p_move / kBracketKinds));
        } else {
          out.push_back(kBracketLo + kBracketKinds + stack[--depth]);
          logp.push_back(std::log(p_move));
        }
      }
      break;
    }
  }
}

}  // namespace detail

// At least n_tokens tokens of whole documents, each followed by a separator; deterministic in
// (rules, seed).
inline Stream generate(const Rules& rules, std::int64_t n_tokens, std::uint64_t seed) {
  moekit::SplitMix64 rng(seed ^ 0x53545245414dull);  // "STREAM"
  Stream s;
  std::vector<std::int32_t> doc;
  std::vector<double> logp;
  while (std::int64_t(s.tokens.size()) < n_tokens) {
    const Domain dom = Domain(detail::below(rng, kNumDomains));
    const int len = kDocMin + detail::below(rng, kDocMax - kDocMin + 1);
    doc.clear();
    logp.clear();
    detail::write_document(rules, dom, len, rng, doc, logp);
    for (int i = 0; i <= len; ++i) {
      // Under the generator the document's length is unknown until it ends: at position i >= kDocMin
      // the separator comes with probability 1 / (kDocMax - i + 1).
      const double p_end = i < kDocMin ? 0.0 : 1.0 / double(kDocMax - i + 1);
      double lp = i < len ? std::log1p(-p_end) + logp[i] : std::log(p_end);
      if (i == 0) lp += std::log(1.0 / kNumDomains);  // which language this document is in
      s.tokens.push_back(i < len ? doc[i] : kSeparator);
      s.domain.push_back(dom);
      s.oracle_nll.push_back(float(-lp));
    }
  }
  return s;
}

// Entropy (nats) of the stream's own token frequencies: the loss of the best context-free model.
inline double unigram_entropy(const std::vector<std::int32_t>& tokens) {
  std::vector<double> count(kVocab, 0.0);
  for (auto t : tokens) count[t] += 1.0;
  double h = 0.0;
  for (double c : count)
    if (c > 0) h -= (c / double(tokens.size())) * std::log(c / double(tokens.size()));
  return h;
}

}  // namespace domains
