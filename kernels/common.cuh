// common.cuh: helpers shared by every kernel in kernels/*.cu (included, never compiled alone).
// Loads and stores of f32 / bf16 through one float interface (all arithmetic is f32), warp and
// block reductions whose order is fixed by the thread layout (so a kernel gives the same bits
// on every run). Entry points are `extern "C"` wrappers `<kernel>_f32` / `<kernel>_bf16`
// around one template, written out by a small macro in each .cu.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

// The kernel's dynamic shared memory, as bytes or as an array of T (scripts/cuda/emu/cuda_emu.h
// defines its own).
#ifndef DYN_SMEM
#define DYN_SMEM(ALIGN, NAME) extern __shared__ __align__(ALIGN) unsigned char NAME[]
#define DYN_SMEM_OF(T, NAME) extern __shared__ T NAME[]
#endif

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16_rn(x); }

// What storing x as T and reading it back gives (bf16 rounding of an intermediate).
template <typename T> __device__ __forceinline__ float round_as(float x) { return to_f(from_f<T>(x)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024), returned to every thread.
// `sh` is 32 floats of shared memory; the leading barrier lets callers reuse it back to back.
__device__ __forceinline__ float block_sum(float v, float* sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  return warp_sum(lane < nw ? sh[lane] : 0.f);
}

// block_sum in f64; `sh` is 32 doubles of shared memory.
__device__ __forceinline__ double block_sum_d(double v, double* sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum_d(v);
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  return warp_sum_d(lane < nw ? sh[lane] : 0.0);
}

// ---- 16-byte accesses and row-group sums, for the memory-bound kernels ----

// Elements of T in one 16-byte access: 8 bf16, 4 f32.
template <typename T> struct Vec16 {
  static constexpr int n = 16 / (int)sizeof(T);
};

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// N consecutive elements of T held as raw bits and moved as one access: 16 bytes (one LDG.128 /
// STG.128) for Pack<float, 4> and Pack<bf16, 8>, which need 16-byte aligned addresses; one
// scalar for Pack<T, 1>, the fallback for any alignment. Arithmetic stays f32: unpack widens,
// store rounds each value once (the same rounding as from_f).
template <typename T, int N> struct Pack;

template <typename T> struct Pack<T, 1> {
  T v;
  __device__ __forceinline__ void load(const T* p) { v = *p; }
  __device__ __forceinline__ void store_raw(T* p) const { *p = v; }
  __device__ __forceinline__ void unpack(float (&f)[1]) const { f[0] = to_f(v); }
  static __device__ __forceinline__ void store(T* p, const float (&f)[1]) { *p = from_f<T>(f[0]); }
};

template <> struct Pack<float, 4> {
  uint4 v;
  __device__ __forceinline__ void load(const float* p) { v = *reinterpret_cast<const uint4*>(p); }
  __device__ __forceinline__ void store_raw(float* p) const { *reinterpret_cast<uint4*>(p) = v; }
  __device__ __forceinline__ void unpack(float (&f)[4]) const {
    f[0] = __uint_as_float(v.x);
    f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z);
    f[3] = __uint_as_float(v.w);
  }
  static __device__ __forceinline__ void store(float* p, const float (&f)[4]) {
    *reinterpret_cast<uint4*>(p) = make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]),
                                              __float_as_uint(f[2]), __float_as_uint(f[3]));
  }
};

template <> struct Pack<bf16, 8> {
  uint4 v;
  __device__ __forceinline__ void load(const bf16* p) { v = *reinterpret_cast<const uint4*>(p); }
  __device__ __forceinline__ void store_raw(bf16* p) const { *reinterpret_cast<uint4*>(p) = v; }
  // bf16 → f32 is exact: the 16 bits become the high half of the f32 (element 2i is the low
  // half of word i, little-endian).
  __device__ __forceinline__ void unpack(float (&f)[8]) const {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // .x = lo: the low half
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  static __device__ __forceinline__ void store(bf16* p, const float (&f)[8]) {
    *reinterpret_cast<uint4*>(p) = make_uint4(pack2(f[0], f[1]), pack2(f[2], f[3]),
                                              pack2(f[4], f[5]), pack2(f[6], f[7]));
  }
};

// round_as on two values at once (bf16: one packed conversion, the same bits as two).
template <typename T> __device__ __forceinline__ void round_as2(float& a, float& b);
template <> __device__ __forceinline__ void round_as2<float>(float&, float&) {}
template <> __device__ __forceinline__ void round_as2<bf16>(float& a, float& b) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  a = __low2float(h);
  b = __high2float(h);
}

// N consecutive f32 values (tables, partial sums) as N/4 16-byte loads when N is a multiple
// of 4 (p then 16-byte aligned), else N scalar loads.
template <int N> __device__ __forceinline__ void load_f32(const float* p, float (&f)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      const float4 t = reinterpret_cast<const float4*>(p)[i];
      f[4 * i] = t.x;
      f[4 * i + 1] = t.y;
      f[4 * i + 2] = t.z;
      f[4 * i + 3] = t.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) f[i] = p[i];
  }
}

// Two sums over the blockDim.x threads of row group threadIdx.y (a block of blockDim.y groups,
// blockDim.x a multiple of 32, at most 1024 threads in all), returned to each thread of the
// group; the order is fixed by the thread layout. `sh`: 32 float2 of shared memory. One
// barrier per call: callers alternate between two such buffers, since a buffer is written again
// only after every thread has passed the barrier of the call in between (and so has finished
// reading it).
__device__ __forceinline__ float2 group_sum2(float2 v, float2* sh) {
  const int wpg = blockDim.x >> 5;
  v.x = warp_sum(v.x);
  v.y = warp_sum(v.y);
  if ((threadIdx.x & 31) == 0) sh[threadIdx.y * wpg + (threadIdx.x >> 5)] = v;
  __syncthreads();
  const float2* g = sh + threadIdx.y * wpg;
  float2 s = make_float2(0.f, 0.f);
  for (int i = 0; i < wpg; ++i) {
    const float2 t = g[i];
    s.x += t.x;
    s.y += t.y;
  }
  return s;
}
