#!/usr/bin/env bash
# Builds, on this machine (no GPU needed), what a lent H100/H200 runs, and gathers it under .carry/
# (git-ignored) for the device tool's `carry`: the GPU tests, the benchmark, moekit-layer and train_lm, built for
# sm_90a and sm_90, plus the host libraries the device image lacks (OpenBLAS and what it links).
#   bash tools/device/build.sh            # then: run(command="bash tools/device/run.sh", carry=[".carry"])
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if ! command -v nvcc >/dev/null 2>&1 && [[ -x /usr/local/cuda/bin/nvcc ]]; then export PATH="/usr/local/cuda/bin:${PATH}"; fi
cmake -S . -B build/device -DCMAKE_BUILD_TYPE=Release -DMOEKIT_ENABLE_CUDA=ON -DMOEKIT_INSTALL=OFF \
  -DCMAKE_CUDA_ARCHITECTURES=OFF \
  "-DCMAKE_CUDA_FLAGS=-gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_90,code=sm_90" >/dev/null
cmake --build build/device -j 2 --target moekit_gpu_tests bench_moe_layer moekit-layer train_lm
rm -rf .carry && mkdir -p .carry/bin .carry/lib
bins=(build/device/tests/gpu/moekit_gpu_tests build/device/bench/bench_moe_layer build/device/examples/moekit_layer/moekit-layer
      build/device/examples/train_lm/train_lm)
cp "${bins[@]}" .carry/bin/
strip --strip-debug .carry/bin/* || true
# Shared libraries outside the CUDA toolkit and glibc that the device image may lack.
for b in "${bins[@]}"; do ldd "$b"; done | awk '/=> \//{print $3}' | sort -u |
  grep -E 'openblas|gfortran|quadmath|gomp|lapack' | grep -v cublas | while read -r lib; do cp -L "$lib" .carry/lib/; done
du -sh .carry; ls -la .carry/bin .carry/lib
