#pragma once
// train_domains' reporting: the batches of windows, the held-out evaluation (loss per domain, the
// routing table per layer), specialisation and load-balance measures, and the closing report.
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "domains.hpp"
#include "model.hpp"
#include "options.hpp"
#include "../common/console.hpp"
#include "../common/ranks.hpp"

// ---------------------------------------------------------------------------------------------------
// Batches: token i of a stream is predicted from the W tokens before it (separators before the start).
// Window slot j holds token i-1-j, offset by j * vocab to pick that slot's embedding table.

inline void make_windows(const domains::Stream& s, const std::int64_t* positions, std::int64_t rows, std::int64_t context,
                         std::int32_t* ids, std::int32_t* targets) {
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int64_t i = positions[r];
    for (std::int64_t j = 0; j < context; ++j) {
      const std::int64_t at = i - 1 - j;
      ids[r * context + j] = std::int32_t(j * domains::kVocab) + (at >= 0 ? s.tokens[at] : domains::kSeparator);
    }
    targets[r] = s.tokens[i];
  }
}

// ---------------------------------------------------------------------------------------------------
// Evaluation over the first `limit` tokens of a stream, in chunks, without gradients.

struct Evaluation {
  double loss = 0, oracle = 0;
  std::array<double, domains::kNumDomains> domain_loss{}, domain_oracle{};
  std::array<std::int64_t, domains::kNumDomains> domain_tokens{};
  // routed[l][d][e]: slots of layer l sent to expert e by windows whose latest token is in domain d.
  std::vector<std::vector<std::vector<std::int64_t>>> routed;
  double expert_gemm_flops = 0;  // forward expert GEMM FLOPs, summed over layers and tokens
};

// Distributed runs: every rank evaluates the same tokens (the layers' forwards are collectives, so all
// ranks make them in the same order); only the expert GEMM FLOPs, spread over the ranks, are summed.
inline Evaluation evaluate(Model<float>& model, const domains::Stream& s, std::int64_t limit, Ranks* ranks = nullptr) {
  const ModelConfig& c = model.config();
  const std::int64_t n = std::min<std::int64_t>(limit, std::int64_t(s.tokens.size())), chunk = 2048;
  Evaluation ev;
  model.set_training(false);  // evaluation forwards leave GlobalBatch buffers alone
  ev.routed.assign(c.blocks,
                   std::vector<std::vector<std::int64_t>>(domains::kNumDomains, std::vector<std::int64_t>(c.total_experts(), 0)));
  std::vector<std::int64_t> pos(chunk);
  std::vector<std::int32_t> ids(chunk * c.context), targets(chunk);
  std::vector<float> token_loss(chunk);
  for (std::int64_t start = 0; start < n; start += chunk) {
    const std::int64_t rows = std::min(chunk, n - start);
    for (std::int64_t r = 0; r < rows; ++r) pos[r] = start + r;
    make_windows(s, pos.data(), rows, c.context, ids.data(), targets.data());
    model.forward(ids.data(), targets.data(), rows, 0.0, token_loss.data());
    for (std::int64_t l = 0; l < c.blocks; ++l) ev.expert_gemm_flops += double(model.moe(l).expert_gemm_flops());
    std::vector<typename std::remove_reference_t<decltype(model.moe(0))>::Routed> routed;  // token or expert choice
    for (std::int64_t l = 0; l < c.blocks; ++l) routed.push_back(model.moe(l).routed());
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::int64_t i = start + r;
      const int d = s.domain[i];
      ev.loss += token_loss[r];
      ev.oracle += s.oracle_nll[i];
      ev.domain_loss[d] += token_loss[r];
      ev.domain_oracle[d] += s.oracle_nll[i];
      ev.domain_tokens[d] += 1;
      const int context_domain = s.domain[i > 0 ? i - 1 : 0];
      for (std::int64_t l = 0; l < c.blocks; ++l) {
        const auto& ro = routed[std::size_t(l)];
        for (std::int32_t j = ro.first[std::size_t(r)]; j < ro.first[std::size_t(r + 1)]; ++j)
          ev.routed[l][context_domain][ro.experts[std::size_t(j)]] += 1;
      }
    }
  }
  if (ranks) {  // each of the S shards sent the same tokens to the experts
    ranks->world().all_reduce_sum(&ev.expert_gemm_flops, 1);
    ev.expert_gemm_flops /= double(ranks->grid().shards());
  }
  ev.loss /= double(n);
  ev.oracle /= double(n);
  for (int d = 0; d < domains::kNumDomains; ++d)
    if (ev.domain_tokens[d] > 0) {
      ev.domain_loss[d] /= double(ev.domain_tokens[d]);
      ev.domain_oracle[d] /= double(ev.domain_tokens[d]);
    }
  model.set_training(true);
  return ev;
}

// How much each domain keeps to its own experts, from one layer's routing table [domain][expert].
struct Specialisation {
  std::array<double, domains::kNumDomains> top_share{};  // share of the domain's slots at its top expert
  double mean_top_share = 0;
  double mutual_information_bits = 0;  // I(domain; expert) over slots
  double normalised_mi = 0;            // I / H(domain): 0 = routing ignores the domain, 1 = decides it
};

inline Specialisation specialisation(const std::vector<std::vector<std::int64_t>>& table) {
  Specialisation sp;
  const std::size_t n_dom = table.size(), n_exp = table[0].size();
  std::vector<double> row(n_dom, 0), col(n_exp, 0);
  double total = 0;
  for (std::size_t d = 0; d < n_dom; ++d)
    for (std::size_t e = 0; e < n_exp; ++e) {
      row[d] += double(table[d][e]);
      col[e] += double(table[d][e]);
      total += double(table[d][e]);
    }
  if (total <= 0) return sp;
  double h_domain = 0;
  for (std::size_t d = 0; d < n_dom; ++d) {
    const double top = double(*std::max_element(table[d].begin(), table[d].end()));
    sp.top_share[d] = row[d] > 0 ? top / row[d] : 0.0;
    sp.mean_top_share += sp.top_share[d] / double(n_dom);
    if (row[d] > 0) h_domain -= row[d] / total * std::log2(row[d] / total);
    for (std::size_t e = 0; e < n_exp; ++e)
      if (table[d][e] > 0) {
        const double p = double(table[d][e]) / total;
        sp.mutual_information_bits += p * std::log2(p * total * total / (row[d] * col[e]));
      }
  }
  sp.normalised_mi = h_domain > 0 ? sp.mutual_information_bits / h_domain : 0.0;
  return sp;
}

// Column label of expert e: e0.. for FFN experts, then Z (zero), C (copy), K (constant) experts.
inline std::string expert_label(const ModelConfig& c, std::int64_t e) {
  if (e < c.experts) return "e" + std::to_string(e);
  e -= c.experts;
  if (e < c.zero_experts) return "Z" + std::to_string(e);
  e -= c.zero_experts;
  if (e < c.copy_experts) return "C" + std::to_string(e);
  return "K" + std::to_string(e - c.copy_experts);
}

using Emit = std::function<void(const nlohmann::ordered_json&)>;

// The closing report: the whole held-out stream evaluated, per domain, the routing tables,
// specialisation, load balance and zero-computation share, the FLOPs and the speed; the "final" JSON
// line. Returns the exit status: 1 when the held-out loss is not below the unigram baseline.
inline int final_report(Model<float>& model, const domains::Stream& heldout, Ranks* ranks, double baseline, const ModelConfig& mc,
                        const Options& opt, double total_train_s, std::chrono::steady_clock::time_point run_start,
                        std::int64_t n_params, std::int64_t n_local_params, bool cuda, const Emit& emit) {
  const std::int64_t n_experts = mc.total_experts();
  const Evaluation ev = evaluate(model, heldout, std::int64_t(heldout.tokens.size()), ranks);
  const double wall = seconds_since(run_start);
  out("\nheld-out loss %.4f nats  vs  unigram baseline %.4f nats  (generator's own NLL %.4f)\n", ev.loss, baseline, ev.oracle);
  out("%-8s %10s %10s %8s\n", "domain", "loss", "generator", "tokens");
  nlohmann::ordered_json per_domain;
  for (int d = 0; d < domains::kNumDomains; ++d) {
    out("%-8s %10.4f %10.4f %8lld\n", domains::domain_name(d), ev.domain_loss[d], ev.domain_oracle[d],
        (long long)ev.domain_tokens[d]);
    per_domain[domains::domain_name(d)] = {{"loss", ev.domain_loss[d]}, {"generator_nll", ev.domain_oracle[d]}, {"tokens", ev.domain_tokens[d]}};
  }
  out("\nexpert routing by domain (%% of the domain's slots per expert; domain of the window's latest token)\n");
  for (std::int64_t l = 0; l < mc.blocks; ++l) {
    out("layer %lld  ", (long long)l);
    for (std::int64_t e = 0; e < n_experts; ++e) out(" %-4s", expert_label(mc, e).c_str());
    out("\n");
    for (int d = 0; d < domains::kNumDomains; ++d) {
      std::int64_t total = 0;
      for (auto c : ev.routed[l][d]) total += c;
      out("  %-8s", domains::domain_name(d));
      for (auto c : ev.routed[l][d]) out(" %4.0f", 100.0 * double(c) / double(std::max<std::int64_t>(total, 1)));
      out("\n");
    }
  }

  // Load balance over the held-out slots: each expert's load against the mean (what the LBL or, with
  // --expert-bias, the bias updates even out).
  out("\nload balance (held-out slots per expert / mean)\n");
  nlohmann::ordered_json balance_json = nlohmann::ordered_json::array();
  for (std::int64_t l = 0; l < mc.blocks; ++l) {
    std::vector<double> load(std::size_t(n_experts), 0.0);
    for (int d = 0; d < domains::kNumDomains; ++d)
      for (std::int64_t e = 0; e < n_experts; ++e) load[std::size_t(e)] += double(ev.routed[l][d][std::size_t(e)]);
    double total = 0, lo = 1e300, hi = 0;
    for (double v : load) total += v;
    const double mean = std::max(total / double(n_experts), 1e-300);
    for (double v : load) lo = std::min(lo, v / mean), hi = std::max(hi, v / mean);
    out("  layer %lld: min %.2f  max %.2f  (max |load - mean| / mean %.1f %%)\n", (long long)l, lo, hi,
        100.0 * std::max(hi - 1.0, 1.0 - lo));
    balance_json.push_back({{"min_over_mean", lo}, {"max_over_mean", hi}});
  }

  // Specialisation per layer, the share of slots that zero-computation experts took (they do no GEMM),
  // and the expert GEMM FLOPs per held-out token against the same top-k with FFN experts only.
  out("\nspecialisation (top-expert share of each domain's slots; I(domain; expert) in bits, / H(domain))\n");
  nlohmann::ordered_json spec_json = nlohmann::ordered_json::array();
  double mean_top = 0, mean_mi = 0, mean_nmi = 0, zc_slots = 0, all_slots = 0;
  std::array<double, domains::kNumDomains> zc_by_domain{}, slots_by_domain{};
  for (std::int64_t l = 0; l < mc.blocks; ++l) {
    const Specialisation sp = specialisation(ev.routed[l]);
    out("  layer %lld:", (long long)l);
    for (int d = 0; d < domains::kNumDomains; ++d) out(" %s %.2f", domains::domain_name(d), sp.top_share[d]);
    out(" | mean %.3f | MI %.3f bits (%.3f)\n", sp.mean_top_share, sp.mutual_information_bits, sp.normalised_mi);
    spec_json.push_back({{"top_share", sp.top_share}, {"mean_top_share", sp.mean_top_share},
                         {"mutual_information_bits", sp.mutual_information_bits}, {"normalised_mi", sp.normalised_mi}});
    mean_top += sp.mean_top_share / double(mc.blocks);
    mean_mi += sp.mutual_information_bits / double(mc.blocks);
    mean_nmi += sp.normalised_mi / double(mc.blocks);
    for (int d = 0; d < domains::kNumDomains; ++d)
      for (std::int64_t e = 0; e < n_experts; ++e) {
        const double c = double(ev.routed[l][d][e]);
        slots_by_domain[d] += c;
        if (e >= mc.experts) zc_by_domain[d] += c;
      }
  }
  for (int d = 0; d < domains::kNumDomains; ++d) zc_slots += zc_by_domain[d], all_slots += slots_by_domain[d];
  const double zc_share = all_slots > 0 ? zc_slots / all_slots : 0.0;
  const double eval_tokens = double(heldout.tokens.size());
  const double flops_per_token = ev.expert_gemm_flops / eval_tokens;
  const double flops_ffn_only = double(mc.blocks * mc.top_k * 6 * mc.d_model * mc.d_expert);  // SwiGLU: 3 GEMMs of 2*d*f
  out("  mean over layers: top-expert share %.3f | MI %.3f bits (%.3f)\n", mean_top, mean_mi, mean_nmi);
  out("zero-computation experts: %.1f %% of slots", 100.0 * zc_share);
  nlohmann::ordered_json zc_domain_json;
  for (int d = 0; d < domains::kNumDomains; ++d) {
    const double share = slots_by_domain[d] > 0 ? zc_by_domain[d] / slots_by_domain[d] : 0.0;
    out(" | %s %.1f %%", domains::domain_name(d), 100.0 * share);
    zc_domain_json[domains::domain_name(d)] = share;
  }
  out("\nexpert GEMM FLOPs per token (forward, all layers): %.0f = %.3f x the %.0f of top-%lld over FFN experts only\n",
      flops_per_token, flops_per_token / flops_ffn_only, flops_ffn_only, (long long)mc.top_k);
  const double tokens_per_s = double(opt.steps * opt.accum * opt.batch) / total_train_s;
  out("\ntraining %.1f s (%.0f tokens/s), total %.1f s\n", total_train_s, tokens_per_s, wall);
  std::int32_t beat = ev.loss < baseline;
  if (ranks) ranks->world().broadcast(&beat, 1, 0);  // every rank exits as rank 0 does
  nlohmann::ordered_json config = {{"balance", opt.global_balance ? "global" : "micro"}, {"granularity", opt.granularity},
                                   {"ffn_experts", mc.experts}, {"zero_experts", mc.zero_experts}, {"copy_experts", mc.copy_experts},
                                   {"constant_experts", mc.constant_experts}, {"top_k", mc.top_k}, {"d_expert", mc.d_expert},
                                   {"tau", mc.tau}, {"gating_residual", mc.gating_residual}, {"pack_by_domain", opt.pack_by_domain},
                                   {"expert_bias", opt.expert_bias}, {"bias_update_rate", opt.bias_rate},
                                   {"steps", opt.steps}, {"batch", opt.batch}, {"accum", opt.accum}, {"seed", opt.seed},
                                   {"parameters", n_params}};
  if (cuda) config["backend"] = "cuda";  // absent: host
  if (ranks) {
    const auto& g = ranks->grid();
    config["parallel"] = {{"strategy", parallel_name(opt.parallel)}, {"ranks", ranks->size()}, {"tp", g.tp}, {"ep", g.ep}, {"dp", g.dp},
                          {"rank0_parameters", n_local_params}};
  }
  emit({{"type", "final"}, {"heldout_loss", ev.loss}, {"unigram_baseline", baseline}, {"generator_nll", ev.oracle},
        {"domains", per_domain}, {"routing", ev.routed}, {"config", config},
        {"specialisation", spec_json}, {"load_balance", balance_json}, {"mean_top_share", mean_top}, {"mean_mutual_information_bits", mean_mi},
        {"mean_normalised_mi", mean_nmi}, {"zc_slot_share", zc_share}, {"zc_slot_share_by_domain", zc_domain_json},
        {"expert_gemm_flops_per_token", flops_per_token}, {"expert_gemm_flops_per_token_ffn_only", flops_ffn_only},
        {"tokens_per_s", tokens_per_s}, {"train_seconds", total_train_s}, {"wall_seconds", wall},
        {"beats_baseline", bool(beat)}});
  if (!beat) {
    out("FAIL: held-out loss is not below the unigram baseline\n");
    return 1;
  }
  return 0;
}
