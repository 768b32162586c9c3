#!/usr/bin/env bash
# Builds and runs the kernel emulations on the CPU through cuda_emu.h, each against its
# references (double precision; attention_ref.h for the attention; bit for bit where a
# kernel's arithmetic is exact): kernels/linear_ce.cu (the cross-entropy's and GRPO
# log-probabilities' tile kernels), kernels/sample.cu (the Gumbel-max sampler), the
# memory-bound kernels (swiglu.cu, rmsnorm.cu, rotary.cu, grad_accum.cu, adamw.cu,
# grad_norm.cu, attn_softmax.cu: memory_emu.cpp), kernels/flash_attn.cu (the decoding steps'
# forward over a cache view, and the CUDA-core backward), kernels/flash_mma.cu (every OMR_MMA
# entry point) and kernels/flash_wgmma_sm90a.cu. No GPU; g++ ≥ 12 (C++20) and
# cuda_bf16.h from scripts/cuda/env.sh's nvcc wheels. What CI runs after compile-ptx.sh
# (≈ 2 min on 2 cores: ≈ 30 s compiling, flash_mma 61 s, flash_attn 22 s, wgmma 8 s, the
# rest 3 s).
#
#   scripts/cuda/emu/run.sh [lce|sample|mem|attn|wgmma|mma [NAME]]  # all by default; NAME keeps the
#                                                   # flash_mma entry points whose name has it
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
rc=0
for which in lce sample mem attn wgmma mma; do
  [ -n "${1:-}" ] && [ "$1" != "$which" ] && continue
  case $which in
    lce) name=linear_ce_emu ;; sample) name=sample_emu ;; mem) name=memory_emu ;;
    attn) name=flash_attn_emu ;; *) name=flash_${which}_emu ;;
  esac
  # -Wno-maybe-uninitialized: GCC's false positive on the kernels' second 16-byte access,
  # loaded and used under the same condition.
  "$cxx" -std=c++20 -O2 -pthread -Wall -Werror -Wno-unknown-pragmas -Wno-maybe-uninitialized \
    -fno-strict-aliasing \
    -I"$CUDA_HOME/include" -I"$here" -o "$out/$name" "$here/$name.cpp"
  "$out/$name" ${2:+"$2"} || rc=1
done
echo "emu: built and ran in $(( $(date +%s) - start )) s"
exit $rc
