#!/usr/bin/env bash
# ctest train_domains.resume.* and train_domains.mpi.resume.*: exact resume after kill -9
# (docs/checkpoints.md).
#   [LAUNCH="mpirun ... -np 4"] [DATA="data flags"] resume_test.sh TRAINER [flags of the run...]
# (TRAINER: train_domains, or train_lm with DATA="--train-bytes ...")
# LAUNCH (optional) starts every run, e.g. under mpirun; then every rank is killed at once, as when a
# node is lost.
# 1. The run straight through, a checkpoint every 40 steps.
# 2. The same run killed with SIGKILL once its step-80 checkpoint exists, then --resume: it continues
#    from the newest checkpoint that verifies.
# Every training row the resumed run reports (loss, aux losses, gradient norm, lr, expert load: all
# but the timings) must equal the straight run's row of that step, byte for byte, and the final
# checkpoints' model and optimizer files must be identical.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/checkpoint_test_lib.sh"
exe=$1
shift
read -r -a launch <<< "${LAUNCH:-}"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
steps=${STEPS:-240}
# DATA: the trainer's data flags (train_lm: --train-bytes ...).
read -r -a data <<< "${DATA:---train-tokens 65536 --heldout-tokens 4096}"
run=("${launch[@]}" "$exe" --steps $steps --log-interval 10 --eval-interval 0 "${data[@]}" --threads "${THREADS:-2}"
     --checkpoint-interval 40 "$@")

"${run[@]}" --json "$dir/straight.jsonl" --checkpoint-dir "$dir/a" > "$dir/straight.txt"

"${run[@]}" --json "$dir/b.jsonl" --checkpoint-dir "$dir/b" > "$dir/killed.txt" 2>&1 &
pid=$!
for _ in $(seq 1 6000); do
  [[ -d "$dir/b/step-000080" ]] && break
  sleep 0.005
done
kill -9 "$pid" 2> /dev/null || true
# Under a launcher, its ranks too (their command lines name this test's folder).
[[ ${#launch[@]} -gt 0 ]] && pkill -9 -f -- "--checkpoint-dir $dir/b" 2> /dev/null || true
wait "$pid" 2> /dev/null || true
if [[ -d "$dir/b/step-$(printf %06d $steps)" ]]; then
  echo "FAIL: the run finished before it was killed; the test needs a longer run on this machine" >&2
  exit 1
fi
before=$(wc -l < "$dir/b.jsonl")

"${run[@]}" --json "$dir/b.jsonl" --checkpoint-dir "$dir/b" --resume > "$dir/resumed.txt" 2> "$dir/resumed.err"
from=$(sed -nE 's/^resume: step ([0-9]+) from .*/\1/p' "$dir/resumed.txt")
if [[ -z "$from" ]]; then
  echo "FAIL: the resumed run did not say where it resumed" >&2
  cat "$dir/resumed.txt" "$dir/resumed.err" >&2
  exit 1
fi
echo "killed after step-000080 existed; resumed from step $from"
cat "$dir/resumed.err"

# Training rows without their timings, from step > from.
rows() { grep '"type":"train"' | sed -E 's/"tokens_per_s":[^,]*,//; s/"step_time_ms":[^,]*,//; s/"elapsed_s":[^,]*,//' |
         awk -v from="$from" '{ s = $0; sub(/.*"step":/, "", s); sub(/,.*/, "", s); if (s + 0 > from) print }'; }
rows < "$dir/straight.jsonl" > "$dir/want.txt"
tail -n +"$((before + 1))" "$dir/b.jsonl" | rows > "$dir/got.txt"
n=$(wc -l < "$dir/want.txt")
if [[ "$n" -eq 0 ]] || ! cmp -s "$dir/want.txt" "$dir/got.txt"; then
  echo "FAIL: the resumed run's rows differ from the straight run's ($n expected)" >&2
  diff "$dir/want.txt" "$dir/got.txt" | head -20 >&2 || true
  exit 1
fi
same_final_state "$dir/a" "$dir/b" $steps || exit 1
echo "PASS: $n training rows after step $from identical; final model and optimizer state identical"
