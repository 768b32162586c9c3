//! CUDA-vs-CPU correctness pass of every op, run by `omr bench kernels` before the timings, so
//! that one binary copied to a GPU machine (which has no Rust toolchain) checks and times the
//! kernels in one call. The same comparisons as the `cuda_matches_cpu` tests, on seeded random
//! inputs at sizes that span several blocks and partial tiles: forward values and gradients,
//! measured as max |cuda − cpu| / max |cpu| against one tolerance per dtype, the loosest of
//! the tests' CUDA-vs-CPU bounds (kernels/README.md): 1e-4 f32, 3e-2 bf16; the grad norm
//! 1e-12; AdamW bit-identical (tolerance 0).

use crate::adamw::{adamw_step, AdamWHyper};
use crate::flash_attn::AttnMask;
use crate::grad_norm::global_grad_norm;
use crate::linear_ce::{linear_cross_entropy, LceChunks};
use crate::linear_logp::{linear_logp, LogpScore};
use crate::rotary::{mrope_tables, rotary, rotary_inverse};
use crate::{rmsnorm, swiglu};
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};

mod attention;
use attention::{attention_checks, decode_checks, long_segment_checks};

/// One comparison: the measured error and its tolerance.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: String,
    pub err: f64,
    pub tol: f64,
}

impl Check {
    pub fn ok(&self) -> bool {
        self.err <= self.tol
    }
}

fn rand(seed: u64, shape: &[usize], scale: f32, dtype: DType) -> Result<Tensor> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)
}

/// max |a − b| / max |b| in f64 (NaN if anything is not finite).
pub fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let f = |t: &Tensor| -> Result<Vec<f64>> {
        t.to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1()
    };
    let (a, b) = (f(a)?, f(b)?);
    if a.len() != b.len() {
        return Ok(f64::NAN);
    }
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    let mut worst = 0f64;
    for (x, y) in a.iter().zip(&b) {
        let d = (x - y).abs();
        if !d.is_finite() {
            return Ok(f64::NAN);
        }
        worst = worst.max(d);
    }
    Ok(worst / scale)
}

struct Checks<'a> {
    dev: &'a Device,
    out: Vec<Check>,
    /// CPU results kept for [`Checks::cmp_shared`], by case.
    reference: std::collections::HashMap<String, Vec<Tensor>>,
}

impl Checks<'_> {
    /// Compares `f` run on CUDA copies of `inputs` with `f` on the CPU inputs, output by output.
    fn cmp(
        &mut self,
        name: &str,
        tol: f64,
        inputs: &[&Tensor],
        f: impl Fn(&[Tensor]) -> Result<Vec<Tensor>>,
    ) -> Result<()> {
        self.cmp_shared(name, None, tol, inputs, f)
    }

    /// [`Checks::cmp`] whose CPU result is computed once per `case` and kept: the paths
    /// compared in the same case (several CUDA variants of one op) share it.
    fn cmp_shared(
        &mut self,
        name: &str,
        case: Option<&str>,
        tol: f64,
        inputs: &[&Tensor],
        f: impl Fn(&[Tensor]) -> Result<Vec<Tensor>>,
    ) -> Result<()> {
        let cpu_in: Vec<Tensor> = inputs.iter().map(|t| (*t).clone()).collect();
        let want = match case.and_then(|c| self.reference.get(c)) {
            Some(w) => w.clone(),
            None => {
                let w = f(&cpu_in)?;
                if let Some(c) = case {
                    self.reference.insert(c.to_string(), w.clone());
                }
                w
            }
        };
        let dev_in: Vec<Tensor> = inputs
            .iter()
            .map(|t| t.to_device(self.dev))
            .collect::<Result<_>>()?;
        let got = f(&dev_in)?;
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let err = rel_err(g, w)?;
            self.out.push(Check {
                name: format!("{name} [{i}]"),
                err: if err.is_nan() { f64::INFINITY } else { err },
                tol,
            });
        }
        Ok(())
    }
}

/// Every op, f32 and bf16, on `dev` against the CPU reference. Empty on the CPU itself.
pub fn check_all(dev: &Device) -> Result<Vec<Check>> {
    if !dev.is_cuda() {
        return Ok(Vec::new());
    }
    compare_on(dev)
}

/// The comparisons of [`check_all`] on any device (on the CPU they compare the reference
/// with itself: every error is 0, which `tests/check.rs` uses to exercise this file).
pub fn compare_on(dev: &Device) -> Result<Vec<Check>> {
    let mut c = Checks {
        dev,
        out: Vec::new(),
        reference: Default::default(),
    };
    for (dt, name, tol) in [(DType::F32, "f32", 1e-4), (DType::BF16, "bf16", 3e-2)] {
        let x = rand(1, &[67, 3584], 2.0, dt)?;
        let w = (rand(2, &[3584], 0.5, DType::F32)? + 1.0)?.to_dtype(dt)?;
        let dy = rand(3, &[67, 3584], 1.0, dt)?;
        c.cmp(&format!("rmsnorm fwd {name}"), tol, &[&x, &w], |t| {
            Ok(vec![rmsnorm::rmsnorm(&t[0], &t[1], 1e-6)?])
        })?;
        c.cmp(&format!("rmsnorm bwd {name}"), tol, &[&x, &w, &dy], |t| {
            let (a, b) = rmsnorm::backward(&t[0], &t[1], &t[2], 1e-6)?;
            Ok(vec![a, b])
        })?;
        let g = rand(4, &[33, 18944], 6.0, dt)?;
        let u = rand(5, &[33, 18944], 2.0, dt)?;
        let dyi = rand(6, &[33, 18944], 1.0, dt)?;
        c.cmp(&format!("swiglu fwd {name}"), tol, &[&g, &u], |t| {
            Ok(vec![swiglu::swiglu(&t[0], &t[1])?])
        })?;
        c.cmp(&format!("swiglu bwd {name}"), tol, &[&g, &u, &dyi], |t| {
            let (a, b) = swiglu::backward(&t[0], &t[1], &t[2])?;
            Ok(vec![a, b])
        })?;
        c.cmp(
            &format!("swiglu bwd+act {name}"),
            tol,
            &[&g, &u, &dyi],
            |t| {
                let (a, b, y) = swiglu::backward_with_act(&t[0], &t[1], &t[2])?;
                Ok(vec![a, b, y])
            },
        )?;
        let sizes = [91usize, 1, 300, 70_000, 3 << 20];
        let gs: Vec<Tensor> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| rand(10 + i as u64, &[n], 3.0, dt))
            .collect::<Result<_>>()?;
        let refs: Vec<&Tensor> = gs.iter().collect();
        c.cmp(&format!("grad norm {name}"), 1e-12, &refs, |t| {
            Ok(vec![global_grad_norm(t)?])
        })?;
        let pos: [Vec<Vec<i64>>; 3] =
            std::array::from_fn(|a| vec![(0..300i64).map(|i| i + a as i64).collect()]);
        let (cs, sn) = mrope_tables(&pos, &[16, 24, 24], 1e6, 128, &Device::Cpu)?;
        let q = rand(20, &[1, 300, 28, 128], 2.0, dt)?;
        c.cmp(&format!("rotary fwd {name}"), tol, &[&q, &cs, &sn], |t| {
            Ok(vec![rotary(&t[0], &t[1], &t[2])?])
        })?;
        c.cmp(&format!("rotary bwd {name}"), tol, &[&q, &cs, &sn], |t| {
            Ok(vec![rotary_inverse(&t[0], &t[1], &t[2])?])
        })?;
        let h = rand(30, &[300, 256], 1.0, dt)?;
        let wl = rand(31, &[5000, 256], 0.2, dt)?;
        let tg = Tensor::from_vec(
            (0..300u32)
                .map(|i| (i * 7919 + 13) % 5000)
                .collect::<Vec<_>>(),
            300,
            &Device::Cpu,
        )?;
        // Vocabulary chunks of 2048 take the kernels' 16-byte path, of 1001 the one-element
        // path (1001 columns, v0 not a multiple of 4).
        // Kept tiles (the default budget) on the 2048-wide blocks, recomputed ones on the odd.
        for (vocab, keep_bytes, tiles) in [(2048, 1 << 30, ""), (1001, 0, ", odd tiles")] {
            c.cmp(
                &format!("linear CE {name}{tiles}"),
                tol,
                &[&h, &wl, &tg],
                |t| {
                    let hv = Var::from_tensor(&t[0])?;
                    let wv = Var::from_tensor(&t[1])?;
                    let chunks = LceChunks {
                        rows: 128,
                        vocab,
                        keep_bytes,
                    };
                    let loss = linear_cross_entropy(hv.as_tensor(), wv.as_tensor(), &t[2], chunks)?;
                    // A scale ≠ 1 on the loss: the backward's in-place scale does something.
                    let g = (&loss * 0.37)?.backward()?;
                    Ok(vec![
                        loss,
                        g.get(hv.as_tensor()).expect("dh").clone(),
                        g.get(wv.as_tensor()).expect("dw").clone(),
                    ])
                },
            )?;
        }
        // GRPO's token scores: temperature 0.7, every 13th id suppressed (none a target),
        // a per-row incoming gradient; outputs logp, entropy, dh, dw.
        let bias: Vec<f32> = (0..5000u32)
            .map(|j| if j % 13 == 6 { -1e30 } else { 0.0 })
            .collect();
        let bias = Tensor::from_vec(bias, 5000, &Device::Cpu)?;
        let tg_lp = Tensor::from_vec(
            (0..300u32)
                .map(|i| (i * 7919 + 13) % 5000)
                .map(|t| if t % 13 == 6 { t + 1 } else { t })
                .collect::<Vec<_>>(),
            300,
            &Device::Cpu,
        )?;
        let gw = rand(32, &[300], 1.0, DType::F32)?;
        for (vocab, tiles) in [(2048, ""), (1001, ", odd tiles")] {
            let inputs = [&h, &wl, &tg_lp, &bias, &gw];
            c.cmp(&format!("linear logp {name}{tiles}"), tol, &inputs, |t| {
                let hv = Var::from_tensor(&t[0])?;
                let wv = Var::from_tensor(&t[1])?;
                let score = LogpScore {
                    zscale: 1.0 / 0.7,
                    bias: t[3].clone(),
                };
                let chunks = LceChunks {
                    rows: 128,
                    vocab,
                    ..LceChunks::default()
                };
                let (logp, entropy) =
                    linear_logp(hv.as_tensor(), wv.as_tensor(), &t[2], &score, chunks)?;
                let g = (&logp * &t[4])?.sum_all()?.backward()?;
                Ok(vec![
                    logp,
                    entropy,
                    g.get(hv.as_tensor()).expect("dh").clone(),
                    g.get(wv.as_tensor()).expect("dw").clone(),
                ])
            })?;
        }
        // Sampling on the device: the draws and their log-probabilities against the CPU
        // reference (same hash, same comparisons; one flipped near-tie of the logarithms
        // allowed in the 300 rows).
        let keys: Vec<u64> = (0..300u64).map(|r| crate::sample::key(5, r, 2)).collect();
        let logits = rand(33, &[300, 5000], 4.0, dt)?;
        let (tc, lc) = crate::sample::gumbel_sample(&logits, &bias, &keys, 1.0 / 0.7)?;
        let (td, ld) = crate::sample::gumbel_sample(
            &logits.to_device(c.dev)?,
            &bias.to_device(c.dev)?,
            &keys,
            1.0 / 0.7,
        )?;
        let differ = tc.iter().zip(&td).filter(|(a, b)| a != b).count();
        c.out.push(Check {
            name: format!("gumbel sample {name}: draws differing (fraction)"),
            err: differ as f64 / tc.len() as f64,
            tol: 1.0 / 300.0,
        });
        let same: Vec<(f32, f32)> = lc
            .iter()
            .zip(&ld)
            .zip(tc.iter().zip(&td))
            .filter(|(_, (a, b))| a == b)
            .map(|((x, y), _)| (*x, *y))
            .collect();
        let (a, b): (Vec<f32>, Vec<f32>) = same.into_iter().unzip();
        let n = a.len();
        c.out.push(Check {
            name: format!("gumbel sample {name}: log-probs"),
            err: rel_err(
                &Tensor::from_vec(b, n, &Device::Cpu)?,
                &Tensor::from_vec(a, n, &Device::Cpu)?,
            )?,
            tol,
        });
        attention_checks(&mut c, dt, name, tol, &["kernel", "gemm", "mma"])?;
        decode_checks(&mut c, dt, name, tol)?;
    }
    long_segment_checks(&mut c, &["gemm", "mma"])?;
    // AdamW: bit-identical (tolerance 0), f32 and bf16 gradients, with and without a gradient.
    let p = rand(50, &[1 << 20], 1.0, DType::F32)?;
    let m = rand(51, &[1 << 20], 0.01, DType::F32)?;
    let v = rand(52, &[1 << 20], 0.01, DType::F32)?.sqr()?;
    let g = rand(53, &[1 << 20], 1.0, DType::F32)?;
    let h = AdamWHyper {
        lr: 3e-4,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 7,
        grad_coef: 0.37,
    };
    for (name, gt) in [
        ("f32 grad", Some(g.clone())),
        ("bf16 grad", Some(g.to_dtype(DType::BF16)?)),
        ("no grad", None),
    ] {
        let mut ins = vec![&p, &m, &v];
        if let Some(gt) = &gt {
            ins.push(gt);
        }
        c.cmp(&format!("adamw {name}"), 0.0, &ins, |t| {
            let o = adamw_step(&t[0], &t[1], &t[2], t.get(3), &h)?;
            Ok(vec![o.p, o.m, o.v, o.p_bf16])
        })?;
        // The optimizer's in-place step on the GPU against the reference on the CPU.
        c.cmp(&format!("adamw in place {name}"), 0.0, &ins, |t| {
            if t[0].device().is_cpu() {
                let o = adamw_step(&t[0], &t[1], &t[2], t.get(3), &h)?;
                return Ok(vec![o.p, o.m, o.v, o.p_bf16]);
            }
            let (p, m, v) = (t[0].copy()?, t[1].copy()?, t[2].copy()?);
            let pb = p.to_dtype(DType::BF16)?;
            crate::adamw::adamw_step_in_place(&p, &m, &v, t.get(3), &h, Some(&pb))?;
            Ok(vec![p, m, v, pb])
        })?;
    }
    // Gradient accumulation (the optimizer's micro-batch sums): a new f32 sum from each
    // dtype pair, and the add in place into an f32 sum that every later micro-batch does on a
    // GPU, bit for bit.
    let ga = rand(54, &[1 << 20], 1.0, DType::F32)?;
    let gb = rand(55, &[1 << 20], 1.0, DType::F32)?;
    let (ga16, gb16) = (ga.to_dtype(DType::BF16)?, gb.to_dtype(DType::BF16)?);
    for (name, a, b) in [
        ("f32 + f32", &ga, &gb),
        ("f32 + bf16", &ga, &gb16),
        ("bf16 + f32", &ga16, &gb),
        ("bf16 + bf16", &ga16, &gb16),
    ] {
        c.cmp(&format!("grad sum {name}"), 0.0, &[a, b], |t| {
            Ok(vec![crate::grad_accum::grad_sum(&t[0], &t[1])?])
        })?;
    }
    for (name, g) in [("f32", &gb), ("bf16", &gb16)] {
        c.cmp(
            &format!("grad add in place, {name} grad"),
            0.0,
            &[&ga, g],
            |t| {
                if t[0].device().is_cpu() {
                    return Ok(vec![crate::grad_accum::grad_sum(&t[0], &t[1])?]);
                }
                let sum = t[0].copy()?;
                crate::grad_accum::grad_add_in_place(&sum, &t[1])?;
                Ok(vec![sum])
            },
        )?;
    }
    // The tensor-core tilings not yet verified on a GPU last (OMR_MMA; every entry point that
    // is not the default): a fault in them cannot hide the other checks. Their CPU
    // references are the ones computed above.
    let tilings = [
        "mma:f8,b8",
        "mma:f4x2,q4",
        "mma:b8,q4",
        "mma:b8r64",
        "mma:b8r64,q4",
    ];
    attention_checks(&mut c, DType::BF16, "bf16", 3e-2, &tilings)?;
    long_segment_checks(&mut c, &tilings)?;
    // The wgmma kernels (sm_90a) last of all, after their layout probe: GEMMs through the same
    // shared-memory layouts, descriptors and fragments (a fault in the probe names the layout).
    if crate::flash_mma::wgmma_runs(c.dev) {
        let a = rand(70, &[64, 128], 1.0, DType::BF16)?;
        let bk = rand(71, &[128, 128], 1.0, DType::BF16)?;
        c.cmp(
            "wgmma probe (a·bkᵀ, a·bk, bk[64..]·aᵀ, bk[..64,..64]·a, bk[..,..64]ᵀ·bk[..,64..])",
            1e-4,
            &[&a, &bk],
            |t| crate::flash_mma::wgmma_probe(&t[0], &t[1]),
        )?;
        // Forward alone (default backward; plain and pipelined), backward alone, both.
        let wg = ["mma:wgf", "mma:wgp", "mma:wgb", "mma:wg"];
        attention_checks(&mut c, DType::BF16, "bf16", 3e-2, &wg)?;
        long_segment_checks(&mut c, &wg)?;
    }
    Ok(c.out)
}

/// The checks as a table, failures marked.
pub fn format(checks: &[Check]) -> String {
    let mut s = String::from("| check (CUDA vs CPU) | max rel err | tol | |\n|---|---|---|---|\n");
    for c in checks {
        s += &format!(
            "| {} | {:.3e} | {:.0e} | {} |\n",
            c.name,
            c.err,
            c.tol,
            if c.ok() { "ok" } else { "FAIL" }
        );
    }
    s
}
