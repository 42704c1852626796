#!/usr/bin/env bash
# ctest train_domains.resume.kill_during_write: SIGKILL while a checkpoint is being written.
#   kill_during_write_test.sh TRAIN_DOMAINS
# A run writing a checkpoint after every step is killed the moment one of its hidden temporary
# checkpoint folders exists (the files half written). Then:
# - the hidden folder is still there (the kill landed inside the write),
# - --resume skips nothing and continues from the newest complete checkpoint,
# - and the run ends with the same model and optimizer files as a run never killed.
# Tried up to 20 times in case a write finishes between seeing its folder and the kill.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/checkpoint_test_lib.sh"
exe=$1
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
steps=120
run=("$exe" --steps $steps --log-interval 10 --eval-interval 0 --train-tokens 65536 --heldout-tokens 4096 --threads 2
     --checkpoint-interval 1 --keep 2)
"${run[@]}" --checkpoint-dir "$dir/a" > /dev/null

caught=0
for try in $(seq 1 20); do
  rm -rf "$dir/b"
  "${run[@]}" --checkpoint-dir "$dir/b" > /dev/null 2>&1 &
  pid=$!
  # Wait for a checkpoint after the 20th step to start, then kill as soon as a write is in flight.
  while kill -0 "$pid" 2> /dev/null && ! compgen -G "$dir/b/step-00002?" > /dev/null; do sleep 0.002; done
  while kill -0 "$pid" 2> /dev/null && ! compgen -G "$dir/b/.step-*.tmp-*" > /dev/null; do :; done
  kill -9 "$pid" 2> /dev/null || true
  wait "$pid" 2> /dev/null || true
  if compgen -G "$dir/b/.step-*.tmp-*" > /dev/null; then
    caught=1
    break
  fi
done
if [[ $caught -eq 0 ]]; then
  echo "FAIL: could not kill the run inside a checkpoint write in 20 tries" >&2
  exit 1
fi
echo "killed inside a write (try $try): $(cd "$dir/b" && ls -a | tr '\n' ' ')"

"${run[@]}" --checkpoint-dir "$dir/b" --resume > "$dir/resumed.txt" 2> "$dir/resumed.err"
if grep -q "skipped" "$dir/resumed.err"; then
  echo "FAIL: a complete-looking checkpoint did not verify after the kill:" >&2
  cat "$dir/resumed.err" >&2
  exit 1
fi
grep "^resume: step" "$dir/resumed.txt"
same_final_state "$dir/a" "$dir/b" $steps || exit 1
if compgen -G "$dir/b/.step-*" > /dev/null; then
  echo "FAIL: the killed writer's hidden folder was not cleaned up by the next save" >&2
  exit 1
fi
echo "PASS: killed inside a checkpoint write; resumed from the previous checkpoint; same final state"
