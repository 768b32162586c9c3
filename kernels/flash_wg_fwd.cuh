// flash_wg_fwd.cuh: the forward of flash_wgmma_sm90a.cu (its header describes it): tile sizes,
// the forward's shared memory and `wg_fwd<PIPE>`, plain or pipelined.
#pragma once
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
// O (acc, 64 × 128 per warpgroup) += P·V for one 128-key tile: P from registers (the A
// fragments pa), V N-major in shared memory. Issued only; the caller commits and waits.
__device__ __forceinline__ void issue_pv(float* acc, uint32_t (*pa)[4], const bf16* vt) {
#pragma unroll
  for (int kk = 0; kk < WG_BC / 16; kk++)
    wgmma_rs_tn(acc, pa[kk], sw128_desc(vt + kk * 16 * 64, WG_BC * 128));
}

// The same product, fenced, committed and waited for.
__device__ __forceinline__ void pv_now(float* acc, uint32_t (*pa)[4], const bf16* vt) {
  pin<WG_D / 2>(acc);
  pin<WG_BC / 4>(&pa[0][0]);
  wg_fence();
  issue_pv(acc, pa, vt);
  wg_commit();
  wg_wait<0>();
  pin<WG_D / 2>(acc);
  pin<WG_BC / 4>(&pa[0][0]);
}

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
    load_sw128<BR, 256>(qs, q + ((long)b * T * H + h) * D, (long)H * D, qb * BR, T, tid);
    load_sw128<BC, 256>(ks, kb, kstride, lo, S, tid);
    load_sw128<BC, 256>(vs, vb, kstride, lo, S, tid);
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
      load_sw128<BC, 256>(ks + (cur ^ 1) * BC * D, kb, kstride, j0 + BC, S, tid);
      load_sw128<BC, 256>(vs + ((it + 1) % NV) * BC * D, vb, kstride, j0 + BC, S, tid);
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
        issue_pv(acc, pa, vpend);
        wg_commit();
        wg_wait<1>();  // S_j; P·V of the previous tile may still run
      } else {
        wg_wait<0>();
      }
      pin<BC / 2>(s);
      const Rescale rs = softmax_tile<BC>(s, m0, m1, l0, l1, whole, j0, r0, qs0, qs1,
                                          kss + cur * BC, S, T, off, causal, window, t,
                                          scale_log2);
      if (PIPE) {
        wg_wait<0>();  // the previous tile's P·V: O and its P registers are free again
        pin<D / 2>(acc);
        pin<BC / 4>(&pa[0][0]);
      }
#pragma unroll
      for (int kk = 0; kk < BC / 16; kk++) acc_to_a(s, kk, pa[kk]);
      rescale_o<D>(acc, rs);
      if (PIPE)
        vpend = vt;
      else
        pv_now(acc, pa, vt);
    }
    // Every warpgroup is done with tile `cur` (and, pipelined, with the V tile the next
    // iteration overwrites) before the next iteration loads into it.
    __syncthreads();
  }
  if (PIPE && lo < hi) pv_now(acc, pa, vpend);
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
    if (t == 0)
      lse[((long)b * H + h) * T + r0] = L0 > 0.f ? (m0 * scale_log2 + log2f(L0)) * ln2 : NEG_INF;
  }
  if (r1 < T) {
    uint32_t* o1 = reinterpret_cast<uint32_t*>(o + (((long)b * T + r1) * H + h) * D + 2 * t);
#pragma unroll
    for (int n = 0; n < D / 8; n++)
      o1[n * 4] = pack_f(acc[4 * n + 2] * inv1, acc[4 * n + 3] * inv1);
    if (t == 0)
      lse[((long)b * H + h) * T + r1] = L1 > 0.f ? (m1 * scale_log2 + log2f(L1)) * ln2 : NEG_INF;
  }
}
