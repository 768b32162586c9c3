// flash_attn.cu: attention for training, forward and backward, without ever holding the T × S
// score matrix (FlashAttention-2's tiling and online softmax), for
//   q: (B, T, H, D), k/v: (B, S, KV, D) (GQA: head h reads kv head h / (H / KV)), o: (B, T, H, D),
//   lse: (B, H, T) f32 (log-sum-exp of each row's scaled scores, saved for the backward),
//   q_seg: (B, T), k_seg: (B, S) u32 segment ids (packed samples, vision images or windows;
//   0 = padding), queries sit at key positions S − T + t.
// Query t attends key s iff  q_seg ≠ 0,  q_seg = k_seg,  (causal ⇒ s ≤ S − T + t)  and
// (window > 0 ⇒ S − T + t − s < window). A query with no allowed key gets o = 0, lse = −∞.
//
// Kernels (D ≤ 128 and even; f32 arithmetic; inputs f32 or bf16):
//   flash_fwd:      block = 4 warps × 4 rows of one kv head, a row = (query, head of the
//                   group), so the group's heads share each key tile (a decoding step's
//                   rows are its heads); K and V batch rows `kvb` apart (a view of
//                   generation's preallocated cache); 32-key tiles of K and V in shared memory
//                   (f32, K rows padded by one word: lane j reads key j without bank
//                   conflicts); lane j scores key j, the warp does the online softmax, and
//                   each lane accumulates the output dims d ≡ lane (mod 32). With splits > 1
//                   (flash-decoding: few rows, many keys) blockIdx.x also picks a split of
//                   the block's key tiles, and the split's unnormalised o, max and sum go to
//                   `part` for
//   flash_fwd_combine: one block per (b, h, t) merging the splits in order.
//   flash_bwd_dot:  Δ = rowsum(dO · O) per (b, h, t).
//   flash_bwd_dq:   the forward's structure (4 warps × 2 rows): P recomputed from lse,
//                   dS = P · (dO·Vᵀ − Δ), dQ = scale · dS · K.
//   flash_bwd_dkdv: one block per 32 keys of one kv head, each warp owning 8 keys with their
//                   dK, dV accumulators in registers (lanes own dims); 8-row query tiles of
//                   every head of the group stream through shared memory;
//                   dV += Pᵀ · dO, dK += scale · dSᵀ · Q.
// No atomics anywhere: dQ and dK/dV come from separate kernels, so every run gives the same
// bits. Tiles that the causal or window mask empties entirely are skipped. Plain FMA on CUDA
// cores (no tensor cores yet): correctness first; the wgmma version is the measured next step.
#include "common.cuh"

#define KT 32   // keys per tile
#define DMAX 128
#define NDS (DMAX / 32)  // output dims per lane
static_assert(NDS == 4, "flash_fwd: a lane owns one float4 of output dims");

__device__ __forceinline__ bool allowed(int qpos, int s, unsigned qs, unsigned ks, int causal,
                                        int window) {
  return qs != 0u && qs == ks && (!causal || s <= qpos) && (window <= 0 || qpos - s < window);
}

// Key range [lo, hi) that rows with key positions [p0, p1] may attend, from causal/window.
__device__ __forceinline__ void key_range(int p0, int p1, int S, int causal, int window,
                                          int* lo, int* hi) {
  *hi = causal ? min(S, p1 + 1) : S;
  *lo = window > 0 ? max(0, p0 - window + 1) : 0;
}

// Loads rows [s0, s0 + KT) of a (B, S, KV, D) tensor for (b, kvh) as f32 into sh[KT][ld]
// (b = 0 with src at the batch row: batch rows that sit apart).
// Rows of D a multiple of 16 bytes, starting 16-byte aligned (every shipped model: D 64, 80,
// 128) are read 16 bytes at a time (one LDG.128 for 8 bf16 or 4 f32); others element by element.
template <typename T>
__device__ __forceinline__ void load_keys(const T* __restrict__ src, float* sh, int ld, int b,
                                          int kvh, int s0, int S, int KV, int D) {
  constexpr int V = Vec16<T>::n;
  const T* base = src + (((size_t)b * S + s0) * KV + kvh) * D;
  if (D % V == 0 && aligned16(base)) {
    const int C = D / V;  // 16-byte chunks per row
    const size_t row = (size_t)KV * D;
    // NL loads of a thread in flight before the first is used: a 128-thread block covers a
    // bf16 tile at D 128 in 4 passes (one round), an f32 one in 8 (two rounds; eight in
    // flight made flash_bwd_dq_f32 spill).
    constexpr int NL = 4;
    for (int e0 = threadIdx.x; e0 < KT * C; e0 += NL * blockDim.x) {
      Pack<T, V> p[NL];
#pragma unroll
      for (int i = 0; i < NL; ++i) {
        const int e = e0 + i * blockDim.x, j = e / C;
        if (e < KT * C && s0 + j < S) p[i].load(base + j * row + (e - j * C) * V);
      }
#pragma unroll
      for (int i = 0; i < NL; ++i) {
        const int e = e0 + i * blockDim.x, j = e / C, c = e - j * C;
        if (e >= KT * C) break;
        float f[V];
        if (s0 + j < S) {
          p[i].unpack(f);
        } else {
#pragma unroll
          for (int x = 0; x < V; ++x) f[x] = 0.f;
        }
#pragma unroll
        for (int x = 0; x < V; ++x) sh[j * ld + c * V + x] = f[x];
      }
    }
    return;
  }
  for (int e = threadIdx.x; e < KT * D; e += blockDim.x) {
    const int j = e / D, d = e - j * D, s = s0 + j;
    sh[j * ld + d] = s < S ? to_f(src[(((size_t)b * S + s) * KV + kvh) * D + d]) : 0.f;
  }
}

#define FWD_ROWS 4  // query rows per warp
// A block owns 16 rows of one key/value head kvh: row r = t · G + g is query t of head
// kvh · G + g (G = H / KV heads per group), so every head of the group reads each key tile
// once (a decoding step, T = 1, fills G rows of a block instead of 1 of 16). k / v batch rows
// sit `kvb` elements apart (generation's cache is a view of a longer buffer).
template <typename T>
__device__ void flash_fwd(const T* __restrict__ q, const T* __restrict__ k,
                          const T* __restrict__ v, const unsigned* __restrict__ qseg,
                          const unsigned* __restrict__ kseg, T* __restrict__ o,
                          float* __restrict__ lse, int T_, int S, int H, int KV, int D,
                          long long kvb, float scale, int causal, int window, int splits,
                          float* __restrict__ part) {
  // K rows 33 × 16 bytes apart: lane j's 16-byte reads of key j fall in distinct bank groups
  // within each quarter-warp phase of an LDS.128 (the dot below reads 4 dims at a time).
  __shared__ __align__(16) float qs[4 * FWD_ROWS][DMAX];
  __shared__ __align__(16) float ks[KT][DMAX + 4];
  __shared__ __align__(16) float vs[KT][DMAX];
  __shared__ unsigned kseg_s[KT];
  const int b = blockIdx.z, kvh = blockIdx.y, G = H / KV;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int split = blockIdx.x % splits;
  const int r0 = blockIdx.x / splits * 4 * FWD_ROWS, off = S - T_;
  for (int e = threadIdx.x; e < 4 * FWD_ROWS * D; e += blockDim.x) {
    const int r = e / D, d = e - r * D, t = (r0 + r) / G, h = kvh * G + (r0 + r) % G;
    qs[r][d] = t < T_ ? to_f(q[(((size_t)b * T_ + t) * H + h) * D + d]) : 0.f;
  }
  // Lane owns output dims 4·lane … 4·lane + 3 (one LDS.128 of a V row per key; lanes at or
  // past D / 4 accumulate what is never stored).
  float m[FWD_ROWS], l[FWD_ROWS], acc[FWD_ROWS][NDS];
  const int d0 = 4 * lane;
  unsigned qsg[FWD_ROWS];
  const int rw = r0 + warp * FWD_ROWS;  // this warp's first row; row rw + r is query (rw + r) / G
#pragma unroll
  for (int r = 0; r < FWD_ROWS; ++r) {
    const int t = (rw + r) / G;
    m[r] = -INFINITY;
    l[r] = 0.f;
    qsg[r] = t < T_ ? qseg[(size_t)b * T_ + t] : 0u;
#pragma unroll
    for (int c = 0; c < NDS; ++c) acc[r][c] = 0.f;
  }
  int lo, hi;
  key_range(off + r0 / G, off + min((r0 + 4 * FWD_ROWS - 1) / G, T_ - 1), S, causal, window,
            &lo, &hi);
  // This split's whole tiles of the block's key range (all of them when splits = 1).
  const int tile0 = lo / KT, per = ((hi + KT - 1) / KT - tile0 + splits - 1) / splits;
  const int s_end = min(hi, (tile0 + (split + 1) * per) * KT);
  for (int s0 = (tile0 + split * per) * KT; s0 < s_end; s0 += KT) {
    __syncthreads();
    load_keys(k + (size_t)b * kvb, &ks[0][0], DMAX + 4, 0, kvh, s0, S, KV, D);
    load_keys(v + (size_t)b * kvb, &vs[0][0], DMAX, 0, kvh, s0, S, KV, D);
    if (threadIdx.x < KT) kseg_s[threadIdx.x] = s0 + (int)threadIdx.x < S ? kseg[(size_t)b * S + s0 + threadIdx.x] : 0u;
    __syncthreads();
    const int s = s0 + lane;
#pragma unroll
    for (int r = 0; r < FWD_ROWS; ++r) {
      const int t = (rw + r) / G;
      if (t >= T_) continue;  // past the last row (the same for the whole warp)
      const int rr = warp * FWD_ROWS + r, qpos = off + t;
      float sc = -INFINITY;
      if (s < S && allowed(qpos, s, qsg[r], kseg_s[lane], causal, window)) {
        // Four dims per step (two LDS.128), in the order of the scalar sum.
        float dot = 0.f;
        int d = 0;
        for (; d + 4 <= D; d += 4) {
          const float4 qv = *reinterpret_cast<const float4*>(&qs[rr][d]);
          const float4 kv = *reinterpret_cast<const float4*>(&ks[lane][d]);
          dot += qv.x * kv.x;
          dot += qv.y * kv.y;
          dot += qv.z * kv.z;
          dot += qv.w * kv.w;
        }
        for (; d < D; ++d) dot += qs[rr][d] * ks[lane][d];
        sc = dot * scale;
      }
      const float mn = fmaxf(m[r], warp_max(sc));
      const float p = mn == -INFINITY ? 0.f : expf(sc - mn);
      const float alpha = m[r] == -INFINITY ? 0.f : expf(m[r] - mn);
      l[r] = l[r] * alpha + warp_sum(p);
      m[r] = mn;
#pragma unroll
      for (int c = 0; c < NDS; ++c) acc[r][c] *= alpha;
      for (int j = 0; j < KT; ++j) {
        const float pj = __shfl_sync(0xffffffffu, p, j);
        const float4 vv = *reinterpret_cast<const float4*>(&vs[j][d0]);
        acc[r][0] += pj * vv.x;
        acc[r][1] += pj * vv.y;
        acc[r][2] += pj * vv.z;
        acc[r][3] += pj * vv.w;
      }
    }
  }
#pragma unroll
  for (int r = 0; r < FWD_ROWS; ++r) {
    const int t = (rw + r) / G, h = kvh * G + (rw + r) % G;
    if (t >= T_) continue;
    if (splits > 1) {
      // A split's unnormalised output, max and sum, for flash_fwd_combine: record
      // (split, (b, h, t)) of D + 2 floats.
      float* rec = part + ((size_t)split * gridDim.z * H * T_ + ((size_t)b * H + h) * T_ + t) * (D + 2);
#pragma unroll
      for (int c = 0; c < NDS; ++c) {
        const int d = d0 + c;
        if (d < D) rec[d] = acc[r][c];
      }
      if (lane == 0) rec[D] = m[r], rec[D + 1] = l[r];
      continue;
    }
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
#pragma unroll
    for (int c = 0; c < NDS; ++c) {
      const int d = d0 + c;
      if (d < D) o[(((size_t)b * T_ + t) * H + h) * D + d] = from_f<T>(acc[r][c] * inv);
    }
    if (lane == 0) lse[((size_t)b * H + h) * T_ + t] = l[r] > 0.f ? m[r] + logf(l[r]) : -INFINITY;
  }
}

// Merges flash_fwd's splits of the key range: per (b, h, t) (one block of 128 threads, lse's
// order), M = max m_s, L = Σ l_s·e^(m_s − M), o = Σ e^(m_s − M)·acc_s / L, lse = M + log L, the
// splits in order (deterministic). A split that saw no allowed key has m = −∞ and adds nothing.
template <typename T>
__device__ void flash_fwd_combine(const float* __restrict__ part, T* __restrict__ o,
                                  float* __restrict__ lse, int rows, int T_, int H, int D,
                                  int splits) {
  const int row = blockIdx.x, t = row % T_, h = (row / T_) % H, b = row / (T_ * H);
  const size_t rec = (size_t)D + 2;
  float M = -INFINITY;
  for (int s = 0; s < splits; ++s) M = fmaxf(M, part[((size_t)s * rows + row) * rec + D]);
  float L = 0.f;
  for (int s = 0; s < splits; ++s) {
    const float* p = part + ((size_t)s * rows + row) * rec;
    if (p[D] != -INFINITY) L += p[D + 1] * expf(p[D] - M);
  }
  const float inv = L > 0.f ? 1.f / L : 0.f;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float a = 0.f;
    for (int s = 0; s < splits; ++s) {
      const float* p = part + ((size_t)s * rows + row) * rec;
      if (p[D] != -INFINITY) a += expf(p[D] - M) * p[d];
    }
    o[(((size_t)b * T_ + t) * H + h) * D + d] = from_f<T>(a * inv);
  }
  if (threadIdx.x == 0) lse[row] = L > 0.f ? M + logf(L) : -INFINITY;
}

// delta[b, h, t] = Σ_d dO · O; one warp per (b, t, h).
template <typename T>
__device__ void flash_bwd_dot(const T* __restrict__ o, const T* __restrict__ dout,
                              float* __restrict__ delta, int B, int T_, int H, int D) {
  const int lane = threadIdx.x & 31;
  const long rows = (long)B * T_ * H;
  for (long r = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); r < rows;
       r += (long)gridDim.x * (blockDim.x >> 5)) {
    float acc = 0.f;
    for (int d = lane; d < D; d += 32) acc += to_f(o[r * D + d]) * to_f(dout[r * D + d]);
    acc = warp_sum(acc);
    const int h = (int)(r % H), t = (int)((r / H) % T_), b = (int)(r / ((long)H * T_));
    if (lane == 0) delta[((size_t)b * H + h) * T_ + t] = acc;
  }
}

#define DQ_ROWS 2
template <typename T>
__device__ void flash_bwd_dq(const T* __restrict__ q, const T* __restrict__ k,
                             const T* __restrict__ v, const unsigned* __restrict__ qseg,
                             const unsigned* __restrict__ kseg, const T* __restrict__ dout,
                             const float* __restrict__ lse, const float* __restrict__ delta,
                             T* __restrict__ dq, int T_, int S, int H, int KV, int D, float scale,
                             int causal, int window) {
  __shared__ float qs[4 * DQ_ROWS][DMAX];
  __shared__ float gs[4 * DQ_ROWS][DMAX];
  __shared__ float ks[KT][DMAX + 1];
  __shared__ float vs[KT][DMAX + 1];
  __shared__ unsigned kseg_s[KT];
  const int b = blockIdx.z, h = blockIdx.y, kvh = h / (H / KV);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int t0 = blockIdx.x * 4 * DQ_ROWS, off = S - T_;
  for (int e = threadIdx.x; e < 4 * DQ_ROWS * D; e += blockDim.x) {
    const int r = e / D, d = e - r * D, t = t0 + r;
    const size_t i = (((size_t)b * T_ + t) * H + h) * D + d;
    qs[r][d] = t < T_ ? to_f(q[i]) : 0.f;
    gs[r][d] = t < T_ ? to_f(dout[i]) : 0.f;
  }
  float acc[DQ_ROWS][NDS], lr[DQ_ROWS], dr[DQ_ROWS];
  unsigned qsg[DQ_ROWS];
#pragma unroll
  for (int r = 0; r < DQ_ROWS; ++r) {
    const int t = t0 + warp * DQ_ROWS + r;
    const bool in = t < T_;
    qsg[r] = in ? qseg[(size_t)b * T_ + t] : 0u;
    lr[r] = in ? lse[((size_t)b * H + h) * T_ + t] : -INFINITY;
    dr[r] = in ? delta[((size_t)b * H + h) * T_ + t] : 0.f;
#pragma unroll
    for (int c = 0; c < NDS; ++c) acc[r][c] = 0.f;
  }
  int lo, hi;
  key_range(off + t0, off + min(t0 + 4 * DQ_ROWS, T_) - 1, S, causal, window, &lo, &hi);
  for (int s0 = (lo / KT) * KT; s0 < hi; s0 += KT) {
    __syncthreads();
    load_keys(k, &ks[0][0], DMAX + 1, b, kvh, s0, S, KV, D);
    load_keys(v, &vs[0][0], DMAX + 1, b, kvh, s0, S, KV, D);
    if (threadIdx.x < KT) kseg_s[threadIdx.x] = s0 + (int)threadIdx.x < S ? kseg[(size_t)b * S + s0 + threadIdx.x] : 0u;
    __syncthreads();
    const int s = s0 + lane;
#pragma unroll
    for (int r = 0; r < DQ_ROWS; ++r) {
      const int rr = warp * DQ_ROWS + r, qpos = off + t0 + rr;
      float ds = 0.f;
      if (s < S && lr[r] != -INFINITY && allowed(qpos, s, qsg[r], kseg_s[lane], causal, window)) {
        float sc = 0.f, dp = 0.f;
        for (int d = 0; d < D; ++d) {
          sc += qs[rr][d] * ks[lane][d];
          dp += gs[rr][d] * vs[lane][d];
        }
        const float p = expf(sc * scale - lr[r]);
        ds = p * (dp - dr[r]);
      }
      for (int j = 0; j < KT; ++j) {
        const float dj = __shfl_sync(0xffffffffu, ds, j);
#pragma unroll
        for (int c = 0; c < NDS; ++c) {
          const int d = lane + 32 * c;
          if (d < D) acc[r][c] += dj * ks[j][d];
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < DQ_ROWS; ++r) {
    const int t = t0 + warp * DQ_ROWS + r;
    if (t >= T_) continue;
#pragma unroll
    for (int c = 0; c < NDS; ++c) {
      const int d = lane + 32 * c;
      if (d < D) dq[(((size_t)b * T_ + t) * H + h) * D + d] = from_f<T>(acc[r][c] * scale);
    }
  }
}

#define KV_KEYS 8  // keys per warp
#define QT 8       // query rows per shared tile
template <typename T>
__device__ void flash_bwd_dkdv(const T* __restrict__ q, const T* __restrict__ k,
                               const T* __restrict__ v, const unsigned* __restrict__ qseg,
                               const unsigned* __restrict__ kseg, const T* __restrict__ dout,
                               const float* __restrict__ lse, const float* __restrict__ delta,
                               T* __restrict__ dk, T* __restrict__ dv, int T_, int S, int H,
                               int KV, int D, float scale, int causal, int window) {
  __shared__ float ks[KT][DMAX];
  __shared__ float vs[KT][DMAX];
  __shared__ float qs[QT][DMAX];
  __shared__ float gs[QT][DMAX];
  __shared__ float lq[QT], dq_[QT];
  __shared__ unsigned qsg[QT];
  const int b = blockIdx.z, kvh = blockIdx.y, rep = H / KV;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int s0 = blockIdx.x * KT, off = S - T_;
  load_keys(k, &ks[0][0], DMAX, b, kvh, s0, S, KV, D);
  load_keys(v, &vs[0][0], DMAX, b, kvh, s0, S, KV, D);
  unsigned ksg[KV_KEYS];
  float adk[KV_KEYS][NDS], adv[KV_KEYS][NDS];
#pragma unroll
  for (int jj = 0; jj < KV_KEYS; ++jj) {
    const int s = s0 + warp * KV_KEYS + jj;
    ksg[jj] = s < S ? kseg[(size_t)b * S + s] : 0u;
#pragma unroll
    for (int c = 0; c < NDS; ++c) adk[jj][c] = adv[jj][c] = 0.f;
  }
  // Query rows whose key positions can reach keys [s0, s0 + KT): causal ⇒ qpos ≥ s0,
  // window ⇒ qpos < s_last + window.
  const int s_last = min(s0 + KT, S) - 1;
  const int t_lo = causal ? max(0, s0 - off) : 0;
  const int t_hi = window > 0 ? min(T_, s_last + window - off) : T_;
  for (int hr = 0; hr < rep; ++hr) {
    const int h = kvh * rep + hr;
    for (int tq = (t_lo / QT) * QT; tq < t_hi; tq += QT) {
      __syncthreads();
      for (int e = threadIdx.x; e < QT * D; e += blockDim.x) {
        const int r = e / D, d = e - r * D, t = tq + r;
        const size_t i = (((size_t)b * T_ + t) * H + h) * D + d;
        qs[r][d] = t < T_ ? to_f(q[i]) : 0.f;
        gs[r][d] = t < T_ ? to_f(dout[i]) : 0.f;
      }
      if (threadIdx.x < QT) {
        const int t = tq + threadIdx.x;
        const bool in = t < T_;
        lq[threadIdx.x] = in ? lse[((size_t)b * H + h) * T_ + t] : -INFINITY;
        dq_[threadIdx.x] = in ? delta[((size_t)b * H + h) * T_ + t] : 0.f;
        qsg[threadIdx.x] = in ? qseg[(size_t)b * T_ + t] : 0u;
      }
      __syncthreads();
      for (int r = 0; r < QT; ++r) {
        const int qpos = off + tq + r;
        if (lq[r] == -INFINITY) continue;  // padding or beyond T: contributes nothing
        float qv[NDS], gv[NDS];
#pragma unroll
        for (int c = 0; c < NDS; ++c) {
          const int d = lane + 32 * c;
          qv[c] = d < D ? qs[r][d] : 0.f;
          gv[c] = d < D ? gs[r][d] : 0.f;
        }
#pragma unroll
        for (int jj = 0; jj < KV_KEYS; ++jj) {
          const int j = warp * KV_KEYS + jj, s = s0 + j;
          if (s >= S || !allowed(qpos, s, qsg[r], ksg[jj], causal, window)) continue;  // warp-uniform
          float sc = 0.f, dp = 0.f;
#pragma unroll
          for (int c = 0; c < NDS; ++c) {
            const int d = lane + 32 * c;
            if (d < D) {
              sc += qv[c] * ks[j][d];
              dp += gv[c] * vs[j][d];
            }
          }
          sc = warp_sum(sc);
          dp = warp_sum(dp);
          const float p = expf(sc * scale - lq[r]);
          const float ds = p * (dp - dq_[r]);
#pragma unroll
          for (int c = 0; c < NDS; ++c) {
            adv[jj][c] += p * gv[c];
            adk[jj][c] += ds * qv[c];
          }
        }
      }
    }
  }
#pragma unroll
  for (int jj = 0; jj < KV_KEYS; ++jj) {
    const int s = s0 + warp * KV_KEYS + jj;
    if (s >= S) continue;
#pragma unroll
    for (int c = 0; c < NDS; ++c) {
      const int d = lane + 32 * c;
      if (d < D) {
        const size_t i = (((size_t)b * S + s) * KV + kvh) * D + d;
        dk[i] = from_f<T>(adk[jj][c] * scale);
        dv[i] = from_f<T>(adv[jj][c]);
      }
    }
  }
}

#define ENTRIES(T, S_)                                                                          \
  extern "C" __global__ void __launch_bounds__(128) flash_fwd_##S_(                             \
      const T* q, const T* k, const T* v, const unsigned* qseg, const unsigned* kseg, T* o,     \
      float* lse, int T_, int S, int H, int KV, int D, long long kvb, float scale, int causal,   \
      int window, int splits, float* part) {                                                     \
    flash_fwd<T>(q, k, v, qseg, kseg, o, lse, T_, S, H, KV, D, kvb, scale, causal, window,      \
                 splits, part);                                                                  \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(128) flash_fwd_combine_##S_(                     \
      const float* part, T* o, float* lse, int rows, int T_, int H, int D, int splits) {        \
    flash_fwd_combine<T>(part, o, lse, rows, T_, H, D, splits);                                 \
  }                                                                                              \
  extern "C" __global__ void flash_bwd_dot_##S_(const T* o, const T* dout, float* delta, int B, \
                                                int T_, int H, int D) {                         \
    flash_bwd_dot<T>(o, dout, delta, B, T_, H, D);                                              \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(128) flash_bwd_dq_##S_(                          \
      const T* q, const T* k, const T* v, const unsigned* qseg, const unsigned* kseg,           \
      const T* dout, const float* lse, const float* delta, T* dq, int T_, int S, int H, int KV, \
      int D, float scale, int causal, int window) {                                             \
    flash_bwd_dq<T>(q, k, v, qseg, kseg, dout, lse, delta, dq, T_, S, H, KV, D, scale, causal,  \
                    window);                                                                     \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(128) flash_bwd_dkdv_##S_(                        \
      const T* q, const T* k, const T* v, const unsigned* qseg, const unsigned* kseg,           \
      const T* dout, const float* lse, const float* delta, T* dk, T* dv, int T_, int S, int H,  \
      int KV, int D, float scale, int causal, int window) {                                     \
    flash_bwd_dkdv<T>(q, k, v, qseg, kseg, dout, lse, delta, dk, dv, T_, S, H, KV, D, scale,    \
                      causal, window);                                                           \
  }
ENTRIES(float, f32)
ENTRIES(bf16, bf16)
