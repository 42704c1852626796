// The routing plan's consumers read slots through SlotLayout (layer/routing_plan.hpp), so a plan whose
// tokens hold different numbers of slots (expert choice) is dispatched and combined as correctly as the
// token-choice [T, k] one. References: the slots as a plain list of (token, expert, gate, score),
// worked by hand where the rule is short, by one obvious loop where it is long.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <moekit/backend/host/dispatch.hpp>
#include <vector>

using namespace moekit;
using namespace moekit::backend::host;

namespace {

struct Slot {
  int token, expert;
  double gate, score;
};

// Token t's slots, in token order: t0 has 3, t1 none, t2 one, t3 two. Experts 0..2 FFN, 3 zero-computation.
const std::vector<Slot> kSlots = {{0, 0, 0.5, 0.9}, {0, 2, 0.3, 0.4}, {0, 3, 0.2, 0.3},
                                  {2, 1, 1.0, 0.8}, {3, 0, 0.6, 0.7}, {3, 1, 0.4, 0.95}};
constexpr int kTokens = 4, kFfn = 3, kExperts = 4, kD = 3;

struct Plan {
  std::vector<int> first, token_of, expert, row, slot_of_row;
  std::vector<double> gate;
  std::vector<std::int32_t> routed, kept, offsets;
  SlotLayout layout;
  RoutingPlan<double> view() const { return {layout, expert.data(), gate.data(), row.data(), slot_of_row.data()}; }
};

Plan by_token_plan(const balance::Capacities& caps, int chunks) {
  Plan p;
  p.first.assign(kTokens + 1, 0);
  for (const Slot& s : kSlots) ++p.first[std::size_t(s.token + 1)];
  for (int t = 0; t < kTokens; ++t) p.first[std::size_t(t + 1)] += p.first[std::size_t(t)];
  p.routed.assign(kExperts, 0);
  for (const Slot& s : kSlots) {
    p.token_of.push_back(s.token), p.expert.push_back(s.expert), p.gate.push_back(s.gate);
    ++p.routed[std::size_t(s.expert)];
  }
  const int n = int(kSlots.size());
  p.layout = SlotLayout::by_token(kTokens, n, p.first.data(), p.token_of.data());
  p.row.assign(std::size_t(n), 7), p.slot_of_row.assign(std::size_t(n), -7);
  p.kept.assign(kExperts, -1), p.offsets.assign(std::size_t(chunks * kFfn + 1), -1);
  assign_rows(p.layout, p.expert.data(), p.routed.data(), caps, kFfn, kExperts, chunks,
              [](int s) { return kSlots[std::size_t(s)].score; }, p.row.data(), p.slot_of_row.data(), p.kept.data(),
              p.offsets.data());
  return p;
}

std::vector<double> x_rows() {
  std::vector<double> x(kTokens * kD);
  for (int i = 0; i < kTokens * kD; ++i) x[std::size_t(i)] = 1.0 + i * 0.25;
  return x;
}

}  // namespace

TEST_CASE("SlotLayout: token choice and by-token layouts name the same tokens and slots") {
  const SlotLayout tc = SlotLayout::token_choice(5, 3);
  CHECK(tc.slots == 15);
  CHECK(tc.begin(2) == 6);
  CHECK(tc.end(2) == 9);
  CHECK(tc.token(8) == 2);
  CHECK(tc.valid());
  const std::vector<int> first = {0, 2, 2, 3}, token_of = {0, 0, 2};
  const SlotLayout bt = SlotLayout::by_token(3, 3, first.data(), token_of.data());
  CHECK(bt.begin(1) == bt.end(1));  // a token without slots
  CHECK(bt.token(2) == 2);
  CHECK(bt.valid());
  CHECK_FALSE(SlotLayout::by_token(3, 3, nullptr, nullptr).valid());
}

TEST_CASE("assign_rows on a by-token plan: rows expert-major in slot order, zero-computation and dropped slots marked") {
  SUBCASE("no capacity") {
    const Plan p = by_token_plan({}, 1);
    // expert 0: slots 0, 4 -> rows 0, 1; expert 1: slots 3, 5 -> rows 2, 3; expert 2: slot 1 -> row 4.
    CHECK(p.row == std::vector<int>{0, 4, kSlotZeroComputation, 2, 1, 3});
    CHECK(p.slot_of_row == std::vector<int>{0, 4, 3, 5, 1, -7});
    CHECK(p.offsets == std::vector<std::int32_t>{0, 2, 4, 5});
    CHECK(p.kept == std::vector<std::int32_t>{2, 2, 1, 1});
  }
  SUBCASE("capacity 1: each expert keeps its highest-scoring slot") {
    const Plan p = by_token_plan({1, 1}, 1);
    // expert 0: scores 0.9 (slot 0) > 0.7 (slot 4): slot 4 dropped; expert 1: 0.95 (slot 5) > 0.8 (slot 3).
    CHECK(p.row == std::vector<int>{0, 2, kSlotZeroComputation, kSlotDropped, kSlotDropped, 1});
    CHECK(p.offsets == std::vector<std::int32_t>{0, 1, 2, 3});
    CHECK(p.kept == std::vector<std::int32_t>{1, 1, 1, 1});
  }
  SUBCASE("two token chunks: chunk-major rows") {
    const Plan p = by_token_plan({}, 2);  // chunk 0: tokens 0, 1; chunk 1: tokens 2, 3
    // chunk 0: e0 slot 0, e2 slot 1; chunk 1: e0 slot 4, e1 slots 3, 5.
    CHECK(p.offsets == std::vector<std::int32_t>{0, 1, 1, 2, 3, 5, 5});
    CHECK(p.row == std::vector<int>{0, 1, kSlotZeroComputation, 3, 2, 4});
  }
}

TEST_CASE("dispatch and combine over a by-token plan equal the slot-list reference") {
  const std::vector<double> x = x_rows();
  for (const balance::Capacities caps : {balance::Capacities{}, balance::Capacities{1, 1}}) {
    const Plan p = by_token_plan(caps, 1);
    const std::int64_t rows = p.offsets.back();
    std::vector<double> xp(std::size_t(rows * kD), -1.0);
    gather_token_rows(p.view(), x.data(), kD, 0, rows, xp.data());
    // Expert "compute": row r becomes 10 · r + its x row, so the combine's sources are all distinct.
    std::vector<double> y(xp.size());
    for (std::int64_t r = 0; r < rows; ++r)
      for (int c = 0; c < kD; ++c) y[std::size_t(r * kD + c)] = 10.0 * double(r) + xp[std::size_t(r * kD + c)];
    std::vector<double> out(std::size_t(kTokens * kD), -1.0), unweighted(out.size(), -1.0);
    gather_slot_rows(p.view(), y.data(), kD, true, out.data());
    gather_slot_rows(p.view(), y.data(), kD, false, unweighted.data());

    std::vector<double> ref(out.size(), 0.0), ref1(out.size(), 0.0);
    for (std::size_t s = 0; s < kSlots.size(); ++s) {
      const int r = p.row[s];
      if (r < 0) continue;
      const Slot& sl = kSlots[s];
      for (int c = 0; c < kD; ++c) {
        CHECK(xp[std::size_t(r * kD + c)] == x[std::size_t(sl.token * kD + c)]);
        const double v = 10.0 * r + x[std::size_t(sl.token * kD + c)];
        ref[std::size_t(sl.token * kD + c)] += sl.gate * v;
        ref1[std::size_t(sl.token * kD + c)] += v;
      }
    }
    for (std::size_t i = 0; i < out.size(); ++i) {
      CHECK(out[i] == doctest::Approx(ref[i]).epsilon(1e-14));
      CHECK(unweighted[i] == doctest::Approx(ref1[i]).epsilon(1e-14));
    }
    for (int c = 0; c < kD; ++c) CHECK(out[std::size_t(1 * kD + c)] == 0.0);  // token 1 has no slot
  }
}

TEST_CASE("assign_rows: a token-choice layout gives the rows of the same slots listed by token") {
  // 3 tokens x k = 2, as a [T, k] plan and as a by-token plan with first = {0, 2, 4, 6}.
  const std::vector<int> expert = {1, 0, 2, 1, 0, 3}, first = {0, 2, 4, 6}, token_of = {0, 0, 1, 1, 2, 2};
  const std::vector<double> score = {0.5, 0.6, 0.2, 0.9, 0.1, 0.3};
  std::vector<std::int32_t> routed(kExperts, 0);
  for (int e : expert) ++routed[std::size_t(e)];
  for (const balance::Capacities caps : {balance::Capacities{}, balance::Capacities{1, 1}})
    for (int chunks : {1, 3}) {
      std::vector<int> row[2], sor[2];
      std::vector<std::int32_t> kept[2], off[2];
      const SlotLayout layouts[2] = {SlotLayout::token_choice(3, 2), SlotLayout::by_token(3, 6, first.data(), token_of.data())};
      for (int i = 0; i < 2; ++i) {
        row[i].assign(6, 0), sor[i].assign(6, 0), kept[i].assign(kExperts, 0), off[i].assign(std::size_t(chunks * kFfn + 1), 0);
        assign_rows(layouts[i], expert.data(), routed.data(), caps, kFfn, kExperts, chunks,
                    [&](int s) { return score[std::size_t(s)]; }, row[i].data(), sor[i].data(), kept[i].data(), off[i].data());
      }
      CHECK(row[0] == row[1]);
      CHECK(sor[0] == sor[1]);
      CHECK(kept[0] == kept[1]);
      CHECK(off[0] == off[1]);
    }
}
