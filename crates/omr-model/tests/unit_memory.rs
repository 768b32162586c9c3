//! What the decoder layer's (and a vision block's) halves keep from their forward to their
//! backward, measured: live heap bytes (a counting global allocator; this test binary holds
//! one test, so nothing else allocates meanwhile) after the forward.
//!
//! The MLP half, for
//! - the fused ops: RMSNorm, `swiglu_mlp`, `linear_residual` (which keeps the (rows, I)
//!   activation for the down projection's weight gradient);
//! - `swiglu_mlp_residual` after the RMSNorm op (the activation recomputed in the backward);
//! - `decoder_mlp` (the norm's (rows, C) output recomputed too).
//!
//! Each must keep that much less than the one before (to within the units' own
//! bookkeeping), and all three give the same loss and gradients. Measured (rows 96, C 128,
//! I 1024, f32): 1 280 592 B, 887 543 B and 838 263 B, for a 393 216 B activation and a
//! 49 152 B norm output.
//!
//! The attention half, the fused ops (RMSNorm, `linear_op_to` ×3, rotary ×2, flash
//! attention, `linear_residual`) against `decoder_attention`, which keeps neither the norm's
//! output nor the pre-rotary q and k: at least those three less, the same loss and
//! gradients. Measured (B 2, T 48, C 128, 8 heads / 2 kv heads of 16, f32): 290 896 B against
//! 180 076 B, for 110 592 B of norm output and pre-rotary q and k.
//!
//! A vision block's attention half (the packed qkv, biases on qkv and proj): the vision
//! tower's per-op path on the fused kernels (RMSNorm, `linear_op` of qkv, its parts narrowed
//! and rotated, flash attention, `linear_op` of proj, the residual add) against
//! `decoder_attention` with `Qkv::Packed`, which keeps neither the norm's output, nor qkv's,
//! nor the contiguous pre-rotary q and k, nor proj's output: at least those seven (N, C)
//! tensors less, the same loss and gradients. Measured (N 96 in two images, C 128, 8 heads
//! of 16, f32): 599 688 B against 253 025 B, for 344 064 B of those seven.

use candle_core::{DType, Device, Result, Tensor, Var};
use omr_model::ops::{decoder_attention, linear_op, linear_op_to, AttnWeights, Qkv};
use omr_model::ops::{decoder_mlp, linear_residual, swiglu_mlp, swiglu_mlp_residual, MlpWeights};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            LIVE.fetch_add(l.size() as isize, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size() as isize, Relaxed);
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            LIVE.fetch_add(l.size() as isize, Relaxed);
        }
        p
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            LIVE.fetch_add(new as isize - l.size() as isize, Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const ROWS: usize = 96;
const C: usize = 128;
const I: usize = 1024;

/// Seeded values in [−scale, scale] (splitmix64 of seed and index).
fn seeded(seed: u64, shape: &[usize], scale: f64) -> Result<Tensor> {
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n as u64)
        .map(|k| (mix(mix(seed) ^ k) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)? * scale
}

/// The loss Σ y² and the gradient of every argument, flattened.
fn loss_and_grads(y: &Tensor, args: &[Var]) -> Result<(f32, Vec<Vec<f32>>)> {
    let loss = (y * y)?.sum_all()?;
    let g = loss.backward()?;
    let grads = args
        .iter()
        .map(|v| {
            g.get(v.as_tensor())
                .expect("gradient")
                .flatten_all()?
                .to_vec1()
        })
        .collect::<Result<_>>()?;
    Ok((loss.to_scalar::<f32>()?, grads))
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Path {
    /// The fused RMSNorm op, `swiglu_mlp` and `linear_residual`.
    Ops,
    /// The fused RMSNorm op and `swiglu_mlp_residual`.
    Unit,
    /// `decoder_mlp`: the norm inside the unit.
    Decoder,
}

/// Live bytes the forward leaves behind (the graph's kept tensors and the output), the loss
/// and every gradient.
fn run(path: Path, args: &[Var; 5]) -> Result<(isize, f32, Vec<Vec<f32>>)> {
    let [x, wn, wg, wu, wd] = args.each_ref().map(Var::as_tensor);
    let before = LIVE.load(Relaxed);
    let mut w = MlpWeights {
        gate: wg,
        up: wu,
        down: wd,
        bias: [None; 3],
        lora: [None, None, None],
        norm: None,
    };
    let y = match path {
        Path::Ops => {
            let h = omr_kernels::rmsnorm(x, wn, 1e-6)?;
            linear_residual(&swiglu_mlp(&h, wg, wu)?, wd, x)?
        }
        Path::Unit => swiglu_mlp_residual(&omr_kernels::rmsnorm(x, wn, 1e-6)?, &w, x)?,
        Path::Decoder => {
            w.norm = Some((wn, 1e-6));
            decoder_mlp(x, &w)?
        }
    };
    let kept = LIVE.load(Relaxed) - before;
    let (loss, grads) = loss_and_grads(&y, args)?;
    Ok((kept, loss, grads))
}

#[test]
fn the_units_keep_less() -> Result<()> {
    mlp_half()?;
    attention_half()?;
    vision_attention_half()
}

fn mlp_half() -> Result<()> {
    let args = [
        Var::from_tensor(&seeded(1, &[ROWS, C], 1.0)?)?,
        Var::from_tensor(&(seeded(2, &[C], 0.5)? + 1.0)?)?,
        Var::from_tensor(&seeded(3, &[I, C], 0.2)?)?,
        Var::from_tensor(&seeded(4, &[I, C], 0.2)?)?,
        Var::from_tensor(&seeded(5, &[C, I], 0.05)?)?,
    ];
    // Twice each, the second measured: first calls set up thread pools and packing buffers.
    for path in [Path::Ops, Path::Unit, Path::Decoder] {
        run(path, &args)?;
    }
    let (ops, loss0, g0) = run(Path::Ops, &args)?;
    let (unit, loss1, g1) = run(Path::Unit, &args)?;
    let (decoder, loss2, g2) = run(Path::Decoder, &args)?;
    let f32s = DType::F32.size_in_bytes();
    let (act, normed) = ((ROWS * I * f32s) as isize, (ROWS * C * f32s) as isize);
    println!(
        "kept after the forward: ops {ops} B, unit {unit} B, decoder unit {decoder} B \
         (activation {act} B, norm output {normed} B)"
    );
    for (loss, g, what) in [(loss1, &g1, "unit"), (loss2, &g2, "decoder unit")] {
        assert_eq!(loss.to_bits(), loss0.to_bits(), "{what}: the same loss");
        assert_eq!(g, &g0, "{what}: the same gradients");
    }
    // Exactly the activation less, then the norm's output less, each to within the unit's
    // own bookkeeping (its closures and flags: under 1 KiB here).
    assert!(
        ops - unit >= act - 1024,
        "the unit keeps {unit} B, the ops {ops} B: not an activation ({act} B) less"
    );
    assert!(
        unit - decoder >= normed - 1024,
        "the decoder unit keeps {decoder} B, the unit {unit} B: not the norm's output \
         ({normed} B) less"
    );
    Ok(())
}

/// Live bytes the attention half's forward leaves behind, its loss and every gradient:
/// through the fused ops or the unit. args: x, norm, wq, bq, wk, bk, wv, bv, wo.
fn run_attention(
    unit: bool,
    args: &[Var; 9],
    dims: (usize, usize, usize),
) -> Result<(isize, f32, Vec<Vec<f32>>)> {
    let (h, kv, d) = dims;
    let [x, wn, wq, bq, wk, bk, wv, bv, wo] = args.each_ref().map(Var::as_tensor);
    let (b, t, _) = x.dims3()?;
    let dev = Device::Cpu;
    let mask = omr_model::fused::text_mask(&vec![vec![1u32; t]; b], t, &dev)?;
    let theta = Tensor::arange(0f32, (b * t * d / 2) as f32, &dev)?.reshape((b, t, d / 2))?;
    let (cos, sin) = (theta.cos()?, theta.sin()?);
    let before = LIVE.load(Relaxed);
    let y = match unit {
        true => {
            let w = AttnWeights {
                norm: (wn, 1e-6),
                qkv: Qkv::Split([(wq, Some(bq)), (wk, Some(bk)), (wv, Some(bv))]),
                o: (wo, None),
                lora: [None, None, None, None],
                heads: h,
                kv_heads: kv,
                head_dim: d,
            };
            decoder_attention(x, &w, &cos, &sin, &mask)?
        }
        false => {
            let hs = omr_kernels::rmsnorm(x, wn, 1e-6)?;
            let q = linear_op_to(&hs, wq, Some(bq), &[b, t, h, d])?;
            let k = linear_op_to(&hs, wk, Some(bk), &[b, t, kv, d])?;
            let v = linear_op_to(&hs, wv, Some(bv), &[b, t, kv, d])?;
            let q = omr_kernels::rotary(&q, &cos, &sin)?;
            let k = omr_kernels::rotary(&k, &cos, &sin)?;
            let a = omr_kernels::flash_attn(&q, &k, &v, &mask, 1.0 / (d as f64).sqrt())?;
            linear_residual(&a, wo, x)?
        }
    };
    let kept = LIVE.load(Relaxed) - before;
    let (loss, grads) = loss_and_grads(&y, args)?;
    Ok((kept, loss, grads))
}

fn attention_half() -> Result<()> {
    let (b, t, c, h, kv, d) = (2, 48, 128, 8, 2, 16);
    let args = [
        Var::from_tensor(&seeded(11, &[b, t, c], 1.0)?)?,
        Var::from_tensor(&(seeded(12, &[c], 0.5)? + 1.0)?)?,
        Var::from_tensor(&seeded(13, &[h * d, c], 0.2)?)?,
        Var::from_tensor(&seeded(14, &[h * d], 0.1)?)?,
        Var::from_tensor(&seeded(15, &[kv * d, c], 0.2)?)?,
        Var::from_tensor(&seeded(16, &[kv * d], 0.1)?)?,
        Var::from_tensor(&seeded(17, &[kv * d, c], 0.2)?)?,
        Var::from_tensor(&seeded(18, &[kv * d], 0.1)?)?,
        Var::from_tensor(&seeded(19, &[c, h * d], 0.1)?)?,
    ];
    let dropped = (b * t * (c + h * d + kv * d) * DType::F32.size_in_bytes()) as isize;
    unit_keeps_less(
        "attention half",
        "norm output + pre-rotary q, k",
        dropped,
        |unit| run_attention(unit, &args, (h, kv, d)),
    )
}

/// `run(false)` (the ops) against `run(true)` (the unit), each run once before it is measured
/// (first-use allocations): the same loss and gradients, and the unit keeps at least
/// `dropped` bytes (`what_dropped`) less, to within its own bookkeeping (1 KiB).
fn unit_keeps_less(
    half: &str,
    what_dropped: &str,
    dropped: isize,
    run: impl Fn(bool) -> Result<(isize, f32, Vec<Vec<f32>>)>,
) -> Result<()> {
    run(false)?;
    run(true)?;
    let (ops, loss0, g0) = run(false)?;
    let (unit, loss1, g1) = run(true)?;
    println!(
        "{half}, kept after the forward: ops {ops} B, unit {unit} B ({what_dropped}: {dropped} B)"
    );
    assert_eq!(loss1.to_bits(), loss0.to_bits(), "{half}: the same loss");
    assert_eq!(g1, g0, "{half}: the same gradients");
    assert!(
        ops - unit >= dropped - 1024,
        "{half}: the unit keeps {unit} B, the ops {ops} B: not {dropped} B less"
    );
    Ok(())
}

/// Live bytes a vision block's attention half leaves behind, its loss and every gradient:
/// through the vision tower's per-op path or the unit with the packed qkv. args: x (N, C),
/// norm, wqkv, bqkv, wproj, bproj.
fn run_vision_attention(
    unit: bool,
    args: &[Var; 6],
    heads: usize,
) -> Result<(isize, f32, Vec<Vec<f32>>)> {
    let [x, wn, wqkv, bqkv, wp, bp] = args.each_ref().map(Var::as_tensor);
    let (n, c) = x.dims2()?;
    let d = c / heads;
    let dev = Device::Cpu;
    // Two images of n/2 patches each.
    let segs: Vec<u32> = (0..n).map(|i| 1 + (2 * i / n) as u32).collect();
    let mask = omr_model::fused::text_mask(&[segs], n, &dev)?;
    let theta = Tensor::arange(0f32, (n * d / 2) as f32, &dev)?.reshape((1, n, d / 2))?;
    let (cos, sin) = ((theta.cos()? * 0.5)?, theta.sin()?);
    let before = LIVE.load(Relaxed);
    let y = match unit {
        true => {
            let w = AttnWeights {
                norm: (wn, 1e-6),
                qkv: Qkv::Packed((wqkv, Some(bqkv))),
                o: (wp, Some(bp)),
                lora: [None, None, None, None],
                heads,
                kv_heads: heads,
                head_dim: d,
            };
            decoder_attention(x, &w, &cos, &sin, &mask)?
        }
        false => {
            let hs = omr_kernels::rmsnorm(x, wn, 1e-6)?;
            let qkv = linear_op(&hs, wqkv, Some(bqkv))?.reshape((n, 3, heads, d))?;
            let part = |i: usize| qkv.narrow(1, i, 1)?.squeeze(1)?.unsqueeze(0);
            let q = omr_kernels::rotary(&part(0)?, &cos, &sin)?;
            let k = omr_kernels::rotary(&part(1)?, &cos, &sin)?;
            let a = omr_kernels::flash_attn(&q, &k, &part(2)?, &mask, 1.0 / (d as f64).sqrt())?;
            (x + linear_op(&a.reshape((n, c))?, wp, Some(bp))?)?
        }
    };
    let kept = LIVE.load(Relaxed) - before;
    let (loss, grads) = loss_and_grads(&y, args)?;
    Ok((kept, loss, grads))
}

fn vision_attention_half() -> Result<()> {
    let (n, c, heads) = (96, 128, 8);
    let args = [
        Var::from_tensor(&seeded(21, &[n, c], 1.0)?)?,
        Var::from_tensor(&(seeded(22, &[c], 0.5)? + 1.0)?)?,
        Var::from_tensor(&seeded(23, &[3 * c, c], 0.2)?)?,
        Var::from_tensor(&seeded(24, &[3 * c], 0.1)?)?,
        Var::from_tensor(&seeded(25, &[c, c], 0.1)?)?,
        Var::from_tensor(&seeded(26, &[c], 0.1)?)?,
    ];
    let dropped = (7 * n * c * DType::F32.size_in_bytes()) as isize;
    unit_keeps_less(
        "vision attention half",
        "norm output, qkv, pre-rotary q and k, proj output",
        dropped,
        |unit| run_vision_attention(unit, &args, heads),
    )
}
