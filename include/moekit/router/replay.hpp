#pragma once
// Router replay (docs/design.md §2; asked for in Megatron-Core, vLLM, SGLang and TensorRT-LLM for
// reinforcement learning: the trainer routes a rollout's tokens to the experts the inference engine
// used). A forward records its selection, topk_indices() [T, k]; a later forward can be told to use a
// record, int32 [T, k] with −1 for a slot with no expert, instead of its own selection:
//   idx_t = the record's experts of token t (its −1 slots left out, the others in order)
//   g_tj  = c · s_{t, idx_tj} / Z_t    (the router's rule: Z_t over the token's replayed slots, or 1)
// so the gates still get gradients through the current scores. Everything after the selection is as
// usual: capacity drops by the current scores, the counts f_i of the replayed slots, the balance loss,
// the z-loss. With unchanged weights a replayed record of a forward gives that forward's outputs bit
// for bit (the same experts, the same arithmetic in the same order). The plan is by token (a token's
// replayed slots in record order), as expert choice's; a record without −1 lays its slots out as token
// choice does (slot t·k + j). Records are saved and loaded as safetensors, one int32 tensor per layer
// (io/routing_record.hpp).
#include <cstdint>
#include <string>

#include "moekit/core/error.hpp"
#include "moekit/core/macros.hpp"
#include "moekit/router/topk.hpp"

namespace moekit::router {

// One token's forward under replay: the scores, the `count` given experts, their gates by the router's
// rule, then P. Returns the lse.
template <class R, class S>
MOEKIT_HD S route_token_replay(const R& r, const S* logit, int n, const int* experts, int count, S* prob, int* idx, S* gate) {
  using Score = typename R::score;
  const S lse = token_scores(Score{}, logit, n, prob);
  for (int j = 0; j < count; ++j) idx[j] = experts[j];
  picked_gates(prob, idx, count, r.gate_rule(), gate);
  balance_probs(Score{}, prob, n);
  return lse;
}

// Checks a record against a layer of N_E experts and top_k k: [rows, k], values in [−1, N_E), no expert
// twice in a row. ShapeError naming `what`, the token and the value.
inline void check_routing_record(const std::int32_t* indices, std::int64_t rows, std::int64_t cols, std::int64_t k, std::int64_t experts,
                                 const std::string& what) {
  if (cols != k) throw ShapeError(what + " has " + std::to_string(cols) + " columns; the layer's top_k is " + std::to_string(k));
  if (rows > 0 && !indices) throw ShapeError(what + " has no data");
  for (std::int64_t t = 0; t < rows; ++t)
    for (std::int64_t j = 0; j < k; ++j) {
      const std::int32_t e = indices[t * k + j];
      if (e < -1 || e >= experts)
        throw ShapeError(what + "[" + std::to_string(t) + ", " + std::to_string(j) + "] = " + std::to_string(e) +
                         " must be an expert in [0, " + std::to_string(experts) + ") or -1 (no expert)");
      for (std::int64_t i = 0; i < j && e >= 0; ++i)
        if (indices[t * k + i] == e)
          throw ShapeError(what + " names expert " + std::to_string(e) + " twice for token " + std::to_string(t));
    }
}

}  // namespace moekit::router
