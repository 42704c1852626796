#!/usr/bin/env bash
# MoE against dense at equal wall-clock time (Du et al., arXiv 2405.15052; docs/science.md): train_lm's
# MoE model and its dense twin of equal active parameters (--dense) each train for the same budget of
# training time (train_lm --time-budget: evaluations excluded, the learning-rate schedule over time, so
# each model completes its own warmup and cosine decay in the budget whatever its step time) on the same
# data, for several seeds; the held-out loss at the end is the comparison, and the eval rows (with
# elapsed_s) draw held-out loss against wall time.
#
#   bench/step_time/equal_time.sh BUILD_DIR OUT_DIR [BUDGET_S=90] [SEEDS="1 2 3"] [DATASETS="embedded licenses"]
#
# BUILD_DIR holds examples/train_lm/train_lm and tools/plot_run/plot_run. Writes OUT_DIR/<data>-<model>-s<seed>.jsonl,
# OUT_DIR/summary.txt (held-out loss per run, mean and standard error per model, the paired difference)
# and, with plot_run and gnuplot, OUT_DIR/plots-<data>/ (loss against steps and against wall time, every
# run). The runs alternate MoE and dense so that the machine's drift falls on both; nothing else should
# run meanwhile.
set -euo pipefail
build=${1:?usage: equal_time.sh BUILD_DIR OUT_DIR [BUDGET_S] [SEEDS] [DATASETS]}
out=${2:?usage: equal_time.sh BUILD_DIR OUT_DIR [BUDGET_S] [SEEDS] [DATASETS]}
budget=${3:-90}
seeds=${4:-"1 2 3"}
datasets=${5:-"embedded licenses"}
train="$build/examples/train_lm/train_lm"
plot="$build/tools/plot_run/plot_run"
[[ -x "$train" ]] || { echo "equal_time: $train not built" >&2; exit 2; }
mkdir -p "$out"
# --steps: a cap far above what the budget allows (and the schedule's nominal length: its warmup is
# the first 5 % of the budget either way).
common=(--threads 2 --sample-tokens 0 --time-budget "$budget" --steps 100000 --log-interval 25 --eval-interval 100 --eval-bytes 16384)

# The licence texts Debian installs, each file once (symlinks resolved), as in train_lm's ctest.
licenses="$out/licenses.txt"
if [[ " $datasets " == *" licenses "* ]]; then
  : >"$licenses"
  declare -A seen=()
  for f in /usr/share/common-licenses/*; do
    r=$(realpath "$f")
    [[ -f "$r" && -z "${seen[$r]:-}" ]] || continue
    seen[$r]=1
    cat "$r" >>"$licenses"
  done
fi

json_field() {  # json_field FILE TYPE KEY: KEY of the last row of TYPE
  grep "\"type\":\"$2\"" "$1" | tail -n 1 | sed -E "s/.*\"$3\":([-0-9.eE+]+).*/\1/"
}

summary="$out/summary.txt"
{
  echo "# equal_time.sh $*"
  echo "# $(date -u +%FT%TZ) | $(lscpu | sed -n 's/^Model name: *//p') | $(nproc) cores | load $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "# budget ${budget} s of training per run; seeds: $seeds"
} >"$summary"

for data in $datasets; do
  dargs=()
  [[ "$data" == licenses ]] && dargs=(--data "$licenses")
  # 2. The runs, MoE and dense alternated.
  files=()
  for seed in $seeds; do
    for model in moe dense; do
      margs=()
      [[ "$model" == dense ]] && margs=(--dense)
      f="$out/$data-$model-s$seed.jsonl"
      "$train" "${dargs[@]}" "${margs[@]}" "${common[@]}" --seed "$seed" --json "$f" >"$out/$data-$model-s$seed.log"
      printf '%-9s %-6s seed %-3s steps %6d  train %7.1f s  held-out loss %.4f nats/byte (%.4f bits/byte)\n' "$data" "$model" "$seed" \
        "$(json_field "$f" eval step)" "$(json_field "$f" eval elapsed_s)" "$(json_field "$f" eval heldout_loss)" \
        "$(json_field "$f" eval heldout_bits_per_byte)" | tee -a "$summary"
      files+=("$f")
    done
  done
  # 3. Mean and standard error per model, and the paired difference MoE - dense (same seed, same data).
  # (Conditions in awk's printf arguments are parenthesised: a bare ">" there would redirect the output.)
  grep -E "^$data +(moe|dense) " "$summary" | awk -v d="$data" '
    {v = $0; sub(/.*held-out loss /, "", v); sub(/ .*/, "", v); seed = $4; x[$2, seed] = v; s[$2] += v; q[$2] += v * v; n[$2]++; seen[seed] = 1}
    END {
      for (m in n) {
        mu = s[m] / n[m]; var = (n[m] > 1) ? (q[m] - n[m] * mu * mu) / (n[m] - 1) : 0; if (var < 0) var = 0
        printf "%-9s %-6s mean held-out loss %.4f +- %.4f (standard error over %d seeds)\n", d, m, mu, sqrt(var / n[m]), n[m]
      }
      k = 0; sd = 0; sq = 0
      for (seed in seen) if ((("moe", seed) in x) && (("dense", seed) in x)) { diff = x["moe", seed] - x["dense", seed]; k++; sd += diff; sq += diff * diff }
      if (k > 0) {
        md = sd / k; vd = (k > 1) ? (sq - k * md * md) / (k - 1) : 0; if (vd < 0) vd = 0
        printf "%-9s moe - dense, paired by seed: %+.4f +- %.4f nats/byte (standard error, %d pairs; negative: MoE better)\n", d, md, sqrt(vd / k), k
      }
    }' | tee -a "$summary"
  if [[ -x "$plot" ]]; then "$plot" --out "$out/plots-$data" "${files[@]}" >/dev/null || echo "equal_time: plot_run failed" >&2; fi
done
echo "equal_time: $summary"
