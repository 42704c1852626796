// nn/cuda/ against nn/ (the host modules, the oracle): Embedding, RMSNorm, Linear,
// CausalSelfAttention (MHA, GQA, MQA; rotary positions inside it) and cross-entropy, forward and
// backward, at odd sizes, in fp32 (‖out − ref‖/‖ref‖ ≤ 1e-5) and bf16 (≤ 1e-2; the host runs on the
// bf16-rounded inputs and weights). The bf16 attention gradients get 2e-2: the device stores q, k, v,
// P and the attention output in bf16 between its GEMMs (about six roundings of 2^-9 each that the
// host does not make), which puts their expected error near 1e-2 already.
// Device outputs are poisoned (0xFF: NaN) before each call, so an element left unwritten fails.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <moekit/nn/attention.hpp>
#include <moekit/nn/cross_entropy.hpp>
#include <moekit/nn/cuda/attention.cuh>
#include <moekit/nn/cuda/cross_entropy.cuh>
#include <moekit/nn/cuda/embedding.cuh>
#include <moekit/nn/cuda/rms_norm.cuh>
#include <moekit/nn/embedding.hpp>
#include <moekit/nn/linear.hpp>
#include <moekit/nn/rms_norm.hpp>
#include <string>
#include <type_traits>
#include <vector>

#include "../common/compare.hpp"
#include "../common/random.hpp"
#include "device_buffer.cuh"

namespace {

namespace mc = moekit::backend::cuda;
namespace ncu = moekit::nn::cuda;
using moekit::MatrixView;
using moekit_test::rel_err;

template <class T>
constexpr double tolerance() {
  return std::is_same_v<T, float> ? 1e-5 : 1e-2;
}

template <class T>
constexpr double attention_grad_tolerance() {
  return std::is_same_v<T, float> ? 1e-5 : 2e-2;
}

template <class S>
std::vector<float> rounded(std::vector<float> v) {
  for (auto& x : v) x = mc::storage_to_float(mc::storage_from_float<S>(x));
  return v;
}
template <class S>
void round_in_place(float* p, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) p[i] = mc::storage_to_float(mc::storage_from_float<S>(p[i]));
}
template <class S>
void upload(DeviceBuffer<S>& d, const std::vector<float>& v) {
  REQUIRE(d.n == v.size());
  mc::upload_as<S>(v.data(), v.size(), d.p);
}
template <class S>
std::vector<float> download(const DeviceBuffer<S>& d) {
  MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<float> h(d.n);
  mc::download_as<S>(d.p, d.n, h.data());
  return h;
}
template <class U>
std::vector<float> as_vector(const U* p, std::int64_t n) {
  return std::vector<float>(p, p + n);
}

struct Fixture {
  ncu::Blas blas;
  ncu::Context ctx{nullptr, blas.get()};
};

}  // namespace

TEST_CASE_TEMPLATE("nn::cuda::Embedding matches nn::Embedding; the backward is the same bits twice", T, float, moekit::bf16) {
  using S = mc::storage_t<T>;
  Fixture f;
  for (const std::int64_t d : {std::int64_t(19), std::int64_t(131)}) {  // 131: two column blocks of 128
    CAPTURE(d);
    const std::int64_t vocab = 37, rows = 53;
    moekit::nn::Embedding<float> host(vocab, d);
    host.init_params(3);
    round_in_place<S>(host.weight(), vocab * d);
    ncu::Embedding<T> dev(vocab, d);
    dev.load(host);
    std::vector<std::int32_t> ids(rows);
    for (std::int64_t t = 0; t < rows; ++t) ids[t] = std::int32_t((t * 7 + t * t) % 11);  // repeats, and rows never used
    ids[5] = 36;
    ncu::check_ids(ids.data(), rows, vocab);
    DeviceBuffer<std::int32_t> dids(rows);
    dids.upload(ids);
    DeviceBuffer<S> out(rows * d), dout(rows * d);
    out.poison();
    dev.forward(f.ctx, dids.p, rows, out.p);
    std::vector<float> ref(rows * d);
    host.forward(moekit::VectorView<const std::int32_t>(ids.data(), {rows}), MatrixView<float>(ref.data(), {rows, d}));
    CHECK(rel_err(download(out), ref) == 0.0);  // a copy: exact

    const auto g = rounded<S>(moekit_test::random_vec(std::size_t(rows * d), 5u));
    upload(dout, g);
    dev.backward(f.ctx, dids.p, dout.p, rows);
    host.backward(moekit::VectorView<const std::int32_t>(ids.data(), {rows}), MatrixView<const float>(g.data(), {rows, d}));
    const auto grad = dev.weight().download_grad();
    CHECK(rel_err(grad, as_vector(host.grad(), vocab * d)) <= tolerance<float>());  // fp32 sums of the same values
    dev.zero_grad(nullptr);
    dev.backward(f.ctx, dids.p, dout.p, rows);
    CHECK(dev.weight().download_grad() == grad);
    // Into a gradient that is not zero: it accumulates, as the host's does.
    dev.backward(f.ctx, dids.p, dout.p, rows);
    host.backward(moekit::VectorView<const std::int32_t>(ids.data(), {rows}), MatrixView<const float>(g.data(), {rows, d}));
    CHECK(rel_err(dev.weight().download_grad(), as_vector(host.grad(), vocab * d)) <= tolerance<float>());

    std::vector<std::int32_t> bad = ids;
    bad[9] = 37;
    CHECK_THROWS_AS(ncu::check_ids(bad.data(), rows, vocab), moekit::ShapeError);
  }
}

TEST_CASE_TEMPLATE("nn::cuda::RMSNorm matches nn::RMSNorm", T, float, moekit::bf16) {
  using S = mc::storage_t<T>;
  Fixture f;
  for (const std::int64_t d : {std::int64_t(70), std::int64_t(5), std::int64_t(129)}) {
    CAPTURE(d);
    const std::int64_t rows = 131;  // three partial-sum chunks, the last one short
    moekit::nn::RMSNorm<float> host(d);
    auto w = rounded<S>(moekit_test::random_vec(std::size_t(d), 7u));
    std::copy(w.begin(), w.end(), host.weight());
    ncu::RMSNorm<T> dev(d);
    dev.load(host);
    const auto x = rounded<S>(moekit_test::random_vec(std::size_t(rows * d), 8u));
    const auto dy = rounded<S>(moekit_test::random_vec(std::size_t(rows * d), 9u));
    DeviceBuffer<S> dx_in(rows * d), ddy(rows * d), y(rows * d), dx(rows * d);
    upload(dx_in, x), upload(ddy, dy);
    y.poison(), dx.poison();
    dev.forward(f.ctx, dx_in.p, rows, y.p);
    dev.backward(f.ctx, dx_in.p, ddy.p, rows, dx.p);
    std::vector<float> yr(rows * d), dxr(rows * d);
    host.forward(MatrixView<const float>(x.data(), {rows, d}), MatrixView<float>(yr.data(), {rows, d}));
    host.backward(MatrixView<const float>(x.data(), {rows, d}), MatrixView<const float>(dy.data(), {rows, d}),
                  MatrixView<float>(dxr.data(), {rows, d}));
    CHECK(rel_err(download(y), yr) <= tolerance<T>());
    CHECK(rel_err(download(dx), dxr) <= tolerance<T>());
    CHECK(rel_err(dev.weight().download_grad(), as_vector(host.grad(), d)) <= tolerance<T>());
    dev.forward(f.ctx, dx_in.p, rows, dx_in.p);  // in place (y aliases x), as the module allows
    CHECK(download(dx_in) == download(y));
  }
}

TEST_CASE_TEMPLATE("nn::cuda::Linear matches nn::Linear (forward, dW accumulated, dx)", T, float, moekit::bf16) {
  using S = mc::storage_t<T>;
  Fixture f;
  const std::int64_t rows = 33, in = 27, out = 41;
  moekit::nn::Linear<float> host(in, out, false);
  host.init_params(11);
  round_in_place<S>(host.weight(), in * out);
  ncu::Linear<T> dev(in, out);
  dev.load(host);
  const auto x = rounded<S>(moekit_test::random_vec(std::size_t(rows * in), 12u));
  const auto dy = rounded<S>(moekit_test::random_vec(std::size_t(rows * out), 13u));
  DeviceBuffer<S> dxin(rows * in), ddy(rows * out), y(rows * out), dx(rows * in);
  upload(dxin, x), upload(ddy, dy);
  y.poison(), dx.poison();
  dev.forward(f.ctx, dxin.p, rows, y.p);
  for (int rep = 0; rep < 2; ++rep) dev.backward(f.ctx, dxin.p, ddy.p, rows, dx.p);  // dW accumulates
  std::vector<float> yr(rows * out), dxr(rows * in);
  host.forward(MatrixView<const float>(x.data(), {rows, in}), MatrixView<float>(yr.data(), {rows, out}));
  for (int rep = 0; rep < 2; ++rep)
    host.backward(MatrixView<const float>(x.data(), {rows, in}), MatrixView<const float>(dy.data(), {rows, out}),
                  MatrixView<float>(dxr.data(), {rows, in}));
  CHECK(rel_err(download(y), yr) <= tolerance<T>());
  CHECK(rel_err(download(dx), dxr) <= tolerance<T>());
  CHECK(rel_err(dev.weight().download_grad(), as_vector(host.weight_grad(), in * out)) <= tolerance<float>());
  CHECK_THROWS_AS(ncu::linear_forward(f.ctx, dxin.p, dev.weight().value(), std::int64_t(1) << 31, in, out, y.p), moekit::ShapeError);
}

TEST_CASE_TEMPLATE("nn::cuda::CausalSelfAttention matches nn::CausalSelfAttention (MHA, GQA, MQA)", T, float, moekit::bf16) {
  using S = mc::storage_t<T>;
  Fixture f;
  struct Shape {
    std::int64_t d, heads, kv, batch, seq, max_seq;
  };
  for (const Shape s : {Shape{24, 4, 2, 3, 7, 9}, Shape{16, 2, 2, 2, 33, 40}, Shape{36, 3, 1, 1, 5, 5}, Shape{8, 2, 1, 4, 1, 3}}) {
    CAPTURE(s.heads);
    CAPTURE(s.kv);
    CAPTURE(s.seq);
    const std::int64_t rows = s.batch * s.seq, d = s.d;
    moekit::nn::CausalSelfAttention<float> host(d, s.heads, s.kv, s.max_seq);
    host.init_params(21, 0.7);
    round_in_place<S>(host.qkv_proj().weight(), host.qkv_proj().in_features() * host.qkv_proj().out_features());
    round_in_place<S>(host.o_proj().weight(), host.o_proj().in_features() * host.o_proj().out_features());
    ncu::CausalSelfAttention<T> dev(d, s.heads, s.kv, s.max_seq);
    dev.load(host);
    auto x = rounded<S>(moekit_test::random_vec(std::size_t(rows * d), 22u));
    auto dy = rounded<S>(moekit_test::random_vec(std::size_t(rows * d), 23u));
    DeviceBuffer<S> dxin(rows * d), ddy(rows * d), y(rows * d), dx(rows * d);
    upload(dxin, x), upload(ddy, dy);
    y.poison(), dx.poison();
    dev.forward(f.ctx, dxin.p, rows, s.seq, y.p);
    dev.backward(f.ctx, dxin.p, ddy.p, rows, dx.p);
    std::vector<float> yr(rows * d), dxr(rows * d);
    host.forward(MatrixView<const float>(x.data(), {rows, d}), s.seq, MatrixView<float>(yr.data(), {rows, d}));
    host.backward(MatrixView<const float>(x.data(), {rows, d}), MatrixView<const float>(dy.data(), {rows, d}),
                  MatrixView<float>(dxr.data(), {rows, d}));
    CHECK(rel_err(download(y), yr) <= tolerance<T>());
    CHECK(rel_err(download(dx), dxr) <= attention_grad_tolerance<T>());
    MESSAGE("attention ", (std::is_same_v<T, float> ? "fp32" : "bf16"), " seq ", s.seq, ": y ", rel_err(download(y), yr), ", dx ",
            rel_err(download(dx), dxr));
    auto& hq = host.qkv_proj();
    auto& ho = host.o_proj();
    CHECK(rel_err(dev.qkv_proj().weight().download_grad(), as_vector(hq.weight_grad(), hq.in_features() * hq.out_features())) <=
          attention_grad_tolerance<T>());
    CHECK(rel_err(dev.o_proj().weight().download_grad(), as_vector(ho.weight_grad(), ho.in_features() * ho.out_features())) <=
          attention_grad_tolerance<T>());
  }
  {  // One module, a short batch and then a longer one (its buffers grow), the backward twice (dW adds up).
    const std::int64_t d = 24, heads = 4, kv = 2, max_seq = 12;
    moekit::nn::CausalSelfAttention<float> host(d, heads, kv, max_seq);
    host.init_params(31, 0.7);
    round_in_place<S>(host.qkv_proj().weight(), host.qkv_proj().in_features() * host.qkv_proj().out_features());
    round_in_place<S>(host.o_proj().weight(), host.o_proj().in_features() * host.o_proj().out_features());
    ncu::CausalSelfAttention<T> dev(d, heads, kv, max_seq);
    dev.load(host);
    for (const std::int64_t seq : {std::int64_t(3), std::int64_t(11)}) {
      CAPTURE(seq);
      const std::int64_t rows = 5 * seq;
      const auto x = rounded<S>(moekit_test::random_vec(std::size_t(rows * d), 32u));
      const auto dy = rounded<S>(moekit_test::random_vec(std::size_t(rows * d), 33u));
      DeviceBuffer<S> dxin(rows * d), ddy(rows * d), y(rows * d), dx(rows * d);
      upload(dxin, x), upload(ddy, dy);
      y.poison(), dx.poison();
      dev.forward(f.ctx, dxin.p, rows, seq, y.p);
      std::vector<float> yr(rows * d), dxr(rows * d);
      host.forward(MatrixView<const float>(x.data(), {rows, d}), seq, MatrixView<float>(yr.data(), {rows, d}));
      for (int rep = 0; rep < 2; ++rep) {
        dev.backward(f.ctx, dxin.p, ddy.p, rows, dx.p);
        host.backward(MatrixView<const float>(x.data(), {rows, d}), MatrixView<const float>(dy.data(), {rows, d}),
                      MatrixView<float>(dxr.data(), {rows, d}));
      }
      CHECK(rel_err(download(y), yr) <= tolerance<T>());
      CHECK(rel_err(download(dx), dxr) <= attention_grad_tolerance<T>());
      auto& hq = host.qkv_proj();
      CHECK(rel_err(dev.qkv_proj().weight().download_grad(), as_vector(hq.weight_grad(), hq.in_features() * hq.out_features())) <=
            attention_grad_tolerance<T>());
    }
  }
  ncu::CausalSelfAttention<T> dev(16, 2, 1, 4);
  DeviceBuffer<S> x(5 * 16), y(5 * 16);
  CHECK_THROWS_AS(dev.forward(f.ctx, x.p, 5, 5, y.p), moekit::ShapeError);  // seq > max_seq
  CHECK_THROWS_AS(dev.forward(f.ctx, x.p, 5, 2, y.p), moekit::ShapeError);  // rows not a multiple of seq
  CHECK_THROWS_AS(dev.backward(f.ctx, x.p, y.p, 5, y.p), moekit::ShapeError);  // no forward
  CHECK_THROWS_AS(ncu::CausalSelfAttention<T>(16, 3, 1, 4), moekit::ConfigError);  // d_model % heads
}

TEST_CASE_TEMPLATE("nn::cuda::CrossEntropy matches nn::softmax_cross_entropy", T, float, moekit::bf16) {
  using S = mc::storage_t<T>;
  Fixture f;
  const std::int64_t rows = 29, vocab = 300;  // vocab > the block's 256 threads
  auto logits = moekit_test::random_vec(std::size_t(rows * vocab), 31u);
  for (auto& z : logits) z *= 4.f;
  logits = rounded<S>(logits);
  std::vector<std::int32_t> targets(rows);
  for (std::int64_t t = 0; t < rows; ++t) targets[t] = std::int32_t((t * 37) % vocab);
  DeviceBuffer<S> dl(rows * vocab), dg(rows * vocab);
  DeviceBuffer<std::int32_t> dt(rows);
  upload(dl, logits);
  dt.upload(targets);
  dg.poison();
  ncu::CrossEntropy<T> ce;
  const double loss = ce(f.ctx, dl.p, dt.p, rows, vocab, dg.p, 0.5);
  std::vector<float> gref(rows * vocab);
  const double ref = moekit::nn::softmax_cross_entropy<float>(MatrixView<const float>(logits.data(), {rows, vocab}),
                                                              moekit::VectorView<const std::int32_t>(targets.data(), {rows}),
                                                              MatrixView<float>(gref.data(), {rows, vocab}), {}, 0.5);
  CHECK(std::abs(loss - ref) <= 1e-5 * std::abs(ref));  // fp32 math on the same (rounded) logits
  CHECK(rel_err(download(dg), gref) <= tolerance<T>());
  CHECK(ce(f.ctx, dl.p, dt.p, rows, vocab) == loss);  // forward only, the same bits

  targets[3] = std::int32_t(vocab);  // outside the vocabulary: NaN loss, NumericError
  dt.upload(targets);
  CHECK_THROWS_AS(ce(f.ctx, dl.p, dt.p, rows, vocab), moekit::NumericError);
}
