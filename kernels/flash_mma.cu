// flash_mma.cu: attention for training on the tensor cores (bf16 in, f32 accumulation), the
// FlashAttention-2 algorithm with mma.sync.m16n8k16: the scores of a tile live in registers
// and never reach memory. Same function as flash_attn.cu / the GEMM path: causal, segment ids
// (packed samples, vision windows; 0 = padding), sliding window, GQA; a query with no allowed
// key gets o = 0 and lse = −∞.
//
// Layouts: q (B, T, H, D), k/v (B, S, KV, D), o (B, T, H, D), lse / delta (B, H, T) f32.
// D ∈ {64, 80, 128} (a multiple of 16); every row starts 16-byte aligned (the host checks the
// base offsets). The keys of S are the last T's context: off = S − T, key j is allowed for
// query i when qseg[i] ≠ 0, kseg[j] = qseg[i], j ≤ i + off (causal) and j + window > i + off
// (window > 0).
//
// forward: one CTA per (64 query rows, b·H + h), 4 warps of 16 rows, Q fragments in
//   registers; tiles of 64 keys, K and V in shared memory, loaded with cp.async so that V's
//   load overlaps S = Q·K^T and the next K's load overlaps O += P·V (FA2's two-stage
//   pipeline with one buffer each). Online softmax in the exp2 domain; P cast to bf16 for P·V
//   (the reference casts the probabilities to the input dtype). The host gives each
//   (b, block of 64 rows) the key span [lo, hi) that can hold allowed keys; the heaviest
//   (last, under a causal mask) blocks start first.
// backward: one CTA per (64 keys, b·H + h), 4 warps of 16 keys, over the blocks of 32 query
//   rows the host's span allows, Q / dO / lse / Δ / segments double-buffered with cp.async:
//   S^T = K·Q^T, P^T, dP^T = V·dO^T, dS^T = P^T ∘ (dP^T − Δ)·scale, dV += P^T·dO and
//   dK += dS^T·Q in registers, dQ += dS·K through shared memory and f32 atomics (float2).
//   dK and dV are written per query head (f32, (B, S, H, D)); the host sums a GQA group's
//   heads. Dynamic shared memory (flash_mma_bwd_smem below; the host raises the limit).
//
// A tile that the mask leaves whole (one segment on both sides, below the causal diagonal,
// inside the window, no row past T or S) skips the per-element mask; a warp whose tile the
// causal mask removes entirely skips its products.
//
// mma.sync.m16n8k16 fragments (lane = 4·g + t): A (16 × 16, row major) regs {(g, 2t..2t+1),
// (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)}; B (16 × 8, "col": element (k, n)) regs
// {(2t..2t+1, g), (2t+8..2t+9, g)}; C (16 × 8 f32) {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}.
// The C fragments of two adjacent n-tiles are the A fragment of one k-step: P and dS go from
// one product into the next without leaving registers. Fragments come from shared memory by
// ldmatrix: an 8×8 bf16 matrix per 8 lanes' row addresses, `.trans` when the fragment's pairs
// run down a column of the stored tile (V and dO as B, dS^T as A). Rows are padded by 8 bf16
// (16 bytes), which puts the 8 rows of a matrix in distinct banks.
// The forward is in flash_mma_fwd.cuh, the backwards in flash_mma_bwd.cuh, their fragment and
// tile helpers in mma_sync.cuh; this file holds the entry points.
#include "flash_mma_fwd.cuh"
#include "flash_mma_bwd.cuh"

// Entry points: `flash_mma_{fwd,bwd}_d{D}` with 4 warps (64 query rows / 64 keys per CTA),
// `flash_mma_{fwd,bwd}8_d{D}` with 8 (128 / 128); the backward's 8-warp form splits D in 4
// for dQ, so it exists for D 64 and 128. Variants for D 128 (opt-in until measured):
// `flash_mma_fwd_m2_d128`, 4 warps of two m-tiles (128 rows, Q in `fwd_smem` bytes of dynamic
// shared memory), `flash_mma_bwd{,8}_q4_d128`, dQ added with float4 atomics, and
// `flash_mma_bwd8r64{,_q4}_d128` / `flash_mma_bwd8r64_d64`, the backward in FA2's layout.
#define FWD(NAME, D_, NW_, MT_)                                                                   \
  extern "C" __global__ void __launch_bounds__(32 * NW_) NAME(                                    \
      const bf16* q, const bf16* k, const bf16* v, const unsigned* qseg, const unsigned* kseg,   \
      const int* span, bf16* o, float* lse, int T, int S, int H, int KV, float scale_log2,        \
      int causal, int window) {                                                                   \
    flash_fwd<D_, NW_, MT_>(q, k, v, qseg, kseg, span, o, lse, T, S, H, KV, scale_log2, causal,  \
                            window);                                                              \
  }
#define BWD(NAME, D_, NW_, DQV_)                                                                  \
  extern "C" __global__ void __launch_bounds__(32 * NW_) NAME(                                    \
      const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,            \
      const float* delta, const unsigned* qseg, const unsigned* kseg, const int* span, float* dq, \
      float* dk, float* dv, int T, int S, int H, int KV, float scale, int causal, int window) {   \
    flash_bwd<D_, NW_, DQV_>(q, k, v, dout, lse, delta, qseg, kseg, span, dq, dk, dv, T, S, H,   \
                             KV, scale, causal, window);                                          \
  }
#define BWD64(NAME, D_, DQV_)                                                                     \
  extern "C" __global__ void __launch_bounds__(256, 1) NAME(                                      \
      const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,            \
      const float* delta, const unsigned* qseg, const unsigned* kseg, const int* span, float* dq, \
      float* dk, float* dv, int T, int S, int H, int KV, float scale, int causal, int window) {   \
    flash_bwd64<D_, DQV_>(q, k, v, dout, lse, delta, qseg, kseg, span, dq, dk, dv, T, S, H, KV,  \
                          scale, causal, window);                                                 \
  }
FWD(flash_mma_fwd_d64, 64, 4, 1)
FWD(flash_mma_fwd_d80, 80, 4, 1)
FWD(flash_mma_fwd_d128, 128, 4, 1)
FWD(flash_mma_fwd8_d64, 64, 8, 1)
FWD(flash_mma_fwd8_d80, 80, 8, 1)
FWD(flash_mma_fwd8_d128, 128, 8, 1)
FWD(flash_mma_fwd_m2_d128, 128, 4, 2)
BWD(flash_mma_bwd_d64, 64, 4, 2)
BWD(flash_mma_bwd_d80, 80, 4, 2)
BWD(flash_mma_bwd_d128, 128, 4, 2)
BWD(flash_mma_bwd8_d64, 64, 8, 2)
BWD(flash_mma_bwd8_d128, 128, 8, 2)
BWD(flash_mma_bwd_q4_d128, 128, 4, 4)
BWD(flash_mma_bwd8_q4_d128, 128, 8, 4)
BWD64(flash_mma_bwd8r64_d64, 64, 2)
BWD64(flash_mma_bwd8r64_d128, 128, 2)
BWD64(flash_mma_bwd8r64_q4_d128, 128, 4)
