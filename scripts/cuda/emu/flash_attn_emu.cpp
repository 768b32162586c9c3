// flash_attn_emu.cpp: kernels/flash_attn.cu's forward (flash_fwd, the CUDA-core kernel that
// runs generation's decoding steps and every call of 16 or fewer query rows) on the CPU
// (cuda_emu.h) against attention_ref.h's double-precision reference: two of attention_ref's
// cases (packed causal rows with padding and GQA, a cache with a window) and decoding
// steps (T 1 and 3 queries over a cache, 7 and 2 heads per key/value head, a window). Keys and
// values sit in a longer buffer (batch rows `kvb` elements apart, the rest of each row NaN),
// as generation's preallocated cache hands them to the kernel, and contiguous; the key range in
// one block or cut into splits merged by flash_fwd_combine (3, and 16: more than the tiles, so
// some splits see no key). bf16 and f32.
// And its backward (flash_bwd_dot, flash_bwd_dq, flash_bwd_dkdv: what training runs under
// OMR_ATTN=kernel and for head dims the tensor-core kernels lack), launched as flash_attn.rs
// does, on the forward's own O and lse: dq, and dk / dv per key/value head (the reference's
// per query head summed over each group), on smaller versions of attention_ref's four cases.
// Tolerances: o 1e-2 of max |o| (bf16 output; f32 arithmetic), lse 1e-5 relative, −∞ exactly;
// the backward's 3e-2 of max |ref| (attention_ref's, as omr bench kernels).
// Exits 1 on any failure. Built and run by run.sh.
#include "cuda_emu.h"
#include "../../../kernels/flash_attn.cu"
#include "attention_ref.h"

namespace {

// Runs flash_fwd_<T> on p's inputs with key/value batch rows `cap` ≥ S positions apart, the
// key range cut into `splits` (then merged by flash_fwd_combine_<T>).
template <typename T>
void run(const ref::Problem& p, int cap, const char* dt, int splits = 1) {
  const ref::Case& c = p.c;
  const int B = c.B, Tq = c.T, S = c.S, H = c.H, KV = c.KV, D = p.D, G = H / KV;
  const size_t row = (size_t)cap * KV * D;
  std::vector<T> q(p.q.size()), k(B * row, T(NAN)), v(B * row, T(NAN));
  for (size_t i = 0; i < q.size(); i++) q[i] = T(__bfloat162float(p.q[i]));
  for (int b = 0; b < B; b++)
    for (size_t i = 0; i < (size_t)S * KV * D; i++) {
      k[b * row + i] = T(__bfloat162float(p.k[b * (size_t)S * KV * D + i]));
      v[b * row + i] = T(__bfloat162float(p.v[b * (size_t)S * KV * D + i]));
    }
  std::vector<T> o(p.o.size(), T(NAN));
  std::vector<float> lse(p.lse.size(), NAN);
  const int rb = (Tq * G + 15) / 16, rows = B * H * Tq;
  const Dim3 grid{(unsigned)(rb * splits), (unsigned)KV, (unsigned)B};
  const T *qp = q.data(), *kp = k.data(), *vp = v.data();
  const unsigned *qs = p.qseg.data(), *ks = p.kseg.data();
  std::vector<float> part(splits > 1 ? (size_t)splits * rows * (D + 2) : 0, NAN);
  float* pp = splits > 1 ? part.data() : nullptr;
  if constexpr (std::is_same_v<T, float>) {
    emu_launch(flash_fwd_f32, grid, 128, 0, qp, kp, vp, qs, ks, o.data(), lse.data(), Tq, S, H,
               KV, D, (long long)row, p.scale, (int)c.causal, c.window, splits, pp);
    if (splits > 1)
      emu_launch(flash_fwd_combine_f32, Dim3{(unsigned)rows, 1, 1}, 128, 0, (const float*)pp,
                 o.data(), lse.data(), rows, Tq, H, D, splits);
  } else {
    emu_launch(flash_fwd_bf16, grid, 128, 0, qp, kp, vp, qs, ks, o.data(), lse.data(), Tq, S, H,
               KV, D, (long long)row, p.scale, (int)c.causal, c.window, splits, pp);
    if (splits > 1)
      emu_launch(flash_fwd_combine_bf16, Dim3{(unsigned)rows, 1, 1}, 128, 0, (const float*)pp,
                 o.data(), lse.data(), rows, Tq, H, D, splits);
  }
  std::vector<double> got(o.size());
  for (size_t i = 0; i < o.size(); i++) got[i] = (double)(float)o[i];
  const std::string name = std::string(dt) + " D " + std::to_string(D) + ", " + c.name +
                           (cap > S ? ", in a buffer of " + std::to_string(cap) : "") +
                           (splits > 1 ? ", " + std::to_string(splits) + " splits" : "");
  ref::report(name + ": o", ref::rel_err(got, p.o), 1e-2);
  double err = 0;
  for (size_t i = 0; i < lse.size(); i++) {
    if (std::isinf(p.lse[i])) {
      if (!(std::isinf(lse[i]) && lse[i] < 0)) err = NAN;
    } else {
      err = std::max(err, std::fabs(lse[i] - p.lse[i]) / std::max(1.0, std::fabs(p.lse[i])));
    }
  }
  ref::report(name + ": lse", err, 1e-5);
}

// The backward of p through flash_attn.cu's three kernels, after its forward (one split).
template <typename T>
void backward(const ref::Problem& p, const char* dt) {
  const ref::Case& c = p.c;
  const int B = c.B, Tq = c.T, S = c.S, H = c.H, KV = c.KV, D = p.D, G = H / KV;
  auto conv = [](const std::vector<bf16>& x) {
    std::vector<T> y(x.size());
    for (size_t i = 0; i < x.size(); i++) y[i] = T(__bfloat162float(x[i]));
    return y;
  };
  const std::vector<T> q = conv(p.q), k = conv(p.k), v = conv(p.v), dout = conv(p.dout);
  // The gradients' sizes without the inputs' NaN guard rows (attention_ref.h).
  const size_t nq = (size_t)B * Tq * H * D, nk = (size_t)B * S * KV * D;
  std::vector<T> o(p.o.size(), T(NAN)), dq(nq, T(NAN)), dk(nk, T(NAN)), dv(nk, T(NAN));
  std::vector<float> lse(p.lse.size(), NAN), delta((size_t)B * H * Tq, NAN);
  const T *qp = q.data(), *kp = k.data(), *vp = v.data(), *gp = dout.data(), *op = o.data();
  const unsigned *qs = p.qseg.data(), *ks = p.kseg.data();
  const float *lp = lse.data(), *dp = delta.data();
  const Dim3 fgrid{(unsigned)((Tq * G + 15) / 16), (unsigned)KV, (unsigned)B};
  // flash_attn.rs: the dot over (B·T·H) rows, 8 warps a block; dq over 8-row tiles per head;
  // dk / dv over 32-key tiles per key/value head.
  const Dim3 dot{(unsigned)std::min(((size_t)B * Tq * H + 7) / 8, (size_t)65535), 1, 1};
  const Dim3 gq{(unsigned)((Tq + 7) / 8), (unsigned)H, (unsigned)B};
  const Dim3 gk{(unsigned)((S + 31) / 32), (unsigned)KV, (unsigned)B};
  const int causal = c.causal;
  if constexpr (std::is_same_v<T, float>) {
    emu_launch(flash_fwd_f32, fgrid, 128, 0, qp, kp, vp, qs, ks, o.data(), lse.data(), Tq, S, H, KV,
               D, (long long)S * KV * D, p.scale, causal, c.window, 1, (float*)nullptr);
    emu_launch(flash_bwd_dot_f32, dot, 256, 0, op, gp, delta.data(), B, Tq, H, D);
    emu_launch(flash_bwd_dq_f32, gq, 128, 0, qp, kp, vp, qs, ks, gp, lp, dp, dq.data(), Tq, S, H,
               KV, D, p.scale, causal, c.window);
    emu_launch(flash_bwd_dkdv_f32, gk, 128, 0, qp, kp, vp, qs, ks, gp, lp, dp, dk.data(), dv.data(),
               Tq, S, H, KV, D, p.scale, causal, c.window);
  } else {
    emu_launch(flash_fwd_bf16, fgrid, 128, 0, qp, kp, vp, qs, ks, o.data(), lse.data(), Tq, S, H,
               KV, D, (long long)S * KV * D, p.scale, causal, c.window, 1, (float*)nullptr);
    emu_launch(flash_bwd_dot_bf16, dot, 256, 0, op, gp, delta.data(), B, Tq, H, D);
    emu_launch(flash_bwd_dq_bf16, gq, 128, 0, qp, kp, vp, qs, ks, gp, lp, dp, dq.data(), Tq, S, H,
               KV, D, p.scale, causal, c.window);
    emu_launch(flash_bwd_dkdv_bf16, gk, 128, 0, qp, kp, vp, qs, ks, gp, lp, dp, dk.data(),
               dv.data(), Tq, S, H, KV, D, p.scale, causal, c.window);
  }
  // The reference's dk / dv per query head, summed over each key/value head's group.
  std::vector<double> wk(nk, 0), wv(nk, 0);
  for (int b = 0; b < B; b++)
    for (int j = 0; j < S; j++)
      for (int h = 0; h < H; h++)
        for (int d = 0; d < D; d++) {
          const size_t from = (((size_t)b * S + j) * H + h) * D + d;
          const size_t to = (((size_t)b * S + j) * KV + h / G) * D + d;
          wk[to] += p.dk[from];
          wv[to] += p.dv[from];
        }
  auto as_f = [](const std::vector<T>& x) {
    std::vector<double> y(x.size());
    for (size_t i = 0; i < x.size(); i++) y[i] = (double)(float)x[i];
    return y;
  };
  const std::string name = std::string(dt) + " D " + std::to_string(D) + ", " + c.name + ": backward";
  ref::report(name + " dq", ref::rel_err(as_f(dq), p.dq), 3e-2);
  ref::report(name + " dk", ref::rel_err(as_f(dk), wk), 3e-2);
  ref::report(name + " dv", ref::rel_err(as_f(dv), wv), 3e-2);
}

// The backward's cases: packed causal rows (segments of 97, GQA), a cache with a window, one
// unmasked segment of whole tiles, a causal segment with a cache.
const ref::Case BACKWARD[] = {
    {"packed causal, GQA 4/2, T 110", 1, 110, 110, 4, 2, true, 0, true},
    {"cache S 60 > T 45, window 20, causal", 1, 45, 60, 2, 1, true, 20, false},
    {"one segment, not causal, T 64 (whole tiles)", 1, 64, 64, 2, 2, false, 0, false},
    {"one segment, causal, S 50 > T 40, GQA 2/1", 1, 40, 50, 2, 1, true, 0, false},
};

// Decoding steps: T query rows at the end of a cache of S keys.
const ref::Case DECODE[] = {
    {"decode T 1, S 333, GQA 14/2, causal", 3, 1, 333, 14, 2, true, 0, false},
    {"decode T 3, S 200, GQA 4/2, causal, window 50", 2, 3, 200, 4, 2, true, 50, false},
    {"decode T 1, S 300, GQA 4/2, packed with padding", 2, 1, 300, 4, 2, true, 0, true},
};

}  // namespace

int main() {
  for (const auto& c : DECODE)
    for (int D : {128, 64}) {
      const ref::Problem p = ref::problem(c, D);
      run<bf16>(p, c.S + 77, "bf16");
      run<float>(p, c.S + 77, "f32");
      run<bf16>(p, c.S, "bf16");
      // The key range cut in three, and in more splits than tiles (empty splits).
      run<bf16>(p, c.S + 77, "bf16", 3);
      run<float>(p, c.S + 77, "f32", 16);
    }
  // Training's shapes (the kernel serves them under OMR_ATTN=kernel): the packed rows and the
  // windowed cache.
  for (const auto& c : {ref::CASES[0], ref::CASES[1]}) {
    const ref::Problem p = ref::problem(c, 128);
    run<bf16>(p, c.S + 40, "bf16");
  }
  // The backward (training under OMR_ATTN=kernel) on smaller versions of attention_ref's
  // cases (its threads loop over every key or query with a barrier per tile: the full ones
  // would take most of the emulation's time).
  for (const auto& c : BACKWARD) backward<bf16>(ref::problem(c, 64), "bf16");
  backward<float>(ref::problem(BACKWARD[2], 128), "f32");
  std::printf("flash_attn %s: %d failure(s)\n", ref::failures ? "FAILED" : "all passed",
              ref::failures);
  return ref::failures ? 1 : 0;
}
