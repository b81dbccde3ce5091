#!/usr/bin/env bash
# Installs the Debian packages epmoe builds against (run as root or with sudo available).
# The CUDA toolkit (nvcc, cuBLAS, NCCL) is expected in /usr/local/cuda; without nvcc the build
# still produces the CPU backend.
set -euo pipefail
# clang-14 + libclang-rt-14-dev + libomp-14-dev: the libFuzzer stage of scripts/test.sh;
# clang-format: its format stage.
pkgs=(build-essential cmake libgtest-dev libbenchmark-dev libcli11-dev nlohmann-json3-dev
      libfmt-dev libopenmpi-dev openmpi-bin clang-14 libclang-rt-14-dev libomp-14-dev
      clang-format)
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# CUTLASS/CuTe headers for the Hopper grouped GEMM (PyPI's nvidia-cutlass wheel, pinned; a wheel in
# .whl/ is used without network). Without them the build leaves the sm90 GEMM out.
"$(dirname "$0")/fetch-cutlass.sh" || echo "setup: CUTLASS headers not fetched; the sm90 grouped GEMM will not be built" >&2
