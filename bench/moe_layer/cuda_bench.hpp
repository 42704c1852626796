#pragma once
// The CUDA rows of bench_moe_layer (cuda_bench.cu, compiled by nvcc when CUDA is enabled).
// Parses its own arguments (--quick, --reps N, --json PATH, --gemm auto|grouped|streams|lt|all,
// --dtype bf16|fp32, --shape NAME..., --max-gib G, --time-budget S); throws std::runtime_error on a bad argument.
inline constexpr int kNoCudaDevice = 77;  // ctest SKIP_RETURN_CODE
int run_cuda_bench(int argc, char** argv);
