// grad_norm.cu: the global L2 norm of many gradient tensors in two launches, whatever their
// number (torch's clip_grad_norm_ / the foreach norm):
//   1. sumsq_chunks: one block per chunk of CHUNK elements of one tensor; the tensors are
//      given as a device table of addresses and sizes plus the prefix sums of their chunk
//      counts (a block finds its tensor by binary search); each block writes Σx² of its chunk
//      to part[block], squares and sums in f64 (as omr-train's optimizer does on the host).
//   2. sumsq_finish: one block sums the partials in a fixed order and writes sqrt(Σ) (f64).
// Deterministic (fixed chunking and reduction order, no atomics); equal to the CPU reference
// up to the order of f64 additions (relative 1e-15).
#include "common.cuh"

template <typename T>
__device__ void sumsq_chunks(const unsigned long long* __restrict__ ptrs,
                             const long* __restrict__ sizes, const int* __restrict__ chunk_start,
                             int n_tensors, long chunk, double* __restrict__ part) {
  __shared__ double sh[32];
  const int b = blockIdx.x;
  int lo = 0, hi = n_tensors - 1;
  while (lo < hi) {  // the last tensor whose first chunk is at or before b
    const int mid = (lo + hi + 1) / 2;
    if (chunk_start[mid] <= b) lo = mid; else hi = mid - 1;
  }
  const T* x = reinterpret_cast<const T*>(ptrs[lo]);
  const long start = (long)(b - chunk_start[lo]) * chunk;
  const long end = min(start + chunk, sizes[lo]);
  double acc = 0.0;
  // 16-byte loads where the chunk starts 16-byte aligned (a fresh buffer's chunks do: CHUNK
  // is a multiple of 8 elements), the tail and any unaligned chunk element by element.
  constexpr int V = 16 / sizeof(T);
  long i = start;
  if ((reinterpret_cast<unsigned long long>(x + start) & 15) == 0) {
    const long vend = start + (end - start) / V * V;
    for (long j = start + (long)threadIdx.x * V; j < vend; j += (long)blockDim.x * V) {
      const uint4 w = *reinterpret_cast<const uint4*>(x + j);
      const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
      for (int k = 0; k < V; k++) {
        const double v = (double)to_f(e[k]);
        acc += v * v;
      }
    }
    i = vend;
  }
  for (i += threadIdx.x; i < end; i += blockDim.x) {
    const double v = (double)to_f(x[i]);
    acc += v * v;
  }
  acc = block_sum_d(acc, sh);
  if (threadIdx.x == 0) part[b] = acc;
}

extern "C" __global__ void sumsq_chunks_f32(const unsigned long long* ptrs, const long* sizes,
                                            const int* chunk_start, int n_tensors, long chunk,
                                            double* part) {
  sumsq_chunks<float>(ptrs, sizes, chunk_start, n_tensors, chunk, part);
}

extern "C" __global__ void sumsq_chunks_bf16(const unsigned long long* ptrs, const long* sizes,
                                             const int* chunk_start, int n_tensors, long chunk,
                                             double* part) {
  sumsq_chunks<bf16>(ptrs, sizes, chunk_start, n_tensors, chunk, part);
}

// One block; out[0] = sqrt(Σ part).
extern "C" __global__ void sumsq_finish(const double* __restrict__ part, int n,
                                        double* __restrict__ out) {
  __shared__ double sh[32];
  double acc = 0.0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) acc += part[i];
  acc = block_sum_d(acc, sh);
  if (threadIdx.x == 0) out[0] = sqrt(acc);
}
