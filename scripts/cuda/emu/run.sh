#!/usr/bin/env bash
# Builds and runs flash_wgmma_emu.cpp: kernels/flash_wgmma_sm90a.cu on the CPU through
# sm90_emu.h, against attention in double precision (no GPU; g++ ≥ 12 for C++20 std::barrier,
# cuda_bf16.h from scripts/cuda/env.sh's nvcc wheels). What CI runs after compile-ptx.sh.
#
#   scripts/cuda/emu/run.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
if [ -z "${CUDA_HOME:-}" ]; then
  # shellcheck disable=SC1091
  OMR_CUDA_PROFILE=ptx source "$root/scripts/cuda/env.sh"
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cxx=${CXX:-g++}
start=$(date +%s)
"$cxx" -std=c++20 -O2 -pthread -Wall -Werror -Wno-unknown-pragmas -fno-strict-aliasing -I"$CUDA_HOME/include" -I"$here" \
  -o "$out/flash_wgmma_emu" "$here/flash_wgmma_emu.cpp"
"$out/flash_wgmma_emu"
echo "emu: built and ran in $(( $(date +%s) - start )) s"
