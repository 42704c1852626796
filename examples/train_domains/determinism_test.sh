#!/usr/bin/env bash
# ctest train_domains.deterministic: two runs with the same seed and thread count on one machine
# report identical metrics (every training and evaluation row without its timings, and the final
# report's held-out loss), byte for byte.  determinism_test.sh TRAIN_DOMAINS [flags...]
set -euo pipefail
exe=$1
shift
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
for r in 1 2; do
  "$exe" --steps 100 --log-interval 10 --eval-interval 50 --train-tokens 65536 --heldout-tokens 4096 --threads 2 "$@" \
    --json "$dir/$r.jsonl" > /dev/null
  sed -E 's/"(tokens_per_s|step_time_ms|[a-z_]*seconds)":[^,}]*,?//g' "$dir/$r.jsonl" > "$dir/$r.txt"
done
if ! cmp -s "$dir/1.txt" "$dir/2.txt"; then
  echo "FAIL: two runs with the same seed differ:" >&2
  diff "$dir/1.txt" "$dir/2.txt" | head -10 >&2 || true
  exit 1
fi
echo "PASS: $(wc -l < "$dir/1.txt") metric rows identical"
