// flash_mma_fwd.cuh: the forward of flash_mma.cu (its header describes the algorithm and the
// layouts), `flash_fwd<D, NW, MT>`: NW warps of MT 16-row m-tiles per CTA.
#pragma once

#include "attn_common.cuh"
#include "mma_sync.cuh"

template <int D, int NW, int MT>
__device__ void flash_fwd(const bf16* __restrict__ q, const bf16* __restrict__ k,
                          const bf16* __restrict__ v, const unsigned* __restrict__ qseg,
                          const unsigned* __restrict__ kseg, const int* __restrict__ span,
                          bf16* __restrict__ o, float* __restrict__ lse, int T, int S, int H,
                          int KV, float scale_log2, int causal, int window) {
  // MT m-tiles of 16 rows per warp: with MT = 1 the Q fragments stay in registers; with
  // MT = 2 Q waits in (dynamic) shared memory and each K / V fragment feeds both m-tiles.
  constexpr int BR = 16 * NW * MT, BC = 64, LD = D + 8, NT = 32 * NW;
  constexpr bool Q_SMEM = MT > 1;
  __shared__ __align__(16) bf16 ks[BC * LD];
  __shared__ __align__(16) bf16 vs[BC * LD];
  __shared__ unsigned kss[BC];
  DYN_SMEM(16, qsmem);  // BR × LD bf16 when Q_SMEM
  bf16* qsm = reinterpret_cast<bf16*>(qsmem);
  const int qb = gridDim.x - 1 - blockIdx.x, b = blockIdx.y / H, h = blockIdx.y % H;
  const int kvh = h / (H / KV);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int off = S - T;
  const int w0 = qb * BR + warp * 16 * MT;  // the warp's first row
  const int nblk = (T + BR - 1) / BR;
  const int lo = span[2 * (b * nblk + qb)], hi = span[2 * (b * nblk + qb) + 1];
  const bf16* kb = k + ((long)b * S * KV + kvh) * D;
  const bf16* vb = v + ((long)b * S * KV + kvh) * D;
  const long kstride = (long)KV * D;

  // The block's rows in one segment (qblk ≠ 0) or not (qblk = 0: every tile is masked).
  const unsigned q_first = qseg[(long)b * T + qb * BR];
  const int q_uni = __syncthreads_and(threadIdx.x >= BR || qb * BR + (int)threadIdx.x >= T ||
                                      qseg[(long)b * T + qb * BR + threadIdx.x] == q_first);
  const unsigned qblk = q_uni ? q_first : 0u;
  const int w_last = min(w0 + 16 * MT - 1, T - 1);

  if (lo < hi) {
    if (Q_SMEM) load_rows<D, LD, BR, NT>(qsm, q + ((long)b * T * H + h) * D, (long)H * D, qb * BR, T);
    load_rows<D, LD, BC, NT>(ks, kb, kstride, lo, S);
    cp_commit();
  }
  uint32_t qf[Q_SMEM ? 1 : D / 16][4];
  if (!Q_SMEM) {
    const int r0 = w0 + g, r1 = r0 + 8;
    const bf16* q0 = q + (((long)b * T + min(r0, T - 1)) * H + h) * D;
    const bf16* q1 = q + (((long)b * T + min(r1, T - 1)) * H + h) * D;
    load_a_frags<Q_SMEM ? 16 : D>(qf, q0, q1, t);
  }
  // Per m-tile: rows r0 = w0 + 16·mt + g and r1 = r0 + 8, their segments, running max and sum.
  unsigned qs0[MT], qs1[MT];
  float m0[MT], m1[MT], l0[MT], l1[MT];
  float acc[MT][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < MT; mt++) {
    const int r0 = w0 + 16 * mt + g, r1 = r0 + 8;
    qs0[mt] = r0 < T ? qseg[(long)b * T + r0] : 0u;
    qs1[mt] = r1 < T ? qseg[(long)b * T + r1] : 0u;
    m0[mt] = m1[mt] = NEG_INF;
    l0[mt] = l1[mt] = 0.f;
#pragma unroll
    for (int n = 0; n < D / 8; n++) acc[mt][n][0] = acc[mt][n][1] = acc[mt][n][2] = acc[mt][n][3] = 0.f;
  }

  for (int j0 = lo; j0 < hi; j0 += BC) {
    // This tile's key segments, and whether they are all the block's one segment.
    bool seg_whole = true;
    if (threadIdx.x < BC) {
      const int j = j0 + threadIdx.x;
      const unsigned s = j < S ? kseg[(long)b * S + j] : 0u;
      kss[threadIdx.x] = s;
      seg_whole = j < S && s == qblk && qblk != 0u;
    }
    cp_wait<0>();
    // K (and Q) have landed for every thread; every warp is done with the last tile's V.
    const bool tile_whole = __syncthreads_and(seg_whole);
    load_rows<D, LD, BC, NT>(vs, vb, kstride, j0, S);
    cp_commit();
    const bool skip = causal && j0 > w0 + 16 * MT - 1 + off;
    const bool whole = tile_whole && (!causal || j0 + BC - 1 <= w0 + off) &&
                       (window == 0 || j0 + window > w_last + off);

    float s[MT][BC / 8][4];
    uint32_t pa[MT][BC / 16][4];  // P as the A fragments of O += P·V (bf16)
    if (!skip) {
#pragma unroll
      for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int n = 0; n < BC / 8; n++) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; kk++) {
        uint32_t qa[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
          if (Q_SMEM)
            ldsm4(qa[mt], &qsm[(warp * 16 * MT + mt * 16 + ((lane / 8) % 2) * 8 + lane % 8) * LD +
                               kk * 16 + (lane / 16) * 8]);
          else
#pragma unroll
            for (int e = 0; e < 4; e++) qa[mt][e] = qf[Q_SMEM ? 0 : kk][e];
        }
#pragma unroll
        for (int np = 0; np < BC / 16; np++) {
          uint32_t bk[4];
          ldsm4(bk, &ks[(np * 16 + (lane / 16) * 8 + lane % 8) * LD + kk * 16 + ((lane / 8) % 2) * 8]);
#pragma unroll
          for (int mt = 0; mt < MT; mt++) {
            mma16816(s[mt][2 * np], qa[mt], bk[0], bk[1]);
            mma16816(s[mt][2 * np + 1], qa[mt], bk[2], bk[3]);
          }
        }
      }
#pragma unroll
      for (int mt = 0; mt < MT; mt++) {
        const Rescale rs =
            softmax_tile<BC>(&s[mt][0][0], m0[mt], m1[mt], l0[mt], l1[mt], whole, j0,
                             w0 + 16 * mt + g, qs0[mt], qs1[mt], kss, S, T, off, causal,
                             window, t, scale_log2);
#pragma unroll
        for (int kk = 0; kk < BC / 16; kk++) c_to_a(s[mt], kk, pa[mt][kk]);
        rescale_o<D>(&acc[mt][0][0], rs);
      }
    }
    cp_wait<0>();
    // V has landed; every warp is done with this tile's K.
    __syncthreads();
    if (j0 + BC < hi) {
      load_rows<D, LD, BC, NT>(ks, kb, kstride, j0 + BC, S);
      cp_commit();
    }
    if (!skip) {
#pragma unroll
      for (int kk = 0; kk < BC / 16; kk++) {
#pragma unroll
        for (int np = 0; np < D / 16; np++) {
          uint32_t bv[4];
          ldsm4t(bv, &vs[(kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * LD + np * 16 + (lane / 16) * 8]);
#pragma unroll
          for (int mt = 0; mt < MT; mt++) {
            mma16816(acc[mt][2 * np], pa[mt][kk], bv[0], bv[1]);
            mma16816(acc[mt][2 * np + 1], pa[mt][kk], bv[2], bv[3]);
          }
        }
      }
    }
  }
  const float ln2 = 0.69314718055994531f;
#pragma unroll
  for (int mt = 0; mt < MT; mt++) {
    const int r0 = w0 + 16 * mt + g, r1 = r0 + 8;
    float L0 = l0[mt], L1 = l1[mt];
    L0 += __shfl_xor_sync(0xffffffffu, L0, 1);
    L0 += __shfl_xor_sync(0xffffffffu, L0, 2);
    L1 += __shfl_xor_sync(0xffffffffu, L1, 1);
    L1 += __shfl_xor_sync(0xffffffffu, L1, 2);
    const float inv0 = L0 > 0.f ? 1.f / L0 : 0.f, inv1 = L1 > 0.f ? 1.f / L1 : 0.f;
    if (r0 < T) {
      uint32_t* o0 = reinterpret_cast<uint32_t*>(o + (((long)b * T + r0) * H + h) * D + 2 * t);
#pragma unroll
      for (int n = 0; n < D / 8; n++) o0[n * 4] = pack_f(acc[mt][n][0] * inv0, acc[mt][n][1] * inv0);
      if (t == 0)
        lse[((long)b * H + h) * T + r0] = L0 > 0.f ? (m0[mt] * scale_log2 + log2f(L0)) * ln2 : NEG_INF;
    }
    if (r1 < T) {
      uint32_t* o1 = reinterpret_cast<uint32_t*>(o + (((long)b * T + r1) * H + h) * D + 2 * t);
#pragma unroll
      for (int n = 0; n < D / 8; n++) o1[n * 4] = pack_f(acc[mt][n][2] * inv1, acc[mt][n][3] * inv1);
      if (t == 0)
        lse[((long)b * H + h) * T + r1] = L1 > 0.f ? (m1[mt] * scale_log2 + log2f(L1)) * ln2 : NEG_INF;
    }
  }
}
