#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build, test and run moekit on the host. The CUDA
# toolkit is not an apt package here: when nvcc is present (/usr/local/cuda/bin) the CUDA tests are
# compiled too. Safe to run again: apt is skipped when every package is installed.
set -euo pipefail
# make: the presets use CMake's default generator (Unix Makefiles), and cmake only recommends it.
# libopenblas0-openmp: the OpenBLAS built on OpenMP, which moekit links when present (cmake/moekitBlas.cmake);
# libdnnl2: oneDNN, whose bf16 GEMM backend::Host<bf16> runs on CPUs with bf16 instructions (loaded at run
# time); libblis4 and it: the other CPU GEMM libraries bench_gemm_libraries measures; libxxhash-dev: the
# checksums of checkpoints (train/checkpoint.hpp, header only); clang-16, libfuzzer-16-dev and
# libclang-rt-16-dev: the fuzz targets of tests/fuzz (tools/fuzz/run.sh, run by .ci/run); libnlopt-cxx-dev:
# NLopt, the optimiser of the scaling-law fit and the planner (science/fit.hpp, planner.hpp, moekit-plan);
# ccache: the compiler launcher of moekit's own builds (CMakeLists.txt), so CI's second build is mostly hits.
packages=(cmake make g++ doctest-dev libopenblas-dev nlohmann-json3-dev libcli11-dev libopenmpi-dev openmpi-bin gnuplot-nox
          libopenblas0-openmp libblis4 libdnnl2 libxxhash-dev
          clang-16 libfuzzer-16-dev libclang-rt-16-dev libnlopt-cxx-dev ccache)
missing=()
for p in "${packages[@]}"; do
  # "install ok installed", not merely known to dpkg (a removed package keeps its config files).
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done
if ((${#missing[@]} == 0)); then
  echo "install-deps: all apt packages present"
  exit 0
fi
sudo=()
if [[ "$(id -u)" -ne 0 ]]; then sudo=(sudo); fi
echo "install-deps: installing ${missing[*]}"
"${sudo[@]}" apt-get update
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
