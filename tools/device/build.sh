#!/usr/bin/env bash
# Builds, on this machine (no GPU needed), what a lent H100/H200 runs, and packs it under .carry/ (git-ignored)
# for the device tool's `carry` (64 MiB at most with the working tree; check_carry.sh holds .carry to 58 MiB):
#   .carry/device.tar.xz  bin/: moekit_gpu_tests, bench_moe_layer, train_lm (stripped);
#                         lib/: every shared library they NEED, directly or through another, that the GPU
#                         machine lacks (today OpenBLAS on OpenMP, libgfortran, libquadmath, libgomp)
#   .carry/MANIFEST       what the archive holds: sizes and NEEDED lists
# run.sh unpacks the archive (xz, or python3's tarfile) into .carry/unpacked/ there.
# - Device code: sm_90a machine code only. H100 and H200 are both compute capability 9.0 and run sm_90a
#   code; sm_90 machine code or PTX would only be a fallback neither machine uses, and would double the
#   device code. MOEKIT_DEVICE_GENCODE replaces the nvcc flags (e.g. to add PTX for another GPU).
# - Configured without MPI (CMAKE_DISABLE_FIND_PACKAGE_MPI): the GPU machine has no Open MPI, and
#   train_lm then refuses --parallel with a clear error. cuBLAS, cudart and NCCL are not carried (NCCL
#   alone is over 200 MB): run.sh finds them there, in the toolkit or in python3's nvidia-* wheels.
# - moekit-layer is not built: no stage of run.sh runs it.
# Ends with tools/device/check_carry.sh (size, NEEDED lists, sm_90a code), which fails the build if the
# carry would not fit or not load there.
#   bash tools/device/build.sh            # then: run(command="bash tools/device/run.sh", carry=[".carry"])
#   JOBS=1 bash tools/device/build.sh     # parallel compile jobs (default 2); on 2 cores this takes a while
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if ! command -v nvcc >/dev/null 2>&1 && [[ -x /usr/local/cuda/bin/nvcc ]]; then export PATH="/usr/local/cuda/bin:${PATH}"; fi
gencode=${MOEKIT_DEVICE_GENCODE:--gencode=arch=compute_90a,code=sm_90a}
t0=$(date +%s)
cmake -S . -B build/device -DCMAKE_BUILD_TYPE=Release -DMOEKIT_ENABLE_CUDA=ON -DMOEKIT_INSTALL=OFF \
  -DCMAKE_DISABLE_FIND_PACKAGE_MPI=ON -DCMAKE_CUDA_ARCHITECTURES=OFF "-DCMAKE_CUDA_FLAGS=${gencode}" >/dev/null
t1=$(date +%s)
targets=(moekit_gpu_tests bench_moe_layer train_lm)
cmake --build build/device -j "${JOBS:-2}" --target "${targets[@]}"
t2=$(date +%s)
bins=(build/device/tests/gpu/moekit_gpu_tests build/device/bench/bench_moe_layer build/device/examples/train_lm/train_lm)

stage=build/device/carry-stage
rm -rf "$stage" .carry && mkdir -p "$stage/bin" "$stage/lib" .carry
cp "${bins[@]}" "$stage/bin/"
# Full strip: the symbol tables go, the device code (.nv_fatbin) stays.
strip --strip-unneeded "$stage"/bin/*
# Every library the binaries load here (ldd: the whole tree) that the GPU machine lacks, under its soname.
for b in "${bins[@]}"; do ldd "$b"; done | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | sort -u |
  while read -r soname path; do
    bash tools/device/check_carry.sh --provided "$soname" || cp -L "$path" "$stage/lib/$soname"
  done
{
  echo "# tools/device/build.sh $(date -u +%FT%TZ), $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)'); nvcc flags: ${gencode}"
  echo "# bytes path NEEDED..."
  for f in "$stage"/bin/* "$stage"/lib/*; do
    echo "$(stat -c %s "$f") ${f#"$stage"/} $(readelf -d "$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\].*/\1/p' | tr '\n' ' ')"
  done
} >.carry/MANIFEST
tar -C "$stage" -cf - bin lib | xz -T0 -6 >.carry/device.tar.xz
t3=$(date +%s)
echo "build.sh: configure $((t1 - t0)) s, compile $((t2 - t1)) s, pack $((t3 - t2)) s"
echo "build.sh: unpacked $(du -sh "$stage" | cut -f1) (bin $(du -sh "$stage/bin" | cut -f1), lib $(du -sh "$stage/lib" | cut -f1)); carried:"
ls -la .carry
cat .carry/MANIFEST
bash tools/device/check_carry.sh --require "${targets[*]}" .carry
