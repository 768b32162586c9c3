// flash_wgmma_sm90a.cu: the attention of flash_mma.cu on Hopper's warpgroup tensor cores
// (wgmma.mma_async, sm_90a only: build.rs and compile-ptx.sh give files named *_sm90a.cu
// `-arch=sm_90a`). Same function, inputs, outputs and host spans as flash_mma.cu's forward and
// backward (read its header for the layouts and the mask); opt-in as `OMR_MMA=wg` (`wgf`
// forward, `wgb` backward) for head dim 128. The forward is described here, the backward above
// flash_wg_bwd_d128.
//
// One CTA per (128 query rows, b·H + h): two warpgroups of 64 rows, 128-key tiles. Q, K and V
// sit in shared memory in the 128-byte-swizzled K-major layout (wgmma.cuh); K and V are double
// buffered with cp.async, so tile j + 1 loads while tile j computes. Per tile and warpgroup:
//   S = Q·K^T   wgmma m64n128k16, A = Q and B = K from shared memory (both K-major), 8 k-steps;
//   softmax     online, exp2 domain, per row as in flash_mma.cu (the accumulator fragment of a
//               warp is mma.sync's C fragment for its 16 rows);
//   O += P·V    wgmma m64n128k16, A = P from registers (bf16, the C → A repacking of
//               flash_mma.cu), B = V from shared memory read N-major (imm-trans-b = 1), 8
//               k-steps of 16 keys.
// The 64 × 128 f32 accumulators of S and O live in registers (64 + 64 per thread).
//
// The shared-memory layout (SW128), its descriptors and the wgmma wrappers are wgmma.cuh's;
// wgmma_probe_sm90a.cu runs each operand layout alone. scripts/cuda/emu runs this file on the
// CPU (OMR_EMU) against attention in double precision.
// The forward is in flash_wg_fwd.cuh, the backward in flash_wg_bwd.cuh; this file holds the
// forward's entry points.
#include "flash_wg_fwd.cuh"
#include "flash_wg_bwd.cuh"

#define WG_FWD(NAME, PIPE)                                                                      \
  extern "C" __global__ void __launch_bounds__(256, 1)                                          \
      NAME(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,   \
           const unsigned* __restrict__ qseg, const unsigned* __restrict__ kseg,                 \
           const int* __restrict__ span, bf16* __restrict__ o, float* __restrict__ lse, int T,   \
           int S, int H, int KV, float scale_log2, int causal, int window) {                     \
    wg_fwd<PIPE>(q, k, v, qseg, kseg, span, o, lse, T, S, H, KV, scale_log2, causal, window);   \
  }
WG_FWD(flash_wg_fwd_d128, false)
WG_FWD(flash_wg_fwd_pipe_d128, true)
