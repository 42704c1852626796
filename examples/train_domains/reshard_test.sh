#!/usr/bin/env bash
# ctest train_domains.mpi.reshard.*: a checkpoint written in one parallel layout resumed in another
# (docs/checkpoints.md, resharding).
#   MPIRUN="mpirun ... -np" reshard_test.sh TRAIN_DOMAINS NP_A "LAYOUT_A" NP_B "LAYOUT_B" [flags...]
# NP 1 runs one process (LAYOUT "--parallel none"). Run A goes straight through with a checkpoint every
# 40 steps; run B resumes A's step-80 checkpoint in layout B. Logging every 12 steps puts step 80 inside
# an interval (73-84), so B's first report also checks the interval sums carried across layouts. Every training loss B reports after step
# 80, and its final held-out loss, must equal A's within TOL (default 1e-5, absolute, in nats; measured: below 2e-8): the
# layouts compute the same function (--balance global) in another order, so the runs drift apart by
# fp32 rounding only, not bit for bit.
set -euo pipefail
exe=$1 np_a=$2 layout_a=$3 np_b=$4 layout_b=$5
shift 5
tol=${TOL:-1e-5}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
read -r -a mpirun <<< "${MPIRUN:-mpirun -np}"
launch() {  # launch NP LAYOUT ARGS...: the run, under mpirun when NP > 1
  local np=$1 layout=$2
  shift 2
  read -r -a lay <<< "$layout"
  if [[ $np -gt 1 ]]; then "${mpirun[@]}" "$np" "$exe" "${lay[@]}" "$@"; else "$exe" "${lay[@]}" "$@"; fi
}
common=(--steps 160 --log-interval 12 --eval-interval 0 --checkpoint-interval 40 --train-tokens 65536 --heldout-tokens 4096
        --threads 1 "$@")

launch "$np_a" "$layout_a" "${common[@]}" --json "$dir/a.jsonl" --checkpoint-dir "$dir/a" > "$dir/a.out"
mkdir "$dir/b"
cp -r "$dir/a/step-000080" "$dir/b/"
launch "$np_b" "$layout_b" "${common[@]}" --json "$dir/b.jsonl" --checkpoint-dir "$dir/b" --resume > "$dir/b.out" 2> "$dir/b.err"
if ! grep -q "^resume: step 80 from .*resharded" "$dir/b.out"; then
  echo "FAIL: run B did not resume step 80 resharded:" >&2
  cat "$dir/b.out" "$dir/b.err" >&2
  exit 1
fi
grep "^resume:" "$dir/b.out"

# "step loss" of each training row after step 80, and the final held-out loss as step "final".
losses() {
  sed -nE 's/.*"type":"train".*"step":([0-9]+),.*/\1 &/p; s/.*"type":"final".*/final &/p' "$1" |
    awk '{ key = $1; line = $0; if (key != "final" && key + 0 <= 80) next;
           if (key == "final") { sub(/.*"heldout_loss":/, "", line) } else { sub(/.*"loss":/, "", line) }
           sub(/[,}].*/, "", line); print key, line }'
}
losses "$dir/a.jsonl" > "$dir/a.txt"
losses "$dir/b.jsonl" > "$dir/b.losses"
if [[ $(wc -l < "$dir/a.txt") -lt 2 ]] || ! cut -d' ' -f1 "$dir/a.txt" | cmp -s - <(cut -d' ' -f1 "$dir/b.losses"); then
  echo "FAIL: the runs report different steps after 80:" >&2
  paste "$dir/a.txt" "$dir/b.losses" >&2
  exit 1
fi
paste -d' ' "$dir/a.txt" "$dir/b.losses" | awk -v tol="$tol" '
  { d = $2 - $4; if (d < 0) d = -d; if (d > worst) worst = d; printf "  %-6s A %.6f  B %.6f  |d| %.2e\n", $1, $2, $4, d;
    if (d > tol + 0) bad++ }
  END { if (bad) { printf "FAIL: %d losses differ by more than %s\n", bad, tol; exit 1 }
        printf "PASS: %d losses after step 80 agree within %s (largest difference %.2e)\n", NR, tol, worst }'
