#pragma once
// train_lm's reporting: the held-out evaluation (bits per byte, per domain, and which experts each
// domain's bytes were routed to), the sample generated at the end, and the progress line.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <string>
#include <vector>

#include <moekit/core/parameter.hpp>  // SplitMix64

#include "../common/console.hpp"
#include "../common/ranks.hpp"
#include "lm.hpp"
#include "text_data.hpp"

inline constexpr double kLn2 = 0.69314718055994530942;

// ---------------------------------------------------------------------------------------------------
// Evaluation of the first `limit` bytes of a held-out part, in consecutive windows of seq bytes,
// without gradients. Distributed runs: every rank evaluates the same windows (the MoE layers' forwards
// are collectives), so every rank gets the same numbers.

struct Evaluation {
  double loss = 0;        // nats per byte
  std::int64_t bytes = 0;  // predicted bytes
  std::vector<double> domain_loss;
  std::vector<std::int64_t> domain_bytes;
  // routed[l][d][e]: slots of layer l sent to expert e by bytes of domain d.
  std::vector<std::vector<std::vector<std::int64_t>>> routed;
  double bits() const { return loss / kLn2; }
};

inline Evaluation evaluate(Lm& model, const TextSplit& part, std::size_t domains, std::int64_t limit) {
  const std::int64_t seq = model.config().seq, windows = eval_windows(part, limit, seq), chunk = 8;
  const std::int64_t L = model.config().blocks, E = model.total_experts();
  Evaluation ev;
  ev.domain_loss.assign(domains, 0.0);
  ev.domain_bytes.assign(domains, 0);
  ev.routed.assign(L, std::vector<std::vector<std::int64_t>>(domains, std::vector<std::int64_t>(E, 0)));
  model.set_training(false);  // evaluation forwards leave GlobalBatch buffers alone
  std::vector<std::int64_t> starts(chunk);
  std::vector<std::int32_t> inputs(chunk * seq), targets(chunk * seq);
  std::vector<float> token_loss(chunk * seq);
  double sum = 0;
  for (std::int64_t w0 = 0; w0 < windows; w0 += chunk) {
    const std::int64_t rows = std::min(chunk, windows - w0);
    for (std::int64_t r = 0; r < rows; ++r) starts[r] = (w0 + r) * seq;
    make_sequences(part.bytes, starts.data(), rows, seq, inputs.data(), targets.data());
    model.forward(inputs.data(), rows, seq);
    model.loss(targets.data(), 0.0, token_loss.data());
    std::vector<typename std::remove_reference_t<decltype(model.moe(0))>::Routed> routed;  // token or expert choice
    for (std::int64_t l = 0; l < L; ++l) routed.push_back(model.moe(l).routed());
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t s = 0; s < seq; ++s) {
        const std::int64_t i = r * seq + s, at = starts[r] + s;
        sum += token_loss[i];
        ev.domain_loss[part.domain[at + 1]] += token_loss[i];  // the predicted byte's domain
        ev.domain_bytes[part.domain[at + 1]] += 1;
        for (std::int64_t l = 0; l < L; ++l) {  // the routed byte's domain
          const auto& r = routed[std::size_t(l)];
          for (std::int32_t s = r.first[std::size_t(i)]; s < r.first[std::size_t(i + 1)]; ++s) ev.routed[l][part.domain[at]][r.experts[std::size_t(s)]] += 1;
        }
      }
    ev.bytes += rows * seq;
  }
  model.set_training(true);
  ev.loss = ev.bytes > 0 ? sum / double(ev.bytes) : 0.0;
  for (std::size_t d = 0; d < domains; ++d)
    if (ev.domain_bytes[d] > 0) ev.domain_loss[d] /= double(ev.domain_bytes[d]);
  return ev;
}

// ---------------------------------------------------------------------------------------------------
// The closing sample: `n` bytes continuing `prompt`, each drawn from the model's distribution over the
// last seq bytes at `temperature` (0: the likeliest byte) among the `top_k` likeliest (0: all).
// Distributed runs: every rank runs the same forwards; rank 0 draws and broadcasts each byte.

inline std::string generate(Lm& model, const std::string& prompt, std::int64_t n, double temperature,
                            std::int64_t top_k, std::uint64_t seed, Ranks* ranks) {
  const std::int64_t seq = model.config().seq, V = LmConfig::kVocab;
  std::string text = prompt.empty() ? std::string("\n") : prompt;
  moekit::SplitMix64 rng(seed ^ 0x53414d504c45ull);  // "SAMPLE"
  std::vector<std::int32_t> ids;
  std::vector<double> p(V);
  std::vector<int> order(V);
  model.set_training(false);
  for (std::int64_t t = 0; t < n; ++t) {
    const std::int64_t len = std::min<std::int64_t>(seq, std::int64_t(text.size()));
    ids.resize(std::size_t(len));
    for (std::int64_t i = 0; i < len; ++i) ids[i] = static_cast<unsigned char>(text[text.size() - std::size_t(len) + std::size_t(i)]);
    model.forward(ids.data(), 1, len);
    const float* z = model.logits_row(len - 1);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return z[a] > z[b]; });
    std::int32_t next = order[0];
    if (temperature > 0) {
      const std::int64_t keep = top_k > 0 ? std::min(top_k, V) : V;
      double total = 0;
      for (std::int64_t j = 0; j < keep; ++j) total += p[j] = std::exp((double(z[order[j]]) - double(z[order[0]])) / temperature);
      double u = rng.uniform() * total;
      for (std::int64_t j = 0; j < keep; ++j)
        if ((u -= p[j]) <= 0 || j == keep - 1) {
          next = order[j];
          break;
        }
    }
    if (ranks) ranks->world().broadcast(&next, 1, 0);
    text.push_back(char(static_cast<unsigned char>(next)));
  }
  model.set_training(true);
  return text;
}

// ---------------------------------------------------------------------------------------------------
// The progress line: on a terminal it is redrawn in place (the last one stays); piped, one line per
// interval. Other output (evaluations, checkpoints) first ends a line being redrawn.

class Progress {
 public:
  Progress() : tty_(g_print && isatty(fileno(stdout)) == 1) {}
  void line(const std::string& s) {
    if (tty_) {
      out("\r\033[K%s", s.c_str());
      open_ = true;
    } else {
      out("%s\n", s.c_str());
    }
    std::fflush(stdout);  // a pipe (tee, a log file) sees each line as it happens
  }
  // Ends a redrawn line so the next output starts on its own.
  void settle() {
    if (open_) out("\n");
    open_ = false;
  }

 private:
  bool tty_, open_ = false;
};

inline std::string duration_text(double s) {
  char b[32];
  if (!(s >= 0) || !std::isfinite(s)) return "?";
  const long long t = (long long)(s + 0.5);
  if (t >= 3600) std::snprintf(b, sizeof b, "%lldh%02lldm", t / 3600, t / 60 % 60);
  else if (t >= 60) std::snprintf(b, sizeof b, "%lldm%02llds", t / 60, t % 60);
  else std::snprintf(b, sizeof b, "%llds", t);
  return b;
}

// Per layer, how even the load is: the busiest expert's share of slots times the number of experts
// (1.0: perfectly even; E: everything on one expert).
inline std::string load_summary(const std::vector<std::vector<double>>& load) {
  std::string s;
  char b[32];
  for (std::size_t l = 0; l < load.size(); ++l) {
    const double mx = load[l].empty() ? 0.0 : *std::max_element(load[l].begin(), load[l].end());
    std::snprintf(b, sizeof b, "%sL%zu %.2f", l ? " " : "", l, mx * double(load[l].size()));
    s += b;
  }
  return s;
}
