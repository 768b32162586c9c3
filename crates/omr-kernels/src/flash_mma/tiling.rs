//! The tensor-core attention's tilings (`OMR_MMA`): warps and m-tiles per CTA, the
//! backward's layout, the dQ atomics' width; each names its entry points in
//! `kernels/flash_mma.cu` (or, for the wgmma forward, `kernels/flash_wgmma_sm90a.cu`) and their
//! dynamic shared memory.

use candle_core::Result;

/// Query rows per backward step (`flash_mma.cu`'s BWD_BR).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(super) const BWD_ROWS: usize = 32;

/// How the kernels tile the work. Each warp takes `fwd_mtiles` tiles of 16 query rows in the
/// forward (`fwd` warps per CTA) and 16 keys in the backward (`bwd` warps per CTA, 32 query
/// rows per step); `bwd_r64` runs the backward in FlashAttention-2's layout instead (8 warps,
/// 128 keys, 64 query rows per step, `flash_bwd64`); `dq4` adds the backward's dQ with
/// float4 atomics instead of float2; `fwd_wg` / `bwd_wg` run the forward / backward on
/// Hopper's warpgroup tensor cores (`flash_wg_{fwd,bwd}_d128` in `flash_wgmma_sm90a.cu`: two
/// warpgroups, 128 query rows / keys per CTA, wgmma; head dim 128, sm_90a only); `wg_pipe`
/// takes the pipelined wgmma forward (`flash_wg_fwd_pipe_d128`: each tile's softmax under
/// the previous tile's P·V).
/// The default is what the last GPU run verified and
/// measured fastest; the others exist for head dim 128 (the 8-warp backwards also for 64),
/// and [`Tiling::for_dim`] falls back to the default elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiling {
    pub fwd: usize,
    pub fwd_mtiles: usize,
    pub bwd: usize,
    pub bwd_r64: bool,
    pub dq4: bool,
    pub fwd_wg: bool,
    pub bwd_wg: bool,
    pub wg_pipe: bool,
}

impl Default for Tiling {
    fn default() -> Self {
        Tiling {
            fwd: 4,
            fwd_mtiles: 1,
            bwd: 4,
            bwd_r64: false,
            dq4: false,
            fwd_wg: false,
            bwd_wg: false,
            wg_pipe: false,
        }
    }
}

/// `flash_wg_fwd_d128`'s dynamic shared memory (`WG_SMEM` in the kernel): Q (128 rows), K and V
/// (128 keys, twice each) of 128 bf16, two rows of key segment ids, 1024 bytes of alignment.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const WG_SMEM: usize = 1024 + 2 * (128 * 128 + 4 * 128 * 128) + 4 * 2 * 128;

/// `flash_wg_fwd_pipe_d128`'s (`WG_PIPE_SMEM`): the same with three V tiles.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const WG_PIPE_SMEM: usize = 1024 + 2 * (128 * 128 + 5 * 128 * 128) + 4 * 2 * 128;

/// `flash_wg_bwd_d128`'s dynamic shared memory (`WG_BWD_SMEM`): K and V (128 keys), Q and dO
/// (64 rows, twice each) of 128 bf16, dS^T (128 × 64 bf16), lse, Δ and segment ids (2 × 64),
/// 1024 bytes of alignment.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const WG_BWD_SMEM: usize = 1024 + 2 * (4 * 128 * 128 + 128 * 64) + 4 * 3 * 2 * 64;

impl Tiling {
    /// `OMR_MMA`, a comma-separated list of `f4`, `f8`, `f4x2` (forward warps, × m-tiles),
    /// `wgf` (the wgmma forward), `wgp` (the pipelined wgmma forward), `b4`, `b8` (backward
    /// warps), `b8r64` (the FA2-layout
    /// backward), `wgb` (the wgmma backward), `q4` (float4 dQ atomics) and `wg` (`wgf,wgb`),
    /// e.g. `f4x2,b8r64,q4` or `wg`; what it leaves out stays at the default, and the last
    /// forward or backward item wins. An unknown item is an error.
    pub fn from_env() -> Result<Tiling> {
        static T: std::sync::OnceLock<std::result::Result<Tiling, String>> =
            std::sync::OnceLock::new();
        T.get_or_init(|| match std::env::var("OMR_MMA") {
            Ok(v) => Tiling::parse(&v),
            Err(_) => Ok(Tiling::default()),
        })
        .clone()
        .map_err(candle_core::Error::msg)
    }

    /// [`Tiling::from_env`]'s syntax.
    pub fn parse(spec: &str) -> std::result::Result<Tiling, String> {
        let mut t = Tiling::default();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match item {
                "f4" => (t.fwd, t.fwd_mtiles, t.fwd_wg, t.wg_pipe) = (4, 1, false, false),
                "f8" => (t.fwd, t.fwd_mtiles, t.fwd_wg, t.wg_pipe) = (8, 1, false, false),
                "f4x2" => (t.fwd, t.fwd_mtiles, t.fwd_wg, t.wg_pipe) = (4, 2, false, false),
                "wgf" => (t.fwd, t.fwd_mtiles, t.fwd_wg, t.wg_pipe) = (8, 1, true, false),
                "wgp" => (t.fwd, t.fwd_mtiles, t.fwd_wg, t.wg_pipe) = (8, 1, true, true),
                "b4" => (t.bwd, t.bwd_r64, t.bwd_wg) = (4, false, false),
                "b8" => (t.bwd, t.bwd_r64, t.bwd_wg) = (8, false, false),
                "b8r64" => (t.bwd, t.bwd_r64, t.bwd_wg) = (8, true, false),
                "wgb" => (t.bwd, t.bwd_r64, t.bwd_wg) = (8, false, true),
                "wg" => {
                    (t.fwd, t.fwd_mtiles, t.fwd_wg, t.wg_pipe) = (8, 1, true, false);
                    (t.bwd, t.bwd_r64, t.bwd_wg) = (8, false, true);
                }
                "q4" => t.dq4 = true,
                _ => {
                    return Err(format!(
                        "OMR_MMA={spec}: unknown item {item:?}; use a comma-separated list of f4, f8, f4x2, wgf, wgp, b4, b8, b8r64, wgb, q4, wg (e.g. f4x2,b8r64,q4), or unset it"
                    ))
                }
            }
        }
        Ok(t)
    }

    /// This tiling for head dim `d`: the variants that do not exist for `d` fall back.
    pub(super) fn for_dim(self, d: usize) -> Tiling {
        let (fwd_wg, bwd_wg) = (self.fwd_wg && d == 128, self.bwd_wg && d == 128);
        Tiling {
            fwd: if self.fwd_wg && !fwd_wg { 4 } else { self.fwd },
            fwd_mtiles: if d == 128 { self.fwd_mtiles } else { 1 },
            bwd: if d == 80 || (self.bwd_wg && !bwd_wg) {
                4
            } else {
                self.bwd
            },
            bwd_r64: self.bwd_r64 && d != 80,
            dq4: self.dq4 && d == 128 && !bwd_wg,
            fwd_wg,
            bwd_wg,
            wg_pipe: self.wg_pipe && fwd_wg,
        }
    }

    /// Query rows per forward CTA (the wgmma forward: 2 warpgroups of 64).
    pub(super) fn fwd_rows(self) -> usize {
        16 * self.fwd * self.fwd_mtiles
    }

    /// Threads per forward CTA.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(super) fn fwd_threads(self) -> u32 {
        32 * self.fwd as u32
    }

    /// The PTX module of the forward's entry point.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(super) fn fwd_module(self) -> &'static str {
        if self.fwd_wg {
            "flash_wgmma_sm90a"
        } else {
            "flash_mma"
        }
    }

    /// The PTX module of the backward's entry point.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(super) fn bwd_module(self) -> &'static str {
        if self.bwd_wg {
            "flash_wgmma_sm90a"
        } else {
            "flash_mma"
        }
    }

    /// Threads per backward CTA.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(super) fn bwd_threads(self) -> u32 {
        32 * self.bwd as u32
    }

    pub(super) fn bwd_keys(self) -> usize {
        16 * self.bwd
    }

    /// The forward's entry point for head dim `d`.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(super) fn fwd_entry(self, d: usize) -> String {
        if self.fwd_wg {
            let p = if self.wg_pipe { "_pipe" } else { "" };
            return format!("flash_wg_fwd{p}_d{d}");
        }
        let w = if self.fwd == 8 { "8" } else { "" };
        let m = if self.fwd_mtiles == 2 { "_m2" } else { "" };
        format!("flash_mma_fwd{w}{m}_d{d}")
    }

    /// The backward's entry point for head dim `d`.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(super) fn bwd_entry(self, d: usize) -> String {
        if self.bwd_wg {
            return format!("flash_wg_bwd_d{d}");
        }
        let w = match (self.bwd, self.bwd_r64) {
            (_, true) => "8r64",
            (8, _) => "8",
            _ => "",
        };
        let q = if self.dq4 { "_q4" } else { "" };
        format!("flash_mma_bwd{w}{q}_d{d}")
    }

    /// The backward's dynamic shared memory for head dim `d`.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(super) fn bwd_smem(self, d: usize) -> usize {
        if self.bwd_wg {
            WG_BWD_SMEM
        } else if self.bwd_r64 {
            bwd64_smem(d)
        } else {
            bwd_smem(d, self.bwd_keys())
        }
    }

    /// The forward's dynamic shared memory: the Q tile when a warp takes two m-tiles.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(super) fn fwd_smem(self, d: usize) -> usize {
        if self.fwd_wg && self.wg_pipe {
            WG_PIPE_SMEM
        } else if self.fwd_wg {
            WG_SMEM
        } else if self.fwd_mtiles > 1 {
            self.fwd_rows() * (d + 8) * 2
        } else {
            0
        }
    }
}

/// The backward's dynamic shared memory for head dim `d` and `keys` keys per CTA: K, the
/// double-buffered Q and dO, dS^T, then lse, Δ and segment ids, double-buffered.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(super) fn bwd_smem(d: usize, keys: usize) -> usize {
    let ld = d + 8;
    2 * (keys * ld + 4 * BWD_ROWS * ld + keys * (BWD_ROWS + 8)) + 3 * 2 * BWD_ROWS * 4
}

/// `flash_bwd64`'s dynamic shared memory for head dim `d`: K and V (128 rows), Q and dO
/// (2 × 64 rows), P and dS (64 × 136 bf16), lse, Δ and segment ids (2 × 64), key segment ids.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn bwd64_smem(d: usize) -> usize {
    let ld = d + 8;
    2 * (2 * 128 * ld + 4 * 64 * ld + 2 * 64 * 136) + 4 * (3 * 2 * 64 + 128)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_sizes_match_the_kernel() {
        // flash_mma.cu's entry points and the headers it includes.
        let src = [
            include_str!("../../../../kernels/flash_mma.cu"),
            include_str!("../../../../kernels/flash_mma_fwd.cuh"),
            include_str!("../../../../kernels/flash_mma_bwd.cuh"),
        ]
        .concat();
        assert!(src.contains(&format!("#define BWD_BR {BWD_ROWS}\n")));
        assert!(src.contains("constexpr int BR = BWD_BR, BC = 16 * NW,"));
        assert!(src.contains("constexpr int BR = 16 * NW * MT, BC = 64,"));
        // 128-wide heads, 64 keys: K, Q and dO twice each, dS^T, three f32 rows twice.
        assert_eq!(bwd_smem(128, 64), 58112);
        // Every entry point a tiling can name, for every head dim, exists with its shape.
        let all = [
            "",
            "f8",
            "f4x2",
            "b8",
            "q4",
            "f8,b8,q4",
            "f4x2,b8,q4",
            "b8r64",
            "f4x2,b8r64,q4",
            "wgf",
            "wgp",
            "wgp,wgb",
            "wgf,b8r64,q4",
            "wgb",
            "wg",
            "f4x2,wgb,q4",
        ];
        let wg_src = [
            include_str!("../../../../kernels/flash_wgmma_sm90a.cu"),
            include_str!("../../../../kernels/flash_wg_fwd.cuh"),
            include_str!("../../../../kernels/flash_wg_bwd.cuh"),
        ]
        .concat();
        for d in [64, 80, 128] {
            for spec in all {
                let t = Tiling::parse(spec).unwrap().for_dim(d);
                let named = |x: &str| spec.split(',').any(|i| i == x || i == "wg");
                let pipe = spec.split(',').any(|i| i == "wgp");
                assert_eq!(t.fwd_wg, (named("wgf") || pipe) && d == 128, "{spec} d {d}");
                assert_eq!(t.wg_pipe, pipe && d == 128, "{spec} d {d}");
                assert_eq!(t.bwd_wg, named("wgb") && d == 128, "{spec} d {d}");
                let fwd = format!("{}, {d}, {}, {})", t.fwd_entry(d), t.fwd, t.fwd_mtiles);
                if t.fwd_wg {
                    assert_eq!(t.fwd_module(), "flash_wgmma_sm90a");
                    let pipe = if t.wg_pipe { "true" } else { "false" };
                    let entry = format!("WG_FWD({}, {pipe})\n", t.fwd_entry(d));
                    assert!(wg_src.contains(&entry), "{spec}: {entry}");
                    assert_eq!((t.fwd_rows(), t.fwd_threads()), (128, 256));
                } else {
                    assert_eq!(t.fwd_module(), "flash_mma");
                    assert!(src.contains(&format!("FWD({fwd}\n")), "{spec} d {d}: {fwd}");
                }
                let dqv = if t.dq4 { 4 } else { 2 };
                let bwd = if t.bwd_wg {
                    assert_eq!(t.bwd_module(), "flash_wgmma_sm90a");
                    assert_eq!((t.bwd_keys(), t.bwd_threads()), (128, 256));
                    let entry = format!("__launch_bounds__(256, 1)\n    {}(", t.bwd_entry(d));
                    assert!(wg_src.contains(&entry), "{spec}: {entry}");
                    continue;
                } else if t.bwd_r64 {
                    format!("BWD64({}, {d}, {dqv})", t.bwd_entry(d))
                } else {
                    format!("BWD({}, {d}, {}, {dqv})", t.bwd_entry(d), t.bwd)
                };
                assert!(src.contains(&format!("{bwd}\n")), "{spec} d {d}: {bwd}");
            }
        }
        // The FA2-layout backward: 8 warps, 128 keys, 64 rows per step; 172 KiB at D 128.
        assert!(
            src.contains("constexpr int BR = 64, BC = 128, LD = D + 8, LDP = BC + 8, NT = 256;")
        );
        assert!(src.contains("__launch_bounds__(256, 1)"));
        assert_eq!(Tiling::parse("b8r64").unwrap().bwd_keys(), 128);
        assert_eq!(bwd64_smem(128), 176128);
        assert_eq!(Tiling::parse("b8r64").unwrap().bwd_smem(128), 176128);
        assert_eq!(
            Tiling::parse("f4x2,b8,q4").unwrap().for_dim(80),
            Tiling {
                fwd: 4,
                fwd_mtiles: 1,
                bwd: 4,
                bwd_r64: false,
                dq4: false,
                fwd_wg: false,
                bwd_wg: false,
                wg_pipe: false,
            }
        );
        assert_eq!(Tiling::parse("f4x2").unwrap().fwd_smem(128), 128 * 136 * 2);
        // The wgmma forward: 128 × 128 tiles, 165 888 bytes with the alignment slack.
        assert!(wg_src.contains("constexpr int WG_BR = 128, WG_BC = 128, WG_D = 128;"));
        assert!(wg_src.contains(
            "#define WG_SMEM (1024 + 2 * (WG_BR * WG_D + 4 * WG_BC * WG_D) + 4 * 2 * WG_BC)"
        ));
        assert_eq!(Tiling::parse("wg").unwrap().fwd_smem(128), 165_888);
        // Pipelined: three V tiles, 198 656 bytes (under the 227 KiB an sm_90 block may use).
        assert!(wg_src.contains(
            "#define WG_PIPE_SMEM (1024 + 2 * (WG_BR * WG_D + 5 * WG_BC * WG_D) + 4 * 2 * WG_BC)"
        ));
        assert_eq!(Tiling::parse("wgp").unwrap().fwd_smem(128), 198_656);
        assert!(wg_src.contains(
            "#define WG_BWD_SMEM (1024 + 2 * (4 * 128 * 128 + 128 * 64) + 4 * 3 * 2 * 64)"
        ));
        assert_eq!(Tiling::parse("wg").unwrap().bwd_smem(128), 150_016);
        assert_eq!(Tiling::default().fwd_smem(128), 0);
    }

    #[test]
    fn tiling_spec() {
        assert_eq!(Tiling::parse(""), Ok(Tiling::default()));
        let t = Tiling::parse(" f4x2 , b8,q4").unwrap();
        assert_eq!((t.fwd, t.fwd_mtiles, t.bwd, t.dq4), (4, 2, 8, true));
        assert_eq!(t.fwd_rows(), 128);
        assert_eq!(t.bwd_keys(), 128);
        let t = Tiling::parse("b8r64,b4").unwrap();
        assert_eq!(
            (t.bwd, t.bwd_r64),
            (4, false),
            "the last backward item wins"
        );
        assert_eq!(
            Tiling::parse("b8r64").unwrap().for_dim(80),
            Tiling::default()
        );
        let t = Tiling::parse("f4x2,wgf").unwrap();
        assert!(
            t.fwd_wg && !t.bwd_wg && t.fwd_rows() == 128,
            "the last forward item wins"
        );
        let t = Tiling::parse("wg,f4").unwrap();
        assert!(!t.fwd_wg && t.bwd_wg && t.bwd_keys() == 128);
        assert_eq!(
            Tiling::parse("wg,q4").unwrap().for_dim(64),
            Tiling::default(),
            "no wgmma below head dim 128"
        );
        assert!(!Tiling::parse("wg,q4").unwrap().for_dim(128).dq4);
        let e = Tiling::parse("f4,x9").unwrap_err();
        assert!(e.contains("\"x9\"") && e.contains("f4x2"), "{e}");
    }
}
