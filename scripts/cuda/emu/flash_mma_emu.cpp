// flash_mma_emu.cpp: kernels/flash_mma.cu on the CPU (cuda_emu.h) against attention in double
// precision (attention_ref.h): every entry point an `OMR_MMA` tiling can select
// (crates/omr-kernels/src/flash_mma/tiling.rs), forward (o, lse) and backward (dq, dk, dv), on
// every case of ref::CASES at head dim 128 and two of them at 64 and 80, where the entry exists. The default
// tiling is the one run 8 verified on an H200, so it also checks this emulation against the
// hardware. Exits 1 on any failure. Built and run by run.sh.
#define OMR_EMU "cuda_emu.h"
#include "../../../kernels/flash_mma.cu"
#include "attention_ref.h"

namespace {

using Fwd = void (*)(const bf16*, const bf16*, const bf16*, const unsigned*, const unsigned*,
                     const int*, bf16*, float*, int, int, int, int, float, int, int);
using Bwd = void (*)(const bf16*, const bf16*, const bf16*, const bf16*, const float*,
                     const float*, const unsigned*, const unsigned*, const int*, float*, float*,
                     float*, int, int, int, int, float, int, int);

// tiling.rs's shapes: query rows and threads of the forward, its dynamic shared memory; keys
// and threads of the backward, its dynamic shared memory.
struct FwdEntry {
  const char* name;
  int d;
  Fwd f;
  int warps, mtiles;
  size_t smem() const { return mtiles > 1 ? (size_t)16 * warps * mtiles * (d + 8) * 2 : 0; }
};
struct BwdEntry {
  const char* name;
  int d;
  Bwd f;
  int warps;
  bool r64;
  size_t smem() const {
    const size_t ld = d + 8;
    if (r64) return 2 * (2 * 128 * ld + 4 * 64 * ld + 2 * 64 * 136) + 4 * (3 * 2 * 64 + 128);
    const size_t keys = 16 * warps;
    return 2 * (keys * ld + 4 * BWD_BR * ld + keys * (BWD_BR + 8)) + 3 * 2 * BWD_BR * 4;
  }
  int keys() const { return r64 ? 128 : 16 * warps; }
};

const FwdEntry FWDS[] = {
    {"flash_mma_fwd_d64", 64, flash_mma_fwd_d64, 4, 1},
    {"flash_mma_fwd_d80", 80, flash_mma_fwd_d80, 4, 1},
    {"flash_mma_fwd_d128", 128, flash_mma_fwd_d128, 4, 1},
    {"flash_mma_fwd8_d64", 64, flash_mma_fwd8_d64, 8, 1},
    {"flash_mma_fwd8_d80", 80, flash_mma_fwd8_d80, 8, 1},
    {"flash_mma_fwd8_d128", 128, flash_mma_fwd8_d128, 8, 1},
    {"flash_mma_fwd_m2_d128", 128, flash_mma_fwd_m2_d128, 4, 2},
};
const BwdEntry BWDS[] = {
    {"flash_mma_bwd_d64", 64, flash_mma_bwd_d64, 4, false},
    {"flash_mma_bwd_d80", 80, flash_mma_bwd_d80, 4, false},
    {"flash_mma_bwd_d128", 128, flash_mma_bwd_d128, 4, false},
    {"flash_mma_bwd8_d64", 64, flash_mma_bwd8_d64, 8, false},
    {"flash_mma_bwd8_d128", 128, flash_mma_bwd8_d128, 8, false},
    {"flash_mma_bwd_q4_d128", 128, flash_mma_bwd_q4_d128, 4, false},
    {"flash_mma_bwd8_q4_d128", 128, flash_mma_bwd8_q4_d128, 8, false},
    {"flash_mma_bwd8r64_d64", 64, flash_mma_bwd8r64_d64, 8, true},
    {"flash_mma_bwd8r64_d128", 128, flash_mma_bwd8r64_d128, 8, true},
    {"flash_mma_bwd8r64_q4_d128", 128, flash_mma_bwd8r64_q4_d128, 8, true},
};

}  // namespace

int main(int argc, char** argv) {
  // An argument keeps the entries whose name contains it (e.g. `bwd8r64`).
  const std::string only = argc > 1 ? argv[1] : "";
  for (int d : {64, 80, 128}) {
    for (size_t ci = 0; ci < std::size(ref::CASES); ci++) {
      // Head dims 64 and 80 (vision, small models) on the packed and the cached causal case
      // only: the emulation's threads cost minutes on two cores.
      if (d != 128 && ci != 0 && ci != 3) continue;
      const ref::Case& c = ref::CASES[ci];
      const ref::Problem p = ref::problem(c, d);
      const int B = c.B, T = c.T, S = c.S, H = c.H;
      const float scale_log2 = p.scale * 1.4426950408889634f;
      // Each forward; the first one's o and lse feed every backward, as in training.
      std::vector<bf16> o0;
      std::vector<float> lse0;
      for (const FwdEntry& e : FWDS) {
        const bool wanted = only.empty() || std::string(e.name).find(only) != std::string::npos;
        if (e.d != d || (!wanted && !o0.empty())) continue;
        const int rows = 16 * e.warps * e.mtiles;
        std::vector<int> fspan, bspan;
        p.spans(rows, 64, fspan, bspan);
        std::vector<bf16> o(p.o.size(), __float2bfloat16_rn(NAN));
        std::vector<float> lse(p.lse.size(), NAN);
        emu_launch(e.f, Dim3{(unsigned)((T + rows - 1) / rows), (unsigned)(B * H), 1},
                   32 * e.warps, e.smem(), p.q.data(), p.k.data(), p.v.data(), p.qseg.data(),
                   p.kseg.data(), fspan.data(), o.data(), lse.data(), T, S, H, c.KV, scale_log2,
                   (int)c.causal, c.window);
        if (wanted) p.check_forward(std::string(e.name) + " " + c.name, o, lse);
        if (o0.empty()) {
          o0 = o;
          lse0 = lse;
        }
      }
      const std::vector<float> delta = p.delta(o0);
      for (const BwdEntry& e : BWDS) {
        if (e.d != d || (!only.empty() && std::string(e.name).find(only) == std::string::npos))
          continue;
        std::vector<int> fspan, bspan;
        p.spans(64, e.keys(), fspan, bspan);
        std::vector<float> dq(p.dq.size(), 0.f), dk(p.dk.size(), NAN), dv(p.dv.size(), NAN);
        emu_launch(e.f, Dim3{(unsigned)((S + e.keys() - 1) / e.keys()), (unsigned)(B * H), 1},
                   32 * e.warps, e.smem(), p.q.data(), p.k.data(), p.v.data(), p.dout.data(),
                   lse0.data(), delta.data(), p.qseg.data(), p.kseg.data(), bspan.data(),
                   dq.data(), dk.data(), dv.data(), T, S, H, c.KV, p.scale, (int)c.causal,
                   c.window);
        p.check_backward(std::string(e.name) + " " + c.name, dq, dk, dv);
      }
    }
  }
  std::printf("flash_mma %s: %d failure(s)\n", ref::failures ? "FAILED" : "all passed",
              ref::failures);
  return ref::failures ? 1 : 0;
}
