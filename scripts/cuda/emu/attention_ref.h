// attention_ref.h: the cases, inputs and double-precision reference the kernel emulations
// (flash_*_emu.cpp) compare with: attention with segment ids (packed rows, padding = 0),
// causal, a sliding window and GQA, as kernels/flash_mma.cu's header defines it; q (B, T, H,
// D), k / v (B, S, KV, D) bf16; o (B, T, H, D); lse (B, H, T) natural log, −∞ where no key is
// allowed; dq (B, T, H, D); dk / dv per query head (B, S, H, D), as the kernels write them.
// Tolerances are omr bench kernels': max |got − ref| / max |ref| ≤ 3e-2 (P and dS pass through
// bf16), lse 1e-3 relative, −∞ exactly.
#pragma once
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace ref {

inline std::mt19937_64 rng(7);
inline int failures = 0;

inline std::vector<bf16> rand_bf16(size_t n, float scale) {
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<bf16> v(n);
  for (auto& x : v) x = __float2bfloat16_rn(u(rng));
  return v;
}

inline double f(bf16 x) { return (double)__bfloat162float(x); }

inline void report(const std::string& name, double err, double tol) {
  const bool ok = err <= tol;  // NaN fails
  if (!ok) failures++;
  std::printf("%-66s %.3e (tol %.0e) %s\n", name.c_str(), err, tol, ok ? "ok" : "FAIL");
}

// max |got − ref| / max |ref| (NaN if anything is not finite).
template <class G>
double rel_err(const std::vector<G>& got, const std::vector<double>& want) {
  double scale = 1e-30, worst = 0;
  for (double r : want) scale = std::max(scale, std::fabs(r));
  for (size_t i = 0; i < want.size(); i++) {
    double g;
    if constexpr (std::is_same_v<G, bf16>)
      g = f(got[i]);
    else
      g = got[i];
    const double d = std::fabs(g - want[i]);
    if (!std::isfinite(d)) return NAN;
    worst = std::max(worst, d);
  }
  return worst / scale;
}

struct Case {
  const char* name;
  int B, T, S, H, KV;
  bool causal;
  int window;
  bool packed;  // segments of 97 positions, batch row 0 padded from 290 on (as check.rs)
};

// The cases every kernel runs: packed causal rows with padding and GQA, a cache with a window,
// one unmasked segment (whole tiles), one causal segment with a cache (whole tiles next to the
// diagonal's, steps that start off the tile grid).
inline const Case CASES[] = {
    {"packed causal, padding, GQA 4/2, T 300", 2, 300, 300, 4, 2, true, 0, true},
    {"cache S 333 > T 270, window 100, causal", 1, 270, 333, 2, 1, true, 100, false},
    {"one segment, not causal, T 256 (whole tiles)", 1, 256, 256, 2, 2, false, 0, false},
    {"one segment, causal, S 400 > T 300, GQA 2/1", 1, 300, 400, 2, 1, true, 0, false},
};

struct Problem {
  Case c;
  int D;
  float scale;
  std::vector<unsigned> qseg, kseg;
  std::vector<bf16> q, k, v, dout;
  std::vector<double> o, lse, dq, dk, dv;

  bool allowed(int b, int i, int j) const {
    const int off = c.S - c.T;
    const unsigned qs = qseg[b * c.T + i], ks = kseg[b * c.S + j];
    return qs != 0u && qs == ks && (!c.causal || j <= i + off) &&
           (c.window == 0 || j + c.window > i + off);
  }

  // Exact spans: per (b, `rows` query rows) the keys any of them may see, per (b, `keys` keys)
  // the rows that may see any of them; [first, last + 1), (0, 0) when empty.
  void spans(int rows, int keys, std::vector<int>& fwd, std::vector<int>& bwd) const {
    const int B = c.B, T = c.T, S = c.S, nq = (T + rows - 1) / rows, nk = (S + keys - 1) / keys;
    fwd.assign(2 * B * nq, 0);
    bwd.assign(2 * B * nk, 0);
    for (int b = 0; b < B; b++)
      for (int i = 0; i < T; i++)
        for (int j = 0; j < S; j++) {
          if (!allowed(b, i, j)) continue;
          int* fs = &fwd[2 * (b * nq + i / rows)];
          int* bs = &bwd[2 * (b * nk + j / keys)];
          fs[0] = fs[1] == 0 ? j : std::min(fs[0], j);
          fs[1] = std::max(fs[1], j + 1);
          bs[0] = bs[1] == 0 ? i : std::min(bs[0], i);
          bs[1] = std::max(bs[1], i + 1);
        }
  }

  // Δ = rowsum(dO ∘ O) in f32 from the kernel's O, as the host computes it for the backward.
  std::vector<float> delta(const std::vector<bf16>& ko) const {
    const int B = c.B, T = c.T, H = c.H;
    std::vector<float> d((size_t)B * H * T);
    for (int b = 0; b < B; b++)
      for (int h = 0; h < H; h++)
        for (int i = 0; i < T; i++) {
          float s = 0;
          for (int x = 0; x < D; x++) {
            const size_t at = (((size_t)b * T + i) * H + h) * D + x;
            s += (float)(f(ko[at]) * f(dout[at]));
          }
          d[((size_t)b * H + h) * T + i] = s;
        }
    return d;
  }

  void check_forward(const std::string& name, const std::vector<bf16>& ko,
                     const std::vector<float>& klse) const {
    report(name + ": forward o", rel_err(ko, o), 3e-2);
    double err = 0;
    for (size_t i = 0; i < klse.size(); i++) {
      if (std::isinf(lse[i])) {
        if (!(std::isinf(klse[i]) && klse[i] < 0)) err = NAN;
      } else {
        err = std::max(err, std::fabs(klse[i] - lse[i]) / std::max(1.0, std::fabs(lse[i])));
      }
    }
    report(name + ": forward lse", err, 1e-3);
  }

  void check_backward(const std::string& name, const std::vector<float>& kdq,
                      const std::vector<float>& kdk, const std::vector<float>& kdv) const {
    report(name + ": backward dq", rel_err(kdq, dq), 3e-2);
    report(name + ": backward dk (per query head)", rel_err(kdk, dk), 3e-2);
    report(name + ": backward dv (per query head)", rel_err(kdv, dv), 3e-2);
  }
};

inline Problem problem(const Case& c, int D) {
  Problem p{c, D, 1.f / std::sqrt((float)D), {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}};
  const int B = c.B, T = c.T, S = c.S, H = c.H, KV = c.KV, off = S - T;
  p.kseg.resize(B * S);
  p.qseg.resize(B * T);
  for (int b = 0; b < B; b++) {
    for (int j = 0; j < S; j++)
      p.kseg[b * S + j] = c.packed ? ((b == 0 && j >= 290) ? 0u : 1u + j / 97) : 1u;
    for (int i = 0; i < T; i++) p.qseg[b * T + i] = p.kseg[b * S + i + off];
  }
  p.q = rand_bf16((size_t)B * T * H * D, 1.5f);
  p.k = rand_bf16((size_t)B * S * KV * D, 1.5f);
  p.v = rand_bf16((size_t)B * S * KV * D, 1.f);
  p.dout = rand_bf16((size_t)B * T * H * D, 1.f);
  // 128 rows of NaN after the last batch row of each input: a kernel that uses a row past T or
  // S (instead of zeros, or not at all) turns an output NaN.
  for (auto* x : {&p.q, &p.k, &p.v, &p.dout})
    x->insert(x->end(), (size_t)128 * H * D, __float2bfloat16_rn(NAN));
  auto Q = [&](int b, int i, int h, int d) { return f(p.q[(((size_t)b * T + i) * H + h) * D + d]); };
  auto K = [&](int b, int j, int h, int d) {
    return f(p.k[(((size_t)b * S + j) * KV + h / (H / KV)) * D + d]);
  };
  auto V = [&](int b, int j, int h, int d) {
    return f(p.v[(((size_t)b * S + j) * KV + h / (H / KV)) * D + d]);
  };
  auto dO = [&](int b, int i, int h, int d) {
    return f(p.dout[(((size_t)b * T + i) * H + h) * D + d]);
  };
  p.o.assign((size_t)B * T * H * D, 0);
  p.lse.assign((size_t)B * H * T, 0);
  p.dq.assign(p.o.size(), 0);
  p.dk.assign((size_t)B * S * H * D, 0);
  p.dv.assign(p.dk.size(), 0);
  for (int b = 0; b < B; b++)
    for (int h = 0; h < H; h++)
      for (int i = 0; i < T; i++) {
        std::vector<double> s(S, 0), pr(S, 0);
        double mx = -INFINITY;
        for (int j = 0; j < S; j++) {
          if (!p.allowed(b, i, j)) continue;
          double x = 0;
          for (int d = 0; d < D; d++) x += Q(b, i, h, d) * K(b, j, h, d);
          s[j] = x * p.scale;
          mx = std::max(mx, s[j]);
        }
        double l = 0;
        for (int j = 0; j < S; j++) l += p.allowed(b, i, j) ? std::exp(s[j] - mx) : 0.0;
        p.lse[((size_t)b * H + h) * T + i] = l > 0 ? mx + std::log(l) : -INFINITY;
        for (int j = 0; j < S; j++) pr[j] = p.allowed(b, i, j) ? std::exp(s[j] - mx) / l : 0.0;
        double delta = 0;
        for (int d = 0; d < D; d++) {
          double o = 0;
          for (int j = 0; j < S; j++) o += pr[j] * V(b, j, h, d);
          p.o[(((size_t)b * T + i) * H + h) * D + d] = o;
          delta += o * dO(b, i, h, d);
        }
        for (int j = 0; j < S; j++) {
          if (pr[j] == 0) continue;
          double x = 0;
          for (int d = 0; d < D; d++) x += dO(b, i, h, d) * V(b, j, h, d);
          const double ds = pr[j] * (x - delta) * p.scale;
          for (int d = 0; d < D; d++) {
            p.dq[(((size_t)b * T + i) * H + h) * D + d] += ds * K(b, j, h, d);
            p.dk[(((size_t)b * S + j) * H + h) * D + d] += ds * Q(b, i, h, d);
            p.dv[(((size_t)b * S + j) * H + h) * D + d] += pr[j] * dO(b, i, h, d);
          }
        }
      }
  return p;
}

}  // namespace ref
