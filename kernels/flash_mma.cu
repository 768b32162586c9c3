// flash_mma.cu: attention for training on the tensor cores (bf16 in, f32 accumulation), the
// FlashAttention-2 algorithm with mma.sync.m16n8k16: the scores of a tile live in registers
// and never reach memory. Same function as flash_attn.cu / the GEMM path: causal, segment ids
// (packed samples, vision windows; 0 = padding), sliding window, GQA; a query with no allowed
// key gets o = 0 and lse = −∞.
//
// Layouts: q (B, T, H, D), k/v (B, S, KV, D), o (B, T, H, D), lse / delta (B, H, T) f32.
// D ∈ {64, 80, 128} (a multiple of 16). The keys of S are the last T's context: off = S − T,
// key j is allowed for query i when qseg[i] ≠ 0, kseg[j] = qseg[i], j ≤ i + off (causal) and
// j + window > i + off (window > 0).
//
// forward: one CTA per (64 query rows, b·H + h), 4 warps of 16 rows; K and V tiles of 64 keys
//   in shared memory; online softmax in the exp2 domain; P cast to bf16 for P·V (as the
//   reference casts the probabilities to the input dtype). The host gives each (b, block of
//   64 rows) the key span [lo, hi) that can hold allowed keys (segments, causal, window).
// backward: one CTA per (64 keys, b·H + h), 4 warps of 16 keys, over the blocks of 32 query
//   rows the host's span allows: S^T = K·Q^T, P^T, dV += P^T·dO, dP^T = V·dO^T,
//   dS^T = P^T ∘ (dP^T − Δ)·scale, dK += dS^T·Q (registers), dQ += dS·K through shared memory
//   and f32 atomics. dK and dV are written per query head (f32, (B, S, H, D)); the host sums
//   a GQA group's heads.
//
// mma.sync.m16n8k16 fragments (lane = 4·g + t): A (16 × 16, row major) regs {(g, 2t..2t+1),
// (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)}; B (16 × 8, "col": element (k, n)) regs
// {(2t..2t+1, g), (2t+8..2t+9, g)}; C (16 × 8 f32) {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}.
// The C fragments of two adjacent n-tiles are the A fragment of one k-step: P and dS go from
// one product into the next without leaving registers.
#include "common.cuh"

#define NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as a bf16 pair: `lo` in the low half (the lower column / k index).
__device__ __forceinline__ uint32_t pack_f(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t pack_h(bf16 lo, bf16 hi) {
  return (uint32_t)__bfloat16_as_ushort(lo) | ((uint32_t)__bfloat16_as_ushort(hi) << 16);
}

__device__ __forceinline__ uint32_t ld32(const bf16* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

__device__ __forceinline__ bool allowed(int i, int j, unsigned qs, unsigned ks, int off,
                                        int causal, int window) {
  return qs != 0u && qs == ks && (!causal || j <= i + off) && (window == 0 || j + window > i + off);
}

// The A fragment of k-step kk from C fragments c[2kk], c[2kk+1] (rows × 16 columns).
__device__ __forceinline__ void c_to_a(const float (*c)[4], int kk, uint32_t* a) {
  a[0] = pack_f(c[2 * kk][0], c[2 * kk][1]);
  a[1] = pack_f(c[2 * kk][2], c[2 * kk][3]);
  a[2] = pack_f(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = pack_f(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

template <int D>
__device__ void flash_fwd(const bf16* __restrict__ q, const bf16* __restrict__ k,
                          const bf16* __restrict__ v, const unsigned* __restrict__ qseg,
                          const unsigned* __restrict__ kseg, const int* __restrict__ span,
                          bf16* __restrict__ o, float* __restrict__ lse, int T, int S, int H,
                          int KV, float scale_log2, int causal, int window) {
  constexpr int BR = 64, BC = 64, LD = D + 8;
  __shared__ __align__(16) bf16 ks[BC * LD];
  __shared__ __align__(16) bf16 vs[BC * LD];
  __shared__ unsigned kss[BC];
  const int qb = blockIdx.x, b = blockIdx.y / H, h = blockIdx.y % H, kvh = h / (H / KV);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int off = S - T;
  const int r0 = qb * BR + warp * 16 + g, r1 = r0 + 8;
  const int nblk = (T + BR - 1) / BR;
  const int lo = span[2 * (b * nblk + qb)], hi = span[2 * (b * nblk + qb) + 1];

  uint32_t qf[D / 16][4];
  {
    const bf16* q0 = q + (((long)b * T + min(r0, T - 1)) * H + h) * D;
    const bf16* q1 = q + (((long)b * T + min(r1, T - 1)) * H + h) * D;
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
      qf[kk][0] = ld32(q0 + kk * 16 + 2 * t);
      qf[kk][1] = ld32(q1 + kk * 16 + 2 * t);
      qf[kk][2] = ld32(q0 + kk * 16 + 8 + 2 * t);
      qf[kk][3] = ld32(q1 + kk * 16 + 8 + 2 * t);
    }
  }
  const unsigned qs0 = r0 < T ? qseg[(long)b * T + r0] : 0u;
  const unsigned qs1 = r1 < T ? qseg[(long)b * T + r1] : 0u;
  float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;
  float acc[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;

  for (int j0 = lo; j0 < hi; j0 += BC) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < BC * (D / 2); idx += blockDim.x) {
      const int row = idx / (D / 2), c2 = idx % (D / 2), j = j0 + row;
      uint32_t kw = 0u, vw = 0u;
      if (j < S) {
        const long base = (((long)b * S + j) * KV + kvh) * D + 2 * c2;
        kw = ld32(k + base);
        vw = ld32(v + base);
      }
      *reinterpret_cast<uint32_t*>(&ks[row * LD + 2 * c2]) = kw;
      *reinterpret_cast<uint32_t*>(&vs[row * LD + 2 * c2]) = vw;
    }
    for (int row = threadIdx.x; row < BC; row += blockDim.x)
      kss[row] = j0 + row < S ? kseg[(long)b * S + j0 + row] : 0u;
    __syncthreads();
    // A warp whose rows all precede the tile (causal) has nothing to do in it.
    if (causal && j0 > qb * BR + warp * 16 + 15 + off) continue;

    float s[BC / 8][4];
#pragma unroll
    for (int n = 0; n < BC / 8; n++) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; kk++) {
        const bf16* kp = &ks[(n * 8 + g) * LD + kk * 16 + 2 * t];
        mma16816(s[n], qf[kk], ld32(kp), ld32(kp + 8));
      }
    }
    float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
    for (int n = 0; n < BC / 8; n++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int jl = n * 8 + 2 * t + (e & 1), j = j0 + jl;
        const bool top = e < 2;
        const int i = top ? r0 : r1;
        const bool ok = j < S && i < T && allowed(i, j, top ? qs0 : qs1, kss[jl], off, causal, window);
        const float x = ok ? s[n][e] * scale_log2 : NEG_INF;
        s[n][e] = x;
        if (top) mx0 = fmaxf(mx0, x); else mx1 = fmaxf(mx1, x);
      }
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    // Rescale of what was summed so far (1 while nothing was: the sums are 0 then).
    const float a0 = mn0 == NEG_INF ? 1.f : exp2f(m0 - mn0);
    const float a1 = mn1 == NEG_INF ? 1.f : exp2f(m1 - mn1);
    float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
    for (int n = 0; n < BC / 8; n++) {
      s[n][0] = mn0 == NEG_INF ? 0.f : exp2f(s[n][0] - mn0);
      s[n][1] = mn0 == NEG_INF ? 0.f : exp2f(s[n][1] - mn0);
      s[n][2] = mn1 == NEG_INF ? 0.f : exp2f(s[n][2] - mn1);
      s[n][3] = mn1 == NEG_INF ? 0.f : exp2f(s[n][3] - mn1);
      sum0 += s[n][0] + s[n][1];
      sum1 += s[n][2] + s[n][3];
    }
    l0 = l0 * a0 + sum0;
    l1 = l1 * a1 + sum1;
    m0 = mn0;
    m1 = mn1;
#pragma unroll
    for (int n = 0; n < D / 8; n++) {
      acc[n][0] *= a0;
      acc[n][1] *= a0;
      acc[n][2] *= a1;
      acc[n][3] *= a1;
    }
#pragma unroll
    for (int kk = 0; kk < BC / 16; kk++) {
      uint32_t a[4];
      c_to_a(s, kk, a);
      const bf16* v0 = &vs[(kk * 16 + 2 * t) * LD + g];
#pragma unroll
      for (int n = 0; n < D / 8; n++) {
        const bf16* vp = v0 + n * 8;
        mma16816(acc[n], a, pack_h(vp[0], vp[LD]), pack_h(vp[8 * LD], vp[9 * LD]));
      }
    }
  }
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
  const float ln2 = 0.69314718055994531f;
  if (r0 < T) {
    uint32_t* o0 = reinterpret_cast<uint32_t*>(o + (((long)b * T + r0) * H + h) * D + 2 * t);
#pragma unroll
    for (int n = 0; n < D / 8; n++) o0[n * 4] = pack_f(acc[n][0] * inv0, acc[n][1] * inv0);
    if (t == 0) lse[((long)b * H + h) * T + r0] = l0 > 0.f ? (m0 + log2f(l0)) * ln2 : NEG_INF;
  }
  if (r1 < T) {
    uint32_t* o1 = reinterpret_cast<uint32_t*>(o + (((long)b * T + r1) * H + h) * D + 2 * t);
#pragma unroll
    for (int n = 0; n < D / 8; n++) o1[n * 4] = pack_f(acc[n][2] * inv1, acc[n][3] * inv1);
    if (t == 0) lse[((long)b * H + h) * T + r1] = l1 > 0.f ? (m1 + log2f(l1)) * ln2 : NEG_INF;
  }
}

template <int D>
__device__ void flash_bwd(const bf16* __restrict__ q, const bf16* __restrict__ k,
                          const bf16* __restrict__ v, const bf16* __restrict__ dout,
                          const float* __restrict__ lse, const float* __restrict__ delta,
                          const unsigned* __restrict__ qseg, const unsigned* __restrict__ kseg,
                          const int* __restrict__ span, float* __restrict__ dq,
                          float* __restrict__ dk, float* __restrict__ dv, int T, int S, int H,
                          int KV, float scale, int causal, int window) {
  constexpr int BR = 32, BC = 64, LD = D + 8, LDS = BR + 8;
  __shared__ __align__(16) bf16 ks[BC * LD];
  __shared__ __align__(16) bf16 qs[BR * LD];
  __shared__ __align__(16) bf16 dos[BR * LD];
  __shared__ __align__(16) bf16 dst[BC * LDS];
  __shared__ float lses[BR], dls[BR];
  __shared__ unsigned qss[BR];
  const int kb = blockIdx.x, b = blockIdx.y / H, h = blockIdx.y % H, kvh = h / (H / KV);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int off = S - T;
  const int nblk = (S + BC - 1) / BC;
  const int lo = span[2 * (b * nblk + kb)], hi = span[2 * (b * nblk + kb) + 1];
  const int k0 = kb * BC + warp * 16 + g, k1 = k0 + 8;  // this thread's key rows

  for (int idx = threadIdx.x; idx < BC * (D / 2); idx += blockDim.x) {
    const int row = idx / (D / 2), c2 = idx % (D / 2), j = kb * BC + row;
    uint32_t w = 0u;
    if (j < S) w = ld32(k + (((long)b * S + j) * KV + kvh) * D + 2 * c2);
    *reinterpret_cast<uint32_t*>(&ks[row * LD + 2 * c2]) = w;
  }
  __syncthreads();
  uint32_t kf[D / 16][4], vf[D / 16][4];
  {
    const bf16* v0 = v + (((long)b * S + min(k0, S - 1)) * KV + kvh) * D;
    const bf16* v1 = v + (((long)b * S + min(k1, S - 1)) * KV + kvh) * D;
    const bf16* kr0 = &ks[(warp * 16 + g) * LD];
    const bf16* kr1 = kr0 + 8 * LD;
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
      kf[kk][0] = ld32(kr0 + kk * 16 + 2 * t);
      kf[kk][1] = ld32(kr1 + kk * 16 + 2 * t);
      kf[kk][2] = ld32(kr0 + kk * 16 + 8 + 2 * t);
      kf[kk][3] = ld32(kr1 + kk * 16 + 8 + 2 * t);
      vf[kk][0] = ld32(v0 + kk * 16 + 2 * t);
      vf[kk][1] = ld32(v1 + kk * 16 + 2 * t);
      vf[kk][2] = ld32(v0 + kk * 16 + 8 + 2 * t);
      vf[kk][3] = ld32(v1 + kk * 16 + 8 + 2 * t);
    }
  }
  const unsigned ks0 = k0 < S ? kseg[(long)b * S + k0] : 0u;
  const unsigned ks1 = k1 < S ? kseg[(long)b * S + k1] : 0u;
  float dka[D / 8][4], dva[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; n++)
#pragma unroll
    for (int e = 0; e < 4; e++) dka[n][e] = dva[n][e] = 0.f;

  // dQ: warp w owns query rows (w % 2)·16 of the block and half (w / 2) of D.
  const int mq = (warp % 2) * 16, nh = (warp / 2) * (D / 16);
  for (int i0 = lo; i0 < hi; i0 += BR) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < BR * (D / 2); idx += blockDim.x) {
      const int row = idx / (D / 2), c2 = idx % (D / 2), i = i0 + row;
      uint32_t qw = 0u, dw = 0u;
      if (i < T) {
        const long base = (((long)b * T + i) * H + h) * D + 2 * c2;
        qw = ld32(q + base);
        dw = ld32(dout + base);
      }
      *reinterpret_cast<uint32_t*>(&qs[row * LD + 2 * c2]) = qw;
      *reinterpret_cast<uint32_t*>(&dos[row * LD + 2 * c2]) = dw;
    }
    for (int row = threadIdx.x; row < BR; row += blockDim.x) {
      const int i = i0 + row;
      const bool in = i < T;
      qss[row] = in ? qseg[(long)b * T + i] : 0u;
      lses[row] = in ? lse[((long)b * H + h) * T + i] : 0.f;
      dls[row] = in ? delta[((long)b * H + h) * T + i] : 0.f;
    }
    __syncthreads();

    // S^T = K·Q^T (16 keys × 32 queries) → P^T
    float p[BR / 8][4], dp[BR / 8][4];
#pragma unroll
    for (int n = 0; n < BR / 8; n++) {
      p[n][0] = p[n][1] = p[n][2] = p[n][3] = 0.f;
      dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; kk++) {
        const bf16* qp = &qs[(n * 8 + g) * LD + kk * 16 + 2 * t];
        mma16816(p[n], kf[kk], ld32(qp), ld32(qp + 8));
        const bf16* dp_ = &dos[(n * 8 + g) * LD + kk * 16 + 2 * t];
        mma16816(dp[n], vf[kk], ld32(dp_), ld32(dp_ + 8));
      }
    }
#pragma unroll
    for (int n = 0; n < BR / 8; n++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int il = n * 8 + 2 * t + (e & 1), i = i0 + il;
        const int j = e < 2 ? k0 : k1;
        const bool ok = i < T && j < S && allowed(i, j, qss[il], e < 2 ? ks0 : ks1, off, causal, window);
        const float pe = ok ? __expf(p[n][e] * scale - lses[il]) : 0.f;
        p[n][e] = pe;
        dp[n][e] = pe * (dp[n][e] - dls[il]) * scale;  // dS^T
      }
    }
    // dV += P^T·dO, dK += dS^T·Q (k = the block's 32 queries)
#pragma unroll
    for (int kk = 0; kk < BR / 16; kk++) {
      uint32_t ap[4], as[4];
      c_to_a(p, kk, ap);
      c_to_a(dp, kk, as);
      const bf16* d0 = &dos[(kk * 16 + 2 * t) * LD + g];
      const bf16* q0 = &qs[(kk * 16 + 2 * t) * LD + g];
#pragma unroll
      for (int n = 0; n < D / 8; n++) {
        const bf16* dp_ = d0 + n * 8;
        mma16816(dva[n], ap, pack_h(dp_[0], dp_[LD]), pack_h(dp_[8 * LD], dp_[9 * LD]));
        const bf16* qp = q0 + n * 8;
        mma16816(dka[n], as, pack_h(qp[0], qp[LD]), pack_h(qp[8 * LD], qp[9 * LD]));
      }
    }
    // dS^T to shared memory (bf16), then dQ = dS·K over the CTA's 64 keys.
#pragma unroll
    for (int n = 0; n < BR / 8; n++) {
      const int col = n * 8 + 2 * t;
      *reinterpret_cast<uint32_t*>(&dst[(warp * 16 + g) * LDS + col]) = pack_f(dp[n][0], dp[n][1]);
      *reinterpret_cast<uint32_t*>(&dst[(warp * 16 + g + 8) * LDS + col]) = pack_f(dp[n][2], dp[n][3]);
    }
    __syncthreads();
    float dqa[D / 16][4];
#pragma unroll
    for (int n = 0; n < D / 16; n++) dqa[n][0] = dqa[n][1] = dqa[n][2] = dqa[n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < BC / 16; kk++) {
      // A (query, key) = dS^T[key][query]
      const bf16* s0 = &dst[(kk * 16 + 2 * t) * LDS + mq + g];
      uint32_t a[4];
      a[0] = pack_h(s0[0], s0[LDS]);
      a[1] = pack_h(s0[8], s0[LDS + 8]);
      a[2] = pack_h(s0[8 * LDS], s0[9 * LDS]);
      a[3] = pack_h(s0[8 * LDS + 8], s0[9 * LDS + 8]);
      const bf16* kp0 = &ks[(kk * 16 + 2 * t) * LD + g];
#pragma unroll
      for (int n = 0; n < D / 16; n++) {
        const bf16* kp = kp0 + (nh + n) * 8;
        mma16816(dqa[n], a, pack_h(kp[0], kp[LD]), pack_h(kp[8 * LD], kp[9 * LD]));
      }
    }
    const int qa = i0 + mq + g, qb = qa + 8;
#pragma unroll
    for (int n = 0; n < D / 16; n++) {
      const int col = (nh + n) * 8 + 2 * t;
      if (qa < T) {
        float* d = dq + (((long)b * T + qa) * H + h) * D + col;
        atomicAdd(d, dqa[n][0]);
        atomicAdd(d + 1, dqa[n][1]);
      }
      if (qb < T) {
        float* d = dq + (((long)b * T + qb) * H + h) * D + col;
        atomicAdd(d, dqa[n][2]);
        atomicAdd(d + 1, dqa[n][3]);
      }
    }
  }
#pragma unroll
  for (int n = 0; n < D / 8; n++) {
    const int col = n * 8 + 2 * t;
    if (k0 < S) {
      const long r = (((long)b * S + k0) * H + h) * D + col;
      dk[r] = dka[n][0];
      dk[r + 1] = dka[n][1];
      dv[r] = dva[n][0];
      dv[r + 1] = dva[n][1];
    }
    if (k1 < S) {
      const long r = (((long)b * S + k1) * H + h) * D + col;
      dk[r] = dka[n][2];
      dk[r + 1] = dka[n][3];
      dv[r] = dva[n][2];
      dv[r + 1] = dva[n][3];
    }
  }
}

#define ENTRIES(D_)                                                                               \
  extern "C" __global__ void __launch_bounds__(128) flash_mma_fwd_d##D_(                         \
      const bf16* q, const bf16* k, const bf16* v, const unsigned* qseg, const unsigned* kseg,   \
      const int* span, bf16* o, float* lse, int T, int S, int H, int KV, float scale_log2,        \
      int causal, int window) {                                                                   \
    flash_fwd<D_>(q, k, v, qseg, kseg, span, o, lse, T, S, H, KV, scale_log2, causal, window);   \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(128) flash_mma_bwd_d##D_(                         \
      const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,            \
      const float* delta, const unsigned* qseg, const unsigned* kseg, const int* span, float* dq, \
      float* dk, float* dv, int T, int S, int H, int KV, float scale, int causal, int window) {   \
    flash_bwd<D_>(q, k, v, dout, lse, delta, qseg, kseg, span, dq, dk, dv, T, S, H, KV, scale,  \
                  causal, window);                                                                \
  }
ENTRIES(64)
ENTRIES(80)
ENTRIES(128)
