#!/usr/bin/env bash
# train_lm --backend cuda against --backend host (label gpu): the same model, seed and data. The CUDA run
# must learn (--require-gain), its first logged training loss must agree with the host's to 1e-3
# relative (same initial model; the device sums in another order, so later steps drift apart slowly),
# and its final held-out bits per byte to 0.05. Exit 77 (ctest: skipped) when no CUDA device is usable.
# Usage: cuda_test.sh TRAIN_LM [flags for both runs...]
set -euo pipefail
exe=$1
shift
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT

set +e
"$exe" --backend cuda --json "$dir/cuda.jsonl" --require-gain 1.0 "$@" >"$dir/cuda.txt" 2>&1
rc=$?
set -e
if [ $rc -ne 0 ]; then
  if grep -q -e "no usable CUDA device" -e "no CUDA device found" -e "built without CUDA" "$dir/cuda.txt"; then
    grep "error:" "$dir/cuda.txt" | head -1
    # A skip only where there is no GPU driver and no GPU is demanded (tests/common/gpu_probe.hpp's rule):
    # a driver that cannot serve the runtime on a GPU machine, or MOEKIT_REQUIRE_GPU (tools/device/run.sh),
    # makes it a failure.
    if [[ -n "${MOEKIT_REQUIRE_GPU:-}" && "${MOEKIT_REQUIRE_GPU}" != 0 ]]; then
      echo "cuda_test.sh: failed: no usable CUDA device, and MOEKIT_REQUIRE_GPU demands one"
      exit 1
    fi
    if [[ -e /dev/nvidiactl ]] && grep -q "no usable CUDA device" "$dir/cuda.txt"; then
      echo "cuda_test.sh: failed: a GPU driver is present (/dev/nvidiactl) but CUDA cannot use it"
      exit 1
    fi
    echo "cuda_test.sh: skipped (no CUDA device here)"
    exit 77
  fi
  cat "$dir/cuda.txt"
  echo "cuda_test.sh: the --backend cuda run failed (exit $rc)"
  exit 1
fi
"$exe" --backend host --json "$dir/host.jsonl" "$@" >"$dir/host.txt" 2>&1
tail -n 25 "$dir/cuda.txt"

# The first training row's loss and the final evaluation's bits per byte of a metrics file.
field() { grep "\"type\":\"$2\"" "$1" | sed -n "$3" | sed -E "s/.*\"$4\":([-0-9.eE+]+).*/\1/"; }
cl=$(field "$dir/cuda.jsonl" train 1p loss)
hl=$(field "$dir/host.jsonl" train 1p loss)
cb=$(field "$dir/cuda.jsonl" eval '$p' heldout_bits_per_byte)
hb=$(field "$dir/host.jsonl" eval '$p' heldout_bits_per_byte)
echo "first logged loss: cuda $cl host $hl | final held-out bpb: cuda $cb host $hb"
awk -v cl="$cl" -v hl="$hl" -v cb="$cb" -v hb="$hb" 'BEGIN {
  d = cl - hl; if (d < 0) d = -d
  e = cb - hb; if (e < 0) e = -e
  if (d > 1e-3 * hl) { print "cuda_test.sh: first losses differ by " d " (> 1e-3 relative)"; exit 1 }
  if (e > 0.05) { print "cuda_test.sh: final held-out bpb differ by " e " (> 0.05)"; exit 1 }
}'
echo "cuda_test.sh: ok"
