#!/usr/bin/env bash
# Checks, here (no GPU needed), that a .carry/ made by tools/device/build.sh can run on a lent GPU machine:
#   1. its size: at most 58 MiB (the device tool carries 64 MiB at most, the working tree included);
#   2. every carried ELF file (bin/*, lib/*, also inside device.tar.xz) NEEDs only shared libraries that
#      are carried in lib/, or that the GPU machine has: the CUDA runtime set (libcudart, libcublas,
#      libcublasLt from the toolkit or the nvidia-* wheels, libnccl from the nvidia-nccl-cu13 wheel,
#      libcuda from the driver) and the C/C++ runtime of any Linux image (glibc's libc, libm, libdl,
#      libpthread, librt, ld-linux; libstdc++, libgcc_s). The carried libraries' own NEEDED lists are
#      followed too. readelf -d (or objdump -p) reads the lists: ldd would resolve against this machine.
#   3. with --require NAMES: those binaries are carried (build.sh passes what run.sh runs);
#   4. when cuobjdump is here: every carried binary with device code holds sm_90a machine code (what
#      H100 and H200 run without a JIT).
# Exit 0 when all hold, 1 with a message per problem otherwise, 2 on bad usage.
#   bash tools/device/check_carry.sh [--require "moekit_gpu_tests bench_moe_layer train_lm"] [DIR]   # DIR: .carry
#   bash tools/device/check_carry.sh --provided libnccl.so.2   # exit 0: the GPU machine has it (build.sh asks)
#   bash tools/device/check_carry.sh --self-test   # builds good and bad fake carries in a temp folder (needs cc)
#                                                   # and asserts that the check passes and fails on them
set -uo pipefail

LIMIT_MIB=${CHECK_CARRY_LIMIT_MIB:-58}
# Sonames the GPU machine provides (regular expressions on the whole name).
SYSTEM_LIBS='^(libc\.so\.6|libm\.so\.6|libdl\.so\.2|libpthread\.so\.0|librt\.so\.1|libutil\.so\.1|libresolv\.so\.2|libmvec\.so\.1|ld-linux-x86-64\.so\.2|libstdc\+\+\.so\.6|libgcc_s\.so\.1)$'
CUDA_LIBS='^(libcudart\.so\.13|libcublas\.so\.13|libcublasLt\.so\.13|libnccl\.so\.2|libcuda\.so\.1)$'

needed_of() {  # the NEEDED sonames of an ELF file, one a line
  if command -v readelf >/dev/null 2>&1; then
    LC_ALL=C readelf -d "$1" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\].*/\1/p'
  else
    LC_ALL=C objdump -p "$1" 2>/dev/null | awk '$1 == "NEEDED" {print $2}'
  fi
}
is_elf() { [[ -f "$1" && "$(head -c 4 "$1" | od -An -c | tr -d ' ')" == '177ELF' ]]; }

# check DIR [REQUIRED...]: prints what is wrong; returns the number of problems (0: fit to carry).
check() {
  local dir=$1
  shift
  local problems=0 tmp root
  if [[ ! -d "$dir" ]]; then
    echo "check_carry: $dir does not exist (run tools/device/build.sh first)"
    return 1
  fi
  local bytes mib
  bytes=$(du -sb "$dir" | cut -f1)
  mib=$(awk -v b="$bytes" 'BEGIN {printf "%.1f", b / 1048576}')
  if ((bytes > LIMIT_MIB * 1048576)); then
    echo "check_carry: $dir is ${mib} MiB, over the ${LIMIT_MIB} MiB allowed (the device tool carries 64 MiB at most, working tree included)"
    du -ab "$dir" | sort -rn | sed -n '2,8p' | awk '{printf "  %8.1f MiB  %s\n", $1 / 1048576, $2}'
    problems=$((problems + 1))
  fi
  # The files as run.sh will see them: the archive unpacked beside the plain bin/ and lib/.
  root=$dir
  if [[ -f "$dir/device.tar.xz" ]]; then
    tmp=$(mktemp -d)
    if ! tar -xJf "$dir/device.tar.xz" -C "$tmp"; then
      echo "check_carry: $dir/device.tar.xz does not unpack"
      rm -rf "$tmp"
      return $((problems + 1))
    fi
    for sub in bin lib; do [[ -d "$dir/$sub" ]] && mkdir -p "$tmp/$sub" && cp -a "$dir/$sub/." "$tmp/$sub/"; done
    root=$tmp
  fi
  local carried=" " f
  for f in "$root"/lib/*; do [[ -e "$f" ]] && carried+="$(basename "$f") "; done
  local elves=() name lib
  for f in "$root"/bin/* "$root"/lib/*; do is_elf "$f" && elves+=("$f"); done
  for name in "$@"; do
    if [[ ! -f "$root/bin/$name" ]]; then echo "check_carry: bin/$name is not carried (run.sh runs it)"; problems=$((problems + 1)); fi
  done
  if ((${#elves[@]} == 0)); then echo "check_carry: no ELF file under $dir (bin/, lib/ or device.tar.xz)"; problems=$((problems + 1)); fi
  for f in "${elves[@]}"; do
    local rel=${f#"$root"/}
    while read -r lib; do
      [[ -z "$lib" ]] && continue
      [[ "$carried" == *" $lib "* ]] && continue
      [[ "$lib" =~ $SYSTEM_LIBS || "$lib" =~ $CUDA_LIBS ]] && continue
      echo "check_carry: $rel NEEDs $lib, which is neither carried (lib/) nor on the GPU machine (CUDA runtime, NCCL wheel, glibc, libstdc++)"
      problems=$((problems + 1))
    done < <(needed_of "$f")
  done
  # Device code: sm_90a SASS in each binary that has any (cuobjdump comes with nvcc).
  local cuobjdump
  cuobjdump=$(command -v cuobjdump || { [[ -x /usr/local/cuda/bin/cuobjdump ]] && echo /usr/local/cuda/bin/cuobjdump; } || true)
  if [[ -z "$cuobjdump" ]]; then
    echo "check_carry: (cuobjdump not found: the sm_90a machine code is not checked)"
  else
    for f in "$root"/bin/*; do
      is_elf "$f" || continue
      LC_ALL=C readelf -S "$f" 2>/dev/null | grep -q '\.nv_fatbin' || continue
      if ! "$cuobjdump" --list-elf "$f" 2>/dev/null | grep -q 'sm_90a'; then
        echo "check_carry: ${f#"$root"/} has device code but no sm_90a machine code (H100/H200 would need a PTX JIT or fail)"
        problems=$((problems + 1))
      fi
    done
  fi
  [[ -n "${tmp:-}" ]] && rm -rf "$tmp"
  if ((problems == 0)); then
    echo "check_carry: $dir ok: ${mib} MiB of ${LIMIT_MIB}, ${#elves[@]} ELF files, every NEEDED library carried or on the GPU machine"
  fi
  return "$problems"
}

self_test() {
  local cc
  cc=$(command -v cc || command -v gcc || command -v clang || true)
  if [[ -z "$cc" ]]; then echo "check_carry --self-test: no C compiler (cc, gcc, clang) to build the fake binaries"; return 1; fi
  local t fails=0
  t=$(mktemp -d)
  printf 'int moekit_selftest(void) { return 0; }\n' >"$t/lib.c"
  printf 'int moekit_selftest(void);\nint main(void) { return moekit_selftest(); }\n' >"$t/main.c"
  if ! "$cc" -shared -fPIC -Wl,-soname,libmoekit_selftest.so.1 -o "$t/libmoekit_selftest.so.1" "$t/lib.c" ||
    ! "$cc" -o "$t/prog" "$t/main.c" "$t/libmoekit_selftest.so.1"; then
    echo "check_carry --self-test: the fake binaries did not build"
    return 1
  fi
  # expect NAME WANT(0 pass|1 fail) DIR [REQUIRED...]
  expect() {
    local label=$1 want=$2 out rc
    shift 2
    out=$(check "$@" 2>&1)
    rc=$?
    if (( (rc == 0) == (want == 0) )); then
      echo "  ok   $label: $( ((rc == 0)) && echo passes || echo "fails ($(echo "$out" | head -n 1 | cut -c1-110))")"
    else
      echo "  FAIL $label: expected the check to $( ((want == 0)) && echo pass || echo fail), it $( ((rc == 0)) && echo passed || echo failed):"
      printf '       %s\n' "${out//$'\n'/$'\n'       }"
      fails=$((fails + 1))
    fi
  }
  echo "check_carry --self-test:"
  # good: the binary and the library it NEEDs, both carried
  mkdir -p "$t/good/bin" "$t/good/lib"
  cp "$t/prog" "$t/good/bin/prog" && cp "$t/libmoekit_selftest.so.1" "$t/good/lib/"
  expect "good plain carry" 0 "$t/good" prog
  # good, archived as build.sh does
  mkdir -p "$t/arch_src/bin" "$t/arch_src/lib" "$t/archived"
  cp "$t/prog" "$t/arch_src/bin/" && cp "$t/libmoekit_selftest.so.1" "$t/arch_src/lib/"
  tar -C "$t/arch_src" -cJf "$t/archived/device.tar.xz" bin lib
  expect "good archived carry" 0 "$t/archived" prog
  # bad: the library is not carried
  mkdir -p "$t/missing/bin"
  cp "$t/prog" "$t/missing/bin/prog"
  expect "binary NEEDs an uncarried library" 1 "$t/missing"
  # bad: a carried library NEEDs a second one (libmoekit_selftest2.so.1) that is left out
  mkdir -p "$t/transitive/bin" "$t/transitive/lib"
  printf 'int moekit_selftest2(void) { return 0; }\n' >"$t/lib2.c"
  printf 'int moekit_selftest2(void);\nint moekit_selftest(void) { return moekit_selftest2(); }\n' >"$t/lib1b.c"
  if ! "$cc" -shared -fPIC -Wl,-soname,libmoekit_selftest2.so.1 -o "$t/libmoekit_selftest2.so.1" "$t/lib2.c" ||
    ! "$cc" -shared -fPIC -Wl,-soname,libmoekit_selftest.so.1 -o "$t/transitive/lib/libmoekit_selftest.so.1" "$t/lib1b.c" \
      "$t/libmoekit_selftest2.so.1"; then
    echo "check_carry --self-test: the fake libraries did not build"
    return 1
  fi
  cp "$t/prog" "$t/transitive/bin/prog"
  expect "carried library NEEDs an uncarried one" 1 "$t/transitive"
  # bad: over the size limit (a sparse file: du -b counts its apparent size, as the tool does bytes)
  mkdir -p "$t/big/bin" "$t/big/lib"
  cp "$t/prog" "$t/big/bin/" && cp "$t/libmoekit_selftest.so.1" "$t/big/lib/"
  truncate -s $(((LIMIT_MIB + 1) * 1048576)) "$t/big/lib/filler"
  expect "over ${LIMIT_MIB} MiB" 1 "$t/big"
  # bad: a binary run.sh needs is missing
  expect "required binary missing" 1 "$t/good" prog moekit_gpu_tests
  # bad: no carry at all
  expect "no .carry" 1 "$t/nonexistent"
  rm -rf "$t"
  if ((fails)); then echo "check_carry --self-test: $fails case(s) wrong"; return 1; fi
  echo "check_carry --self-test: all cases as expected"
}

required=()
dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/.carry"
while (($#)); do
  case $1 in
    --self-test) self_test; exit $? ;;
    --provided) # --provided SONAME: exit 0 if the GPU machine has it (build.sh carries every other library)
      [[ $# -ge 2 ]] || { echo "check_carry: --provided needs a soname"; exit 2; }
      [[ "$2" =~ $SYSTEM_LIBS || "$2" =~ $CUDA_LIBS ]]; exit $? ;;
    --require) [[ $# -ge 2 ]] || { echo "check_carry: --require needs a list"; exit 2; }; read -r -a required <<<"$2"; shift 2 ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    -*) echo "check_carry: unknown option $1"; exit 2 ;;
    *) dir=$1; shift ;;
  esac
done
check "$dir" "${required[@]}"
n=$?
((n == 0)) || { echo "check_carry: $dir is not fit to carry ($n problem(s))"; exit 1; }
