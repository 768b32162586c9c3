//! Attention for training through batched GEMMs, one block of query rows at a time: the same
//! function as [`crate::flash_attn`] (causal, segments, window, GQA; o = 0 and lse = −∞ for a
//! query with no allowed key) with the two products of each block on cuBLAS's tensor cores
//! instead of `flash_attn.cu`'s CUDA-core loops (3.6 TFLOP/s forward + backward on an H200).
//!
//! Memory stays bounded: only one block's scores (B, H, n, span) exist at a time, never the
//! T × S matrix of all rows, and the backward recomputes them from the saved row log-sum-exp
//! (FlashAttention-2's backward, block by block). Each block's keys are narrowed to the span
//! its queries may attend: the causal and window limits, and the segments of its rows (packed
//! samples, vision windows and images), found on the host from the segment ids, so a
//! block-diagonal mask costs what its blocks cost.
//!
//! Numerics are those of transformers' eager attention: scores from a GEMM in the input dtype
//! (bf16 on a GPU), scale, mask, softmax and the backward's elementwise algebra in f32,
//! probabilities cast to the input dtype for the second GEMM. In f32 (the CPU tests) it
//! matches the reference to ~1e-6. On CUDA the softmax and the softmax backward of a block
//! are one kernel each (`kernels/attn_softmax.cu`); elsewhere candle ops do the same algebra.
//!
//! Layouts as `flash_attn`: q (B, T, H, D), k/v (B, S, KV, D), o (B, T, H, D), lse (B, H, T).

use crate::flash_attn::{covering, segment_ranges, AttnMask, Dims};
use crate::host::Precomputed;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

/// A block: query rows [t0, t1), keys [lo, hi).
type Blk = (usize, usize, usize, usize);

/// Whether the block's softmax (forward) and its backward run as the one-pass kernels of
/// `kernels/attn_softmax.cu` (CUDA; `OMR_ATTN_SOFTMAX=candle` keeps candle's ops there too).
fn fused_softmax(x: &Tensor) -> bool {
    static CANDLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    cfg!(feature = "cuda")
        && x.device().is_cuda()
        && !*CANDLE.get_or_init(|| std::env::var("OMR_ATTN_SOFTMAX").as_deref() == Ok("candle"))
}

/// Bytes of f32 scores one block may hold.
const BLOCK_BYTES: usize = 256 << 20;

/// Query blocks and the key span [lo, hi) each may attend.
#[derive(Clone, Debug)]
struct Plan {
    blocks: Vec<(usize, usize, usize, usize)>,
}

/// Which keys the rows [t0, t1) may attend, as one span: the union over the batch of the
/// segments present among those rows, intersected with the causal and window limits.
fn plan(
    q_seg: &[u32],
    k_seg: &[u32],
    b: usize,
    t: usize,
    s: usize,
    h: usize,
    mask: &AttnMask,
) -> Plan {
    let off = s - t;
    // Each segment's key span (segments are contiguous runs of keys; a segment id that appears
    // in several runs gets the span covering all of them, still correct).
    let spans = segment_ranges(k_seg, b, s);
    // Rows per block: the scores of a block fit BLOCK_BYTES; with a causal mask up to 8
    // blocks, so the empty upper triangle is mostly skipped, but not below 512 rows: each
    // block costs ~40 launches forward + backward, which at T 2048 outweighs the 11% of
    // extra work that 4 blocks do over 8 (56% → 62% of the full square).
    let per_row = (b * h * s * 4).max(1);
    let mut n = (BLOCK_BYTES / per_row).clamp(16, t.max(16));
    if mask.causal || mask.window > 0 {
        n = n.min(t.div_ceil(8).next_multiple_of(64).max(512));
    }
    let mut blocks = Vec::new();
    let mut t0 = 0;
    while t0 < t {
        let t1 = (t0 + n).min(t);
        let (mut lo, mut hi) = (usize::MAX, 0usize);
        for (bi, row) in spans.iter().enumerate() {
            let (a, z) = covering(&q_seg[bi * t + t0..bi * t + t1], row);
            lo = lo.min(a);
            hi = hi.max(z);
        }
        if mask.causal {
            hi = hi.min(off + t1);
        }
        if mask.window > 0 {
            lo = lo.max((off + t0 + 1).saturating_sub(mask.window));
        }
        if lo < hi {
            blocks.push((t0, t1, lo, hi));
        }
        t0 = t1;
    }
    Plan { blocks }
}

struct Prep {
    dims: Dims,
    /// (B, KV, S, D)
    kh: Tensor,
    vh: Tensor,
    q_seg: Tensor,
    k_seg: Tensor,
    plan: Plan,
}

fn prep(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttnMask) -> Result<Prep> {
    let (b, t, h, d) = q.dims4()?;
    let (_, s, kv, _) = k.dims4()?;
    if kv == 0 || h % kv != 0 || s < t || k.dims() != v.dims() {
        bail!(
            "gemm_attn: need H % KV = 0, S ≥ T, k and v alike ({:?}, {:?}, {:?})",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    let (q_seg, k_seg) = mask.segments(b, t, s, q.device(), "gemm_attn")?;
    let (qs, ks) = mask.host_ids((b, t, s), &q_seg, &k_seg)?;
    let plan = plan(&qs, &ks, b, t, s, h, mask);
    Ok(Prep {
        dims: Dims { b, t, s, h, kv, d },
        kh: k.transpose(1, 2)?.contiguous()?,
        vh: v.transpose(1, 2)?.contiguous()?,
        q_seg,
        k_seg,
        plan,
    })
}

impl Prep {
    /// Rows [t0, t1) of a (B, T, H, D) tensor as (B, KV, G·n, D).
    fn rows(&self, x: &Tensor, t0: usize, t1: usize) -> Result<Tensor> {
        let n = t1 - t0;
        x.narrow(1, t0, n)?
            .transpose(1, 2)? // (B, H, n, D)
            .contiguous()?
            .reshape((
                self.dims.b,
                self.dims.kv,
                (self.dims.h / self.dims.kv) * n,
                self.dims.d,
            ))
    }

    /// (B, KV, G·n, X) → (B, n, H, X)
    fn unrows(&self, x: &Tensor, n: usize) -> Result<Tensor> {
        let last = x.dim(D::Minus1)?;
        x.reshape((self.dims.b, self.dims.h, n, last))?
            .transpose(1, 2)
    }

    /// Additive mask of a block, (B, 1, n, span) f32: 0 where allowed, −∞ elsewhere.
    fn bias(&self, mask: &AttnMask, t0: usize, t1: usize, lo: usize, hi: usize) -> Result<Tensor> {
        let dev = self.q_seg.device();
        let (n, m) = (t1 - t0, hi - lo);
        let qs = self.q_seg.narrow(1, t0, n)?.unsqueeze(2)?; // (B, n, 1)
        let ks = self.k_seg.narrow(1, lo, m)?.unsqueeze(1)?; // (B, 1, m)
        let same = qs.broadcast_eq(&ks)?; // (B, n, m) u8
        let real = qs.ne(0u32)?.broadcast_as((self.dims.b, n, m))?;
        let mut ok = (same * real)?;
        if mask.causal || mask.window > 0 {
            let off = (self.dims.s - self.dims.t) as f32;
            let qpos = Tensor::arange(t0 as f32 + off, t1 as f32 + off, dev)?.reshape((n, 1))?;
            let kpos = Tensor::arange(lo as f32, hi as f32, dev)?.reshape((1, m))?;
            if mask.causal {
                ok = ok.broadcast_mul(&kpos.broadcast_le(&qpos)?)?;
            }
            if mask.window > 0 {
                let near = (kpos + mask.window as f64)?.broadcast_gt(&qpos)?;
                ok = ok.broadcast_mul(&near)?;
            }
        }
        let zeros = Tensor::zeros((self.dims.b, n, m), DType::F32, dev)?;
        let neg = Tensor::full(f32::NEG_INFINITY, (self.dims.b, n, m), dev)?;
        ok.where_cond(&zeros, &neg)?.unsqueeze(1)
    }

    /// Unscaled scores of a block in the input dtype, (B, H, n, span): one batched GEMM.
    fn raw_scores(&self, qr: &Tensor, (t0, t1, lo, hi): Blk) -> Result<Tensor> {
        let kt = self.kh.narrow(2, lo, hi - lo)?.transpose(2, 3)?; // (B, KV, D, m)
        qr.matmul(&kt)?
            .reshape((self.dims.b, self.dims.h, t1 - t0, hi - lo))
    }

    /// Scaled, masked f32 scores of a block, (B, H, n, span).
    fn scores(
        &self,
        qr: &Tensor,
        mask: &AttnMask,
        (t0, t1, lo, hi): (usize, usize, usize, usize),
        scale: f64,
    ) -> Result<Tensor> {
        let n = t1 - t0;
        let kt = self.kh.narrow(2, lo, hi - lo)?.transpose(2, 3)?; // (B, KV, D, m)
        let sc = qr.matmul(&kt)?.to_dtype(DType::F32)?; // (B, KV, G·n, m)
        let sc = (sc.reshape((self.dims.b, self.dims.h, n, hi - lo))? * scale)?;
        sc.broadcast_add(&self.bias(mask, t0, t1, lo, hi)?)
    }
}

/// (o, lse) without autograd. Rows no block covers keep o = 0, lse = −∞.
pub fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    let (q, k, v) = (q.detach(), k.detach(), v.detach());
    let p = prep(&q, &k, &v, mask)?;
    let dev = q.device();
    // Filled block by block in place (slice_set: one copy of the block; slice_assign would
    // rebuild the whole tensor per block). Rows no block covers keep o = 0, lse = −∞.
    let o = Tensor::zeros((p.dims.b, p.dims.t, p.dims.h, p.dims.d), q.dtype(), dev)?;
    let lse = Tensor::full(f32::NEG_INFINITY, (p.dims.b, p.dims.h, p.dims.t), dev)?;
    for &blk in &p.plan.blocks {
        let (t0, t1, lo, hi) = blk;
        let n = t1 - t0;
        let qr = p.rows(&q, t0, t1)?;
        let (pr, lb) = if fused_softmax(&q) {
            softmax_fwd_cuda(&p, &p.raw_scores(&qr, blk)?, blk, mask, scale)?
        } else {
            let sc = p.scores(&qr, mask, blk, scale)?; // (B, H, n, m)
                                                       // A row with no allowed key has max −∞: clamped, its exps are 0 and its sum 0.
            let mx = sc.max_keepdim(D::Minus1)?.clamp(-1e30f32, f32::INFINITY)?;
            let e = sc.broadcast_sub(&mx)?.exp()?;
            let l = e.sum_keepdim(D::Minus1)?;
            let pr = e.broadcast_div(&l.clamp(1e-30f32, f32::INFINITY)?)?;
            let lb = (mx + l.log()?)?.squeeze(D::Minus1)?; // (B, H, n)
            (pr.to_dtype(q.dtype())?, lb)
        };
        let pr = pr.reshape((p.dims.b, p.dims.kv, (p.dims.h / p.dims.kv) * n, hi - lo))?;
        let ob = pr.matmul(&p.vh.narrow(2, lo, hi - lo)?.contiguous()?)?; // (B, KV, G·n, D)
        o.slice_set(&p.unrows(&ob, n)?.contiguous()?, 1, t0)?;
        lse.slice_set(&lb.to_dtype(DType::F32)?.contiguous()?, 2, t0)?;
    }
    Ok((o, lse))
}

/// (dq, dk, dv) from the inputs, o, dO and the forward's lse, block by block.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    dout: &Tensor,
    lse: &Tensor,
    mask: &AttnMask,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (q, k, v) = (q.detach(), k.detach(), v.detach());
    let dout = dout.detach().to_dtype(q.dtype())?;
    let p = prep(&q, &k, &v, mask)?;
    let dev = q.device();
    let g = p.dims.h / p.dims.kv;
    // Δ = rowsum(dO · O), (B, H, T) f32
    let delta = if fused_softmax(&q) {
        delta_cuda(&dout, &o.detach().to_dtype(q.dtype())?.contiguous()?)?
    } else {
        (dout.to_dtype(DType::F32)? * o.detach().to_dtype(DType::F32)?)?
            .sum(D::Minus1)?
            .transpose(1, 2)?
            .contiguous()?
    };
    // The candle path clamps −∞ (rows with no allowed key) so that exp gives 0, not NaN; the
    // kernel tests for −∞ itself.
    let lse = if fused_softmax(&q) {
        lse.detach().to_dtype(DType::F32)?.contiguous()?
    } else {
        lse.detach().clamp(-1e30f32, f32::INFINITY)?
    };
    // Accumulated in place, block by block (see `forward`).
    let dq = Tensor::zeros((p.dims.b, p.dims.t, p.dims.h, p.dims.d), q.dtype(), dev)?;
    let dk = Tensor::zeros((p.dims.b, p.dims.kv, p.dims.s, p.dims.d), DType::F32, dev)?;
    let dv = Tensor::zeros((p.dims.b, p.dims.kv, p.dims.s, p.dims.d), DType::F32, dev)?;
    for &blk in &p.plan.blocks {
        let (t0, t1, lo, hi) = blk;
        let (n, m) = (t1 - t0, hi - lo);
        let qr = p.rows(&q, t0, t1)?;
        let gr = p.rows(&dout, t0, t1)?; // (B, KV, G·n, D)
        let vt = p.vh.narrow(2, lo, m)?.transpose(2, 3)?; // (B, KV, D, m)
        let dp = gr.matmul(&vt)?.reshape((p.dims.b, p.dims.h, n, m))?; // input dtype
        let (pr, ds) = if fused_softmax(&q) {
            let x = p.raw_scores(&qr, blk)?;
            let lb = lse.narrow(2, t0, n)?.contiguous()?;
            let db = delta.narrow(2, t0, n)?.contiguous()?;
            softmax_bwd_cuda(&p, &x, &dp, &lb, &db, blk, mask, scale)?
        } else {
            let sc = p.scores(&qr, mask, blk, scale)?; // (B, H, n, m)
            let pr = sc
                .broadcast_sub(&lse.narrow(2, t0, n)?.unsqueeze(3)?)?
                .exp()?;
            let dp = dp.to_dtype(DType::F32)?;
            let ds = (pr.clone() * dp.broadcast_sub(&delta.narrow(2, t0, n)?.unsqueeze(3)?)?)?;
            (pr.to_dtype(q.dtype())?, (ds * scale)?.to_dtype(q.dtype())?)
        };
        let ds = ds.reshape((p.dims.b, p.dims.kv, g * n, m))?;
        let pr = pr.reshape((p.dims.b, p.dims.kv, g * n, m))?;
        let kb = p.kh.narrow(2, lo, m)?.contiguous()?; // (B, KV, m, D)
        let dqb = ds.matmul(&kb)?; // (B, KV, G·n, D)
        dq.slice_set(&p.unrows(&dqb, n)?.contiguous()?, 1, t0)?;
        let ds_t = ds.transpose(2, 3)?; // (B, KV, m, G·n)
        let dkb = ds_t.matmul(&qr)?.to_dtype(DType::F32)?;
        let dvb = pr.transpose(2, 3)?.matmul(&gr)?.to_dtype(DType::F32)?;
        dk.slice_set(&(dk.narrow(2, lo, m)? + dkb)?.contiguous()?, 2, lo)?;
        dv.slice_set(&(dv.narrow(2, lo, m)? + dvb)?.contiguous()?, 2, lo)?;
    }
    let back = |x: Tensor, like: &Tensor| -> Result<Tensor> {
        x.transpose(1, 2)?.contiguous()?.to_dtype(like.dtype())
    };
    Ok((dq, back(dk, &k)?, back(dv, &v)?))
}

/// Attention with autograd: [`forward`] now, [`backward`] when candle's backward reaches it.
pub fn gemm_attn(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    scale: f64,
) -> Result<Tensor> {
    let (o, lse) = forward(q, k, v, mask, scale)?;
    let op = GemmAttn {
        out: Precomputed::new("gemm_attn", o.contiguous()?),
        lse,
        mask: mask.clone(),
        scale,
    };
    q.apply_op3(k, v, op)
}

/// The forward's output, attached to (q, k, v) with the blockwise backward.
struct GemmAttn {
    out: Precomputed,
    lse: Tensor,
    mask: AttnMask,
    scale: f64,
}

impl CustomOp3 for GemmAttn {
    fn name(&self) -> &'static str {
        "omr-gemm-attn"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.out.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.out.cuda()
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = backward(q, k, v, o, dout, &self.lse, &self.mask, self.scale)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// `attn_delta`: Δ (B, H, T) f32 from dO and O, both (B, T, H, D) in one dtype.
#[cfg(feature = "cuda")]
pub(crate) fn delta_cuda(dout: &Tensor, o: &Tensor) -> Result<Tensor> {
    use crate::cuda::{self, Out, PushKernelArg};
    let dev = cuda::device_of(o)?;
    let dout = dout.contiguous()?;
    let (b, t, h, d) = o.dims4()?;
    let rows = b * t * h;
    let f = cuda::kernel(
        &dev,
        "attn_softmax",
        &format!("attn_delta_{}", cuda::suffix(o.dtype())?),
    )?;
    let guards = [&dout, o].map(|t| t.storage_and_layout());
    let ins = cuda::views(&guards)?;
    let mut delta = Out::alloc(&dev, DType::F32, rows)?;
    let stream = dev.cuda_stream();
    let mut bl = stream.launch_builder(&f);
    for i in &ins {
        i.push(&mut bl);
    }
    delta.push(&mut bl);
    let ints = [rows, h, t, d].map(|v| v as i32);
    for v in &ints {
        bl.arg(v);
    }
    // 8 warps (rows) per block.
    cuda::run(bl, cuda::cfg(rows.div_ceil(8), 256, 0))?;
    Ok(delta.into_tensor(&dev, (b, h, t)))
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn delta_cuda(_: &Tensor, _: &Tensor) -> Result<Tensor> {
    bail!("gemm_attn: built without CUDA")
}

/// `attn_softmax_fwd` on a block's raw scores x (B, H, n, m): (p in x's dtype, lse (B, H, n)).
#[cfg(feature = "cuda")]
fn softmax_fwd_cuda(
    pp: &Prep,
    x: &Tensor,
    (t0, t1, lo, hi): Blk,
    mask: &AttnMask,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    use crate::cuda::{self, Out, PushKernelArg};
    let dev = cuda::device_of(x)?;
    let x = x.contiguous()?;
    let (n, m) = (t1 - t0, hi - lo);
    let rows = pp.dims.b * pp.dims.h * n;
    let f = cuda::kernel(
        &dev,
        "attn_softmax",
        &format!("attn_softmax_fwd_{}", cuda::suffix(x.dtype())?),
    )?;
    let guards = [&x, &pp.q_seg, &pp.k_seg].map(|t| t.storage_and_layout());
    let ins = cuda::views(&guards)?;
    let mut p = Out::alloc(&dev, x.dtype(), rows * m)?;
    let mut lse = Out::alloc(&dev, DType::F32, rows)?;
    let stream = dev.cuda_stream();
    let mut bl = stream.launch_builder(&f);
    for i in &ins {
        i.push(&mut bl);
    }
    p.push(&mut bl);
    lse.push(&mut bl);
    let ints = [rows, pp.dims.h, n, m, pp.dims.t, pp.dims.s, t0, lo].map(|v| v as i32);
    for v in &ints {
        bl.arg(v);
    }
    let (sc, causal, window) = (scale as f32, mask.causal as i32, mask.window as i32);
    bl.arg(&sc).arg(&causal).arg(&window);
    // 8 warps (rows) per block.
    cuda::run(bl, cuda::cfg(rows.div_ceil(8), 256, 0))?;
    Ok((
        p.into_tensor(&dev, (pp.dims.b, pp.dims.h, n, m)),
        lse.into_tensor(&dev, (pp.dims.b, pp.dims.h, n)),
    ))
}

#[cfg(not(feature = "cuda"))]
fn softmax_fwd_cuda(
    _: &Prep,
    _: &Tensor,
    _: Blk,
    _: &AttnMask,
    _: f64,
) -> Result<(Tensor, Tensor)> {
    bail!("gemm_attn: built without CUDA")
}

/// `attn_softmax_bwd`: (p, dS), both (B, H, n, m) in x's dtype, from the raw scores x, dP,
/// and the block's lse and Δ (B, H, n) f32.
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
fn softmax_bwd_cuda(
    pp: &Prep,
    x: &Tensor,
    dp: &Tensor,
    lse: &Tensor,
    delta: &Tensor,
    (t0, t1, lo, hi): Blk,
    mask: &AttnMask,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    use crate::cuda::{self, Out, PushKernelArg};
    let dev = cuda::device_of(x)?;
    let (x, dp) = (x.contiguous()?, dp.to_dtype(x.dtype())?.contiguous()?);
    let (n, m) = (t1 - t0, hi - lo);
    let total = pp.dims.b * pp.dims.h * n * m;
    let f = cuda::kernel(
        &dev,
        "attn_softmax",
        &format!("attn_softmax_bwd_{}", cuda::suffix(x.dtype())?),
    )?;
    let guards = [&x, &dp, lse, delta, &pp.q_seg, &pp.k_seg].map(|t| t.storage_and_layout());
    let ins = cuda::views(&guards)?;
    let mut p = Out::alloc(&dev, x.dtype(), total)?;
    let mut ds = Out::alloc(&dev, x.dtype(), total)?;
    let stream = dev.cuda_stream();
    let mut bl = stream.launch_builder(&f);
    for i in &ins {
        i.push(&mut bl);
    }
    p.push(&mut bl);
    ds.push(&mut bl);
    let total_i = total as i64;
    bl.arg(&total_i);
    let ints = [pp.dims.h, n, m, pp.dims.t, pp.dims.s, t0, lo].map(|v| v as i32);
    for v in &ints {
        bl.arg(v);
    }
    let (sc, causal, window) = (scale as f32, mask.causal as i32, mask.window as i32);
    bl.arg(&sc).arg(&causal).arg(&window);
    cuda::run(bl, cuda::cfg(total.div_ceil(256).min(132 * 32), 256, 0))?;
    Ok((
        p.into_tensor(&dev, (pp.dims.b, pp.dims.h, n, m)),
        ds.into_tensor(&dev, (pp.dims.b, pp.dims.h, n, m)),
    ))
}

#[cfg(not(feature = "cuda"))]
#[allow(clippy::too_many_arguments)]
fn softmax_bwd_cuda(
    _: &Prep,
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: Blk,
    _: &AttnMask,
    _: f64,
) -> Result<(Tensor, Tensor)> {
    bail!("gemm_attn: built without CUDA")
}
