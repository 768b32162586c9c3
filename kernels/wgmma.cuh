// wgmma.cuh: Hopper's warpgroup matrix products (wgmma.mma_async, sm_90a) as the attention
// kernels use them (flash_wgmma_sm90a.cu, wgmma_probe_sm90a.cu): the proxy fence, wgmma and its
// fences, the 128-byte-swizzled shared-memory layout, its descriptors and the fragments.
//
// Shared-memory layout (SW128): a tile of R rows × 128 bf16 is two column blocks of R × 64
// (128-byte rows), block c at c·R·64 elements; the 16-byte chunk k of row r sits at chunk
// k ^ (r % 8) of its row. The hardware applies that XOR to address bits [4, 7) from bits
// [7, 10), so every block starts at a multiple of 1024 bytes. Descriptors (PTX ISA
// "Matrix Descriptor Format"): start address, LBO, SBO (each >> 4), swizzle mode 1 (128 B):
//   K-major (Q as A, K as B): SBO = 1024 (8 rows of 128 B), LBO unused (1); k-step kk starts
//     at block kk / 4, byte 32·(kk % 4) of the row;
//   N-major (V as B, K = keys, N = head dim): SBO = 1024 (8 keys), LBO = R·128 bytes (the next
//     64 columns: the other block); k-step kk starts at key 16·kk (2048 bytes on).
#pragma once
#include "attn_common.cuh"

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "wgmma.cuh needs -arch=sm_90a"
#endif

// The inline-PTX helpers (scripts/cuda/emu's with OMR_EMU).
#ifndef OMR_EMU
// What cp.async (the generic proxy) wrote becomes visible to wgmma (the async proxy); each
// writing thread runs it before the barrier that publishes the tile.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// Waits until at most N committed groups of this warpgroup's products are in flight.
template <int N>
__device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void wg_wait0() { wg_wait<0>(); }

// Pins registers the asynchronous products read or write to this point of the program: before
// wg_fence, so that their last writes (zeroing, rescaling, packing) come before the fence;
// after the wait that completes them, so that the compiler neither reads an accumulator early
// nor reuses an operand register while a product may still read it.
template <int N>
__device__ __forceinline__ void pin(float* r) {
#pragma unroll
  for (int i = 0; i < N; i++) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void pin(uint32_t* r) {
#pragma unroll
  for (int i = 0; i < N; i++) asm volatile("" : "+r"(r[i])::"memory");
}

#define ACC64                                                                                   \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "  \
  "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "  \
  "%56, %57, %58, %59, %60, %61, %62, %63}"
#define D8(i)                                                                                 \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define D64 D8(0), D8(8), D8(16), D8(24), D8(32), D8(40), D8(48), D8(56)

// d (64 × 128 f32, accumulated) += A·B: A 64 × 16 and B 16 × 128, both K-major in shared memory.
__device__ __forceinline__ void wgmma_ss(float* d, uint64_t a, uint64_t b) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " ACC64
               ", %64, %65, 1, 1, 1, 0, 0;\n"
               : D64
               : "l"(a), "l"(b));
}

// d (64 × 128 f32, accumulated) += A·B: A 64 × 16 from registers (mma.sync's A fragment for
// each warp's 16 rows), B 16 × 128 N-major in shared memory.
__device__ __forceinline__ void wgmma_rs_tn(float* d, const uint32_t* a, uint64_t b) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " ACC64
               ", {%64, %65, %66, %67}, %68, 1, 1, 1, 1;\n"
               : D64
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

#define ACC32                                                                                   \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define D32 D8(0), D8(8), D8(16), D8(24)

// d (64 × 64 f32, accumulated) += A·B, both from shared memory: K-major (TRANS 0) or A
// M-major and B N-major (TRANS 1).
template <int TRANS>
__device__ __forceinline__ void wgmma_ss64(float* d, uint64_t a, uint64_t b) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " ACC32
               ", %32, %33, 1, 1, 1, %34, %34;\n"
               : D32
               : "l"(a), "l"(b), "n"(TRANS));
}

#endif  // OMR_EMU

// A shared-memory descriptor, 128-byte swizzle; `lbo` and SBO = 1024 in bytes.
__device__ __forceinline__ uint64_t sw128_desc(const bf16* p, unsigned lbo) {
  const unsigned a = smem_addr(p);
  return (uint64_t)((a & 0x3FFFF) >> 4) | ((uint64_t)((lbo & 0x3FFFF) >> 4) << 16) |
         ((uint64_t)(1024 >> 4) << 32) | (1ull << 62);
}

// ROWS rows of 128 bf16 from global row `r0` (row r at src + r·stride) into the SW128 layout
// at dst, by NT threads from `tid`; rows at or past `n` are zeros. Each thread copies the same
// 16-byte chunk of every (NT / 16)-th row, a multiple of the swizzle's 8-row period, so its
// shared-memory address moves by a constant and the loop unrolls to one address add per copy.
template <int ROWS, int NT>
__device__ __forceinline__ void load_sw128(bf16* dst, const bf16* src, long stride, int r0, int n,
                                           int tid) {
  constexpr int RS = NT / 16, K = ROWS / RS;
  static_assert(NT % 128 == 0 && ROWS % RS == 0, "whole passes of 8-row swizzle periods");
  const int c = tid % 16, row0 = tid / 16;
  bf16* d = dst + (c / 8) * ROWS * 64 + row0 * 64 + ((c % 8) ^ (row0 % 8)) * 8;
  const bf16* s = src + (long)(r0 + row0) * stride + c * 8;
  const long step = (long)RS * stride;
  if (r0 + ROWS <= n) {
#pragma unroll
    for (int k = 0; k < K; k++) cp16(d + k * RS * 64, s + k * step, true);
  } else {
#pragma unroll
    for (int k = 0; k < K; k++) {
      const bool ok = r0 + row0 + k * RS < n;
      cp16(d + k * RS * 64, ok ? s + k * step : src + c * 8, ok);
    }
  }
}

// The A fragment of k-step kk from accumulator fragments (n-tiles 2kk, 2kk + 1).
__device__ __forceinline__ void acc_to_a(const float* c, int kk, uint32_t* a) {
  a[0] = pack_f(c[8 * kk + 0], c[8 * kk + 1]);
  a[1] = pack_f(c[8 * kk + 2], c[8 * kk + 3]);
  a[2] = pack_f(c[8 * kk + 4], c[8 * kk + 5]);
  a[3] = pack_f(c[8 * kk + 6], c[8 * kk + 7]);
}


// The dynamic shared memory from its first 1024-byte boundary (the swizzle repeats every 1024
// bytes; the launch adds 1024 bytes of slack).
__device__ __forceinline__ bf16* aligned_smem(unsigned char* raw) {
  return reinterpret_cast<bf16*>(raw + ((1024u - (smem_addr(raw) & 1023u)) & 1023u));
}

