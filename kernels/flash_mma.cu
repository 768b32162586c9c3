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
#include "attn_common.cuh"

// The inline-PTX helpers of this file: mma.sync and ldmatrix (scripts/cuda/emu's with OMR_EMU).
#ifndef OMR_EMU
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8×8 matrices; lanes 8m..8m+7 give the row addresses of matrix m, register m holds it.
__device__ __forceinline__ void ldsm4(uint32_t* r, const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldsm4t(uint32_t* r, const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldsm2t(uint32_t* r, const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p)));
}
#endif  // OMR_EMU

// The A fragment of k-step kk from C fragments c[2kk], c[2kk+1] (rows × 16 columns).
__device__ __forceinline__ void c_to_a(const float (*c)[4], int kk, uint32_t* a) {
  a[0] = pack_f(c[2 * kk][0], c[2 * kk][1]);
  a[1] = pack_f(c[2 * kk][2], c[2 * kk][3]);
  a[2] = pack_f(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = pack_f(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// Adds a warp's dQ fragments, 16 rows from `r0` × N n-tiles of 8 columns from `c0`, into
// dq (f32; element (row, col) at dq[row · rstride + col]) with f32 atomics; rows at or past T
// are left out. DQV = 2: a float2 per row and column pair; DQV = 4: lanes t and t ^ 1 swap
// halves first, so that the even lane adds 4 columns of row r0 + g and the odd lane 4 of row
// r0 + g + 8, one float4 each (half the atomic operations).
template <int DQV, int N>
__device__ __forceinline__ void add_dq(float* dq, long rstride, const float (*acc)[4], int r0,
                                       int c0, int T, int g, int t) {
  const int ra = r0 + g, rc = ra + 8;
  if (DQV == 4) {
    const bool odd = t & 1;
    const int row = odd ? rc : ra;
#pragma unroll
    for (int n = 0; n < N; n++) {
      const float x0 = __shfl_xor_sync(0xffffffffu, odd ? acc[n][0] : acc[n][2], 1);
      const float x1 = __shfl_xor_sync(0xffffffffu, odd ? acc[n][1] : acc[n][3], 1);
      const float4 val = odd ? make_float4(x0, x1, acc[n][2], acc[n][3])
                             : make_float4(acc[n][0], acc[n][1], x0, x1);
      if (row < T)
        atomicAdd(reinterpret_cast<float4*>(dq + row * rstride + c0 + n * 8 + 2 * (t & ~1)), val);
    }
  } else {
#pragma unroll
    for (int n = 0; n < N; n++) {
      const int col = c0 + n * 8 + 2 * t;
      if (ra < T)
        atomicAdd(reinterpret_cast<float2*>(dq + ra * rstride + col), make_float2(acc[n][0], acc[n][1]));
      if (rc < T)
        atomicAdd(reinterpret_cast<float2*>(dq + rc * rstride + col), make_float2(acc[n][2], acc[n][3]));
    }
  }
}

// A fragments (16 rows × D) straight from global memory: rows g and g + 8 of the tile are
// `r0` and `r1`, one 16-column k-step per kk.
template <int D>
__device__ __forceinline__ void load_a_frags(uint32_t (*f)[4], const bf16* r0, const bf16* r1,
                                             int t) {
#pragma unroll
  for (int kk = 0; kk < D / 16; kk++) {
    f[kk][0] = ld32(r0 + kk * 16 + 2 * t);
    f[kk][1] = ld32(r1 + kk * 16 + 2 * t);
    f[kk][2] = ld32(r0 + kk * 16 + 8 + 2 * t);
    f[kk][3] = ld32(r1 + kk * 16 + 8 + 2 * t);
  }
}

// `rows` rows of D bf16 starting at global row `r0` (row r at src + r·stride) into a padded
// shared tile; rows at or past `n` are zeros.
template <int D, int LD>
__device__ __forceinline__ void load_rows(bf16* dst, const bf16* src, long stride, int r0, int n,
                                          int rows) {
  constexpr int C = D / 8;  // 16-byte chunks per row
  for (int idx = threadIdx.x; idx < rows * C; idx += blockDim.x) {
    const int row = idx / C, c = idx % C, r = r0 + row;
    const bool ok = r < n;
    cp16(&dst[row * LD + c * 8], src + (ok ? r : 0) * stride + c * 8, ok);
  }
}

// The backward's query side of one (b, h): each step's Q and dO rows, lse, Δ and segment ids,
// loaded by cp.async into buffer `buf` (BR rows) of their shared tiles; thread r copies row
// r's scalars, so it may read them after its own wait.
template <int D, int LD, int BR>
struct QSide {
  const bf16* q;
  const bf16* dout;
  const float* lse;
  const float* delta;
  const unsigned* qseg;
  bf16* qs;       // [2][BR × LD]
  bf16* dos;      // [2][BR × LD]
  float* lses;    // [2][BR]
  float* dls;     // [2][BR]
  unsigned* qss;  // [2][BR]
  int T;
  long stride;

  __device__ __forceinline__ QSide(const bf16* q_, const bf16* dout_, const float* lse_,
                                   const float* delta_, const unsigned* qseg_, bf16* qs_,
                                   bf16* dos_, float* lses_, float* dls_, unsigned* qss_, int b,
                                   int h, int T_, int H)
      : q(q_ + ((long)b * T_ * H + h) * D),
        dout(dout_ + ((long)b * T_ * H + h) * D),
        lse(lse_ + ((long)b * H + h) * T_),
        delta(delta_ + ((long)b * H + h) * T_),
        qseg(qseg_ + (long)b * T_),
        qs(qs_),
        dos(dos_),
        lses(lses_),
        dls(dls_),
        qss(qss_),
        T(T_),
        stride((long)H * D) {}

  // Rows [i0, i0 + BR) into buffer `buf`.
  __device__ __forceinline__ void load(int i0, int buf) const {
    load_rows<D, LD>(qs + buf * BR * LD, q, stride, i0, T, BR);
    load_rows<D, LD>(dos + buf * BR * LD, dout, stride, i0, T, BR);
    if (threadIdx.x < BR) {
      const int i = i0 + threadIdx.x;
      const bool ok = i < T;
      const int ic = ok ? i : 0;
      cp4(&lses[buf * BR + threadIdx.x], lse + ic, ok);
      cp4(&dls[buf * BR + threadIdx.x], delta + ic, ok);
      cp4(&qss[buf * BR + threadIdx.x], qseg + ic, ok);
    }
  }
};

// dK and dV of one m-tile of keys (rows k0 and k0 + 8 of C fragments; N n-tiles of 8
// columns from c0), f32 per query head: element (key, col) at [((b·S + key)·H + h)·D + col].
// Keys at or past S are left out.
template <int D, int N>
__device__ __forceinline__ void store_dkv(float* dk, float* dv, const float (*dka)[4],
                                          const float (*dva)[4], int k0, int c0, int b, int h,
                                          int S, int H, int t) {
  const int k1 = k0 + 8;
#pragma unroll
  for (int n = 0; n < N; n++) {
    const int col = c0 + n * 8 + 2 * t;
    if (k0 < S) {
      const long r = (((long)b * S + k0) * H + h) * D + col;
      *reinterpret_cast<float2*>(dk + r) = make_float2(dka[n][0], dka[n][1]);
      *reinterpret_cast<float2*>(dv + r) = make_float2(dva[n][0], dva[n][1]);
    }
    if (k1 < S) {
      const long r = (((long)b * S + k1) * H + h) * D + col;
      *reinterpret_cast<float2*>(dk + r) = make_float2(dka[n][2], dka[n][3]);
      *reinterpret_cast<float2*>(dv + r) = make_float2(dva[n][2], dva[n][3]);
    }
  }
}

template <int D, int NW, int MT>
__device__ void flash_fwd(const bf16* __restrict__ q, const bf16* __restrict__ k,
                          const bf16* __restrict__ v, const unsigned* __restrict__ qseg,
                          const unsigned* __restrict__ kseg, const int* __restrict__ span,
                          bf16* __restrict__ o, float* __restrict__ lse, int T, int S, int H,
                          int KV, float scale_log2, int causal, int window) {
  // MT m-tiles of 16 rows per warp: with MT = 1 the Q fragments stay in registers; with
  // MT = 2 Q waits in (dynamic) shared memory and each K / V fragment feeds both m-tiles.
  constexpr int BR = 16 * NW * MT, BC = 64, LD = D + 8;
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
    if (Q_SMEM) load_rows<D, LD>(qsm, q + ((long)b * T * H + h) * D, (long)H * D, qb * BR, T, BR);
    load_rows<D, LD>(ks, kb, kstride, lo, S, BC);
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
    load_rows<D, LD>(vs, vb, kstride, j0, S, BC);
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
        const int r0 = w0 + 16 * mt + g, r1 = r0 + 8;
        float mx0 = NEG_INF, mx1 = NEG_INF;
        if (whole) {
#pragma unroll
          for (int n = 0; n < BC / 8; n++) {
            s[mt][n][0] *= scale_log2;
            s[mt][n][1] *= scale_log2;
            s[mt][n][2] *= scale_log2;
            s[mt][n][3] *= scale_log2;
            mx0 = fmaxf(mx0, fmaxf(s[mt][n][0], s[mt][n][1]));
            mx1 = fmaxf(mx1, fmaxf(s[mt][n][2], s[mt][n][3]));
          }
        } else {
#pragma unroll
          for (int n = 0; n < BC / 8; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
              const int jl = n * 8 + 2 * t + (e & 1), j = j0 + jl;
              const bool top = e < 2;
              const int i = top ? r0 : r1;
              const bool ok = j < S && i < T &&
                              allowed(i, j, top ? qs0[mt] : qs1[mt], kss[jl], off, causal, window);
              const float x = ok ? s[mt][n][e] * scale_log2 : NEG_INF;
              s[mt][n][e] = x;
              if (top) mx0 = fmaxf(mx0, x); else mx1 = fmaxf(mx1, x);
            }
          }
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float mn0 = fmaxf(m0[mt], mx0), mn1 = fmaxf(m1[mt], mx1);
        // Rescale of what was summed so far (1 while nothing was: the sums are 0 then); a row
        // with no allowed key yet subtracts 0 instead of −∞ (its scores are all −∞ → 0).
        const float a0 = mn0 == NEG_INF ? 1.f : exp2f(m0[mt] - mn0);
        const float a1 = mn1 == NEG_INF ? 1.f : exp2f(m1[mt] - mn1);
        const float z0 = mn0 == NEG_INF ? 0.f : mn0, z1 = mn1 == NEG_INF ? 0.f : mn1;
        float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
        for (int n = 0; n < BC / 8; n++) {
          s[mt][n][0] = exp2f(s[mt][n][0] - z0);
          s[mt][n][1] = exp2f(s[mt][n][1] - z0);
          s[mt][n][2] = exp2f(s[mt][n][2] - z1);
          s[mt][n][3] = exp2f(s[mt][n][3] - z1);
          sum0 += s[mt][n][0] + s[mt][n][1];
          sum1 += s[mt][n][2] + s[mt][n][3];
        }
#pragma unroll
        for (int kk = 0; kk < BC / 16; kk++) c_to_a(s[mt], kk, pa[mt][kk]);
        l0[mt] = l0[mt] * a0 + sum0;
        l1[mt] = l1[mt] * a1 + sum1;
        m0[mt] = mn0;
        m1[mt] = mn1;
#pragma unroll
        for (int n = 0; n < D / 8; n++) {
          acc[mt][n][0] *= a0;
          acc[mt][n][1] *= a0;
          acc[mt][n][2] *= a1;
          acc[mt][n][3] *= a1;
        }
      }
    }
    cp_wait<0>();
    // V has landed; every warp is done with this tile's K.
    __syncthreads();
    if (j0 + BC < hi) {
      load_rows<D, LD>(ks, kb, kstride, j0 + BC, S, BC);
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
      if (t == 0) lse[((long)b * H + h) * T + r0] = L0 > 0.f ? (m0[mt] + log2f(L0)) * ln2 : NEG_INF;
    }
    if (r1 < T) {
      uint32_t* o1 = reinterpret_cast<uint32_t*>(o + (((long)b * T + r1) * H + h) * D + 2 * t);
#pragma unroll
      for (int n = 0; n < D / 8; n++) o1[n * 4] = pack_f(acc[mt][n][2] * inv1, acc[mt][n][3] * inv1);
      if (t == 0) lse[((long)b * H + h) * T + r1] = L1 > 0.f ? (m1[mt] + log2f(L1)) * ln2 : NEG_INF;
    }
  }
}

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
  constexpr int BR = BWD_BR, BC = 16 * NW, LD = D + 8, LDS = BR + 8;
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
  const QSide<D, LD, BR> qside(q, dout, lse, delta, qseg, qs, dos, lses, dls, qss, b, h, T, H);

  // The block's keys in one segment and all before S (kblk ≠ 0), or not (every tile masked).
  const unsigned k_first = kseg[(long)b * S + kb * BC];
  const int k_uni = __syncthreads_and(threadIdx.x >= BC ||
                                      (kb * BC + (int)threadIdx.x < S &&
                                       kseg[(long)b * S + kb * BC + threadIdx.x] == k_first));
  const unsigned kblk = k_uni ? k_first : 0u;

  load_rows<D, LD>(ks, k + ((long)b * S * KV + kvh) * D, (long)KV * D, kb * BC, S, BC);
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
#pragma unroll
      for (int n = 0; n < BR / 8; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const int il = n * 8 + 2 * t + (e & 1), i = i0 + il;
          const int j = e < 2 ? k0 : k1;
          const bool ok = whole || (i < T && j < S &&
                                    allowed(i, j, qss[buf * BR + il], e < 2 ? ks0 : ks1, off,
                                            causal, window));
          const float pe = ok ? __expf(p[n][e] * scale - lt[il]) : 0.f;
          p[n][e] = pe;
          dp[n][e] = pe * (dp[n][e] - dlt[il]) * scale;  // dS^T
        }
      }
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
  constexpr int BR = 64, BC = 128, LD = D + 8, LDP = BC + 8;
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
  const QSide<D, LD, BR> qside(q, dout, lse, delta, qseg, qs, dos, lses, dls, qss, b, h, T, H);

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

  load_rows<D, LD>(ks, k + ((long)b * S * KV + kvh) * D, (long)KV * D, j0, S, BC);
  load_rows<D, LD>(vs, v + ((long)b * S * KV + kvh) * D, (long)KV * D, j0, S, BC);
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
      // 2. P and dS.
#pragma unroll
      for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int n = 0; n < 4; n++)
#pragma unroll
          for (int e = 0; e < 4; e++) {
            const int il = qr + mt * 16 + g + (e >= 2 ? 8 : 0), i = i0 + il;
            const int jl = kc + n * 8 + 2 * t + (e & 1), j = j0 + jl;
            const bool ok = whole || (i < T && j < S &&
                                      allowed(i, j, st[il], kss[jl], off, causal, window));
            const float pe = ok ? __expf(sp[mt][n][e] * scale - lt[il]) : 0.f;
            sp[mt][n][e] = pe;
            dp[mt][n][e] = pe * (dp[mt][n][e] - dlt[il]) * scale;
          }
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
