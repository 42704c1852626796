#pragma once
// The bookkeeping of one expert-parallel dispatch, the same for every backend (parallel/
// host_moe_layer.hpp and the CUDA one): from the per-chunk, per-expert row counts to the row layouts on
// both sides and the element counts of each collective. No data moves here.
//
// Token side: this rank's FFN rows in chunk-major order: chunk c (tokens [T·c/C, T·(c+1)/C), C = tp with
// duplicate token dropping, else 1), then expert, then token. With DTD, tp rank t dispatches chunk t.
// Expert side: the rows of this rank's experts from every source, first in the order they arrive
// ("gathered": chunk source b, ep source s, local expert le) and then expert-major (le, s, b) for the
// GEMMs.
#include <cstdint>
#include <vector>

#include "moekit/parallel/grid.hpp"

namespace moekit {

class DispatchPlan {
 public:
  using I64 = std::int64_t;

  void reset(const ParallelGrid& g, bool dtd, I64 ffn_experts, I64 d_model) {
    g_ = g, dtd_ = dtd, nf_ = ffn_experts, el_ = ffn_experts / g.ep, d_ = d_model;
  }
  int chunks() const { return dtd_ ? g_.tp : 1; }
  I64 d_model() const { return d_; }
  int my_chunk() const { return dtd_ ? g_.t : 0; }
  // Chunk of token t of `tokens` (the inverse of the ranges above).
  static I64 chunk_of(I64 t, I64 tokens, I64 chunks) { return ((t + 1) * chunks + tokens - 1) / tokens - 1; }

  // Token side: cnt[c·N_FFN + e] rows of chunk c for expert e.
  void set_token_counts(const std::vector<I64>& cnt) {
    cnt_ = cnt;
    chunk_row_.assign(std::size_t(chunks() + 1), 0);
    for (int c = 0; c < chunks(); ++c) {
      I64 rows = 0;
      for (I64 e = 0; e < nf_; ++e) rows += cnt_[std::size_t(c * nf_ + e)];
      chunk_row_[c + 1] = chunk_row_[c] + rows;
    }
  }
  // The counts of my chunk, to all-gather over the tp x ep ranks of this dp index.
  const I64* my_counts() const { return &cnt_[std::size_t(my_chunk() * nf_)]; }

  // Expert side, from all[g·N_FFN + e], g = t + tp·s: the rows rank g dispatches to expert e.
  void set_all_counts(const std::vector<I64>& all) {
    const int nb = chunks();
    blk_.assign(std::size_t(nb * g_.ep * el_), 0);
    for (int b = 0; b < nb; ++b)
      for (int s = 0; s < g_.ep; ++s)
        for (I64 le = 0; le < el_; ++le) {
          const int src_t = dtd_ ? b : g_.t;
          blk_[index(b, s, le)] = all[std::size_t((src_t + g_.tp * s) * nf_ + I64(g_.e) * el_ + le)];
        }
    gath_pos_.assign(blk_.size(), 0), exp_pos_.assign(blk_.size(), 0), exp_off_.assign(std::size_t(el_ + 1), 0);
    I64 at = 0;
    for (std::size_t i = 0; i < blk_.size(); ++i) gath_pos_[i] = at, at += blk_[i];
    at = 0;
    for (I64 le = 0; le < el_; ++le) {
      exp_off_[le] = at;
      for (int s = 0; s < g_.ep; ++s)
        for (int b = 0; b < nb; ++b) exp_pos_[index(b, s, le)] = at, at += blk_[index(b, s, le)];
    }
    exp_off_[el_] = at;
    send_.assign(std::size_t(g_.ep), 0), recv_.assign(std::size_t(g_.ep), 0), gather_.assign(std::size_t(nb), 0);
    for (I64 e = 0; e < nf_; ++e) send_[std::size_t(e / el_)] += my_counts()[e] * d_;
    for (int s = 0; s < g_.ep; ++s)
      for (I64 le = 0; le < el_; ++le) recv_[s] += blk_[index(my_chunk(), s, le)] * d_;
    for (int b = 0; b < nb; ++b)
      for (int s = 0; s < g_.ep; ++s)
        for (I64 le = 0; le < el_; ++le) gather_[b] += blk_[index(b, s, le)] * d_;
  }

  // Token side.
  I64 chunk_row(int c) const { return chunk_row_[c]; }
  I64 my_rows() const { return chunk_row_[my_chunk() + 1] - chunk_row_[my_chunk()]; }
  std::vector<I64> chunk_elements() const {  // elements of each chunk's rows (tp all-gather of rows)
    std::vector<I64> v(static_cast<std::size_t>(chunks()));
    for (int c = 0; c < chunks(); ++c) v[c] = (chunk_row_[c + 1] - chunk_row_[c]) * d_;
    return v;
  }
  // Collective counts in elements: all-to-all send (per ep rank) / receive (per ep source), tp gather.
  const std::vector<I64>& send() const { return send_; }
  const std::vector<I64>& recv() const { return recv_; }
  const std::vector<I64>& gather() const { return gather_; }
  I64 recv_elements() const { return sum(recv_); }
  // Expert side: rows in all, and each local expert's range in expert-major order.
  I64 expert_rows() const { return exp_off_.empty() ? 0 : exp_off_.back(); }
  const std::vector<I64>& expert_offsets() const { return exp_off_; }
  // Calls copy(from_row, to_row, rows) for each block: gathered -> expert-major, or back.
  template <class Copy>
  void for_each_block(bool to_expert_major, Copy&& copy) const {
    for (std::size_t i = 0; i < blk_.size(); ++i)
      if (blk_[i] > 0) copy(to_expert_major ? gath_pos_[i] : exp_pos_[i], to_expert_major ? exp_pos_[i] : gath_pos_[i], blk_[i]);
  }

 private:
  std::size_t index(int b, int s, I64 le) const { return (std::size_t(b) * std::size_t(g_.ep) + std::size_t(s)) * std::size_t(el_) + std::size_t(le); }
  static I64 sum(const std::vector<I64>& v) {
    I64 s = 0;
    for (auto x : v) s += x;
    return s;
  }
  ParallelGrid g_;
  bool dtd_ = true;
  I64 nf_ = 0, el_ = 0, d_ = 0;
  std::vector<I64> cnt_, chunk_row_, blk_, gath_pos_, exp_pos_, exp_off_, send_, recv_, gather_;
};

}  // namespace moekit
