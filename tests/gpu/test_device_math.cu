// Device math = host math: the MOEKIT_HD router and activation functions run in a __global__ kernel and
// on the host (the same functor, compiled once by nvcc for both), on the same random inputs.
// fp32; values agree to 1e-5 relative (see `close`), top-k indices exactly.
// Without a CUDA device main returns 77, which ctest reports as skipped (SKIP_RETURN_CODE in
// tests/gpu/CMakeLists.txt); tests/common/gpu_probe.hpp says when it fails instead.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "../common/gpu_probe.hpp"
#include <moekit/experts/activation.hpp>
#include <moekit/router/topk.hpp>

namespace {


#define MOEKIT_TEST_CUDA(call)                                                                    \
  do {                                                                                            \
    const cudaError_t moekit_err_ = (call);                                                       \
    REQUIRE_MESSAGE(moekit_err_ == cudaSuccess, #call ": " << cudaGetErrorString(moekit_err_));  \
  } while (0)

// Owning device buffer; the tests poison it (all bytes 0xFF: NaN floats, -1 ints) before each run.
template <class T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(std::size_t n) : n_(n) {
    MOEKIT_TEST_CUDA(cudaMalloc(&p_, n * sizeof(T)));
    MOEKIT_TEST_CUDA(cudaMemset(p_, 0xFF, n * sizeof(T)));
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { cudaFree(p_); }
  T* get() const { return p_; }
  void upload(const std::vector<T>& h) {
    REQUIRE(h.size() == n_);
    MOEKIT_TEST_CUDA(cudaMemcpy(p_, h.data(), n_ * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> h(n_);
    MOEKIT_TEST_CUDA(cudaMemcpy(h.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }

 private:
  T* p_ = nullptr;
  std::size_t n_;
};

template <class T>
std::vector<T> poisoned(std::size_t n) {
  std::vector<T> v(n);
  std::memset(v.data(), 0xFF, n * sizeof(T));
  return v;
}

// The one kernel: a thin shim that applies a functor to each index (the host loops over the same one).
template <class Op>
__global__ void for_each_index(Op op, int count) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < count) op(i);
}

template <class Op>
void run_on_device(const Op& op, int count) {
  constexpr int kBlock = 128;
  for_each_index<<<(count + kBlock - 1) / kBlock, kBlock>>>(op, count);
  MOEKIT_TEST_CUDA(cudaGetLastError());
  MOEKIT_TEST_CUDA(cudaDeviceSynchronize());
}

template <class Op>
void run_on_host(const Op& op, int count) {
  for (int i = 0; i < count; ++i) op(i);
}

// |device - host| <= 1e-5 * max(|host|, floor). The floor is the scale of the terms a value is summed
// from, so a result that cancels to ~0 is compared at the precision its inputs had.
void check_close(const std::vector<float>& dev, const std::vector<float>& host, float floor, const char* what) {
  REQUIRE(dev.size() == host.size());
  constexpr float kRel = 1e-5f;
  std::size_t bad = 0, first = 0;
  for (std::size_t i = 0; i < dev.size(); ++i) {
    const float tol = kRel * std::max(std::fabs(host[i]), floor);
    if (!(std::fabs(dev[i] - host[i]) <= tol)) {  // also catches NaN (a poisoned value left unwritten)
      if (bad++ == 0) first = i;
    }
  }
  INFO(what << ": " << bad << " of " << dev.size() << " differ; first at " << first << ": device "
            << dev[first] << " host " << host[first]);
  CHECK(bad == 0);
}

// Forward + backward of the router for every token of a [tokens, n] batch of logits.
template <class Score>
struct RouteTokens {
  int n = 0, k = 0;
  bool renormalize = false;
  float zcoef = 0.f;
  const float* logit = nullptr;  // [tokens, n]
  const float* dgate = nullptr;  // [tokens, k]
  const float* dprob = nullptr;  // [tokens, n]
  float* prob = nullptr;         // [tokens, n]
  int* idx = nullptr;            // [tokens, k]
  float* gate = nullptr;         // [tokens, k]
  float* lse = nullptr;          // [tokens]
  float* ds = nullptr;           // [tokens, n] scratch
  float* dlogit = nullptr;       // [tokens, n]

  MOEKIT_HD void operator()(int t) const {
    const auto tn = static_cast<long>(t) * n, tk = static_cast<long>(t) * k;
    lse[t] = moekit::router::route_token(Score{}, logit + tn, n, k, renormalize, prob + tn, idx + tk, gate + tk);
    moekit::router::route_token_backward(Score{}, logit + tn, n, k, renormalize, prob + tn, idx + tk, gate + tk,
                                         dgate + tk, dprob + tn, zcoef, ds + tn, dlogit + tn);
  }
};

// act::apply and act::backward element-wise.
template <class Act>
struct ActivateElements {
  const float* h1 = nullptr;
  const float* h3 = nullptr;
  const float* da = nullptr;
  float* a = nullptr;
  float* dh1 = nullptr;
  float* dh3 = nullptr;

  MOEKIT_HD void operator()(int i) const {
    a[i] = moekit::act::apply(Act{}, h1[i], h3[i]);
    float g1 = 0.f, g3 = 0.f;  // non-gated activations leave dh3 alone: write 0 for them
    moekit::act::backward(Act{}, h1[i], h3[i], da[i], g1, g3);
    dh1[i] = g1;
    dh3[i] = g3;
  }
};

std::vector<float> normal_values(std::size_t count, float stddev, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.f, stddev);
  std::vector<float> v(count);
  for (auto& x : v) x = dist(rng);
  return v;
}

template <class Score>
void check_router(int tokens, int n, int k, bool renormalize, unsigned seed) {
  CAPTURE(tokens);
  CAPTURE(n);
  CAPTURE(k);
  CAPTURE(renormalize);
  INFO("score function: " << (std::is_same_v<Score, moekit::router::Softmax> ? "softmax" : "sigmoid"));
  std::mt19937 rng(seed);
  const auto tn = std::size_t(tokens) * n, tk = std::size_t(tokens) * k;
  const auto logit = normal_values(tn, 2.f, rng);
  const auto dgate = normal_values(tk, 1.f, rng);
  const auto dprob = normal_values(tn, 1.f / tokens, rng);
  const float zcoef = 1e-3f;

  // Host run on host buffers.
  auto h_prob = poisoned<float>(tn), h_gate = poisoned<float>(tk), h_lse = poisoned<float>(tokens);
  auto h_ds = poisoned<float>(tn), h_dlogit = poisoned<float>(tn);
  auto h_idx = poisoned<int>(tk);
  RouteTokens<Score> host_op{n, k, renormalize, zcoef, logit.data(), dgate.data(), dprob.data(), h_prob.data(),
                             h_idx.data(), h_gate.data(), h_lse.data(), h_ds.data(), h_dlogit.data()};
  run_on_host(host_op, tokens);

  // Device run of the same functor on device buffers.
  DeviceBuffer<float> d_logit(tn), d_dgate(tk), d_dprob(tn), d_prob(tn), d_gate(tk), d_lse(tokens), d_ds(tn),
      d_dlogit(tn);
  DeviceBuffer<int> d_idx(tk);
  d_logit.upload(logit);
  d_dgate.upload(dgate);
  d_dprob.upload(dprob);
  RouteTokens<Score> dev_op{n, k, renormalize, zcoef, d_logit.get(), d_dgate.get(), d_dprob.get(), d_prob.get(),
                            d_idx.get(), d_gate.get(), d_lse.get(), d_ds.get(), d_dlogit.get()};
  run_on_device(dev_op, tokens);

  const auto idx = d_idx.download();
  std::size_t idx_diff = 0;
  for (std::size_t i = 0; i < tk; ++i) idx_diff += idx[i] != h_idx[i];
  CHECK_MESSAGE(idx_diff == 0, "top-k indices differ in " << idx_diff << " of " << tk << " slots");
  // Probabilities and gates are in [0, 1]; 1/n is their scale.
  check_close(d_prob.download(), h_prob, 1.f / n, "prob");
  check_close(d_gate.download(), h_gate, 1.f / n, "gate");
  check_close(d_lse.download(), h_lse, 1.f, "logsumexp");
  // dlogit sums dgate (~1) times probabilities: floor at the probability scale.
  check_close(d_dlogit.download(), h_dlogit, 1.f / n, "dlogit");
}

template <class Act>
void check_activation(int count, unsigned seed) {
  std::mt19937 rng(seed);
  const auto h1 = normal_values(count, 3.f, rng), h3 = normal_values(count, 1.f, rng),
             da = normal_values(count, 1.f, rng);
  auto h_a = poisoned<float>(count), h_dh1 = poisoned<float>(count), h_dh3 = poisoned<float>(count);
  run_on_host(ActivateElements<Act>{h1.data(), h3.data(), da.data(), h_a.data(), h_dh1.data(), h_dh3.data()},
              count);

  DeviceBuffer<float> d_h1(count), d_h3(count), d_da(count), d_a(count), d_dh1(count), d_dh3(count);
  d_h1.upload(h1);
  d_h3.upload(h3);
  d_da.upload(da);
  run_on_device(ActivateElements<Act>{d_h1.get(), d_h3.get(), d_da.get(), d_a.get(), d_dh1.get(), d_dh3.get()},
                count);
  // Inputs are O(1): values that cancel to ~0 are compared at that scale.
  check_close(d_a.download(), h_a, 1.f, "apply");
  check_close(d_dh1.download(), h_dh1, 1.f, "backward dh1");
  check_close(d_dh3.download(), h_dh3, 1.f, "backward dh3");
}

}  // namespace

TEST_CASE("router::route_token forward and backward: device matches host") {
  using moekit::router::Sigmoid;
  using moekit::router::Softmax;
  struct Shape {
    int tokens, n, k;
  };
  // Small and odd expert counts, a DeepSeek-like 64/8, and a batch that is not a multiple of the block.
  // Small and odd expert counts, a DeepSeek-like 64/8, and batches that are not a multiple of the block.
  // (A plain loop, not SUBCASEs: doctest cannot tell apart subcases entered from a loop.)
  for (const Shape s : {Shape{257, 8, 2}, Shape{300, 13, 3}, Shape{129, 64, 8}}) {
    check_router<Softmax>(s.tokens, s.n, s.k, false, 1u + s.n);
    check_router<Softmax>(s.tokens, s.n, s.k, true, 2u + s.n);
    check_router<Sigmoid>(s.tokens, s.n, s.k, true, 3u + s.n);
  }
}

TEST_CASE("act::apply and act::backward: device matches host") {
  constexpr int kCount = 4099;
  SUBCASE("swiglu") { check_activation<moekit::act::SwiGLU>(kCount, 11u); }
  SUBCASE("gelu") { check_activation<moekit::act::GeLU>(kCount, 12u); }
  SUBCASE("relu") { check_activation<moekit::act::ReLU>(kCount, 13u); }
  SUBCASE("swiglu_oai") { check_activation<moekit::act::SwiGLUOai>(kCount, 14u); }
}

int main(int argc, char** argv) {
  // Run, skip (77) or fail: tests/common/gpu_probe.hpp (MOEKIT_REQUIRE_GPU=1, set by tools/device/run.sh,
  // makes "no device" a failure; a driver that cannot serve this runtime always is one).
  int driver = 0, runtime = 0, devices = 0;
  cudaDriverGetVersion(&driver);
  cudaRuntimeGetVersion(&runtime);
  const cudaError_t err = cudaGetDeviceCount(&devices);
  (void)cudaGetLastError();
  const moekit_test::GpuProbe probe = moekit_test::probe_gpu(driver, runtime, err == cudaSuccess, cudaGetErrorName(err), devices,
                                                             moekit_test::require_gpu());
  std::printf("moekit_gpu_tests: %s\n", probe.why.c_str());
  if (probe.action != moekit_test::GpuProbe::kRun) return probe.exit_code();
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess)
    std::printf("moekit_gpu_tests: device 0: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
  doctest::Context context(argc, argv);
  return context.run();
}
