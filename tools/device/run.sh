#!/usr/bin/env bash
# Runs on the lent GPU machine, from the repository root, with .carry/ from tools/device/build.sh:
# the gpu tests, compute-sanitizer (memcheck, racecheck) over them, and the benchmark. Logs and JSON go
# to $OUT (the device tool brings them back). Stages: tests | sanitize | bench | all (default).
#   run(command="bash tools/device/run.sh all", carry=[".carry"])
set -uo pipefail
stage="${1:-all}"
OUT="${OUT:-out}"
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$PWD/.carry/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export OMP_NUM_THREADS=8 OPENBLAS_NUM_THREADS=1 OMP_WAIT_POLICY=passive
bin=.carry/bin
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/device.txt"
status=0
if [[ "$stage" == tests || "$stage" == all ]]; then
  "$bin/moekit_gpu_tests" --duration=true 2>&1 | tee "$OUT/gpu_tests.log"; status=$((status | PIPESTATUS[0]))
fi
if [[ "$stage" == sanitize || "$stage" == all ]]; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 1 "$bin/moekit_gpu_tests" 2>&1 | tail -n 40 | tee "$OUT/sanitize_$tool.log"
    status=$((status | PIPESTATUS[0]))
  done
fi
if [[ "$stage" == bench || "$stage" == all ]]; then
  "$bin/bench_moe_layer" --backend cuda --gemm all --reps 10 --json "$OUT/bench_cuda_bf16.json" 2>&1 | tee "$OUT/bench.log"
  status=$((status | PIPESTATUS[0]))
fi
echo "run.sh: stage $stage exit status $status"
exit "$status"
