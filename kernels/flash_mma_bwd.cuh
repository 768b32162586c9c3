// flash_mma_bwd.cuh: the backwards of flash_mma.cu (its header describes the algorithm and
// the layouts): `flash_bwd<D, NW, DQV>`, NW warps of 16 keys over 32-row query steps, and
// `flash_bwd64<D, DQV>`, FlashAttention-2's layout (8 warps, 128 keys, 64-row steps).
#pragma once

#include "attn_common.cuh"
#include "mma_sync.cuh"

// The backward's query rows per step. Its dynamic shared memory, in bytes, for BC = 16·NW
// keys: K (BC rows), Q and dO (2 × BWD_BR rows each), dS^T (BC × (BWD_BR + 8)), then lse, Δ,
// segment ids (2 × BWD_BR each); flash_mma.rs's bwd_smem is the same sum.
#define BWD_BR 32

template <int D, int NW, int DQV>
__device__ void flash_bwd(const bf16* __restrict__ q, const bf16* __restrict__ k,
                          const bf16* __restrict__ v, const bf16* __restrict__ dout,
                          const float* __restrict__ lse, const float* __restrict__ delta,
                          const unsigned* __restrict__ qseg, const unsigned* __restrict__ kseg,
                          const int* __restrict__ span, float* __restrict__ dq,
                          float* __restrict__ dk, float* __restrict__ dv, int T, int S, int H,
                          int KV, float scale, int causal, int window) {
  // P = 2^(s·scale·log2 e − lse·log2 e): one FMA and the SFU per weight.
  const float scale_log2 = scale * LOG2E_F;
  constexpr int BR = BWD_BR, BC = 16 * NW, LD = D + 8, LDS = BR + 8, NT = 32 * NW;
  DYN_SMEM(16, smem);
  bf16* ks = reinterpret_cast<bf16*>(smem);
  bf16* qs = ks + BC * LD;          // [2][BR × LD]
  bf16* dos = qs + 2 * BR * LD;     // [2][BR × LD]
  bf16* dst = dos + 2 * BR * LD;    // BC × LDS
  float* lses = reinterpret_cast<float*>(dst + BC * LDS);  // [2][BR]
  float* dls = lses + 2 * BR;                              // [2][BR]
  unsigned* qss = reinterpret_cast<unsigned*>(dls + 2 * BR);  // [2][BR]
  const int kb = blockIdx.x, b = blockIdx.y / H, h = blockIdx.y % H, kvh = h / (H / KV);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int off = S - T;
  const int nblk = (S + BC - 1) / BC;
  const int lo = span[2 * (b * nblk + kb)], hi = span[2 * (b * nblk + kb) + 1];
  const int kw = kb * BC + warp * 16;  // the warp's first key
  const int k0 = kw + g, k1 = k0 + 8;  // this thread's key rows
  const QSide<D, LD, BR, NT> qside(q, dout, lse, delta, qseg, qs, dos, lses, dls, qss, b, h, T, H);

  // The block's keys in one segment and all before S (kblk ≠ 0), or not (every tile masked).
  const unsigned k_first = kseg[(long)b * S + kb * BC];
  const int k_uni = __syncthreads_and(threadIdx.x >= BC ||
                                      (kb * BC + (int)threadIdx.x < S &&
                                       kseg[(long)b * S + kb * BC + threadIdx.x] == k_first));
  const unsigned kblk = k_uni ? k_first : 0u;

  load_rows<D, LD, BC, NT>(ks, k + ((long)b * S * KV + kvh) * D, (long)KV * D, kb * BC, S);
  cp_commit();
  if (lo < hi) qside.load(lo, 0);
  cp_commit();
  uint32_t vf[D / 16][4];
  {
    const bf16* v0 = v + (((long)b * S + min(k0, S - 1)) * KV + kvh) * D;
    const bf16* v1 = v + (((long)b * S + min(k1, S - 1)) * KV + kvh) * D;
    load_a_frags<D>(vf, v0, v1, t);
  }
  const unsigned ks0 = k0 < S ? kseg[(long)b * S + k0] : 0u;
  const unsigned ks1 = k1 < S ? kseg[(long)b * S + k1] : 0u;
  float dka[D / 8][4], dva[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; n++)
#pragma unroll
    for (int e = 0; e < 4; e++) dka[n][e] = dva[n][e] = 0.f;

  // dQ: warp w owns query rows (w % 2)·16 of the block and the (w / 2)-th of NW / 2 parts of D.
  constexpr int DQN = D / 8 / (NW / 2);  // n-tiles of 8 columns per warp
  static_assert(DQN * 8 * (NW / 2) == D, "D splits into NW / 2 parts of whole n-tiles");
  const int mq = (warp % 2) * 16, nh = (warp / 2) * DQN;
  int buf = 0;
  for (int i0 = lo; i0 < hi; i0 += BR, buf ^= 1) {
    if (i0 + BR < hi) qside.load(i0 + BR, buf ^ 1);
    cp_commit();
    cp_wait<1>();
    bool seg_whole = true;
    if (threadIdx.x < BR)
      seg_whole = i0 + (int)threadIdx.x < T && qss[buf * BR + threadIdx.x] == kblk && kblk != 0u;
    // This block's rows have landed for every thread; every warp is done with dS^T of the
    // last block.
    const bool tile_whole = __syncthreads_and(seg_whole);
    const bf16* qt = qs + buf * BR * LD;
    const bf16* dot = dos + buf * BR * LD;
    const float* lt = lses + buf * BR;
    const float* dlt = dls + buf * BR;
    const bool skip = causal && kw > i0 + BR - 1 + off;
    const bool whole = tile_whole && (!causal || kw + 15 <= i0 + off) &&
                       (window == 0 || kw + window > i0 + BR - 1 + off);
    float p[BR / 8][4], dp[BR / 8][4];
#pragma unroll
    for (int n = 0; n < BR / 8; n++)
#pragma unroll
      for (int e = 0; e < 4; e++) p[n][e] = dp[n][e] = 0.f;
    if (!skip) {
      // S^T = K·Q^T and dP^T = V·dO^T (16 keys × BR queries)
#pragma unroll
      for (int kk = 0; kk < D / 16; kk++) {
        uint32_t ka[4];
        ldsm4(ka, &ks[(warp * 16 + ((lane / 8) % 2) * 8 + lane % 8) * LD + kk * 16 + (lane / 16) * 8]);
#pragma unroll
        for (int np = 0; np < BR / 16; np++) {
          const int at = (np * 16 + (lane / 16) * 8 + lane % 8) * LD + kk * 16 + ((lane / 8) % 2) * 8;
          uint32_t bq[4], bd[4];
          ldsm4(bq, &qt[at]);
          ldsm4(bd, &dot[at]);
          mma16816(p[2 * np], ka, bq[0], bq[1]);
          mma16816(p[2 * np + 1], ka, bq[2], bq[3]);
          mma16816(dp[2 * np], vf[kk], bd[0], bd[1]);
          mma16816(dp[2 * np + 1], vf[kk], bd[2], bd[3]);
        }
      }
      // P^T and dS^T: a whole tile without a test per weight; masked weights are 0.
      if (whole)
        pt_dst<false, BR>(&p[0][0], &dp[0][0], lt, dlt, qss + buf * BR, i0, k0, ks0, ks1, T, S,
                          off, causal, window, t, scale_log2, scale);
      else
        pt_dst<true, BR>(&p[0][0], &dp[0][0], lt, dlt, qss + buf * BR, i0, k0, ks0, ks1, T, S,
                         off, causal, window, t, scale_log2, scale);
      // dV += P^T·dO, dK += dS^T·Q (k = the block's BR queries)
#pragma unroll
      for (int kk = 0; kk < BR / 16; kk++) {
        uint32_t ap[4], as[4];
        c_to_a(p, kk, ap);
        c_to_a(dp, kk, as);
#pragma unroll
        for (int np = 0; np < D / 16; np++) {
          const int at = (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * LD + np * 16 + (lane / 16) * 8;
          uint32_t bd[4], bq[4];
          ldsm4t(bd, &dot[at]);
          ldsm4t(bq, &qt[at]);
          mma16816(dva[2 * np], ap, bd[0], bd[1]);
          mma16816(dva[2 * np + 1], ap, bd[2], bd[3]);
          mma16816(dka[2 * np], as, bq[0], bq[1]);
          mma16816(dka[2 * np + 1], as, bq[2], bq[3]);
        }
      }
    }
    // dS^T to shared memory (bf16; zeros where the warp skipped), then dQ = dS·K over the
    // CTA's 64 keys.
#pragma unroll
    for (int n = 0; n < BR / 8; n++) {
      const int col = n * 8 + 2 * t;
      *reinterpret_cast<uint32_t*>(&dst[(warp * 16 + g) * LDS + col]) = pack_f(dp[n][0], dp[n][1]);
      *reinterpret_cast<uint32_t*>(&dst[(warp * 16 + g + 8) * LDS + col]) = pack_f(dp[n][2], dp[n][3]);
    }
    __syncthreads();
    float dqa[DQN][4];
#pragma unroll
    for (int n = 0; n < DQN; n++) dqa[n][0] = dqa[n][1] = dqa[n][2] = dqa[n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < BC / 16; kk++) {
      // A (query, key) = dS^T[key][query]: the transposed matrices of dS^T's tile.
      uint32_t a[4];
      ldsm4t(a, &dst[(kk * 16 + (lane / 16) * 8 + lane % 8) * LDS + mq + ((lane / 8) % 2) * 8]);
      const bf16* kr = &ks[(kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * LD + nh * 8];
#pragma unroll
      for (int np = 0; np < DQN / 2; np++) {
        uint32_t bk[4];
        ldsm4t(bk, kr + np * 16 + (lane / 16) * 8);
        mma16816(dqa[2 * np], a, bk[0], bk[1]);
        mma16816(dqa[2 * np + 1], a, bk[2], bk[3]);
      }
      if (DQN % 2) {
        uint32_t bk[2];
        ldsm2t(bk, kr + (DQN - 1) * 8);
        mma16816(dqa[DQN - 1], a, bk[0], bk[1]);
      }
    }
    add_dq<DQV, DQN>(dq + ((long)b * T * H + h) * D, (long)H * D, dqa, i0 + mq, nh * 8, T, g, t);
  }
  store_dkv<D, D / 8>(dk, dv, dka, dva, k0, 0, b, h, S, H, t);
}

// The backward in FlashAttention-2's layout, for D 64 and 128: one CTA of 8 warps per
// (128 keys, b·H + h), K and V in shared memory for the whole CTA, steps of 64 query rows
// with Q / dO / lse / Δ / segment ids double-buffered by cp.async. Per step:
//   1. S = Q·K^T and dP = dO·V^T (64 × 128): warps 2 (rows) × 4 (keys), 32 × 32 each;
//   2. P = exp(S·scale − lse) and dS = P ∘ (dP − Δ)·scale in registers, then to shared
//      memory as bf16, [query][key];
//   3. dV += P^T·dO and dK += dS^T·Q (128 × D): warps 4 (keys) × 2 (columns), accumulated
//      in registers over the steps;
//   4. dQ += dS·K (64 × D): warps 2 (rows) × 4 (columns), added with f32 atomics (add_dq).
// Two barriers per step (half the current kernel's per row), half its dQ atomics (128 keys
// per CTA). dK / dV per query head as flash_bwd. Dynamic shared memory: K, V (128 rows),
// Q and dO (2 × 64 rows), P and dS (64 × 136), lse, Δ and segment ids (2 × 64), key
// segment ids (128); flash_mma.rs's bwd64_smem is the same sum.
template <int D, int DQV>
__device__ void flash_bwd64(const bf16* __restrict__ q, const bf16* __restrict__ k,
                            const bf16* __restrict__ v, const bf16* __restrict__ dout,
                            const float* __restrict__ lse, const float* __restrict__ delta,
                            const unsigned* __restrict__ qseg, const unsigned* __restrict__ kseg,
                            const int* __restrict__ span, float* __restrict__ dq,
                            float* __restrict__ dk, float* __restrict__ dv, int T, int S, int H,
                            int KV, float scale, int causal, int window) {
  // P = 2^(s·scale·log2 e − lse·log2 e): one FMA and the SFU per weight.
  const float scale_log2 = scale * LOG2E_F;
  constexpr int BR = 64, BC = 128, LD = D + 8, LDP = BC + 8, NT = 256;
  constexpr int NV = D / 16;  // dK / dV n-tiles per warp (D / 2 columns)
  constexpr int NQ = D / 32;  // dQ n-tiles per warp (D / 4 columns)
  static_assert(NQ % 2 == 0, "D is 64 or 128");
  DYN_SMEM(16, smem);
  bf16* ks = reinterpret_cast<bf16*>(smem);  // BC × LD
  bf16* vs = ks + BC * LD;                   // BC × LD
  bf16* qs = vs + BC * LD;                   // [2][BR × LD]
  bf16* dos = qs + 2 * BR * LD;              // [2][BR × LD]
  bf16* ps = dos + 2 * BR * LD;              // BR × LDP
  bf16* dss = ps + BR * LDP;                 // BR × LDP
  float* lses = reinterpret_cast<float*>(dss + BR * LDP);     // [2][BR]
  float* dls = lses + 2 * BR;                                 // [2][BR]
  unsigned* qss = reinterpret_cast<unsigned*>(dls + 2 * BR);  // [2][BR]
  unsigned* kss = qss + 2 * BR;                               // [BC]
  const int kb = blockIdx.x, b = blockIdx.y / H, h = blockIdx.y % H, kvh = h / (H / KV);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int off = S - T;
  const int nblk = (S + BC - 1) / BC;
  const int lo = span[2 * (b * nblk + kb)], hi = span[2 * (b * nblk + kb) + 1];
  const int j0 = kb * BC;  // the CTA's first key
  const QSide<D, LD, BR, NT, true> qside(q, dout, lse, delta, qseg, qs, dos, lses, dls, qss, b, h, T, H);

  // The keys' segment ids (0 past S), and whether all BC keys are one segment before S.
  unsigned kid = 0u;
  if (threadIdx.x < BC) {
    const int j = j0 + threadIdx.x;
    kid = j < S ? kseg[(long)b * S + j] : 0u;
    kss[threadIdx.x] = kid;
  }
  const unsigned k_first = kseg[(long)b * S + j0];
  const int k_uni = __syncthreads_and(threadIdx.x >= BC ||
                                      (j0 + (int)threadIdx.x < S && kid == k_first));
  const unsigned kblk = k_uni ? k_first : 0u;

  load_rows<D, LD, BC, NT>(ks, k + ((long)b * S * KV + kvh) * D, (long)KV * D, j0, S);
  load_rows<D, LD, BC, NT>(vs, v + ((long)b * S * KV + kvh) * D, (long)KV * D, j0, S);
  if (lo < hi) qside.load(lo, 0);
  cp_commit();

  // Steps 1–2: the warp's rows qr + [0, 32) and keys kc + [0, 32) of the step's tile.
  const int qr = (warp / 4) * 32, kc = (warp % 4) * 32;
  // Step 3: keys kr + [0, 32), columns dc + [0, D / 2).
  const int kr = (warp % 4) * 32, dc = (warp / 4) * (D / 2);
  // Step 4: rows qr4 + [0, 32), columns qc4 + [0, D / 4).
  const int qr4 = (warp % 2) * 32, qc4 = (warp / 2) * (D / 4);
  float dka[2][NV][4], dva[2][NV][4];
#pragma unroll
  for (int mt = 0; mt < 2; mt++)
#pragma unroll
    for (int n = 0; n < NV; n++)
#pragma unroll
      for (int e = 0; e < 4; e++) dka[mt][n][e] = dva[mt][n][e] = 0.f;

  int buf = 0;
  for (int i0 = lo; i0 < hi; i0 += BR, buf ^= 1) {
    cp_wait<0>();
    bool seg_whole = true;
    if (threadIdx.x < BR)
      seg_whole = i0 + (int)threadIdx.x < T && qss[buf * BR + threadIdx.x] == kblk && kblk != 0u;
    // This step's rows (and at the first, K and V) have landed for every thread; every warp
    // is done with the last step, so its buffer, P and dS may be overwritten.
    const bool tile_whole = __syncthreads_and(seg_whole);
    if (i0 + BR < hi) qside.load(i0 + BR, buf ^ 1);
    cp_commit();
    const bf16* qt = qs + buf * BR * LD;
    const bf16* dot = dos + buf * BR * LD;
    const float* lt = lses + buf * BR;
    const float* dlt = dls + buf * BR;
    const unsigned* st = qss + buf * BR;

    // 1. S and dP.
    const bool skip = causal && j0 + kc > i0 + qr + 31 + off;
    const bool whole = tile_whole && (!causal || j0 + kc + 31 <= i0 + qr + off) &&
                       (window == 0 || j0 + kc + window > i0 + qr + 31 + off);
    float sp[2][4][4], dp[2][4][4];
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
      for (int n = 0; n < 4; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) sp[mt][n][e] = dp[mt][n][e] = 0.f;
    if (!skip) {
#pragma unroll
      for (int kk = 0; kk < D / 16; kk++) {
        uint32_t qa[2][4], da[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; mt++) {
          const int at = (qr + mt * 16 + ((lane / 8) % 2) * 8 + lane % 8) * LD + kk * 16 + (lane / 16) * 8;
          ldsm4(qa[mt], &qt[at]);
          ldsm4(da[mt], &dot[at]);
        }
#pragma unroll
        for (int np = 0; np < 2; np++) {
          const int bt = (kc + np * 16 + (lane / 16) * 8 + lane % 8) * LD + kk * 16 + ((lane / 8) % 2) * 8;
          uint32_t bk[4], bv[4];
          ldsm4(bk, &ks[bt]);
          ldsm4(bv, &vs[bt]);
#pragma unroll
          for (int mt = 0; mt < 2; mt++) {
            mma16816(sp[mt][2 * np], qa[mt], bk[0], bk[1]);
            mma16816(sp[mt][2 * np + 1], qa[mt], bk[2], bk[3]);
            mma16816(dp[mt][2 * np], da[mt], bv[0], bv[1]);
            mma16816(dp[mt][2 * np + 1], da[mt], bv[2], bv[3]);
          }
        }
      }
      // 2. P and dS: a whole tile without a test per weight; masked weights are 0.
      auto weights = [&](auto masked) {
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
#pragma unroll
          for (int n = 0; n < 4; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
              const int il = qr + mt * 16 + g + (e >= 2 ? 8 : 0), i = i0 + il;
              const int jl = kc + n * 8 + 2 * t + (e & 1), j = j0 + jl;
              if (decltype(masked)::value &&
                  !(i < T && j < S && allowed(i, j, st[il], kss[jl], off, causal, window)))
                sp[mt][n][e] = dp[mt][n][e] = 0.f;
              else
                p_ds(sp[mt][n][e], dp[mt][n][e], lt[il], dlt[il], scale_log2, scale);
            }
      };
      if (whole)
        weights(Flag<false>());
      else
        weights(Flag<true>());
    }
    // P and dS to shared memory (zeros where the warp skipped).
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
      for (int n = 0; n < 4; n++) {
        const int r = qr + mt * 16 + g, c = kc + n * 8 + 2 * t;
        *reinterpret_cast<uint32_t*>(&ps[r * LDP + c]) = pack_f(sp[mt][n][0], sp[mt][n][1]);
        *reinterpret_cast<uint32_t*>(&ps[(r + 8) * LDP + c]) = pack_f(sp[mt][n][2], sp[mt][n][3]);
        *reinterpret_cast<uint32_t*>(&dss[r * LDP + c]) = pack_f(dp[mt][n][0], dp[mt][n][1]);
        *reinterpret_cast<uint32_t*>(&dss[(r + 8) * LDP + c]) = pack_f(dp[mt][n][2], dp[mt][n][3]);
      }
    __syncthreads();

    // 3. dV += P^T·dO, dK += dS^T·Q: A (key, query) = the transposed matrices of P / dS.
#pragma unroll
    for (int kk = 0; kk < BR / 16; kk++) {
      uint32_t pa[2][4], sa[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; mt++) {
        const int at = (kk * 16 + (lane / 16) * 8 + lane % 8) * LDP + kr + mt * 16 + ((lane / 8) % 2) * 8;
        ldsm4t(pa[mt], &ps[at]);
        ldsm4t(sa[mt], &dss[at]);
      }
#pragma unroll
      for (int np = 0; np < NV / 2; np++) {
        const int bt = (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * LD + dc + np * 16 + (lane / 16) * 8;
        uint32_t bd[4], bq[4];
        ldsm4t(bd, &dot[bt]);
        ldsm4t(bq, &qt[bt]);
#pragma unroll
        for (int mt = 0; mt < 2; mt++) {
          mma16816(dva[mt][2 * np], pa[mt], bd[0], bd[1]);
          mma16816(dva[mt][2 * np + 1], pa[mt], bd[2], bd[3]);
          mma16816(dka[mt][2 * np], sa[mt], bq[0], bq[1]);
          mma16816(dka[mt][2 * np + 1], sa[mt], bq[2], bq[3]);
        }
      }
    }

    // 4. dQ += dS·K over the CTA's 128 keys.
    float dqa[2][NQ][4];
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
      for (int n = 0; n < NQ; n++) dqa[mt][n][0] = dqa[mt][n][1] = dqa[mt][n][2] = dqa[mt][n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < BC / 16; kk++) {
      uint32_t a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; mt++)
        ldsm4(a[mt], &dss[(qr4 + mt * 16 + ((lane / 8) % 2) * 8 + lane % 8) * LDP + kk * 16 + (lane / 16) * 8]);
      const bf16* kp = &ks[(kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * LD + qc4];
#pragma unroll
      for (int np = 0; np < NQ / 2; np++) {
        uint32_t bk[4];
        ldsm4t(bk, kp + np * 16 + (lane / 16) * 8);
#pragma unroll
        for (int mt = 0; mt < 2; mt++) {
          mma16816(dqa[mt][2 * np], a[mt], bk[0], bk[1]);
          mma16816(dqa[mt][2 * np + 1], a[mt], bk[2], bk[3]);
        }
      }
    }
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
      add_dq<DQV, NQ>(dq + ((long)b * T * H + h) * D, (long)H * D, dqa[mt], i0 + qr4 + mt * 16, qc4,
                      T, g, t);
  }
  cp_wait<0>();
#pragma unroll
  for (int mt = 0; mt < 2; mt++)
    store_dkv<D, NV>(dk, dv, dka[mt], dva[mt], j0 + kr + mt * 16 + g, dc, b, h, S, H, t);
}
