#!/usr/bin/env bash
# MoE against dense at equal wall-clock time (Du et al., arXiv 2405.15052; docs/science.md): train_lm's
# MoE model and its dense twin of equal active parameters (--dense) get the same training time on the
# same data, for several seeds. Each model's steps are its measured step time divided into the budget
# (so each run completes its own cosine schedule); the held-out loss at the end and along the way
# (eval rows, with elapsed_s: training time, evaluations excluded) are compared at equal time.
#
#   bench/step_time/equal_time.sh BUILD_DIR OUT_DIR [BUDGET_S=90] [SEEDS="1 2 3"] [DATASETS="embedded licenses"]
#
# BUILD_DIR holds examples/train_lm/train_lm and tools/plot_run/plot_run. Writes OUT_DIR/<data>-<model>-s<seed>.jsonl,
# OUT_DIR/summary.txt (held-out loss per run, mean and spread per model) and, with plot_run and gnuplot,
# OUT_DIR/plots-<data>/ (loss against steps and against wall time, every run). The runs alternate MoE and
# dense so that the machine's drift falls on both; nothing else should run meanwhile.
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
common=(--threads 2 --sample-tokens 0)

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
  # 1. Step time of each model, warm: 120 steps logged every 40, the last interval's step time (the
  # first steps pay for warm-up and, in MoE, for the router's early imbalance), twice each, alternated.
  unset step_ms steps; declare -A step_ms=() steps=()
  for model in moe dense moe dense; do
    margs=()
    [[ "$model" == dense ]] && margs=(--dense)
    tmp="$out/.calibrate.jsonl"
    "$train" "${dargs[@]}" "${margs[@]}" "${common[@]}" --log-interval 40 --steps 120 --eval-interval 0 --eval-bytes 4096 --json "$tmp" >/dev/null
    step_ms[$model]="${step_ms[$model]:-} $(json_field "$tmp" train step_time_ms)"
  done
  for model in moe dense; do
    steps[$model]=$(echo "${step_ms[$model]}" | awk -v b="$budget" '{s = 0; for (i = 1; i <= NF; ++i) s += $i; printf "%d", b * 1000 / (s / NF)}')
    echo "# $data $model: warm step time${step_ms[$model]} ms -> ${steps[$model]} steps in ${budget} s" >>"$summary"
  done
  # 2. The runs, MoE and dense alternated.
  files=()
  for seed in $seeds; do
    for model in moe dense; do
      margs=()
      [[ "$model" == dense ]] && margs=(--dense)
      f="$out/$data-$model-s$seed.jsonl"
      n=${steps[$model]}
      "$train" "${dargs[@]}" "${margs[@]}" "${common[@]}" --seed "$seed" --log-interval 50 --steps "$n" --eval-interval $((n / 6 > 0 ? n / 6 : 1)) \
        --json "$f" >"$out/$data-$model-s$seed.log"
      printf '%-9s %-6s seed %-3s steps %6d  train %7.1f s  held-out loss %.4f nats/byte (%.4f bits/byte)\n' "$data" "$model" "$seed" "$n" \
        "$(json_field "$f" eval elapsed_s)" "$(json_field "$f" eval heldout_loss)" "$(json_field "$f" eval heldout_bits_per_byte)" |
        tee -a "$summary"
      files+=("$f")
      # The next seed's steps from this whole run's own step time: the calibration's short runs miss
      # how the step time moves over a run (routing settles, evaluations warm the caches).
      steps[$model]=$(awk -v b="$budget" -v t="$(json_field "$f" eval elapsed_s)" -v n="$n" 'BEGIN {printf "%d", b / (t / n)}')
    done
  done
  # 3. Mean and spread (sample standard deviation) per model.
  for model in moe dense; do
    grep -E "^$data +$model " "$summary" | sed -E 's/.*held-out loss ([0-9.]+).*/\1/' |
      awk -v d="$data" -v m="$model" '{x[NR] = $1; s += $1} END {mu = s / NR; for (i = 1; i <= NR; ++i) v += (x[i] - mu) ^ 2;
        printf "%-9s %-6s mean held-out loss %.4f +- %.4f (sd over %d seeds)\n", d, m, mu, NR > 1 ? sqrt(v / (NR - 1)) : 0, NR}' |
      tee -a "$summary"
  done
  if [[ -x "$plot" ]]; then "$plot" --out "$out/plots-$data" "${files[@]}" >/dev/null || echo "equal_time: plot_run failed" >&2; fi
done
rm -f "$out/.calibrate.jsonl"
echo "equal_time: $summary"
