// flash_wg_bwd.cuh: the backward of flash_wgmma_sm90a.cu, entry point `flash_wg_bwd_d128`.
#pragma once
#include "flash_wg_fwd.cuh"

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
  // P = 2^(s·scale·log2 e − lse·log2 e): one FMA and the SFU per weight.
  const float scale_log2 = scale * LOG2E_F;
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
    load_sw128<BR, 256>(qs + buf * BR * D, qb, qstride, i0, T, tid);
    load_sw128<BR, 256>(dos + buf * BR * D, db, qstride, i0, T, tid);
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

  load_sw128<BC, 256>(ks, k + ((long)b * S * KV + kvh) * D, (long)KV * D, kb * BC, S, tid);
  load_sw128<BC, 256>(vs, v + ((long)b * S * KV + kvh) * D, (long)KV * D, kb * BC, S, tid);
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
    // P^T and dS^T: a whole tile without a test per weight; masked weights are 0.
    if (whole)
      pt_dst<false, BR>(p, dp, lt, dlt, qss + buf * BR, i0, k0, ks0, ks1, T, S, off, causal,
                        window, t, scale_log2, scale);
    else
      pt_dst<true, BR>(p, dp, lt, dlt, qss + buf * BR, i0, k0, ks0, ks1, T, S, off, causal,
                       window, t, scale_log2, scale);
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
