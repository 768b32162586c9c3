#!/usr/bin/env bash
# Runs a command under the CUPTI profile of omr_prof.c (build.sh first) and prints the table:
#   scripts/cuda/prof/run.sh OUT_FILE command args...
set -uo pipefail
out=$1
shift
here=$(cd "$(dirname "$0")" && pwd)
lib=$(cd "$here/../../.." && pwd)/.gpu-bin/libomr_prof.so
cupti=$(find /opt /usr/local /usr/lib -name 'libcupti.so.13*' 2>/dev/null | head -n 1)
if [ -z "$cupti" ]; then
  echo "prof: no libcupti.so.13 on this machine" >&2
  exit 3
fi
LD_LIBRARY_PATH=$(dirname "$cupti")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} \
  CUDA_INJECTION64_PATH=$lib OMR_PROF_OUT=$out "$@"
rc=$?
cat "$out" 2>/dev/null
exit $rc
