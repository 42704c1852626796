#!/usr/bin/env bash
# Runs on the lent GPU machine, from the repository root, with .carry/ from tools/device/build.sh.
# Every stage is bounded by time, so that one call of the device tool (10 minutes at most) always
# brings back the gpu test results and a quick benchmark, whatever hangs or runs long later:
#   1 tests      the gpu tests (doctest, --duration)                      cap 240 s
#   2 lm         train_lm --backend cuda against --backend host (examples/train_lm/cuda_test.sh)   cap 120 s
#   3 quick      bench: one coarse and one fine-grained shape, the three GEMM strategies   cap 150 s
#   4 lm_bench   train_lm --backend cuda --dtype bf16, a ~110M-parameter model, 40 steps: tokens/s, MFU   cap 120 s
#   5 full       bench: every shape, every strategy                       cap 240 s
#   6 sanitize   compute-sanitizer memcheck, then racecheck, on a subset of the gpu tests   cap 150 s each
# A stage starts only when the time left (of BUDGET_S, default 540) covers its minimum; it is killed
# at min(cap, time left − 15 s). A table of what ran, passed, failed, timed out or was skipped comes
# last. Files under $OUT (the tool brings back 8 at most): summary.txt, gpu_tests.log, lm.log (both lm
# stages), bench_quick.{log,json}, bench_full.{log,json}, sanitize.log.
#
# How the full stage fits its cap: bench_moe_layer gets --time-budget (the stage's limit − 30 s; the
# quick stage's − 20 s), so it starts no row that its previous row's time (scaled by FLOPs) says would
# not end in time, lists the rows left as skipped and exits 0 with a complete JSON. It also skips, and lists, any shape whose estimated
# device memory exceeds the GPU's free memory (deepseek-v3-routed: about 68 GiB in bf16, so it runs on an
# H100's 80 GB and an H200's 141 GB). And it rewrites its JSON after every row: if the cap kills it
# anyway, bench_full.json holds every row measured so far ("complete": false).
#
# Before any stage: .carry/device.tar.xz is unpacked (xz, or python3's tarfile) into a temporary folder
# (removed at exit), the CUDA libraries the
# binaries NEED are looked for (libcudart, libcublas, libcublasLt: /usr/local/cuda/lib64, else python3's
# nvidia-* wheels; libnccl.so.2: the nvidia-nccl-cu13 wheel's nvidia/nccl/lib) and put on
# LD_LIBRARY_PATH, and ldd runs on every carried binary and library: anything "not found" stops the run
# (exit 3) with the list. MOEKIT_REQUIRE_GPU=1 is exported: a program that finds no device fails (the gpu
# tests and the bench exit 1); an exit 77 (no device, skipped) counts as a failure here as well.
#
#   run(command="bash tools/device/run.sh", carry=[".carry"], timeout_s=600)
#   run(command="BUDGET_S=300 bash tools/device/run.sh tests quick", ...)   # only some stages
#
# DRY_RUN=1 (here, no GPU): every stage's command line runs with a stub in place of each GPU program
# (moekit_gpu_tests, bench_moe_layer, train_lm, compute-sanitizer, nvidia-smi): it prints its arguments,
# sleeps a moment, writes the JSON (or train_lm's JSON Lines) it was asked for, and exits 0. Stage caps
# become DRY_CAP_S (default 3 s). To rehearse failures, name stages (or stage:label) in
#   STUB_FAIL (exit 1), STUB_NODEV (exit 77), STUB_HANG (sleeps past its cap), e.g.
#   DRY_RUN=1 STUB_FAIL=lm STUB_HANG=full STUB_NODEV=sanitize:racecheck OUT=/tmp/dry bash tools/device/run.sh
# The library check then only reports on the real .carry, if there is one.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
OUT="${OUT:-out}"
mkdir -p "$OUT"
budget="${BUDGET_S:-540}"
dry=0
[[ "${DRY_RUN:-0}" != 0 ]] && dry=1
stages=("$@")
((${#stages[@]})) || stages=(tests lm quick lm_bench full sanitize)
export MOEKIT_REQUIRE_GPU=1
export OMP_NUM_THREADS=8 OPENBLAS_NUM_THREADS=1 OMP_WAIT_POLICY=passive
start=$(date +%s)
rows=()
overall=0

left() { echo $((budget - ($(date +%s) - start))); }
wanted() { local s; for s in "${stages[@]}"; do [[ "$s" == "$1" || "$s" == all ]] && return 0; done; return 1; }
# The time limit a stage of this cap gets now: min(cap, time left − 15 s); DRY_CAP_S in a dry run.
limit_for() {
  local cap=$1 l
  ((dry)) && cap=${DRY_CAP_S:-3}
  l=$(left)
  echo $((cap < l - 15 ? cap : l - 15))
}
say() { echo "$*" | tee -a "$OUT/summary.txt"; }

# ---- the carried programs and libraries -------------------------------------------------------------
echo "run.sh $(date -u +%FT%TZ), budget ${budget} s, stages: ${stages[*]}$( ((dry)) && echo ' (DRY RUN: stubs in place of the GPU programs)')" |
  tee "$OUT/summary.txt"
carry=${CARRY_DIR:-.carry}  # another folder: for rehearsals of the library check here
root=""
temps=()  # removed at exit: the unpacked carry (outside .carry, which must stay small here), the stubs
trap 'rm -rf "${temps[@]}"' EXIT
if [[ -f "$carry/device.tar.xz" ]]; then
  unpacked=$(mktemp -d "${TMPDIR:-/tmp}/moekit-carry.XXXXXX")
  temps+=("$unpacked")
  if command -v xz >/dev/null 2>&1; then
    tar -xJf "$carry/device.tar.xz" -C "$unpacked" && root=$unpacked
  else
    python3 - "$carry/device.tar.xz" "$unpacked" <<'EOF' && root=$unpacked
import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    try:
        t.extractall(sys.argv[2], filter="tar")
    except TypeError:  # Python before 3.12: no filter argument
        t.extractall(sys.argv[2])
EOF
  fi
  [[ -n "$root" ]] || say "run.sh: $carry/device.tar.xz did not unpack"
elif [[ -d "$carry/bin" ]]; then
  root=$carry  # a carry packed by hand, unarchived
fi
if [[ -z "$root" ]] && ((!dry)); then
  say "run.sh: no $carry/device.tar.xz (or $carry/bin): run tools/device/build.sh here first, and carry .carry"
  exit 2
fi

# The CUDA libraries the binaries NEED and the GPU machine has: the toolkit's first, else the wheels'.
lib_dirs=()
[[ -n "$root" && -d "$root/lib" ]] && lib_dirs+=("$(cd "$root/lib" && pwd)")
cuda_lib=${CUDA_LIB_DIR:-/usr/local/cuda/lib64}  # another folder: for rehearsals of the wheel search here
[[ -d "$cuda_lib" ]] && lib_dirs+=("$cuda_lib")
wheel_dirs=$(python3 - 2>>"$OUT/summary.txt" <<'EOF'
# Every nvidia/<package>/lib folder of this python3 (nvidia is a namespace package: its __path__ lists
# each site-packages that holds a part of it), then the same found by a search of site-packages.
import os, site
dirs = []
def add(base):
    if not os.path.isdir(base):
        return
    for sub in sorted(os.listdir(base)):
        d = os.path.join(base, sub, "lib")
        if os.path.isdir(d) and d not in dirs:
            dirs.append(d)
try:
    import nvidia
    for p in nvidia.__path__:
        add(p)
except Exception as e:
    print("run.sh: python3 cannot import nvidia (%s); searching site-packages" % e)
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    add(os.path.join(sp, "nvidia"))
print("\n".join(dirs))
EOF
) || wheel_dirs=""
for soname in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libnccl.so.2; do
  where=""
  for d in "${lib_dirs[@]}"; do [[ -e "$d/$soname" ]] && where=$d && break; done
  if [[ -z "$where" ]]; then
    while read -r d; do [[ -n "$d" && -e "$d/$soname" ]] && where=$d && lib_dirs+=("$d") && break; done <<<"$wheel_dirs"
  fi
  [[ -z "$where" ]] && ldconfig -p 2>/dev/null | grep -q "$soname " && where="(the system's, ldconfig)"
  say "  $soname: ${where:-not found on this machine}"
done
LD_LIBRARY_PATH="$(IFS=:; echo "${lib_dirs[*]}")${LD_LIBRARY_PATH:+:${LD_LIBRARY_PATH}}"
export LD_LIBRARY_PATH
export PATH="/usr/local/cuda/bin:${PATH}"  # compute-sanitizer
say "  LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

# ldd on every carried binary and library: what would not load stops the run, before any stage.
missing=""
if [[ -n "$root" ]]; then
  for f in "$root"/bin/* "$root"/lib/*; do
    [[ -f "$f" ]] || continue
    m=$(ldd "$f" 2>&1 | awk '/not found/ {print $1}' | sort -u | tr '\n' ' ')
    [[ -n "$m" ]] && missing+="  ${f#"$root"/} needs: $m"$'\n'
  done
fi
if [[ -n "$missing" ]]; then
  say "run.sh: shared libraries not found (LD_LIBRARY_PATH above):"
  printf '%s' "$missing" | tee -a "$OUT/summary.txt"
  if ((!dry)); then
    say "run.sh: stopping before any stage (exit 3): carry these libraries (tools/device/build.sh) or install their package"
    exit 3
  fi
  say "run.sh: (dry run: going on with the stubs)"
elif [[ -n "$root" ]]; then
  say "  ldd: every library of $(find "$root/bin" "$root/lib" -type f | wc -l) carried files found"
else
  say "  ldd: no carried binaries here (dry run)"
fi

# ---- the stubs of a dry run -------------------------------------------------------------------------
bin="$root/bin"
if ((dry)); then
  bin=$(mktemp -d)
  temps+=("$bin")
  cat >"$bin/stub" <<'EOF'
#!/usr/bin/env bash
# run.sh DRY_RUN stub: prints its arguments, writes the JSON asked for, exits 0 (or as STUB_* ask).
name=$(basename "$0")
stage=${MOEKIT_STAGE:-?}
echo "stub $name [stage $stage]: $*"
asked() { local s; for s in ${1//,/ }; do [[ "$s" == "$stage" || "$s" == "${stage%%:*}" ]] && return 0; done; return 1; }
json=""
prev=""
for a in "$@"; do [[ "$prev" == --json ]] && json=$a; prev=$a; done
case $name in
  nvidia-smi)
    echo "name, driver_version, memory.total [MiB], clocks.current.sm [MHz], clocks.current.memory [MHz]"
    echo "STUB H100 (dry run), 580.00.00, 81559 MiB, 1980 MHz, 2619 MHz"
    exit 0 ;;
  train_lm)
    [[ -n "$json" ]] && printf '%s\n' '{"type":"train","step":50,"loss":3.2}' '{"type":"eval","step":200,"heldout_bits_per_byte":2.9}' >"$json" ;;
  bench_moe_layer)
    if [[ -n "$json" ]]; then  # rewritten after each row, as the real bench does
      for n in 1 2 3; do
        rows=""
        for ((i = 1; i <= n; i++)); do rows+="${rows:+,}{\"shape\":\"stub\",\"row\":$i}"; done
        printf '{"device":"stub","complete":%s,"rows":[%s],"skipped":[]}\n' "$([[ $n == 3 ]] && echo true || echo false)" "$rows" >"$json"
        ((n == 2)) && asked "${STUB_HANG:-}" && { echo "stub: hanging after 2 rows (STUB_HANG)"; exec sleep 100000; }
        sleep 0.1
      done
    fi ;;
  compute-sanitizer) echo "========= COMPUTE-SANITIZER (stub)" ;;
esac
asked "${STUB_HANG:-}" && { echo "stub: hanging (STUB_HANG)"; exec sleep 100000; }
sleep 0.3
asked "${STUB_FAIL:-}" && { echo "stub: failing (STUB_FAIL)"; exit 1; }
asked "${STUB_NODEV:-}" && { echo "stub: no CUDA device (STUB_NODEV)"; exit 77; }
[[ $name == compute-sanitizer ]] && echo "========= ERROR SUMMARY: 0 errors"
exit 0
EOF
  chmod +x "$bin/stub"
  for p in moekit_gpu_tests bench_moe_layer train_lm compute-sanitizer nvidia-smi; do ln -s stub "$bin/$p"; done
  export PATH="$bin:$PATH"
fi

{
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
  else
    echo "nvidia-smi: not found (the programs below will say whether they see a device)"
  fi
} | tee -a "$OUT/summary.txt"
if ((!dry)) && [[ ! -x "$bin/moekit_gpu_tests" ]]; then
  say "run.sh: $bin/moekit_gpu_tests missing (run tools/device/build.sh here first)"
  exit 2
fi

# ---- the stages -------------------------------------------------------------------------------------
# stage NAME[:LABEL] CAP MIN LOG COMMAND...: runs COMMAND under timeout, appending to LOG; records a row.
stage() {
  local name=${1%%:*} label=$1 cap=$2 min=$3 log=$4
  shift 4
  if ! wanted "$name"; then rows+=("$label|not asked|0|-"); return; fi
  local l; l=$(left)
  if ((l < min)); then rows+=("$label|skipped: ${l} s left, needs ${min}|0|-"); overall=1; return; fi
  local limit; limit=$(limit_for "$cap")
  local t0 n0; t0=$(date +%s)
  n0=0  # a log two stages share: show only this stage's lines below
  [[ -f "$OUT/$log" ]] && n0=$(wc -l <"$OUT/$log")
  echo "== $label (limit ${limit} s): $*" >>"$OUT/$log"
  MOEKIT_STAGE=$label timeout --kill-after=10 "$limit" "$@" >>"$OUT/$log" 2>&1
  local rc=$?
  local dt=$(($(date +%s) - t0)) what
  case $rc in
    0) what=passed ;;
    124 | 137) what="TIMED OUT after ${limit} s" ;;
    77) what="FAILED: exit 77, no CUDA device" ;;
    *) what="FAILED (exit $rc)" ;;
  esac
  ((rc == 0)) || overall=1
  rows+=("$label|$what|$dt|$log")
  tail -n +$((n0 + 1)) "$OUT/$log" | tail -n 25
}

stage tests 240 60 gpu_tests.log "$bin/moekit_gpu_tests" --duration=true
stage lm 120 60 lm.log bash examples/train_lm/cuda_test.sh "$bin/train_lm" --steps 200 --eval-interval 100 --d-model 64 \
  --d-expert 128 --blocks 2 --seq 64 --threads 8 --log-interval 50 --sample-tokens 80
quick_limit=$(limit_for 150)
stage quick 150 45 bench_quick.log "$bin/bench_moe_layer" --backend cuda --gemm all --reps 3 --shape mixtral --shape olmoe \
  --time-budget $((quick_limit > 60 ? quick_limit - 20 : quick_limit * 2 / 3)) --json "$OUT/bench_quick.json"
# ~110M parameters: 8 blocks of attention (4·512² each) and 8 experts of 3·512·1024 (12.6M per block).
stage lm_bench 120 45 lm.log "$bin/train_lm" --backend cuda --dtype bf16 --d-model 512 --heads 8 --blocks 8 --experts 8 --top-k 2 \
  --d-expert 1024 --seq 512 --batch 32 --steps 40 --log-interval 10 --eval-interval 0 --sample-tokens 0
# The bench stops starting rows 30 s before the stage's limit (header); at least 2/3 of a short limit.
full_limit=$(limit_for 240)
full_budget=$((full_limit > 90 ? full_limit - 30 : full_limit * 2 / 3))
stage full 240 120 bench_full.log "$bin/bench_moe_layer" --backend cuda --gemm all --reps 10 --time-budget "$full_budget" \
  --json "$OUT/bench_full.json"
# The subset: the kernels, the router, the permutation in chunks, one layer battery (fp32) and the nn/cuda ops; the
# bf16 and distributed batteries repeat the same kernels.
subset='--test-case=cuda activation*,cuda permute*,cuda combine*,cuda router*,*device matches host,cuda layer fp32*,nn::cuda*'
sanitizer=$(command -v compute-sanitizer || true)
[[ -z "$sanitizer" && -x /usr/local/cuda/compute-sanitizer/compute-sanitizer ]] && sanitizer=/usr/local/cuda/compute-sanitizer/compute-sanitizer
if [[ -n "$sanitizer" ]] || ! wanted sanitize; then
  stage sanitize:memcheck 150 60 sanitize.log "${sanitizer:-compute-sanitizer}" --tool memcheck --error-exitcode 1 "$bin/moekit_gpu_tests" "$subset"
  stage sanitize:racecheck 150 60 sanitize.log "${sanitizer:-compute-sanitizer}" --tool racecheck --error-exitcode 1 "$bin/moekit_gpu_tests" "$subset"
else
  rows+=("sanitize|FAILED: compute-sanitizer not found|0|-")
  overall=1
fi
rm -f "$OUT"/*.part  # a JSON the bench was rewriting when its cap killed it (the tool brings back 8 files)

{
  echo
  printf '%-19s | %-40s | %7s | %s\n' stage result seconds log
  printf '%s\n' "--------------------+------------------------------------------+---------+------------------"
  for r in "${rows[@]}"; do IFS='|' read -r a b c d <<<"$r"; printf '%-19s | %-40s | %7s | %s\n' "$a" "$b" "$c" "$d"; done
  echo "run.sh: $(($(date +%s) - start)) s of ${budget}; overall exit status $overall$( ((dry)) && echo ' (dry run)')"
} | tee -a "$OUT/summary.txt"
exit "$overall"
