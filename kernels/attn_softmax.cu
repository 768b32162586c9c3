// attn_softmax.cu: the elementwise middle of the blockwise-GEMM attention
// (crates/omr-kernels/src/gemm_attn.rs), one pass each instead of candle's ~10 forward and
// ~20 backward elementwise kernels over a block's scores.
//
// A block holds query rows [t0, t0 + n) of every (b, h) and the keys [lo, lo + m); the scores
// x (B, H, n, m) come from a cuBLAS GEMM in the input dtype. Query t (key position
// S − T + t) may attend key s iff  q_seg ≠ 0,  q_seg = k_seg,  (causal ⇒ s ≤ S − T + t)  and
// (window > 0 ⇒ S − T + t − s < window), the rule of flash_attn.cu.
//
//   attn_softmax_fwd: one warp per row: p = softmax(scale · x + mask) written in T, and the
//                     row's log-sum-exp (f32; −∞ and p = 0 for a row with no allowed key).
//   attn_softmax_bwd: per element, from x, dP (B, H, n, m) in T and the row's lse and
//                     Δ = rowsum(dO · O): p = exp(scale · x − lse) on allowed keys (else 0),
//                     dS = scale · p · (dP − Δ); writes p and dS in T.
// f32 arithmetic throughout; no atomics; every run gives the same bits.
#include "common.cuh"

__device__ __forceinline__ bool attn_allowed(int qpos, int s, unsigned qs, unsigned ks,
                                             int causal, int window) {
  return qs != 0u && qs == ks && (!causal || s <= qpos) && (window <= 0 || qpos - s < window);
}

// Row r of the block → (b, i): r = (b · H + h) · n + i.
template <typename T>
__device__ void attn_softmax_fwd(const T* __restrict__ x, const unsigned* __restrict__ qseg,
                                 const unsigned* __restrict__ kseg, T* __restrict__ p,
                                 float* __restrict__ lse, int rows, int H, int n, int m, int T_,
                                 int S, int t0, int lo, float scale, int causal, int window) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int i = row % n, b = row / (n * H);
  const int t = t0 + i, qpos = S - T_ + t;
  const unsigned qs = qseg[(size_t)b * T_ + t];
  const T* xr = x + (size_t)row * m;
  T* pr = p + (size_t)row * m;
  const unsigned* kr = kseg + (size_t)b * S + lo;
  float mx = -INFINITY;
  for (int j = lane; j < m; j += 32) {
    if (attn_allowed(qpos, lo + j, qs, kr[j], causal, window)) mx = fmaxf(mx, scale * to_f(xr[j]));
  }
  mx = warp_max(mx);
  if (mx == -INFINITY) {
    for (int j = lane; j < m; j += 32) pr[j] = from_f<T>(0.f);
    if (lane == 0) lse[row] = -INFINITY;
    return;
  }
  float sum = 0.f;
  for (int j = lane; j < m; j += 32) {
    if (attn_allowed(qpos, lo + j, qs, kr[j], causal, window)) sum += __expf(scale * to_f(xr[j]) - mx);
  }
  sum = warp_sum(sum);
  const float inv = 1.f / sum;
  for (int j = lane; j < m; j += 32) {
    const float e = attn_allowed(qpos, lo + j, qs, kr[j], causal, window)
                        ? __expf(scale * to_f(xr[j]) - mx) * inv
                        : 0.f;
    pr[j] = from_f<T>(e);
  }
  if (lane == 0) lse[row] = mx + __logf(sum);
}

template <typename T>
__device__ void attn_softmax_bwd(const T* __restrict__ x, const T* __restrict__ dp,
                                 const float* __restrict__ lse, const float* __restrict__ delta,
                                 const unsigned* __restrict__ qseg,
                                 const unsigned* __restrict__ kseg, T* __restrict__ p_out,
                                 T* __restrict__ ds, long long total, int H, int n, int m, int T_,
                                 int S, int t0, int lo, float scale, int causal, int window) {
  for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
       e += (long long)gridDim.x * blockDim.x) {
    const long long row = e / m;
    const int j = (int)(e - row * m);
    const int i = (int)(row % n), b = (int)(row / ((long long)n * H));
    const int t = t0 + i, qpos = S - T_ + t;
    const float l = lse[row];
    float pv = 0.f;
    if (l != -INFINITY &&
        attn_allowed(qpos, lo + j, qseg[(size_t)b * T_ + t], kseg[(size_t)b * S + lo + j], causal,
                     window)) {
      pv = __expf(scale * to_f(x[e]) - l);
    }
    p_out[e] = from_f<T>(pv);
    ds[e] = from_f<T>(scale * pv * (to_f(dp[e]) - delta[row]));
  }
}

// Δ of the backward: delta[(b·H + h)·T + t] = Σ_d dO[b, t, h, d] · O[b, t, h, d] in f32, from
// dO and O in their (B, T, H, D) layout, one warp per (b, t, h) row, written in the (B, H, T)
// layout the softmax backward reads.
template <typename T>
__device__ void attn_delta(const T* __restrict__ dout, const T* __restrict__ o,
                           float* __restrict__ delta, int rows, int H, int T_, int D) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const long base = (long)row * D;
  float acc = 0.f;
  for (int d = lane; d < D; d += 32) acc += to_f(dout[base + d]) * to_f(o[base + d]);
  acc = warp_sum(acc);
  if (lane == 0) {
    const int h = row % H, t = (row / H) % T_, b = row / (H * T_);
    delta[((long)b * H + h) * T_ + t] = acc;
  }
}

#define ENTRIES(T, S_)                                                                          \
  extern "C" __global__ void attn_delta_##S_(const T* dout, const T* o, float* delta, int rows, \
                                             int H, int T_, int D) {                            \
    attn_delta<T>(dout, o, delta, rows, H, T_, D);                                              \
  }                                                                                              \
  extern "C" __global__ void attn_softmax_fwd_##S_(                                             \
      const T* x, const unsigned* qseg, const unsigned* kseg, T* p, float* lse, int rows, int H, \
      int n, int m, int T_, int S, int t0, int lo, float scale, int causal, int window) {       \
    attn_softmax_fwd<T>(x, qseg, kseg, p, lse, rows, H, n, m, T_, S, t0, lo, scale, causal,     \
                        window);                                                                 \
  }                                                                                              \
  extern "C" __global__ void attn_softmax_bwd_##S_(                                             \
      const T* x, const T* dp, const float* lse, const float* delta, const unsigned* qseg,      \
      const unsigned* kseg, T* p_out, T* ds, long long total, int H, int n, int m, int T_,      \
      int S, int t0, int lo, float scale, int causal, int window) {                             \
    attn_softmax_bwd<T>(x, dp, lse, delta, qseg, kseg, p_out, ds, total, H, n, m, T_, S, t0,    \
                        lo, scale, causal, window);                                              \
  }
ENTRIES(float, f32)
ENTRIES(bf16, bf16)
