#!/usr/bin/env bash
# Runs on the lent GPU machine, from the repository root, with .carry/ from tools/device/build.sh.
# Every stage is bounded by time, so that one call of the device tool (10 minutes at most) always
# brings back the gpu test results and a quick benchmark, whatever hangs or runs long later:
#   1 tests      the gpu tests (doctest, --duration)                      cap 240 s
#   2 lm         train_lm --backend cuda against --backend host (examples/train_lm/cuda_test.sh)   cap 120 s
#   3 quick      bench: one coarse and one fine-grained shape, the three GEMM strategies   cap 150 s
#   4 lm_bench   train_lm --backend cuda --dtype bf16, a ~110M-parameter model, 40 steps: tokens/s, MFU   cap 120 s
#   5 full       bench: every shape, every strategy                       cap 240 s
#   6 sanitize   compute-sanitizer memcheck, then racecheck, on a subset of the gpu tests   cap 150 s each
# A stage starts only when the time left (of BUDGET_S, default 540) covers its minimum; it is killed
# at min(cap, time left − 15 s). A table of what ran, passed, failed, timed out or was skipped comes
# last. Files under $OUT (the tool brings back 8 at most): summary.txt, gpu_tests.log, lm.log (both lm
# stages), bench_quick.{log,json}, bench_full.{log,json}, sanitize.log.
#   run(command="bash tools/device/run.sh", carry=[".carry"], timeout_s=600)
#   run(command="BUDGET_S=300 bash tools/device/run.sh tests quick", ...)   # only some stages
set -uo pipefail
OUT="${OUT:-out}"
mkdir -p "$OUT"
budget="${BUDGET_S:-540}"
stages=("$@")
((${#stages[@]})) || stages=(tests lm quick lm_bench full sanitize)
export LD_LIBRARY_PATH="$PWD/.carry/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export PATH="/usr/local/cuda/bin:${PATH}"  # compute-sanitizer
export OMP_NUM_THREADS=8 OPENBLAS_NUM_THREADS=1 OMP_WAIT_POLICY=passive
bin=.carry/bin
start=$(date +%s)
rows=()
overall=0

left() { echo $((budget - ($(date +%s) - start))); }
wanted() { local s; for s in "${stages[@]}"; do [[ "$s" == "$1" || "$s" == all ]] && return 0; done; return 1; }

# stage NAME[:LABEL] CAP MIN LOG COMMAND...: runs COMMAND under timeout, appending to LOG; records a row.
stage() {
  local name=${1%%:*} label=$1 cap=$2 min=$3 log=$4
  shift 4
  if ! wanted "$name"; then rows+=("$label|not asked|0|-"); return; fi
  local l; l=$(left)
  if ((l < min)); then rows+=("$label|skipped: ${l} s left, needs ${min}|0|-"); overall=1; return; fi
  local limit=$((cap < l - 15 ? cap : l - 15))
  local t0; t0=$(date +%s)
  echo "== $label (limit ${limit} s): $*" | tee -a "$OUT/$log"
  timeout --kill-after=10 "$limit" "$@" >>"$OUT/$log" 2>&1
  local rc=$?
  local dt=$(($(date +%s) - t0)) what
  case $rc in
    0) what=passed ;;
    124 | 137) what="timed out after ${limit} s" ;;
    77) what="skipped by the program: no CUDA device" ;;
    *) what="failed (exit $rc)" ;;
  esac
  ((rc == 0)) || overall=1
  rows+=("$label|$what|$dt|$log")
  tail -n 25 "$OUT/$log"
}

{
  echo "run.sh $(date -u +%FT%TZ), budget ${budget} s, stages: ${stages[*]}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
} | tee "$OUT/summary.txt"
[[ -x "$bin/moekit_gpu_tests" ]] || { echo "run.sh: $bin/moekit_gpu_tests missing (run tools/device/build.sh here first)" | tee -a "$OUT/summary.txt"; exit 2; }

stage tests 240 60 gpu_tests.log "$bin/moekit_gpu_tests" --duration=true
stage lm 120 60 lm.log bash examples/train_lm/cuda_test.sh "$bin/train_lm" --steps 200 --eval-interval 100 --d-model 64 \
  --d-expert 128 --blocks 2 --seq 64 --threads 8 --log-interval 50 --sample-tokens 80
stage quick 150 45 bench_quick.log "$bin/bench_moe_layer" --backend cuda --gemm all --reps 3 --shape mixtral --shape olmoe \
  --json "$OUT/bench_quick.json"
# ~110M parameters: 8 blocks of attention (4·512² each) and 8 experts of 3·512·1024 (12.6M per block).
stage lm_bench 120 45 lm.log "$bin/train_lm" --backend cuda --dtype bf16 --d-model 512 --heads 8 --blocks 8 --experts 8 --top-k 2 \
  --d-expert 1024 --seq 512 --batch 32 --steps 40 --log-interval 10 --eval-interval 0 --sample-tokens 0
stage full 240 120 bench_full.log "$bin/bench_moe_layer" --backend cuda --gemm all --reps 10 --json "$OUT/bench_full.json"
# The subset: the kernels, the router, the permutation in chunks, one layer battery (fp32) and the nn/cuda ops; the
# bf16 and distributed batteries repeat the same kernels.
subset='--test-case=cuda activation*,cuda permute*,cuda combine*,cuda router*,*device matches host,cuda layer fp32*,nn::cuda*'
stage sanitize:memcheck 150 60 sanitize.log compute-sanitizer --tool memcheck --error-exitcode 1 "$bin/moekit_gpu_tests" "$subset"
stage sanitize:racecheck 150 60 sanitize.log compute-sanitizer --tool racecheck --error-exitcode 1 "$bin/moekit_gpu_tests" "$subset"

{
  echo
  printf '%-19s | %-40s | %7s | %s\n' stage result seconds log
  printf '%s\n' "--------------------+------------------------------------------+---------+------------------"
  for r in "${rows[@]}"; do IFS='|' read -r a b c d <<<"$r"; printf '%-19s | %-40s | %7s | %s\n' "$a" "$b" "$c" "$d"; done
  echo "run.sh: $(( $(date +%s) - start )) s of ${budget}; overall exit status $overall"
} | tee -a "$OUT/summary.txt"
exit "$overall"
