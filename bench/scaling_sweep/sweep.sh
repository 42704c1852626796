#!/usr/bin/env bash
# A small fine-grained scaling sweep of train_lm on this machine, fitted with moekit-plan --fit
# (Krajewski et al., arXiv 2402.07871; docs/science.md). The models follow the paper's family:
# d_model = 64 n_blocks, E = 8 full-size experts of d_ff = 4 d_model split G ways (8G experts of
# 4 d_model / G, top-G), for n_blocks, training steps and G over a grid. Each run trains on the embedded
# corpus and reports its final held-out loss (nats per byte) as one line of runs.jsonl:
#   {"total_params": N, "tokens": D, "granularity": G, "loss": L, ...}
# N counts the non-embedding parameters as the model holds them (SwiGLU experts: 3 matrices; attention
# 4 d²; router; norms), D the training bytes (steps x batch x seq).
#
#   bench/scaling_sweep/sweep.sh BUILD_DIR OUT_DIR [BLOCKS="1 2 3"] [STEPS="150 300 600"] [GS="1 2 4"]
#
# Then: moekit-plan --fit OUT_DIR/runs.jsonl --out OUT_DIR/coefficients.json, and
# bench/scaling_sweep/plot.sh OUT_DIR (the pictures). On 2 cores the grid of
# bench/results/scaling-sweep-2026-12-06-* (G 1 2 4 8) took 80 minutes beside a CI run.
set -euo pipefail
build=${1:?usage: sweep.sh BUILD_DIR OUT_DIR [BLOCKS] [STEPS] [GS]}
out=${2:?usage: sweep.sh BUILD_DIR OUT_DIR [BLOCKS] [STEPS] [GS]}
blocks_list=${3:-"1 2 3"}
steps_list=${4:-"150 300 600"}
g_list=${5:-"1 2 4"}
train="$build/examples/train_lm/train_lm"
[[ -x "$train" ]] || { echo "sweep: $train not built" >&2; exit 2; }
mkdir -p "$out/runs"
batch=16 seq=128 experts=8 heads=4
runs="$out/runs.jsonl"
: >"$runs"
{
  echo "# sweep.sh $*"
  echo "# $(date -u +%FT%TZ) | $(lscpu | sed -n 's/^Model name: *//p') | $(nproc) cores | load $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$out/sweep.log"

last_field() {  # last_field FILE TYPE KEY
  grep "\"type\":\"$2\"" "$1" | tail -n 1 | sed -E "s/.*\"$3\":([-0-9.eE+]+).*/\1/"
}

for n in $blocks_list; do
  d=$((64 * n))
  dff=$((4 * d))
  for steps in $steps_list; do
    for G in $g_list; do
      name="b${n}-s${steps}-g${G}"
      f="$out/runs/$name.jsonl"
      start=$(date +%s)
      "$train" --threads 2 --train-bytes $((1 << 21)) --d-model "$d" --blocks "$n" --heads "$heads" --experts "$experts" --top-k 1 \
        --d-expert "$dff" --granularity "$G" --steps "$steps" --batch "$batch" --seq "$seq" --eval-interval 0 --log-interval 100 \
        --sample-tokens 0 --json "$f" >"$out/runs/$name.log"
      loss=$(last_field "$f" eval heldout_loss)
      # Non-embedding parameters: per block attention 4 d², two norms, the router (8G x d) and 8G experts
      # of 3 x d x dff/G; then the final norm.
      N=$(awk -v n="$n" -v d="$d" -v f="$dff" -v e="$experts" -v g="$G" \
        'BEGIN {printf "%.0f", n * (4 * d * d + 2 * d + e * g * d + e * g * 3 * d * (f / g)) + d}')
      D=$((steps * batch * seq))
      printf '{"total_params": %s, "tokens": %s, "granularity": %s, "loss": %s, "n_blocks": %s, "d_model": %s, "steps": %s, "seconds": %s}\n' \
        "$N" "$D" "$G" "$loss" "$n" "$d" "$steps" $(($(date +%s) - start)) >>"$runs"
      echo "$name: N $N D $D G $G held-out loss $loss ($(($(date +%s) - start)) s)" | tee -a "$out/sweep.log"
    done
  done
done
echo "sweep: $runs"
