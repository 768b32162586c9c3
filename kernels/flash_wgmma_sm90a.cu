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
#include "wgmma.cuh"

constexpr int WG_BR = 128, WG_BC = 128, WG_D = 128;

// Dynamic shared memory of the forward (flash_mma/tiling.rs's wg_smem): Q, K and V twice,
// key segment ids twice, and 1024 bytes to align the base. The pipelined forward keeps three
// V tiles (WG_PIPE_SMEM): P·V of tile j − 1 still reads its V while tile j + 1 loads.
#define WG_SMEM (1024 + 2 * (WG_BR * WG_D + 4 * WG_BC * WG_D) + 4 * 2 * WG_BC)
#define WG_PIPE_SMEM (1024 + 2 * (WG_BR * WG_D + 5 * WG_BC * WG_D) + 4 * 2 * WG_BC)

// The forward; PIPE overlaps each tile's softmax with the previous tile's P·V (FlashAttention-3's
// intra-warpgroup pipelining): per tile j the warpgroup issues S_j = Q·K_j^T, then
// O += P_{j−1}·V_{j−1}, waits for S_j alone, runs the softmax of tile j while P·V runs on the
// tensor cores, then waits for P·V, rescales O and packs P_j for the next tile; the last P·V
// follows the loop. So that every product is issued on one path (ptxas serialises wgmma
// issued under a branch it cannot prove uniform), the first tile's P·V multiplies a zero P,
// and no tile is skipped for one warpgroup alone (its mask then removes the whole tile).
// Without PIPE each product is waited for at once.
template <bool PIPE>
__device__ __forceinline__ void wg_fwd(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                       const bf16* __restrict__ v,
                                       const unsigned* __restrict__ qseg,
                                       const unsigned* __restrict__ kseg,
                                       const int* __restrict__ span, bf16* __restrict__ o,
                                       float* __restrict__ lse, int T, int S, int H, int KV,
                                       float scale_log2, int causal, int window) {
  constexpr int BR = WG_BR, BC = WG_BC, D = WG_D, NV = PIPE ? 3 : 2;
  DYN_SMEM(1024, wg_fwd_raw);
  bf16* qs = aligned_smem(wg_fwd_raw);  // BR × D
  bf16* ks = qs + BR * D;               // [2][BC × D]
  bf16* vs = ks + 2 * BC * D;           // [NV][BC × D]
  unsigned* kss = reinterpret_cast<unsigned*>(vs + NV * BC * D);  // [2][BC]
  const int tid = threadIdx.x, wg = tid / 128, wl = (tid / 32) % 4, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int qb = gridDim.x - 1 - blockIdx.x, b = blockIdx.y / H, h = blockIdx.y % H;
  const int kvh = h / (H / KV);
  const int off = S - T;
  const int g0 = qb * BR + wg * 64;  // the warpgroup's first row
  const int w0 = g0 + wl * 16;       // the warp's first row
  const int nblk = (T + BR - 1) / BR;
  const int lo = span[2 * (b * nblk + qb)], hi = span[2 * (b * nblk + qb) + 1];
  const bf16* kb = k + ((long)b * S * KV + kvh) * D;
  const bf16* vb = v + ((long)b * S * KV + kvh) * D;
  const long kstride = (long)KV * D;

  // The block's rows in one segment (qblk ≠ 0) or not (qblk = 0: every tile is masked).
  const unsigned q_first = qseg[(long)b * T + qb * BR];
  const int q_uni = __syncthreads_and(tid >= BR || qb * BR + tid >= T ||
                                      qseg[(long)b * T + qb * BR + tid] == q_first);
  const unsigned qblk = q_uni ? q_first : 0u;
  const int w_last = min(w0 + 15, T - 1);

  if (lo < hi) {
    load_sw128(qs, q + ((long)b * T * H + h) * D, (long)H * D, qb * BR, T, BR, tid, 256);
    load_sw128(ks, kb, kstride, lo, S, BC, tid, 256);
    load_sw128(vs, vb, kstride, lo, S, BC, tid, 256);
    cp_commit();
  }
  const int r0 = w0 + g, r1 = r0 + 8;
  const unsigned qs0 = r0 < T ? qseg[(long)b * T + r0] : 0u;
  const unsigned qs1 = r1 < T ? qseg[(long)b * T + r1] : 0u;
  float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;
  float acc[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; i++) acc[i] = 0.f;
  const bf16* qwg = qs + wg * 64 * 64;  // the warpgroup's 64 rows of each column block
  // P of the last computed tile, whose P·V is not issued yet (PIPE: zero before the first
  // tile), and that tile's V.
  uint32_t pa[BC / 16][4];
#pragma unroll
  for (int kk = 0; kk < BC / 16; kk++) pa[kk][0] = pa[kk][1] = pa[kk][2] = pa[kk][3] = 0u;
  const bf16* vpend = vs;
  float s[BC / 2];

  for (int j0 = lo, it = 0; j0 < hi; j0 += BC, it++) {
    const int cur = it & 1, vcur = it % NV;
    const bool more = j0 + BC < hi;
    if (more) {
      load_sw128(ks + (cur ^ 1) * BC * D, kb, kstride, j0 + BC, S, BC, tid, 256);
      load_sw128(vs + ((it + 1) % NV) * BC * D, vb, kstride, j0 + BC, S, BC, tid, 256);
      cp_commit();
    }
    // This tile's key segments, and whether they are all the block's one segment.
    bool seg_whole = true;
    if (tid < BC) {
      const int j = j0 + tid;
      const unsigned sg = j < S ? kseg[(long)b * S + j] : 0u;
      kss[cur * BC + tid] = sg;
      seg_whole = j < S && sg == qblk && qblk != 0u;
    }
    if (more)
      cp_wait<1>();
    else
      cp_wait<0>();
    fence_proxy_async();
    // Tile `cur` (and Q) have landed for every thread.
    const bool tile_whole = __syncthreads_and(seg_whole);
    // The causal mask removes the tile for the whole warpgroup: skip its products.
    const bool skip = !PIPE && causal && j0 > g0 + 63 + off;
    const bool whole = tile_whole && (!causal || j0 + BC - 1 <= w0 + off) &&
                       (window == 0 || j0 + window > w_last + off);
    const bf16* kt = ks + cur * BC * D;
    const bf16* vt = vs + vcur * BC * D;
    if (!skip) {
#pragma unroll
      for (int i = 0; i < BC / 2; i++) s[i] = 0.f;
      pin<BC / 2>(s);
      if (PIPE) {
        pin<D / 2>(acc);
        pin<BC / 4>(&pa[0][0]);
      }
      wg_fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; kk++)
        wgmma_ss(s, sw128_desc(qwg + (kk / 4) * BR * 64 + (kk % 4) * 16, 16),
                 sw128_desc(kt + (kk / 4) * BC * 64 + (kk % 4) * 16, 16));
      wg_commit();
      if (PIPE) {
#pragma unroll
        for (int kk = 0; kk < BC / 16; kk++)
          wgmma_rs_tn(acc, pa[kk], sw128_desc(vpend + kk * 16 * 64, BC * 128));
        wg_commit();
        wg_wait<1>();  // S_j; P·V of the previous tile may still run
      } else {
        wg_wait<0>();
      }
      pin<BC / 2>(s);
      float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
      for (int n = 0; n < BC / 8; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const bool top = e < 2;
          float x = s[4 * n + e] * scale_log2;
          if (!whole) {
            const int jl = n * 8 + 2 * t + (e & 1), j = j0 + jl;
            const int i = top ? r0 : r1;
            const bool ok = j < S && i < T &&
                            allowed(i, j, top ? qs0 : qs1, kss[cur * BC + jl], off, causal, window);
            x = ok ? x : NEG_INF;
          }
          s[4 * n + e] = x;
          if (top)
            mx0 = fmaxf(mx0, x);
          else
            mx1 = fmaxf(mx1, x);
        }
      }
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
      const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
      // As in flash_mma.cu: rescale 1 while nothing was summed, subtract 0 for a row with no
      // allowed key yet (its scores are all −∞ → 0).
      const float a0 = mn0 == NEG_INF ? 1.f : exp2f(m0 - mn0);
      const float a1 = mn1 == NEG_INF ? 1.f : exp2f(m1 - mn1);
      const float z0 = mn0 == NEG_INF ? 0.f : mn0, z1 = mn1 == NEG_INF ? 0.f : mn1;
      float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
      for (int n = 0; n < BC / 8; n++) {
        s[4 * n + 0] = exp2f(s[4 * n + 0] - z0);
        s[4 * n + 1] = exp2f(s[4 * n + 1] - z0);
        s[4 * n + 2] = exp2f(s[4 * n + 2] - z1);
        s[4 * n + 3] = exp2f(s[4 * n + 3] - z1);
        sum0 += s[4 * n + 0] + s[4 * n + 1];
        sum1 += s[4 * n + 2] + s[4 * n + 3];
      }
      l0 = l0 * a0 + sum0;
      l1 = l1 * a1 + sum1;
      m0 = mn0;
      m1 = mn1;
      if (PIPE) {
        wg_wait<0>();  // the previous tile's P·V: O and its P registers are free again
        pin<D / 2>(acc);
        pin<BC / 4>(&pa[0][0]);
      }
#pragma unroll
      for (int kk = 0; kk < BC / 16; kk++) acc_to_a(s, kk, pa[kk]);
#pragma unroll
      for (int n = 0; n < D / 8; n++) {
        acc[4 * n + 0] *= a0;
        acc[4 * n + 1] *= a0;
        acc[4 * n + 2] *= a1;
        acc[4 * n + 3] *= a1;
      }
      if (PIPE) {
        vpend = vt;
      } else {
        pin<D / 2>(acc);
        pin<BC / 4>(&pa[0][0]);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < BC / 16; kk++)
          wgmma_rs_tn(acc, pa[kk], sw128_desc(vt + kk * 16 * 64, BC * 128));
        wg_commit();
        wg_wait<0>();
        pin<D / 2>(acc);
        pin<BC / 4>(&pa[0][0]);
      }
    }
    // Every warpgroup is done with tile `cur` (and, pipelined, with the V tile the next
    // iteration overwrites) before the next iteration loads into it.
    __syncthreads();
  }
  if (PIPE && lo < hi) {
    pin<D / 2>(acc);
    pin<BC / 4>(&pa[0][0]);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < BC / 16; kk++)
      wgmma_rs_tn(acc, pa[kk], sw128_desc(vpend + kk * 16 * 64, BC * 128));
    wg_commit();
    wg_wait<0>();
    pin<D / 2>(acc);
    pin<BC / 4>(&pa[0][0]);
  }
  const float ln2 = 0.69314718055994531f;
  float L0 = l0, L1 = l1;
  L0 += __shfl_xor_sync(0xffffffffu, L0, 1);
  L0 += __shfl_xor_sync(0xffffffffu, L0, 2);
  L1 += __shfl_xor_sync(0xffffffffu, L1, 1);
  L1 += __shfl_xor_sync(0xffffffffu, L1, 2);
  const float inv0 = L0 > 0.f ? 1.f / L0 : 0.f, inv1 = L1 > 0.f ? 1.f / L1 : 0.f;
  if (r0 < T) {
    uint32_t* o0 = reinterpret_cast<uint32_t*>(o + (((long)b * T + r0) * H + h) * D + 2 * t);
#pragma unroll
    for (int n = 0; n < D / 8; n++) o0[n * 4] = pack_f(acc[4 * n] * inv0, acc[4 * n + 1] * inv0);
    if (t == 0) lse[((long)b * H + h) * T + r0] = L0 > 0.f ? (m0 + log2f(L0)) * ln2 : NEG_INF;
  }
  if (r1 < T) {
    uint32_t* o1 = reinterpret_cast<uint32_t*>(o + (((long)b * T + r1) * H + h) * D + 2 * t);
#pragma unroll
    for (int n = 0; n < D / 8; n++)
      o1[n * 4] = pack_f(acc[4 * n + 2] * inv1, acc[4 * n + 3] * inv1);
    if (t == 0) lse[((long)b * H + h) * T + r1] = L1 > 0.f ? (m1 + log2f(L1)) * ln2 : NEG_INF;
  }
}

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

// The backward on wgmma, for D 128: one CTA of two warpgroups per (128 keys, b·H + h), each
// warpgroup 64 keys; K and V in shared memory for the whole CTA, steps of 64 query rows with
// Q, dO (SW128), lse, Δ and segment ids double-buffered by cp.async. Per step:
//   1. S^T = K·Q^T and dP^T = V·dO^T (64 keys × 64 queries per warpgroup), wgmma m64n64k16,
//      both operands K-major from shared memory;
//   2. P^T = exp(S^T·scale − lse) and dS^T = P^T ∘ (dP^T − Δ)·scale in registers (masked as
//      flash_mma.cu's backward), dS^T to shared memory (bf16, [key][query], SW128);
//   3. dV += P^T·dO and dK += dS^T·Q (64 keys × 128 per warpgroup, accumulated in registers
//      over the steps), wgmma m64n128k16 with P^T / dS^T from registers and dO / Q read
//      N-major;
//   4. dQ = dS·K (64 queries × 64 columns per warpgroup, the CTA's 128 keys), wgmma
//      m64n64k16 with dS read M-major and K N-major from shared memory, added to dq with
//      float2 atomics.
// dK / dV per query head as flash_mma.cu's backward (f32, (B, S, H, D)); the host sums a GQA
// group's heads. Dynamic shared memory WG_BWD_SMEM (flash_mma/tiling.rs's wg_bwd_smem).
#define WG_BWD_SMEM (1024 + 2 * (4 * 128 * 128 + 128 * 64) + 4 * 3 * 2 * 64)

extern "C" __global__ void __launch_bounds__(256, 1)
    flash_wg_bwd_d128(const bf16* __restrict__ q, const bf16* __restrict__ k,
                      const bf16* __restrict__ v, const bf16* __restrict__ dout,
                      const float* __restrict__ lse, const float* __restrict__ delta,
                      const unsigned* __restrict__ qseg, const unsigned* __restrict__ kseg,
                      const int* __restrict__ span, float* __restrict__ dq,
                      float* __restrict__ dk, float* __restrict__ dv, int T, int S, int H, int KV,
                      float scale, int causal, int window) {
  constexpr int BR = 64, BC = 128, D = 128;
  DYN_SMEM(1024, wg_raw);
  bf16* ks = aligned_smem(wg_raw);  // BC × D
  bf16* vs = ks + BC * D;           // BC × D
  bf16* qs = vs + BC * D;           // [2][BR × D]
  bf16* dos = qs + 2 * BR * D;      // [2][BR × D]
  bf16* dst = dos + 2 * BR * D;     // BC × BR: dS^T, [key][query]
  float* lses = reinterpret_cast<float*>(dst + BC * BR);      // [2][BR]
  float* dls = lses + 2 * BR;                                 // [2][BR]
  unsigned* qss = reinterpret_cast<unsigned*>(dls + 2 * BR);  // [2][BR]
  const int tid = threadIdx.x, wg = tid / 128, wl = (tid / 32) % 4, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int kb = blockIdx.x, b = blockIdx.y / H, h = blockIdx.y % H, kvh = h / (H / KV);
  const int off = S - T;
  const int nblk = (S + BC - 1) / BC;
  const int lo = span[2 * (b * nblk + kb)], hi = span[2 * (b * nblk + kb) + 1];
  const int jg = kb * BC + wg * 64;  // the warpgroup's first key
  const int kw = jg + wl * 16;       // the warp's first key
  const int k0 = kw + g, k1 = k0 + 8;
  const long qstride = (long)H * D;
  const bf16* qb = q + ((long)b * T * H + h) * D;
  const bf16* db = dout + ((long)b * T * H + h) * D;
  const float* lb = lse + ((long)b * H + h) * T;
  const float* deb = delta + ((long)b * H + h) * T;
  const unsigned* qsb = qseg + (long)b * T;
  // Rows [i0, i0 + BR) of the query side into buffer `buf`; thread r copies row r's scalars.
  auto load_q = [&](int i0, int buf) {
    load_sw128(qs + buf * BR * D, qb, qstride, i0, T, BR, tid, 256);
    load_sw128(dos + buf * BR * D, db, qstride, i0, T, BR, tid, 256);
    if (tid < BR) {
      const int i = i0 + tid;
      const bool ok = i < T;
      const int ic = ok ? i : 0;
      cp4(&lses[buf * BR + tid], lb + ic, ok);
      cp4(&dls[buf * BR + tid], deb + ic, ok);
      cp4(&qss[buf * BR + tid], qsb + ic, ok);
    }
  };

  // The CTA's keys in one segment and all before S (kblk ≠ 0), or not (every step masked).
  const unsigned k_first = kseg[(long)b * S + kb * BC];
  const int k_uni = __syncthreads_and(
      tid >= BC || (kb * BC + tid < S && kseg[(long)b * S + kb * BC + tid] == k_first));
  const unsigned kblk = k_uni ? k_first : 0u;
  const unsigned ks0 = k0 < S ? kseg[(long)b * S + k0] : 0u;
  const unsigned ks1 = k1 < S ? kseg[(long)b * S + k1] : 0u;

  load_sw128(ks, k + ((long)b * S * KV + kvh) * D, (long)KV * D, kb * BC, S, BC, tid, 256);
  load_sw128(vs, v + ((long)b * S * KV + kvh) * D, (long)KV * D, kb * BC, S, BC, tid, 256);
  if (lo < hi) load_q(lo, 0);
  cp_commit();
  float dka[D / 2], dva[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; i++) dka[i] = dva[i] = 0.f;
  // The warpgroup's 64 keys of each column block of K and V.
  const bf16* kwg = ks + wg * 64 * 64;
  const bf16* vwg = vs + wg * 64 * 64;

  for (int i0 = lo, it = 0; i0 < hi; i0 += BR, it++) {
    const int buf = it & 1;
    const bool more = i0 + BR < hi;
    if (more) {
      load_q(i0 + BR, buf ^ 1);
      cp_commit();
      cp_wait<1>();
    } else {
      cp_wait<0>();
    }
    fence_proxy_async();
    bool seg_whole = true;
    if (tid < BR) seg_whole = i0 + tid < T && qss[buf * BR + tid] == kblk && kblk != 0u;
    // This step's rows (and K, V) have landed for every thread.
    const bool tile_whole = __syncthreads_and(seg_whole);
    const bf16* qt = qs + buf * BR * D;
    const bf16* dot = dos + buf * BR * D;
    const float* lt = lses + buf * BR;
    const float* dlt = dls + buf * BR;
    const bool whole = tile_whole && (!causal || kw + 15 <= i0 + off) &&
                       (window == 0 || kw + window > i0 + BR - 1 + off);
    // Every product runs for both warpgroups (a warpgroup whose keys the causal mask removes
    // from the step adds zeros): a branch around wgmma serializes them.
    float p[BR / 2], dp[BR / 2];
#pragma unroll
    for (int i = 0; i < BR / 2; i++) p[i] = dp[i] = 0.f;
    pin<BR / 2>(p);
    pin<BR / 2>(dp);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
      const int o_k = (kk / 4) * BC * 64 + (kk % 4) * 16, o_q = (kk / 4) * BR * 64 + (kk % 4) * 16;
      wgmma_ss64<0>(p, sw128_desc(kwg + o_k, 16), sw128_desc(qt + o_q, 16));
      wgmma_ss64<0>(dp, sw128_desc(vwg + o_k, 16), sw128_desc(dot + o_q, 16));
    }
    wg_commit();
    wg_wait0();
    pin<BR / 2>(p);
    pin<BR / 2>(dp);
#pragma unroll
    for (int n = 0; n < BR / 8; n++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int il = n * 8 + 2 * t + (e & 1), i = i0 + il;
        const int j = e < 2 ? k0 : k1;
        const bool ok = whole || (i < T && j < S &&
                                  allowed(i, j, qss[buf * BR + il], e < 2 ? ks0 : ks1, off,
                                          causal, window));
        const float pe = ok ? __expf(p[4 * n + e] * scale - lt[il]) : 0.f;
        p[4 * n + e] = pe;
        dp[4 * n + e] = pe * (dp[4 * n + e] - dlt[il]) * scale;  // dS^T
      }
    }
    // P^T and dS^T as bf16 A fragments; dS^T also to shared memory ([key][query], SW128): the
    // fragment registers of k-step kk are rows g / g + 8 of queries 16·kk + 2t and + 8.
    uint32_t pa[BR / 16][4], sa[BR / 16][4];
#pragma unroll
    for (int kk = 0; kk < BR / 16; kk++) {
      acc_to_a(p, kk, pa[kk]);
      acc_to_a(dp, kk, sa[kk]);
      const int r0 = wg * 64 + wl * 16 + g, r1 = r0 + 8;
      uint32_t* d0 = reinterpret_cast<uint32_t*>(dst + r0 * 64 + 2 * t);
      uint32_t* d1 = reinterpret_cast<uint32_t*>(dst + r1 * 64 + 2 * t);
      d0[(((2 * kk) ^ (r0 % 8)) * 8) / 2] = sa[kk][0];
      d1[(((2 * kk) ^ (r1 % 8)) * 8) / 2] = sa[kk][1];
      d0[(((2 * kk + 1) ^ (r0 % 8)) * 8) / 2] = sa[kk][2];
      d1[(((2 * kk + 1) ^ (r1 % 8)) * 8) / 2] = sa[kk][3];
    }
    fence_proxy_async();
    __syncthreads();
    pin<BR / 4>(&pa[0][0]);
    pin<BR / 4>(&sa[0][0]);
    wg_fence();
    // dV += P^T·dO, dK += dS^T·Q (k = the step's 64 queries; dO and Q read N-major).
#pragma unroll
    for (int kk = 0; kk < BR / 16; kk++) {
      wgmma_rs_tn(dva, pa[kk], sw128_desc(dot + kk * 16 * 64, BR * 128));
      wgmma_rs_tn(dka, sa[kk], sw128_desc(qt + kk * 16 * 64, BR * 128));
    }
    wg_commit();
    // Waiting here frees the fragments' registers before dQ's accumulator is needed (the
    // other warpgroup keeps the tensor cores busy meanwhile).
    wg_wait0();
    pin<D / 2>(dva);
    pin<D / 2>(dka);
    pin<BR / 4>(&pa[0][0]);
    pin<BR / 4>(&sa[0][0]);
    // dQ (64 queries × this warpgroup's 64 columns) = dS·K over the CTA's 128 keys: dS^T
    // read M-major, K's column block `wg` read N-major.
    float dqa[32];
#pragma unroll
    for (int i = 0; i < 32; i++) dqa[i] = 0.f;
    pin<32>(dqa);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < BC / 16; kk++)
      wgmma_ss64<1>(dqa, sw128_desc(dst + kk * 16 * 64, BC * 128),
                    sw128_desc(ks + wg * BC * 64 + kk * 16 * 64, BC * 128));
    wg_commit();
    wg_wait0();
    pin<32>(dqa);
    {
      const int ra = i0 + wl * 16 + g, rc = ra + 8;
      float* dqb = dq + ((long)b * T * H + h) * D + wg * 64 + 2 * t;
#pragma unroll
      for (int n = 0; n < 8; n++) {
        if (ra < T)
          atomicAdd(reinterpret_cast<float2*>(dqb + ra * qstride + n * 8),
                    make_float2(dqa[4 * n], dqa[4 * n + 1]));
        if (rc < T)
          atomicAdd(reinterpret_cast<float2*>(dqb + rc * qstride + n * 8),
                    make_float2(dqa[4 * n + 2], dqa[4 * n + 3]));
      }
    }
    // Every warpgroup is done with this step's buffers and dS^T before the next loads.
    __syncthreads();
  }
#pragma unroll
  for (int n = 0; n < D / 8; n++) {
    const int col = n * 8 + 2 * t;
    if (k0 < S) {
      const long r = (((long)b * S + k0) * H + h) * D + col;
      *reinterpret_cast<float2*>(dk + r) = make_float2(dka[4 * n], dka[4 * n + 1]);
      *reinterpret_cast<float2*>(dv + r) = make_float2(dva[4 * n], dva[4 * n + 1]);
    }
    if (k1 < S) {
      const long r = (((long)b * S + k1) * H + h) * D + col;
      *reinterpret_cast<float2*>(dk + r) = make_float2(dka[4 * n + 2], dka[4 * n + 3]);
      *reinterpret_cast<float2*>(dv + r) = make_float2(dva[4 * n + 2], dva[4 * n + 3]);
    }
  }
}
