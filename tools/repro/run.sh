#!/usr/bin/env bash
# Small-scale reproductions with examples/train_domains (docs/reproductions.md).
#   tools/repro/run.sh [a|b|c|all]     default: all
# SEEDS_A / SEEDS_B override the seed lists of (a) and (b).
# Runs are sequential, single-threaded (--threads 1: steadier than 2 threads on a shared 2-core VM),
# and write one JSON-lines file per run under tools/repro/results/. tables.py turns them into tables.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-build/r3/examples/train_domains/train_domains}
OUT=tools/repro/results
mkdir -p "$OUT"
COMMON=(--threads 1 --eval-interval 0 --log-interval 100000)

run() {  # run NAME FLAGS...
  local name=$1; shift
  echo "== $name: $BIN ${COMMON[*]} $*"
  "$BIN" "${COMMON[@]}" "$@" --json "$OUT/$name.jsonl" | grep -E "^held-out loss|mean over layers|zero-computation|GEMM FLOPs|^training"
}

what=${1:-all}

# (a) Global- vs micro-batch balance (Qwen, arXiv 2501.11873): every micro-batch from one domain,
#     4 micro-batches per step, so the global buffer spans up to 4 domains; equal steps and data.
if [[ $what == a || $what == all ]]; then
  for seed in ${SEEDS_A:-1234 99 7 2024}; do
    for scope in micro global; do
      run "a_${scope}_s${seed}" --pack-by-domain --accum 4 --steps 600 --balance "$scope" --seed "$seed"
    done
  done
fi

# (b) MoE++ (arXiv 2410.07348): 8 FFN experts, top-2, against 8 FFN + 1 zero + 1 copy + 2 constant.
if [[ $what == b || $what == all ]]; then
  for seed in ${SEEDS_B:-1234 99}; do
    run "b_ffn8_s$seed" --steps 1500 --seed "$seed"
    for tau in 1.0 0.75 0.1; do
      run "b_moepp_tau${tau}_s$seed" --steps 1500 --zero 1 --copy 1 --constant 2 --tau "$tau" --seed "$seed"
    done
  done
fi

# (c) Granularity (arXiv 2402.07871): d_ff 128, E 8, k_base 2 split into G*8 experts of 128/G,
#     top-2G: constant active and total parameters, equal tokens.
if [[ $what == c || $what == all ]]; then
  for g in 1 2 4 8; do
    run "c_G$g" --steps 1500 --granularity "$g"
  done
fi
