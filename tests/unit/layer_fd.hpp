#pragma once
// Central differences in double through a whole host layer: the policies' tests (test_router_policies,
// test_expert_policies) check every input and parameter element's gradient this way.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <moekit/moe_layer.hpp>

#include "../common/random.hpp"

namespace moekit::testing {

// n values from N(0, 1), the same for a seed on every platform's std::mt19937_64 (the inputs of the
// policies' tests).
inline std::vector<double> normal_vector(std::size_t n, unsigned seed) {
  std::mt19937_64 g(seed);
  return moekit_test::random_vec(n, g);
}

// L = Σ y·dy + lbl_coef·LBL + zloss_coef·zloss of one forward (idx: the routing it took).
// before_forward (optional): called before each forward (router replay sets its record there).
template <class Layer>
double layer_loss(Layer& layer, const std::vector<double>& x, const std::vector<double>& dy, std::vector<int>* idx,
                  const std::function<void(Layer&)>& before_forward = {}) {
  const MoeConfig& c = layer.config();
  if (before_forward) before_forward(layer);
  const std::int64_t tokens = std::int64_t(x.size()) / c.d_model;
  std::vector<double> y(x.size());
  const AuxLosses aux = layer.forward(MatrixView<const double>(x.data(), {tokens, c.d_model}), MatrixView<double>(y.data(), {tokens, c.d_model}));
  double l = c.lbl_coef * aux.lbl + c.zloss_coef * aux.zloss;
  for (std::size_t i = 0; i < y.size(); ++i) l += y[i] * dy[i];
  if (layer.routing() == Routing::kTokenChoice && layer.topk_gates().data) {
    idx->assign(layer.topk_indices().data, layer.topk_indices().data + tokens * c.top_k);
  } else {  // expert choice, a replayed record: the (token, expert) pairs taken
    const auto plan = layer.routing_plan();
    idx->clear();
    for (int s = 0; s < plan.layout.slots; ++s) idx->push_back(plan.layout.token(s) * int(c.num_experts()) + plan.expert[s]);
  }
  return l;
}

struct FdCount {
  int checked = 0, skipped = 0;
};

// Backward once, then central differences (eps 1e-6) on every element of x and of every parameter; a
// coordinate whose perturbation changes the routing is skipped and counted. Each checked one must meet
// |analytic − numeric| <= 1e-6 + 1e-5·|numeric|.
template <class Layer>
FdCount check_layer_gradients(Layer& layer, std::vector<double>& x, const std::vector<double>& dy,
                              const std::function<void(Layer&)>& before_forward = {}) {
  const MoeConfig& c = layer.config();
  const std::int64_t tokens = std::int64_t(x.size()) / c.d_model;
  std::vector<int> idx0;
  layer_loss(layer, x, dy, &idx0, before_forward);
  std::vector<double> dx(x.size());
  layer.zero_grad();
  layer.backward(MatrixView<const double>(dy.data(), {tokens, c.d_model}), MatrixView<double>(dx.data(), {tokens, c.d_model}));
  const double eps = 1e-6;
  FdCount n;
  auto probe = [&](double* v, double analytic, const std::string& what, std::size_t i) {
    const double keep = *v;
    std::vector<int> ia, ib;
    *v = keep + eps;
    const double lp = layer_loss(layer, x, dy, &ia, before_forward);
    *v = keep - eps;
    const double lm = layer_loss(layer, x, dy, &ib, before_forward);
    *v = keep;
    if (ia != idx0 || ib != idx0) {
      ++n.skipped;
      return;
    }
    const double numeric = (lp - lm) / (2 * eps);
    INFO(what << "[" << i << "] analytic " << analytic << " numeric " << numeric);
    CHECK(std::abs(analytic - numeric) <= 1e-6 + 1e-5 * std::abs(numeric));
    ++n.checked;
  };
  for (std::size_t i = 0; i < x.size(); ++i) probe(&x[i], dx[i], "x", i);
  for (auto& p : layer.parameters()) {
    const std::vector<double> grad(p.grad, p.grad + p.numel());
    for (std::int64_t i = 0; i < p.numel(); ++i) probe(&p.value[i], grad[std::size_t(i)], p.name, std::size_t(i));
  }
  return n;
}

}  // namespace moekit::testing
