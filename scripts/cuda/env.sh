#!/usr/bin/env bash
# CUDA build environment from NVIDIA's pip wheels, for machines with no GPU and no CUDA toolkit
# (login nodes, CI, the development machine). Source it from the repository root:
#
#   source scripts/cuda/env.sh          # full: nvcc + cuBLAS/cuRAND/NVRTC + a libcuda link stub,
#                                       #   enough for `cargo build --release --features cuda`
#   OMR_CUDA_PROFILE=ptx source scripts/cuda/env.sh   # nvcc only (~280 MB): what
#                                       #   scripts/cuda/compile-ptx.sh and CI need
#
# Adapted from ../shared/gpu/cuda-build-env.sh, with these changes:
#   - two profiles: `ptx` installs only the compiler wheels (nvcc, crt, nvvm, runtime + cccl
#     headers; ≈ 20 s with a warm pip cache), `full` adds the libraries a cuda build links;
#   - the pinned versions are written to a stamp file, so a version bump reinstalls instead of
#     silently keeping an older nvcc;
#   - the site-packages folder is found for any python3.X; the libcuda stub is generated from
#     the cudarc sources that Cargo.lock pins (it runs `cargo fetch` when they are missing);
#   - every failure returns non-zero whether the file is sourced or executed.
# CUDA 13.0 is pinned on purpose: a newer nvcc emits PTX that a CUDA 13.0 driver (580) cannot
# load. The GPU machine needs at run time: the driver's libcuda.so.1, and libcublas.so.13,
# libcublasLt.so.13, libcurand.so.10 (LD_LIBRARY_PATH to a toolkit's lib64 or to this
# folder's nvidia/cu13/lib). Never put the stub folder on LD_LIBRARY_PATH there.
#
# Exports: CUDA_HOME, CUDA_ROOT, NVCC, PATH, CUDA_COMPUTE_CAP (default 90),
# CUDARC_CUDA_VERSION=13000, and in the full profile LIBRARY_PATH (libs + stub).

_omr_cuda_env() {
  local dir=${OMR_CUDA_DIR:-$HOME/.cache/omr-cuda}
  local profile=${OMR_CUDA_PROFILE:-full}
  local ptx_wheels="nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85"
  local lib_wheels="nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88"
  local wheels=$ptx_wheels
  case $profile in
    ptx) ;;
    full) wheels="$ptx_wheels $lib_wheels" ;;
    *) echo "cuda-env: OMR_CUDA_PROFILE must be ptx or full, not '$profile'" >&2; return 2 ;;
  esac
  local venv=$dir/venv
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" || { echo "cuda-env: python3 -m venv failed" >&2; return 1; }
  fi
  local stamp=$dir/installed-$profile.txt
  if [ "$(cat "$stamp" 2>/dev/null)" != "$wheels" ]; then
    echo "cuda-env: installing CUDA 13.0 wheels ($profile) into $venv" >&2
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install -q --disable-pip-version-check $wheels \
      || { echo "cuda-env: pip install failed" >&2; return 1; }
    echo "$wheels" > "$stamp"
  fi
  local cu
  cu=$(ls -d "$venv"/lib/python3*/site-packages/nvidia/cu13 2>/dev/null | head -n 1)
  if [ -z "$cu" ] || [ ! -x "$cu/bin/nvcc" ]; then
    echo "cuda-env: nvcc not found under $venv" >&2; return 1
  fi
  export CUDA_HOME=$cu CUDA_ROOT=$cu NVCC=$cu/bin/nvcc
  case ":$PATH:" in *":$cu/bin:"*) ;; *) export PATH=$cu/bin:$PATH ;; esac
  export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
  export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000}
  if [ "$profile" = full ]; then
    # The linker looks for unversioned names; the wheels ship libfoo.so.N only.
    ( cd "$cu/lib" && for f in lib*.so.*; do b=${f%%.so.*}.so; [ -e "$b" ] || ln -s "$f" "$b"; done )
    if [ ! -e "$cu/lib/stubs/libcuda.so" ]; then
      local sys
      sys=$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-0.19*/src/driver/sys/mod.rs 2>/dev/null | tail -n 1)
      if [ -z "$sys" ]; then
        cargo fetch --locked >/dev/null 2>&1
        sys=$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-0.19*/src/driver/sys/mod.rs 2>/dev/null | tail -n 1)
      fi
      [ -n "$sys" ] || { echo "cuda-env: cudarc sources not found (cargo fetch failed)" >&2; return 1; }
      mkdir -p "$cu/lib/stubs"
      # One dummy symbol per driver function cudarc declares: enough to link, never executed
      # (on the GPU machine the real driver is found first).
      { echo '/* link-time stub for libcuda.so.1; never executed */'
        grep -o 'fn cu[A-Za-z0-9_]*' "$sys" | sort -u | sed 's/^fn \(.*\)$/int \1(void){return 999;}/'
      } > "$cu/lib/stubs/cuda_stub.c"
      gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cu/lib/stubs/libcuda.so" "$cu/lib/stubs/cuda_stub.c" \
        || { echo "cuda-env: stub build failed" >&2; return 1; }
      ln -sf libcuda.so "$cu/lib/stubs/libcuda.so.1"
    fi
    export LIBRARY_PATH=$cu/lib:$cu/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
  fi
  echo "cuda-env: $profile, CUDA_HOME=$CUDA_HOME ($("$NVCC" --version | grep -o 'release [0-9.]*'))" >&2
}
_omr_cuda_env
_omr_cuda_env_rc=$?
unset -f _omr_cuda_env
if [ "${BASH_SOURCE[0]}" = "$0" ]; then exit $_omr_cuda_env_rc; fi
return $_omr_cuda_env_rc
