// balance::GlobalBatch (Qwen, arXiv 2501.11873; docs/design.md §4, issue 3): f_i from routed counts buffered over
// the micro-batches of one optimizer step (and all-reduced over ranks through a hook), P_i from the
// current micro-batch. Checked against MicroBatch, against counts summed by hand, against the naive
// reference with f overridden, and by finite differences with f held by a simulated second rank.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <moekit/moe_layer.hpp>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "moepp_reference.hpp"

using namespace moekit;

namespace {

using AllZc = experts::Set<experts::Ffn<act::SwiGLU>, experts::Zero, experts::Copy, experts::Constant>;

template <bool Sigmoid>
struct Pair {  // the same layer with either balance scope
  static constexpr bool sigmoid = Sigmoid;
  using Router = router::GatingResidual<router::TopK<std::conditional_t<Sigmoid, router::Sigmoid, router::Softmax>>>;
  using Global = MoeLayer<backend::Host<double>, Router, AllZc, balance::GlobalBatch>;
  using Micro = MoeLayer<backend::Host<double>, Router, AllZc, balance::MicroBatch>;
};

// 3 FFN + 1 zero + 1 copy + 2 constant experts, k = 2, tau = 0.6 (so eta matters), capacity on (so routed
// and kept counts differ: f must use the routed ones).
refpp::Cfg ref_cfg(bool sigmoid) {
  refpp::Cfg r;
  r.D = 6;
  r.F = 5;
  r.n_ffn = 3;
  r.n_zero = 1;
  r.n_copy = 1;
  r.n_const = 2;
  r.K = 2;
  r.sigmoid = sigmoid;
  r.act = 0;
  r.gamma = 0.8;
  r.tau = 0.6;
  return r;
}

MoeConfig to_config(const refpp::Cfg& r, double lbl_coef) {
  MoeConfig c;
  c.d_model = r.D;
  c.d_expert = r.F;
  c.num_ffn_experts = r.n_ffn;
  c.num_zero_experts = r.n_zero;
  c.num_copy_experts = r.n_copy;
  c.num_constant_experts = r.n_const;
  c.top_k = r.K;
  c.router = r.sigmoid ? RouterKind::kSigmoid : RouterKind::kSoftmax;
  c.gating_residual = true;
  c.activation = Activation::kSwiGLU;
  c.capacity_factor = r.gamma;
  c.tau = r.tau;
  c.lbl_coef = lbl_coef;
  c.zloss_coef = 0.05;
  return c;
}

struct Batch {
  int T = 0;
  std::vector<double> x, prev, dy, dln;  // dln: dL/d(logits) from the next layer
};

Batch make_batch(const refpp::Cfg& rc, int tokens, std::mt19937_64& g) {
  Batch b;
  b.T = tokens;
  b.x = refpp::random_vec(size_t(tokens) * rc.D, g);
  b.prev = refpp::random_vec(size_t(tokens) * rc.E(), g);
  b.dy = refpp::random_vec(size_t(tokens) * rc.D, g);
  b.dln = refpp::random_vec(size_t(tokens) * rc.E(), g, 0.5);
  return b;
}

template <class Layer>
void load(Layer& layer, const refpp::Cfg& rc, const refpp::Weights& w) {
  const std::string err = refpp::load_named(layer, refpp::named_weights(rc, w, true));
  INFO(err);
  REQUIRE(err.empty());
}

template <class Layer>
AuxLosses run_forward(Layer& layer, const Batch& b, std::vector<double>& y, const std::vector<double>* x = nullptr,
                      const std::vector<double>* prev = nullptr) {
  const std::int64_t d = layer.config().d_model, n = layer.config().num_experts();
  y.assign(size_t(b.T * d), std::nan(""));
  return layer.forward(MatrixView<const double>((x ? *x : b.x).data(), {b.T, d}), MatrixView<double>(y.data(), {b.T, d}),
                       MatrixView<const double>((prev ? *prev : b.prev).data(), {b.T, n}));
}

struct Grads {
  std::vector<double> dx, dprev;
  std::vector<std::vector<double>> params;
};

template <class Layer>
Grads run_backward(Layer& layer, const Batch& b, double aux_scale) {
  const std::int64_t d = layer.config().d_model, n = layer.config().num_experts();
  Grads g;
  g.dx.assign(b.x.size(), std::nan(""));
  g.dprev.assign(b.prev.size(), std::nan(""));
  layer.zero_grad();
  layer.backward(MatrixView<const double>(b.dy.data(), {b.T, d}), MatrixView<double>(g.dx.data(), {b.T, d}), aux_scale,
                 MatrixView<const double>(b.dln.data(), {b.T, n}), MatrixView<double>(g.dprev.data(), {b.T, n}));
  for (auto& p : layer.parameters()) g.params.emplace_back(p.grad, p.grad + p.numel());
  return g;
}

double rel_diff(const std::vector<double>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  if (!(num == num)) return INFINITY;
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
}

void check_same(const Grads& a, const Grads& b, double tol) {
  CHECK(rel_diff(a.dx, b.dx) < tol);
  CHECK(rel_diff(a.dprev, b.dprev) < tol);
  REQUIRE(a.params.size() == b.params.size());
  for (size_t i = 0; i < a.params.size(); ++i) {
    CAPTURE(i);
    CHECK(rel_diff(a.params[i], b.params[i]) < tol);
  }
}

// LBL = N_E sum_i eta_i f_i P_i with f_i = counts_i / (k tokens) and P_i the mean over this micro-batch,
// computed here from the reference's probabilities.
double lbl_by_hand(const refpp::Cfg& rc, const std::vector<std::int64_t>& counts, std::int64_t tokens,
                   const refpp::Out& local, int T) {
  const int E = rc.E();
  double acc = 0;
  for (int e = 0; e < E; ++e) {
    double P = 0;
    for (int t = 0; t < T; ++t) P += local.probs[size_t(t) * E + e];
    P /= T;
    const double f = double(counts[e]) / (double(rc.K) * double(tokens));
    acc += (e < rc.n_ffn ? 1.0 : rc.tau) * f * P;
  }
  return E * acc;
}

// A hook as if a second rank held other tokens: it adds that rank's N_E counts and, when the token count
// travels in the same collective (n = N_E + 1, counts first), its token count.
struct OtherRank {
  std::vector<std::int64_t> counts;
  std::int64_t tokens = 0;
  int* calls = nullptr;
  void operator()(std::int64_t* data, std::size_t n) const {
    if (calls) ++*calls;
    REQUIRE((n == counts.size() || n == counts.size() + 1));
    for (size_t i = 0; i < counts.size(); ++i) data[i] += counts[i];
    if (n == counts.size() + 1) data[counts.size()] += tokens;
  }
};

}  // namespace

TEST_CASE_TEMPLATE("GlobalBatch with one micro-batch equals MicroBatch", P, Pair<false>, Pair<true>) {
  const refpp::Cfg rc = ref_cfg(P::sigmoid);
  std::mt19937_64 g(11);
  const refpp::Weights w = refpp::random_weights(rc, g, true);
  const Batch b = make_batch(rc, 13, g);
  typename P::Global glob(to_config(rc, 0.3));
  typename P::Micro micro(to_config(rc, 0.3));
  load(glob, rc, w);
  load(micro, rc, w);
  const refpp::Out r = refpp::forward(rc, b.x, w, b.T, &b.prev);
  for (double aux_scale : {1.0, 0.5}) {  // one backward per forward; reset() starts a new step
    CAPTURE(aux_scale);
    glob.balance().reset();
    std::vector<double> yg, ym;
    const AuxLosses ag = run_forward(glob, b, yg);
    const AuxLosses am = run_forward(micro, b, ym);
    CHECK(rel_diff(yg, ym) < 1e-12);
    CHECK(ag.lbl == doctest::Approx(am.lbl).epsilon(1e-12));
    CHECK(ag.zloss == doctest::Approx(am.zloss).epsilon(1e-12));
    CHECK(ag.lbl == doctest::Approx(r.lbl).epsilon(1e-12));
    check_same(run_backward(glob, b, aux_scale), run_backward(micro, b, aux_scale), 1e-12);
  }
}

TEST_CASE_TEMPLATE("GlobalBatch buffers counts over micro-batches; f from the buffer, P local", P, Pair<false>,
                   Pair<true>) {
  const refpp::Cfg rc = ref_cfg(P::sigmoid);
  const int E = rc.E();
  std::mt19937_64 g(23);
  const refpp::Weights w = refpp::random_weights(rc, g, true);
  const int sizes[3] = {5, 9, 7};
  std::vector<Batch> batches;
  for (int T : sizes) batches.push_back(make_batch(rc, T, g));

  typename P::Global glob(to_config(rc, 0.3));
  load(glob, rc, w);
  int calls = 0;
  glob.balance().set_all_reduce([&](std::int64_t*, std::size_t) { ++calls; });  // one rank: leaves the data alone

  std::vector<std::int64_t> buffer(E, 0);
  std::int64_t tokens = 0;
  bool differs_from_micro = false;
  for (int j = 0; j < 3; ++j) {
    CAPTURE(j);
    const Batch& b = batches[j];
    // This micro-batch alone, through a MicroBatch layer with the same weights.
    typename P::Micro micro(to_config(rc, 0.3));
    load(micro, rc, w);
    std::vector<double> ym, yg;
    const AuxLosses am = run_forward(micro, b, ym);
    const refpp::Out local = refpp::forward(rc, b.x, w, b.T, &b.prev);
    REQUIRE(micro.routed_counts().size() == size_t(E));
    std::int64_t routed_sum = 0;
    for (int e = 0; e < E; ++e) {
      CHECK(micro.routed_counts()[e] == local.routed[e]);
      buffer[e] += micro.routed_counts()[e];
      routed_sum += micro.routed_counts()[e];
    }
    CHECK(routed_sum == std::int64_t(b.T) * rc.K);  // pre-capacity: every slot counts
    tokens += b.T;

    const AuxLosses ag = run_forward(glob, b, yg);
    CHECK(calls == j + 1);  // one all-reduce per forward
    CHECK(glob.balance().counts() == buffer);
    CHECK(glob.balance().tokens() == tokens);
    CHECK(rel_diff(yg, ym) < 1e-12);  // the scope changes the loss, not the output
    CHECK(ag.zloss == doctest::Approx(am.zloss).epsilon(1e-12));
    const double expect = lbl_by_hand(rc, buffer, tokens, local, b.T);
    CHECK(ag.lbl == doctest::Approx(expect).epsilon(1e-12));
    CHECK(ag.lbl == doctest::Approx(refpp::forward(rc, b.x, w, b.T, &b.prev, &buffer, tokens).lbl).epsilon(1e-12));
    if (j > 0 && std::abs(ag.lbl - am.lbl) > 1e-6) differs_from_micro = true;

    run_backward(glob, b, 1.0 / 3);
    CHECK(calls == j + 1);  // backward does not all-reduce again
    CHECK(glob.balance().counts() == buffer);
    CHECK(glob.balance().tokens() == tokens);
  }
  CHECK(differs_from_micro);  // otherwise this test could not tell the scopes apart

  SUBCASE("reset() empties the buffer") {
    glob.balance().reset();
    CHECK(glob.balance().tokens() == 0);
    for (auto c : glob.balance().counts()) CHECK(c == 0);
    // The next micro-batch starts a new step: the same as MicroBatch again.
    typename P::Micro micro(to_config(rc, 0.3));
    load(micro, rc, w);
    std::vector<double> y;
    const AuxLosses am = run_forward(micro, batches[1], y);
    const AuxLosses ag = run_forward(glob, batches[1], y);
    CHECK(ag.lbl == doctest::Approx(am.lbl).epsilon(1e-12));
    CHECK(glob.balance().tokens() == batches[1].T);
    std::vector<std::int64_t> routed(micro.routed_counts().begin(), micro.routed_counts().end());
    CHECK(glob.balance().counts() == routed);
  }
}

TEST_CASE("GlobalBatch all-reduce hook: a second rank's counts change f") {
  const refpp::Cfg rc = ref_cfg(false);
  const int E = rc.E();
  std::mt19937_64 g(37);
  const refpp::Weights w = refpp::random_weights(rc, g, true);
  const Batch b = make_batch(rc, 11, g), other = make_batch(rc, 6, g);
  const refpp::Out local = refpp::forward(rc, b.x, w, b.T, &b.prev);
  const refpp::Out other_out = refpp::forward(rc, other.x, w, other.T, &other.prev);

  SUBCASE("doubling, as if a second identical rank: buffer doubles, f and the LBL do not change") {
    Pair<false>::Global glob(to_config(rc, 0.3));
    load(glob, rc, w);
    int calls = 0;
    glob.balance().set_all_reduce([&](std::int64_t* data, std::size_t n) {
      ++calls;
      for (std::size_t i = 0; i < n; ++i) data[i] *= 2;
    });
    std::vector<double> y;
    const AuxLosses a = run_forward(glob, b, y);
    CHECK(calls == 1);
    for (int e = 0; e < E; ++e) CHECK(glob.balance().counts()[e] == 2 * local.routed[e]);
    CHECK(glob.balance().tokens() == 2 * b.T);
    CHECK(a.lbl == doctest::Approx(local.lbl).epsilon(1e-12));
  }

  SUBCASE("a rank with other tokens") {
    Pair<false>::Global glob(to_config(rc, 0.3));
    load(glob, rc, w);
    int calls = 0;
    glob.balance().set_all_reduce(OtherRank{other_out.routed, other.T, &calls});
    std::vector<double> y;
    const AuxLosses a = run_forward(glob, b, y);
    CHECK(calls == 1);
    std::vector<std::int64_t> sum(E);
    for (int e = 0; e < E; ++e) sum[e] = local.routed[e] + other_out.routed[e];
    CHECK(glob.balance().counts() == sum);
    CHECK(glob.balance().tokens() == b.T + other.T);
    const double expect = lbl_by_hand(rc, sum, b.T + other.T, local, b.T);
    CHECK(a.lbl == doctest::Approx(expect).epsilon(1e-12));
    CHECK(std::abs(expect - local.lbl) > 1e-4);  // the other rank must actually move f
  }
}

// Finite differences of L = sum(y dy) + aux_scale (lbl_coef LBL + zloss_coef zloss) + sum(logits dln) with
// f_i from the buffer. Each evaluation resets the buffer, and a hook adds a simulated second rank's counts,
// so f stays fixed while the routing does not change (f carries no gradient, P does). Then the gradient of
// a third micro-batch after two buffered ones equals that of a layer whose hook adds those two.
TEST_CASE_TEMPLATE("GlobalBatch gradients use the buffered f (fp64 finite differences)", P, Pair<false>, Pair<true>) {
  const refpp::Cfg rc = ref_cfg(P::sigmoid);
  const int E = rc.E();
  std::mt19937_64 g(41);
  const refpp::Weights w = refpp::random_weights(rc, g, true);
  const Batch b1 = make_batch(rc, 8, g), b2 = make_batch(rc, 10, g), b3 = make_batch(rc, 9, g);
  const refpp::Out o1 = refpp::forward(rc, b1.x, w, b1.T, &b1.prev), o2 = refpp::forward(rc, b2.x, w, b2.T, &b2.prev);
  OtherRank earlier{std::vector<std::int64_t>(E), b1.T + b2.T, nullptr};
  for (int e = 0; e < E; ++e) earlier.counts[e] = o1.routed[e] + o2.routed[e];
  const double lbl_coef = 1.0, aux_scale = 0.8;

  typename P::Global layer(to_config(rc, lbl_coef));
  load(layer, rc, w);
  layer.balance().set_all_reduce(earlier);
  Batch b = b3;
  auto loss = [&](std::vector<int>* idx, std::vector<char>* kept) {
    layer.balance().reset();
    std::vector<double> y;
    const AuxLosses a = run_forward(layer, b, y);
    const auto& c = layer.config();
    double l = aux_scale * (c.lbl_coef * a.lbl + c.zloss_coef * a.zloss);
    for (size_t i = 0; i < y.size(); ++i) l += y[i] * b.dy[i];
    for (size_t i = 0; i < b.dln.size(); ++i) l += layer.logits().data[i] * b.dln[i];
    idx->assign(layer.topk_indices().data, layer.topk_indices().data + b.T * rc.K);
    kept->clear();
    for (int s = 0; s < b.T * rc.K; ++s) kept->push_back(layer.slot_kept(s / rc.K, s % rc.K));
    return l;
  };
  std::vector<int> idx0;
  std::vector<char> kept0;
  loss(&idx0, &kept0);
  const Grads analytic = run_backward(layer, b, aux_scale);

  int checked = 0, skipped = 0;
  const double eps = 1e-6;
  auto probe = [&](double* v, double an, const std::string& what, size_t i) {
    const double keep = *v;
    std::vector<int> ia, ib;
    std::vector<char> ka, kb;
    *v = keep + eps;
    const double lp = loss(&ia, &ka);
    *v = keep - eps;
    const double lm = loss(&ib, &kb);
    *v = keep;
    if (ia != idx0 || ib != idx0 || ka != kept0 || kb != kept0) {
      ++skipped;
      return;
    }
    const double numeric = (lp - lm) / (2 * eps);
    INFO(what << "[" << i << "] analytic " << an << " numeric " << numeric);
    CHECK(std::abs(an - numeric) <= 1e-6 + 1e-5 * std::abs(numeric));
    ++checked;
  };
  for (size_t i = 0; i < b.x.size(); ++i) probe(&b.x[i], analytic.dx[i], "x", i);
  for (size_t i = 0; i < b.prev.size(); ++i) probe(&b.prev[i], analytic.dprev[i], "prev_logits", i);
  {
    size_t k = 0;
    for (auto& prm : layer.parameters()) {
      // Only the router path carries the LBL; probe it and the constant experts fully, the FFN weights
      // in part (their gradients do not depend on the balance scope).
      const bool router_path = prm.name == "gate.weight" || prm.name == "gate_residual.weight";
      const std::int64_t step = router_path || prm.name.rfind("constant.", 0) == 0 ? 1 : 7;
      for (std::int64_t i = 0; i < prm.numel(); i += step) probe(&prm.value[i], analytic.params[k][size_t(i)], prm.name, size_t(i));
      ++k;
    }
  }
  INFO("checked " << checked << " skipped " << skipped);
  CHECK(checked > 10 * skipped);
  CHECK(checked > 250);

  // The same gradient from a real sequence of micro-batches: b1, b2 buffered, then b3.
  typename P::Global seq(to_config(rc, lbl_coef));
  load(seq, rc, w);
  std::vector<double> y;
  run_forward(seq, b1, y);
  run_forward(seq, b2, y);
  run_forward(seq, b3, y);
  CHECK(seq.balance().tokens() == b1.T + b2.T + b3.T);
  layer.balance().reset();
  run_forward(layer, b3, y);
  check_same(run_backward(seq, b3, aux_scale), run_backward(layer, b3, aux_scale), 1e-12);
  // ... and it is not the MicroBatch gradient (f differs), or this test would prove nothing.
  typename P::Micro micro(to_config(rc, lbl_coef));
  load(micro, rc, w);
  run_forward(micro, b3, y);
  const Grads gm = run_backward(micro, b3, aux_scale);
  size_t gate = 0;
  while (layer.parameters()[gate].name != "gate.weight") ++gate;
  CHECK(rel_diff(gm.params[gate], analytic.params[gate]) > 1e-6);
}

TEST_CASE_TEMPLATE("GlobalBatch in evaluation mode leaves the buffer alone and uses local counts", P, Pair<false>,
                   Pair<true>) {
  const refpp::Cfg rc = ref_cfg(P::sigmoid);
  std::mt19937_64 g(31);
  const refpp::Weights w = refpp::random_weights(rc, g, true);
  const Batch train = make_batch(rc, 8, g), heldout = make_batch(rc, 11, g);
  typename P::Global glob(to_config(rc, 0.3));
  typename P::Micro micro(to_config(rc, 0.3));
  load(glob, rc, w);
  load(micro, rc, w);
  std::vector<double> y;
  run_forward(glob, train, y);
  const std::vector<std::int64_t> buffered = glob.balance().counts();
  CHECK(glob.training());
  glob.set_training(false);
  const AuxLosses ae = run_forward(glob, heldout, y);
  CHECK(glob.balance().counts() == buffered);  // the step's buffer is untouched
  CHECK(glob.balance().tokens() == train.T);
  CHECK(ae.lbl == doctest::Approx(run_forward(micro, heldout, y).lbl).epsilon(1e-12));  // f from its own counts
  glob.set_training(true);
  run_forward(glob, heldout, y);
  CHECK(glob.balance().tokens() == train.T + heldout.T);  // training mode accumulates again
}
