#!/usr/bin/env bash
# ctest train_domains.mpi.fail.*: ranks that fail together (docs/checkpoints.md, reliability). Under
# mpirun with 2 ranks (expert parallel), one rank fails and the whole job must end, with a non-zero
# exit and a message naming the failing rank, well within the time limit (never a hang):
#   kill     rank 1 is killed with SIGKILL mid-run (from this script)
#   throw    rank 1 throws at step 20 while rank 0 waits in the forward's collectives
#   missing  --resume where the checkpoint file that only rank 1 reads is gone
#   nan      rank 1's loss is not finite from step 30 on: every rank skips those steps alike, and after
#            --max-bad-steps 3 in a row every rank stops naming the step; the step-30 checkpoint is intact
#   MPIRUN="mpirun ... -np" fail_together_test.sh MODE TRAIN_DOMAINS
set -uo pipefail
mode=$1 exe=$2
limit=${LIMIT:-90}  # seconds: far less than a hang would take (MOEKIT_COMM_TIMEOUT_S is larger)
dir=$(mktemp -d)
trap 'pkill -9 -f -- "--checkpoint-dir $dir/" 2> /dev/null; rm -rf "$dir"' EXIT
read -r -a mpirun <<< "${MPIRUN:-mpirun -np}"
run=("${mpirun[@]}" 2 "$exe" --parallel expert --ep 2 --batch 256 --d-model 32 --d-expert 64 --train-tokens 65536
     --heldout-tokens 4096 --threads 1 --log-interval 10 --eval-interval 0)
fail() {
  echo "FAIL ($mode): $1" >&2
  sed 's/^/  | /' "$dir/out.txt" >&2
  exit 1
}
# expect_failure NEEDLE: the job exited non-zero within the limit and its output names NEEDLE.
expect_failure() {
  (( $(date +%s) - start >= limit )) && fail "still running after ${limit} s: a hang"
  [[ $rc -eq 0 ]] && fail "exited 0"
  grep -qF -- "$1" "$dir/out.txt" || fail "the output does not say '$1'"
  echo "PASS ($mode): exit status $rc after $(( $(date +%s) - start )) s; the output says: $(grep -F -m1 -- "$1" "$dir/out.txt")"
}
start=$(date +%s)
case $mode in
  kill)
    timeout -s KILL "$limit" "${run[@]}" --steps 100000 --checkpoint-dir "$dir/ck" --checkpoint-interval 5 > "$dir/out.txt" 2>&1 &
    job=$!
    for _ in $(seq 1 3000); do [[ -d "$dir/ck/step-000010" ]] && break; sleep 0.01; done
    victim=""
    for p in $(pgrep -f -- "--checkpoint-dir $dir/ck"); do  # rank 1: OMPI_COMM_WORLD_RANK=1 in its environment
      tr '\0' '\n' < "/proc/$p/environ" 2> /dev/null | grep -qx "OMPI_COMM_WORLD_RANK=1" && victim=$p
    done
    [[ -n $victim ]] || fail "found no rank 1 to kill"
    kill -9 "$victim"
    wait "$job"
    rc=$?
    expect_failure "rank 1"
    ;;
  throw)
    timeout -s KILL "$limit" "${run[@]}" --steps 200 --inject-fault throw:1:20 --checkpoint-dir "$dir/ck" > "$dir/out.txt" 2>&1
    rc=$?
    expect_failure "error (rank 1 of 2): injected fault (--inject-fault throw) at step 20"
    ;;
  missing)
    "${run[@]}" --steps 20 --checkpoint-dir "$dir/ck" > "$dir/out.txt" 2>&1 || fail "the first run failed"
    rm "$dir/ck/step-000020/model-00002-of-00002.safetensors"
    timeout -s KILL "$limit" "${run[@]}" --steps 40 --checkpoint-dir "$dir/ck" --resume > "$dir/out.txt" 2>&1
    rc=$?
    expect_failure "rank 1: $dir/ck/step-000020/model-00002-of-00002.safetensors: no such file"
    [[ $rc -eq 2 ]] || fail "exit status $rc, expected 2 (a clean error on every rank)"
    ;;
  nan)
    timeout -s KILL "$limit" "${run[@]}" --steps 200 --inject-fault nan:1:30 --max-bad-steps 3 --checkpoint-dir "$dir/ck" \
      --checkpoint-interval 10 > "$dir/out.txt" 2>&1
    rc=$?
    expect_failure "step 33: 3 steps in a row with a non-finite loss or gradient norm"
    grep -qF "the parameters are those after step 30" "$dir/out.txt" || fail "the message does not say which parameters remain"
    [[ $rc -eq 2 ]] || fail "exit status $rc, expected 2 (every rank stopped alike)"
    [[ -d "$dir/ck/step-000030" && ! -d "$dir/ck/step-000040" ]] || fail "expected step-000030 as the last checkpoint: $(ls "$dir/ck")"
    "${run[@]}" --steps 200 --checkpoint-dir "$dir/ck" --resume --inject-fault nan:1:30 --max-bad-steps 3 > "$dir/out.txt" 2>&1
    grep -q "^resume: step 30 from" "$dir/out.txt" || fail "the step-30 checkpoint does not resume"
    ;;
  *)
    echo "usage: fail_together_test.sh kill|throw|missing|nan TRAIN_DOMAINS" >&2
    exit 2
    ;;
esac
