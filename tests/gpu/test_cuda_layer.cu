// MoeLayer<backend::Cuda<float>> against the host backend (tests/gpu/layer_check.cuh): every router,
// expert set, balance scope, capacity mode and GEMM strategy; fp32 within 1e-5 relative. Also the
// errors a caller can provoke.
#include <limits>

#include "layer_check.cuh"

TEST_CASE("cuda layer fp32 equals the host layer") { layer_check::run_all<float>(); }

TEST_CASE("cuda layer: bad input gives a clear error") {
  using namespace moekit;
  using Layer = MoeLayer<backend::Cuda<float>, router::TopK<router::Softmax>, experts::Ffn<act::SwiGLU>>;
  MoeConfig cfg = layer_check::small_config(4, 2, RouterKind::kSoftmax, Activation::kSwiGLU);
  Layer layer(cfg);
  layer.init_params(1);
  const std::int64_t T = 8, D = cfg.d_model;
  DeviceBuffer<float> x(T * D), y(T * D);
  std::vector<float> hx(T * D, 0.5f);
  hx[3 * D + 1] = std::numeric_limits<float>::quiet_NaN();
  x.upload(hx);
  // No workspace yet: forward never allocates.
  CHECK_THROWS_AS(layer.forward(MatrixView<const float>(x.p, {T, D}), MatrixView<float>(y.p, {T, D})), ShapeError);
  layer.reserve(T);
  CHECK_THROWS_AS(layer.backward(MatrixView<const float>(y.p, {T, D}), MatrixView<float>(x.p, {T, D})), std::logic_error);
  try {
    layer.forward(MatrixView<const float>(x.p, {T, D}), MatrixView<float>(y.p, {T, D}));
    FAIL("a NaN input must throw");
  } catch (const NumericError& e) {
    CHECK(std::string(e.what()).find("token 3") != std::string::npos);
  }
  CHECK_THROWS_AS(layer.forward(MatrixView<const float>(x.p, {T, D - 1}), MatrixView<float>(y.p, {T, D})), ShapeError);
  MoeConfig wrong = cfg;
  wrong.activation = Activation::kGeLU;
  CHECK_THROWS_AS(Layer{wrong}, ConfigError);
  CHECK_THROWS_AS(backend::cuda::parse_gemm_strategy("fastest"), ConfigError);
}

TEST_CASE("cuda layer: caller-owned workspace gives the same bits as the layer's own") {
  using namespace moekit;
  using Layer = MoeLayer<backend::Cuda<float>, router::TopK<router::Softmax>, experts::Ffn<act::GeLU>>;
  MoeConfig cfg = layer_check::small_config(8, 2, RouterKind::kSoftmax, Activation::kGeLU);
  const std::int64_t T = 50, D = cfg.d_model;
  Layer own(cfg), ext(cfg);
  own.init_params(4), ext.init_params(4);
  own.reserve(T);
  const std::size_t bytes = ext.workspace_bytes(T);
  DeviceBuffer<char> ws(bytes + 256);
  CHECK_THROWS_AS(ext.attach_workspace(ws.p + 8, bytes, T), ShapeError);   // not 256-byte aligned
  CHECK_THROWS_AS(ext.attach_workspace(ws.p, bytes - 1, T), ShapeError);   // too small
  ext.attach_workspace(ws.p, bytes, T);
  std::mt19937 g(3);
  std::normal_distribution<float> nd;
  std::vector<float> hx(T * D);
  for (auto& v : hx) v = nd(g);
  DeviceBuffer<float> x(T * D), y1(T * D), y2(T * D);
  x.upload(hx);
  y1.poison(), y2.poison();
  own.forward(MatrixView<const float>(x.p, {T, D}), MatrixView<float>(y1.p, {T, D}));
  ext.forward(MatrixView<const float>(x.p, {T, D}), MatrixView<float>(y2.p, {T, D}));
  const auto a = y1.download(), b = y2.download();
  CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
  CHECK(std::isfinite(a[0]));
}

TEST_CASE("cuda layer: the launch layer returns a Status for each failure and the convenience layer's bits") {
  using namespace moekit;
  using Layer = MoeLayer<backend::Cuda<float>, router::TopK<router::Softmax>, experts::Ffn<act::GeLU>>;
  MoeConfig cfg = layer_check::small_config(8, 2, RouterKind::kSoftmax, Activation::kGeLU);
  MoeConfig wrong = cfg;
  wrong.activation = Activation::kSwiGLU;
  std::string why;
  CHECK(Layer::can_implement(cfg) == Status::kSuccess);
  CHECK(Layer::can_implement(wrong, &why) == Status::kInvalidConfig);
  CHECK(why.find("activation") != std::string::npos);
  const std::int64_t T = 40, D = cfg.d_model;
  Layer own(cfg), op(cfg);
  own.init_params(6), op.init_params(6);
  own.reserve(T);
  const std::size_t bytes = op.workspace_bytes(T);
  DeviceBuffer<char> ws(bytes + 256);
  CHECK(op.initialize(ws.p, bytes - 1, T) == Status::kWorkspaceTooSmall);
  CHECK(op.initialize(ws.p + 8, bytes, T) == Status::kInvalidArgument);  // not 256-byte aligned
  std::vector<float> hx(std::size_t(T * D));
  for (std::size_t i = 0; i < hx.size(); ++i) hx[i] = float(std::sin(0.37 * double(i)));
  DeviceBuffer<float> x(T * D), y1(T * D), y2(T * D), dx1(T * D), dx2(T * D);
  x.upload(hx);
  CHECK(op.run_backward(MatrixView<const float>(x.p, {T, D}), MatrixView<float>(dx2.p, {T, D})) == Status::kInvalidState);
  REQUIRE(op.initialize(ws.p, bytes, T) == Status::kSuccess);
  CHECK(op.run_forward(MatrixView<const float>(x.p, {T, D - 1}), MatrixView<float>(y2.p, {T, D})) == Status::kInvalidArgument);
  CHECK(op.last_error().find("x") != std::string::npos);
  AuxLosses a1 = own.forward(MatrixView<const float>(x.p, {T, D}), MatrixView<float>(y1.p, {T, D})), a2;
  REQUIRE(op.run_forward(MatrixView<const float>(x.p, {T, D}), MatrixView<float>(y2.p, {T, D}), {}, nullptr, &a2) == Status::kSuccess);
  CHECK(op.last_error().empty());
  CHECK(a1.lbl == a2.lbl);
  own.backward(MatrixView<const float>(y1.p, {T, D}), MatrixView<float>(dx1.p, {T, D}));
  REQUIRE(op.run_backward(MatrixView<const float>(y2.p, {T, D}), MatrixView<float>(dx2.p, {T, D})) == Status::kSuccess);
  const auto ya = y1.download(), yb = y2.download(), da = dx1.download(), db = dx2.download();
  CHECK(std::memcmp(ya.data(), yb.data(), ya.size() * sizeof(float)) == 0);
  CHECK(std::memcmp(da.data(), db.data(), da.size() * sizeof(float)) == 0);
  hx[5] = std::numeric_limits<float>::infinity();
  x.upload(hx);
  CHECK(op.run_forward(MatrixView<const float>(x.p, {T, D}), MatrixView<float>(y2.p, {T, D})) == Status::kNumericError);
}

// An out-of-memory that initialize() reports (injected: backend/cuda/memory.cuh's hook) is
// Status::kOutOfMemory, is cleared from CUDA's last error, and leaves the layer as it was: the saved
// forward still backs a backward, and the next forward runs on the old workspace with the same bits.
TEST_CASE("cuda layer: an allocation failure in initialize() spoils nothing") {
  using namespace moekit;
  using Layer = MoeLayer<backend::Cuda<float>, router::TopK<router::Softmax>, experts::Ffn<act::SwiGLU>>;
  MoeConfig cfg = layer_check::small_config(8, 2, RouterKind::kSoftmax, Activation::kSwiGLU);
  const std::int64_t T = 33, D = cfg.d_model;
  Layer layer(cfg);
  layer.init_params(5);
  REQUIRE(layer.initialize(nullptr, 0, T) == Status::kSuccess);
  std::vector<float> hx(std::size_t(T * D));
  for (std::size_t i = 0; i < hx.size(); ++i) hx[i] = float(std::cos(0.21 * double(i)));
  DeviceBuffer<float> x(T * D), y1(T * D), y2(T * D), dx(T * D);
  x.upload(hx);
  y1.poison(), y2.poison();
  REQUIRE(layer.run_forward(MatrixView<const float>(x.p, {T, D}), MatrixView<float>(y1.p, {T, D})) == Status::kSuccess);
  backend::cuda::testing::allocations_before_failure() = 0;
  const Status s = layer.initialize(nullptr, 0, 4 * T);  // a larger workspace: its allocation fails
  backend::cuda::testing::allocations_before_failure() = -1;
  CHECK(s == Status::kOutOfMemory);
  CHECK(layer.last_error().find("cudaErrorMemoryAllocation") != std::string::npos);
  CHECK(cudaPeekAtLastError() == cudaSuccess);
  CHECK(layer.reserved_tokens() == T);
  CHECK(layer.run_backward(MatrixView<const float>(x.p, {T, D}), MatrixView<float>(dx.p, {T, D})) == Status::kSuccess);
  REQUIRE(layer.run_forward(MatrixView<const float>(x.p, {T, D}), MatrixView<float>(y2.p, {T, D})) == Status::kSuccess);
  const auto a = y1.download(), b = y2.download();
  CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
  CHECK(std::isfinite(a[0]));
  // A real growth afterwards still works.
  REQUIRE(layer.initialize(nullptr, 0, 4 * T) == Status::kSuccess);
  CHECK(layer.reserved_tokens() == 4 * T);
}
