#!/usr/bin/env bash
# Builds the libFuzzer targets of tests/fuzz/ with clang-16 (AddressSanitizer + UndefinedBehaviorSanitizer
# + libFuzzer; Debian clang-16, libfuzzer-16-dev, libclang-rt-16-dev) and runs each for SECONDS,
# starting from its committed seed corpus (tests/fuzz/corpus/<target>/, copied: the run's new inputs
# stay in build/fuzz/). Fails on any crash, leak, timeout (10 s an input), sanitizer report or
# out-of-memory (2 GiB); the failing input is left in build/fuzz/ (crash-*, leak-*, timeout-*).
#   bash tools/fuzz/run.sh [SECONDS=60] [TARGET...]     (.ci/run: 60 s each; longer: docs/checkpoints.md)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
seconds=${1:-60}
shift || true
targets=("$@")
if ((${#targets[@]} == 0)); then targets=(safetensors checkpoint config); fi
cxx=(${FUZZ_CXX:-clang++-16})
# Through ccache when it is installed, as the CMake builds (CMakeLists.txt): paths here are relative to the
# repository root, and the working directory is left out of the hash, so another clone hits the cache.
if command -v ccache >/dev/null 2>&1 && [[ "${MOEKIT_CCACHE:-ON}" != OFF ]]; then
  cxx=(env CCACHE_NOHASHDIR=1 "CCACHE_BASEDIR=$PWD" ccache "${cxx[@]}")
fi
out=build/fuzz
mkdir -p "$out"
for t in "${targets[@]}"; do
  echo "fuzz: building $t"
  "${cxx[@]}" -std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -Iinclude \
    "tests/fuzz/fuzz_$t.cpp" -o "$out/fuzz_$t"
done
for t in "${targets[@]}"; do
  work="$out/corpus_$t"
  mkdir -p "$work"
  cp -n tests/fuzz/corpus/"$t"/* "$work"/ 2> /dev/null || true
  echo "fuzz: running $t for ${seconds} s"
  (cd "$out" && ./"fuzz_$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
     "corpus_$t" 2> "fuzz_$t.log") || {
    echo "fuzz: $t FAILED; the end of build/fuzz/fuzz_$t.log:" >&2
    tail -40 "$out/fuzz_$t.log" >&2
    exit 1
  }
  grep -E "^stat::number_of_executed_units|^Done" "$out/fuzz_$t.log" | sed "s/^/fuzz: $t: /"
done
echo "fuzz: all targets ran ${seconds} s without a finding"
