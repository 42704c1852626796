#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build and test moekit (host side; nvcc, if present,
# comes with the CUDA toolkit and is used to compile the CUDA tests). Safe to run again: it skips
# apt entirely when every package is already installed.
set -euo pipefail
packages=(cmake g++ make doctest-dev libopenblas-dev nlohmann-json3-dev libopenmpi-dev openmpi-bin gnuplot-nox)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all packages present"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
