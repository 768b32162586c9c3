//! Kernel benchmark (`omr bench kernels`): each op timed after warm-up with a device sync
//! around every run (median of the runs), printed as achieved TB/s (memory-bound ops) or
//! TFLOP/s (matrix-bound ops) next to its floor: the fewest bytes over the measured copy
//! bandwidth, or the FLOPs over the measured bf16 (CPU: f32) matmul rate, whichever is larger.
//!
//! The two ceilings are measured in the same run (a 512 MiB device-to-device copy counting
//! bytes read + written; an 8192³ bf16 matmul on CUDA, 1024³ f32 on the CPU), as
//! PERFORMANCE.md asks; its H100/H200 anchors (copy ≈ 3.0 / 4.3 TB/s, bf16 GEMM ≈ 790–800
//! TFLOP/s of 989 dense) are printed beside them. Inputs are seeded random values, never zeros.
//! On the CPU the sizes shrink so the whole run is a smoke test of a few seconds (small inputs
//! sit in cache there, so a CPU floor can exceed the time: only the CUDA numbers mean much).

use crate::adamw::{adamw_step, AdamWHyper};
use crate::flash_attn::{flash_attn_kernel, AttnMask};

type AttnFn = dyn Fn(&Tensor, &Tensor, &Tensor, &AttnMask, f64) -> Result<Tensor>;
use crate::grad_norm::global_grad_norm;
use crate::linear_ce::{linear_cross_entropy, LceChunks};
use crate::rotary::{mrope_tables, rotary};
use crate::{rmsnorm, swiglu};
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use std::time::Instant;

/// One timed kernel.
#[derive(Clone, Debug)]
pub struct Row {
    pub name: String,
    pub shape: String,
    pub dtype: DType,
    /// Median wall time of one call, seconds.
    pub secs: f64,
    /// Fewest bytes the op must move (each input read once, each output written once).
    pub bytes: f64,
    /// Useful floating-point operations (0 for memory-bound ops).
    pub flops: f64,
    /// max(bytes / bandwidth, flops / peak), seconds.
    pub floor_secs: f64,
}

/// The measured ceilings of the device.
#[derive(Clone, Copy, Debug)]
pub struct Ceilings {
    /// Device-to-device copy, bytes read + written per second.
    pub bandwidth: f64,
    /// Matmul FLOP/s (bf16 on CUDA, f32 on the CPU).
    pub flops: f64,
}

fn sync(dev: &Device) -> Result<()> {
    dev.synchronize()
}

/// Median seconds of `f` over `runs` runs after `warm` warm-up runs, synced each time.
fn time<T>(
    dev: &Device,
    warm: usize,
    runs: usize,
    mut f: impl FnMut() -> Result<T>,
) -> Result<f64> {
    for _ in 0..warm {
        f()?;
    }
    sync(dev)?;
    let mut ts = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t0 = Instant::now();
        let out = f()?;
        sync(dev)?;
        ts.push(t0.elapsed().as_secs_f64());
        drop(out);
    }
    ts.sort_by(f64::total_cmp);
    Ok(ts[ts.len() / 2])
}

fn rand(seed: u64, shape: &[usize], scale: f32, dtype: DType, dev: &Device) -> Result<Tensor> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(dev)
}

/// Measures the copy bandwidth and the matmul rate of `dev`.
pub fn ceilings(dev: &Device) -> Result<Ceilings> {
    let (gpu, runs) = (dev.is_cuda(), if dev.is_cuda() { 20 } else { 3 });
    let n = if gpu { 128 << 20 } else { 16 << 20 }; // f32 elements: 512 MiB / 64 MiB
    let x = rand(1, &[n], 1.0, DType::F32, dev)?;
    let t = time(dev, 2, runs, || x.copy())?;
    let bandwidth = (2 * 4 * n) as f64 / t;
    let (m, dtype) = if gpu {
        (8192, DType::BF16)
    } else {
        (1024, DType::F32)
    };
    let a = rand(2, &[m, m], 1.0, dtype, dev)?;
    let b = rand(3, &[m, m], 1.0, dtype, dev)?;
    let t = time(dev, 2, runs, || a.matmul(&b))?;
    Ok(Ceilings {
        bandwidth,
        flops: 2.0 * (m as f64).powi(3) / t,
    })
}

struct Bench<'a> {
    dev: &'a Device,
    c: Ceilings,
    rows: Vec<Row>,
    warm: usize,
    runs: usize,
}

impl Bench<'_> {
    fn add<T>(
        &mut self,
        name: &str,
        shape: String,
        dtype: DType,
        bytes: f64,
        flops: f64,
        f: impl FnMut() -> Result<T>,
    ) -> Result<()> {
        let secs = time(self.dev, self.warm, self.runs, f)?;
        let floor_secs = (bytes / self.c.bandwidth).max(flops / self.c.flops);
        self.rows.push(Row {
            name: name.into(),
            shape,
            dtype,
            secs,
            bytes,
            flops,
            floor_secs,
        });
        Ok(())
    }
}

/// Times every op on `dev` (bf16 on CUDA, f32 on the CPU): the measured ceilings and one row
/// per kernel.
pub fn run_all(dev: &Device) -> Result<(Ceilings, Vec<Row>)> {
    let gpu = dev.is_cuda();
    let c = ceilings(dev)?;
    let dt = if gpu { DType::BF16 } else { DType::F32 };
    let es = dt.size_in_bytes() as f64;
    let mut b = Bench {
        dev,
        c,
        rows: Vec::new(),
        warm: if gpu { 5 } else { 1 },
        runs: if gpu { 30 } else { 3 },
    };

    // RMSNorm and SwiGLU over a 7B model's activations (C 3584, I 18944).
    let r = if gpu { 16384 } else { 256 };
    let (cdim, idim) = (3584usize, 18944usize);
    let x = rand(10, &[r, cdim], 2.0, dt, dev)?;
    let w = (rand(11, &[cdim], 0.5, dt, dev)? + 1.0)?;
    let dy = rand(12, &[r, cdim], 1.0, dt, dev)?;
    let rc = (r * cdim) as f64;
    b.add(
        "rmsnorm fwd",
        format!("({r}, {cdim})"),
        dt,
        2.0 * rc * es,
        0.0,
        || rmsnorm::rmsnorm(&x, &w, 1e-6),
    )?;
    b.add(
        "rmsnorm bwd",
        format!("({r}, {cdim})"),
        dt,
        3.0 * rc * es,
        0.0,
        || rmsnorm::backward(&x, &w, &dy, 1e-6),
    )?;
    let ri = if gpu { 8192 } else { 64 };
    let g = rand(13, &[ri, idim], 4.0, dt, dev)?;
    let u = rand(14, &[ri, idim], 2.0, dt, dev)?;
    let dyi = rand(15, &[ri, idim], 1.0, dt, dev)?;
    let ni = (ri * idim) as f64;
    b.add(
        "swiglu fwd",
        format!("({ri}, {idim})"),
        dt,
        3.0 * ni * es,
        0.0,
        || swiglu::swiglu(&g, &u),
    )?;
    b.add(
        "swiglu bwd",
        format!("({ri}, {idim})"),
        dt,
        5.0 * ni * es,
        0.0,
        || swiglu::backward(&g, &u, &dyi),
    )?;
    b.add(
        "swiglu bwd+act",
        format!("({ri}, {idim})"),
        dt,
        6.0 * ni * es,
        0.0,
        || swiglu::backward_with_act(&g, &u, &dyi),
    )?;

    // Rotary on the queries of 8192 tokens (28 heads of 128).
    let (t, h) = if gpu { (8192, 28) } else { (256, 4) };
    let pos: [Vec<Vec<i64>>; 3] = std::array::from_fn(|_| vec![(0..t as i64).collect()]);
    let (cs, sn) = mrope_tables(&pos, &[16, 24, 24], 1e6, 128, dev)?;
    let q = rand(16, &[1, t, h, 128], 2.0, dt, dev)?;
    let nq = (t * h * 128) as f64;
    b.add(
        "rotary fwd",
        format!("(1, {t}, {h}, 128)"),
        dt,
        2.0 * nq * es + 2.0 * (t * 64 * 4) as f64,
        0.0,
        || rotary(&q, &cs, &sn),
    )?;

    // Gradient norm and AdamW over f32 gradients / masters.
    let sizes: Vec<usize> = if gpu {
        vec![152_064 * 3584, 3584 * 18944, 3584, 3584 * 512, 1280 * 3420]
    } else {
        vec![1 << 20, 4096, 100_000]
    };
    let grads: Vec<Tensor> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| rand(20 + i as u64, &[n], 1.0, DType::F32, dev))
        .collect::<Result<_>>()?;
    let total: usize = sizes.iter().sum();
    b.add(
        "grad norm",
        format!("{} tensors, {total} f32", sizes.len()),
        DType::F32,
        4.0 * total as f64,
        0.0,
        || global_grad_norm(&grads),
    )?;
    let n = if gpu { 64 << 20 } else { 1 << 20 };
    let p = rand(30, &[n], 1.0, DType::F32, dev)?;
    let m = rand(31, &[n], 0.01, DType::F32, dev)?;
    let v = (rand(32, &[n], 0.01, DType::F32, dev)?.sqr())?;
    let gr = rand(33, &[n], 1.0, DType::F32, dev)?;
    let hyp = AdamWHyper {
        lr: 1e-5,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 10,
        grad_coef: 1.0,
    };
    if !gpu {
        b.add(
            "adamw step",
            format!("({n}) f32 → bf16 copy"),
            DType::F32,
            30.0 * n as f64,
            0.0,
            || adamw_step(&p, &m, &v, Some(&gr), &hyp),
        )?;
    } else {
        // What the optimizer runs on a GPU: p, m, v and the bf16 copy written in place.
        let pb = p.to_dtype(DType::BF16)?;
        b.add(
            "adamw step in place",
            format!("({n}) f32 + bf16 copy"),
            DType::F32,
            30.0 * n as f64,
            0.0,
            || crate::adamw::adamw_step_in_place(&p, &m, &v, Some(&gr), &hyp, Some(&pb)),
        )?;
    }

    // Gradient accumulation: what every micro-batch after the second costs per parameter
    // on a GPU (an f32 sum += a bf16 gradient, 10 bytes per element); on the CPU the
    // allocating sum.
    let g16 = gr.to_dtype(DType::BF16)?;
    if gpu {
        b.add(
            "grad accumulate in place",
            format!("({n}) f32 += bf16"),
            DType::F32,
            10.0 * n as f64,
            0.0,
            || crate::grad_accum::grad_add_in_place(&m, &g16),
        )?;
    } else {
        b.add(
            "grad accumulate",
            format!("({n}) f32 + bf16"),
            DType::F32,
            10.0 * n as f64,
            0.0,
            || crate::grad_accum::grad_sum(&m, &g16),
        )?;
    }

    // The loss's tile kernels alone, on one (rows, vocab chunk) logits tile of the default
    // chunking: the statistics read it once, the gradient reads it and writes dL.
    let (tr, tv) = if gpu { (2048, 32_768) } else { (64, 4096) };
    let tile = rand(43, &[tr, tv], 8.0, dt, dev)?;
    let ttg: Vec<u32> = (0..tr as u32)
        .map(|i| 4096 + (i * 7919) % tv as u32)
        .collect();
    let ttg = Tensor::from_vec(ttg, tr, dev)?;
    let tn = (tr * tv) as f64;
    b.add(
        "ce tile stats",
        format!("({tr}, {tv})"),
        dt,
        tn * es + 16.0 * tr as f64,
        0.0,
        || crate::linear_ce::tile_stats(&tile, &ttg, 4096),
    )?;
    let st = crate::linear_ce::tile_stats(&tile, &ttg, 4096)?;
    let lse = (st.narrow(1, 0, 1)? + st.narrow(1, 1, 1)?.log()?)?.squeeze(1)?;
    b.add(
        "ce tile grad",
        format!("({tr}, {tv})"),
        dt,
        2.0 * tn * es + 8.0 * tr as f64,
        0.0,
        || crate::linear_ce::tile_grad(&tile, &ttg, &lse, 4096, 1.0),
    )?;

    // Fused linear cross-entropy, forward + gradients (Qwen2.5 vocabulary).
    let (nt, vocab) = if gpu { (4096, 151_936) } else { (64, 8192) };
    let hs = Var::from_tensor(&rand(40, &[nt, cdim], 1.0, dt, dev)?)?;
    let wl = Var::from_tensor(&rand(41, &[vocab, cdim], 0.02, dt, dev)?)?;
    let tg: Vec<u32> = (0..nt as u32).map(|i| (i * 7919) % vocab as u32).collect();
    let tg = Tensor::from_vec(tg, nt, dev)?;
    let lce_flops = 6.0 * (nt * cdim * vocab) as f64;
    let lce_bytes = ((nt + vocab) * cdim) as f64 * es * 2.0;
    b.add(
        "linear CE fwd+grads",
        format!("N {nt}, C {cdim}, V {vocab}"),
        dt,
        lce_bytes,
        lce_flops,
        || linear_cross_entropy(hs.as_tensor(), wl.as_tensor(), &tg, LceChunks::default()),
    )?;
    // The same with a frozen head (LoRA): no dW products.
    let frozen = wl.as_tensor().detach();
    b.add(
        "linear CE fwd+dH (frozen head)",
        format!("N {nt}, C {cdim}, V {vocab}"),
        dt,
        lce_bytes,
        4.0 * (nt * cdim * vocab) as f64,
        || linear_cross_entropy(hs.as_tensor(), &frozen, &tg, LceChunks::default()),
    )?;

    // GRPO's token scores: the fused linear log-prob, forward and the backward for a per-row
    // gradient (recomputes the logits tiles: 4 products of N·C·V, against the CE's 3).
    let zero_bias = Tensor::zeros(vocab, DType::F32, dev)?;
    let score = crate::linear_logp::LogpScore {
        zscale: 1.0,
        bias: zero_bias,
    };
    let gw = rand(42, &[nt], 1.0, DType::F32, dev)?;
    b.add(
        "linear logp fwd+bwd (GRPO)",
        format!("N {nt}, C {cdim}, V {vocab}"),
        dt,
        lce_bytes,
        8.0 * (nt * cdim * vocab) as f64,
        || {
            let (logp, _) = crate::linear_logp::linear_logp(
                hs.as_tensor(),
                wl.as_tensor(),
                &tg,
                &score,
                LceChunks::default(),
            )?;
            (logp * &gw)?.sum_all()?.backward()
        },
    )?;

    // Flash attention, causal, 28 query / 4 kv heads of 128.
    let (t, h, kv) = if gpu { (4096, 28, 4) } else { (256, 4, 2) };
    let qa = Var::from_tensor(&rand(50, &[1, t, h, 128], 1.0, dt, dev)?)?;
    let ka = rand(51, &[1, t, kv, 128], 1.0, dt, dev)?;
    let va = rand(52, &[1, t, kv, 128], 1.0, dt, dev)?;
    let mask = AttnMask {
        causal: true,
        ..AttnMask::default()
    };
    let fwd_flops = 4.0 * (t * t * h * 128) as f64 / 2.0;
    let io = ((2 * t * h + 2 * t * kv) * 128) as f64 * es;
    let scale = 1.0 / (128f64).sqrt();
    let mut paths: Vec<(String, Box<AttnFn>)> = vec![
        ("kernel".to_string(), Box::new(flash_attn_kernel)),
        ("gemm".to_string(), Box::new(crate::gemm_attn::gemm_attn)),
    ];
    if crate::flash_mma::supported(qa.as_tensor(), &ka, scale) {
        use crate::flash_mma::{flash_mma_tiled, Tiling};
        // The default tiling and the others OMR_MMA can choose (flash_mma::Tiling).
        for spec in [
            "",
            "f8,b8",
            "f8",
            "f4x2",
            "q4",
            "b8,q4",
            "b8r64",
            "b8r64,q4",
            "f4x2,b8r64,q4",
            "wgf",
            "wgp",
            "wgb",
            "wg",
            "wgp,wgb",
        ] {
            if spec.starts_with("wg") && !crate::flash_mma::wgmma_runs(qa.device()) {
                continue;
            }
            let tiling = Tiling::parse(spec).map_err(candle_core::Error::msg)?;
            let name = if spec.is_empty() {
                "mma".to_string()
            } else {
                format!("mma {spec}")
            };
            paths.push((
                name,
                Box::new(move |q, k, v, m, s| flash_mma_tiled(q, k, v, m, s, tiling)),
            ));
        }
    }
    for (path, attn) in paths {
        b.add(
            &format!("attn {path} fwd"),
            format!("(1, {t}, {h}/{kv}, 128) causal"),
            dt,
            io,
            fwd_flops,
            || attn(qa.as_tensor(), &ka, &va, &mask, scale),
        )?;
        b.add(
            &format!("attn {path} fwd+bwd"),
            format!("(1, {t}, {h}/{kv}, 128) causal"),
            dt,
            2.0 * io,
            3.5 * fwd_flops,
            || {
                attn(qa.as_tensor(), &ka, &va, &mask, scale)?
                    .sum_all()?
                    .backward()
            },
        )?;
    }
    // A decoding step as generation runs it (the 3B model's 16 query / 2 kv heads): one query
    // per row over S cached keys, a view of a longer buffer (the key/value cache written in
    // place). Memory-bound: the floor is reading K and V once.
    let (rows, s_, cap, h, kv) = if gpu {
        (64, 4096, 4352, 16, 2)
    } else {
        (4, 256, 320, 4, 2)
    };
    let qd = rand(53, &[rows, 1, h, 128], 1.0, dt, dev)?;
    let kb = rand(54, &[rows, cap, kv, 128], 1.0, dt, dev)?;
    let vb = rand(55, &[rows, cap, kv, 128], 1.0, dt, dev)?;
    let (kd, vd) = (kb.narrow(1, 0, s_)?, vb.narrow(1, 0, s_)?);
    let decode_bytes = ((2 * rows * s_ * kv + 2 * rows * h) * 128) as f64 * es;
    let decode_flops = 4.0 * (rows * h * s_ * 128) as f64;
    let decode = || crate::flash_attn::flash_attn(&qd, &kd, &vd, &mask, scale);
    b.add(
        "attn decode step (cache view)",
        format!("({rows}, 1 over {s_}, {h}/{kv}, 128)"),
        dt,
        decode_bytes,
        decode_flops,
        decode,
    )?;
    // The same without the key-range splits: one block per row group and kv head.
    b.add(
        "attn decode step, unsplit",
        format!("({rows}, 1 over {s_}, {h}/{kv}, 128)"),
        dt,
        decode_bytes,
        decode_flops,
        || crate::flash_attn::with_splits(1, decode),
    )?;
    Ok((c, b.rows))
}

/// The table `run_all` results are printed as, ceilings first.
pub fn format(dev: &Device, c: &Ceilings, rows: &[Row]) -> String {
    let mut s = String::new();
    let kind = if dev.is_cuda() { "CUDA" } else { "CPU" };
    s += &format!(
        "{kind} ceilings measured: copy {}, matmul {} (anchors: H100 3.0 TB/s, H200 4.3 TB/s, bf16 GEMM 790-800 of 989 TFLOP/s)\n",
        bandwidth(c.bandwidth),
        rate(c.flops)
    );
    s += "| kernel | shape | dtype | median | achieved | floor | floor/median |\n|---|---|---|---|---|---|---|\n";
    for r in rows {
        let achieved = if r.flops > 0.0 {
            rate(r.flops / r.secs)
        } else {
            bandwidth(r.bytes / r.secs)
        };
        s += &format!(
            "| {} | {} | {:?} | {:.3} ms | {} | {:.3} ms | {:.0}% |\n",
            r.name,
            r.shape,
            r.dtype,
            r.secs * 1e3,
            achieved,
            r.floor_secs * 1e3,
            100.0 * r.floor_secs / r.secs
        );
    }
    s
}

/// Bytes per second as TB/s (GB/s below 0.1 TB/s: CPU runs).
fn bandwidth(b: f64) -> String {
    if b >= 1e11 {
        format!("{:.3} TB/s", b / 1e12)
    } else {
        format!("{:.1} GB/s", b / 1e9)
    }
}

/// FLOP/s as TFLOP/s (GFLOP/s below 0.1 TFLOP/s: CPU runs).
fn rate(f: f64) -> String {
    if f >= 1e11 {
        format!("{:.1} TFLOP/s", f / 1e12)
    } else {
        format!("{:.1} GFLOP/s", f / 1e9)
    }
}
