// wgmma_probe_sm90a.cu: `wgmma_probe`, each way flash_wgmma_sm90a.cu uses wgmma (wgmma.cuh's
// layouts, descriptors and fragments) alone on a GEMM, so that a layout fault shows in
// `omr bench kernels` apart from the attention (flash_mma.rs's wgmma_probe; sm_90a only).
#include "wgmma.cuh"

// The layout probe, one warpgroup (128 threads), WG_PROBE_SMEM bytes of dynamic shared memory:
// a (64 × 128) and bk (128 × 128) bf16, row major, in the SW128 layout; each output (f32, row
// major, written from the accumulator fragments) is one way the attention kernels use wgmma:
//   s   = a·bk^T             (64 × 128) the forward's S = Q·K^T: both K-major;
//   o   = a·bk               (64 × 128) the forward's O += P·V: A from registers, bk N-major;
//   s64 = bk[64:]·a^T        (64 × 64)  the backward's S^T = K·Q^T: A 64 rows into a tile;
//   o64 = bk[:64, :64]·a     (64 × 128) the backward's dV += P^T·dO: B a 64-row tile N-major;
//   q64 = bk[:, :64]^T·bk[:, 64:] (64 × 64) the backward's dQ = dS·K: A M-major, B N-major.
#define WG_PROBE_SMEM (1024 + 2 * (64 * 128 + 128 * 128))

// A warpgroup's 64 × N f32 accumulator fragments to out, row major.
template <int N>
__device__ __forceinline__ void store_acc(float* out, const float* acc, int wl, int g, int t) {
  const int r = 16 * wl + g;
#pragma unroll
  for (int n = 0; n < N / 8; n++) {
    const int c = 8 * n + 2 * t;
    *reinterpret_cast<float2*>(out + r * N + c) = make_float2(acc[4 * n], acc[4 * n + 1]);
    *reinterpret_cast<float2*>(out + (r + 8) * N + c) = make_float2(acc[4 * n + 2], acc[4 * n + 3]);
  }
}

// The A fragments of KSTEPS k-steps of rows 16·wl + g and + 8 of a row-major bf16 matrix.
template <int KSTEPS>
__device__ __forceinline__ void a_frags(uint32_t (*f)[4], const bf16* m, int ld, int wl, int g,
                                        int t) {
  const bf16* ra = m + (16 * wl + g) * ld;
  const bf16* rb = ra + 8 * ld;
#pragma unroll
  for (int kk = 0; kk < KSTEPS; kk++) {
    f[kk][0] = ld32(ra + kk * 16 + 2 * t);
    f[kk][1] = ld32(rb + kk * 16 + 2 * t);
    f[kk][2] = ld32(ra + kk * 16 + 8 + 2 * t);
    f[kk][3] = ld32(rb + kk * 16 + 8 + 2 * t);
  }
}

extern "C" __global__ void __launch_bounds__(128)
    wgmma_probe(const bf16* __restrict__ a, const bf16* __restrict__ bk, float* __restrict__ s_out,
                float* __restrict__ o_out, float* __restrict__ s64_out,
                float* __restrict__ o64_out, float* __restrict__ q64_out) {
  DYN_SMEM(1024, wg_raw);
  bf16* as = aligned_smem(wg_raw);  // 64 × 128
  bf16* bs = as + 64 * 128;         // 128 × 128
  const int tid = threadIdx.x, wl = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  load_sw128<64, 128>(as, a, 128, 0, 64, tid);
  load_sw128<128, 128>(bs, bk, 128, 0, 128, tid);
  cp_commit();
  cp_wait<0>();
  fence_proxy_async();
  __syncthreads();
  {
    float s[64], acc[64];
#pragma unroll
    for (int i = 0; i < 64; i++) s[i] = acc[i] = 0.f;
    uint32_t pa[8][4];
    a_frags<8>(pa, a, 128, wl, g, t);
    pin<64>(s);
    pin<64>(acc);
    pin<32>(&pa[0][0]);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < 8; kk++)
      wgmma_ss(s, sw128_desc(as + (kk / 4) * 64 * 64 + (kk % 4) * 16, 16),
               sw128_desc(bs + (kk / 4) * 128 * 64 + (kk % 4) * 16, 16));
#pragma unroll
    for (int kk = 0; kk < 8; kk++)
      wgmma_rs_tn(acc, pa[kk], sw128_desc(bs + kk * 16 * 64, 128 * 128));
    wg_commit();
    wg_wait0();
    pin<64>(s);
    pin<64>(acc);
    pin<32>(&pa[0][0]);
    store_acc<128>(s_out, s, wl, g, t);
    store_acc<128>(o_out, acc, wl, g, t);
  }
  {
    float s64[32], q64[32], o64[64];
#pragma unroll
    for (int i = 0; i < 32; i++) s64[i] = q64[i] = 0.f;
#pragma unroll
    for (int i = 0; i < 64; i++) o64[i] = 0.f;
    uint32_t pb[4][4];
    a_frags<4>(pb, bk, 128, wl, g, t);
    pin<32>(s64);
    pin<32>(q64);
    pin<64>(o64);
    pin<16>(&pb[0][0]);
    wg_fence();
    const bf16* b_hi = bs + 64 * 64;  // rows 64.. of bk, in each column block
#pragma unroll
    for (int kk = 0; kk < 8; kk++)
      wgmma_ss64<0>(s64, sw128_desc(b_hi + (kk / 4) * 128 * 64 + (kk % 4) * 16, 16),
                    sw128_desc(as + (kk / 4) * 64 * 64 + (kk % 4) * 16, 16));
#pragma unroll
    for (int kk = 0; kk < 4; kk++)
      wgmma_rs_tn(o64, pb[kk], sw128_desc(as + kk * 16 * 64, 64 * 128));
#pragma unroll
    for (int kk = 0; kk < 8; kk++)
      wgmma_ss64<1>(q64, sw128_desc(bs + kk * 16 * 64, 128 * 128),
                    sw128_desc(bs + 128 * 64 + kk * 16 * 64, 128 * 128));
    wg_commit();
    wg_wait0();
    pin<32>(s64);
    pin<32>(q64);
    pin<64>(o64);
    pin<16>(&pb[0][0]);
    store_acc<64>(s64_out, s64, wl, g, t);
    store_acc<128>(o64_out, o64, wl, g, t);
    store_acc<64>(q64_out, q64, wl, g, t);
  }
}
