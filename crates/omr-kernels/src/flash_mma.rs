//! Attention on the tensor cores (`kernels/flash_mma.cu`, CUDA, bf16, head dim 64 / 80 / 128):
//! FlashAttention-2's forward and backward with mma.sync, the scores of a tile in registers.
//! The same function as [`crate::flash_attn`] (causal, segments, window, GQA; o = 0 and
//! lse = −∞ for a query with no allowed key), checked against its CPU reference by
//! `omr bench kernels` (`check.rs`).
//!
//! The host gives the kernels, per batch row and block of rows, the span of the other side
//! that can hold allowed pairs (from the segment ids, the causal and the window limits), so a
//! block-diagonal mask costs what its blocks cost, as in [`crate::gemm_attn`].

use crate::flash_attn::{covering, segment_ranges, AttnMask, Dims};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

mod tiling;
pub use tiling::Tiling;

/// `x` contiguous with its first element 16-byte aligned (the kernels copy rows in 16-byte
/// chunks): a fresh copy (`affine(1, 0)`, which keeps the graph) when a view starts mid-chunk.
fn aligned(x: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    if x.layout().start_offset() % 8 == 0 {
        Ok(x)
    } else {
        x.affine(1.0, 0.0)
    }
}

/// Whether the kernels take these inputs: CUDA, bf16, head dim 64, 80 or 128, and a positive
/// finite scale (the kernels take the row maxima of unscaled scores).
pub fn supported(q: &Tensor, k: &Tensor, scale: f64) -> bool {
    let d = q.dims().last().copied().unwrap_or(0);
    scale > 0.0
        && scale.is_finite()
        && cfg!(feature = "cuda")
        && q.device().is_cuda()
        && q.dtype() == DType::BF16
        && k.dtype() == DType::BF16
        && matches!(d, 64 | 80 | 128)
        && q.rank() == 4
        && k.rank() == 4
}

/// The spans of both kernels, `[lo, hi)` pairs: per (b, block of `w.fwd_rows()` query rows) the
/// keys the forward visits, per (b, block of `w.bwd_keys()` keys) the query rows the backward
/// visits.
fn spans(qs: &[u32], ks: &[u32], d: &Dims, mask: &AttnMask, w: Tiling) -> (Vec<u32>, Vec<u32>) {
    let (fwd_rows, bwd_keys) = (w.fwd_rows(), w.bwd_keys());
    let (b, t, s) = (d.b, d.t, d.s);
    let off = (s - t) as i64;
    let (qr, kr) = (segment_ranges(qs, b, t), segment_ranges(ks, b, s));
    let win = mask.window as i64;
    let union = |ids: &[u32], other| {
        let (lo, hi) = covering(ids, other);
        (i64::try_from(lo).unwrap_or(i64::MAX), hi as i64)
    };
    let mut fwd = Vec::new();
    for bi in 0..b {
        for t0 in (0..t).step_by(fwd_rows) {
            let t1 = (t0 + fwd_rows).min(t);
            let (mut lo, mut hi) = union(&qs[bi * t + t0..bi * t + t1], &kr[bi]);
            if mask.causal {
                hi = hi.min(off + t1 as i64);
            }
            if win > 0 {
                lo = lo.max(off + t0 as i64 + 1 - win);
            }
            let (lo, hi) = if lo < hi { (lo, hi) } else { (0, 0) };
            fwd.extend([lo as u32, hi as u32]);
        }
    }
    let mut bwd = Vec::new();
    for bi in 0..b {
        for j0 in (0..s).step_by(bwd_keys) {
            let j1 = (j0 + bwd_keys).min(s);
            let (mut lo, mut hi) = union(&ks[bi * s + j0..bi * s + j1], &qr[bi]);
            if mask.causal {
                lo = lo.max(j0 as i64 - off);
            }
            if win > 0 {
                hi = hi.min(j1 as i64 - 1 + win - off);
            }
            let (lo, hi) = if lo < hi { (lo.max(0), hi) } else { (0, 0) };
            bwd.extend([lo as u32, hi as u32]);
        }
    }
    (fwd, bwd)
}

/// Attention through the tensor-core kernels with [`Tiling::from_env`]; the inputs must pass
/// [`supported`].
pub fn flash_mma(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    scale: f64,
) -> Result<Tensor> {
    flash_mma_tiled(q, k, v, mask, scale, Tiling::from_env()?)
}

/// [`flash_mma`] with the given tiling.
pub fn flash_mma_tiled(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    scale: f64,
    tiling: Tiling,
) -> Result<Tensor> {
    let op = build(q, k, v, mask, scale, tiling)?;
    aligned(q)?.apply_op3(&aligned(k)?, &aligned(v)?, op)
}

/// The forward without autograd (inputs detached) and what [`MmaSaved::backward`] needs, for
/// ops that chain their own backward (`omr_kernels::attention_forward`).
pub(crate) fn forward_saved(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    scale: f64,
) -> Result<(Tensor, MmaSaved)> {
    let op = build(q, k, v, mask, scale, Tiling::from_env()?)?;
    let keep = op.clone();
    let o = aligned(&q.detach())?.apply_op3(&aligned(&k.detach())?, &aligned(&v.detach())?, op)?;
    Ok((o, MmaSaved(keep)))
}

/// The forward's op (spans, segment ids, its lse once it ran).
pub(crate) struct MmaSaved(FlashMma);

impl MmaSaved {
    /// (dq, dk, dv) given the forward's inputs, output and dO.
    pub(crate) fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        dout: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let lse = self.0.lse.get()?;
        self.0.backward(q, k, v, o, dout, &lse)
    }
}

/// Whether `dev` runs the sm_90a kernels (`kernels/*_sm90a.cu`): a compute capability 9.0 GPU.
pub(crate) fn wgmma_runs(dev: &candle_core::Device) -> bool {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = dev {
        use candle_core::cuda::cudarc::driver::sys::CUdevice_attribute as A;
        let cc = |a| d.cuda_stream().context().attribute(a).unwrap_or(0);
        return cc(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR) == 9
            && cc(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR) == 0;
    }
    let _ = dev;
    false
}

/// The wgmma layout probe (`wgmma_probe` in `kernels/wgmma_probe_sm90a.cu`): for bf16 `a`
/// (64, 128) and `bk` (128, 128), in f32, a·bkᵀ, a·bk, bk[64..]·aᵀ, bk[..64, ..64]·a and
/// bk[.., ..64]ᵀ·bk[.., 64..]: on an sm_90 GPU each through the shared-memory layouts,
/// descriptors and fragments one product of the wgmma attention uses (`OMR_MMA=wg`); on the
/// CPU by candle's matmul, the reference `omr bench kernels` compares them with.
pub fn wgmma_probe(a: &Tensor, bk: &Tensor) -> Result<Vec<Tensor>> {
    if a.dims() != [64, 128] || bk.dims() != [128, 128] {
        bail!(
            "wgmma_probe: a (64, 128) and bk (128, 128); got {:?}, {:?}",
            a.dims(),
            bk.dims()
        )
    }
    if a.device().is_cpu() {
        let (a, bk) = (a.to_dtype(DType::F32)?, bk.to_dtype(DType::F32)?);
        let (lo, hi) = (bk.narrow(1, 0, 64)?, bk.narrow(1, 64, 64)?);
        return Ok(vec![
            a.matmul(&bk.t()?)?,
            a.matmul(&bk)?,
            bk.narrow(0, 64, 64)?.matmul(&a.t()?)?,
            bk.narrow(0, 0, 64)?.narrow(1, 0, 64)?.matmul(&a)?,
            lo.t()?.matmul(&hi)?,
        ]);
    }
    probe_cuda(&a.to_dtype(DType::BF16)?, &bk.to_dtype(DType::BF16)?)
}

#[cfg(feature = "cuda")]
fn probe_cuda(a: &Tensor, bk: &Tensor) -> Result<Vec<Tensor>> {
    use crate::cuda::{self, Out};
    let dev = cuda::device_of(a)?;
    let f = cuda::kernel(&dev, "wgmma_probe_sm90a", "wgmma_probe")?;
    // WG_PROBE_SMEM: a and bk in the swizzled layout, 1024 bytes of alignment.
    let smem = (1024 + 2 * (64 * 128 + 128 * 128)) as u32;
    cuda::allow_dynamic_smem(&f, smem)?;
    let (a, bk) = (a.contiguous()?, bk.contiguous()?);
    let guards = [&a, &bk].map(|t| t.storage_and_layout());
    let ins = cuda::views(&guards)?;
    let shapes = [(64, 128), (64, 128), (64, 64), (64, 128), (64, 64)];
    let mut outs = shapes
        .iter()
        .map(|&(r, c)| Out::alloc(&dev, DType::F32, r * c))
        .collect::<Result<Vec<_>>>()?;
    let stream = dev.cuda_stream();
    let mut bl = stream.launch_builder(&f);
    for i in &ins {
        i.push(&mut bl);
    }
    for o in outs.iter_mut() {
        o.push(&mut bl);
    }
    let cfg = cuda::LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: smem,
    };
    cuda::run(bl, cfg)?;
    Ok(outs
        .into_iter()
        .zip(shapes)
        .map(|(o, s)| o.into_tensor(&dev, s))
        .collect())
}

#[cfg(not(feature = "cuda"))]
fn probe_cuda(_: &Tensor, _: &Tensor) -> Result<Vec<Tensor>> {
    bail!("wgmma_probe: built without CUDA")
}

/// The op of one call: checks the inputs, plans the spans (once per mask and shape).
fn build(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    scale: f64,
    tiling: Tiling,
) -> Result<FlashMma> {
    let (b, t, h, d) = q.dims4()?;
    let (bk, s, kv, dk) = k.dims4()?;
    if !supported(q, k, scale)
        || v.dims() != k.dims()
        || v.dtype() != k.dtype()
        || bk != b
        || dk != d
        || kv == 0
        || h % kv != 0
        || s < t
    {
        bail!(
            "flash_mma: q (B, T, H, D), k/v (B, S, KV, D) in bf16 on CUDA, D 64/80/128, H % KV = 0, S ≥ T, a positive scale (the kernels take the row maxima of unscaled scores); got {:?}, {:?}, {:?}, scale {scale}",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    let dims = Dims { b, t, s, h, kv, d };
    let tiling = tiling.for_dim(d);
    let dev = q.device();
    // Segment ids and spans on the device, once per mask and shape (every layer shares them).
    let key = format!(
        "flash_mma {b} {t} {s} {tiling:?} {:?} {}",
        dev.location(),
        mask.plan_key()
    );
    let plan = mask.plans.get(key, || {
        let (q_seg, k_seg) = mask.segments(b, t, s, dev, "flash_mma")?;
        let (qs, ks) = mask.host_ids((b, t, s), &q_seg, &k_seg)?;
        let (fwd, bwd) = spans(&qs, &ks, &dims, mask, tiling);
        Ok(Plan {
            fwd_span: Tensor::from_vec(fwd, (b * t.div_ceil(tiling.fwd_rows()), 2), dev)?,
            bwd_span: Tensor::from_vec(bwd, (b * s.div_ceil(tiling.bwd_keys()), 2), dev)?,
            q_seg,
            k_seg,
        })
    })?;
    let op = FlashMma {
        dims,
        tiling,
        causal: mask.causal,
        window: mask.window,
        scale: scale as f32,
        q_seg: plan.q_seg.clone(),
        k_seg: plan.k_seg.clone(),
        fwd_span: plan.fwd_span.clone(),
        bwd_span: plan.bwd_span.clone(),
        lse: std::sync::Arc::new(crate::host::Saved::new("flash_mma")),
    };
    Ok(op)
}

/// Entry `name` of `module`; a module built for sm_90a that does not load names the switch
/// that chose it and what it needs.
#[cfg(feature = "cuda")]
fn entry(
    dev: &candle_core::CudaDevice,
    module: &str,
    name: &str,
) -> Result<candle_core::cuda::cudarc::driver::CudaFunction> {
    crate::cuda::kernel(dev, module, name).map_err(|e| {
        if module.ends_with("_sm90a") {
            candle_core::Error::msg(format!(
                "OMR_MMA=wg/wgf/wgb: {name} (wgmma) needs an sm_90 GPU (H100/H200): {e}"
            ))
        } else {
            e
        }
    })
}

/// What a mask gives the kernels for one shape: segment ids and spans on the device.
struct Plan {
    q_seg: Tensor,
    k_seg: Tensor,
    fwd_span: Tensor,
    bwd_span: Tensor,
}

#[derive(Clone)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct FlashMma {
    dims: Dims,
    tiling: Tiling,
    causal: bool,
    window: usize,
    scale: f32,
    q_seg: Tensor,
    k_seg: Tensor,
    fwd_span: Tensor,
    bwd_span: Tensor,
    /// The forward's row log-sum-exp (B, H, T) f32, for the backward (shared by clones).
    lse: std::sync::Arc<crate::host::Saved>,
}

impl CustomOp3 for FlashMma {
    fn name(&self) -> &'static str {
        "flash-mma"
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
        bail!("flash_mma: CUDA only (the CPU runs crate::flash_attn)")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{self, In, Out, PushKernelArg};
        let dev = qs.device.clone();
        let d = &self.dims;
        let w = self.tiling;
        let f = entry(&dev, w.fwd_module(), &w.fwd_entry(d.d))?;
        let smem = w.fwd_smem(d.d) as u32;
        if smem > 0 {
            cuda::allow_dynamic_smem(&f, smem)?;
        }
        let guards = [&self.q_seg, &self.k_seg, &self.fwd_span].map(|t| t.storage_and_layout());
        let aux = cuda::views(&guards)?;
        let (qi, ki, vi) = (In::new(qs, ql)?, In::new(ks, kl)?, In::new(vs, vl)?);
        let mut o = Out::alloc(&dev, DType::BF16, d.b * d.t * d.h * d.d)?;
        let mut lse = Out::alloc(&dev, DType::F32, d.b * d.h * d.t)?;
        let stream = dev.cuda_stream();
        let mut bl = stream.launch_builder(&f);
        qi.push(&mut bl);
        ki.push(&mut bl);
        vi.push(&mut bl);
        for a in &aux {
            a.push(&mut bl);
        }
        o.push(&mut bl);
        lse.push(&mut bl);
        let ints = [d.t, d.s, d.h, d.kv].map(|x| x as i32);
        for x in &ints {
            bl.arg(x);
        }
        let scale_log2 = self.scale * std::f32::consts::LOG2_E;
        let (causal, window) = (self.causal as i32, self.window as i32);
        bl.arg(&scale_log2).arg(&causal).arg(&window);
        let cfg = cuda::LaunchConfig {
            grid_dim: (d.t.div_ceil(w.fwd_rows()) as u32, (d.b * d.h) as u32, 1),
            block_dim: (w.fwd_threads(), 1, 1),
            shared_mem_bytes: smem,
        };
        cuda::run(bl, cfg)?;
        self.lse.put(lse.into_tensor(&dev, (d.b, d.h, d.t)))?;
        Ok((o.into_storage(&dev), Shape::from((d.b, d.t, d.h, d.d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self.lse.get()?;
        let (dq, dk, dv) = self.backward(q, k, v, o, grad, &lse)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

impl FlashMma {
    #[cfg(feature = "cuda")]
    fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        grad: &Tensor,
        lse: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        use crate::cuda::{self, Out, PushKernelArg};
        let d = &self.dims;
        let dev = cuda::device_of(q)?;
        let (q, k, v) = (aligned(q)?, aligned(k)?, aligned(v)?);
        let dout = aligned(&grad.to_dtype(DType::BF16)?)?;
        let delta = crate::gemm_attn::delta_cuda(&dout, &o.contiguous()?)?;
        let dq = Tensor::zeros((d.b, d.t, d.h, d.d), DType::F32, q.device())?;
        let w = self.tiling;
        let f = entry(&dev, w.bwd_module(), &w.bwd_entry(d.d))?;
        let smem = w.bwd_smem(d.d) as u32;
        cuda::allow_dynamic_smem(&f, smem)?;
        let guards = [
            &q,
            &k,
            &v,
            &dout,
            lse,
            &delta,
            &self.q_seg,
            &self.k_seg,
            &self.bwd_span,
            &dq,
        ]
        .map(|t| t.storage_and_layout());
        let ins = cuda::views(&guards)?;
        let per_head = d.b * d.s * d.h * d.d;
        let mut dk = Out::alloc(&dev, DType::F32, per_head)?;
        let mut dv = Out::alloc(&dev, DType::F32, per_head)?;
        let stream = dev.cuda_stream();
        let mut bl = stream.launch_builder(&f);
        for i in &ins {
            i.push(&mut bl);
        }
        dk.push(&mut bl);
        dv.push(&mut bl);
        let ints = [d.t, d.s, d.h, d.kv].map(|x| x as i32);
        for x in &ints {
            bl.arg(x);
        }
        let (causal, window) = (self.causal as i32, self.window as i32);
        bl.arg(&self.scale).arg(&causal).arg(&window);
        let cfg = cuda::LaunchConfig {
            grid_dim: (d.s.div_ceil(w.bwd_keys()) as u32, (d.b * d.h) as u32, 1),
            block_dim: (w.bwd_threads(), 1, 1),
            shared_mem_bytes: smem,
        };
        cuda::run(bl, cfg)?;
        let g = d.h / d.kv;
        // dK, dV per query head → summed over each key/value head's group.
        let group = |x: Out| -> Result<Tensor> {
            x.into_tensor(&dev, (d.b, d.s, d.kv, g, d.d))
                .sum(3)?
                .to_dtype(DType::BF16)
        };
        Ok((dq.to_dtype(DType::BF16)?, group(dk)?, group(dv)?))
    }

    #[cfg(not(feature = "cuda"))]
    fn backward(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        bail!("flash_mma: built without CUDA")
    }
}

#[cfg(test)]
mod tests;
