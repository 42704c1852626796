#pragma once
// Bytes each rank sends for one MoE layer in one training step (forward, backward and the gradient
// synchronisation), per collective, for every parallel strategy (docs/design.md §5): the formula that
// bench_comm_volume sets beside the communicators' own counters.
//
// Per rank, with R FFN slots per shard (T·k rows without MoE++ experts or a capacity limit; a slot
// routed to a zero, copy or constant expert never leaves its rank), e the bytes of an activation
// element, and duplicate token dropping (DTD) dispatching R/tp rows from each tp rank:
//   all_to_all      dispatch and return, forward and backward: 4 · R/tp_d · d · e · (ep-1)/ep, where
//                   tp_d = tp with DTD, 1 without. (ep-1)/ep of the rows leave the rank when the routing
//                   is uniform: the count is an expectation, measured volumes scatter around it.
//   all_gather      DTD: the tp group's rows in and back, forward and backward, 4 · R/tp · d · e ·
//                   (tp-1); and in forward the per-expert counts (int64) of every rank of the tp·ep
//                   group, N_FFN · 8 · (tp·ep - 1).
//   reduce_scatter  DTD: the partial outputs and the input gradients, 2 · R · d · e · (tp-1)/tp.
//   all_reduce      without DTD and tp > 1: the tp sums of the rows (output, input gradient), 2 ·
//                   2(tp-1)/tp · R · d · e. Gradients (ring all-reduce, 2(p-1)/p of the bytes): each
//                   rank's expert shard (params / (ep·tp)) over its dp group, the router over the world.
#include <cstdint>
#include <string>

#include "moekit/core/error.hpp"

namespace moekit::science {

struct CollectiveBytes {
  double all_to_all = 0, all_gather = 0, reduce_scatter = 0, all_reduce = 0;
  double total() const { return all_to_all + all_gather + reduce_scatter + all_reduce; }
  CollectiveBytes& operator+=(const CollectiveBytes& o) {
    all_to_all += o.all_to_all, all_gather += o.all_gather, reduce_scatter += o.reduce_scatter, all_reduce += o.all_reduce;
    return *this;
  }
  friend CollectiveBytes operator+(CollectiveBytes a, const CollectiveBytes& b) { return a += b; }
};

struct CommBytes {
  CollectiveBytes forward, backward, gradients;
  CollectiveBytes step() const { return forward + backward + gradients; }
};

struct CommShape {
  std::int64_t tokens = 0;     // per shard (the tp ranks of a group hold the same ones)
  std::int64_t ffn_slots = -1;  // (token, FFN expert) rows per shard; -1: tokens · top_k
  std::int64_t d_model = 0, d_expert = 0, ffn_experts = 0, top_k = 1;
  bool gated = true;  // SwiGLU: three matrices per expert
  std::int64_t tp = 1, ep = 1, dp = 1;
  bool duplicate_token_dropping = true;
  double element_bytes = 4;   // activations (4: fp32, 2: bf16)
  double gradient_bytes = 4;  // the gradients all-reduced (fp32)
};

inline CommBytes moe_layer_comm_bytes(const CommShape& s) {
  auto positive = [](std::int64_t v, const char* name) {
    if (v <= 0) throw ConfigError(name, std::to_string(v), "must be > 0");
  };
  if (s.tokens < 0) throw ConfigError("tokens", std::to_string(s.tokens), "must be >= 0");
  positive(s.d_model, "d_model"), positive(s.d_expert, "d_expert"), positive(s.ffn_experts, "ffn_experts"), positive(s.top_k, "top_k");
  positive(s.tp, "tp"), positive(s.ep, "ep"), positive(s.dp, "dp");
  if (s.ffn_slots < -1) throw ConfigError("ffn_slots", std::to_string(s.ffn_slots), "must be >= 0 (or -1: tokens * top_k)");
  if (!(s.element_bytes > 0) || !(s.gradient_bytes > 0))
    throw ConfigError("element_bytes", std::to_string(s.element_bytes) + " / " + std::to_string(s.gradient_bytes), "must be > 0");
  const double R = double(s.ffn_slots < 0 ? s.tokens * s.top_k : s.ffn_slots), d = double(s.d_model), e = s.element_bytes;
  const double tp = double(s.tp), ep = double(s.ep), dp = double(s.dp), world = tp * ep * dp, nf = double(s.ffn_experts);
  const bool dtd = s.duplicate_token_dropping && s.tp > 1;
  const double rows_out = (dtd ? R / tp : R) * d * e;  // rows one rank dispatches

  CommBytes b;
  const double a2a = 2.0 * rows_out * (ep - 1.0) / ep;  // dispatch + return
  b.forward.all_to_all = b.backward.all_to_all = a2a;
  b.forward.all_gather = nf * 8.0 * (tp * ep - 1.0);
  if (dtd) {
    const double gather = 2.0 * (R / tp) * d * e * (tp - 1.0), scatter = R * d * e * (tp - 1.0) / tp;
    b.forward.all_gather += gather, b.backward.all_gather += gather;
    b.forward.reduce_scatter = b.backward.reduce_scatter = scatter;
  } else if (s.tp > 1) {
    b.forward.all_reduce = b.backward.all_reduce = 2.0 * (tp - 1.0) / tp * R * d * e;
  }
  const double expert_params = nf * double(s.gated ? 3 : 2) * double(s.d_expert) * d, router_params = nf * d;
  b.gradients.all_reduce = 2.0 * (dp - 1.0) / dp * expert_params / (ep * tp) * s.gradient_bytes +
                           2.0 * (world - 1.0) / world * router_params * s.gradient_bytes;
  return b;
}

// The ring all-reduce of `params` dense gradients over `ranks` ranks, per rank (the rest of the model:
// attention, norms, embedding and head are data-parallel over every rank).
inline double dense_gradient_bytes(double params, std::int64_t ranks, double gradient_bytes = 4) {
  if (ranks <= 0) throw ConfigError("ranks", std::to_string(ranks), "must be > 0");
  if (!(params >= 0)) throw ConfigError("params", std::to_string(params), "must be >= 0");
  return 2.0 * double(ranks - 1) / double(ranks) * params * gradient_bytes;
}

}  // namespace moekit::science
