#pragma once
// The host backend's routing-plan consumers (layer/routing_plan.hpp): capacity drops and rows, the
// gather of x rows into expert-contiguous rows (dispatch), and the gather of expert rows back into
// tokens (combine, and dx in backward). They read slots through the plan's SlotLayout, so they serve
// token-choice [T, k] plans and by-token plans (expert choice) alike. Every sum runs in one fixed order
// (a gather per token, its slots in slot order): deterministic for any thread count.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "moekit/backend/host/convert.hpp"
#include "moekit/balance/loss.hpp"
#include "moekit/layer/routing_plan.hpp"
#include "moekit/parallel/dispatch_plan.hpp"

#ifndef MOEKIT_OMP_MIN_WORK
// Loops with less work than this many elements run on one thread: waking an OpenMP team costs more,
// and idle OpenMP threads spinning after a region slow the (separately threaded) BLAS calls.
#define MOEKIT_OMP_MIN_WORK 32768
#endif

namespace moekit::backend::host {

// Capacity drops and rows. Each expert over its capacity (caps: FFN and zero-computation experts'; -1
// = none) keeps its highest-scoring slots (score(s); equal scores keep the earlier slot). Kept FFN
// slots get rows chunk-major: token chunk (parallel/dispatch_plan.hpp, `chunks` of them), then FFN
// expert, then slot order; kept zero-computation slots get kSlotZeroComputation, dropped ones
// kSlotDropped. Writes row [slots], slot_of_row [rows], kept [N_E], offsets [chunks·N_FFN + 1].
template <class Score>
void assign_rows(const SlotLayout& L, const int* expert, const std::int32_t* routed, const balance::Capacities& caps,
                 std::int64_t ffn_experts, std::int64_t experts, int chunks, Score&& score, int* row, int* slot_of_row,
                 std::int32_t* kept, std::int32_t* offsets) {
  using I64 = std::int64_t;
  const I64 nf = ffn_experts, ns = L.slots;
  const auto is_ffn = [&](I64 e) { return e < nf; };
  const auto chunk_of = [&](I64 s) { return chunks == 1 ? I64(0) : DispatchPlan::chunk_of(L.token(int(s)), L.tokens, chunks); };
  std::fill_n(row, ns, 0);
  if (caps.ffn >= 0) {
    std::vector<std::vector<int>> by_expert{std::size_t(experts)};
    for (I64 s = 0; s < ns; ++s) {
      const I64 e = expert[s];
      if (routed[e] > (is_ffn(e) ? caps.ffn : caps.zc)) by_expert[std::size_t(e)].push_back(int(s));
    }
    for (I64 e = 0; e < experts; ++e) {
      auto& slots = by_expert[std::size_t(e)];
      const auto cap = std::size_t(is_ffn(e) ? caps.ffn : caps.zc);
      std::stable_sort(slots.begin(), slots.end(), [&](int a, int b) { return score(a) > score(b); });
      for (std::size_t r = cap; r < slots.size(); ++r) row[slots[r]] = kSlotDropped;
    }
  }
  std::fill_n(kept, experts, 0);
  std::vector<I64> fill(std::size_t(chunks * nf + 1), 0);
  for (I64 s = 0; s < ns; ++s) {
    if (row[s] == kSlotDropped) continue;
    ++kept[expert[s]];
    if (is_ffn(expert[s])) ++fill[std::size_t(chunk_of(s) * nf + expert[s] + 1)];
  }
  for (I64 i = 0; i < chunks * nf; ++i) fill[std::size_t(i + 1)] += fill[std::size_t(i)];
  for (I64 i = 0; i <= chunks * nf; ++i) offsets[i] = std::int32_t(fill[std::size_t(i)]);
  for (I64 s = 0; s < ns; ++s) {
    if (row[s] == kSlotDropped) continue;
    if (!is_ffn(expert[s])) {
      row[s] = kSlotZeroComputation;
      continue;
    }
    const I64 r = fill[std::size_t(chunk_of(s) * nf + expert[s])]++;
    row[s] = int(r);
    slot_of_row[r] = int(s);
  }
}

// Dispatch: xp[r, :] = x[token of slot_of_row[r], :] for rows [r0, r1).
template <class T, class G>
void gather_token_rows(const RoutingPlan<G>& p, const T* x, std::int64_t d, std::int64_t r0, std::int64_t r1, T* xp) {
#pragma omp parallel for schedule(static) if ((r1 - r0) * d >= MOEKIT_OMP_MIN_WORK)
  for (std::int64_t r = r0; r < r1; ++r) std::copy_n(x + std::int64_t(p.layout.token(p.slot_of_row[r])) * d, d, xp + r * d);
}

// Combine (gate_weighted) and dx of the FFN rows (not): out[t, :] = Σ over t's slots with a row, in
// slot order, of (gate or 1) · rows[row, :]. Tokens without such slots get 0. The sum runs in O (the
// compute type: bf16 rows are summed in fp32).
template <class T, class G, class O>
void gather_slot_rows(const RoutingPlan<G>& p, const T* rows, std::int64_t d, bool gate_weighted, O* out) {
  const SlotLayout& L = p.layout;
  [[maybe_unused]] const std::int64_t work = std::int64_t(L.slots) * d;  // read by the OpenMP clause only
#pragma omp parallel for schedule(static) if (work >= MOEKIT_OMP_MIN_WORK)
  for (std::int64_t t = 0; t < L.tokens; ++t) {
    O* ot = out + t * d;
    std::fill_n(ot, d, O(0));
    for (int s = L.begin(int(t)); s < L.end(int(t)); ++s) {
      const int r = p.row[s];
      if (r < 0) continue;
      const O g = gate_weighted ? O(p.gate[s]) : O(1);
      const T* src = rows + std::int64_t(r) * d;
      for (std::int64_t c = 0; c < d; ++c) ot[c] += g * to_compute<O>(src[c]);
    }
  }
}

}  // namespace moekit::backend::host
