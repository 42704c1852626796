#pragma once
// Expert GEMMs through cuBLAS (docs/design.md §6): one "phase" is a list of row-major problems
//   C_i = alpha · op(A_i) · op(B_i) + beta · C_i,   i over the experts that have rows,
// sharing transposes, types and scalars, differing in sizes and pointers. Three ways to run a phase:
//   kGrouped  one cublasGemmGroupedBatchedEx call (one group per expert; pointer arrays copied to the
//             device from pinned memory, asynchronously);
//   kStreams  one cublasGemmEx per expert, spread over side streams (fork/join with events), each
//             stream with its own handle (cuBLAS handles must not be shared across concurrent streams);
//   kLt       one cublasLtMatmul per expert on the same side streams, algorithm from Lt's heuristic
//             (cached per problem shape), with a preallocated workspace per stream.
// kAuto picks at construction: grouped for many experts (>= 16), streams otherwise. That rule is a
// placeholder until bench_moe_layer --gemm all has measured the three on a GPU (docs/cuda.md).
// Row-major problems are mapped to cuBLAS's column-major form as C^T = op(B)^T · op(A)^T.
// Every cuBLAS status is checked; failures throw moekit::CublasError naming the call (this is the
// convenience layer: the layer that owns handles and memory).
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <type_traits>
#include <vector>

#include "moekit/backend/cuda/memory.cuh"  // device_malloc, pinned_malloc
#include "moekit/backend/cuda/status.cuh"
#include "moekit/core/error.hpp"

namespace moekit {

class CublasError : public std::runtime_error {
 public:
  CublasError(cublasStatus_t s, const std::string& what) : std::runtime_error("moekit::CublasError: " + what), status_(s) {}
  cublasStatus_t status() const noexcept { return status_; }

 private:
  cublasStatus_t status_;
};

namespace backend::cuda {
inline void throw_on_cublas(cublasStatus_t s, const char* call, const char* file, int line) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw CublasError(s, std::string(call) + " failed at " + file + ":" + std::to_string(line) + ": " +
                             cublasGetStatusName(s) + " (" + cublasGetStatusString(s) + ")");
}
}  // namespace backend::cuda
}  // namespace moekit

#ifndef MOEKIT_CUBLAS_CHECK
#define MOEKIT_CUBLAS_CHECK(call) ::moekit::backend::cuda::throw_on_cublas((call), #call, __FILE__, __LINE__)
#endif

namespace moekit::backend::cuda {
inline namespace MOEKIT_CUDA_ABI {

enum class GemmStrategy { kAuto, kGrouped, kStreams, kLt };
inline const char* to_string(GemmStrategy s) {
  switch (s) {
    case GemmStrategy::kAuto: return "auto";
    case GemmStrategy::kGrouped: return "grouped";
    case GemmStrategy::kStreams: return "streams";
    case GemmStrategy::kLt: return "lt";
  }
  return "?";
}
inline GemmStrategy parse_gemm_strategy(const std::string& s) {
  if (s == "auto") return GemmStrategy::kAuto;
  if (s == "grouped") return GemmStrategy::kGrouped;
  if (s == "streams") return GemmStrategy::kStreams;
  if (s == "lt") return GemmStrategy::kLt;
  throw ConfigError("gemm", "\"" + s + "\"", "must be one of \"auto\", \"grouped\", \"streams\", \"lt\"");
}

template <class T>
constexpr cudaDataType_t data_type() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, __nv_bfloat16>, "data_type<T>: float or __nv_bfloat16");
  return std::is_same_v<T, float> ? CUDA_R_32F : CUDA_R_16BF;
}

// Shared by the problems of a phase (row-major terms).
struct GemmSpec {
  bool ta = false, tb = false;
  cudaDataType_t ab = CUDA_R_32F, c = CUDA_R_32F;  // A and B share a type; C may differ (bf16 x bf16 -> fp32)
  float alpha = 1.f, beta = 0.f;
};
struct GemmProblem {
  int m = 0, n = 0, k = 0;  // C [m, n], op(A) [m, k], op(B) [k, n], row-major
  const void* a = nullptr;
  int lda = 0;
  const void* b = nullptr;
  int ldb = 0;
  void* c = nullptr;
  int ldc = 0;
};

// How the phases of an ExpertGemm ran. Under kGrouped a phase goes to the per-expert streams path when
// the grouped call cannot take it, decided on the host before any pointer is copied:
//   by_type       A, B and C are not one of the grouped call's type combinations (cuBLAS documents
//                 fp32, fp16 and bf16 with C of the same type and fp32 compute: a bf16 x bf16 -> fp32
//                 weight gradient is not one), so every bf16 backward sends its dW phases here;
//   by_alignment  16-bit operands whose pointers or row pitch are not 16-byte aligned (expert rows start
//                 at any row offset): cuBLAS's pointer-array GEMMs document 16 bytes as the alignment
//                 that avoids misaligned accesses for 16-bit types;
//   refused       the grouped call returned NOT_SUPPORTED or INVALID_VALUE for a phase that passed both
//                 checks: not expected, so tests assert it stays 0.
// lt_no_algo counts kLt problems for which Lt's heuristic found no algorithm (run by cublasGemmEx).
struct GemmPathCounts {
  int grouped = 0;
  int by_type = 0;
  int by_alignment = 0;
  int refused = 0;
  int lt_no_algo = 0;
  int fallbacks() const { return by_type + by_alignment + refused + lt_no_algo; }
};

// The grouped call's type combinations (cublasGemmGroupedBatchedEx, CUBLAS_COMPUTE_32F).
inline bool grouped_supports_types(cudaDataType_t ab, cudaDataType_t c) {
  return ab == c && (ab == CUDA_R_32F || ab == CUDA_R_16F || ab == CUDA_R_16BF);
}
inline std::size_t type_bytes(cudaDataType_t t) { return t == CUDA_R_32F ? 4 : t == CUDA_R_64F ? 8 : 2; }
// Every operand of a 16-bit phase starts on a 16-byte boundary and keeps it from row to row.
inline bool grouped_aligned(const GemmSpec& spec, const std::vector<GemmProblem>& ps) {
  const auto ok = [](const void* p, int ld, std::size_t bytes) {
    return reinterpret_cast<std::uintptr_t>(p) % 16 == 0 && (std::size_t(ld) * bytes) % 16 == 0;
  };
  const std::size_t ab = type_bytes(spec.ab), c = type_bytes(spec.c);
  if (ab != 2 && c != 2) return true;
  for (const GemmProblem& p : ps)
    if (!ok(p.a, p.lda, ab) || !ok(p.b, p.ldb, ab) || !ok(p.c, p.ldc, c)) return false;
  return true;
}

// One row-major GEMM on the handle's stream (fp32 compute). For the dense GEMMs around the experts.
inline cublasStatus_t gemm_row_major(cublasHandle_t h, const GemmSpec& s, const GemmProblem& p) {
  if (p.m == 0 || p.n == 0) return CUBLAS_STATUS_SUCCESS;
  return cublasGemmEx(h, s.tb ? CUBLAS_OP_T : CUBLAS_OP_N, s.ta ? CUBLAS_OP_T : CUBLAS_OP_N, p.n, p.m, p.k, &s.alpha, p.b,
                      s.ab, p.ldb, p.a, s.ab, p.lda, &s.beta, p.c, s.c, p.ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}
// `batch` row-major GEMMs of one shape, problem i at a + i·stride_a, b + i·stride_b, c + i·stride_c
// (elements): attention's per-head products over the sequences of a batch.
inline cublasStatus_t gemm_strided_batched_row_major(cublasHandle_t h, const GemmSpec& s, const GemmProblem& p, long long stride_a,
                                                     long long stride_b, long long stride_c, int batch) {
  if (p.m == 0 || p.n == 0 || batch == 0) return CUBLAS_STATUS_SUCCESS;
  return cublasGemmStridedBatchedEx(h, s.tb ? CUBLAS_OP_T : CUBLAS_OP_N, s.ta ? CUBLAS_OP_T : CUBLAS_OP_N, p.n, p.m, p.k, &s.alpha,
                                    p.b, s.ab, p.ldb, stride_b, p.a, s.ab, p.lda, stride_a, &s.beta, p.c, s.c, p.ldc, stride_c, batch,
                                    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}

class ExpertGemm {
 public:
  // Pointer-array slots of the grouped call, used round-robin. A slot is rewritten only once the
  // grouped GEMM that last read it has run (an event per slot; the host waits on it only if not), so
  // any number of phases may be enqueued without a host synchronisation (the distributed backward's
  // recomputation reuses the forward's phases); 16 covers two whole steps in flight.
  static constexpr int kSlots = 16;
  static constexpr int kSideStreams = 4;
  static constexpr std::size_t kLtWorkspace = std::size_t(32) << 20;

  // max_problems: the most experts of one phase. Creates handles, streams and (for kGrouped / kLt) the
  // pointer arrays or Lt workspaces; nothing is allocated later.
  ExpertGemm(GemmStrategy strategy, int num_experts) : max_problems_(num_experts > 0 ? num_experts : 1) {
    strategy_ = strategy == GemmStrategy::kAuto ? (num_experts >= 16 ? GemmStrategy::kGrouped : GemmStrategy::kStreams)
                                                : strategy;
    try {
      create();
    } catch (...) {  // a failure part-way (no memory, no device): release what was made, then rethrow
      release();
      throw;
    }
  }
  ExpertGemm(const ExpertGemm&) = delete;
  ExpertGemm& operator=(const ExpertGemm&) = delete;
  ~ExpertGemm() { release(); }

  GemmStrategy strategy() const { return strategy_; }
  // Handles, streams and events made so far (the tests check a failed construction leaves none).
  static int live_objects() { return live_; }

 private:
  void create() {
    MOEKIT_CUBLAS_CHECK(cublasCreate(&main_));
    ++live_;
    // Streams are also the fallback of a grouped phase that cuBLAS does not support (see run()).
    for (int i = 0; i < kSideStreams; ++i) {
      MOEKIT_CUDA_CHECK(cudaStreamCreateWithFlags(&side_[i], cudaStreamNonBlocking));
      ++live_;
      MOEKIT_CUDA_CHECK(cudaEventCreateWithFlags(&done_[i], cudaEventDisableTiming));
      ++live_;
      MOEKIT_CUBLAS_CHECK(cublasCreate(&side_handle_[i]));
      ++live_;
      MOEKIT_CUBLAS_CHECK(cublasSetStream(side_handle_[i], side_[i]));
    }
    MOEKIT_CUDA_CHECK(cudaEventCreateWithFlags(&fork_, cudaEventDisableTiming));
    ++live_;
    for (auto& e : slot_done_) {
      MOEKIT_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
      ++live_;
    }
    const std::size_t ptrs = std::size_t(kSlots) * 3 * std::size_t(max_problems_);
    void* q = nullptr;
    MOEKIT_CUDA_CHECK(pinned_malloc(&q, ptrs * sizeof(void*)));
    host_ptrs_ = static_cast<void**>(q);
    MOEKIT_CUDA_CHECK(device_malloc(&q, ptrs * sizeof(void*)));
    dev_ptrs_ = static_cast<void**>(q);
    if (strategy_ == GemmStrategy::kLt) {
      MOEKIT_CUBLAS_CHECK(cublasLtCreate(&lt_));
      ++live_;
      for (auto& w : lt_workspace_) MOEKIT_CUDA_CHECK(device_malloc(&w, kLtWorkspace));
    }
  }
  // Never throws (statuses are ignored); safe on a partly made object: every member starts null.
  void release() noexcept {
    for (auto& [key, plan] : lt_plans_) destroy(plan);
    lt_plans_.clear();
    auto gone = [](auto& h, auto destroy_fn) {
      if (h) destroy_fn(h), --live_;
      h = nullptr;
    };
    gone(lt_, cublasLtDestroy);
    for (auto*& w : lt_workspace_) cudaFree(std::exchange(w, nullptr));
    cudaFree(std::exchange(dev_ptrs_, nullptr));
    cudaFreeHost(std::exchange(host_ptrs_, nullptr));
    gone(fork_, cudaEventDestroy);
    for (auto& e : slot_done_) gone(e, cudaEventDestroy);
    for (int i = 0; i < kSideStreams; ++i) {
      gone(side_handle_[i], cublasDestroy);
      gone(done_[i], cudaEventDestroy);
      gone(side_[i], cudaStreamDestroy);
    }
    gone(main_, cublasDestroy);
  }

 public:
  // The handle for single GEMMs on the caller's stream (router, constant experts).
  cublasHandle_t handle(cudaStream_t stream) {
    MOEKIT_CUBLAS_CHECK(cublasSetStream(main_, stream));
    return main_;
  }
  // How the phases ran (GemmPathCounts above); grouped_fallbacks() is their sum of the other paths.
  const GemmPathCounts& path_counts() const { return paths_; }
  int grouped_fallbacks() const { return paths_.fallbacks(); }

  // Runs one phase on `stream`. Problems with m == 0 or n == 0 must already be left out; k == 0
  // problems are valid (C = beta C). Needs no host synchronisation between phases (see kSlots).
  void run(const GemmSpec& spec, const std::vector<GemmProblem>& problems, cudaStream_t stream) {
    if (problems.empty()) return;
    if (int(problems.size()) > max_problems_)
      throw std::logic_error("ExpertGemm::run: " + std::to_string(problems.size()) + " problems, more than the " +
                             std::to_string(max_problems_) + " experts it was made for");
    if (strategy_ == GemmStrategy::kGrouped) {
      if (!grouped_supports_types(spec.ab, spec.c)) {
        ++paths_.by_type;
      } else if (!grouped_aligned(spec, problems)) {
        ++paths_.by_alignment;
      } else {
        const cublasStatus_t s = run_grouped(spec, problems, stream);
        if (s == CUBLAS_STATUS_SUCCESS) {
          ++paths_.grouped;
          return;
        }
        // Refused although the checks above passed: the per-expert path runs it (counted, and the
        // tests fail on it), or a real error is reported.
        if (s != CUBLAS_STATUS_NOT_SUPPORTED && s != CUBLAS_STATUS_INVALID_VALUE)
          throw_on_cublas(s, "cublasGemmGroupedBatchedEx", __FILE__, __LINE__);
        ++paths_.refused;
      }
    }
    run_on_streams(spec, problems, stream, strategy_ == GemmStrategy::kLt);
  }

 private:
  cublasStatus_t run_grouped(const GemmSpec& spec, const std::vector<GemmProblem>& ps, cudaStream_t stream) {
    const int g = int(ps.size());
    const int slot = next_slot_;
    next_slot_ = (next_slot_ + 1) % kSlots;
    // The slot's last grouped GEMM (and the copy before it) must have run before its pinned and device
    // arrays are rewritten: usually long done, so this rarely blocks.
    if (slot_used_[slot]) MOEKIT_CUDA_CHECK(cudaEventSynchronize(slot_done_[slot]));
    const std::size_t base = std::size_t(slot) * 3 * std::size_t(max_problems_);
    const void** a = const_cast<const void**>(host_ptrs_ + base);
    const void** b = a + max_problems_;
    void** c = host_ptrs_ + base + 2 * std::size_t(max_problems_);
    ta_.assign(g, spec.tb ? CUBLAS_OP_T : CUBLAS_OP_N);  // column-major: A' = B, B' = A
    tb_.assign(g, spec.ta ? CUBLAS_OP_T : CUBLAS_OP_N);
    m_.resize(g), n_.resize(g), k_.resize(g), lda_.resize(g), ldb_.resize(g), ldc_.resize(g);
    alpha_.assign(g, spec.alpha), beta_.assign(g, spec.beta), size_.assign(g, 1);
    for (int i = 0; i < g; ++i) {
      const GemmProblem& p = ps[i];
      m_[i] = p.n, n_[i] = p.m, k_[i] = p.k, lda_[i] = p.ldb, ldb_[i] = p.lda, ldc_[i] = p.ldc;
      a[i] = p.b, b[i] = p.a, c[i] = p.c;
    }
    void** dev = dev_ptrs_ + base;
    MOEKIT_CUDA_CHECK(cudaMemcpyAsync(dev, host_ptrs_ + base, 3 * std::size_t(max_problems_) * sizeof(void*),
                                      cudaMemcpyHostToDevice, stream));
    MOEKIT_CUBLAS_CHECK(cublasSetStream(main_, stream));
    const cublasStatus_t st =
        cublasGemmGroupedBatchedEx(main_, ta_.data(), tb_.data(), m_.data(), n_.data(), k_.data(), alpha_.data(),
                                   const_cast<const void* const*>(dev), spec.ab, lda_.data(),
                                   const_cast<const void* const*>(dev + max_problems_), spec.ab, ldb_.data(), beta_.data(),
                                   dev + 2 * max_problems_, spec.c, ldc_.data(), g, size_.data(), CUBLAS_COMPUTE_32F);
    MOEKIT_CUDA_CHECK(cudaEventRecord(slot_done_[slot], stream));  // also after a refused call: the copy ran
    slot_used_[slot] = true;
    return st;
  }

  void run_on_streams(const GemmSpec& spec, const std::vector<GemmProblem>& ps, cudaStream_t stream, bool lt) {
    const int used = int(ps.size()) < kSideStreams ? int(ps.size()) : kSideStreams;
    MOEKIT_CUDA_CHECK(cudaEventRecord(fork_, stream));
    for (int i = 0; i < used; ++i) MOEKIT_CUDA_CHECK(cudaStreamWaitEvent(side_[i], fork_, 0));
    for (std::size_t i = 0; i < ps.size(); ++i) {
      const int sidx = int(i % std::size_t(kSideStreams));
      if (lt) run_lt(spec, ps[i], sidx);
      else MOEKIT_CUBLAS_CHECK(gemm_row_major(side_handle_[sidx], spec, ps[i]));
    }
    for (int i = 0; i < used; ++i) {
      MOEKIT_CUDA_CHECK(cudaEventRecord(done_[i], side_[i]));
      MOEKIT_CUDA_CHECK(cudaStreamWaitEvent(stream, done_[i], 0));
    }
  }

  struct LtPlan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
  };
  static void destroy(LtPlan& p) {
    if (p.a) cublasLtMatrixLayoutDestroy(p.a);
    if (p.b) cublasLtMatrixLayoutDestroy(p.b);
    if (p.c) cublasLtMatrixLayoutDestroy(p.c);
    if (p.desc) cublasLtMatmulDescDestroy(p.desc);
  }
  // (m, n, k, lda, ldb, ldc, ta, tb, types, beta != 0, alignment of A, B, C in bytes)
  using LtKey = std::tuple<int, int, int, int, int, int, bool, bool, int, int, bool, int, int, int>;
  static int alignment(const void* p) {  // largest power of two dividing the address, up to 256
    const auto a = reinterpret_cast<std::uintptr_t>(p);
    int al = 1;
    while (al < 256 && a % std::uintptr_t(2 * al) == 0) al *= 2;
    return al;
  }

  // Column-major form as in gemm_row_major: A' = B (op tb), B' = A (op ta), C' [n, m]. Expert
  // sub-matrices start at row offsets, so their pointers are often less than 256-byte aligned (Lt's
  // default assumption): the plan states the real alignments. Returns null when Lt has no algorithm.
  const LtPlan* lt_plan(const GemmSpec& s, const GemmProblem& p) {
    const int al_a = alignment(p.b), al_b = alignment(p.a), al_c = alignment(p.c);
    const LtKey key{p.m, p.n, p.k, p.lda, p.ldb, p.ldc, s.ta, s.tb, int(s.ab), int(s.c), s.beta != 0.f, al_a, al_b, al_c};
    if (auto it = lt_plans_.find(key); it != lt_plans_.end()) return it->second.desc ? &it->second : nullptr;
    if (lt_plans_.size() >= 4096) {  // routing changes m every step: bound the cache
      for (auto& [k, plan] : lt_plans_) destroy(plan);
      lt_plans_.clear();
    }
    LtPlan plan;
    const cublasOperation_t opa = s.tb ? CUBLAS_OP_T : CUBLAS_OP_N, opb = s.ta ? CUBLAS_OP_T : CUBLAS_OP_N;
    MOEKIT_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    MOEKIT_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof opa));
    MOEKIT_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof opb));
    MOEKIT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.a, s.ab, s.tb ? p.k : p.n, s.tb ? p.n : p.k, p.ldb));
    MOEKIT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.b, s.ab, s.ta ? p.m : p.k, s.ta ? p.k : p.m, p.lda));
    MOEKIT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.c, s.c, p.n, p.m, p.ldc));
    cublasLtMatmulPreference_t pref = nullptr;
    MOEKIT_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    const std::size_t ws = kLtWorkspace;
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    const std::uint32_t ua = std::uint32_t(al_a), ub = std::uint32_t(al_b), uc = std::uint32_t(al_c);
    cublasStatus_t st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
    if (st == CUBLAS_STATUS_SUCCESS)
      st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &ua, sizeof ua);
    if (st == CUBLAS_STATUS_SUCCESS)
      st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ub, sizeof ub);
    if (st == CUBLAS_STATUS_SUCCESS)
      st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &uc, sizeof uc);
    if (st == CUBLAS_STATUS_SUCCESS)
      st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &uc, sizeof uc);
    if (st == CUBLAS_STATUS_SUCCESS)
      st = cublasLtMatmulAlgoGetHeuristic(lt_, plan.desc, plan.a, plan.b, plan.c, plan.c, pref, 1, &result, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    if (st == CUBLAS_STATUS_SUCCESS && found == 0) st = CUBLAS_STATUS_NOT_SUPPORTED;
    if (st == CUBLAS_STATUS_NOT_SUPPORTED) {  // remembered: this shape runs through cublasGemmEx
      destroy(plan);
      lt_plans_.emplace(key, LtPlan{});
      return nullptr;
    }
    if (st != CUBLAS_STATUS_SUCCESS) {
      destroy(plan);
      throw_on_cublas(st, "cublasLtMatmulAlgoGetHeuristic", __FILE__, __LINE__);
    }
    plan.algo = result.algo;
    return &lt_plans_.emplace(key, plan).first->second;
  }

  void run_lt(const GemmSpec& s, const GemmProblem& p, int sidx) {
    if (p.m == 0 || p.n == 0) return;
    const LtPlan* plan = lt_plan(s, p);
    if (!plan) {  // no Lt algorithm for this shape and alignment
      ++paths_.lt_no_algo;
      MOEKIT_CUBLAS_CHECK(gemm_row_major(side_handle_[sidx], s, p));
      return;
    }
    MOEKIT_CUBLAS_CHECK(cublasLtMatmul(lt_, plan->desc, &s.alpha, p.b, plan->a, p.a, plan->b, &s.beta, p.c, plan->c, p.c,
                                       plan->c, &plan->algo, lt_workspace_[sidx], kLtWorkspace, side_[sidx]));
  }

  GemmStrategy strategy_;
  int max_problems_;
  GemmPathCounts paths_;
  cublasHandle_t main_ = nullptr;
  cudaStream_t side_[kSideStreams] = {};
  cublasHandle_t side_handle_[kSideStreams] = {};
  cudaEvent_t done_[kSideStreams] = {}, fork_ = nullptr;
  cudaEvent_t slot_done_[kSlots] = {};
  bool slot_used_[kSlots] = {};
  int next_slot_ = 0;
  static inline int live_ = 0;  // handles, streams and events alive in all ExpertGemms of this TU
  void** host_ptrs_ = nullptr;  // pinned
  void** dev_ptrs_ = nullptr;
  cublasLtHandle_t lt_ = nullptr;
  void* lt_workspace_[kSideStreams] = {};
  std::map<LtKey, LtPlan> lt_plans_;
  // Host arrays of the grouped call (reused; sized by the first calls, at most max_problems_).
  std::vector<cublasOperation_t> ta_, tb_;
  std::vector<int> m_, n_, k_, lda_, ldb_, ldc_, size_;
  std::vector<float> alpha_, beta_;
};

}  // inline namespace MOEKIT_CUDA_ABI
}  // namespace moekit::backend::cuda
