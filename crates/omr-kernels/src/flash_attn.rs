//! Attention for training as one op with a backward, never holding the T × S scores: causal
//! (language model), block-diagonal by segment ids (packed samples; vision images and windows)
//! and sliding-window masks, grouped key/value heads, head dims up to 128 (64, 80, 128 for
//! Qwen2.5-VL's text and vision heads).
//!
//! q: (B, T, H, D), k/v: (B, S, KV, D) f32|bf16 (the projections' layout), queries at key
//! positions S − T + t → o: (B, T, H, D). Query t attends key s iff both carry the same non-zero
//! segment id ([`AttnMask`]; none given = one segment), s ≤ S − T + t when causal, and
//! S − T + t − s < window when a window is set. A query with no allowed key (padding) gets
//! o = 0 (the candle reference gives a uniform average there; that row is never used).
//!
//! The forward saves the row log-sum-exp (B, H, T) f32 for the backward, which recomputes the
//! probabilities tile by tile (FlashAttention-2). CPU: [`fwd_ref`], [`bwd_ref`] (key blocks of
//! 64 with an online softmax per query row); CUDA: `kernels/flash_attn.cu` (deterministic: no
//! atomics, dQ and dK/dV from separate kernels).

pub use crate::flash_ref::{bwd_ref, fwd_ref};
use crate::host;
pub(crate) use crate::mask::{covering, segment_ranges};
pub use crate::mask::{AttnMask, PlanCache};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, Device, Layout, Result, Shape, Tensor};

/// Shapes of one call.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub b: usize,
    pub t: usize,
    pub s: usize,
    pub h: usize,
    pub kv: usize,
    pub d: usize,
}

/// Attention with `scale` (usually 1/sqrt(D)). On CUDA, for more than 16 query rows:
/// [`crate::flash_mma::flash_mma`] (tensor-core flash attention) for bf16 with head dim 64, 80
/// or 128 (forward + backward 88 TFLOP/s at T 4096 on an H200, 1.7× the GEMM path), else
/// [`crate::gemm_attn::gemm_attn`] (blockwise products on cuBLAS: f32, other head dims);
/// `OMR_ATTN=gemm` or `OMR_ATTN=kernel` forces those. Otherwise (a handful of query rows in
/// generation, the CPU) [`flash_attn_kernel`].
pub fn flash_attn(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    scale: f64,
) -> Result<Tensor> {
    match cuda_path(q, k, scale)? {
        Some(CudaPath::Mma) => crate::flash_mma::flash_mma(q, k, v, mask, scale),
        Some(CudaPath::Gemm) => crate::gemm_attn::gemm_attn(q, k, v, mask, scale),
        None => flash_attn_kernel(q, k, v, mask, scale),
    }
}

/// The CUDA attention paths past the CUDA-core kernel.
#[derive(Debug, PartialEq, Eq)]
enum CudaPath {
    Mma,
    Gemm,
}

/// Which path [`flash_attn`] takes on CUDA for more than 16 query rows (`None`: the kernel of
/// `flash_attn.cu`, or its CPU reference): the tensor cores where [`crate::flash_mma`] takes
/// the inputs, else the GEMM path; `OMR_ATTN=gemm` / `kernel` force those.
fn cuda_path(q: &Tensor, k: &Tensor, scale: f64) -> Result<Option<CudaPath>> {
    let choice = attn_choice();
    if !q.device().is_cuda() || q.dim(1)? <= 16 || choice == Some("kernel") {
        return Ok(None);
    }
    Ok(Some(
        if choice != Some("gemm") && crate::flash_mma::supported(q, k, scale) {
            CudaPath::Mma
        } else {
            CudaPath::Gemm
        },
    ))
}

/// Attention for an op that chains its own backward (a whole decoder block as one op; a
/// checkpointed block's attention kept for its recompute): the forward without autograd, and
/// [`AttnSaved::backward`]. The same path, kernels and results as [`flash_attn`] (same
/// `OMR_ATTN` choice): the tensor-core kernels, the blockwise [`crate::gemm_attn`] or the
/// kernel of `kernels/flash_attn.cu` (its CPU reference on the CPU).
pub fn attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    scale: f64,
) -> Result<(Tensor, AttnSaved)> {
    let (q, k, v) = (q.detach(), k.detach(), v.detach());
    match cuda_path(&q, &k, scale)? {
        Some(CudaPath::Mma) => {
            let (o, saved) = crate::flash_mma::forward_saved(&q, &k, &v, mask, scale)?;
            Ok((o, AttnSaved(Saved::Mma(saved))))
        }
        Some(CudaPath::Gemm) => {
            let (o, lse) = crate::gemm_attn::forward(&q, &k, &v, mask, scale)?;
            Ok((
                o,
                AttnSaved(Saved::Gemm {
                    lse,
                    mask: mask.clone(),
                    scale,
                }),
            ))
        }
        None => {
            let op = build_kernel_op(&q, &k, &v, mask, scale)?;
            let keep = op.clone();
            let o = q
                .contiguous()?
                .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?;
            Ok((o, AttnSaved(Saved::Kernel(keep))))
        }
    }
}

/// What [`attention_forward`] keeps for the backward.
pub struct AttnSaved(Saved);

enum Saved {
    Mma(crate::flash_mma::MmaSaved),
    Gemm {
        lse: Tensor,
        mask: AttnMask,
        scale: f64,
    },
    Kernel(FlashAttn),
}

impl AttnSaved {
    /// (dq, dk, dv) from the forward's inputs, its output and dO (any dtype), in the inputs'
    /// dtypes.
    pub fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        dout: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        match &self.0 {
            Saved::Mma(m) => m.backward(q, k, v, o, dout),
            Saved::Gemm { lse, mask, scale } => {
                crate::gemm_attn::backward(q, k, v, o, dout, lse, mask, *scale)
            }
            Saved::Kernel(op) => {
                let dout = dout.to_dtype(q.dtype())?.contiguous()?;
                let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
                op.backward(&q, &k, &v, &o.contiguous()?, &dout, &op.lse.get()?)
            }
        }
    }
}

/// `OMR_ATTN`, read once.
fn attn_choice() -> Option<&'static str> {
    static CHOICE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    CHOICE
        .get_or_init(|| std::env::var("OMR_ATTN").ok())
        .as_deref()
}

/// Attention by `kernels/flash_attn.cu` (its CPU reference on the CPU), forward and backward.
pub fn flash_attn_kernel(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    scale: f64,
) -> Result<Tensor> {
    let op = build_kernel_op(q, k, v, mask, scale)?;
    // The CUDA kernel reads keys and values whose batch rows sit apart (a view of generation's
    // preallocated cache) in place; the CPU reference reads contiguous copies.
    let kv_in_place = k.device().is_cuda()
        && row_stride(k.layout()).is_some()
        && row_stride(k.layout()) == row_stride(v.layout());
    if kv_in_place {
        q.contiguous()?.apply_op3(k, v, op)
    } else {
        q.contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
    }
}

/// Key-range splits of `kernels/flash_attn.cu`'s forward (flash-decoding) for `blocks` blocks of
/// rows, `wave` blocks resident on the device at once and `s` keys: enough splits to fill one
/// wave when the rows alone leave the device idle (a decoding step of a small batch: 64 rows
/// of the 3B model are 128 blocks on an H100's 132 multiprocessors), each at least 8 key tiles
/// (256 keys); 1 when the rows fill a wave.
pub fn splits_for(blocks: usize, wave: usize, s: usize) -> usize {
    if blocks == 0 || blocks >= wave {
        return 1;
    }
    wave.div_ceil(blocks).min(s.div_ceil(32) / 8).max(1)
}

thread_local! {
    static SPLITS: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with [`splits_for`]'s count forced to `n` (≥ 1) on this thread: the benchmark's
/// split and unsplit rows, the checks of both paths.
pub fn with_splits<R>(n: usize, f: impl FnOnce() -> R) -> R {
    let old = SPLITS.with(|c| c.replace(Some(n.max(1))));
    let r = f();
    SPLITS.with(|c| c.set(old));
    r
}

/// The forced count: [`with_splits`]'s, else `OMR_ATTN_SPLITS` (≥ 1, read once).
#[cfg(feature = "cuda")]
fn forced_splits() -> Option<usize> {
    static FORCED: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    SPLITS.with(|c| c.get()).or_else(|| {
        *FORCED.get_or_init(|| {
            std::env::var("OMR_ATTN_SPLITS")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .map(|n| n.max(1))
        })
    })
}

/// The batch stride of a (B, S, KV, D) layout whose batch rows are each contiguous (a
/// contiguous tensor, or a view of the first S positions of a longer buffer); None otherwise.
pub(crate) fn row_stride(l: &Layout) -> Option<usize> {
    let (d, st) = (l.dims(), l.stride());
    if d.len() != 4 {
        return None;
    }
    let row = d[1] * d[2] * d[3];
    if l.is_contiguous() {
        return Some(row);
    }
    let rows_contiguous = (d[3] == 1 || st[3] == 1)
        && (d[2] == 1 || st[2] == d[3])
        && (d[1] == 1 || st[1] == d[2] * d[3]);
    (rows_contiguous && (d[0] == 1 || st[0] >= row)).then_some(if d[0] == 1 { row } else { st[0] })
}

/// The op of [`flash_attn_kernel`], its inputs checked.
fn build_kernel_op(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    scale: f64,
) -> Result<FlashAttn> {
    host::check_float("flash_attn", q.dtype())?;
    let (b, t, h, d) = q.dims4()?;
    let (bk, s, kv, dk) = k.dims4()?;
    if bk != b
        || dk != d
        || v.dims() != k.dims()
        || k.dtype() != q.dtype()
        || v.dtype() != q.dtype()
    {
        bail!(
            "flash_attn: q (B, T, H, D), k/v (B, S, KV, D) of one dtype; got {:?}, {:?}, {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    if kv == 0 || h % kv != 0 || d % 2 != 0 || d > 128 || s < t {
        bail!("flash_attn: need H % KV = 0, D even and ≤ 128, S ≥ T (H {h}, KV {kv}, D {d}, T {t}, S {s})")
    }
    let (q_seg, k_seg) = mask.segments(b, t, s, q.device(), "flash_attn")?;
    Ok(FlashAttn {
        causal: mask.causal,
        window: mask.window,
        scale: scale as f32,
        q_seg,
        k_seg,
        lse: std::sync::Arc::new(host::Saved::new("flash_attn")),
    })
}

#[derive(Clone)]
struct FlashAttn {
    causal: bool,
    window: usize,
    scale: f32,
    q_seg: Tensor,
    k_seg: Tensor,
    /// The forward's row log-sum-exp (B, H, T) f32, for the backward (shared by clones).
    lse: std::sync::Arc<host::Saved>,
}

impl FlashAttn {
    fn dims(ql: &Layout, kl: &Layout) -> Result<Dims> {
        let (b, t, h, d) = ql.shape().dims4()?;
        let (_, s, kv, _) = kl.shape().dims4()?;
        Ok(Dims { b, t, s, h, kv, d })
    }
}

impl CustomOp3 for FlashAttn {
    fn name(&self) -> &'static str {
        "omr-flash-attn"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = Self::dims(ql, kl)?;
        let (o, lse) = fwd_ref(
            &host::read_f32(qs, ql)?,
            &host::read_f32(ks, kl)?,
            &host::read_f32(vs, vl)?,
            &self.q_seg.flatten_all()?.to_vec1()?,
            &self.k_seg.flatten_all()?.to_vec1()?,
            n,
            self.scale,
            self.causal,
            self.window,
        );
        self.lse
            .put(Tensor::from_vec(lse, (n.b, n.h, n.t), &Device::Cpu)?)?;
        Ok((host::store(o, qs.dtype())?, ql.shape().clone()))
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
        use candle_core::DType;
        let dev = qs.device().clone();
        let n = Self::dims(ql, kl)?;
        let f = cuda::kernel(
            &dev,
            "flash_attn",
            &format!("flash_fwd_{}", cuda::suffix(qs.dtype())?),
        )?;
        let (qsg, qsl) = self.q_seg.storage_and_layout();
        let (ksg, ksl) = self.k_seg.storage_and_layout();
        // Keys and values: batch rows `kvb` elements apart (see [`flash_attn_kernel`]).
        let kvb = match (row_stride(kl), row_stride(vl)) {
            (Some(a), Some(b)) if a == b => a,
            _ => candle_core::bail!(
                "flash_attn: keys and values need one layout with contiguous batch rows"
            ),
        };
        let span = |l: &Layout| {
            let a = l.start_offset();
            (a, a + (n.b - 1) * kvb + n.s * n.kv * n.d)
        };
        let ((ka, kz), (va, vz)) = (span(kl), span(vl));
        let (q, k, v) = (
            In::new(qs, ql)?,
            In::span(ks, ka, kz)?,
            In::span(vs, va, vz)?,
        );
        let (qg, kg) = (
            In::new(cuda::storage(&qsg)?, qsl)?,
            In::new(cuda::storage(&ksg)?, ksl)?,
        );
        let mut o = Out::alloc(&dev, qs.dtype(), n.b * n.t * n.h * n.d)?;
        let mut lse = Out::alloc(&dev, DType::F32, n.b * n.h * n.t)?;
        let ints = [n.t, n.s, n.h, n.kv, n.d].map(|x| x as i32);
        let kvb = kvb as i64;
        let (causal, window) = (self.causal as i32, self.window as i32);
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        q.push(&mut b);
        k.push(&mut b);
        v.push(&mut b);
        qg.push(&mut b);
        kg.push(&mut b);
        o.push(&mut b);
        lse.push(&mut b);
        for x in &ints {
            b.arg(x);
        }
        // A block: 16 (query, head) rows of one key/value head, queries outer, so the heads
        // of a group share each key tile (a decoding step's rows are its heads); the key range
        // cut into `splits` blocks when the rows alone leave the device idle.
        let row_blocks = (n.t * (n.h / n.kv)).div_ceil(16);
        let wave = cuda::resident_blocks(&dev, &f, 128, 0)?;
        let splits =
            forced_splits().unwrap_or_else(|| splits_for(row_blocks * n.kv * n.b, wave, n.s));
        let rows = n.b * n.h * n.t;
        let mut part = if splits > 1 {
            Some(Out::alloc(&dev, DType::F32, splits * rows * (n.d + 2))?)
        } else {
            None
        };
        let (splits_i, null) = (splits as i32, 0u64);
        b.arg(&kvb)
            .arg(&self.scale)
            .arg(&causal)
            .arg(&window)
            .arg(&splits_i);
        match part.as_mut() {
            Some(p) => p.push(&mut b),
            None => {
                b.arg(&null);
            }
        }
        cuda::run(b, grid3(row_blocks * splits, n.kv, n.b))?;
        if let Some(mut p) = part {
            let f = cuda::kernel(
                &dev,
                "flash_attn",
                &format!("flash_fwd_combine_{}", cuda::suffix(qs.dtype())?),
            )?;
            let mut b = stream.launch_builder(&f);
            p.push(&mut b);
            o.push(&mut b);
            lse.push(&mut b);
            let ints = [rows, n.t, n.h, n.d, splits].map(|x| x as i32);
            for x in &ints {
                b.arg(x);
            }
            cuda::run(b, cuda::cfg(rows, 128, 0))?;
        }
        self.lse.put(lse.into_tensor(&dev, (n.b, n.h, n.t)))?;
        Ok((o.into_storage(&dev), ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self.lse.get()?;
        let dout = dout.to_dtype(q.dtype())?.contiguous()?;
        let (k, v) = (&k.contiguous()?, &v.contiguous()?);
        let (dq, dk, dv) = self.backward(q, k, v, o, &dout, &lse)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

impl FlashAttn {
    fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        dout: &Tensor,
        lse: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            return self.cuda_bwd(q, k, v, o, dout, lse);
        }
        let (b, t, h, d) = q.dims4()?;
        let (_, s, kv, _) = k.dims4()?;
        let n = Dims { b, t, s, h, kv, d };
        let (dq, dk, dv) = bwd_ref(
            &host::tensor_f32(q)?,
            &host::tensor_f32(k)?,
            &host::tensor_f32(v)?,
            &host::tensor_f32(o)?,
            &host::tensor_f32(dout)?,
            &host::tensor_f32(lse)?,
            &self.q_seg.flatten_all()?.to_vec1()?,
            &self.k_seg.flatten_all()?.to_vec1()?,
            n,
            self.scale,
            self.causal,
            self.window,
        );
        Ok((
            host::tensor_from(dq, q.shape(), q.dtype(), q.device())?,
            host::tensor_from(dk, k.shape(), k.dtype(), k.device())?,
            host::tensor_from(dv, v.shape(), v.dtype(), v.device())?,
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        dout: &Tensor,
        lse: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        use crate::cuda::{self, In, Out, PushKernelArg};
        use candle_core::DType;
        let dev = cuda::device_of(q)?;
        let (q, k, v, o) = (
            q.contiguous()?,
            k.contiguous()?,
            v.contiguous()?,
            o.contiguous()?,
        );
        let (b_, t, h, d) = q.dims4()?;
        let (_, s, kv, _) = k.dims4()?;
        let sfx = cuda::suffix(q.dtype())?;
        let guards =
            [&q, &k, &v, &o, dout, lse, &self.q_seg, &self.k_seg].map(|x| x.storage_and_layout());
        let ins = cuda::views(&guards)?;
        let [qi, ki, vi, oi, gi, li, qg, kg] = &ins[..] else {
            bail!("flash_attn: internal")
        };
        let stream = dev.cuda_stream();
        let ints = [t, s, h, kv, d].map(|x| x as i32);
        let (causal, window) = (self.causal as i32, self.window as i32);

        let mut delta = Out::alloc(&dev, DType::F32, b_ * h * t)?;
        let f = cuda::kernel(&dev, "flash_attn", &format!("flash_bwd_dot_{sfx}"))?;
        let dims = [b_ as i32, t as i32, h as i32, d as i32];
        let mut bl = stream.launch_builder(&f);
        oi.push(&mut bl);
        gi.push(&mut bl);
        delta.push(&mut bl);
        for x in &dims {
            bl.arg(x);
        }
        cuda::run(bl, cuda::cfg((b_ * t * h).div_ceil(8).min(65535), 256, 0))?;
        let delta = delta.into_tensor(&dev, (b_, h, t));
        let (ds_, dl) = delta.storage_and_layout();
        let di = In::new(cuda::storage(&ds_)?, dl)?;

        let mut dq = Out::alloc(&dev, q.dtype(), q.elem_count())?;
        let f = cuda::kernel(&dev, "flash_attn", &format!("flash_bwd_dq_{sfx}"))?;
        let mut bl = stream.launch_builder(&f);
        for x in [qi, ki, vi, qg, kg, gi, li, &di] {
            x.push(&mut bl);
        }
        dq.push(&mut bl);
        for x in &ints {
            bl.arg(x);
        }
        bl.arg(&self.scale).arg(&causal).arg(&window);
        cuda::run(bl, grid3(t.div_ceil(8), h, b_))?;

        let mut dk = Out::alloc(&dev, k.dtype(), k.elem_count())?;
        let mut dv = Out::alloc(&dev, v.dtype(), v.elem_count())?;
        let f = cuda::kernel(&dev, "flash_attn", &format!("flash_bwd_dkdv_{sfx}"))?;
        let mut bl = stream.launch_builder(&f);
        for x in [qi, ki, vi, qg, kg, gi, li, &di] {
            x.push(&mut bl);
        }
        dk.push(&mut bl);
        dv.push(&mut bl);
        for x in &ints {
            bl.arg(x);
        }
        bl.arg(&self.scale).arg(&causal).arg(&window);
        cuda::run(bl, grid3(s.div_ceil(32), kv, b_))?;
        Ok((
            dq.into_tensor(&dev, q.shape()),
            dk.into_tensor(&dev, k.shape()),
            dv.into_tensor(&dev, v.shape()),
        ))
    }
}

/// A (x, y, z) grid of 128-thread blocks.
#[cfg(feature = "cuda")]
fn grid3(x: usize, y: usize, z: usize) -> crate::cuda::LaunchConfig {
    crate::cuda::LaunchConfig {
        grid_dim: (x.max(1) as u32, y as u32, z as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}
