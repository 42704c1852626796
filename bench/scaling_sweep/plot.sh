#!/usr/bin/env bash
# Pictures of a sweep (sweep.sh) and its fit (moekit-plan --fit ... --out OUT_DIR/coefficients.json):
#   OUT_DIR/loss_vs_g.png       held-out loss against G for each depth and step count (points), with
#                               the fitted law at those runs' N and D (lines)
#   OUT_DIR/fit_vs_measured.png the fitted law's prediction against each run's measured loss
#
#   bench/scaling_sweep/plot.sh OUT_DIR
set -euo pipefail
out=${1:?usage: plot.sh OUT_DIR}
runs="$out/runs.jsonl"
coef="$out/coefficients.json"
command -v gnuplot >/dev/null || { echo "plot.sh: gnuplot not found (Debian: gnuplot-nox)" >&2; exit 2; }
[[ -f "$runs" && -f "$coef" ]] || { echo "plot.sh: need $runs and $coef" >&2; exit 2; }
get() { sed -nE "s/^ *\"$1\": *([-0-9.eE+]+),?$/\1/p" "$coef" | head -n 1; }
a=$(get a) alpha=$(get alpha) b=$(get b) beta=$(get beta) g=$(get g) gamma=$(get gamma) c=$(get c)
field() { sed -E "s/.*\"$1\": *([-0-9.eE+]+).*/\1/"; }
# One table: n_blocks steps N D G measured predicted
table="$out/.table.dat"
while IFS= read -r line; do
  n=$(field n_blocks <<<"$line") s=$(field steps <<<"$line") N=$(field total_params <<<"$line") D=$(field tokens <<<"$line")
  G=$(field granularity <<<"$line") L=$(field loss <<<"$line")
  awk -v n="$n" -v s="$s" -v N="$N" -v D="$D" -v G="$G" -v L="$L" -v a="$a" -v al="$alpha" -v b="$b" -v be="$beta" -v g="$g" \
    -v ga="$gamma" -v c="$c" 'BEGIN {printf "%s %s %s %s %s %s %.6f\n", n, s, N, D, G, L, c + (g / G ^ ga + a) / N ^ al + b / D ^ be}'
done <"$runs" | sort -n -k1,1 -k2,2 -k5,5 >"$table"
# Blank lines between (n_blocks, steps) groups, so gnuplot draws each as its own series (index).
awk 'NR > 1 && ($1 != p1 || $2 != p2) {print ""; print ""} {print; p1 = $1; p2 = $2}' "$table" >"$out/.groups.dat"
# The plot clauses, one pair per group, titled by depth and steps.
clauses=$(awk 'NF == 0 {next} ($1 != p1 || $2 != p2) {k++; p1 = $1; p2 = $2; t[k] = $1 " block" ($1 > 1 ? "s" : "") ", " $2 " steps"}
  END {for (i = 1; i <= k; ++i) printf "%s\"%s\" index %d using 5:6 with points pt 7 ps 1.2 lc %d title \"%s\", \"%s\" index %d using 5:7 with lines lc %d notitle",
       (i > 1 ? ", " : ""), f, i - 1, i, t[i], f, i - 1, i}' f="$out/.groups.dat" "$table")
gnuplot <<EOF
set terminal pngcairo noenhanced size 900,600
set output "$out/loss_vs_g.png"
set logscale x 2
set xlabel "granularity G (experts of d_ff / G, top-G)"
set ylabel "held-out loss (nats per byte)"
set title "train_lm sweep: measured (points) and the fitted Eq. 9 at each run's N and D (lines)"
set key outside right
plot $clauses
set output "$out/fit_vs_measured.png"
unset logscale x
set xlabel "measured held-out loss"
set ylabel "fitted law's prediction"
set title "Eq. 9 fitted to the sweep: prediction against measurement"
set key top left
plot "$table" using 6:7 with points pt 7 title "runs", x with lines dt 2 title "y = x"
EOF
rm -f "$table" "$out/.groups.dat"
echo "plot.sh: $out/loss_vs_g.png $out/fit_vs_measured.png"
