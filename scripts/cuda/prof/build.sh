#!/usr/bin/env bash
# Builds scripts/cuda/prof/omr_prof.c into .gpu-bin/libomr_prof.so (git-ignored; carry it to
# the GPU machine with the omr binary). Needs gcc, cuda.h (scripts/cuda/env.sh, ptx profile)
# and CUPTI's headers and library from NVIDIA's wheel, downloaded here into the same cache.
# At run time the GPU machine needs libcupti.so.13 (torch's CUDA 13 wheels bring it; run.sh
# finds it).
set -euo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$root"
OMR_CUDA_PROFILE=ptx source scripts/cuda/env.sh >/dev/null
cache=${OMR_CUDA_DIR:-$HOME/.cache/omr-cuda}/cupti
if [ ! -f "$cache/nvidia/cu13/include/cupti.h" ]; then
  mkdir -p "$cache"
  python3 -m pip download --no-deps --quiet 'nvidia-cuda-cupti==13.0.85' -d "$cache"
  (cd "$cache" && python3 -m zipfile -e nvidia_cuda_cupti-*.whl .)
fi
ln -sf libcupti.so.13 "$cache/nvidia/cu13/lib/libcupti.so"
mkdir -p .gpu-bin
gcc -O2 -shared -fPIC -o .gpu-bin/libomr_prof.so scripts/cuda/prof/omr_prof.c \
  -I"$cache/nvidia/cu13/include" -I"$CUDA_HOME/include" \
  -L"$cache/nvidia/cu13/lib" -lcupti
echo ".gpu-bin/libomr_prof.so"
