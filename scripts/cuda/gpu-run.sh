#!/usr/bin/env bash
# Runs on the GPU machine (no Rust toolchain there): the CUDA-vs-CPU checks and the timings of
# every omr-kernels op, in one call of a `--features cuda` omr binary built elsewhere.
#
#   Build machine:  source scripts/cuda/env.sh
#                   cargo build --release -p omr --features cuda      # ≈ 20 min cold on 2 cores
#                   strip -o target/omr-cuda target/release/omr        # ≈ 55 MiB
#   GPU machine:    scripts/cuda/gpu-run.sh [target/omr-cuda] [OUT_DIR]
#
# Finds cuBLAS/cuRAND 13 (a CUDA toolkit or the nvidia-* wheels of the machine's Python), puts
# them on LD_LIBRARY_PATH next to the driver's libcuda, prints nvidia-smi's view of the card,
# then `omr bench kernels` (exit 1 if any check fails). Output also goes to OUT_DIR (default
# $OUT when set, else the current folder) as bench-kernels.txt.
set -uo pipefail
bin=${1:-target/omr-cuda}
out=${2:-${OUT:-.}}
mkdir -p "$out"
lib=$(find /usr/local/cuda*/lib64 /opt /usr/lib /usr/local/lib -name 'libcublas.so.13*' 2>/dev/null | head -n 1)
if [ -z "$lib" ]; then
  echo "gpu-run: libcublas.so.13 not found (install a CUDA 13 toolkit or the nvidia-cublas wheel)" >&2
  exit 1
fi
export LD_LIBRARY_PATH=$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
echo "gpu-run: libraries from $(dirname "$lib")"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$out/nvidia-smi.txt"
ldd "$bin" | grep -E "cuda|cublas|curand|not found" | tee "$out/ldd.txt"
"$bin" bench kernels 2>&1 | tee "$out/bench-kernels.txt"
exit "${PIPESTATUS[0]}"
