#!/usr/bin/env bash
# Compiles every kernels/*.cu to PTX for sm_90 (H100/H200; *_sm90a.cu for sm_90a) with nvcc and assembles the PTX with
# ptxas, failing on any error or warning (nvcc -Werror all-warnings, ptxas --warning-as-error).
# The CI compile check; also the quick loop while writing a kernel (seconds, no GPU needed).
#
#   scripts/cuda/compile-ptx.sh [OUT_DIR]     # keeps PTX, cubins, ptxas reports in OUT_DIR
#
# nvcc comes from $NVCC when set, else from scripts/cuda/env.sh (ptx profile: installs NVIDIA's
# pinned nvcc wheels into $OMR_CUDA_DIR, default ~/.cache/omr-cuda, once). Flags match
# crates/omr-kernels/build.rs, which embeds the same PTX in `--features cuda` builds. ptxas
# reports registers, shared memory and spills per kernel into OUT_DIR/<name>.ptxas.txt.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
if [ -z "${NVCC:-}" ]; then
  # shellcheck disable=SC1091
  OMR_CUDA_PROFILE=ptx source "$root/scripts/cuda/env.sh"
fi
ptxas=$(dirname "$NVCC")/ptxas
cap=${CUDA_COMPUTE_CAP:-90}
if [ -n "${1:-}" ]; then
  out=$1
else
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
mkdir -p "$out"
shopt -s nullglob
srcs=("$root"/kernels/*.cu)
[ ${#srcs[@]} -gt 0 ] || { echo "compile-ptx: no kernels/*.cu" >&2; exit 1; }
start=$(date +%s%N)
fail=0
for src in "${srcs[@]}"; do
  name=$(basename "$src" .cu)
  # Files named *_sm90a.cu use Hopper's arch-specific instructions (wgmma): sm_90a always.
  arch=sm_$cap
  case $name in *_sm90a) arch=sm_90a ;; esac
  if ! "$NVCC" --ptx -O3 -std=c++17 -Werror all-warnings -arch="$arch" -o "$out/$name.ptx" "$src"; then
    echo "compile-ptx: nvcc failed on kernels/$name.cu" >&2; fail=1; continue
  fi
  if ! "$ptxas" -arch="$arch" -v --warning-as-error -o "$out/$name.cubin" "$out/$name.ptx" \
      > "$out/$name.ptxas.txt" 2>&1; then
    cat "$out/$name.ptxas.txt" >&2
    echo "compile-ptx: ptxas failed on kernels/$name.cu" >&2; fail=1; continue
  fi
  # ptxas only remarks when it serialises wgmma (a product issued on a path it cannot prove
  # warpgroup-uniform, or registers it cannot prove free): that undoes the asynchrony the
  # kernels are built on, so it fails here.
  if grep -q 'wgmma.mma_async instructions are serialized' "$out/$name.ptxas.txt"; then
    grep 'serialized' "$out/$name.ptxas.txt" >&2
    echo "compile-ptx: ptxas serialises wgmma in kernels/$name.cu" >&2; fail=1; continue
  fi
  spills=$(grep -o '[0-9]* bytes spill stores' "$out/$name.ptxas.txt" | awk '{s+=$1} END {print s+0}')
  echo "compile-ptx: kernels/$name.cu ok ($(grep -c 'Compiling entry' "$out/$name.ptxas.txt") entries, $spills bytes spilled)"
done
ms=$(( ($(date +%s%N) - start) / 1000000 ))
echo "compile-ptx: ${#srcs[@]} files in ${ms} ms${1:+, PTX in $out}"
exit $fail
