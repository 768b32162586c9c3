// cuda_emu.h: runs the attention kernels (kernels/flash_mma.cu, kernels/*_sm90a.cu), the
// tile and sampling kernels and the memory-bound ones (norms, SwiGLU, rotary, optimizer,
// reductions) on the CPU. A kernel file includes this header instead of its inline-PTX helpers when
// OMR_EMU names it (flash_*_emu.cpp), so the kernels' own C++ (indexing, masks, softmax,
// pipelining, fragments, descriptors) runs unchanged, each CUDA thread a fiber (ucontext) of
// the calling thread, one CTA at a time, each fiber running until it waits at a barrier (a
// missing barrier then reads what the other threads have not written yet: poisoned shared
// memory, stale values); `__shared__` arrays are statics (one per kernel instantiation), the dynamic shared
// memory one aligned buffer. The helpers follow the PTX ISA:
//   - mma.sync.m16n8k16 (f32 += bf16·bf16) and ldmatrix (.x4, .x2, .trans): each lane's
//     fragments gathered from its warp's lanes by the ISA's fragment layouts;
//   - wgmma.mma_async (m64nNk16): each thread computes its own accumulator fragment (warp w of
//     the warpgroup: rows 16w + g and + 8, columns 8j + 2t and + 1) from the operands read
//     through the descriptors by the ISA's canonical layouts ("Shared Memory Matrix Layout";
//     K-major ((8,m),(T,2k)):((8T,SBO),(1,T)), MN-major ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)),
//     Swizzle<3,4,3> on the byte address); A from registers is mma.sync's A fragment;
//   - cp.async completes at once (copies or zero-fills); its fences and waits are no-ops, and a
//     missing one is not caught here (a race between threads may be);
//   - wgmma is asynchronous as on the GPU: issued products join the open group, wg_commit
//     closes it and wg_wait<N> completes all but the newest N committed groups. The product is
//     computed at issue and again at completion, which must agree (an operand in shared memory
//     or in A registers changed while in flight fails), and until its group completes the
//     accumulator reads as NaN and must not be written (a read before the wait shows, a write
//     fails);
//   - dynamic shared memory starts poisoned (0xFF: bf16 NaN), so a read of a byte nothing
//     wrote shows.
// What the emulation cannot show: that the hardware matches the ISA text. On a GPU,
// `omr bench kernels` checks the kernels (and `wgmma_probe` the wgmma layouts alone).
#pragma once
#include <cuda_bf16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>
#include <memory>
#include <mutex>
#include <ucontext.h>
#include <vector>

typedef __nv_bfloat16 bf16;
// cuda_bf16.h's host_defines.h gives these CUDA meanings: plain C++ here.
#undef __global__
#undef __device__
#undef __forceinline__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
// The kernels' dynamic shared memory (`extern __shared__` on the GPU).
#define DYN_SMEM(ALIGN, NAME) unsigned char* const NAME = emu::dyn
#define DYN_SMEM_OF(T, NAME) T* const NAME = reinterpret_cast<T*>(emu::dyn)

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline thread_local Dim3 threadIdx, blockIdx;
inline Dim3 gridDim, blockDim;

using std::max;
using std::min;

inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline float __expf(float x) { return std::exp(x); }
// ex2.approx.ftz.f32 (attn_common.cuh's ex2): subnormal input read as 0, subnormal result
// flushed to 0 (the SFU's approximation itself is not modelled: exp2 correctly rounded).
inline float ex2(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.f;
  const float r = std::exp2(x);
  return std::fpclassify(r) == FP_SUBNORMAL ? 0.f : r;
}
// Host floats: IEEE, round to nearest, no contraction (x86-64 without -mfma): each of these is
// its correctly rounded operation, as the intrinsic is on the GPU. (The GPU may contract a
// plain a·b + c into an FMA; the emulation does not, so kernels compare with their references
// within a tolerance except where they use these intrinsics throughout.)
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
// glibc declares a __logf of its own (noexcept): a macro, not a second declaration.
#define __logf(x) std::log((float)(x))
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}

constexpr size_t EMU_SMEM_MAX = 232448;

namespace emu {
// The dynamic shared memory of the CTA that runs.
alignas(1024) inline unsigned char dyn[EMU_SMEM_MAX];

[[noreturn]] inline void fail(const char* what, long a, long b) {
  std::fprintf(stderr, "emu: %s (%ld, %ld)\n", what, a, b);
  std::abort();
}

inline size_t smem_bytes = 0;

// The CTA's threads are fibers on the calling OS thread (ucontext), run round-robin: each
// runs until it waits at a barrier or returns. A barrier is a counter and a phase; a thread
// that arrives before the last one yields until the phase moves. Every arrival and every
// return counts as progress: a whole round without any is a deadlock (a barrier some
// threads never reach), which fails instead of hanging.
inline unsigned long long progress = 0;
void yield();

struct Barrier {
  explicit Barrier(unsigned n_) : n(n_) {}
  unsigned n, arrived = 0;
  unsigned long long phase = 0;
  void arrive_and_wait() {
    progress++;
    if (++arrived == n) {
      arrived = 0;
      phase++;
      return;
    }
    const unsigned long long p = phase;
    while (phase == p) yield();
  }
};

// A warp's exchange slots, two sets used alternately by its collective calls (shuffles, mma,
// ldmatrix): a lane writes set n % 2 for call n before the call's barrier and reads it after;
// it writes that set again (call n + 2) only after the barrier of call n + 1, which every lane
// reaches after its reads of call n. One barrier per call.
struct Slots {
  float f[32];
  double d[32];
  uint32_t a[32][4];
  uint32_t b[32][2];
  const unsigned char* row[32];
};
struct Warp {
  Barrier bar{32};
  Slots set[2];
};
inline thread_local unsigned warp_calls = 0;
// This lane's slot set for its next warp-collective call.
inline Slots& slots(Warp& w) { return w.set[warp_calls++ & 1]; }

struct Cta {
  explicit Cta(unsigned threads) : bar(threads), warps(threads / 32) {}
  Barrier bar;
  std::atomic<int> all[2] = {1, 1};
  std::vector<Warp> warps;
};
inline Cta* cta = nullptr;
inline thread_local int and_calls = 0;
inline std::mutex atomics;

inline void check_smem(unsigned addr, unsigned bytes) {
  if (addr + bytes > smem_bytes) fail("shared-memory access past the launch's bytes", addr, smem_bytes);
}

inline float smem_bf16(unsigned addr) {
  check_smem(addr, 2);
  __nv_bfloat16_raw raw;
  std::memcpy(&raw.x, dyn + addr, 2);
  return __bfloat162float(bf16(raw));
}

struct Desc {
  unsigned start, lbo, sbo;
};

inline Desc decode(uint64_t d) {
  if ((d >> 62) != 1) fail("descriptor: swizzle mode is not 128 B", (long)(d >> 62), 1);
  if (((d >> 49) & 7) != 0) fail("descriptor: base offset is not 0", (long)((d >> 49) & 7), 0);
  return {(unsigned)(d & 0x3FFF) << 4, (unsigned)((d >> 16) & 0x3FFF) << 4,
          (unsigned)((d >> 32) & 0x3FFF) << 4};
}

inline unsigned swizzle(unsigned a) { return a ^ (((a >> 7) & 7u) << 4); }

// Byte address of element (r, k) of a K-major operand (r the M or N index, k < 16).
inline unsigned kmajor(const Desc& d, int r, int k) {
  return swizzle(d.start + 2 * ((r % 8) * 64 + (k % 8) + 8 * (k / 8)) + (r / 8) * d.sbo);
}

// Byte address of element (n, k) of an MN-major operand.
inline unsigned mnmajor(const Desc& d, int n, int k) {
  return swizzle(d.start + 2 * ((n % 8) + 8 * ((n / 8) % 8) + 64 * (k % 8)) + (n / 64) * d.lbo +
                 (k / 8) * d.sbo);
}

// d (this thread's fragment of 64 × N) += A·B with A(row, k) given and B from a descriptor.
template <int N, class A>
void mma(float* d, A a, uint64_t bdesc, bool b_mn) {
  const Desc b = decode(bdesc);
  const int w = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  for (int j = 0; j < N / 8; j++)
    for (int e = 0; e < 4; e++) {
      const int row = 16 * w + g + (e >= 2 ? 8 : 0), col = 8 * j + 2 * t + (e & 1);
      float acc = d[4 * j + e];
      for (int k = 0; k < 16; k++)
        acc += a(row, k) * smem_bf16(b_mn ? mnmajor(b, col, k) : kmajor(b, col, k));
      d[4 * j + e] = acc;
    }
}

template <int N>
void mma_ss(float* d, uint64_t adesc, uint64_t bdesc, bool a_mn, bool b_mn) {
  const Desc a = decode(adesc);
  mma<N>(d, [&](int row, int k) { return smem_bf16(a_mn ? mnmajor(a, row, k) : kmajor(a, row, k)); },
         bdesc, b_mn);
}

// A from registers: each lane's four registers are mma.sync's A fragment of its warp's 16 rows.
template <int N>
void mma_rs(float* d, const uint32_t* ar, uint64_t bdesc, bool b_mn) {
  Warp& wp = cta->warps[threadIdx.x / 32];
  Slots& sl = slots(wp);
  const int lane = threadIdx.x % 32;
  for (int i = 0; i < 4; i++) sl.a[lane][i] = ar[i];
  wp.bar.arrive_and_wait();
  const int w = (threadIdx.x / 32) % 4;
  mma<N>(d,
         [&](int row, int k) {
           const int rl = row - 16 * w, gg = rl % 8, tt = (k % 8) / 2;
           const int reg = (rl >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
           const uint32_t r = sl.a[4 * gg + tt][reg];
           __nv_bfloat16_raw raw;
           raw.x = (k % 2) ? (unsigned short)(r >> 16) : (unsigned short)(r & 0xFFFF);
           return __bfloat162float(bf16(raw));
         },
         bdesc, b_mn);
}
}  // namespace emu

inline void __syncthreads() { emu::cta->bar.arrive_and_wait(); }

inline int __syncthreads_and(int pred) {
  // Two alternating flags: a flag is reset by thread 0 one call after it was read, before
  // thread 0 reaches the barrier of the next call, and written again a call later.
  emu::Cta& c = *emu::cta;
  const int slot = emu::and_calls++ & 1;
  if (!pred) c.all[slot].store(0);
  c.bar.arrive_and_wait();
  const int r = c.all[slot].load();
  c.bar.arrive_and_wait();
  if (threadIdx.x == 0) c.all[slot].store(1);
  return r;
}

namespace emu {
// The thread's index in its block, x fastest: warps are consecutive runs of 32 of it, whatever
// the block's shape.
inline unsigned tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
}  // namespace emu

namespace emu {
// A warp collective's exchange: this lane's value into its warp's next slot set (f for float,
// d for double), then the warp's barrier; the 32 lanes' values.
template <class V>
inline const V* exchange(V v) {
  Warp& w = cta->warps[tid() / 32];
  Slots& sl = slots(w);
  V* vals;
  if constexpr (std::is_same_v<V, double>)
    vals = sl.d;
  else
    vals = sl.f;
  vals[tid() % 32] = v;
  w.bar.arrive_and_wait();
  return vals;
}
}  // namespace emu

inline float __shfl_xor_sync(unsigned, float v, int m) {
  return emu::exchange(v)[(emu::tid() % 32) ^ m];
}

inline double __shfl_xor_sync(unsigned, double v, int m) {
  return emu::exchange(v)[(emu::tid() % 32) ^ m];
}

inline int __all_sync(unsigned, int pred) {
  const float* all = emu::exchange(pred ? 1.f : 0.f);
  for (int i = 0; i < 32; i++)
    if (all[i] == 0.f) return 0;
  return 1;
}

inline float __shfl_sync(unsigned, float v, int src) { return emu::exchange(v)[src & 31]; }

inline float4 atomicAdd(float4* p, float4 v) {
  std::lock_guard<std::mutex> l(emu::atomics);
  const float4 old = *p;
  p->x += v.x;
  p->y += v.y;
  p->z += v.z;
  p->w += v.w;
  return old;
}

inline float2 atomicAdd(float2* p, float2 v) {
  std::lock_guard<std::mutex> l(emu::atomics);
  const float2 old = *p;
  p->x += v.x;
  p->y += v.y;
  return old;
}

// ---- the kernel file's inline-PTX helpers ----

inline unsigned smem_addr(const void* p) {
  const long off = (const unsigned char*)p - emu::dyn;
  if (off < 0 || off >= (long)EMU_SMEM_MAX) emu::fail("smem_addr of a pointer outside dynamic shared memory", off, 0);
  return (unsigned)off;
}

namespace emu {
// Bounds of a copy into dynamic shared memory (static `__shared__` arrays are not checked).
inline void check_dst(const void* dst, unsigned bytes) {
  const long off = (const unsigned char*)dst - dyn;
  if (off >= 0 && off < (long)EMU_SMEM_MAX) {
    check_smem((unsigned)off, bytes);
    if (off % bytes) fail("cp.async: destination not aligned to its size", off, bytes);
  }
}
}  // namespace emu

namespace emu {
// cp.async of N bytes, done at once; `valid` false writes zeros.
template <unsigned N>
void cp_async(void* dst, const void* src, bool valid) {
  check_dst(dst, N);
  if (valid)
    std::memcpy(dst, src, N);
  else
    std::memset(dst, 0, N);
}
}  // namespace emu

inline void cp16(void* dst, const void* src, bool valid) { emu::cp_async<16>(dst, src, valid); }
inline void cp4(void* dst, const void* src, bool valid) { emu::cp_async<4>(dst, src, valid); }

inline void cp_commit() {}
template <int N>
inline void cp_wait() {}
inline void fence_proxy_async() {}
inline void wg_fence() {}
template <int N>
inline void pin(float*) {}
template <int N>
inline void pin(uint32_t*) {}

namespace emu {
// One issued wgmma: its shape, operands and layouts.
struct Op {
  int n;          // N of m64nNk16
  bool rs;        // A from registers (`ar`), else from shared memory (`adesc`)
  bool a_mn, b_mn;
  uint64_t adesc, bdesc;
  const uint32_t* ar;
};
// An accumulator the products of one group write: its value before them (`orig`), after them
// with the operands as they were at issue (`shadow`), and the products.
struct Acc {
  float* d;
  int len;
  std::vector<float> orig, shadow;
  std::vector<Op> ops;
};
struct Group {
  std::vector<Acc> accs;
};
inline thread_local std::vector<Group> committed;  // oldest first
inline thread_local Group open_group;
constexpr uint32_t ACC_POISON = 0x7fc0deadu;  // a NaN

inline void run_op(float* d, const Op& op) {
  if (op.rs)
    mma_rs<128>(d, op.ar, op.bdesc, op.b_mn);
  else if (op.n == 128)
    mma_ss<128>(d, op.adesc, op.bdesc, op.a_mn, op.b_mn);
  else
    mma_ss<64>(d, op.adesc, op.bdesc, op.a_mn, op.b_mn);
}

inline void issue(float* d, const Op& op) {
  const int len = op.n / 2;
  for (const Group& g : committed)
    for (const Acc& a : g.accs)
      if (a.d == d) fail("wgmma: a product into an accumulator whose earlier group is in flight", len, 0);
  Acc* acc = nullptr;
  for (Acc& a : open_group.accs)
    if (a.d == d) acc = &a;
  if (!acc) {
    open_group.accs.push_back({d, len, std::vector<float>(d, d + len), std::vector<float>(d, d + len), {}});
    acc = &open_group.accs.back();
  }
  run_op(acc->shadow.data(), op);
  acc->ops.push_back(op);
  for (int i = 0; i < len; i++) std::memcpy(&d[i], &ACC_POISON, 4);
}

inline void complete(Group& g) {
  for (Acc& a : g.accs) {
    for (int i = 0; i < a.len; i++) {
      uint32_t x;
      std::memcpy(&x, &a.d[i], 4);
      if (x != ACC_POISON) fail("wgmma: an accumulator was written while its product was in flight", i, 0);
    }
    std::vector<float> again = a.orig;
    for (const Op& op : a.ops) run_op(again.data(), op);
    if (std::memcmp(again.data(), a.shadow.data(), 4 * a.len) != 0)
      fail("wgmma: an operand (shared memory or A registers) changed while its product was in flight", 0, 0);
    std::memcpy(a.d, a.shadow.data(), 4 * a.len);
  }
}
}  // namespace emu

inline void wg_commit() {
  emu::committed.push_back(std::move(emu::open_group));
  emu::open_group = {};
}
template <int N>
inline void wg_wait() {
  while (emu::committed.size() > (size_t)N) {
    emu::complete(emu::committed.front());
    emu::committed.erase(emu::committed.begin());
  }
}
inline void wg_wait0() { wg_wait<0>(); }

inline void wgmma_ss(float* d, uint64_t a, uint64_t b) {
  emu::issue(d, {128, false, false, false, a, b, nullptr});
}
inline void wgmma_rs_tn(float* d, const uint32_t* a, uint64_t b) {
  emu::issue(d, {128, true, false, true, 0, b, a});
}
template <int TRANS>
inline void wgmma_ss64(float* d, uint64_t a, uint64_t b) {
  emu::issue(d, {64, false, TRANS == 1, TRANS == 1, a, b, nullptr});
}

namespace emu {
inline float bf16_half(uint32_t r, int hi) {
  __nv_bfloat16_raw raw;
  raw.x = hi ? (unsigned short)(r >> 16) : (unsigned short)(r & 0xFFFF);
  return __bfloat162float(bf16(raw));
}
}  // namespace emu

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (lane = 4g + t): A regs {(g, 2t..2t+1),
// (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)}; B regs {(k 2t..2t+1, n g), (k 2t+8..2t+9, n g)};
// C {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}.
inline void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  emu::Warp& w = emu::cta->warps[threadIdx.x / 32];
  emu::Slots& sl = emu::slots(w);
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; i++) sl.a[lane][i] = a[i];
  sl.b[lane][0] = b0;
  sl.b[lane][1] = b1;
  w.bar.arrive_and_wait();
  for (int e = 0; e < 4; e++) {
    const int r = g + (e >= 2 ? 8 : 0), n = 2 * t + (e & 1);
    float acc = c[e];
    for (int k = 0; k < 16; k++) {
      const float av = emu::bf16_half(sl.a[(r % 8) * 4 + (k % 8) / 2][(r >= 8) + 2 * (k >= 8)], k % 2);
      const float bv = emu::bf16_half(sl.b[n * 4 + (k % 8) / 2][k >= 8], k % 2);
      acc += av * bv;
    }
    c[e] = acc;
  }
}

namespace emu {
// ldmatrix .m8n8 .b16 of `count` matrices: lanes 8m..8m+7 give the row addresses of matrix m;
// register m of lane l holds row l / 4, columns 2(l % 4) and + 1 (`.trans`: rows 2(l % 4)
// and + 1 of column l / 4).
inline void ldmatrix(uint32_t* r, const bf16* p, int count, bool trans) {
  Warp& w = cta->warps[threadIdx.x / 32];
  Slots& sl = slots(w);
  const int lane = threadIdx.x % 32;
  sl.row[lane] = reinterpret_cast<const unsigned char*>(p);
  w.bar.arrive_and_wait();
  for (int m = 0; m < count; m++) {
    uint16_t lo, hi;
    if (!trans) {
      const unsigned char* row = sl.row[8 * m + lane / 4];
      std::memcpy(&lo, row + 4 * (lane % 4), 2);
      std::memcpy(&hi, row + 4 * (lane % 4) + 2, 2);
    } else {
      std::memcpy(&lo, sl.row[8 * m + 2 * (lane % 4)] + 2 * (lane / 4), 2);
      std::memcpy(&hi, sl.row[8 * m + 2 * (lane % 4) + 1] + 2 * (lane / 4), 2);
    }
    r[m] = (uint32_t)lo | ((uint32_t)hi << 16);
  }
}
}  // namespace emu

inline void ldsm4(uint32_t* r, const bf16* p) { emu::ldmatrix(r, p, 4, false); }
inline void ldsm4t(uint32_t* r, const bf16* p) { emu::ldmatrix(r, p, 4, true); }
inline void ldsm2t(uint32_t* r, const bf16* p) { emu::ldmatrix(r, p, 2, true); }

namespace emu {
// One CUDA thread: its context, stack, body and the per-thread state the helpers keep in
// thread-locals (swapped in while it runs).
struct Fiber {
  ucontext_t ctx;
  std::function<void()> body;
  bool done = false;
  Dim3 tid, bid;
  unsigned warp_calls = 0;
  int and_calls = 0;
  std::vector<Group> committed;
  Group open_group;
};
inline ucontext_t scheduler;
inline Fiber* current = nullptr;
// Each fiber's stack (the kernels' register arrays, the emulated wgmma's own frames).
constexpr size_t FIBER_STACK = 256 * 1024;
inline std::vector<std::unique_ptr<char[]>> stacks;

inline void yield() { swapcontext(&current->ctx, &scheduler); }

inline void fiber_entry() {
  current->body();
  current->done = true;
  progress++;
  swapcontext(&current->ctx, &scheduler);
}

// Runs `threads` fibers of `body(i)` to their end.
inline void run_cta(unsigned threads, const std::function<void(unsigned)>& body) {
  while (stacks.size() < threads) stacks.push_back(std::make_unique<char[]>(FIBER_STACK));
  std::vector<Fiber> fs(threads);
  for (unsigned i = 0; i < threads; i++) {
    Fiber& f = fs[i];
    f.body = [&body, i] { body(i); };
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stacks[i].get();
    f.ctx.uc_stack.ss_size = FIBER_STACK;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  unsigned live = threads;
  while (live > 0) {
    const unsigned long long before = progress;
    for (Fiber& f : fs) {
      if (f.done) continue;
      threadIdx = f.tid;
      blockIdx = f.bid;
      warp_calls = f.warp_calls;
      and_calls = f.and_calls;
      std::swap(committed, f.committed);
      std::swap(open_group, f.open_group);
      current = &f;
      swapcontext(&scheduler, &f.ctx);
      f.tid = threadIdx;
      f.bid = blockIdx;
      f.warp_calls = warp_calls;
      f.and_calls = and_calls;
      std::swap(committed, f.committed);
      std::swap(open_group, f.open_group);
      if (f.done) live--;
    }
    if (progress == before) fail("deadlock: threads wait at barriers the others never reach", live, threads);
  }
  current = nullptr;
}
}  // namespace emu

// Runs kernel(args...) over grid × block threads with `smem` bytes of dynamic shared memory,
// one CTA at a time.
template <class F, class... Args>
void emu_launch(F kernel, Dim3 grid, Dim3 block, size_t smem, Args... args) {
  if (smem > EMU_SMEM_MAX) emu::fail("dynamic shared memory over the limit", (long)smem, (long)EMU_SMEM_MAX);
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || threads % 32)
    emu::fail("a block's threads must be a multiple of 32, at most 1024", threads, 0);
  gridDim = grid;
  blockDim = block;
  emu::smem_bytes = smem;
  for (unsigned bz = 0; bz < grid.z; bz++)
    for (unsigned by = 0; by < grid.y; by++)
    for (unsigned bx = 0; bx < grid.x; bx++) {
      std::memset(emu::dyn, 0xFF, EMU_SMEM_MAX);
      auto c = std::make_unique<emu::Cta>(threads);
      emu::cta = c.get();
      emu::run_cta(threads, [&](unsigned i) {
        threadIdx = {i % block.x, i / block.x % block.y, i / (block.x * block.y)};
        blockIdx = {bx, by, bz};
        kernel(args...);
        if (!emu::committed.empty() || !emu::open_group.accs.empty())
          emu::fail("wgmma products still in flight when the kernel returned", (long)emu::committed.size(), 0);
      });
      emu::cta = nullptr;
    }
}

template <class F, class... Args>
void emu_launch(F kernel, Dim3 grid, unsigned threads, size_t smem, Args... args) {
  emu_launch(kernel, grid, Dim3{threads, 1, 1}, smem, args...);
}
