//! Flash attention against the naive attention of `omr_model::attention` (dense scores, an
//! additive bias, softmax), in output and in dQ, dK, dV (candle autograd through the naive
//! composition): packed causal text with padding and GQA (head dim 64), the vision tower's
//! block-diagonal attention (`attend_blocks`, head dim 80), queries after a cache (T < S) with
//! head dim 128, and a sliding window (naive bias built here).
//!
//! Tolerances (max |a−b| / max |ref|) on non-padding rows: f32 1e-5 (online softmax vs
//! one-pass softmax); bf16 3e-2 against the f32 naive attention on the same rounded inputs;
//! CUDA vs CPU 1e-4 f32, 3e-2 bf16.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::{accel, check, rand};
use omr_kernels::flash_attn::{flash_attn, AttnMask};

struct Case {
    b: usize,
    t: usize,
    s: usize,
    h: usize,
    kv: usize,
    d: usize,
    /// Per batch row, the segment of each key (queries are the last T keys).
    segs: Vec<Vec<u32>>,
    causal: bool,
    window: usize,
}

impl Case {
    fn mask(&self, dev: &Device) -> Result<AttnMask> {
        let k: Vec<u32> = self.segs.concat();
        let q: Vec<u32> = self
            .segs
            .iter()
            .flat_map(|r| r[self.s - self.t..].to_vec())
            .collect();
        Ok(AttnMask {
            causal: self.causal,
            window: self.window,
            q_seg: Some(Tensor::from_slice(&q, (self.b, self.t), dev)?),
            k_seg: Some(Tensor::from_slice(&k, (self.b, self.s), dev)?),
            // Every other mask plans from the host ids, the rest from the device's.
            host: (self.b + self.t)
                .is_multiple_of(2)
                .then(|| std::sync::Arc::new((q, k))),
            plans: Default::default(),
        })
    }

    /// The additive bias (B, 1, T, S) of the mask, built directly from its definition.
    fn bias(&self) -> Result<Tensor> {
        let (t, s) = (self.t, self.s);
        let mut out = vec![f32::MIN; self.b * t * s];
        for (bi, seg) in self.segs.iter().enumerate() {
            for ti in 0..t {
                let qp = s - t + ti;
                for si in 0..s {
                    let ok = seg[qp] != 0
                        && seg[si] == seg[qp]
                        && (!self.causal || si <= qp)
                        && (self.window == 0 || qp - si.min(qp) < self.window);
                    if ok {
                        out[(bi * t + ti) * s + si] = 0.0;
                    }
                }
            }
        }
        Tensor::from_vec(out, (self.b, 1, t, s), &Device::Cpu)
    }

    /// 1 on rows whose query attends something (B, T, 1, 1).
    fn live(&self) -> Result<Tensor> {
        let v: Vec<f32> = self
            .segs
            .iter()
            .flat_map(|r| r[self.s - self.t..].iter().map(|&x| (x != 0) as u8 as f32))
            .collect();
        Tensor::from_vec(v, (self.b, self.t, 1, 1), &Device::Cpu)
    }
}

/// (o, dq, dk, dv) of the loss Σ o·r (r zero on padding rows) through `f`.
fn grads(q: &Var, k: &Var, v: &Var, r: &Tensor, o: Tensor) -> Result<[Tensor; 4]> {
    let g = (o.to_dtype(DType::F32)? * r)?.sum_all()?.backward()?;
    let get = |x: &Var| g.get(x.as_tensor()).expect("grad").clone();
    Ok([o, get(q), get(k), get(v)])
}

fn inputs(c: &Case, dtype: DType, seed: u64) -> Result<(Var, Var, Var, Tensor)> {
    let q = Var::from_tensor(&rand(seed, &[c.b, c.t, c.h, c.d], 1.5, dtype)?)?;
    let k = Var::from_tensor(&rand(seed + 1, &[c.b, c.s, c.kv, c.d], 1.5, dtype)?)?;
    let v = Var::from_tensor(&rand(seed + 2, &[c.b, c.s, c.kv, c.d], 1.0, dtype)?)?;
    let r = rand(seed + 3, &[c.b, c.t, c.h, c.d], 1.0, DType::F32)?.broadcast_mul(&c.live()?)?;
    Ok((q, k, v, r))
}

type Attn = fn(&Tensor, &Tensor, &Tensor, &AttnMask, f64) -> Result<Tensor>;

fn fused(c: &Case, q: &Var, k: &Var, v: &Var, r: &Tensor) -> Result<[Tensor; 4]> {
    fused_with(flash_attn, c, q, k, v, r)
}

fn fused_with(attn: Attn, c: &Case, q: &Var, k: &Var, v: &Var, r: &Tensor) -> Result<[Tensor; 4]> {
    let o = attn(
        q.as_tensor(),
        k.as_tensor(),
        v.as_tensor(),
        &c.mask(q.device())?,
        1.0 / (c.d as f64).sqrt(),
    )?;
    grads(q, k, v, &r.to_device(q.device())?, o)
}

/// The naive attention (`attend`) on f32 copies: (B, T, H, D) outputs, zero on padding rows.
fn naive(c: &Case, q: &Var, k: &Var, v: &Var, r: &Tensor) -> Result<[Tensor; 4]> {
    let f = |x: &Var| -> Result<Var> { Var::from_tensor(&x.to_dtype(DType::F32)?) };
    let (q, k, v) = (f(q)?, f(k)?, f(v)?);
    let tr = |x: &Var| x.as_tensor().transpose(1, 2)?.contiguous();
    let o = omr_model::attention::attend(&tr(&q)?, &tr(&k)?, &tr(&v)?, &c.bias()?)?
        .reshape((c.b, c.t, c.h, c.d))?
        .broadcast_mul(&c.live()?)?;
    grads(&q, &k, &v, r, o)
}

fn compare(name: &str, c: &Case, dtype: DType, tol: f64, seed: u64) -> Result<()> {
    compare_with(flash_attn, name, c, dtype, tol, seed)
}

fn compare_with(attn: Attn, name: &str, c: &Case, dtype: DType, tol: f64, seed: u64) -> Result<()> {
    let (q, k, v, r) = inputs(c, dtype, seed)?;
    let got = fused_with(attn, c, &q, &k, &v, &r)?;
    let want = naive(c, &q, &k, &v, &r)?;
    let live = c.live()?;
    for (i, what) in ["o", "dq", "dk", "dv"].iter().enumerate() {
        // Padding rows: o is 0 here and a uniform average in the naive version; mask both.
        let (a, b) = if i == 0 {
            (
                got[0].to_dtype(DType::F32)?.broadcast_mul(&live)?,
                want[0].clone(),
            )
        } else {
            (got[i].clone(), want[i].clone())
        };
        check(&format!("flash {name} {dtype:?} {what}"), &a, &b, tol)?;
    }
    Ok(())
}

fn packed_text() -> Case {
    let row0: Vec<u32> = [vec![1; 13], vec![2; 20], vec![0; 4]].concat();
    let row1: Vec<u32> = [vec![1; 30], vec![2; 7]].concat();
    Case {
        b: 2,
        t: 37,
        s: 37,
        h: 4,
        kv: 2,
        d: 64,
        segs: vec![row0, row1],
        causal: true,
        window: 0,
    }
}

fn after_cache() -> Case {
    Case {
        b: 1,
        t: 5,
        s: 45,
        h: 4,
        kv: 1,
        d: 128,
        segs: vec![vec![1; 45]],
        causal: true,
        window: 0,
    }
}

fn windowed() -> Case {
    Case {
        b: 1,
        t: 70,
        s: 70,
        h: 2,
        kv: 2,
        d: 64,
        segs: vec![vec![1; 70]],
        causal: true,
        window: 9,
    }
}

#[test]
fn packed_causal_gqa() -> Result<()> {
    let c = packed_text();
    // The naive bias of the model for this layout is the one built here (same rule).
    let model_bias = omr_model::attention::bias(&c.segs, c.t, &Device::Cpu)?;
    let live = c
        .live()?
        .squeeze(3)?
        .squeeze(2)?
        .unsqueeze(1)?
        .unsqueeze(3)?;
    check(
        "bias agrees with omr_model::attention::bias",
        &model_bias.broadcast_mul(&live)?,
        &c.bias()?.broadcast_mul(&live)?,
        1e-30,
    )?;
    compare("packed", &c, DType::F32, 1e-5, 100)?;
    compare("packed", &c, DType::BF16, 3e-2, 110)
}

/// The blockwise-GEMM attention (what CUDA runs) on every case of the kernel, plus a longer
/// packed causal row that spans several query blocks (8 blocks of 64 rows: the causal span
/// and the segment spans narrow each block's keys).
#[test]
fn gemm_attention_matches_naive() -> Result<()> {
    let g: Attn = omr_kernels::gemm_attn::gemm_attn;
    compare_with(g, "gemm packed", &packed_text(), DType::F32, 1e-5, 100)?;
    compare_with(g, "gemm packed", &packed_text(), DType::BF16, 3e-2, 110)?;
    compare_with(g, "gemm cache", &after_cache(), DType::F32, 1e-5, 120)?;
    compare_with(g, "gemm window", &windowed(), DType::F32, 1e-5, 130)?;
    let long = Case {
        b: 2,
        t: 500,
        s: 500,
        h: 4,
        kv: 2,
        d: 80,
        segs: vec![
            [vec![1; 130], vec![2; 250], vec![3; 100], vec![0; 20]].concat(),
            [vec![5; 400], vec![6; 100]].concat(),
        ],
        causal: true,
        window: 0,
    };
    compare_with(g, "gemm long packed", &long, DType::F32, 1e-5, 140)?;
    let blocks = Case {
        causal: false,
        segs: vec![[vec![1; 64], vec![2; 64], vec![3; 64]].concat()],
        b: 1,
        t: 192,
        s: 192,
        h: 2,
        kv: 2,
        d: 80,
        window: 0,
    };
    compare_with(g, "gemm vision blocks", &blocks, DType::F32, 1e-5, 150)
}

#[test]
fn queries_after_cache_d128() -> Result<()> {
    compare("cache", &after_cache(), DType::F32, 1e-5, 120)
}

#[test]
fn sliding_window() -> Result<()> {
    compare("window", &windowed(), DType::F32, 1e-5, 130)
}

#[test]
fn vision_blocks_match_attend_blocks() -> Result<()> {
    // Three images / windows of 16, 20 and 14 patches, 2 heads of 80, no causality.
    let cu = [0usize, 16, 36, 50];
    let (n, h, d) = (50, 2, 80);
    let seg: Vec<u32> = (0..n)
        .map(|i| {
            cu.windows(2)
                .position(|w| (w[0]..w[1]).contains(&i))
                .unwrap() as u32
                + 1
        })
        .collect();
    let c = Case {
        b: 1,
        t: n,
        s: n,
        h,
        kv: h,
        d,
        segs: vec![seg],
        causal: false,
        window: 0,
    };
    let (q, k, v, r) = inputs(&c, DType::F32, 140)?;
    let got = fused(&c, &q, &k, &v, &r)?;
    let sq = |x: &Var| x.as_tensor().squeeze(0);
    let o = omr_model::attention::attend_blocks(&sq(&q)?, &sq(&k)?, &sq(&v)?, &cu)?
        .reshape((1, n, h, d))?;
    let want = grads(&q, &k, &v, &r, o)?;
    for (i, what) in ["o", "dq", "dk", "dv"].iter().enumerate() {
        check(&format!("flash vision {what}"), &got[i], &want[i], 1e-5)?;
    }
    Ok(())
}

#[test]
fn cuda_matches_cpu() -> Result<()> {
    for dev in accel() {
        for c in [packed_text(), after_cache(), windowed()] {
            for (dtype, tol) in [(DType::F32, 1e-4), (DType::BF16, 3e-2)] {
                let (q, k, v, r) = inputs(&c, dtype, 150)?;
                let cpu = fused(&c, &q, &k, &v, &r)?;
                let on = |x: &Var| -> Result<Var> { Var::from_tensor(&x.to_device(&dev)?) };
                let gpu = fused(&c, &on(&q)?, &on(&k)?, &on(&v)?, &r)?;
                for (i, what) in ["o", "dq", "dk", "dv"].iter().enumerate() {
                    check(
                        &format!("flash cuda {dtype:?} d{} {what}", c.d),
                        &gpu[i],
                        &cpu[i],
                        tol,
                    )?;
                }
            }
        }
    }
    Ok(())
}

/// The decoding kernel's key-range splits: one wave of blocks when the rows leave the device
/// idle, never under 8 key tiles (256 keys) a split, none when the rows fill a wave.
#[test]
fn decoding_splits_fill_one_wave() {
    use omr_kernels::flash_attn::splits_for;
    // 64 rows of the 3B model (2 kv heads, 8 heads a group: one row block each) on an H100
    // (132 multiprocessors × 5 resident blocks), 4096 keys.
    assert_eq!(splits_for(128, 660, 4096), 6);
    // 128 rows of the 7B model (4 kv heads): two splits.
    assert_eq!(splits_for(512, 660, 4096), 2);
    // Rows enough for a wave, or keys too few for two splits of 8 tiles.
    assert_eq!(splits_for(1024, 660, 4096), 1);
    assert_eq!(splits_for(128, 660, 300), 1);
    // A single row: as many splits as 8-tile chunks allow.
    assert_eq!(splits_for(2, 660, 8192), 32);
    assert_eq!(splits_for(0, 660, 8192), 1);
}
